"""PPO / VAPO losses side by side: our fused ops vs the peers' loss functions, in one run.

Every row is timed forward + backward (the loss, then ``torch.autograd.grad`` to its
inputs) on the same inputs, after its loss and gradients are checked, and its peak memory
is measured on one warm call. Four tasks:

* ``policy``       - token-level PPO policy loss on padded (B, T) fp32 log-probs with a
  bool mask (ragged lengths, one masked gap per row), Clip-Higher (0.2 / 0.28), dual clip
  3.0, token-mean: ours (``vapo_kernels.policy_loss``, every backend) vs verl 0.9.1's
  ``compute_policy_loss_vanilla`` (eager and under ``torch.compile``; it reads an
  ActorConfig, here :class:`VerlActorConfig`, built as verl reads it) and OpenRLHF's
  ``PolicyLoss`` module. Liger's GRPO loss takes hidden states and the LM head, not
  log-probs: its row is in ``hidden``.
* ``policy+value`` - the same plus the clipped value loss (clip 0.5, vf_coef 0.5): ours
  (``vapo_kernels.vapo_loss`` with values, one pass) vs verl's policy loss +
  ``compute_value_loss`` (eager, compiled) and OpenRLHF's ``PolicyLoss`` + ``ValueLoss``.
* ``logits``       - one pass from bf16 logits (B, T, V) to the policy loss and the
  logits' gradient, per-sequence (GRPO-style) advantages: ours
  (``policy_loss_from_logits``, also with ``inplace_backward=True``, and
  ``token_logprobs`` + ``policy_loss`` in sequence) vs PyTorch
  ``log_softmax(logits.float()).gather()`` + verl's policy loss.
* ``hidden``       - from bf16 hidden states (B, T, H) and the LM head (V, H): ours
  (``policy_loss_from_hidden``; and matmul + our in-place from-logits loss) vs matmul +
  the PyTorch / verl path above and Liger's ``LigerFusedLinearGRPOLoss`` (when installed;
  it has no dual clip, so its row runs and is checked with dual clip off).

Checked before timed (a row that fails is reported FAILED, never timed, and the script
exits 1): every row, ours and peers, against our ``reference`` backend evaluated in
float64 on the same inputs (log-probs from logits / hidden states in float64 on CPU,
float32 on CUDA). Token tasks: the loss within rtol 1e-4 + atol 1e-5 and every gradient
element (times the valid-token count, so O(1)) within rtol 1e-4 + atol 1e-5, masked slots
included (they must be 0). Logits / hidden tasks, whose gradients are bf16: the loss as
above and each gradient within 1e-2 relative L2 error. Rows that materialise bf16 logits
(the matmul paths, Liger) are checked against the reference on the same bf16-rounded
logits, within 3e-2 (their matmul may round a target logit differently from the
reference's); our fused from-hidden rows against fp32 logits. The inputs keep every
token's log-ratio (and value step, and value-loss tie) 1e-4 (from logits / hidden: 1e-3)
away from the points where the gradient jumps, where two correct float32 answers may
differ (``off_kinks``).

Floors, measured in this run on this device: token tasks move 17 B/token (logp, old logp,
advantages fp32 + a 1-byte mask in; the logp gradient out), 33 B/token with values (old
values, returns and the value gradient too); from logits 2 V elt + 17 B/token (the logits
read once, their gradient written once: a one-pass kernel re-reads each row from cache);
each at the copy bandwidth (read + write)
measured here. From hidden: 6 N V H FLOP (forward matmul and the two gradient matmuls),
i.e. three times the bare bf16 matmul timed here at the same shape. ``%floor`` is the
floor's time over the row's median; ``x <peer>`` columns are the peer's median over ours.

Peak memory on one warm call, inputs not counted: CUDA, ``torch.cuda.max_memory_allocated``
over what was allocated before the call; CPU, measured by this script in a second process
after the timing (same arguments and seeds, one warm-up and one measured call per timed
row): the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) over the
resident set before the call, with glibc's mmap threshold pinned at 1 MiB there and
``malloc_trim`` before the call, so that every large buffer is mapped fresh and counted
(pinning would slow every large allocation, hence not in the timing process).

Results: printed tables, ``<out>/loss_<device>.json`` (rows), ``loss_<device>.txt``,
``loss_<device>.png`` (token tasks, tokens/s) and ``loss_<device>_logits.png`` (logits /
hidden). Liger's row was written against its published API and has not run here (not
installed on the CPU machine this was written on).

    python benchmarks/bench_loss.py                  # CPU, default shapes (a few minutes)
    python benchmarks/bench_loss.py --quick          # smoke run, tiny shapes, no compile
    python benchmarks/bench_loss.py --device cuda    # on a GPU
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import importlib.util
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import _harness as H  # noqa: E402 - after the sys.path insert

import vapo_kernels as vk  # noqa: E402

CLIP_LOW, CLIP_HIGH, DUAL_CLIP = 0.2, 0.28, 3.0
VALUE_CLIP, VF_COEF = 0.5, 0.5
POLICY_KW = {"clip_low": CLIP_LOW, "clip_high": CLIP_HIGH, "dual_clip": DUAL_CLIP}
TOKEN_BYTES = {"policy": 17, "policy+value": 33}
# log-ratios where the policy gradient jumps: the Clip-Higher bounds and the dual clip
LOG_RATIO_KINKS = (math.log(1 - CLIP_LOW), math.log(1 + CLIP_HIGH), math.log(DUAL_CLIP))
TOKEN_MARGIN = 1e-4  # fp32 log-ratios of exact inputs err by ~1e-6 at most
LOGIT_MARGIN = 1e-3  # log-probs recomputed from bf16 logits by each implementation

LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5  # on gradient x valid tokens (O(1) numbers)
BF16_GRAD_REL = 1e-2  # relative L2 error of a bf16 gradient
# Rows that round the logits to bf16 themselves (a matmul, Liger) can round a target
# logit differently from the reference's matmul (by up to ~2^-8 |z|), so now and then a
# token crosses a clip bound: ~1 / sqrt(valid tokens) of relative error each.
BF16_LOGITS_GRAD_REL = 3e-2

TOKEN_TASKS = ("policy", "policy+value")
LOGIT_TASKS = ("logits", "hidden")
TASKS = TOKEN_TASKS + LOGIT_TASKS

# Token tasks: (B, T); from logits: (N, V); from hidden: (N, V, H).
# Per-call token shapes: almost no work per call, so a row's time is the call's fixed cost
# (Python, validation, autograd). Their rows run on --per-call-threads threads (1), each
# the median of hundreds of forward + backward calls, beside a bare torch op and a bare
# autograd round trip timed in the same run.
PER_CALL_TOKEN_SHAPES = [(8, 128)]
CPU_TOKEN_SHAPES = [*PER_CALL_TOKEN_SHAPES, (64, 4096), (256, 4096), (1024, 4096)]
GPU_TOKEN_SHAPES = [(256, 4096), (512, 4096), (1024, 4096), (2048, 4096)]  # 1M .. 8M
QUICK_TOKEN_SHAPES = [*PER_CALL_TOKEN_SHAPES, (8, 1024)]
CPU_LOGIT_SHAPES = [(1024, 32768), (2048, 32768)]
GPU_LOGIT_SHAPES = [(16384, 151936), (32768, 151936), (65536, 151936)]
QUICK_LOGIT_SHAPES = [(128, 2048)]
CPU_HIDDEN_SHAPES = [(1024, 32768, 256)]
GPU_HIDDEN_SHAPES = [(16384, 151936, 4096), (32768, 151936, 4096), (65536, 151936, 4096)]
QUICK_HIDDEN_SHAPES = [(64, 1024, 16)]
LOGIT_SEQLEN = 1024  # logits / hidden rows are B sequences of up to this many tokens

# Logits: z = randn + a boost in [0, BOOST_MAX) on one preferred token per row, which is
# the target with probability P_PREFERRED: rows from flat to peaked, as an LLM's are.
BOOST_MAX, P_PREFERRED = 12.0, 0.7


# --------------------------------------------------------------------------------------
# Inputs


def off_kinks(x: Tensor, kinks, margin: float) -> Tensor:
    """``x`` with every element within ``margin`` of a kink moved to kink + 2 margin.

    At a kink (a clip bound of the ratio, the dual-clip bound, a value-clip bound, the
    tie of the two value losses) the loss is continuous but its gradient jumps, and two
    correct float32 implementations may land on either side (seen: 1 token in 4M made
    every row differ from the float64 reference by 0.3 x the mean gradient). Moving a few
    inputs by ~1e-4 keeps the check elementwise and strict; it changes no cost.
    """
    for k in kinks:
        x = torch.where((x - k).abs() < margin, torch.full_like(x, k + 2 * margin), x)
    return x


@dataclass
class TokenInputs:
    logp: Tensor  # (B, T) fp32 leaf
    old_logp: Tensor
    adv: Tensor
    mask: Tensor  # bool
    maskf: Tensor  # the same as float32, as the peers take it
    values: Tensor  # (B, T) fp32 leaf
    old_values: Tensor
    returns: Tensor

    @property
    def valid(self) -> int:
        return int(self.mask.sum())


def ragged_mask(batch: int, seqlen: int, g: torch.Generator, min_frac: float) -> Tensor:
    """Lengths in [min_frac T, T] (row 0 full), right-padded, one masked gap of up to T/32
    tokens inside each row (tool output in a multi-turn response)."""
    lengths = torch.randint(max(1, int(seqlen * min_frac)), seqlen + 1, (batch,), generator=g)
    lengths[0] = seqlen
    pos = torch.arange(seqlen)
    mask = pos[None, :] < lengths[:, None]
    start = (torch.rand(batch, generator=g) * lengths).long()
    stop = start + torch.randint(1, max(2, seqlen // 32), (batch,), generator=g)
    mask &= ~((pos[None, :] >= start[:, None]) & (pos[None, :] < stop[:, None]))
    mask[:, 0] = True  # no empty row
    return mask


def make_token_inputs(batch: int, seqlen: int, device: torch.device, seed: int) -> TokenInputs:
    """Random data (never zeros; masked slots hold the same kind of numbers, not padding
    zeros): old log-probs -Exp(1); log-ratios 0.25 randn with 1% of tokens anywhere in
    [-3, 3] (so both clips and the dual clip fire); advantages, values and returns randn,
    values within ~0.5 of the old values (the value clip fires too). No token lies within
    1e-4 of a point where the gradient jumps (see :func:`off_kinks`)."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, seqlen)
    mask = ragged_mask(batch, seqlen, g, 0.25)
    old = -torch.empty(shape).exponential_(generator=g)
    d = 0.25 * torch.randn(shape, generator=g)
    jump = torch.rand(shape, generator=g) < 0.01
    d = torch.where(jump, 6 * torch.rand(shape, generator=g) - 3, d)
    adv = torch.randn(shape, generator=g)
    old_v = torch.randn(shape, generator=g)
    values = old_v + 0.5 * torch.randn(shape, generator=g)
    returns = old_v + torch.randn(shape, generator=g)
    d = off_kinks(d, LOG_RATIO_KINKS, TOKEN_MARGIN)
    step = off_kinks(values - old_v, (-VALUE_CLIP, VALUE_CLIP), TOKEN_MARGIN)
    values = old_v + step
    # clipped value: max((v - R)^2, (v_clip - R)^2) switches where R is midway
    mid = (values + old_v + step.clamp(-VALUE_CLIP, VALUE_CLIP)) / 2
    returns = torch.where(
        step.abs() > VALUE_CLIP, mid + off_kinks(returns - mid, (0.0,), TOKEN_MARGIN), returns
    )

    def dev(t):
        return t.to(device)

    return TokenInputs(
        logp=dev(old + d).requires_grad_(),
        old_logp=dev(old),
        adv=dev(adv),
        mask=dev(mask),
        maskf=dev(mask.float()),
        values=dev(values).requires_grad_(),
        old_values=dev(old_v),
        returns=dev(returns),
    )


@dataclass
class LogitInputs:
    targets: Tensor  # (B, T) int64
    old_logp: Tensor  # (B, T) fp32
    adv: Tensor  # (B, T) fp32, constant along each sequence
    adv_seq: Tensor  # (B,) the same per sequence (Liger's form)
    mask: Tensor  # (B, T) bool
    maskf: Tensor
    logits: Tensor | None = None  # (B, T, V) leaf
    hidden: Tensor | None = None  # (B, T, H) leaf
    weight: Tensor | None = None  # (V, H) leaf, shared by the sets

    @property
    def valid(self) -> int:
        return int(self.mask.sum())


def _rows_per_chunk(v: int, elt: int, nbytes: int) -> int:
    return max(1, nbytes // (v * elt))


def make_logit_inputs(n, v, h, dtype, device, seed, weight=None) -> LogitInputs:
    """Logits (h None) or hidden states + LM head, drawn on the device in row chunks; old
    log-probs are the current ones (fp32 from the bf16 logits) + 0.25 randn."""
    batch = max(1, n // LOGIT_SEQLEN)
    seqlen = n // batch
    if batch * seqlen != n:
        raise ValueError(f"N = {n} is not a multiple of {LOGIT_SEQLEN}")
    gc_ = torch.Generator().manual_seed(seed)
    mask = ragged_mask(batch, seqlen, gc_, 0.5).to(device)
    adv_seq = torch.randn(batch, generator=gc_).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    preferred = torch.randint(0, v, (n,), generator=g, device=device)
    boost = torch.rand(n, generator=g, device=device) * BOOST_MAX
    uniform = torch.randint(0, v, (n,), generator=g, device=device)
    targets = torch.where(
        torch.rand(n, generator=g, device=device) < P_PREFERRED, preferred, uniform
    )
    logp = torch.empty(n, device=device)
    logp_exact = None  # hidden: log-probs from fp32 logits (the fused rows' problem)
    chunk = _rows_per_chunk(v, 4, 64 << 20)
    logits = hidden = None
    if h is None:
        logits = torch.empty(n, v, dtype=dtype, device=device)
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            z = torch.randn(r1 - r0, v, generator=g, device=device)
            z[torch.arange(r1 - r0, device=device), preferred[r0:r1]] += boost[r0:r1]
            logits[r0:r1] = z
            zf = logits[r0:r1].float()
            logp[r0:r1] = zf.gather(1, targets[r0:r1, None]).squeeze(1) - zf.logsumexp(-1)
        logits = logits.view(batch, seqlen, v).requires_grad_()
    else:
        if weight is None:  # rows of norm ~1: z_v = h . W_v has the noise of h
            weight = torch.empty(v, h, dtype=dtype, device=device)
            wchunk = _rows_per_chunk(h, 4, 64 << 20)
            for r0 in range(0, v, wchunk):
                r1 = min(v, r0 + wchunk)
                weight[r0:r1] = torch.randn(r1 - r0, h, generator=g, device=device) / math.sqrt(h)
            weight.requires_grad_()
        w = weight.detach()
        wp = w[preferred].float()  # h = noise + b W_p / |W_p|^2 adds b to that logit
        hid = torch.randn(n, h, generator=g, device=device)
        hid += boost[:, None] * wp / (wp * wp).sum(-1, keepdim=True)
        hid = hid.to(dtype)
        logp_exact = torch.empty_like(logp)
        wf = w.float()
        was_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            y = targets[r0:r1, None]
            for out, zf in (
                (logp, (hid[r0:r1] @ w.T).float()),
                (logp_exact, hid[r0:r1].float() @ wf.T),
            ):
                out[r0:r1] = zf.gather(1, y).squeeze(1) - zf.logsumexp(-1)
        torch.backends.cuda.matmul.allow_tf32 = was_tf32
        del wf
        hidden = hid.view(batch, seqlen, h).requires_grad_()
    old = (logp + 0.25 * torch.randn(n, generator=g, device=device)).clamp(max=0)
    # Keep every variant's log-ratio LOGIT_MARGIN off the kinks (see off_kinks): lowering
    # old raises the log-ratio of both variants, so repeat until none is near.
    for _ in range(100):
        near = torch.zeros_like(old, dtype=torch.bool)
        for lp in (logp, logp_exact):
            if lp is not None:
                for k in LOG_RATIO_KINKS:
                    near |= (lp - old - k).abs() < LOGIT_MARGIN
        if not bool(near.any()):
            break
        old = torch.where(near, old - 3 * LOGIT_MARGIN, old)
    return LogitInputs(
        targets=targets.view(batch, seqlen),
        old_logp=old.view(batch, seqlen),
        adv=adv_seq[:, None].expand(batch, seqlen).contiguous(),
        adv_seq=adv_seq,
        mask=mask,
        maskf=mask.float(),
        logits=logits,
        hidden=hidden,
        weight=weight,
    )


# --------------------------------------------------------------------------------------
# Peers: verl and OpenRLHF functions compiled from their installed source files


@dataclass(frozen=True)
class VerlActorConfig:
    """What ``compute_policy_loss_vanilla`` reads from verl's ``ActorConfig``, read the same
    way: attributes ``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``, ``.get
    ("clip_ratio_c", 3.0)`` and ``global_batch_info`` (a dict of agg_loss keywords; empty:
    local token-mean, dp_size 1). verl's own class needs a whole trainer config."""

    clip_ratio: float = CLIP_LOW
    clip_ratio_low: float = CLIP_LOW
    clip_ratio_high: float = CLIP_HIGH
    clip_ratio_c: float = DUAL_CLIP
    global_batch_info: dict = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:  # verl's BaseConfig.get
        return getattr(self, key, default)


class _NotThisConfig:
    """Stands for verl's AlgoConfig (the function asserts its config is not one)."""


@dataclass
class Peers:
    verl_pg: Callable | None = None
    verl_vf: Callable | None = None
    verl_source: str = ""
    openrlhf_policy: Any = None  # the PolicyLoss class
    openrlhf_value: Any = None  # the ValueLoss class
    openrlhf_source: str = ""
    liger_grpo: Any = None  # LigerFusedLinearGRPOLoss class
    why: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)


def load_verl() -> tuple[Callable, Callable, str]:
    """verl's ``compute_policy_loss_vanilla`` and ``compute_value_loss`` (+ ``agg_loss``).

    Compiled unchanged from the installed ``core_algos.py`` (``import verl`` pulls in ray,
    tensordict and transformers); if that fails, the module is imported.
    """
    try:
        functional = H.load_from_source(
            "verl",
            "utils/torch_functional.py",
            ["masked_sum", "masked_mean", "clip_by_value"],
            {"torch": torch},
        )
        from types import SimpleNamespace

        verl_f = SimpleNamespace(
            **{k: functional[k] for k in ("masked_sum", "masked_mean", "clip_by_value")}
        )
        ns = {
            "torch": torch,
            "verl_F": verl_f,
            "Optional": Optional,
            "Any": Any,
            "ActorConfig": VerlActorConfig,
            "AlgoConfig": _NotThisConfig,
        }
        H.load_from_source(
            "verl",
            "trainer/ppo/core_algos.py",
            ["agg_loss", "compute_policy_loss_vanilla", "compute_value_loss"],
            ns,
        )
        return ns["compute_policy_loss_vanilla"], ns["compute_value_loss"], "source"
    except ImportError:
        mod = importlib.import_module("verl.trainer.ppo.core_algos")
        return mod.compute_policy_loss_vanilla, mod.compute_value_loss, "import"


def load_openrlhf() -> tuple[Any, Any, str]:
    """OpenRLHF's ``PolicyLoss`` and ``ValueLoss`` modules.

    Compiled unchanged from the installed ``openrlhf/models/loss.py`` with its
    ``aggregate_loss`` and ``masked_mean`` (importing ``openrlhf.models`` pulls in
    deepspeed, peft, flash-attn); if that fails, imported through the GPU-stack shim of
    ``tests/compat/_openrlhf.py``.
    """
    try:
        utils = H.load_from_source(
            "openrlhf", "models/utils.py", ["masked_mean"], {"torch": torch, "Optional": Optional}
        )
        ns = {
            "torch": torch,
            "nn": torch.nn,
            "F": F,
            "dist": torch.distributed,
            "Optional": Optional,
            "Tuple": Tuple,
            "masked_mean": utils["masked_mean"],
        }
        H.load_from_source(
            "openrlhf", "models/loss.py", ["aggregate_loss", "PolicyLoss", "ValueLoss"], ns
        )
        return ns["PolicyLoss"], ns["ValueLoss"], "source"
    except ImportError:
        shim_path = ROOT / "tests" / "compat" / "_openrlhf.py"
        spec = importlib.util.spec_from_file_location("_bench_openrlhf_shim", shim_path)
        shim = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(shim)
        with shim.openrlhf_without_gpu_stack(["openrlhf", "openrlhf.models"]):
            mod = importlib.import_module("openrlhf.models.loss")
        return mod.PolicyLoss, mod.ValueLoss, "import"


def load_peers() -> Peers:
    peers = Peers()
    for dist in ("verl", "openrlhf", "liger-kernel"):
        peers.versions[dist] = H.package_version(dist)
    try:
        peers.verl_pg, peers.verl_vf, peers.verl_source = load_verl()
    except Exception as e:  # noqa: BLE001 - a peer that cannot load just loses its rows
        peers.why["verl"] = f"verl not loadable: {type(e).__name__}: {e}"
    try:
        peers.openrlhf_policy, peers.openrlhf_value, peers.openrlhf_source = load_openrlhf()
    except Exception as e:  # noqa: BLE001
        peers.why["openrlhf"] = f"openrlhf not loadable: {type(e).__name__}: {e}"
    try:
        peers.liger_grpo = importlib.import_module(
            "liger_kernel.chunked_loss"
        ).LigerFusedLinearGRPOLoss
    except Exception as e:  # noqa: BLE001
        peers.why["liger"] = f"liger-kernel not importable here ({type(e).__name__}: {e})"
    return peers


# --------------------------------------------------------------------------------------
# Memory


def _pin_malloc_mmap_threshold() -> bool:
    """glibc raises its mmap threshold when a mapped block is freed, after which freed
    buffers stay resident and a later call reuses them unseen; a fixed threshold (1 MiB)
    keeps every large buffer mapped on allocation and returned on free."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def cpu_peak_why_not() -> str | None:
    try:
        _reset_hwm()
        _status_bytes("VmHWM:")
        return None
    except (OSError, KeyError) as e:
        return f"cannot reset the resident high-water mark ({type(e).__name__}: {e})"


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[int | None, float]:
    """(peak bytes above what was in use before the call, wall seconds)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        del out
        return torch.cuda.max_memory_allocated(device) - base, wall
    if cpu_peak_why_not() is not None:
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
        del out
        return None, wall
    _malloc_trim()  # free heap memory back to the OS: a buffer reusing it is counted
    base = _status_bytes("VmRSS:")
    _reset_hwm()
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    peak = max(0, _status_bytes("VmHWM:") - base)
    del out
    return peak, wall


def _free(device: torch.device) -> None:
    """CUDA: return freed blocks (a later row's peak must not depend on an earlier one's
    cache). CPU tensors go with their last reference (gc.collect costs ~0.15 s here)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)


# --------------------------------------------------------------------------------------
# What runs


@dataclass
class Impl:
    name: str
    task: str
    kind: str  # "ours" | "peer"
    loss: Callable[[Any], Tensor]  # inputs -> scalar loss, differentiable to leaves(inputs)
    leaves: Callable[[Any], list[Tensor]]
    note: str = ""
    unavailable: str | None = None
    expect: str = "exact"  # which reference it is checked against (see Checker)
    inplace: bool = False  # overwrites the logits it is given: runs on restored copies
    compiled: bool = False


def run_impl(impl: Impl, x) -> tuple[Tensor, tuple[Tensor, ...]]:
    with torch.enable_grad():
        loss = impl.loss(x)
        grads = torch.autograd.grad(loss, impl.leaves(x))
    return loss.detach(), grads


_COMPILED: dict[str, Callable] = {}


def compiled(name: str, fn: Callable) -> Callable:
    """One torch.compile wrapper per function for the whole run: later shapes take torch's
    automatic dynamic-shape recompile, as a training loop would."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn)
    return _COMPILED[name]


def torch_logp(z: Tensor, y: Tensor) -> Tensor:
    """PyTorch log-probs of the targets in fp32 (``logits.float()``: a bf16 log_softmax
    would be off by ~4e-3 relative, as in the anchors, and fail an fp32 check)."""
    return torch.log_softmax(z.float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def build_token_impls(task, backends, peers: Peers, compile_why) -> list[Impl]:
    impls = []
    why = peers.why
    cfg = VerlActorConfig()
    if task == "policy":
        leaves = lambda x: [x.logp]  # noqa: E731
        for b in backends:
            impls.append(
                Impl(
                    f"vapo.policy_loss[{b}]",
                    task,
                    "ours",
                    lambda x, b=b: vk.policy_loss(
                        x.logp, x.old_logp, x.adv, x.mask, **POLICY_KW, backend=b
                    )[0],
                    leaves,
                    "one pass: loss, metrics and the gradient",
                )
            )

        def verl(x, fn=None):
            fn = fn or peers.verl_pg
            return fn(x.old_logp, x.logp, x.adv, x.maskf, "token-mean", cfg)[0]

        impls.append(
            Impl(
                "verl",
                task,
                "peer",
                verl,
                leaves,
                f"verl {peers.versions.get('verl')} compute_policy_loss_vanilla "
                "(its 3 metric .item() syncs included)",
                unavailable=why.get("verl"),
            )
        )
        impls.append(
            Impl(
                "verl+torch.compile",
                task,
                "peer",
                lambda x: verl(x, compiled("verl_pg", peers.verl_pg)),
                leaves,
                "the same under torch.compile (graph breaks at .item(); compile not timed)",
                unavailable=why.get("verl") or compile_why,
                compiled=True,
            )
        )
        if peers.openrlhf_policy is not None:
            pl = peers.openrlhf_policy(
                clip_eps_low=CLIP_LOW, clip_eps_high=CLIP_HIGH, dual_clip=DUAL_CLIP
            )
        impls.append(
            Impl(
                "openrlhf",
                task,
                "peer",
                lambda x: pl(x.logp, x.old_logp, x.adv, action_mask=x.maskf)[0],
                leaves,
                f"openrlhf {peers.versions.get('openrlhf')} PolicyLoss (token_level_loss)",
                unavailable=why.get("openrlhf"),
            )
        )
        impls.append(
            Impl(
                "liger.fused_linear_grpo",
                task,
                "peer",
                lambda x: None,
                leaves,
                unavailable=why.get("liger")
                or "takes hidden states + LM head, not log-probs: timed in the 'hidden' task",
            )
        )
        return impls

    leaves = lambda x: [x.logp, x.values]  # noqa: E731
    for b in backends:
        impls.append(
            Impl(
                f"vapo.vapo_loss[{b}]",
                task,
                "ours",
                lambda x, b=b: vk.vapo_loss(
                    x.logp,
                    x.old_logp,
                    x.adv,
                    x.mask,
                    values=x.values,
                    old_values=x.old_values,
                    returns=x.returns,
                    value_clip=VALUE_CLIP,
                    vf_coef=VF_COEF,
                    lm_coef=0.0,
                    **POLICY_KW,
                    backend=b,
                )[0],
                leaves,
                "policy + value in one pass",
            )
        )

    def verl_pv(old, logp, adv, maskf, values, returns, old_values):
        pg, _ = peers.verl_pg(old, logp, adv, maskf, "token-mean", cfg)
        vf, _ = peers.verl_vf(values, returns, old_values, maskf, VALUE_CLIP, "token-mean")
        return pg + VF_COEF * vf

    def verl_args(x):
        return (x.old_logp, x.logp, x.adv, x.maskf, x.values, x.returns, x.old_values)

    impls.append(
        Impl(
            "verl",
            task,
            "peer",
            lambda x: verl_pv(*verl_args(x)),
            leaves,
            "compute_policy_loss_vanilla + compute_value_loss",
            unavailable=why.get("verl"),
        )
    )
    impls.append(
        Impl(
            "verl+torch.compile",
            task,
            "peer",
            lambda x: compiled("verl_pv", verl_pv)(*verl_args(x)),
            leaves,
            "the same two calls under one torch.compile",
            unavailable=why.get("verl") or compile_why,
            compiled=True,
        )
    )
    if peers.openrlhf_policy is not None:
        pl = peers.openrlhf_policy(
            clip_eps_low=CLIP_LOW, clip_eps_high=CLIP_HIGH, dual_clip=DUAL_CLIP
        )
        vl = peers.openrlhf_value(clip_eps=VALUE_CLIP)

    def openrlhf_pv(x):
        pg = pl(x.logp, x.old_logp, x.adv, action_mask=x.maskf)[0]
        return pg + VF_COEF * vl(x.values, x.old_values, x.returns, action_mask=x.maskf)

    impls.append(
        Impl(
            "openrlhf",
            task,
            "peer",
            openrlhf_pv,
            leaves,
            "PolicyLoss + ValueLoss (its value clip: old + clamp(v - old), same number)",
            unavailable=why.get("openrlhf"),
        )
    )
    return impls


def build_logit_impls(task, backends, peers: Peers, logits_backends=()) -> list[Impl]:
    impls = []
    why = peers.why
    cfg = VerlActorConfig()

    def verl_on(logp, x):
        return peers.verl_pg(x.old_logp, logp, x.adv, x.maskf, "token-mean", cfg)[0]

    if task == "logits":
        leaves = lambda x: [x.logits]  # noqa: E731
        for b in backends:
            impls.append(
                Impl(
                    f"vapo.policy_loss_from_logits[{b}]",
                    task,
                    "ours",
                    lambda x, b=b: vk.policy_loss_from_logits(
                        x.logits, x.targets, x.old_logp, x.adv, x.mask, **POLICY_KW, backend=b
                    )[0],
                    leaves,
                    "gradient of the logits written in the forward",
                )
            )
            impls.append(
                Impl(
                    f"vapo.policy_loss_from_logits(inplace)[{b}]",
                    task,
                    "ours",
                    lambda x, b=b: vk.policy_loss_from_logits(
                        x.logits.view_as(x.logits),  # not a leaf: may be overwritten
                        x.targets,
                        x.old_logp,
                        x.adv,
                        x.mask,
                        **POLICY_KW,
                        inplace_backward=True,
                        backend=b,
                    )[0],
                    leaves,
                    "gradient written over the logits (restored, untimed, between calls)",
                    inplace=True,
                )
            )
            impls.append(
                Impl(
                    f"vapo.token_logprobs+policy_loss[{b}]",
                    task,
                    "ours",
                    lambda x, b=b: vk.policy_loss(
                        vk.token_logprobs(x.logits, x.targets, mask=x.mask, backend=b),
                        x.old_logp,
                        x.adv,
                        x.mask,
                        **POLICY_KW,
                        backend=b,
                    )[0],
                    leaves,
                    "two ops in sequence, autograd between them",
                )
            )
        impls.append(
            Impl(
                "torch log_softmax.gather + verl",
                task,
                "peer",
                lambda x: verl_on(torch_logp(x.logits, x.targets), x),
                leaves,
                "log_softmax(logits.float()).gather(); compute_policy_loss_vanilla",
                unavailable=why.get("verl"),
                expect="exact",
            )
        )
        return impls

    leaves = lambda x: [x.hidden, x.weight]  # noqa: E731
    for b in backends:
        impls.append(
            Impl(
                f"vapo.policy_loss_from_hidden[{b}]",
                task,
                "ours",
                lambda x, b=b: vk.policy_loss_from_hidden(
                    x.hidden, x.weight, x.targets, x.old_logp, x.adv, x.mask, **POLICY_KW, backend=b
                )[0],
                leaves,
                "fused LM head: no N x V tensor, forward or backward",
            )
        )
    for b in logits_backends:
        impls.append(
            Impl(
                f"matmul + vapo.policy_loss_from_logits(inplace)[{b}]",
                task,
                "ours",
                lambda x, b=b: vk.policy_loss_from_logits(
                    x.hidden @ x.weight.T,
                    x.targets,
                    x.old_logp,
                    x.adv,
                    x.mask,
                    **POLICY_KW,
                    inplace_backward=True,
                    backend=b,
                )[0],
                leaves,
                "bf16 logits from torch's matmul, their gradient in place",
                expect="bf16_logits",
            )
        )
    impls.append(
        Impl(
            "matmul + torch log_softmax.gather + verl",
            task,
            "peer",
            lambda x: verl_on(torch_logp(x.hidden @ x.weight.T, x.targets), x),
            leaves,
            "bf16 logits; log_softmax(.float()).gather(); compute_policy_loss_vanilla",
            unavailable=why.get("verl"),
            expect="bf16_logits",
        )
    )
    liger_why = why.get("liger")
    liger_loss = None
    if peers.liger_grpo is not None:
        try:
            liger_loss = peers.liger_grpo(
                beta=0.0,
                use_ref_model=False,
                epsilon_low=CLIP_LOW,
                epsilon_high=CLIP_HIGH,
                loss_type="dapo",
                temperature=1.0,
            )
        except Exception as e:  # noqa: BLE001 - its constructor changes between versions
            liger_why = f"LigerFusedLinearGRPOLoss(...) failed: {type(e).__name__}: {e}"

    def liger(x):
        out = liger_loss(
            x.hidden, x.weight, x.targets, x.maskf, x.adv_seq, old_per_token_logps=x.old_logp
        )
        return out[0] if isinstance(out, (tuple, list)) else out

    impls.append(
        Impl(
            "liger.fused_linear_grpo",
            task,
            "peer",
            liger,
            leaves,
            f"liger-kernel {peers.versions.get('liger-kernel')}, loss_type='dapo' (token-mean), "
            "beta 0; NO dual clip (checked against ours without it)",
            unavailable=liger_why,
            expect="bf16_logits,no_dual",
        )
    )
    return impls


# --------------------------------------------------------------------------------------
# Checks: our reference backend in float64 (float32 on CUDA for the N x V parts)


def ref_policy64(logp: Tensor, x, dual: float | None) -> tuple[float, Tensor]:
    """(loss, d loss / d logp) of our reference policy loss in float64."""
    lp = logp.detach().double().requires_grad_()
    kw = dict(POLICY_KW, dual_clip=dual)
    with torch.enable_grad():
        loss, _ = vk.policy_loss(
            lp, x.old_logp.double(), x.adv.double(), x.mask, **kw, backend="reference"
        )
        (g,) = torch.autograd.grad(loss, [lp])
    return float(loss.detach()), g


@dataclass
class Check:
    ok: bool
    loss_err: float
    grad_err: float
    against: str


def _loss_ok(loss: float, want: float) -> bool:
    return math.isfinite(loss) and abs(loss - want) <= LOSS_ATOL + LOSS_RTOL * abs(want)


class TokenChecker:
    """Token tasks: the float64 reference loss and full gradients of input set 0."""

    against = "vapo reference backend, float64"

    def __init__(self, x: TokenInputs, task: str):
        d = lambda t: t.detach().double()  # noqa: E731
        lp = d(x.logp).requires_grad_()
        with torch.enable_grad():
            if task == "policy":
                loss, _ = vk.policy_loss(
                    lp, d(x.old_logp), d(x.adv), x.mask, **POLICY_KW, backend="reference"
                )
                grads = torch.autograd.grad(loss, [lp])
            else:
                v = d(x.values).requires_grad_()
                loss, _ = vk.vapo_loss(
                    lp,
                    d(x.old_logp),
                    d(x.adv),
                    x.mask,
                    values=v,
                    old_values=d(x.old_values),
                    returns=d(x.returns),
                    value_clip=VALUE_CLIP,
                    vf_coef=VF_COEF,
                    lm_coef=0.0,
                    **POLICY_KW,
                    backend="reference",
                )
                grads = torch.autograd.grad(loss, [lp, v])
        self.loss = float(loss.detach())
        self.grads = [g.detach() for g in grads]
        self.scale = float(x.valid)

    def __call__(self, impl: Impl, loss: Tensor, grads) -> Check:
        ok = _loss_ok(float(loss), self.loss) and len(grads) == len(self.grads)
        worst = 0.0
        for g, want in zip(grads, self.grads):
            got = g.double() * self.scale
            want = want * self.scale
            if not bool(torch.isfinite(got).all()):
                ok, worst = False, math.inf
                continue
            err = (got - want).abs()
            ok &= bool((err <= GRAD_ATOL + GRAD_RTOL * want.abs()).all())
            worst = max(worst, float(err.max()))
        return Check(ok, abs(float(loss) - self.loss), worst, self.against)


class LogitChecker:
    """Logits / hidden tasks: the reference on input set 0, computed in row chunks, for
    each variant of the problem an impl asks for (exact or bf16 logits, dual clip or not)."""

    def __init__(self, x: LogitInputs, device: torch.device):
        self.x = x
        self.cd = torch.float64 if device.type == "cpu" else torch.float32
        self.chunk_bytes = (256 << 20) if device.type == "cpu" else (1 << 30)
        self.cache: dict[str, Any] = {}
        self.hidden = x.hidden is not None

    def _z_rows(self, r0: int, r1: int, bf16_logits: bool) -> Tensor:
        x = self.x
        if not self.hidden:
            return x.logits.detach().flatten(0, 1)[r0:r1].to(self.cd)
        h = x.hidden.detach().flatten(0, 1)[r0:r1]
        w = x.weight.detach()
        if bf16_logits:
            return (h @ w.T).to(self.cd)
        return h.to(self.cd) @ w.to(self.cd).T

    def _chunks(self, n: int, v: int):
        step = _rows_per_chunk(v, torch.finfo(self.cd).bits // 8, self.chunk_bytes)
        return [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]

    def _reference(self, expect: str):
        if expect in self.cache:
            return self.cache[expect]
        x = self.x
        bf16_logits = "bf16_logits" in expect
        dual = None if "no_dual" in expect else DUAL_CLIP
        y = x.targets.flatten()
        n = y.numel()
        v = x.weight.shape[0] if self.hidden else x.logits.shape[-1]
        chunks = self._chunks(n, v)
        lse = torch.empty(n, dtype=self.cd, device=y.device)
        logp = torch.empty_like(lse)
        was_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torch.no_grad():
                for r0, r1 in chunks:
                    z = self._z_rows(r0, r1, bf16_logits)
                    lse[r0:r1] = z.logsumexp(-1)
                    logp[r0:r1] = z.gather(1, y[r0:r1, None]).squeeze(1) - lse[r0:r1]
            loss, g = ref_policy64(logp.view(x.targets.shape), x, dual)
            g = g.flatten().to(self.cd)
            ref = {"loss": loss, "g": g, "lse": lse, "chunks": chunks}
            if self.hidden:
                w = x.weight.detach().to(self.cd)
                hid = x.hidden.detach().flatten(0, 1)
                gh = torch.empty(n, w.shape[1], dtype=self.cd, device=y.device)
                gw = torch.zeros_like(w)
                with torch.no_grad():
                    for r0, r1 in chunks:
                        dz = self._dz(r0, r1, ref, bf16_logits)
                        gh[r0:r1] = dz @ w
                        gw.addmm_(dz.T, hid[r0:r1].to(self.cd))
                ref["grads"] = [gh, gw]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = was_tf32
        self.cache[expect] = ref
        return ref

    def _dz(self, r0, r1, ref, bf16_logits) -> Tensor:
        """d loss / d logits on rows [r0, r1): g (onehot - softmax)."""
        y = self.x.targets.flatten()[r0:r1]
        g = ref["g"][r0:r1]
        z = self._z_rows(r0, r1, bf16_logits)
        dz = torch.exp(z.sub_(ref["lse"][r0:r1, None])).mul_(-g[:, None])
        dz[torch.arange(r1 - r0, device=dz.device), y] += g
        return dz

    def __call__(self, impl: Impl, loss: Tensor, grads) -> Check:
        ref = self._reference(impl.expect)
        against = (
            "vapo reference backend, "
            + str(self.cd).replace("torch.", "")
            + (" on bf16-rounded logits" if "bf16_logits" in impl.expect else "")
            + (", dual clip off" if "no_dual" in impl.expect else "")
        )
        ok = _loss_ok(float(loss), ref["loss"])
        loss_err = abs(float(loss) - ref["loss"])
        if self.hidden:
            errs = []
            for got, want in zip(grads, ref["grads"]):
                got = got.reshape(want.shape).to(self.cd)
                errs.append(float((got - want).norm() / want.norm().clamp(min=1e-300)))
            worst = max(errs) if len(errs) == 2 else math.inf
        else:
            num = den = 0.0
            flat = grads[0].reshape(-1, grads[0].shape[-1])
            with torch.no_grad():
                for r0, r1 in ref["chunks"]:
                    want = self._dz(r0, r1, ref, False)
                    num += float((flat[r0:r1].to(self.cd) - want).square().sum())
                    den += float(want.square().sum())
            worst = math.sqrt(num / den) if den > 0 else math.inf
        tol = BF16_LOGITS_GRAD_REL if "bf16_logits" in impl.expect else BF16_GRAD_REL
        ok &= math.isfinite(worst) and worst <= tol
        return Check(ok, loss_err, worst, against)


# --------------------------------------------------------------------------------------
# The run


def run_row(m: H.Measurement, impl: Impl, xs, checker, args, device, flush, restore) -> None:
    """Check, then time (peak memory on a warm call first where measured in-process);
    with ``--memory-only``, one warm-up call and the peak-memory call only."""

    def call(x):
        return run_impl(impl, x)

    if restore:
        restore()
    if args.memory_only:
        out = call(xs[0])
        del out
        _free(device)
        if restore:
            restore()
        m.extra["peak_bytes"], _ = peak_memory(lambda: call(xs[0]), device)
        return
    t0 = time.perf_counter()
    loss, grads = call(xs[0])
    H.sync(device)
    first = time.perf_counter() - t0
    chk = checker(impl, loss, grads)
    del loss, grads
    m.extra.update(
        verified=chk.ok,
        verified_against=chk.against,
        loss_err=chk.loss_err,
        grad_err=chk.grad_err,
        first_call_s=first,
    )
    if not chk.ok:
        m.status = "failed_verification"
        m.note = (
            f"differs from {chk.against} (loss err {chk.loss_err:.3g}, grad err "
            f"{chk.grad_err:.3g}): NOT TIMED"
        )
        return
    _free(device)
    if first > args.max_call_s and not impl.compiled:
        m.status = "skipped"
        m.note = f"one call took {first:.1f} s > --max-call-s {args.max_call_s:g}"
        return
    if restore:
        restore()
    if args.measure_peak:
        m.extra["peak_bytes"], wall = peak_memory(lambda: call(xs[0]), device)
    else:
        wall = H.time_once(lambda: call(xs[0]), device)
    _free(device)
    pc = getattr(args, "per_call", None)
    warm = pc.warmup if pc else max(0, H.warmup_calls(wall) - 1)

    def before_each():
        if restore:
            restore()
        if flush:
            flush()

    times = H.time_calls(
        call,
        xs,
        device,
        warmup=warm,
        reps=args.max_reps,
        flush=before_each if (restore or flush) else None,
        budget_s=args.budget,
    )
    m.stats, m.warmup = H.summarize(times), warm + 1
    m.estimated = len(times) < args.min_reps
    if m.estimated:
        m.note = f"ESTIMATE from {len(times)} rep(s); " + m.note


def row_key(task: str, shape: str, impl: str) -> str:
    return f"{task}|{shape}|{impl}"


def run_impls(impls, sets, checker, shape, batch, seqlen, tokens, args, device, flush):
    results = []
    for impl in impls:
        m = H.Measurement(
            impl.name, impl.task, impl.kind, shape, batch, seqlen, tokens, note=impl.note
        )
        m.extra["valid_tokens"] = sets[0].valid
        results.append(m)
        if args.memory_only and row_key(impl.task, shape, impl.name) not in args.plan:
            m.status = "skipped"
            continue
        if impl.unavailable:
            m.status, m.note = "skipped", impl.unavailable
            print(f"  skip  {impl.task:12s} {impl.name}: {impl.unavailable}", flush=True)
            continue
        xs, restore = sets, None
        if impl.inplace:
            xs = [replace(s, logits=s.logits.detach().clone().requires_grad_()) for s in sets]

            def restore(xs=xs):
                with torch.no_grad():
                    for dst, src in zip(xs, sets):
                        dst.logits.detach().copy_(src.logits.detach())

        t0 = time.perf_counter()
        try:
            run_row(m, impl, xs, checker, args, device, flush, restore)
        except Exception as e:  # noqa: BLE001 - one broken row must not lose the others
            m.status = "oom" if _is_oom(e) else "error"
            m.note = f"{type(e).__name__}: {e}"[:300]
        del xs, restore
        _free(device)
        tag = {"ok": "", "failed_verification": "FAILED "}.get(m.status, m.status.upper() + " ")
        why = f" - {m.note}" if m.status != "ok" else ""
        what = _mem(m.extra.get("peak_bytes")) if args.memory_only else H.fmt_time(m.median_s)
        print(
            f"  {tag}{impl.task:12s} {impl.name}: {what} ({time.perf_counter() - t0:.1f} s){why}",
            flush=True,
        )
    return results


def run_token_shape(batch, seqlen, args, device, peers, backends, flush, compile_why):
    """One token shape; a per-call shape runs on ``--per-call-threads`` threads, its rows
    timed over ``--per-call-reps`` calls, a bare torch op and autograd round trip first."""
    pc = None
    if (batch, seqlen) in PER_CALL_TOKEN_SHAPES and not args.memory_only:
        pc = args.per_call_spec
        args = argparse.Namespace(**vars(args))
        args.per_call, args.max_reps, args.budget = pc, pc.reps, pc.budget_s
    if pc and args.compile:
        torch._dynamo.reset()  # compiled as a first shape, and the next shapes as without it
    try:
        with H.num_threads(pc.threads if pc else None):
            return _run_token_shape(
                batch, seqlen, args, device, peers, backends, flush, compile_why, pc
            )
    finally:
        if pc and args.compile:
            torch._dynamo.reset()


def _run_token_shape(batch, seqlen, args, device, peers, backends, flush, compile_why, pc):
    shape = f"{batch}x{seqlen}"
    tokens = batch * seqlen
    t0 = time.perf_counter()
    sets = [
        make_token_inputs(batch, seqlen, device, args.seed + 1000 * i) for i in range(args.sets)
    ]
    print(
        f"\n== {shape}: {tokens:,} tokens ({sets[0].valid:,} valid in set 0), {args.sets} "
        f"input sets, made in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    results = []
    for task in TOKEN_TASKS:
        if task not in args.tasks:
            continue
        checker = None if args.memory_only else TokenChecker(sets[0], task)
        impls = build_token_impls(task, backends["token"], peers, compile_why)
        if pc:
            x = sets[0]
            bare = H.bare_op_stats(x.old_logp, x.adv, device, pc, leaf=x.logp)
            print(f"  per call ({task}): {pc.describe()}; {H.fmt_bare(bare)}", flush=True)
            for name, st in bare.items():
                m = H.Measurement(
                    f"bare {name} (reference)", task, "bare", shape, batch, seqlen, tokens
                )
                m.stats = st
                m.note = "on old_logp, adv (and logp): the fixed cost of any such call"
                m.extra.update(valid_tokens=x.valid, per_call=vars(pc))
                results.append(m)
        task_rows = run_impls(
            impls, sets, checker, shape, batch, seqlen, tokens, args, device, flush
        )
        for m in task_rows:
            m.extra["per_call"] = vars(pc) if pc else None
        results += task_rows
    del sets
    _free(device)
    return results


def time_matmul(x: LogitInputs, device, args) -> float:
    """Median seconds of the bare forward matmul hidden @ weight.T (bf16)."""
    h = x.hidden.detach().flatten(0, 1)
    w = x.weight.detach()
    times = H.time_calls(
        lambda _: h @ w.T,
        [None],
        device,
        warmup=1,
        reps=max(3, args.max_reps // 4),
        budget_s=args.budget,
    )
    return H.summarize(times).median_s


def run_logit_shape(n, v, h, args, device, peers, backends, flush):
    task = "hidden" if h else "logits"
    shape = f"{n}x{v}" + (f"x{h}" if h else "")
    dtype = torch.bfloat16
    elt = 2
    set_bytes = n * (h if h else v) * elt
    nsets = 1 if set_bytes >= (64 << 20) else args.sets
    t0 = time.perf_counter()
    sets = [make_logit_inputs(n, v, h, dtype, device, args.seed + 1000 * i) for i in range(1)]
    for i in range(1, nsets):
        sets.append(make_logit_inputs(n, v, h, dtype, device, args.seed + 1000 * i, sets[0].weight))
    batch, seqlen = sets[0].targets.shape
    print(
        f"\n== {task} {shape} ({batch} x {seqlen} tokens, {sets[0].valid:,} valid, bf16): "
        f"{nsets} input set(s), made in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    extra = {}
    if h and not args.memory_only:
        extra["matmul_s"] = time_matmul(sets[0], device, args)
        print(
            f"  bare matmul (N, H) @ (H, V) bf16: {H.fmt_time(extra['matmul_s'])} = "
            f"{2 * n * v * h / extra['matmul_s'] / 1e12:.3g} TFLOP/s",
            flush=True,
        )
    checker = LogitChecker(sets[0], device)
    impls = build_logit_impls(task, backends[task], peers, backends["logits"])
    results = run_impls(impls, sets, checker, shape, batch, seqlen, n, args, device, flush)
    for m in results:
        m.extra.update(extra, n=n, v=v, h=h)
    del sets, checker
    _free(device)
    return results


# --------------------------------------------------------------------------------------
# Rows, tables, files


def floor_of(m: H.Measurement, copy_bps: float) -> tuple[float, str, float | None]:
    """(floor seconds, what it counts, bytes per token or None)."""
    if m.task in TOKEN_BYTES:
        b = TOKEN_BYTES[m.task]
        return b * m.tokens / copy_bps, f"{b} B/token at copy bandwidth", b
    if m.task == "logits":
        b = 2 * m.extra["v"] * 2 + 17
        return b * m.tokens / copy_bps, f"2 V elt + 17 = {b} B/token at copy bandwidth", b
    return 3 * m.extra["matmul_s"], "6 N V H FLOP at the bare matmul's rate", None


def to_rows(results: list[H.Measurement], env: dict, copy_bps: float) -> list[dict]:
    rows = []
    for m in results:
        floor_s, floor_what, bpt = floor_of(m, copy_bps)
        med = m.median_s
        bare = next(
            (
                b.median_s
                for b in results
                if b.kind == "bare" and b.task == m.task and b.shape == m.shape and b.median_s
            ),
            None,
        )
        peers = [
            p
            for p in results
            if p.kind == "peer" and p.task == m.task and p.shape == m.shape and p.median_s
        ]
        speedups = {p.impl: p.median_s / med for p in peers} if (med and m.kind == "ours") else {}
        best = min(peers, key=lambda p: p.median_s) if peers else None
        rows.append(
            {
                **env,
                "shape": m.shape,
                "batch": m.batch,
                "seqlen": m.seqlen,
                "tokens": m.tokens,
                "valid_tokens": m.extra.get("valid_tokens"),
                "task": m.task,
                "impl": m.impl,
                "kind": m.kind,
                "status": m.status,
                "median_s": med,
                "iqr_s": m.stats.iqr_s if m.stats else None,
                "q1_s": m.stats.q1_s if m.stats else None,
                "q3_s": m.stats.q3_s if m.stats else None,
                "reps": m.stats.reps if m.stats else 0,
                "warmup": m.warmup,
                "estimated": m.estimated,
                "first_call_s": m.extra.get("first_call_s"),
                "tokens_per_s": m.tokens / med if med else None,
                "GB_s": bpt * m.tokens / med / 1e9 if (med and bpt) else None,
                "bytes_per_token": bpt,
                "copy_GB_s": copy_bps / 1e9,
                "floor_s": floor_s,
                "floor": floor_what,
                "fraction_of_floor": floor_s / med if med else None,
                "matmul_s": m.extra.get("matmul_s"),
                "peak_bytes": m.extra.get("peak_bytes"),
                "speedup_vs": speedups,
                "per_call": m.extra.get("per_call"),
                "bare_op_s": bare,
                "over_bare_op": med / bare if (bare and med) else None,
                "best_peer": best.impl if best else None,
                "speedup_vs_best_peer": best.median_s / med
                if (best and med and m.kind == "ours")
                else None,
                "verified": m.extra.get("verified"),
                "verified_against": m.extra.get("verified_against"),
                "loss_err": m.extra.get("loss_err"),
                "grad_err": m.extra.get("grad_err"),
                "note": m.note,
            }
        )
    return rows


def _mem(b: int | None) -> str:
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def table(rows: list[dict]) -> str:
    headers = ["impl", "median", "IQR", "reps", "Mtok/s", "%floor", "peak mem", "check", "note"]
    per_call = any(r["bare_op_s"] for r in rows)
    if per_call:
        headers.insert(6, "/ bare add")
    out = []
    for r in rows:
        check = {True: "ok", False: "FAIL", None: "-"}[r["verified"]]
        note = r["note"] if (r["status"] != "ok" or r["kind"] != "ours" or r["estimated"]) else ""
        out.append(
            [
                r["impl"],
                H.fmt_time(r["median_s"]),
                H.fmt_time(r["iqr_s"]),
                str(r["reps"]) if r["reps"] else "-",
                H.fmt_num(r["tokens_per_s"] and r["tokens_per_s"] / 1e6, ".3g"),
                H.fmt_num(r["fraction_of_floor"] and 100 * r["fraction_of_floor"], ".3g", "%"),
                _mem(r["peak_bytes"]),
                check,
                note[:90],
            ]
        )
        if per_call:
            out[-1].insert(6, H.fmt_num(r["over_bare_op"], ".3g", "x"))
    text = H.format_table(headers, out)
    peers = [r["impl"] for r in rows if r["kind"] == "peer" and r["median_s"]]
    ours = [r for r in rows if r["kind"] == "ours" and r["median_s"]]
    if peers and ours:
        ratios = [
            [r["impl"], *(H.fmt_num(r["speedup_vs"].get(p), ".3g", "x") for p in peers)]
            for r in ours
        ]
        text += "\n\nours x peer (peer median / ours):\n" + H.format_table(["impl", *peers], ratios)
    return text


def block_header(rows: list[dict], env: dict) -> str:
    r = rows[0]
    pc = r.get("per_call")
    return (
        f"\n{r['task']} {r['shape']} on {env['device_name']}: {r['tokens']:,} tokens "
        f"({r['valid_tokens']:,} valid); floor {H.fmt_time(r['floor_s'])} ({r['floor']}, "
        f"copy {r['copy_GB_s']:.1f} GB/s)"
        + (f"\n  PER CALL: {H.PerCall(**pc).describe()}, forward + backward" if pc else "")
    )


def _parse(spec: str, n: int) -> list[tuple[int, ...]]:
    out = []
    for s in spec.split(","):
        t = tuple(int(v) for v in s.lower().split("x"))
        if len(t) != n:
            raise ValueError(f"shape {s!r} needs {n} numbers")
        out.append(t)
    return out


def probe_backends(candidates: dict[str, list[str]], device: torch.device):
    """The backends that run a tiny problem of each kind here, and why the others don't.

    ``available_backends`` says whether a backend can run on the device (the C++
    extension builds, Triton imports); a kernel that is not in the build yet fails here.
    """
    g = torch.Generator().manual_seed(0)
    b, t, v, hd = 2, 16, 64, 8
    mask = torch.rand(b, t, generator=g) > 0.2
    lp = (-torch.rand(b, t, generator=g)).to(device).requires_grad_()
    old = (-torch.rand(b, t, generator=g)).to(device)
    adv = torch.randn(b, t, generator=g).to(device)
    mask = mask.to(device)
    z = torch.randn(b, t, v, generator=g).to(device, torch.bfloat16).requires_grad_()
    y = torch.randint(0, v, (b, t), generator=g).to(device)
    hid = torch.randn(b, t, hd, generator=g).to(device, torch.bfloat16).requires_grad_()
    w = torch.randn(v, hd, generator=g).to(device, torch.bfloat16).requires_grad_()
    probes = {
        "token": lambda be: vk.vapo_loss(
            lp, old, adv, mask, values=lp * 2, old_values=old, returns=adv, backend=be
        )[0].backward(),
        "logits": lambda be: vk.policy_loss_from_logits(z, y, old, adv, mask, backend=be)[
            0
        ].backward(),
        "hidden": lambda be: vk.policy_loss_from_hidden(hid, w, y, old, adv, mask, backend=be)[
            0
        ].backward(),
    }
    ok: dict[str, list[str]] = {k: [] for k in probes}
    why: dict[str, str] = {}
    for kind, probe in probes.items():
        for be in candidates.get(kind, []):
            try:
                probe(be)
                ok[kind].append(be)
            except Exception as e:  # noqa: BLE001 - a kernel still missing from the build
                why[f"{kind}[{be}]"] = f"{type(e).__name__}: {e}"[:200]
    return ok, why


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few reps, no compile")
    p.add_argument("--out", type=Path, default=HERE / "out", help="folder for JSON/PNG/TXT")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"subset of {','.join(TASKS)}")
    p.add_argument("--token-shapes", help="BxT,... for the token tasks, e.g. 256x4096")
    p.add_argument("--logit-shapes", help="NxV,... for the logits task, e.g. 16384x151936")
    p.add_argument("--hidden-shapes", help="NxVxH,... for the hidden task")
    p.add_argument(
        "--backends",
        help="our backends, comma-separated (default: those available on the device but "
        "reference; triton on CPU only if asked). Our reference backend is added for a "
        "task that has no other.",
    )
    p.add_argument("--reference", action="store_true", help="also time our reference backend")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile rows (default: on, off with --quick)",
    )
    p.add_argument("--sets", type=int, help="input sets to rotate among (default 3; quick 2)")
    p.add_argument("--budget", type=float, help="seconds of timed calls per row")
    p.add_argument("--max-reps", type=int, help="most timed calls per row")
    p.add_argument("--min-reps", type=int, default=5, help="fewer reps are flagged ESTIMATE")
    p.add_argument(
        "--max-call-s", type=float, default=30.0, help="skip a row whose check call took longer"
    )
    p.add_argument(
        "--flush",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="overwrite a buffer larger than the last-level cache before each timed call "
        "(default: on for CUDA, off for CPU, see benchmarks/README.md)",
    )
    p.add_argument(
        "--cpu-peak",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CPU: measure peak memory, in a second process after the timing",
    )
    p.add_argument("--no-validate", action="store_true", help="VAPO_VALIDATE=0 (data checks off)")
    p.add_argument("--memory-only", help=argparse.SUPPRESS)  # internal: measure_cpu_peaks
    p.add_argument("--plan", dest="plan_path", help=argparse.SUPPRESS)
    H.add_per_call_args(p, PER_CALL_TOKEN_SHAPES, 500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    gpu = device.type == "cuda"
    args.tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in args.tasks if t not in TASKS]
    if bad:
        p.error(f"unknown task(s) {bad}; choose from {TASKS}")
    args.sets = args.sets or (2 if args.quick else 3)
    args.budget = args.budget or (0.3 if args.quick else 3.0)
    args.max_reps = args.max_reps or (3 if args.quick else (50 if gpu else 20))
    if args.quick:
        args.min_reps = min(args.min_reps, 2)
    args.per_call_spec = H.PerCall(
        threads=args.per_call_threads,
        reps=args.per_call_reps or (30 if args.quick else 500),
        warmup=5 if args.quick else 20,
        budget_s=1.0 if args.quick else 5.0,
    )
    if args.compile is None:
        args.compile = not args.quick
    compile_why = None if args.compile else "torch.compile rows off (--quick / --no-compile)"
    if args.no_validate:
        vk.set_validation(False)
    if gpu:
        tok_shapes, log_shapes, hid_shapes = GPU_TOKEN_SHAPES, GPU_LOGIT_SHAPES, GPU_HIDDEN_SHAPES
    else:
        tok_shapes, log_shapes, hid_shapes = CPU_TOKEN_SHAPES, CPU_LOGIT_SHAPES, CPU_HIDDEN_SHAPES
    if args.quick:
        tok_shapes, log_shapes, hid_shapes = (
            QUICK_TOKEN_SHAPES,
            QUICK_LOGIT_SHAPES,
            QUICK_HIDDEN_SHAPES,
        )
    tok_shapes = _parse(args.token_shapes, 2) if args.token_shapes else tok_shapes
    log_shapes = _parse(args.logit_shapes, 2) if args.logit_shapes else log_shapes
    hid_shapes = _parse(args.hidden_shapes, 3) if args.hidden_shapes else hid_shapes
    shapes = args.shapes = (tok_shapes, log_shapes, hid_shapes)

    # Which of our backends: what vapo_kernels reports for every op a task runs, then a
    # tiny probe (a kernel can be missing from a build that otherwise loads).
    ops = {
        "token": ["token_loss"],
        "logits": ["token_loss", "token_logprobs", "token_logprobs_backward"],
        "hidden": ["token_loss", "linear_logprobs", "linear_logprobs_backward"],
    }
    reported = {k: [b for b in vk.available_backends(o[0], device)] for k, o in ops.items()}
    for k, o in ops.items():
        for op in o[1:]:
            have = vk.available_backends(op, device)
            reported[k] = [b for b in reported[k] if b in have]
    skipped: dict[str, str] = {}
    candidates = {}
    for k, have in reported.items():
        if args.backends:
            want = args.backends.split(",")
            for b in want:
                if b not in have:
                    skipped[f"{k}[{b}]"] = f"not available for {'/'.join(ops[k])} on {device}"
            cand = [b for b in want if b in have]
        else:
            cand = [b for b in have if b != "reference" or args.reference]
            if device.type == "cpu" and "triton" in cand:
                cand.remove("triton")
                skipped[f"{k}[triton]"] = "the Triton interpreter's time means nothing (--backends)"
            if not [b for b in cand if b != "reference"] and "reference" in have:
                cand = ["reference"]  # the spec is all there is for this task here
        candidates[k] = cand
    backends, probe_why = probe_backends(candidates, device)
    skipped.update(probe_why)
    # a task whose compiled backends all failed the probe still gets our reference row
    fallback = {
        k: ["reference"]
        for k, have in backends.items()
        if not have
        and not args.backends
        and "reference" in reported[k]
        and "reference" not in candidates[k]
    }
    if fallback:
        extra, extra_why = probe_backends(fallback, device)
        skipped.update(extra_why)
        backends.update({k: v for k, v in extra.items() if v})

    env = H.environment(device)
    t_load = time.perf_counter()
    peers = load_peers()
    print(
        f"bench_loss on {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
        "our backends: "
        + "; ".join(f"{k} {','.join(v) or 'none'}" for k, v in backends.items())
        + " | peers: "
        + ", ".join(f"{k} {v}" for k, v in peers.versions.items())
        + f" (loaded in {time.perf_counter() - t_load:.1f} s)",
        flush=True,
    )
    for k, why in skipped.items():
        print(f"  our backend {k} skipped: {why}", flush=True)
    for k, why in peers.why.items():
        print(f"  peer {k} unavailable: {why}", flush=True)
    if peers.verl_pg is not None:
        how = {"source": "compiled unchanged from the installed core_algos.py"}
        print(f"  verl functions: {how.get(peers.verl_source, 'imported')}")
    if peers.openrlhf_policy is not None:
        how = {"source": "compiled unchanged from the installed models/loss.py"}
        print(f"  openrlhf classes: {how.get(peers.openrlhf_source, 'imported (GPU-stack shim)')}")
    if args.compile:
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # the .item() graph breaks

    if args.memory_only:  # the child of measure_cpu_peaks: memory, nothing else
        return memory_child(args, device, peers, backends, compile_why, shapes)

    copy_bps = H.measure_copy_bandwidth(device, (64 if args.quick else 1024 if gpu else 256) << 20)
    print(f"  copy bandwidth (read + write) measured here: {copy_bps / 1e9:.1f} GB/s", flush=True)
    if args.flush is None:
        args.flush = gpu
    flush = H.CacheFlusher(device, (16 << 20) if args.quick else None) if args.flush else None
    if gpu:
        mem_method = "torch.cuda.max_memory_allocated - memory_allocated before the call"
    elif not args.cpu_peak:
        mem_method = "not measured (--no-cpu-peak)"
    else:
        why = cpu_peak_why_not()
        mem_method = (
            f"not measured: {why}"
            if why
            else "a second process after the timing (same inputs), one warm call per row: "
            "VmHWM - VmRSS before the call, glibc mmap threshold pinned at 1 MiB there"
        )
    args.measure_peak = gpu  # CPU: in the second process, so this one's malloc is untouched
    print(
        f"  timing: median of up to {args.max_reps} calls or {args.budget:g} s per row, "
        f"cache flush between calls: {'on' if flush else 'off'}; peak memory: {mem_method}; "
        f"per-call token shapes {PER_CALL_TOKEN_SHAPES}: {args.per_call_spec.describe()}",
        flush=True,
    )
    meta = {
        **env,
        "script": "benchmarks/bench_loss.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "copy_GB_s": copy_bps / 1e9,
        "peer_versions": peers.versions,
        "peer_unavailable": peers.why,
        "backends": backends,
        "backends_skipped": skipped,
        "memory_method": mem_method,
        "validation": vk._ragged.validation_enabled(),
        "threads": torch.get_num_threads(),
        "params": {
            "clip_low": CLIP_LOW,
            "clip_high": CLIP_HIGH,
            "dual_clip": DUAL_CLIP,
            "value_clip": VALUE_CLIP,
            "vf_coef": VF_COEF,
            "agg": "token-mean",
            "loss_rtol": LOSS_RTOL,
            "loss_atol": LOSS_ATOL,
            "grad_rtol": GRAD_RTOL,
            "grad_atol": GRAD_ATOL,
            "bf16_grad_rel": BF16_GRAD_REL,
            "sets": args.sets,
            "budget_s": args.budget,
            "max_reps": args.max_reps,
            "flush": bool(args.flush),
            "compile": bool(args.compile),
            "per_call_token_shapes": PER_CALL_TOKEN_SHAPES,
            "per_call": vars(args.per_call_spec),
        },
    }

    t_all = time.perf_counter()
    results = run_all(args, device, peers, backends, flush, compile_why, shapes)
    if not gpu and args.cpu_peak and not mem_method.startswith("not measured"):
        measure_cpu_peaks(results, args, argv)
    meta["wall_s"] = time.perf_counter() - t_all

    rows = to_rows(results, env, copy_bps)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["shape"]), []).append(r)
    text = [block_header(grp, env) + "\n" + table(grp) for grp in groups.values()]
    print("\n".join(text), flush=True)

    tag = device.type
    args.out.mkdir(parents=True, exist_ok=True)
    H.write_json(args.out / f"loss_{tag}.json", meta, rows)
    (args.out / f"loss_{tag}.txt").write_text("\n".join(text) + "\n")
    title = f"{env['device_name']}, torch {env['torch']}, {env['timestamp']}"
    plots = []
    for suffix, tasks in (("", TOKEN_TASKS), ("_logits", LOGIT_TASKS)):
        sel = [
            r for r in rows if r["status"] == "ok" and r["task"] in tasks and r["kind"] != "bare"
        ]
        path = args.out / f"loss_{tag}{suffix}.png"
        if sel and H.plot_throughput(sel, path, title=f"PPO loss fwd+bwd tokens/s, {title}"):
            plots.append(str(path))
    print(
        f"\nwrote {args.out / f'loss_{tag}.json'}"
        + (f", {', '.join(plots)}" if plots else " (no plot)")
        + f" in {meta['wall_s']:.0f} s",
        flush=True,
    )

    bad = [
        r
        for r in rows
        if r["status"] == "failed_verification" or (r["kind"] == "ours" and r["status"] == "error")
    ]
    for r in bad:
        print(
            f"!! {r['task']} {r['shape']} {r['impl']}: {r['status']}: {r['note']}", file=sys.stderr
        )
    return 1 if bad else 0


def run_all(args, device, peers, backends, flush, compile_why, shapes) -> list[H.Measurement]:
    tok_shapes, log_shapes, hid_shapes = shapes
    results: list[H.Measurement] = []
    if any(t in args.tasks for t in TOKEN_TASKS):
        for batch, seqlen in tok_shapes:
            results += run_token_shape(
                batch, seqlen, args, device, peers, backends, flush, compile_why
            )
    if "logits" in args.tasks:
        for n, v in log_shapes:
            results += run_logit_shape(n, v, None, args, device, peers, backends, flush)
    if "hidden" in args.tasks:
        for n, v, h in hid_shapes:
            results += run_logit_shape(n, v, h, args, device, peers, backends, flush)
    return results


def _shape_args(shapes) -> list[str]:
    tok, log, hid = shapes
    out = []
    for flag, lst in (("--token-shapes", tok), ("--logit-shapes", log), ("--hidden-shapes", hid)):
        if lst:
            out += [flag, ",".join("x".join(str(v) for v in s) for s in lst)]
    return out


def measure_cpu_peaks(results: list[H.Measurement], args, argv) -> None:
    """CPU peak memory of every timed row, measured by this script in a second process.

    The resident-set high-water mark only counts a call's buffers if the allocator maps
    them fresh, which needs glibc's mmap threshold pinned low; that slows every large
    allocation, so it is done in a process that times nothing: same arguments and seeds,
    one warm-up call and one measured call per row (rows not timed here are not run).
    """
    import json
    import subprocess
    import tempfile

    plan = [row_key(m.task, m.shape, m.impl) for m in results if m.status == "ok"]
    if not plan:
        return
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_loss_mem_") as tmp:
        plan_path = Path(tmp) / "plan.json"
        out_path = Path(tmp) / "peaks.json"
        plan_path.write_text(json.dumps(plan))
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            *(sys.argv[1:] if argv is None else argv),
        ]
        cmd += [*_shape_args(args.shapes), "--sets", "1", "--memory-only", str(out_path)]
        cmd += ["--plan", str(plan_path), "--compile" if args.compile else "--no-compile"]
        print(f"\n== peak memory: {len(plan)} rows in a second process", flush=True)
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0 or not out_path.exists():
            tail = (proc.stdout + proc.stderr)[-1500:]
            print(f"  peak memory process failed (rc {proc.returncode}):\n{tail}", flush=True)
            return
        peaks = json.loads(out_path.read_text())
    for m in results:
        key = row_key(m.task, m.shape, m.impl)
        if key in peaks:
            m.extra["peak_bytes"] = peaks[key]
    print(f"   ({time.perf_counter() - t0:.1f} s, {len(peaks)} rows measured)", flush=True)


def memory_child(args, device, peers, backends, compile_why, shapes) -> int:
    import json

    if not _pin_malloc_mmap_threshold():
        print("cannot pin glibc's mmap threshold", file=sys.stderr)
        return 2
    args.plan = set(json.loads(Path(args.plan_path).read_text()))
    args.measure_peak = True
    if args.compile:
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    results = run_all(args, device, peers, backends, None, compile_why, shapes)
    peaks = {
        row_key(m.task, m.shape, m.impl): m.extra["peak_bytes"]
        for m in results
        if m.status == "ok" and m.extra.get("peak_bytes") is not None
    }
    Path(args.memory_only).write_text(json.dumps(peaks))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
