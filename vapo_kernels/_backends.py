"""The one backend registry.

Every op family registers its kernels here under a backend name:

* ``reference`` - readable PyTorch, the spec (any device);
* ``cpp``       - C++ CPU kernels from ``csrc/cpu`` (compiled just in time);
* ``triton``    - Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``);
* ``cuda``      - CUDA C++ kernels from ``csrc/cuda`` (compiled only with a CUDA build of torch).

Which one runs: the ``backend=`` argument of the call, else the ``VAPO_BACKEND``
environment variable, else the first available backend in the device's preference order.
A backend asked for by name that cannot run raises; an automatic choice that cannot run
is skipped with a one-time warning that says why.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from . import _env

BACKENDS = ("reference", "cpp", "triton", "cuda")

# Automatic order per device type. ``cuda`` is not in it: the CUDA C++ kernels are
# compiled in CI but have not yet run on a GPU in this project's history, so they are
# used only when asked for by name (see README "Backends"); without Triton a CUDA tensor
# falls back to the reference.
_AUTO_ORDER = {
    "cpu": ("cpp", "reference"),
    "cuda": ("triton", "reference"),
}

_kernels: dict[tuple[str, str], Callable] = {}
_warned: set[str] = set()


def register(op: str, backend: str):
    """Decorator: ``@register("gae", "cpp")`` makes the function the ``cpp`` kernel of ``gae``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn):
        _kernels[(op, backend)] = fn
        _selected.clear()
        return fn

    return deco


def from_extension(name: str) -> Callable:
    """A kernel that calls ``name`` of the compiled extension (built on first use)."""

    def kernel(*args):
        return getattr(extension(), name)(*args)

    kernel.__name__ = name
    kernel.extension_symbol = name
    return kernel


def from_module(module: str, name: str) -> Callable:
    """A kernel imported on first use: Triton modules read TRITON_INTERPRET at import."""

    def kernel(*args):
        return getattr(importlib.import_module(module), name)(*args)

    kernel.__name__ = name
    return kernel


def _why_unavailable(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``, else the reason it cannot."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    if backend == "reference":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got {device.type}"
        return extension_error()
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device.type}"
        err = extension_error()
        if err:
            return err
        if not getattr(extension(), "has_cuda", False):
            return ("the C++ extension was built without CUDA kernels (no nvcc, a CPU-only "
                    "torch, or no GPU visible and no TORCH_CUDA_ARCH_LIST at build time)")
        return None
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:  # pragma: no cover - triton is a test dependency
            return f"triton is not installed ({e})"
        if device.type == "cpu" and _env.value("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not run on {device.type} tensors"
        return None
    return f"unknown backend {backend!r}"


def _why_kernel_unavailable(op: str, backend: str, device: torch.device) -> str | None:
    """Like _why_unavailable, and also checks that the built extension has the kernel."""
    why = _why_unavailable(backend, device)
    symbol = getattr(_kernels[(op, backend)], "extension_symbol", None)
    if why is None and symbol is not None and not hasattr(extension(), symbol):
        why = f"the compiled extension has no {symbol} (an old build? python -m vapo_kernels.build)"
    return why


# Families of ops: a backend a user names is a request for the whole family. The first
# op of each family is its primary one: ``available_backends(family)`` lists what it can
# run, and every other op of the family (helpers such as the whitening or counting
# kernels) resolves the same name to its best kernel that can run (see :func:`select`).
FAMILIES = {
    "gae": ("gae", "masked_whiten", "valid_counts", "adaptive_coefficients"),
    "logprobs": (
        "token_logprobs", "token_logprobs_backward", "linear_logprobs", "linear_logprobs_backward",
    ),
    "loss": ("token_loss", "logits_loss", "valid_counts"),
}


def select(op: str, device: torch.device, backend: str | None = None) -> tuple[str, Callable]:
    """Pick the kernel of ``op`` for tensors on ``device``; returns ``(name, kernel)``.

    ``backend`` (else ``VAPO_BACKEND``) names a backend for the op's family: the op runs
    that backend's kernel when it has one (raising if it cannot run here), and otherwise
    its best kernel in the device's automatic order - so ``gae(..., whiten=True,
    backend="triton")`` whitens with whatever whitening kernel runs best. With no name,
    the automatic order; an automatic choice that cannot run falls back with a one-time
    warning that says why.
    """
    requested = backend or _env.value("VAPO_BACKEND") or None
    # Called on every op call: the answer depends only on these (and, for Triton asked for
    # on CPU tensors, on the interpreter switch), so it is worked out once per key. (The
    # device itself, not device.type: that makes a new string per call.)
    key = (op, device, requested)
    if requested == "triton" and device.type == "cpu":
        key += (_env.value("TRITON_INTERPRET"),)
    chosen = _selected.get(key)
    if chosen is None:
        name, kernel = _select(op, device, requested, "backend" if backend else "VAPO_BACKEND")
        symbol = getattr(kernel, "extension_symbol", None)
        if symbol is not None:  # _select built the extension: call its function directly
            kernel = getattr(extension(), symbol)
        chosen = _selected[key] = (name, kernel)
    return chosen


_selected: dict[tuple, tuple[str, Callable]] = {}


def _select(op: str, device: torch.device, requested: str | None, source: str) -> tuple[str, Callable]:
    if requested is not None:
        if requested not in BACKENDS:  # source: the argument, or the environment variable
            raise ValueError(f"{source} must be one of {BACKENDS} or None, got {requested!r}")
        if (op, requested) in _kernels:
            why = _why_kernel_unavailable(op, requested, device)
            if why:
                raise RuntimeError(f"backend {requested!r} cannot run {op!r}: {why}")
            return requested, _kernels[(op, requested)]
    for name in _AUTO_ORDER.get(device.type, ("reference",)):
        if (op, name) not in _kernels:
            continue
        why = _why_kernel_unavailable(op, name, device)
        if why is None:
            return name, _kernels[(op, name)]
        if name not in _warned and name != "triton":
            _warned.add(name)
            warnings.warn(f"vapo_kernels: {name} backend unavailable, falling back: {why}", stacklevel=3)
    return "reference", _kernels[(op, "reference")]


def available(op: str, device: torch.device | str) -> list[str]:
    """Backends that can run ``op`` (an op name, or a family: its primary op) on
    ``device`` right now (builds the extension if needed)."""
    op = FAMILIES[op][0] if op in FAMILIES else op
    device = torch.device(device)
    runnable = [b for b in BACKENDS if (op, b) in _kernels]
    return [b for b in runnable if _why_kernel_unavailable(op, b, device) is None]


# --------------------------------------------------------------------------------------
# The C++ / CUDA extension, compiled just in time and cached by torch.utils.cpp_extension.

_ext = None
_ext_error: str | None = None
_ext_tried = False


def csrc_dir() -> Path:
    """csrc/ in a source checkout, or the copy shipped inside the wheel."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "csrc", here / "_csrc"):
        if (cand / "ops.cpp").exists():
            return cand
    raise FileNotFoundError("cannot find the csrc/ sources of vapo_kernels")


def _cuda_wanted() -> bool:
    """CUDA kernels are built with a CUDA torch and nvcc, for the GPUs this machine sees or
    the architectures TORCH_CUDA_ARCH_LIST names. (A CUDA torch - pip's default - on a
    machine without a GPU and without that list made torch's build fail on an empty
    architecture list, losing the C++ CPU kernels too.)"""
    no_cuda = _env.flag("VAPO_NO_CUDA", False)  # read first: a bad value is an error anywhere
    return (
        torch.version.cuda is not None
        and not no_cuda
        and (shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME")))
        and (bool(os.environ.get("TORCH_CUDA_ARCH_LIST")) or torch.cuda.is_available())
    )


def _cuda_archs() -> str:
    """The architectures torch's build compiles the CUDA kernels for: TORCH_CUDA_ARCH_LIST,
    else those of the visible GPUs."""
    named = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if named:
        return named
    return ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                            for i in range(torch.cuda.device_count())}))


def _build_key(sources: list[Path], flags: list[str]) -> str:
    """A name for the build folder that changes with anything that changes the binary:
    every source and header's content, the flags, the torch version and the Python ABI -
    and with the sources' folder, because ninja rebuilds when the compile commands (which
    hold the source paths) differ. Two checkouts or two environments on one machine then
    never overwrite each other's build (keyed by file names only, they rebuilt in turns,
    four times in 20 minutes)."""
    import sysconfig

    digest = hashlib.sha256(str(csrc_dir().resolve()).encode())
    headers = sorted(p for p in csrc_dir().rglob("*") if p.suffix in (".h", ".cuh"))
    for path in [*sources, *headers]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    abi = sysconfig.get_config_var("SOABI") or ""
    digest.update(" ".join([*flags, torch.__version__, str(torch.version.cuda), abi]).encode())
    return digest.hexdigest()[:12]


def _build(verbose: bool = False):
    from torch.utils import cpp_extension

    src = csrc_dir()
    sources = [*sorted(src.glob("*.cpp")), *sorted((src / "cpu").glob("*.cpp"))]
    # Longest compiles first, so the parallel jobs finish together (ninja starts them in
    # this order): the loss kernels, then the pybind11 bindings.
    sources.sort(key=lambda p: (p.name != "loss.cpp", p.name != "ops.cpp", p.name))
    defines = []
    if _cuda_wanted():
        sources += sorted((src / "cuda").glob("*.cu")) + sorted((src / "cuda").glob("*.cpp"))
        defines.append("-DVAPO_WITH_CUDA")
    # TORCH_ASSERT_ONLY_METHOD_OPERATORS: kernel files include only the ATen headers they
    # use (a file including <ATen/ATen.h> or <torch/extension.h> fails to compile), which
    # keeps the first build short.
    cflags = ["-O3", "-fopenmp", "-std=c++17", "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS", *defines]
    # The GPU architectures compiled for belong in the build's name too: a build made for
    # one GPU, reused on another, would have no kernel image for it.
    archs = [_cuda_archs()] if defines else []
    name = f"vapo_kernels_C_{_build_key(sources, [*cflags, *archs])}"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose))
    clear_stale_lock(build_dir / "lock")
    with _BuildProgress(build_dir, name, sources, quiet=verbose):
        return cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=["-O3", "-lineinfo", *defines],
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(src)],
            build_directory=str(build_dir),
            verbose=verbose,
        )


class _BuildProgress:
    """Says what is happening while the extension compiles (a silent 1-2 minute compile on
    first use looked hung): progress over the files compiled so far, fed by watching the
    object files appear in the build folder - a bar on a terminal, a line per file in a
    log. Nothing when the build is cached already."""

    def __init__(self, build_dir: Path, name: str, sources: list[Path], quiet: bool):
        import sys

        self.build_dir, self.total = build_dir, len(sources) + 1  # + the link
        self.active = not quiet and not (build_dir / f"{name}.so").exists()
        self.out = sys.stderr
        self._stop = None
        self._shown = 0  # files reported so far

    def __enter__(self):
        if not self.active:
            return self
        import threading

        jobs = os.environ.get("MAX_JOBS") or os.cpu_count()
        print(
            f"vapo_kernels: compiling the C++ kernels ({self.total - 1} files, {jobs} "
            f"parallel jobs; once per version, then cached in {self.build_dir})",
            file=self.out, flush=True,
        )
        self._started = time.time()
        self._bar = None
        if self.out.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc="vapo_kernels: compiling", unit="file",
                             file=self.out)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _done(self) -> int:
        files = [*self.build_dir.glob("*.o"), *self.build_dir.glob("*.so")]
        return min(sum(1 for f in files if f.stat().st_mtime >= self._started - 1), self.total)

    def _watch(self):
        while not self._stop.wait(0.5):
            self._show()

    def _show(self) -> None:
        done = self._done()
        if self._bar is not None:
            self._bar.n = done
            self._bar.refresh()
        elif done > self._shown:
            print(f"vapo_kernels: compiled {done}/{self.total} "
                  f"({time.time() - self._started:.0f} s)", file=self.out, flush=True)
        self._shown = done

    def __exit__(self, *exc):
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._show()
            if self._bar is not None:
                self._bar.close()
            print(f"vapo_kernels: C++ kernels compiled in {time.time() - self._started:.0f} s",
                  file=self.out, flush=True)
        return False


# No build of the extension takes this long, even on a loaded 2-core machine.
STALE_LOCK_S = 20 * 60


def clear_stale_lock(lock: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove torch's build ``lock`` file if it is older than any build: a build that was
    killed leaves it behind, and every later process then waits on it forever (seen: all
    tests and runs on a machine hung for 20 minutes). Returns whether it removed one."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age <= max_age_s:
        return False  # a build may be running right now: wait for it, as torch does
    warnings.warn(
        f"vapo_kernels: removing a stale build lock left by a killed build "
        f"({lock}, {age / 60:.0f} min old)",
        stacklevel=2,
    )
    lock.unlink(missing_ok=True)
    return True


def extension(verbose: bool = False):
    """The compiled extension module (built on first call), or None if it cannot be built."""
    global _ext, _ext_error, _ext_tried
    if not _ext_tried:
        _ext_tried = True
        if _env.flag("VAPO_NO_EXTENSION", False):
            _ext_error = "disabled by VAPO_NO_EXTENSION"
        else:
            try:
                _ext = _build(verbose)
            except Exception as e:  # noqa: BLE001 - a missing compiler must not break the import
                _ext_error = f"building the C++ extension failed: {type(e).__name__}: {e}"
    return _ext


def empty_output(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like ``like``: for large CPU outputs, on transparent
    huge pages from the extension when it is already loaded (a fresh 128 MiB gradient
    costs ~50 ms of 4 KiB page faults on first touch otherwise); else ``torch.empty``.
    Never builds the extension."""
    if like.device.type == "cpu" and _ext is not None and hasattr(_ext, "empty_like_cpu"):
        return _ext.empty_like_cpu(like)
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def extension_error() -> str | None:
    """None if the extension is usable, else why not (builds it on first call)."""
    extension()
    return _ext_error
