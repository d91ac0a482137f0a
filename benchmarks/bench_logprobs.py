"""Token log-probs and entropy side by side: our kernels vs the peers' functions, in one run.

Four tasks, all rows valid, temperature 1 (the peers' functions take no temperature):

* ``logp``       - log-prob of each row's target from (N, V) logits: ours
  (``vapo_kernels.token_logprobs``, every backend, and its in-place backward) vs verl's
  ``logprobs_from_logits`` paths (v2 row loop, naive, flash-attn cross-entropy), TRL's
  ``selective_log_softmax`` and plain PyTorch ``log_softmax(-1).gather()``, eager and
  under ``torch.compile``;
* ``logp+ent``   - the same plus each row's entropy: ours (one pass) vs verl's
  ``logprobs_from_logits`` + ``entropy_from_logits`` (or its chunked variant), TRL's
  ``selective_log_softmax`` + ``entropy_from_logits``, TRL >= 1.16's one-pass Triton
  ``selective_log_softmax_and_entropy`` (CUDA) and PyTorch eager / compiled;
* ``linear``     - the log-prob from hidden states (N, H) and an LM head (V, H), logits
  never materialised by the fused ones: ours (``vapo_kernels.linear_logprobs``) vs Liger's
  fused linear cross-entropy, Cut Cross-Entropy (``filter_eps=None``: exact), TRL >= 1.16's
  ``ChunkedLogProbFunction``, PyTorch matmul + log_softmax + gather (eager / compiled), and
  the bare ``hidden @ weight.T`` matmul, whose time is the floor;
* ``linear+ent`` - the same plus the entropy: ours vs verl's ``linear_cross_entropy``
  (Triton, CUDA), TRL's chunked function with entropy, PyTorch eager / compiled.

Every implementation runs on the same inputs (bf16 by default), forward under
``torch.no_grad`` (the old / reference log-prob pass) and forward + backward (gradients
with respect to the logits, or to hidden and weight, under random per-token upstream
gradients, as a PPO loss sends them). Peak memory is measured on a warm call of each:
CUDA, ``torch.cuda.max_memory_allocated`` over what was allocated before the call; CPU,
the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) over
its resident set before the call, taken after ``malloc_trim(0)`` has returned the heap's
free pages, so that memory a call reuses counts as well as memory it maps (see README).
Both count the outputs, gradients included, not the inputs.

Checked before timed: each row of ours against float64 on a fixed subset of rows (outputs
and gradients; a fused-linear weight gradient from a call on the subset alone), then every
peer against ours at full size - outputs per row, gradients by relative norm - with
tolerances that allow the peer's own rounding when it computes in bf16 (see ``_tolerance``).
A row that fails is reported as FAILED and not timed; a failed row of ours makes the
script exit 1. Peers that are not installed, or run only on CUDA, are skipped with the
reason printed.

Floors, measured on this device in this run: from logits, the forward reads N*V*elt bytes
and the forward + backward 3*N*V*elt (two reads and the gradient written), at the copy
bandwidth (read + write) measured here; fused linear, 2*N*V*H FLOP forward and 6*N*V*H
forward + backward at the rate of the bare matmul timed at the same shape. Results: a table
per shape, ``<out>/logprobs_<device>.json`` (rows), ``<out>/logprobs_<device>.txt``,
``<out>/logprobs_<device>_logits.png`` and ``_linear.png`` (rows/s, a panel per task and mode).

    python benchmarks/bench_logprobs.py                  # CPU, default shapes
    python benchmarks/bench_logprobs.py --quick          # smoke run, tiny shapes
    python benchmarks/bench_logprobs.py --device cuda    # on a GPU
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _harness as H  # noqa: E402 - after the sys.path insert

import vapo_kernels as vk  # noqa: E402

TASKS = ("logp", "logp+ent", "linear", "linear+ent")
FWD, TRAIN = "fwd", "fwd+bwd"
MODES = (FWD, TRAIN)

# Inputs: logits z = SIGMA * randn, plus a boost in [0, BOOST_MAX) on one preferred token
# per row, which is the target with probability P_PREFERRED (else a uniform token): rows
# run from flat (entropy ~ log V) to peaked (entropy ~ 0), as an LLM's do.
SIGMA = 1.0
BOOST_MAX = 12.0
P_PREFERRED = 0.7
TRL_SEQLEN = 1024  # TRL takes padded (B, T, V) logits: B = N / T rows of T tokens

PREFIX_ROWS = 256  # rows timed to predict a full call's cost
CHECK_ROWS = 32  # rows checked against float64
GRAD_ROWS = 512  # rows of the logits gradient kept from ours to check the peers'
OURS_FWD_TOL = 1e-4  # x (1 + M): fp32 arithmetic on exact inputs (M = max|z| + log V)
PEER_FWD_K = 8  # x u x M: a bf16 peer rounds a handful of O(M) intermediates
UNIT_ROUNDOFF = {
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
    torch.float32: 2.0**-24,
    torch.float64: 2.0**-53,
}

# Per-call shapes: little work per call, so the call's fixed cost shows. Their rows run on
# --per-call-threads threads (1), each the median of hundreds of calls, beside a bare
# torch op timed in the same run.
PER_CALL_SHAPES = [(1024, 1024)]
# CPU: small enough that the default run takes minutes on 2 cores.
CPU_SHAPES = [*PER_CALL_SHAPES, (1024, 32768), (4096, 32768), (1024, 151936), (1024, 32768, 512)]
GPU_SHAPES = [(n, v) for n in (4096, 16384, 65536) for v in (32768, 151936)] + [
    (n, v, h) for n in (4096, 16384, 65536) for v in (32768, 151936) for h in (2048, 4096)
]
QUICK_SHAPES = [*PER_CALL_SHAPES, (256, 3000), (64, 3000, 128)]
PER_CALL = {(*s, None)[:3] for s in PER_CALL_SHAPES}  # as (n, v, h)


@dataclass(frozen=True)
class Shape:
    n: int
    v: int
    h: int | None = None  # None: from logits; else the fused LM head's hidden size

    @property
    def linear(self) -> bool:
        return self.h is not None

    @property
    def label(self) -> str:
        return f"{self.n}x{self.v}" + (f"x{self.h}" if self.h else "")

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("linear", "linear+ent") if self.linear else ("logp", "logp+ent")


def parse_shapes(spec: str) -> list[Shape]:
    shapes = []
    for item in spec.split(","):
        dims = [int(d) for d in item.lower().split("x")]
        if len(dims) not in (2, 3):
            raise ValueError(f"shape {item!r}: expected NxV (logits) or NxVxH (fused linear)")
        shapes.append(Shape(*dims))
    return shapes


# --------------------------------------------------------------------------------------
# Inputs


@dataclass
class Inputs:
    targets: Tensor  # (N,) int64
    w: Tensor  # (N,) fp32, upstream gradient of the log-probs
    c: Tensor  # (N,) fp32, upstream gradient of the entropy
    logits: Tensor | None = None  # (N, V) leaf that requires grad
    hidden: Tensor | None = None  # (N, H) leaf that requires grad
    weight: Tensor | None = None  # (V, H) leaf that requires grad, shared by the sets

    @property
    def leaves(self) -> list[Tensor]:
        return [self.logits] if self.logits is not None else [self.hidden, self.weight]

    @property
    def n(self) -> int:
        return self.targets.shape[0]

    def rows(self, index: Tensor | slice) -> Inputs:
        """The same problem on a subset of rows (new leaves over the same values)."""

        def leaf(t):  # a copy: an in-place backward must not reach the full set's rows
            return None if t is None else t.detach()[index].clone().requires_grad_()

        return Inputs(
            self.targets[index],
            self.w[index],
            self.c[index],
            logits=leaf(self.logits),
            hidden=leaf(self.hidden),
            weight=self.weight,
        )

    def private_copy(self) -> Inputs:
        """For an in-place backward, which overwrites the logits it is given."""
        return replace(self, logits=self.logits.detach().clone().requires_grad_())


def make_inputs(shape: Shape, dtype, device, seed: int, weight: Tensor | None = None) -> Inputs:
    """Random inputs (never zeros) drawn on the device, in row chunks so that the fp32
    temporaries stay small next to the (N, V) logits."""
    g = torch.Generator(device=device).manual_seed(seed)
    n, v = shape.n, shape.v

    def rand(*size, **kw):
        return torch.rand(*size, generator=g, device=device, **kw)

    preferred = torch.randint(0, v, (n,), generator=g, device=device)
    boost = rand(n) * BOOST_MAX
    uniform = torch.randint(0, v, (n,), generator=g, device=device)
    targets = torch.where(rand(n) < P_PREFERRED, preferred, uniform)
    w = torch.randn(n, generator=g, device=device)
    c = torch.randn(n, generator=g, device=device)
    chunk = max(1, (64 << 20) // (4 * v))
    if not shape.linear:
        logits = torch.empty(n, v, dtype=dtype, device=device)
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            z = torch.randn(r1 - r0, v, generator=g, device=device).mul_(SIGMA)
            z[torch.arange(r1 - r0, device=device), preferred[r0:r1]] += boost[r0:r1]
            logits[r0:r1] = z
        return Inputs(targets, w, c, logits=logits.requires_grad_())
    if weight is None:
        # rows of norm ~1, so that z_v = h . W_v has the noise of h (std SIGMA)
        weight = torch.empty(v, shape.h, dtype=dtype, device=device)
        chunk = max(1, (64 << 20) // (4 * shape.h))
        for r0 in range(0, v, chunk):
            r1 = min(v, r0 + chunk)
            weight[r0:r1] = torch.randn(r1 - r0, shape.h, generator=g, device=device) / math.sqrt(
                shape.h
            )
        weight.requires_grad_()
    # h = noise + b W_p / |W_p|^2 adds b to the preferred token's logit
    wp = weight.detach()[preferred].float()
    hidden = torch.randn(n, shape.h, generator=g, device=device).mul_(SIGMA)
    hidden += boost[:, None] * wp / (wp * wp).sum(-1, keepdim=True)
    return Inputs(targets, w, c, hidden=hidden.to(dtype).requires_grad_(), weight=weight)


def logits_of(x: Inputs, r0: int = 0, r1: int | None = None) -> Tensor:
    """Rows [r0, r1) of the logits (computed for the fused-linear inputs), no grad."""
    if x.logits is not None:
        return x.logits.detach()[r0:r1]
    return x.hidden.detach()[r0:r1] @ x.weight.detach().T


def row_max_abs(x: Inputs) -> Tensor:
    """max_v |z_v| per row (fp32), for the tolerances."""
    v = x.logits.shape[1] if x.logits is not None else x.weight.shape[0]
    chunk = max(1, (256 << 20) // (4 * v))
    return torch.cat(
        [logits_of(x, r0, r0 + chunk).abs().amax(-1).float() for r0 in range(0, x.n, chunk)]
    )


# --------------------------------------------------------------------------------------
# Memory


def _malloc_trim() -> bool:
    """Give glibc's free heap pages back to the kernel (False where that is not glibc).

    Freed buffers stay resident in the heap, and a later allocation that reuses them does
    not raise the resident set: trimmed first, every page a call touches is counted.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def cpu_peak_supported() -> str | None:
    """None if the resident-set high-water mark can be reset here, else why not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_bytes("VmHWM:")
        return None
    except (OSError, KeyError) as e:
        return f"cannot reset the resident high-water mark ({type(e).__name__}: {e})"


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[int | None, float, Any]:
    """(peak bytes above what was in use before the call, wall seconds, fn's result)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        return torch.cuda.max_memory_allocated(device) - base, wall, out
    if cpu_peak_supported() is not None:
        t0 = time.perf_counter()
        out = fn()
        return None, time.perf_counter() - t0, out
    _malloc_trim()
    base = _proc_status_bytes("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    return max(0, _proc_status_bytes("VmHWM:") - base), wall, out


# --------------------------------------------------------------------------------------
# Peers


@dataclass
class Peers:
    verl: Any = None  # verl.utils.torch_functional (or its functions, from source)
    verl_default: str = ""  # which logprobs_from_logits path verl takes here
    verl_linear: Callable | None = None
    trl: Any = None  # trl.trainer.utils
    trl_chunked: Any = None  # trl.kernels.ChunkedLogProbFunction (trl >= 1.16)
    liger: Callable | None = None
    cce: Callable | None = None
    flash_attn: bool = False
    why: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)


_VERL_FUNCS = [
    "gather_from_labels",
    "logprobs_from_logits",
    "logprobs_from_logits_flash_attn",
    "logprobs_from_logits_naive",
    "logprobs_from_logits_v2",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
]


def load_verl():
    """verl's module, imported; where its import fails (it pulls in tensordict and
    transformers), its functions compiled from the installed source file with the
    module-level flags it would have set."""
    try:
        return importlib.import_module("verl.utils.torch_functional")
    except Exception:  # noqa: BLE001 - fall back to the source below
        pass
    from types import SimpleNamespace

    ns: dict[str, Any] = {"torch": torch, "F": F, "os": os}
    ns["NPU_CROSS_ENTROPY_LOSS_AVAILABLE"] = False
    ns["FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE"] = False  # sic: verl's spelling
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

        ns["cross_entropy_loss"] = cross_entropy_loss
        ns["FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE"] = True
    except ImportError:
        pass
    H.load_from_source("verl", "utils/torch_functional.py", _VERL_FUNCS, ns)
    return SimpleNamespace(**ns)


def load_peers(device: torch.device) -> Peers:
    p = Peers()
    for dist in ("verl", "trl", "liger-kernel", "cut-cross-entropy", "flash-attn"):
        p.versions[dist] = H.package_version(dist)
    cuda = device.type == "cuda"

    try:
        p.verl = load_verl()
        flash = bool(getattr(p.verl, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False))
        disabled = os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") == "1"
        p.flash_attn = flash
        p.verl_default = "flash_attn" if flash and not disabled else "v2"
    except Exception as e:  # noqa: BLE001 - a peer that cannot load loses its rows
        p.why["verl"] = f"verl not loadable: {type(e).__name__}: {e}"
    if "verl" not in p.why and not p.flash_attn:
        p.why["verl_flash"] = "flash-attn is not installed (its Triton cross-entropy runs on CUDA)"
    elif not cuda:
        p.why["verl_flash"] = "flash-attn's cross-entropy is a Triton kernel: CUDA only"
    try:
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

        p.verl_linear = linear_cross_entropy
        if not cuda:
            p.why["verl_linear"] = "verl's linear_cross_entropy is a Triton kernel: CUDA only"
    except Exception as e:  # noqa: BLE001
        p.why["verl_linear"] = f"verl.utils.kernel not loadable: {type(e).__name__}: {e}"

    try:
        p.trl = importlib.import_module("trl.trainer.utils")
    except Exception as e:  # noqa: BLE001
        p.why["trl"] = f"trl not loadable: {type(e).__name__}: {e}"
    trl_version = p.versions["trl"] or "?"
    if p.trl is not None and hasattr(p.trl, "selective_log_softmax_and_entropy"):
        if not cuda:
            p.why["trl_fused"] = (
                "TRL's one-pass Triton kernel runs on CUDA only (elsewhere the function "
                "falls back to the two calls of the row above)"
            )
    else:
        p.why["trl_fused"] = (
            f"needs trl >= 1.16 (selective_log_softmax_and_entropy); trl {trl_version} here"
        )
    try:
        p.trl_chunked = importlib.import_module("trl.kernels").ChunkedLogProbFunction
    except Exception as e:  # noqa: BLE001
        p.why["trl_chunked"] = (
            f"needs trl >= 1.16 (trl.kernels.ChunkedLogProbFunction); trl {trl_version} here "
            f"({type(e).__name__})"
        )

    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        p.liger = liger_fused_linear_cross_entropy
        if not cuda:
            p.why["liger"] = "Liger's kernels are Triton: CUDA only"
    except Exception as e:  # noqa: BLE001
        p.why["liger"] = f"liger-kernel not importable ({type(e).__name__}: {e}); CUDA only"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        p.cce = cce
        if not cuda:
            p.why["cce"] = "Cut Cross-Entropy's kernels are Triton: CUDA only"
    except Exception as e:  # noqa: BLE001
        p.why["cce"] = f"cut-cross-entropy not importable ({type(e).__name__}: {e}); CUDA only"
    return p


# --------------------------------------------------------------------------------------
# What runs


Outputs = tuple[Tensor, Tensor | None]  # (logp (N,), entropy (N,) or None)


@dataclass
class Impl:
    name: str
    task: str
    kind: str  # "ours" | "peer" | "floor" (the bare matmul) | "bare" (a bare op): not checked
    fn: Callable[[Inputs], Outputs]
    note: str = ""
    unavailable: str | None = None
    inplace: bool = False  # its backward overwrites the logits: runs on a private copy
    predict: bool = True  # time a call on a row prefix first to skip a too-slow one
    call_cap: float = 1.0  # x --max-call-s before the row is skipped as too slow
    upstream: Callable[[Inputs, list[Tensor]], list[Tensor]] | None = None


def _z(x: Inputs) -> Tensor:
    # A view, not the leaf itself: what an in-place backward may write into (the peers
    # get logits that some layer produced, never a leaf they own).
    return x.logits.view(x.logits.shape)


def _trl_view(x: Inputs) -> tuple[Tensor, Tensor]:
    n, v = x.logits.shape
    t = TRL_SEQLEN if n % TRL_SEQLEN == 0 else n
    return x.logits.view(n // t, t, v), x.targets.view(n // t, t)


def torch_logp(z: Tensor, y: Tensor) -> Tensor:
    return z.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)


def torch_logp_ent(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    lsm = z.log_softmax(-1)
    return lsm.gather(-1, y[:, None]).squeeze(-1), -(lsm.exp() * lsm).sum(-1)


def torch_linear_logp(h: Tensor, w: Tensor, y: Tensor) -> Tensor:
    return torch_logp(h @ w.T, y)


def torch_linear_logp_ent(h: Tensor, w: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return torch_logp_ent(h @ w.T, y)


_COMPILED: dict[str, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """One torch.compile wrapper per function for the whole run: its later shapes take
    torch's automatic dynamic-shape recompile, as a training loop would."""
    if fn.__name__ not in _COMPILED:
        _COMPILED[fn.__name__] = torch.compile(fn)
    return _COMPILED[fn.__name__]


def build_impls(
    shape: Shape, backends: dict[str, list[str]], peers: Peers, tasks, device, compile_why
) -> list[Impl]:
    why = peers.why
    impls: list[Impl] = []

    def cap(family: str, backend: str) -> float:
        # Our rows may take 3x a peer's time limit: they are what the run is for. Not the
        # reference where a faster backend of ours exists: there it is the readable spec.
        return 1.0 if backend == "reference" and len(backends[family]) > 1 else 3.0

    def add(*args, **kw):
        impl = Impl(*args, **kw)
        if impl.task in tasks:
            impls.append(impl)

    if not shape.linear:
        for b in backends["logits"]:
            add(
                f"vapo.token_logprobs[{b}]",
                "logp",
                "ours",
                lambda x, b=b: (vk.token_logprobs(_z(x), x.targets, backend=b), None),
                "one pass forward, one backward",
                call_cap=cap("logits", b),
            )
            if b != "reference":
                add(
                    f"vapo.token_logprobs+inplace[{b}]",
                    "logp",
                    "ours",
                    lambda x, b=b: (
                        vk.token_logprobs(_z(x), x.targets, inplace_backward=True, backend=b),
                        None,
                    ),
                    "inplace_backward=True: the gradient overwrites the logits",
                    inplace=True,
                    call_cap=cap("logits", b),
                )
            add(
                f"vapo.token_logprobs[{b}]",
                "logp+ent",
                "ours",
                lambda x, b=b: vk.token_logprobs(_z(x), x.targets, return_entropy=True, backend=b),
                "return_entropy=True: one pass for both",
                call_cap=cap("logits", b),
            )
        default = f" (verl's default path here, {peers.verl_default})"
        v = peers.verl
        add(
            "verl.logprobs_from_logits_v2",
            "logp",
            "peer",
            lambda x: (v.logprobs_from_logits_v2(_z(x), x.targets), None),
            "per-row loop (packed N x V, as with remove-padding)"
            + (default if peers.verl_default == "v2" else ""),
            unavailable=why.get("verl"),
        )
        add(
            "verl.logprobs_from_logits_naive",
            "logp",
            "peer",
            lambda x: (v.logprobs_from_logits_naive(_z(x), x.targets), None),
            "log_softmax + gather",
            unavailable=why.get("verl"),
        )
        add(
            "verl.logprobs_from_logits_flash_attn",
            "logp",
            "peer",
            lambda x: (v.logprobs_from_logits_flash_attn(_z(x), x.targets), None),
            "flash-attn Triton cross-entropy, in-place backward"
            + (default if peers.verl_default == "flash_attn" else ""),
            unavailable=why.get("verl") or why.get("verl_flash"),
            inplace=True,
        )
        add(
            "verl.logprobs_from_logits+entropy_from_logits",
            "logp+ent",
            "peer",
            lambda x: (
                v.logprobs_from_logits(_z(x), x.targets, inplace_backward=False),
                v.entropy_from_logits(_z(x)),
            ),
            f"two functions ({peers.verl_default} path for the log-prob; no in-place with entropy)",
            unavailable=why.get("verl"),
        )
        add(
            "verl.logprobs_from_logits+entropy_with_chunking",
            "logp+ent",
            "peer",
            lambda x: (
                v.logprobs_from_logits(_z(x), x.targets, inplace_backward=False),
                v.entropy_from_logits_with_chunking(_z(x)),
            ),
            "entropy in fp32 chunks of 2048 rows",
            unavailable=why.get("verl"),
        )
        t = peers.trl
        add(
            "trl.selective_log_softmax",
            "logp",
            "peer",
            lambda x: (t.selective_log_softmax(*_trl_view(x)).reshape(-1), None),
            f"trl {peers.versions.get('trl')}: loop over B of (B, T={TRL_SEQLEN}, V)"
            + (" (Triton on CUDA)" if hasattr(t, "selective_log_softmax_and_entropy") else ""),
            unavailable=why.get("trl"),
        )
        add(
            "trl.selective_log_softmax+entropy_from_logits",
            "logp+ent",
            "peer",
            lambda x: (
                t.selective_log_softmax(*_trl_view(x)).reshape(-1),
                t.entropy_from_logits(_trl_view(x)[0]).reshape(-1),
            ),
            f"trl {peers.versions.get('trl')}: two functions",
            unavailable=why.get("trl"),
        )
        add(
            "trl.selective_log_softmax_and_entropy",
            "logp+ent",
            "peer",
            lambda x: tuple(
                o.reshape(-1) for o in t.selective_log_softmax_and_entropy(*_trl_view(x))
            ),
            "one Triton pass (online logsumexp)",
            unavailable=why.get("trl") or why.get("trl_fused"),
        )
        add(
            "torch eager",
            "logp",
            "peer",
            lambda x: (torch_logp(_z(x), x.targets), None),
            "log_softmax(-1).gather() in the input dtype",
        )
        add(
            "torch eager",
            "logp+ent",
            "peer",
            lambda x: torch_logp_ent(_z(x), x.targets),
            "log_softmax once; gather; -(p * logp).sum()",
        )
        add(
            "torch.compile",
            "logp",
            "peer",
            lambda x: (compiled(torch_logp)(_z(x), x.targets), None),
            "the eager function compiled (compile time not timed)",
            unavailable=compile_why,
            predict=False,
        )
        add(
            "torch.compile",
            "logp+ent",
            "peer",
            lambda x: compiled(torch_logp_ent)(_z(x), x.targets),
            "the eager function compiled (compile time not timed)",
            unavailable=compile_why,
            predict=False,
        )
        return impls

    # Fused linear. The bare matmul first: it is the floor the others are set against.
    zgrad: dict[str, Tensor] = {}

    def matmul_upstream(x: Inputs, outs: list[Tensor]) -> list[Tensor]:
        if "g" not in zgrad:  # made once, on first use, outside any timed call
            zgrad["g"] = torch.randn_like(outs[0])
        return [zgrad["g"]]

    # One floor row serves both fused-linear tasks (listed under the first one run).
    add(
        "torch.matmul (floor)",
        "linear" if "linear" in tasks else "linear+ent",
        "floor",
        lambda x: (x.hidden @ x.weight.T, None),
        "hidden @ weight.T alone (backward: the two gradient matmuls); sets the FLOP rate",
        upstream=matmul_upstream,
    )
    for b in backends["linear"]:
        for task, ent in (("linear", False), ("linear+ent", True)):
            add(
                f"vapo.linear_logprobs[{b}]",
                task,
                "ours",
                lambda x, b=b, ent=ent: _pair(
                    vk.linear_logprobs(x.hidden, x.weight, x.targets, return_entropy=ent, backend=b)
                ),
                "fused LM head: logits tiles recomputed, never N x V",
                call_cap=cap("linear", b),
            )

    def liger(x):
        out = peers.liger(x.hidden, x.weight, x.targets, reduction="none")
        loss = out if isinstance(out, Tensor) else getattr(out, "loss", None)
        loss = out[0] if loss is None else loss
        return -loss, None

    add(
        "liger.fused_linear_cross_entropy",
        "linear",
        "peer",
        liger,
        f"liger-kernel {peers.versions.get('liger-kernel')}, reduction='none', defaults otherwise",
        unavailable=why.get("liger"),
    )
    add(
        "cce.linear_cross_entropy",
        "linear",
        "peer",
        lambda x: (
            -peers.cce(x.hidden, x.weight, x.targets, reduction="none", filter_eps=None),
            None,
        ),
        f"cut-cross-entropy {peers.versions.get('cut-cross-entropy')}, filter_eps=None (exact)",
        unavailable=why.get("cce"),
    )
    add(
        "verl.linear_cross_entropy",
        "linear+ent",
        "peer",
        lambda x: tuple(peers.verl_linear(x.hidden, x.weight, x.targets, 1.0, "none")),
        "verl.utils.kernel: fused Triton log-prob + entropy",
        unavailable=why.get("verl_linear"),
    )
    trl_chunk = getattr(peers.trl, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    for task, outputs in (("linear", ()), ("linear+ent", ("entropy",))):
        add(
            "trl.ChunkedLogProbFunction",
            task,
            "peer",
            lambda x, outputs=outputs: _pair(
                peers.trl_chunked.apply(
                    x.hidden, x.weight, None, x.targets, 1.0, trl_chunk, None, 1.0, outputs
                )[:2]
            ),
            f"trl {peers.versions.get('trl')}: matmul tiles of 4096 x {trl_chunk}, "
            + ("Triton fold" if device.type == "cuda" else "fold in torch (no Triton here)"),
            unavailable=why.get("trl_chunked"),
        )
    add(
        "torch eager",
        "linear",
        "peer",
        lambda x: (torch_linear_logp(x.hidden, x.weight, x.targets), None),
        "matmul + log_softmax + gather, N x V logits in the input dtype",
    )
    add(
        "torch eager",
        "linear+ent",
        "peer",
        lambda x: torch_linear_logp_ent(x.hidden, x.weight, x.targets),
        "matmul + log_softmax; gather; -(p * logp).sum()",
    )
    add(
        "torch.compile",
        "linear",
        "peer",
        lambda x: (compiled(torch_linear_logp)(x.hidden, x.weight, x.targets), None),
        "the eager function compiled (compile time not timed)",
        unavailable=compile_why,
        predict=False,
    )
    add(
        "torch.compile",
        "linear+ent",
        "peer",
        lambda x: compiled(torch_linear_logp_ent)(x.hidden, x.weight, x.targets),
        "the eager function compiled (compile time not timed)",
        unavailable=compile_why,
        predict=False,
    )
    return impls


def _pair(out) -> Outputs:
    if isinstance(out, Tensor):
        return out, None
    return out[0], out[1]


def call_fwd(impl: Impl, x: Inputs) -> list[Tensor]:
    with torch.no_grad():
        return [o.reshape(-1) if impl.kind != "floor" else o for o in impl.fn(x) if o is not None]


def default_upstream(x: Inputs, outs: list[Tensor]) -> list[Tensor]:
    return [g.to(o.dtype) for g, o in zip((x.w, x.c), outs)]


def call_train(impl: Impl, x: Inputs) -> tuple[list[Tensor], tuple[Tensor, ...]]:
    with torch.enable_grad():
        outs = [o.reshape(-1) if impl.kind != "floor" else o for o in impl.fn(x) if o is not None]
        upstream = (impl.upstream or default_upstream)(x, outs)
        grads = torch.autograd.grad(outs, x.leaves, upstream)
    return [o.detach() for o in outs], grads


# --------------------------------------------------------------------------------------
# Checks


@dataclass
class Reference64:
    """float64 outputs and gradients on the check rows S (computed on the same inputs)."""

    rows: Tensor
    logp: Tensor
    ent: Tensor
    grads: dict[bool, list[Tensor]]  # with_entropy -> per-row grad (logits or hidden) [, dW]
    scale: Tensor  # M = max|z| + log V on the rows


def reference64(x: Inputs, rows: Tensor, max_abs: Tensor) -> Reference64:
    y = x.targets[rows]
    grads = {}
    for with_ent in (False, True):
        if x.logits is not None:
            leaves = [x.logits.detach()[rows].double().requires_grad_()]
            z = leaves[0]
        else:
            leaves = [
                x.hidden.detach()[rows].double().requires_grad_(),
                x.weight.detach().double().requires_grad_(),
            ]
            z = leaves[0] @ leaves[1].T
        logp, ent = torch_logp_ent(z, y)
        outs = [logp, ent] if with_ent else [logp]
        up = [x.w[rows].double(), x.c[rows].double()][: len(outs)]
        grads[with_ent] = list(torch.autograd.grad(outs, leaves, up))
        del z, leaves
    vocab = x.logits.shape[1] if x.logits is not None else x.weight.shape[0]
    return Reference64(
        rows, logp.detach(), ent.detach(), grads, max_abs[rows].double() + math.log(vocab)
    )


@dataclass
class Expected:
    """What a peer's outputs are compared with: ours, or the float64 rows if no row of
    ours passed at this shape."""

    source: str
    rows: Tensor | None  # rows covered by logp / ent (None: all)
    logp: Tensor
    ent: Tensor | None
    grads: list[Tensor | None] | None = None
    grad_rows: Tensor | None = None  # rows of the per-row gradient held (None: all)


def _rel(got: Tensor, want: Tensor) -> float:
    # (an in-place backward hands back the logits leaf itself, which requires grad)
    got, want = got.detach().double(), want.detach().double()
    den = float(want.norm())
    err = float((got - want).norm())
    if not math.isfinite(err):
        return math.inf
    return err / den if den > 0 else err


def _tolerance(kind: str, task: str, dtype, scale: Tensor, max_abs: Tensor) -> Tensor:
    """Per-row tolerance of a log-prob or entropy, M = max|z| + log V of the row.

    ours: fp32 arithmetic on the exact input values, 1e-4 (1 + M). A peer may compute in
    the input dtype: a bf16 log_softmax rounds its result (u |logp|, |logp| <= 2M), verl's
    and TRL's entropies round p, p*z, the sum, logsumexp and the difference (<= 5u M): 8u M
    covers both. Fused-linear peers may also round each logit to the input dtype (u |z|),
    which moves the entropy by up to u max|z| M: the bound grows by that factor.
    """
    base = OURS_FWD_TOL * (1 + scale)
    if kind == "ours":
        return base * (10 if task.startswith("linear") else 1)  # tf32 products on GPU
    u = UNIT_ROUNDOFF.get(dtype, 2.0**-24)
    tol = base + PEER_FWD_K * u * scale
    if task.startswith("linear"):
        tol = tol * (1 + max_abs)
    return tol


def grad_rtol(kind: str, dtype) -> float:
    """Relative-norm tolerance of a gradient: ours rounds it once to the input dtype
    (u; the fused-linear sums in fp32, tf32 products on GPU: 1e-3); a bf16 peer's
    log_softmax backward also carries its rounded log-probs (measured ~0.5%): 16u."""
    u = UNIT_ROUNDOFF.get(dtype, 2.0**-24)
    return max(4 * u, 1e-3) if kind == "ours" else max(16 * u, 1e-3)


def check_outputs(outs, want_logp, want_ent, rows, tol_logp, tol_ent) -> tuple[bool, float, float]:
    """(ok, max abs error, max error / tolerance) of logp (and entropy) on ``rows``."""
    ok, worst, ratio = True, 0.0, 0.0
    pairs = [(outs[0], want_logp, tol_logp)]
    if want_ent is not None:
        if len(outs) < 2:
            return False, math.inf, math.inf
        pairs.append((outs[1], want_ent, tol_ent))
    for got, want, tol in pairs:
        got = got.detach()[rows] if rows is not None else got.detach()
        err = (got.double() - want.double()).abs().nan_to_num(nan=math.inf)
        ok &= bool((err <= tol).all())
        worst = max(worst, float(err.max()))
        ratio = max(ratio, float((err / tol).max()))
    return ok, worst, ratio


# --------------------------------------------------------------------------------------
# Results


@dataclass
class Result:
    impl: Impl
    mode: str
    status: str = "ok"  # ok | skipped | error | oom | failed_verification
    stats: H.Stats | None = None
    warmup: int = 0
    estimated: bool = False
    peak_bytes: int | None = None
    note: str = ""
    verified: bool | None = None
    verified_against: str | None = None
    max_abs_err: float | None = None
    err_over_tol: float | None = None
    grad_rel_err: float | None = None
    first_call_s: float | None = None

    @property
    def median_s(self) -> float | None:
        return self.stats.median_s if self.stats else None


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------
# The run


@dataclass
class ShapeState:
    shape: Shape
    sets: list[Inputs]
    max_abs: Tensor  # (N,) max|z| per row of set 0
    check_rows: Tensor
    grad_rows: Tensor
    ref: Reference64
    expected: dict[str, Expected] = field(default_factory=dict)
    dtype: torch.dtype = torch.bfloat16


def evenly(n: int, k: int, device) -> Tensor:
    return torch.unique(torch.linspace(0, n - 1, min(n, k), device=device).round().long())


def verify(res: Result, st: ShapeState, outs, grads, x0: Inputs, args, device) -> None:
    """Sets res.verified (and the error fields); ours also records what peers must match."""
    impl, task = res.impl, res.impl.task
    with_ent = task.endswith("+ent")
    ref = st.ref
    if impl.kind == "ours":
        rows = ref.rows
        scale = ref.scale
        tol = _tolerance("ours", task, st.dtype, scale, st.max_abs[rows])
        ok, err, ratio = check_outputs(
            outs, ref.logp, ref.ent if with_ent else None, rows, tol, tol
        )
        grel = None
        if grads is not None:
            per_row = grads[0][rows]
            grel = _rel(per_row, ref.grads[with_ent][0])
            if st.shape.linear:
                # dW sums over every row: compare the weight gradient of a call on the check
                # rows alone with float64 on those rows.
                _, sub = call_train(impl, x0.rows(rows))
                grel = max(grel, _rel(sub[1], ref.grads[with_ent][1]))
            ok &= grel <= grad_rtol("ours", st.dtype)
        res.verified_against = f"float64 on {rows.numel()} rows"
        res.verified, res.max_abs_err, res.err_over_tol, res.grad_rel_err = ok, err, ratio, grel
        if ok:
            exp = st.expected.get(task)
            if grads is None and exp is None:
                st.expected[task] = Expected(
                    impl.name, None, outs[0].detach(), outs[1].detach() if with_ent else None
                )
            elif grads is not None and exp is not None and exp.source == impl.name:
                if st.shape.linear:
                    exp.grads = [g.detach() for g in grads]
                else:
                    exp.grads, exp.grad_rows = [grads[0][st.grad_rows].detach()], st.grad_rows
        return

    exp = st.expected.get(task)
    if exp is None:  # no row of ours passed: the float64 rows
        exp = Expected(
            "float64",
            ref.rows,
            ref.logp,
            ref.ent if with_ent else None,
            [ref.grads[with_ent][0], None],
            ref.rows,
        )
    rows = exp.rows
    scale = st.max_abs.double() + math.log(st.shape.v)
    if rows is not None:
        scale = scale[rows]
    mabs = st.max_abs if rows is None else st.max_abs[rows]
    tol = _tolerance("peer", task, st.dtype, scale, mabs.double())
    ok, err, ratio = check_outputs(outs, exp.logp, exp.ent, rows, tol, tol)
    grel = None
    if grads is not None:
        if exp.grads is None:
            exp = replace(exp, grads=[ref.grads[with_ent][0], None], grad_rows=ref.rows)
        rels = []
        for got, want, per_row in zip(grads, exp.grads, (True, False)):
            if want is None:
                continue
            if per_row and exp.grad_rows is not None:
                got = got[exp.grad_rows]
            rels.append(_rel(got, want))
        grel = max(rels) if rels else None
        ok &= grel is None or grel <= grad_rtol("peer", st.dtype)
    res.verified_against = exp.source
    res.verified, res.max_abs_err, res.err_over_tol, res.grad_rel_err = ok, err, ratio, grel


def run_mode(res: Result, st: ShapeState, xs: list[Inputs], args, device, flush) -> None:
    impl, mode = res.impl, res.mode
    x0 = xs[0]
    if mode == FWD:

        def run(x):
            return call_fwd(impl, x)
    else:

        def run(x):
            return call_train(impl, x)

    cap = args.max_call_s * impl.call_cap
    if impl.predict and impl.kind != "floor":
        pred = predict_s(run, x0, device)
        if pred > cap:
            res.status = "skipped"
            res.note = (
                f"predicted {pred:.0f} s per call > {cap:g} s (best of 2 calls on a "
                f"{PREFIX_ROWS}-row prefix, scaled by N)"
            )
            return
    # Check call: the first full-size call, also the compile / autotune warm-up.
    t0 = time.perf_counter()
    out = run(x0)
    H.sync(device)
    res.first_call_s = time.perf_counter() - t0
    if impl.kind == "floor":
        res.verified = None
    else:
        outs, grads = (out, None) if mode == FWD else out
        verify(res, st, outs, grads, x0, args, device)
        del outs, grads  # (N x V gradients must not stay alive through the timing)
        if not res.verified:
            res.status = "failed_verification"
            grel = "-" if res.grad_rel_err is None else f"{res.grad_rel_err:.3g}"
            res.note = (
                f"differs from {res.verified_against} (max abs err {res.max_abs_err:.3g}, "
                f"{res.err_over_tol:.3g} x tol; grad rel err {grel}): NOT TIMED"
            )
            return
    del out
    _free(device)
    if res.first_call_s > cap and impl.predict:
        res.status = "skipped"
        res.note = f"one call took {res.first_call_s:.1f} s > {cap:g} s"
        return
    # Memory on a warm call, which also predicts the cost of the timed ones.
    res.peak_bytes, wall, out = peak_memory(lambda: run(x0), device)
    del out
    _free(device)
    if wall >= args.budget:
        # One call fills the budget: time_calls would make exactly one more; the warm
        # memory call (synchronised, host clock) is that sample already.
        times, warm = [wall], 0
    else:
        warm = max(0, H.warmup_calls(wall, args.warmup) - 1)
        times = H.time_calls(
            run, xs, device, warmup=warm, reps=args.max_reps, flush=flush, budget_s=args.budget
        )
    res.stats, res.warmup = H.summarize(times), warm + 1
    res.estimated = len(times) < args.min_reps
    if res.estimated:
        res.note = f"ESTIMATE from {len(times)} rep(s)"  # "~" before the time in the table


def predict_s(run: Callable[[Inputs], Any], x: Inputs, device) -> float:
    """Seconds of one full-size call, from the best of two calls on a row prefix (every
    cost here grows linearly with N at fixed V and H)."""
    rows = min(x.n, PREFIX_ROWS)
    prefix = x.rows(slice(0, rows))
    best = math.inf
    for _ in range(2):
        best = min(best, H.time_once(lambda: run(prefix), device))
    return best * x.n / rows


def prepare_shape(shape: Shape, args, device) -> ShapeState:
    """Input sets, per-row scales and the float64 reference of one shape."""
    dtype = args.dtype
    elt = torch.finfo(dtype).bits // 8
    set_bytes = shape.n * (shape.h if shape.linear else shape.v) * elt
    # Rotate input sets only while they are small: one set past 256 MiB is far beyond any
    # cache already, and a second would only cost memory.
    nsets = 1 if set_bytes >= 256 << 20 else args.sets
    sets = [make_inputs(shape, dtype, device, args.seed)]
    for i in range(1, nsets):  # the fused-linear sets share one LM head, as in training
        sets.append(make_inputs(shape, dtype, device, args.seed + 1000 * i, sets[0].weight))
    max_abs = row_max_abs(sets[0])
    check_rows = evenly(shape.n, CHECK_ROWS, device)
    return ShapeState(
        shape,
        sets,
        max_abs,
        check_rows,
        evenly(shape.n, GRAD_ROWS, device),
        reference64(sets[0], check_rows, max_abs),
        dtype=dtype,
    )


def run_shape(shape: Shape, args, device, peers, backends, flush, compile_why) -> list[Result]:
    """One shape's rows; a per-call shape runs on ``--per-call-threads`` threads, its rows
    timed over ``--per-call-reps`` calls, a bare torch op first."""
    pc = args.per_call_spec if (shape.n, shape.v, shape.h) in PER_CALL else None
    if pc:
        args = argparse.Namespace(**vars(args))
        args.max_reps, args.budget, args.warmup = pc.reps, pc.budget_s, pc.warmup + 1
        if args.compile:
            torch._dynamo.reset()  # compiled as a first shape, the next ones as without it
    try:
        with H.num_threads(pc.threads if pc else None):
            return _run_shape(shape, args, device, peers, backends, flush, compile_why, pc)
    finally:
        if pc and args.compile:
            torch._dynamo.reset()


def _run_shape(shape, args, device, peers, backends, flush, compile_why, pc) -> list[Result]:
    t_start = time.perf_counter()
    st = prepare_shape(shape, args, device)
    sets = st.sets
    tasks = [t for t in shape.tasks if t in args.tasks]
    print(
        f"\n== {shape.label} ({'N x V x H, fused linear' if shape.linear else 'N x V logits'}, "
        f"{args.dtype}): {len(sets)} input set(s), made and referenced in "
        f"{time.perf_counter() - t_start:.1f} s",
        flush=True,
    )
    impls = build_impls(shape, backends, peers, tasks, device, compile_why)
    results: list[Result] = []
    if pc and tasks:
        bare = H.bare_op_stats(sets[0].w, sets[0].c, device, pc)["torch.add"]
        print(
            f"  per call: {pc.describe()}; bare torch.add on two (N,) fp32 tensors "
            f"{H.fmt_time(bare.median_s)} (IQR {H.fmt_time(bare.iqr_s)})",
            flush=True,
        )
        impl = Impl(
            "bare torch.add (reference)",
            tasks[0],
            "bare",
            None,
            "one torch op on two (N,) fp32 tensors: the fixed cost of any op call "
            "(the same time in both mode columns)",
        )
        results += [Result(impl, mode, stats=bare) for mode in MODES]
    for impl in impls:
        rs = [Result(impl, mode) for mode in MODES]
        results += rs
        if impl.unavailable:
            for r in rs:
                r.status, r.note = "skipped", impl.unavailable
            print(f"  skip {impl.task:10s} {impl.name}: {impl.unavailable}", flush=True)
            continue
        xs = [sets[0].private_copy()] if impl.inplace else sets
        for r in rs:
            t0 = time.perf_counter()
            try:
                run_mode(r, st, xs, args, device, flush)
            except Exception as e:  # noqa: BLE001 - one broken row must not lose the others
                r.status = "oom" if _is_oom(e) else "error"
                r.note = f"{type(e).__name__}: {e}"[:300]
            _free(device)
            tag = {"ok": "", "failed_verification": "FAILED "}.get(r.status, r.status.upper() + " ")
            why = f" - {r.note}" if r.status != "ok" else ""
            print(
                f"  {tag}{impl.task:10s} {r.mode:7s} {impl.name}: {H.fmt_time(r.median_s)}"
                f" ({time.perf_counter() - t0:.1f} s){why}",
                flush=True,
            )
            if r.status == "failed_verification" and r.mode == FWD:
                rs[1].status, rs[1].note = "skipped", "forward failed verification"
                break
    del sets, st
    _free(device)
    print(f"   ({time.perf_counter() - t_start:.1f} s for this shape)", flush=True)
    return results


# --------------------------------------------------------------------------------------
# Rows, tables, files


def floors(shape: Shape, results: list[Result], copy_bps, matmul_flops, dtype) -> dict:
    """Per mode: (floor seconds, what it counts, the rate it uses)."""
    if not shape.linear:
        nbytes = shape.n * shape.v * torch.finfo(dtype).bits // 8
        return {
            FWD: (nbytes / copy_bps, f"{nbytes / 1e9:.3g} GB read", copy_bps),
            TRAIN: (3 * nbytes / copy_bps, f"{3 * nbytes / 1e9:.3g} GB moved", copy_bps),
        }
    flop = 2 * shape.n * shape.v * shape.h
    mm = next((r for r in results if r.impl.kind == "floor" and r.mode == FWD and r.median_s), None)
    rate = flop / mm.median_s if mm else matmul_flops
    return {
        FWD: (flop / rate, f"{flop / 1e12:.3g} TFLOP", rate),
        TRAIN: (3 * flop / rate, f"{3 * flop / 1e12:.3g} TFLOP", rate),
    }


def to_rows(
    shape: Shape, results: list[Result], env, copy_bps, matmul_flops, dtype, pc=None
) -> list[dict]:
    fl = floors(shape, results, copy_bps, matmul_flops, dtype)
    rows = []
    for r in results:
        floor_s, basis, rate = fl[r.mode]
        peers = [
            p
            for p in results
            if p.impl.kind == "peer"
            and p.impl.task == r.impl.task
            and p.mode == r.mode
            and p.median_s
        ]
        best = min(peers, key=lambda p: p.median_s) if peers else None
        med = r.median_s
        bare = next((b.median_s for b in results if b.impl.kind == "bare"), None)
        rows.append(
            {
                **env,
                "shape": shape.label,
                "family": "linear" if shape.linear else "logits",
                "n": shape.n,
                "v": shape.v,
                "h": shape.h,
                "dtype": str(dtype).replace("torch.", ""),
                "tokens": shape.n,
                "task": r.impl.task,
                "mode": r.mode,
                "panel": f"{r.impl.task} {r.mode}",
                "impl": r.impl.name,
                "kind": r.impl.kind,
                "status": r.status,
                "median_s": med,
                "iqr_s": r.stats.iqr_s if r.stats else None,
                "q1_s": r.stats.q1_s if r.stats else None,
                "q3_s": r.stats.q3_s if r.stats else None,
                "reps": r.stats.reps if r.stats else 0,
                "warmup": r.warmup,
                "estimated": r.estimated,
                "first_call_s": r.first_call_s,
                "tokens_per_s": shape.n / med if med else None,
                "floor_s": floor_s,
                "floor_basis": basis,
                "floor_kind": "flops" if shape.linear else "bytes",
                "copy_GB_s": copy_bps / 1e9,
                "matmul_TFLOP_s": rate / 1e12 if shape.linear else None,
                "fraction_of_floor": floor_s / med if med else None,
                "peak_mem_bytes": r.peak_bytes,
                "best_peer": best.impl.name if best else None,
                "speedup_vs_best_peer": best.median_s / med if (best and med) else None,
                "per_call": vars(pc) if pc else None,
                "bare_op_s": bare,
                "over_bare_op": med / bare if (bare and med) else None,
                "verified": r.verified,
                "verified_against": r.verified_against,
                "max_abs_err": r.max_abs_err,
                "err_over_tol": r.err_over_tol,
                "grad_rel_err": r.grad_rel_err,
                "note": (r.note + "; " if r.note else "") + r.impl.note,
                "impl_note": r.impl.note,
            }
        )
    return rows


def _mem(b: int | None) -> str:
    if b is None:
        return "-"
    if b >= 1 << 30:
        return f"{b / 2**30:.2f} GiB"
    if b >= 1 << 20:
        return f"{b / 2**20:.0f} MiB"
    return f"{b / 2**10:.0f} KiB"


def table(rows: list[dict]) -> str:
    """One line per impl: forward and forward + backward side by side, each with its
    fraction of the floor and its peak memory."""
    headers = ["impl", "task"]
    for m in ("fwd", "f+b"):
        headers += [m, "IQR", "%floor", "mem", "x peer"]
    headers += ["check", "note"]
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["task"], r["impl"]), {})[r["mode"]] = r
    out = []
    for (task, impl), modes in by_key.items():
        line = [impl, task]
        checks, notes = [], []
        for mode in MODES:
            r = modes.get(mode)
            if r is None:
                line += ["-"] * 5
                continue
            med = r["median_s"]
            iqr = f"{100 * r['iqr_s'] / med:.0f}%" if med and r["iqr_s"] is not None else "-"
            status = r["status"]
            shown = ("~" if r["estimated"] else "") + H.fmt_time(med)
            line += [
                shown if med else {"ok": "-"}.get(status, status.split("_")[0].upper()),
                iqr,
                H.fmt_num(r["fraction_of_floor"] and 100 * r["fraction_of_floor"], ".3g", "%"),
                _mem(r["peak_mem_bytes"]),
                H.fmt_num(r["speedup_vs_best_peer"], ".3g", "x") if r["kind"] == "ours" else "",
            ]
            checks.append({True: "ok", False: "FAIL", None: "-"}[r["verified"]])
            if status != "ok":
                notes.append(r["note"].split("; ")[0])
        check = checks[0] if len(set(checks)) == 1 else "/".join(checks)
        first = next(iter(modes.values()))
        # a row's trouble first; else what a peer's row is (ours are named by their impl)
        note = "; ".join(dict.fromkeys(notes)) or (
            first["impl_note"] if first["kind"] != "ours" else ""
        )
        line += [check, note[:100]]
        out.append(line)
    return H.format_table(headers, out)


def shape_header(rows: list[dict], env: dict) -> str:
    r0 = rows[0]
    fwd = next(r for r in rows if r["mode"] == FWD)
    trn = next(r for r in rows if r["mode"] == TRAIN)
    if r0["floor_kind"] == "bytes":
        basis = f"copy {r0['copy_GB_s']:.1f} GB/s (read + write)"
    else:
        basis = f"the bare matmul's {fwd['matmul_TFLOP_s'] * 1e3:.4g} GFLOP/s at this shape"
    pc = r0.get("per_call")
    return (
        f"\n{r0['shape']} {r0['dtype']} on {env['device_name']}: floor fwd "
        f"{H.fmt_time(fwd['floor_s'])} ({fwd['floor_basis']}), fwd+bwd "
        f"{H.fmt_time(trn['floor_s'])} ({trn['floor_basis']}) at {basis}"
        + (
            f"\n  PER CALL: {H.PerCall(**pc).describe()}; bare torch.add "
            f"{H.fmt_time(r0['bare_op_s'])}"
            if pc
            else ""
        )
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few reps (smoke test)")
    p.add_argument("--out", type=Path, default=HERE / "out", help="folder for JSON/PNG/TXT")
    p.add_argument(
        "--shapes",
        help="override shapes: NxV (from logits) and NxVxH (fused linear), comma-separated",
    )
    p.add_argument("--tasks", default=",".join(TASKS), help=f"subset of {','.join(TASKS)}")
    p.add_argument(
        "--backends",
        help="our backends, comma-separated (default: all available on the device; "
        "triton on CPU only if asked: the interpreter's time means nothing)",
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile rows (default: on, off with --quick)",
    )
    p.add_argument("--sets", type=int, default=2, help="input sets to rotate among when small")
    p.add_argument("--budget", type=float, help="seconds of timed calls per row and mode")
    p.add_argument("--max-reps", type=int, help="most timed calls per row and mode")
    p.add_argument("--min-reps", type=int, default=3, help="fewer reps are flagged ESTIMATE")
    p.add_argument("--warmup", type=int, default=2, help="warm calls before timing (fast calls)")
    p.add_argument("--max-call-s", type=float, help="skip a peer slower than this per call")
    p.add_argument(
        "--flush",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="overwrite a buffer larger than the last-level cache before each timed call "
        "(default: on for CUDA, off for CPU)",
    )
    H.add_per_call_args(p, PER_CALL_SHAPES, 300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    gpu = device.type == "cuda"
    args.dtype = getattr(torch, args.dtype)
    args.tasks = [t for t in args.tasks.split(",") if t]
    bad_tasks = set(args.tasks) - set(TASKS)
    if bad_tasks:
        p.error(f"unknown task(s) {sorted(bad_tasks)}; choose from {TASKS}")
    args.budget = args.budget or (0.05 if args.quick else (0.5 if gpu else 1.5))
    args.max_reps = args.max_reps or (3 if args.quick else (30 if gpu else 20))
    args.max_call_s = args.max_call_s or (30.0 if gpu else 4.0)
    args.per_call_spec = H.PerCall(
        threads=args.per_call_threads,
        reps=args.per_call_reps or (10 if args.quick else 300),
        warmup=2 if args.quick else 10,
        budget_s=0.3 if args.quick else 5.0,
    )
    if args.compile is None:
        args.compile = not args.quick
    default_shapes = QUICK_SHAPES if args.quick else GPU_SHAPES if gpu else CPU_SHAPES
    shapes = [Shape(*s) for s in default_shapes]
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    shapes = [s for s in shapes if set(s.tasks) & set(args.tasks)]

    backends = {
        "logits": vk.available_backends("token_logprobs", device),
        "linear": vk.available_backends("linear_logprobs", device),
    }
    if args.backends:
        asked = args.backends.split(",")
        backends = {fam: [b for b in asked if b in bs] for fam, bs in backends.items()}
    elif not gpu:
        for bs in backends.values():
            if "triton" in bs:
                bs.remove("triton")  # the interpreter's time means nothing
    compile_why = None if args.compile else "torch.compile rows off (--no-compile / --quick)"

    env = H.environment(device)
    peers = load_peers(device)
    # Freeze what the imports made (transformers, verl, trl: ~0.4 s per gc.collect here),
    # so that the collections between calls cost microseconds.
    gc.collect()
    gc.freeze()
    print(
        f"bench_logprobs on {env['device_name']} | torch {env['torch']} | triton {env['triton']}"
        f" | ours: logits {','.join(backends['logits']) or 'none'}, linear "
        f"{','.join(backends['linear']) or 'none'} | peers: "
        + ", ".join(f"{k} {v}" for k, v in peers.versions.items()),
        flush=True,
    )
    for k, why in peers.why.items():
        print(f"  peer {k} unavailable: {why}", flush=True)
    mem_method = (
        "torch.cuda.max_memory_allocated - memory_allocated before the call"
        if gpu
        else (cpu_peak_supported() or "VmHWM - VmRSS before the call (malloc_trim, clear_refs)")
    )
    print(f"  peak memory: {mem_method}; outputs and gradients counted, inputs not", flush=True)

    copy_bps = H.measure_copy_bandwidth(device, (64 if args.quick else 1024 if gpu else 256) << 20)
    # A square matmul for context (the linear floors use the bare matmul at each shape).
    # (budgeted: a CPU without bf16 units does ~1 GFLOP/s, 2048^3 would take minutes)
    k = 1024 if args.quick else (8192 if gpu else 2048 if any(s.linear for s in shapes) else 512)
    square = [torch.randn(k, k, device=device).to(args.dtype)]
    mm_s = min(H.time_calls(lambda a: a @ a, square, device, warmup=1, reps=5, budget_s=2.0))
    matmul_flops = 2 * k**3 / mm_s
    del square
    print(
        f"  copy bandwidth (read + write) {copy_bps / 1e9:.1f} GB/s; {args.dtype} matmul "
        f"{k}^3 {matmul_flops / 1e12:.3g} TFLOP/s",
        flush=True,
    )
    if args.flush is None:
        args.flush = gpu
    flush = H.CacheFlusher(device, (16 << 20) if args.quick else None) if args.flush else None
    print(
        f"  timing: median of up to {args.max_reps} calls or {args.budget:g} s per row and mode; "
        f"cache flush between calls {'on' if flush else 'off'}; per-call shapes "
        f"{PER_CALL_SHAPES}: {args.per_call_spec.describe()}",
        flush=True,
    )
    meta = {
        **env,
        "script": "benchmarks/bench_logprobs.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "dtype": args.dtype,
        "copy_GB_s": copy_bps / 1e9,
        "matmul_TFLOP_s": matmul_flops / 1e12,
        "peer_versions": peers.versions,
        "peer_unavailable": peers.why,
        "backends": backends,
        "memory_method": mem_method,
        "threads": torch.get_num_threads(),
        "params": {
            "sigma": SIGMA,
            "boost_max": BOOST_MAX,
            "p_preferred": P_PREFERRED,
            "trl_seqlen": TRL_SEQLEN,
            "check_rows": CHECK_ROWS,
            "grad_rows": GRAD_ROWS,
            "budget_s": args.budget,
            "max_reps": args.max_reps,
            "max_call_s": args.max_call_s,
            "flush": bool(args.flush),
            "compile": args.compile,
            "per_call_shapes": PER_CALL_SHAPES,
            "per_call": vars(args.per_call_spec),
        },
    }

    t_all = time.perf_counter()
    rows: list[dict] = []
    text = []
    for shape in shapes:
        res = run_shape(shape, args, device, peers, backends, flush, compile_why)
        pc = args.per_call_spec if (shape.n, shape.v, shape.h) in PER_CALL else None
        shape_rows = to_rows(shape, res, env, copy_bps, matmul_flops, args.dtype, pc)
        rows += shape_rows
        block = shape_header(shape_rows, env) + "\n" + table(shape_rows)
        text.append(block)
        print(block, flush=True)
    meta["wall_s"] = time.perf_counter() - t_all

    tag = device.type
    args.out.mkdir(parents=True, exist_ok=True)
    H.write_json(args.out / f"logprobs_{tag}.json", meta, rows)
    (args.out / f"logprobs_{tag}.txt").write_text("\n".join(text) + "\n")
    plotted = []
    # One figure per family (the harness puts every shape of its rows on each panel's
    # axis), a panel per task and mode.
    for family, what in (("logits", "N x V logits"), ("linear", "N x V x H LM head")):
        path = args.out / f"logprobs_{tag}_{family}.png"
        ok_rows = [
            r
            for r in rows
            if r["status"] == "ok" and r["family"] == family and r["kind"] != "bare"
        ]
        if ok_rows and H.plot_throughput(
            ok_rows,
            path,
            title=f"token log-probs from {what}: rows/s (x axis: {what}), {env['device_name']}, "
            f"torch {env['torch']}, {env['timestamp']}",
            panel_key="panel",
        ):
            plotted.append(str(path))
    print(
        f"\nwrote {args.out / f'logprobs_{tag}.json'}"
        + (", " + ", ".join(plotted) if plotted else " (no matplotlib: no plot)")
        + f" in {meta['wall_s']:.0f} s",
        flush=True,
    )
    bad = [
        r for r in rows if r["kind"] == "ours" and r["status"] in ("failed_verification", "error")
    ]
    for r in bad:
        print(
            f"!! {r['shape']} {r['task']} {r['mode']} {r['impl']}: {r['status']}: {r['note']}",
            file=sys.stderr,
        )
    gc.unfreeze()  # let the frozen objects be finalised at exit (nanobind checks for leaks)
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
