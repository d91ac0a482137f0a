r"""The fused PPO / VAPO token loss in Triton: the ``triton`` backend of ``vapo::token_loss``.

Implements the kernel contract of :func:`vapo_kernels.ops.loss.reference_kernel` (the
formulas are in the docstring of :mod:`vapo_kernels.ops.loss`; the per-token values,
gradients and torch's tie rules are those of ``_policy_terms``, ``_value_terms`` and
``_kl_terms`` there).

Plan: a 1-D grid over blocks of BLOCK tokens (int64 indices, so any N works; sequences
never go on a grid dimension). Every term is elementwise, so each program reads its
tokens once, writes the gradients of logp, values and entropy for them, and writes one
row of NUM_SUMS partial sums (weighted loss terms, metric counts, ratio min/max) to a
(num_blocks, NUM_SUMS) buffer. The host reduces the rows with torch (float64 sums,
min/max): deterministic, no atomics.

A token needs the aggregation weight of its sequence. The host finds, with one
``torch.searchsorted``, the sequences of the first and last token of every block (two
ints per block); inside the block each token binary-searches the offsets of that range
only. A block inside one sequence (the common case: sequences are much longer than a
block) does no search step at all; a block of many short sequences does
``bit_length(#sequences - 1)`` gather steps over offsets that sit in cache.

Masked slots only reach the arithmetic through ``tl.where`` (they are replaced by 0
right after the load, as the reference does), and every sum and gradient selects with
the mask instead of multiplying by it, so NaN or 1e30 stored there changes no output
bit. Compute is in float32 (float64 for float64 inputs); the scalar parameters are
passed as a small tensor in that dtype, since a Python float kernel argument would be
float32 and round them for float64 inputs.

The second kernel, ``_logits_loss_kernel``, is the ``triton`` backend of
``vapo::logits_loss`` (contract: :func:`vapo_kernels.ops.loss.reference_logits_kernel`):
logits -> loss sums and d loss / d logits in one launch, see :func:`logits_loss`.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..ops.loss import (
    NUM_PARAMS,
    NUM_SUMS,
    P_CLIP_HIGH,
    P_CLIP_LOW,
    P_DUAL_CLIP,
    P_ENTROPY_COEF,
    P_KL_COEF,
    P_KL_KIND,
    P_KL_STRAIGHT,
    P_LM_COEF,
    P_RATIO_CLAMP,
    P_VALUE_CLIP,
    P_VALUE_CLIP_OPENRLHF,
    P_VF_COEF,
    S_CLIP_HIGH,
    S_CLIP_LOW,
    S_DUAL_CLIP,
    S_ENTROPY,
    S_K3,
    S_KL,
    S_LM,
    S_NEG_LOG_RATIO,
    S_PG,
    S_RATIO_MAX,
    S_RATIO_MIN,
    S_RATIO_SUM,
    S_TOKENS,
    S_VF,
    S_VF_CLIP,
)
from . import logprobs as _lp
from .logprobs import _keep_row, _row_backward, _row_forward, _row_zero

# Launch parameters. GPU (not yet tuned on a device): the kernel is memory bound (up to
# ten inputs and three gradients per token, ~50 bytes); 1024 tokens over 8 warps keeps
# 4 tokens per thread, so the ~40 live values per token of the full VAPO objective fit
# the register file. Interpreter: each program costs a fixed round of numpy calls, and
# test shapes are small; tests pass ``block=`` to put boundaries inside sequences.
GPU_BLOCK = 1024
GPU_NUM_WARPS = 8
INTERPRET_BLOCK = 64

# Value-clip modes (constexpr).
_V_NONE, _V_UNCLIPPED, _V_VERL, _V_OPENRLHF = 0, 1, 2, 3

# Layout of the scalar parameter tensor the kernel reads (derived on the host in float64,
# then rounded once to the compute dtype, as torch does with a Python scalar).
_K_LO, _K_HI, _K_DUAL, _K_CLAMP, _K_VEPS, _K_VF, _K_KL, _K_ENT, _K_LM = range(9)
_NUM_K = 9


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------
# Per-token terms (the reference's formulas, torch's tie and clamp-gradient rules).
# Elementwise: the token kernel applies them to a block of tokens, the logits kernel to
# one token's 0-d values.


@triton.jit
def _policy(lp, olp, adv, lo, hi, dual_c, clamp, HAS_DUAL: tl.constexpr):
    """pg, d pg / d logp, clip_low, clip_high, dual flags, log_ratio, ratio."""
    raw = lp - olp
    log_ratio = tl.minimum(tl.maximum(raw, -clamp), clamp)
    ratio = tl.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
    pg = tl.maximum(unclipped, clipped)
    g_clipped = tl.where((ratio >= lo) & (ratio <= hi), -adv, 0.0)
    d_ratio = tl.where(
        unclipped > clipped, -adv,
        tl.where(clipped > unclipped, g_clipped, 0.5 * (-adv + g_clipped)),
    )
    was_clipped = clipped > unclipped
    clip_low = was_clipped & (ratio < lo)
    clip_high = was_clipped & (ratio > hi)
    if HAS_DUAL:
        floor = -adv * dual_c
        negative = adv < 0
        dual = negative & (pg > floor)
        below = tl.where(pg < floor, d_ratio, tl.where(pg > floor, 0.0, 0.5 * d_ratio))
        d_ratio = tl.where(negative, below, d_ratio)
        pg = tl.where(negative, tl.minimum(pg, floor), pg)
    else:
        dual = tl.zeros(ratio.shape, tl.int1)
    grad = tl.where((raw >= -clamp) & (raw <= clamp), d_ratio * ratio, 0.0)
    return pg, grad, clip_low, clip_high, dual, log_ratio, ratio


@triton.jit
def _value(v, ov, ret, eps, MODE: tl.constexpr):
    """0.5 max((v-R)^2, (v_clip-R)^2), its gradient in v, and 'the clipped term won'."""
    err = v - ret
    unclipped = err * err
    if MODE == 1:
        vf = 0.5 * unclipped
        grad = err
        won = tl.zeros(err.shape, tl.int1)
    else:
        if MODE == 3:  # OpenRLHF: old + clamp(v - old, -eps, eps)
            step = v - ov
            v_clipped = ov + tl.minimum(tl.maximum(step, -eps), eps)
            in_clip = (step >= -eps) & (step <= eps)
            d_clip = tl.where(in_clip, 1.0, 0.0)
        else:  # verl: max(min(v, old + eps), old - eps)
            hi = ov + eps
            lo = ov - eps
            upper = tl.minimum(v, hi)
            d_upper = tl.where(v < hi, 1.0, tl.where(v > hi, 0.0, 0.5))
            v_clipped = tl.maximum(upper, lo)
            d_clip = d_upper * tl.where(upper > lo, 1.0, tl.where(upper < lo, 0.0, 0.5))
        err_clipped = v_clipped - ret
        clipped = err_clipped * err_clipped
        g_clipped = err_clipped * d_clip
        grad = tl.where(
            unclipped > clipped, err,
            tl.where(clipped > unclipped, g_clipped, 0.5 * (err + g_clipped)),
        )
        vf = 0.5 * tl.maximum(unclipped, clipped)
        won = clipped > unclipped
    return vf, grad, won


@triton.jit
def _expm1_minus_x(x, e):
    """expm1(x) - x given e = exp(x) (k3 of a log-ratio x); e - 1 - x cancels for small
    |x| (at |x| ~ 1e-3, float32 keeps a few digits of k3 ~ x^2 / 2).

    float32: below |x| = 1/2 the series x^2 (1/2! + x/3! + ... + x^6/8!), truncated
    below 1e-10 relative. float64 (whose literals Triton would round to float32):
    Kahan's expm1 = (e - 1) x / log(e), a few ulps, as good as the reference's expm1.
    """
    if x.dtype == tl.float64:
        em1 = tl.where(e == 1.0, x, (e - 1.0) * x / tl.log(e))
        return tl.where(tl.abs(x) < 0.5, em1 - x, (e - 1.0) - x)
    p = tl.full(x.shape, 1.0 / 40320.0, x.dtype)
    p = p * x + (1.0 / 5040.0)
    p = p * x + (1.0 / 720.0)
    p = p * x + (1.0 / 120.0)
    p = p * x + (1.0 / 24.0)
    p = p * x + (1.0 / 6.0)
    p = p * x + 0.5
    return tl.where(tl.abs(x) < 0.5, x * x * p, (e - 1.0) - x)


@triton.jit
def _kl(lp, ref, KIND: tl.constexpr, STRAIGHT: tl.constexpr):
    """The KL estimator and its gradient in logp."""
    diff = lp - ref
    if KIND == 1:
        value = diff
        grad = tl.full(diff.shape, 1.0, diff.dtype)
    elif KIND == 2:
        value = tl.abs(diff)
        grad = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    elif KIND == 3:
        value = 0.5 * diff * diff
        grad = diff
    else:
        neg = -diff
        log_ratio = tl.minimum(tl.maximum(neg, -20.0), 20.0)
        e = tl.exp(log_ratio)
        raw = _expm1_minus_x(log_ratio, e)
        value = tl.minimum(tl.maximum(raw, -10.0), 10.0)
        passes = (neg >= -20.0) & (neg <= 20.0) & (raw >= -10.0) & (raw <= 10.0)
        grad = tl.where(passes, -(raw + log_ratio), 0.0)
    if STRAIGHT:
        grad = diff
    return value, grad


# --------------------------------------------------------------------------------------
# The kernel


@triton.jit
def _token_loss_kernel(
    lp_ptr, olp_ptr, adv_ptr, v_ptr, ov_ptr, ret_ptr, ref_ptr, ent_ptr, isw_ptr, m_ptr,
    offs_ptr, span_ptr, sw_ptr, lmw_ptr, k_ptr,
    part_ptr, g_lp_ptr, g_v_ptr, g_ent_ptr,
    n_tokens, n_blocks,
    HAS_LOGP: tl.constexpr, HAS_POLICY: tl.constexpr, HAS_ISW: tl.constexpr,
    HAS_DUAL: tl.constexpr, VALUE_MODE: tl.constexpr, KL_KIND: tl.constexpr,
    KL_STRAIGHT: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_LM: tl.constexpr,
    HAS_MASK: tl.constexpr, NEED_GRAD: tl.constexpr,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < n_tokens
    if HAS_MASK:
        valid = inb & (tl.load(m_ptr + idx, mask=inb, other=0) != 0)
    else:
        valid = inb
    zero = tl.zeros([BLOCK], ACC)

    # The sequence of every token: binary search over offsets[first..last], the
    # sequences of this block's first and last token (found on the host).
    first = tl.load(span_ptr + pid)
    last = tl.load(span_ptr + n_blocks + pid)
    lo = tl.zeros([BLOCK], tl.int64) + first
    hi = tl.zeros([BLOCK], tl.int64) + last
    width = last - first
    while width > 0:  # bit_length(last - first) steps
        mid = (lo + hi + 1) // 2
        starts_here = tl.load(offs_ptr + mid) <= idx
        lo = tl.where(starts_here, mid, lo)
        hi = tl.where(starts_here, hi, mid - 1)
        width = width // 2
    seq = lo
    w = tl.where(valid, tl.load(sw_ptr + seq, mask=inb, other=0.0).to(ACC), zero)

    def_zero = tl.sum(zero, axis=0)  # a 0-d zero of the compute dtype
    s_pg = def_zero
    s_vf = def_zero
    s_kl = def_zero
    s_ent = def_zero
    s_lm = def_zero
    s_clip_low = def_zero
    s_clip_high = def_zero
    s_dual = def_zero
    s_nlr = def_zero
    s_k3 = def_zero
    s_ratio = def_zero
    r_min = def_zero + float("inf")
    r_max = def_zero - float("inf")
    s_vf_clip = def_zero
    s_tokens = tl.sum(tl.where(valid, 1.0, zero), axis=0)

    g_lp = zero
    if HAS_LOGP:
        lp = tl.where(valid, tl.load(lp_ptr + idx, mask=inb, other=0.0).to(ACC), zero)

    # k_ptr holds the _K_* scalars: lo, hi, dual, clamp, value eps, vf, kl, ent, lm coefs.
    if HAS_POLICY:
        olp = tl.where(valid, tl.load(olp_ptr + idx, mask=inb, other=0.0).to(ACC), zero)
        adv = tl.where(valid, tl.load(adv_ptr + idx, mask=inb, other=0.0).to(ACC), zero)
        k_lo = tl.load(k_ptr + 0)
        k_hi = tl.load(k_ptr + 1)
        k_dual = tl.load(k_ptr + 2)
        k_clamp = tl.load(k_ptr + 3)
        pg, grad, f_low, f_high, f_dual, log_ratio, ratio = _policy(
            lp, olp, adv, k_lo, k_hi, k_dual, k_clamp, HAS_DUAL
        )
        if HAS_ISW:
            isw = tl.where(valid, tl.load(isw_ptr + idx, mask=inb, other=0.0).to(ACC), zero)
            pg = pg * isw
            grad = grad * isw
        s_pg = tl.sum(tl.where(valid, w * pg, zero), axis=0)
        g_lp = g_lp + tl.where(valid, w * grad, zero)
        s_clip_low = tl.sum(tl.where(valid & f_low, 1.0, zero), axis=0)
        s_clip_high = tl.sum(tl.where(valid & f_high, 1.0, zero), axis=0)
        s_dual = tl.sum(tl.where(valid & f_dual, 1.0, zero), axis=0)
        s_nlr = tl.sum(tl.where(valid, -log_ratio, zero), axis=0)
        s_k3 = tl.sum(tl.where(valid, _expm1_minus_x(log_ratio, ratio), zero), axis=0)
        s_ratio = tl.sum(tl.where(valid, ratio, zero), axis=0)
        r_min = tl.min(tl.where(valid, ratio, float("inf")), axis=0)
        r_max = tl.max(tl.where(valid, ratio, -float("inf")), axis=0)

    if VALUE_MODE > 0:
        v = tl.where(valid, tl.load(v_ptr + idx, mask=inb, other=0.0).to(ACC), zero)
        ret = tl.where(valid, tl.load(ret_ptr + idx, mask=inb, other=0.0).to(ACC), zero)
        if VALUE_MODE > 1:
            ov = tl.where(valid, tl.load(ov_ptr + idx, mask=inb, other=0.0).to(ACC), zero)
        else:
            ov = zero
        vf, g_vf, won = _value(v, ov, ret, tl.load(k_ptr + 4), VALUE_MODE)
        s_vf = tl.sum(tl.where(valid, w * vf, zero), axis=0)
        s_vf_clip = tl.sum(tl.where(valid & won, 1.0, zero), axis=0)
        if NEED_GRAD:
            g_v = tl.where(valid, tl.load(k_ptr + 5) * w * g_vf, zero)
            tl.store(g_v_ptr + idx, g_v, mask=inb)

    if KL_KIND > 0:
        ref = tl.where(valid, tl.load(ref_ptr + idx, mask=inb, other=0.0).to(ACC), zero)
        kl, g_kl = _kl(lp, ref, KL_KIND, KL_STRAIGHT)
        s_kl = tl.sum(tl.where(valid, w * kl, zero), axis=0)
        g_lp = g_lp + tl.where(valid, tl.load(k_ptr + 6) * w * g_kl, zero)

    if HAS_ENTROPY:
        ent = tl.where(valid, tl.load(ent_ptr + idx, mask=inb, other=0.0).to(ACC), zero)
        s_ent = tl.sum(tl.where(valid, w * ent, zero), axis=0)
        if NEED_GRAD:
            g_ent = tl.where(valid, -tl.load(k_ptr + 7) * w, zero)
            tl.store(g_ent_ptr + idx, g_ent, mask=inb)

    if HAS_LM:
        w_lm = tl.where(valid, tl.load(lmw_ptr + seq, mask=inb, other=0.0).to(ACC), zero)
        s_lm = -tl.sum(tl.where(valid, w_lm * lp, zero), axis=0)
        g_lp = g_lp - tl.where(valid, tl.load(k_ptr + 8) * w_lm, zero)

    if HAS_LOGP and NEED_GRAD:
        tl.store(g_lp_ptr + idx, g_lp, mask=inb)

    row = part_ptr + pid.to(tl.int64) * 15
    tl.store(row + 0, s_pg)
    tl.store(row + 1, s_vf)
    tl.store(row + 2, s_kl)
    tl.store(row + 3, s_ent)
    tl.store(row + 4, s_lm)
    tl.store(row + 5, s_tokens)
    tl.store(row + 6, s_clip_low)
    tl.store(row + 7, s_clip_high)
    tl.store(row + 8, s_dual)
    tl.store(row + 9, s_nlr)
    tl.store(row + 10, s_k3)
    tl.store(row + 11, s_ratio)
    tl.store(row + 12, r_min)
    tl.store(row + 13, r_max)
    tl.store(row + 14, s_vf_clip)


# --------------------------------------------------------------------------------------
# Host side


def _scalar_params(params, dtype, device, extra=()) -> torch.Tensor:
    """The _K_* scalars, then ``extra``: derived in float64, rounded once to ``dtype``."""
    k = [0.0] * _NUM_K
    k[_K_LO], k[_K_HI] = 1.0 - params[P_CLIP_LOW], 1.0 + params[P_CLIP_HIGH]
    k[_K_DUAL], k[_K_CLAMP] = params[P_DUAL_CLIP], params[P_RATIO_CLAMP]
    k[_K_VEPS], k[_K_VF], k[_K_KL] = params[P_VALUE_CLIP], params[P_VF_COEF], params[P_KL_COEF]
    k[_K_ENT], k[_K_LM] = params[P_ENTROPY_COEF], params[P_LM_COEF]
    k_t = torch.tensor(k + [float(x) for x in extra], dtype=torch.float64).to(dtype)
    if device.type == "cuda":  # pinned + non_blocking: no wait on the stream
        k_t = k_t.pin_memory().to(device, non_blocking=True)
    return k_t


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1).contiguous()


def token_loss(
    logp, old_logp, advantages, values, old_values, returns, ref_logp, entropy, is_weights,
    mask, offsets, seq_weight, lm_weight, params, need_grad, *, block: int | None = None,
):
    """The kernel contract of :func:`vapo_kernels.ops.loss.reference_kernel`.

    ``block`` (tokens per program, a power of two) overrides the launch plan; tests use
    a small one to put block boundaries inside and across sequences.
    """
    present = [t for t in (logp, values, entropy) if t is not None]
    if not present:
        raise ValueError("token_loss needs at least one of logp, values or entropy")
    out_dtype = torch.float64 if present[0].dtype == torch.float64 else torch.float32
    device = present[0].device
    n = present[0].numel()
    params = [float(p) for p in params]

    has_policy = advantages is not None
    if has_policy and (logp is None or old_logp is None):
        raise ValueError("the policy term needs logp, old_logp and advantages")
    value_mode = _V_NONE
    if returns is not None:
        if values is None:
            raise ValueError("the value term needs values and returns")
        if params[P_VALUE_CLIP] < 0:
            value_mode = _V_UNCLIPPED
        else:
            if old_values is None:
                raise ValueError("a clipped value term needs old_values")
            value_mode = _V_OPENRLHF if params[P_VALUE_CLIP_OPENRLHF] else _V_VERL
    kl_kind = int(params[P_KL_KIND]) if ref_logp is not None else 0
    if kl_kind not in (0, 1, 2, 3, 4):
        raise ValueError(f"params[P_KL_KIND] must be 0..4, got {params[P_KL_KIND]}")
    if kl_kind and logp is None:
        raise ValueError("the KL term needs logp")
    has_lm = lm_weight is not None
    if has_lm and logp is None:
        raise ValueError("the positive-example LM term needs logp")

    sums = torch.zeros(NUM_SUMS, dtype=out_dtype, device=device)
    sums[S_RATIO_MIN], sums[S_RATIO_MAX] = float("inf"), -float("inf")

    def grad_buffer(src, present_term):
        # A fresh tensor per output: the op must not return aliased tensors.
        size = n if (need_grad and src is not None and present_term) else 0
        return torch.empty(size, dtype=out_dtype, device=device)

    g_logp = grad_buffer(logp, True)
    g_values = grad_buffer(values, value_mode != _V_NONE)
    g_entropy = grad_buffer(entropy, True)
    if n == 0:
        return sums, g_logp, g_values, g_entropy

    if block is None:
        block = INTERPRET_BLOCK if _interpreting() else GPU_BLOCK
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")

    tensors = [_flat(t) for t in (logp, old_logp, advantages, values, old_values, returns,
                                  ref_logp, entropy, is_weights)]
    dummy = next(t for t in tensors if t is not None)  # never read where its flag is off
    tensors = [dummy if t is None else t for t in tensors]
    if mask is not None:
        mask = mask.reshape(-1)
        mask = (mask if mask.dtype == torch.bool else mask != 0).contiguous()
    offsets = offsets.to(device=device, dtype=torch.int64).contiguous()
    seq_weight = seq_weight.to(device=device, dtype=out_dtype).contiguous()
    lm_w = lm_weight.to(device=device, dtype=out_dtype).contiguous() if has_lm else seq_weight

    k_t = _scalar_params(params, out_dtype, device)

    # Sequences of the first and last token of every block: [first..., last...].
    n_blocks = triton.cdiv(n, block)
    block_first = torch.arange(n_blocks, dtype=torch.int64, device=device) * block
    block_last = torch.clamp(block_first + (block - 1), max=n - 1)
    span = torch.searchsorted(offsets, torch.cat([block_first, block_last]), right=True) - 1
    span = span.contiguous()

    acc = tl.float64 if out_dtype == torch.float64 else tl.float32
    part = torch.empty((n_blocks, NUM_SUMS), dtype=out_dtype, device=device)
    _token_loss_kernel[(n_blocks,)](
        *tensors, mask if mask is not None else dummy,
        offsets, span, seq_weight, lm_w, k_t,
        part,
        g_logp if g_logp.numel() else part,
        g_values if g_values.numel() else part,
        g_entropy if g_entropy.numel() else part,
        n, n_blocks,
        HAS_LOGP=logp is not None, HAS_POLICY=has_policy,
        HAS_ISW=has_policy and is_weights is not None,
        HAS_DUAL=has_policy and params[P_DUAL_CLIP] > 0, VALUE_MODE=value_mode,
        KL_KIND=kl_kind, KL_STRAIGHT=bool(params[P_KL_STRAIGHT]), HAS_ENTROPY=entropy is not None,
        HAS_LM=has_lm, HAS_MASK=mask is not None, NEED_GRAD=bool(need_grad),
        BLOCK=block, ACC=acc, num_warps=max(1, min(GPU_NUM_WARPS, block // 128)),
    )
    # Deterministic reduction of the per-block rows: sums in float64, then min / max.
    totals = part.to(torch.float64).sum(0)
    sums = totals.to(out_dtype)
    sums[S_RATIO_MIN] = part[:, S_RATIO_MIN].min()
    sums[S_RATIO_MAX] = part[:, S_RATIO_MAX].max()
    return sums, g_logp, g_values, g_entropy


# --------------------------------------------------------------------------------------
# vapo::logits_loss: from logits to the loss sums and d loss / d logits in one kernel
#
# One program per row (token), a 1-D grid of N programs; a row's work (two streaming
# passes over V logits) dwarfs the per-program overhead, and nothing about sequences
# is on the grid. A valid row runs, in registers:
#   _row_forward (lse, H, logp; logprobs.py) -> its sequence by a binary search over
#   offsets -> the token's loss terms with the token kernel's helpers on 0-d values ->
#   g_logp, g_H -> _row_backward (d loss / d z, logprobs.py) into ``out``.
# An invalid row writes a zero gradient row and loads nothing else, so garbage in its
# logits or token inputs reaches no output. Each program writes its row of NUM_SUMS
# partial sums to an (N, NUM_SUMS) buffer, reduced by the host in a fixed order.
#
# In place (out is logits): a program only touches its own row; the forward pass has
# read the whole row (including the target logit) before the backward starts, since the
# backward's values depend on lse, logp and H, and _row_backward loads each chunk
# before storing over it.

# Launch parameters. GPU (not yet tuned on a device): the same streaming pattern as the
# log-prob kernels, so the same chunk: 8192 logits over 16 warps (logprobs.py explains
# it); the loss terms in between are a few dozen scalar operations per row.
# Interpreter: every tl op is a numpy call per program; a chunk of 64 keeps the tests'
# small vocabularies over several chunks, and tests pass block_v= to move boundaries.
LOGITS_GPU_BLOCK_V = 8192
LOGITS_INTERPRET_BLOCK_V = 64

# The temperature follows the _K_* scalars in the kernel's parameter tensor.
_K_TAU = _NUM_K
assert _K_TAU == 9  # the kernel reads it at k_ptr + 9

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _sequence_of(offs_ptr, n_seqs, row):
    """The s in [0, n_seqs) with offsets[s] <= row < offsets[s + 1]: the last s with
    offsets[s] <= row, so empty sequences (repeated offsets) are skipped."""
    lo = tl.zeros([], tl.int64)
    hi = lo + (n_seqs - 1)
    while lo < hi:  # ceil(log2(n_seqs)) loads of offsets, which stay in cache
        mid = (lo + hi + 1) // 2
        starts_here = tl.load(offs_ptr + mid) <= row
        lo = tl.where(starts_here, mid, lo)
        hi = tl.where(starts_here, hi, mid - 1)
    return lo


@triton.jit
def _logits_loss_kernel(
    z_ptr, stride_z, y_ptr, valid_ptr, olp_ptr, adv_ptr, ref_ptr, isw_ptr,
    offs_ptr, n_seqs, sw_ptr, lmw_ptr, k_ptr, part_ptr, out_ptr, stride_out, V,
    HAS_ISW: tl.constexpr, HAS_DUAL: tl.constexpr, KL_KIND: tl.constexpr,
    KL_STRAIGHT: tl.constexpr, HAS_LM: tl.constexpr, HAS_GH: tl.constexpr,
    NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 before multiplying by the row stride
    # A valid row whose target is -100 counts as invalid: the contract excludes it, and
    # its logit load would fall outside the row.
    y, keep = _keep_row(y_ptr, valid_ptr, row, True)
    zero = tl.full([], 0.0, ACC)
    one = tl.full([], 1.0, ACC)
    s_pg = zero
    s_kl = zero
    s_ent = zero
    s_lm = zero
    s_tokens = zero
    s_clip_low = zero
    s_clip_high = zero
    s_dual = zero
    s_nlr = zero
    s_k3 = zero
    s_ratio = zero
    r_min = zero + float("inf")
    r_max = zero - float("inf")
    if keep:
        z_row = z_ptr + row * stride_z
        inv_tau = 1.0 / tl.load(k_ptr + 9)
        lse, ent, lp = _row_forward(z_row, y, V, inv_tau, BLOCK_V, ACC)
        seq = _sequence_of(offs_ptr, n_seqs, row)
        w = tl.load(sw_ptr + seq)
        s_tokens = one

        # k_ptr: lo, hi, dual, clamp, (value eps, vf), kl, ent, lm coefs, tau.
        pg, g_lp, f_low, f_high, f_dual, log_ratio, ratio = _policy(
            lp, tl.load(olp_ptr + row), tl.load(adv_ptr + row), tl.load(k_ptr + 0),
            tl.load(k_ptr + 1), tl.load(k_ptr + 2), tl.load(k_ptr + 3), HAS_DUAL,
        )
        if HAS_ISW:
            isw = tl.load(isw_ptr + row)
            pg = pg * isw
            g_lp = g_lp * isw
        s_pg = w * pg
        g_lp = w * g_lp
        s_clip_low = tl.where(f_low, one, zero)
        s_clip_high = tl.where(f_high, one, zero)
        s_dual = tl.where(f_dual, one, zero)
        s_nlr = -log_ratio
        s_k3 = _expm1_minus_x(log_ratio, ratio)
        s_ratio = ratio
        r_min = ratio
        r_max = ratio

        if KL_KIND > 0:
            kl, g_kl = _kl(lp, tl.load(ref_ptr + row), KL_KIND, KL_STRAIGHT)
            s_kl = w * kl
            g_lp = g_lp + tl.load(k_ptr + 6) * w * g_kl

        s_ent = w * ent
        g_h = -tl.load(k_ptr + 7) * w

        if HAS_LM:
            w_lm = tl.load(lmw_ptr + seq)
            s_lm = -(w_lm * lp)
            g_lp = g_lp - tl.load(k_ptr + 8) * w_lm

        if NEED_GRAD:
            _row_backward(
                z_row, out_ptr + row * stride_out, y, V, inv_tau, lse, ent, g_lp, g_h,
                HAS_GH, BLOCK_V, ACC,
            )
    else:
        if NEED_GRAD:
            _row_zero(out_ptr + row * stride_out, V, BLOCK_V)

    part = part_ptr + row * 15
    tl.store(part + 0, s_pg)
    tl.store(part + 1, zero)  # no value term from logits
    tl.store(part + 2, s_kl)
    tl.store(part + 3, s_ent)
    tl.store(part + 4, s_lm)
    tl.store(part + 5, s_tokens)
    tl.store(part + 6, s_clip_low)
    tl.store(part + 7, s_clip_high)
    tl.store(part + 8, s_dual)
    tl.store(part + 9, s_nlr)
    tl.store(part + 10, s_k3)
    tl.store(part + 11, s_ratio)
    tl.store(part + 12, r_min)
    tl.store(part + 13, r_max)
    tl.store(part + 14, zero)


def _check_tensor(name, t, shape, dtype, device, optional=False):
    if t is None:
        if optional:
            return None
        raise ValueError(f"{name} is required, got None")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, logits on {device}")
    return t.contiguous()


def _check_rows_layout(name, t):
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous along the vocabulary (last) dimension")


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses a tensor's elements span."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + (last + 1) * t.element_size()


def logits_loss(
    logits, targets, old_logp, advantages, ref_logp, is_weights, valid, offsets,
    seq_weight, lm_weight, params, temperature, out, *, block_v: int | None = None,
):
    """The kernel contract of :func:`vapo_kernels.ops.loss.reference_logits_kernel`.

    Returns ``sums`` (NUM_SUMS,) in the accumulation dtype (float32; float64 for float64
    logits) and, when ``out`` is given, writes d loss / d logits there (``out`` may be
    ``logits``). ``block_v`` (a power of two) overrides the vocabulary chunk width;
    tests use it to put chunk boundaries inside small vocabularies.

    Shapes, dtypes and devices are checked here (ValueError); values are not, since
    that would wait for the device: targets of valid rows must lie in [0, V) (the op
    checks them), and the offsets must be non-decreasing from 0 to N.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a (N, V) tensor, got {shape}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    n, vocab = logits.shape
    if vocab < 1:
        raise ValueError("logits must have a vocabulary of at least 1 entry, got V = 0")
    _check_rows_layout("logits", logits)
    device = logits.device
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32

    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or (
        targets.dtype in (torch.bool, torch.complex64, torch.complex128)
    ):
        raise ValueError(f"targets must be an integer tensor, got {getattr(targets, 'dtype', targets)}")
    targets = _check_tensor("targets", targets, (n,), None, device).to(torch.int64)
    old_logp = _check_tensor("old_logp", old_logp, (n,), acc, device)
    advantages = _check_tensor("advantages", advantages, (n,), acc, device)
    ref_logp = _check_tensor("ref_logp", ref_logp, (n,), acc, device, optional=True)
    is_weights = _check_tensor("is_weights", is_weights, (n,), acc, device, optional=True)
    valid = _check_tensor("valid", valid, (n,), torch.bool, device)
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError("offsets must be a 1-D tensor of S + 1 >= 1 entries")
    n_seqs = offsets.numel() - 1
    offsets = _check_tensor("offsets", offsets, (n_seqs + 1,), torch.int64, device)
    if n > 0 and n_seqs == 0:
        raise ValueError(f"offsets has no sequence for the {n} rows")
    seq_weight = _check_tensor("seq_weight", seq_weight, (n_seqs,), acc, device)
    lm_weight = _check_tensor("lm_weight", lm_weight, (n_seqs,), acc, device, optional=True)

    try:
        params = [float(p) for p in params]
    except (TypeError, ValueError):
        raise ValueError(f"params must be {NUM_PARAMS} floats") from None
    if len(params) != NUM_PARAMS:
        raise ValueError(f"params must have {NUM_PARAMS} entries, got {len(params)}")
    kl_kind = 0
    if ref_logp is not None:
        if params[P_KL_KIND] not in (0.0, 1.0, 2.0, 3.0, 4.0):
            raise ValueError(f"params[P_KL_KIND] must be 0..4, got {params[P_KL_KIND]}")
        kl_kind = int(params[P_KL_KIND])
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (0 < temperature < math.inf)
    ):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")

    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"out must be a tensor or None, got {type(out).__name__}")
        if tuple(out.shape) != (n, vocab) or out.dtype != logits.dtype:
            raise ValueError(
                f"out must be ({n}, {vocab}) {logits.dtype} like logits, "
                f"got {tuple(out.shape)} {out.dtype}"
            )
        if out.device != device:
            raise ValueError(f"out is on {out.device}, logits on {device}")
        _check_rows_layout("out", out)
        same = out.data_ptr() == logits.data_ptr() and out.stride() == logits.stride()
        if not same and n > 0:
            (a0, a1), (b0, b1) = _extent(out), _extent(logits)
            if a0 < b1 and b0 < a1:
                raise ValueError("out must be logits itself or not overlap it")

    if n == 0:  # a 0-program grid is invalid
        sums = torch.zeros(NUM_SUMS, dtype=acc, device=device)
        sums[S_RATIO_MIN], sums[S_RATIO_MAX] = math.inf, -math.inf
        return sums

    block, num_warps = _lp._launch_params(
        vocab, block_v, gpu_block_v=LOGITS_GPU_BLOCK_V,
        interpret_block_v=LOGITS_INTERPRET_BLOCK_V,
    )
    # Temperature in the parameter tensor, in the accumulation dtype: a Python float
    # kernel argument would be passed as fp32 and round tau for fp64 logits.
    k_t = _scalar_params(params, acc, device, extra=(temperature,))
    part = torch.empty((n, NUM_SUMS), dtype=acc, device=device)
    need_grad = out is not None
    _logits_loss_kernel[(n,)](
        logits, logits.stride(0), targets, valid, old_logp, advantages,
        old_logp if ref_logp is None else ref_logp,  # never read where their flag is off
        old_logp if is_weights is None else is_weights,
        offsets, n_seqs, seq_weight, seq_weight if lm_weight is None else lm_weight, k_t,
        part, out if need_grad else logits, out.stride(0) if need_grad else 0, vocab,
        HAS_ISW=is_weights is not None, HAS_DUAL=params[P_DUAL_CLIP] > 0,
        KL_KIND=kl_kind, KL_STRAIGHT=bool(params[P_KL_STRAIGHT]), HAS_LM=lm_weight is not None,
        HAS_GH=params[P_ENTROPY_COEF] != 0, NEED_GRAD=need_grad, BLOCK_V=block,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, num_warps=num_warps,
    )
    # Deterministic: torch's reductions over the per-row partials, in a fixed order.
    sums = part.sum(0, dtype=torch.float64).to(acc)
    sums[S_RATIO_MIN] = part[:, S_RATIO_MIN].min()
    sums[S_RATIO_MAX] = part[:, S_RATIO_MAX].max()
    return sums


# The row layout the kernel writes must be the contract's.
assert (S_PG, S_VF, S_KL, S_ENTROPY, S_LM, S_TOKENS, S_CLIP_LOW, S_CLIP_HIGH, S_DUAL_CLIP,
        S_NEG_LOG_RATIO, S_K3, S_RATIO_SUM, S_RATIO_MIN, S_RATIO_MAX, S_VF_CLIP) == tuple(range(15))
