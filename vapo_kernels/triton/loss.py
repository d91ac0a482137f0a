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
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..ops.loss import (
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
# Per-token terms (the reference's formulas, torch's tie and clamp-gradient rules)


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

    # Derived scalars in float64, rounded once to the compute dtype.
    k = [0.0] * _NUM_K
    k[_K_LO], k[_K_HI] = 1.0 - params[P_CLIP_LOW], 1.0 + params[P_CLIP_HIGH]
    k[_K_DUAL], k[_K_CLAMP] = params[P_DUAL_CLIP], params[P_RATIO_CLAMP]
    k[_K_VEPS], k[_K_VF], k[_K_KL] = params[P_VALUE_CLIP], params[P_VF_COEF], params[P_KL_COEF]
    k[_K_ENT], k[_K_LM] = params[P_ENTROPY_COEF], params[P_LM_COEF]
    k_t = torch.tensor(k, dtype=torch.float64).to(out_dtype)
    if device.type == "cuda":  # pinned + non_blocking: no wait on the stream
        k_t = k_t.pin_memory().to(device, non_blocking=True)

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


# The row layout the kernel writes must be the contract's.
assert (S_PG, S_VF, S_KL, S_ENTROPY, S_LM, S_TOKENS, S_CLIP_LOW, S_CLIP_HIGH, S_DUAL_CLIP,
        S_NEG_LOG_RATIO, S_K3, S_RATIO_SUM, S_RATIO_MIN, S_RATIO_MAX, S_VF_CLIP) == tuple(range(15))
