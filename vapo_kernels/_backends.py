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

BACKENDS = ("reference", "cpp", "triton", "cuda")

# Automatic order per device type. ``cuda`` is after ``triton``: the CUDA C++ kernels
# are compiled in CI but have not yet run on a GPU in this project's history, so they
# are used only when asked for by name (see README "Backends").
_AUTO_ORDER = {
    "cpu": ("cpp", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}

_kernels: dict[tuple[str, str], Callable] = {}
_warned: set[str] = set()


def register(op: str, backend: str):
    """Decorator: ``@register("gae", "cpp")`` makes the function the ``cpp`` kernel of ``gae``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn):
        _kernels[(op, backend)] = fn
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
            return "the C++ extension was built without CUDA kernels (no nvcc or CPU-only torch)"
        return None
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:  # pragma: no cover - triton is a test dependency
            return f"triton is not installed ({e})"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
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
    "gae": ("gae", "masked_whiten", "valid_counts"),
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
    requested = backend or os.environ.get("VAPO_BACKEND") or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {requested!r}")
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
    return (
        torch.version.cuda is not None
        and os.environ.get("VAPO_NO_CUDA") != "1"
        and (shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME"))
    )


def _build(verbose: bool = False):
    from torch.utils import cpp_extension

    src = csrc_dir()
    sources = [src / "ops.cpp", *sorted((src / "cpu").glob("*.cpp"))]
    defines = []
    if _cuda_wanted():
        sources += sorted((src / "cuda").glob("*.cu")) + sorted((src / "cuda").glob("*.cpp"))
        defines.append("-DVAPO_WITH_CUDA")
    # A name per source set so a CPU-only and a CUDA build never share a cache folder.
    digest = hashlib.sha1("".join(str(s.name) for s in sources).encode()).hexdigest()[:8]
    cflags = ["-O3", "-fopenmp", "-std=c++17", *defines]
    name = f"vapo_kernels_C_{digest}"
    clear_stale_lock(Path(cpp_extension._get_build_directory(name, verbose)) / "lock")
    return cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=cflags,
        extra_cuda_cflags=["-O3", "-lineinfo", *defines],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(src)],
        verbose=verbose,
    )


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
        if os.environ.get("VAPO_NO_EXTENSION") == "1":
            _ext_error = "disabled by VAPO_NO_EXTENSION=1"
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
