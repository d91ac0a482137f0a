r"""The fused PPO / VAPO token loss in Triton: the ``triton`` backend of ``vapo::token_loss``.

Implements the kernel contract of :func:`vapo_kernels.ops.loss_spec.reference_kernel` (the
formulas are in the docstring of :mod:`vapo_kernels.ops.loss_spec`; the per-token values,
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

Rollout correction (``params[P_ROLLOUT_IS] > 0``; ``is_weights`` then holds the rollout
log-probs): the policy branch turns them into the weights it multiplies by and sums
their metrics. The sequence levels need each sequence's sum of log-ratios before any of
its tokens' weights, and a sequence spans blocks: a small first launch
(``_rollout_sequence_kernel``, one program per sequence walking its tokens in chunks,
reading old_logp and rollout_logp only) writes one weight per sequence, which the
main kernel gathers like the aggregation weights. Token level, and the correction off,
are one launch as before; the correction is selected by a constexpr (``HAS_ISW``), so
with it off the kernels compile to the code they were before.

Masked slots only reach the arithmetic through ``tl.where`` (they are replaced by 0
right after the load, as the reference does), and every sum and gradient selects with
the mask instead of multiplying by it, so NaN or 1e30 stored there changes no output
bit. Compute is in float32 (float64 for float64 inputs); the scalar parameters are
passed as a small tensor in that dtype, since a Python float kernel argument would be
float32 and round them for float64 inputs.

The second kernel, ``_logits_loss_kernel``, is the ``triton`` backend of
``vapo::logits_loss`` (contract: :func:`vapo_kernels.ops.logits_loss.reference_logits_kernel`):
logits -> loss sums and d loss / d logits in one launch, see :func:`logits_loss`.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

# The params / sums slots, by name (L.S_PG, ...; Triton reads a module's integer
# attributes as compile-time constants). A leaf: kernels never import the op layer.
from .. import _device_cache
from .. import _loss_layout as L
from . import logprobs as _lp
from .gae import _seq_bounds
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

# Slots of the scalar parameter tensor both kernels read (derived on the host in float64
# from params, then rounded once to the compute dtype, as torch does with a Python
# scalar). constexpr, so that the kernels can index it by these names.
_K_LO = tl.constexpr(0)  # 1 - eps_low
_K_HI = tl.constexpr(1)  # 1 + eps_high
_K_DUAL = tl.constexpr(2)  # dual-clip c
_K_CLAMP = tl.constexpr(3)  # log-ratio clamp C
_K_VEPS = tl.constexpr(4)  # value clip eps_v
_K_VF = tl.constexpr(5)  # vf_coef
_K_KL = tl.constexpr(6)  # kl_coef
_K_ENT = tl.constexpr(7)  # entropy_coef
_K_LM = tl.constexpr(8)  # lm_coef
_K_TAU = tl.constexpr(9)  # temperature (logits kernel only)
_K_ROLLOUT_UPPER = tl.constexpr(10)  # rollout correction: the weights' upper bound C
_K_ROLLOUT_LOWER = tl.constexpr(11)  # ... and lower bound (mask mode)
_NUM_K = 12
# Rollout log-ratios (per token, and a sequence's sum) are clamped to [-20, 20].
_ROLLOUT_BOUND = tl.constexpr(20.0)

# HAS_ISW (constexpr) of both kernels says what the is_weights slot holds: 0 (False)
# nothing, 1 (True) the weights, and from 2 on the rollout log-probs the weights are
# computed from: 2 * level + mask (token 2 / 3, sequence 4 / 5, geometric 6 / 7). One
# code rather than two more flags keeps the kernels' constexpr names as they were (the
# compile checks for sm_90 list them).


def _isw_code(has_isw: bool, level: int, params) -> int:
    """HAS_ISW for a call: the is_weights slot given or not, the rollout level (0: off)."""
    if not has_isw:
        return 0
    return 1 if level == 0 else 2 * level + int(bool(params[L.P_ROLLOUT_IS_MASK]))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------
# Per-token terms (the reference's formulas, torch's tie and clamp-gradient rules).
# Elementwise: the token kernel applies them to a block of tokens, the logits kernel to
# one token's 0-d values.


@triton.jit
def _min(a, b):
    """torch.minimum: a NaN operand gives NaN (tl.minimum drops it by default), so a NaN
    input of a valid token reaches the loss and the op's NaN screen."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max(a, b):
    """torch.maximum, NaN kept (see _min)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _policy(lp, olp, adv, lo, hi, dual_c, clamp, HAS_DUAL: tl.constexpr):
    """pg, d pg / d logp, clip_low, clip_high, dual flags, log_ratio, ratio."""
    raw = lp - olp
    log_ratio = _min(_max(raw, -clamp), clamp)
    ratio = tl.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * _min(_max(ratio, lo), hi)
    pg = _max(unclipped, clipped)
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
        pg = tl.where(negative, _min(pg, floor), pg)
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
            v_clipped = ov + _min(_max(step, -eps), eps)
            in_clip = (step >= -eps) & (step <= eps)
            d_clip = tl.where(in_clip, 1.0, 0.0)
        else:  # verl: max(min(v, old + eps), old - eps)
            hi = ov + eps
            lo = ov - eps
            upper = _min(v, hi)
            d_upper = tl.where(v < hi, 1.0, tl.where(v > hi, 0.0, 0.5))
            v_clipped = _max(upper, lo)
            d_clip = d_upper * tl.where(upper > lo, 1.0, tl.where(upper < lo, 0.0, 0.5))
        err_clipped = v_clipped - ret
        clipped = err_clipped * err_clipped
        g_clipped = err_clipped * d_clip
        grad = tl.where(
            unclipped > clipped, err,
            tl.where(clipped > unclipped, g_clipped, 0.5 * (err + g_clipped)),
        )
        vf = 0.5 * _max(unclipped, clipped)
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
        log_ratio = _min(_max(neg, -20.0), 20.0)
        e = tl.exp(log_ratio)
        raw = _expm1_minus_x(log_ratio, e)
        value = _min(_max(raw, -10.0), 10.0)
        passes = (neg >= -20.0) & (neg <= 20.0) & (raw >= -10.0) & (raw <= 10.0)
        grad = tl.where(passes, -(raw + log_ratio), 0.0)
    if STRAIGHT:
        grad = diff
    return value, grad


@triton.jit
def _clamp_nan(x, bound):
    """clamp(x, -bound, bound) that keeps NaN (as torch.clamp; tl.minimum / tl.maximum
    may drop a NaN operand on a GPU)."""
    return tl.where(x < -bound, -bound, tl.where(x > bound, bound, x))


@triton.jit
def _rollout(olp, rlp, w_seq, upper, lower, SEQ: tl.constexpr, MASK: tl.constexpr):
    """The rollout correction of a token: (applied weight, raw weight, truncated or
    rejected, clamped log-ratio e, exp(e)). ``w_seq``: the sequence's raw weight (SEQ).
    The comparisons keep a NaN weight (neither truncated nor rejected): it reaches the
    loss."""
    e = _clamp_nan(olp - rlp, _ROLLOUT_BOUND)
    ee = tl.exp(e)
    if SEQ:
        raw = w_seq
    else:
        raw = ee
    if MASK:
        out = (raw < lower) | (raw > upper)
        w = tl.where(out, 0.0, raw)
    else:
        out = raw > upper
        w = tl.where(out, upper, raw)
    return w, raw, out, e, ee


@triton.jit
def _rollout_sequence_kernel(
    olp_ptr, rlp_ptr, m_ptr, offs_ptr, N, w_ptr,
    GEOMETRIC: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """The raw weight exp(u_s) of sequence s = program: u = clamp(sum e, -20, 20), or
    (GEOMETRIC) sum e / count, over its valid tokens, e = clamp(old_logp - rollout_logp,
    -20, 20)."""
    s = tl.program_id(0).to(tl.int64)
    start, end = _seq_bounds(offs_ptr, s, N)
    lane = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], ACC)
    count = tl.zeros([BLOCK], ACC)
    n_chunks = tl.cdiv(end - start, BLOCK)
    for i in range(n_chunks):
        idx = start + i * BLOCK + lane
        inb = idx < end
        if HAS_MASK:
            valid = inb & (tl.load(m_ptr + idx, mask=inb, other=0) != 0)
        else:
            valid = inb
        olp = tl.load(olp_ptr + idx, mask=inb, other=0.0).to(ACC)
        rlp = tl.load(rlp_ptr + idx, mask=inb, other=0.0).to(ACC)
        total += tl.where(valid, _clamp_nan(olp - rlp, _ROLLOUT_BOUND), 0.0)
        count += tl.where(valid, 1.0, 0.0)
    t = tl.sum(total, axis=0)
    if GEOMETRIC:
        u = t / tl.maximum(tl.sum(count, axis=0), 1.0)
    else:
        u = _clamp_nan(t, _ROLLOUT_BOUND)
    tl.store(w_ptr + s, tl.exp(u))


@triton.jit
def _store_sums(
    part_ptr, prog, pg, vf, kl, entropy, lm, tokens, clip_low, clip_high, dual_clip,
    neg_log_ratio, k3, ratio_sum, ratio_min, ratio_max, vf_clip, returns, returns_sq,
    value_err, value_err_sq, rollout_raw, rollout_weight, rollout_min, rollout_max, rollout_out,
    rollout_kl, rollout_k3,
):
    """Row ``prog`` (int64) of the (programs, NUM_SUMS) partial sums: every slot, by its
    _loss_layout name. Both kernels write their row here, so a slot cannot be missed
    (the buffer is torch.empty) or put at a stale offset."""
    row = part_ptr + prog * L.NUM_SUMS
    tl.store(row + L.S_PG, pg)
    tl.store(row + L.S_VF, vf)
    tl.store(row + L.S_KL, kl)
    tl.store(row + L.S_ENTROPY, entropy)
    tl.store(row + L.S_LM, lm)
    tl.store(row + L.S_TOKENS, tokens)
    tl.store(row + L.S_CLIP_LOW, clip_low)
    tl.store(row + L.S_CLIP_HIGH, clip_high)
    tl.store(row + L.S_DUAL_CLIP, dual_clip)
    tl.store(row + L.S_NEG_LOG_RATIO, neg_log_ratio)
    tl.store(row + L.S_K3, k3)
    tl.store(row + L.S_RATIO_SUM, ratio_sum)
    tl.store(row + L.S_RATIO_MIN, ratio_min)
    tl.store(row + L.S_RATIO_MAX, ratio_max)
    tl.store(row + L.S_VF_CLIP, vf_clip)
    tl.store(row + L.S_RETURNS, returns)
    tl.store(row + L.S_RETURNS_SQ, returns_sq)
    tl.store(row + L.S_VALUE_ERR, value_err)
    tl.store(row + L.S_VALUE_ERR_SQ, value_err_sq)
    tl.store(row + L.S_ROLLOUT_IS_RAW, rollout_raw)
    tl.store(row + L.S_ROLLOUT_IS_WEIGHT, rollout_weight)
    tl.store(row + L.S_ROLLOUT_IS_MIN, rollout_min)
    tl.store(row + L.S_ROLLOUT_IS_MAX, rollout_max)
    tl.store(row + L.S_ROLLOUT_IS_OUT, rollout_out)
    tl.store(row + L.S_ROLLOUT_KL, rollout_kl)
    tl.store(row + L.S_ROLLOUT_K3, rollout_k3)


# One argument per slot: a slot added to _loss_layout must be added to _store_sums too.
assert len(_store_sums.arg_names) == 2 + L.NUM_SUMS


# --------------------------------------------------------------------------------------
# The kernel


@triton.jit
def _token_loss_kernel(
    lp_ptr, olp_ptr, adv_ptr, v_ptr, ov_ptr, ret_ptr, ref_ptr, ent_ptr, isw_ptr, m_ptr,
    offs_ptr, span_ptr, sw_ptr, lmw_ptr, rsw_ptr, k_ptr,
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
    s_ret = def_zero
    s_ret_sq = def_zero
    s_err = def_zero
    s_err_sq = def_zero
    s_roll_raw = def_zero
    s_roll_w = def_zero
    s_roll_out = def_zero
    s_roll_kl = def_zero
    s_roll_k3 = def_zero
    roll_min = def_zero  # 0 when the correction is off, as the contract says
    roll_max = def_zero
    s_tokens = tl.sum(tl.where(valid, 1.0, zero), axis=0)

    g_lp = zero
    if HAS_LOGP:
        lp = tl.where(valid, tl.load(lp_ptr + idx, mask=inb, other=0.0).to(ACC), zero)

    # k_ptr holds the _K_* scalars (_scalar_params).
    if HAS_POLICY:
        olp = tl.where(valid, tl.load(olp_ptr + idx, mask=inb, other=0.0).to(ACC), zero)
        adv = tl.where(valid, tl.load(adv_ptr + idx, mask=inb, other=0.0).to(ACC), zero)
        k_lo = tl.load(k_ptr + _K_LO)
        k_hi = tl.load(k_ptr + _K_HI)
        k_dual = tl.load(k_ptr + _K_DUAL)
        k_clamp = tl.load(k_ptr + _K_CLAMP)
        pg, grad, f_low, f_high, f_dual, log_ratio, ratio = _policy(
            lp, olp, adv, k_lo, k_hi, k_dual, k_clamp, HAS_DUAL
        )
        if HAS_ISW:
            isw = tl.where(valid, tl.load(isw_ptr + idx, mask=inb, other=0.0).to(ACC), zero)
            if HAS_ISW >= 2:  # isw holds the rollout log-probs: the weights from them
                if HAS_ISW >= 4:  # a sequence level: the sequence's weight
                    w_seq = tl.load(rsw_ptr + seq, mask=inb, other=0.0).to(ACC)
                else:
                    w_seq = zero
                rw, raw, out, e, ee = _rollout(
                    olp, isw, w_seq, tl.load(k_ptr + _K_ROLLOUT_UPPER),
                    tl.load(k_ptr + _K_ROLLOUT_LOWER), HAS_ISW >= 4, HAS_ISW % 2 == 1,
                )
                isw = tl.where(valid, rw, zero)
                s_roll_raw = tl.sum(tl.where(valid, raw, zero), axis=0)
                s_roll_w = tl.sum(isw, axis=0)
                s_roll_out = tl.sum(tl.where(valid & out, 1.0, zero), axis=0)
                s_roll_kl = tl.sum(tl.where(valid, -e, zero), axis=0)
                s_roll_k3 = tl.sum(tl.where(valid, _expm1_minus_x(e, ee), zero), axis=0)
                roll_min = tl.min(tl.where(valid, raw, float("inf")), axis=0)
                roll_max = tl.max(tl.where(valid, raw, -float("inf")), axis=0)
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
        vf, g_vf, won = _value(v, ov, ret, tl.load(k_ptr + _K_VEPS), VALUE_MODE)
        s_vf = tl.sum(tl.where(valid, w * vf, zero), axis=0)
        s_vf_clip = tl.sum(tl.where(valid & won, 1.0, zero), axis=0)
        # The critic's explained variance from this pass: sums, and squared deviations
        # from this block's mean (the host merges the blocks' by Chan's rule). v and R
        # are already 0 on masked and out-of-range tokens (selected above).
        err = ret - v
        s_ret = tl.sum(ret, axis=0)
        s_err = tl.sum(err, axis=0)
        d_ret = tl.where(valid, ret - s_ret / tl.maximum(s_tokens, 1.0), zero)
        d_err = tl.where(valid, err - s_err / tl.maximum(s_tokens, 1.0), zero)
        s_ret_sq = tl.sum(d_ret * d_ret, axis=0)
        s_err_sq = tl.sum(d_err * d_err, axis=0)
        if NEED_GRAD:
            g_v = tl.where(valid, tl.load(k_ptr + _K_VF) * w * g_vf, zero)
            tl.store(g_v_ptr + idx, g_v, mask=inb)

    if KL_KIND > 0:
        ref = tl.where(valid, tl.load(ref_ptr + idx, mask=inb, other=0.0).to(ACC), zero)
        kl, g_kl = _kl(lp, ref, KL_KIND, KL_STRAIGHT)
        s_kl = tl.sum(tl.where(valid, w * kl, zero), axis=0)
        g_lp = g_lp + tl.where(valid, tl.load(k_ptr + _K_KL) * w * g_kl, zero)

    if HAS_ENTROPY:
        ent = tl.where(valid, tl.load(ent_ptr + idx, mask=inb, other=0.0).to(ACC), zero)
        s_ent = tl.sum(tl.where(valid, w * ent, zero), axis=0)
        if NEED_GRAD:
            g_ent = tl.where(valid, -tl.load(k_ptr + _K_ENT) * w, zero)
            tl.store(g_ent_ptr + idx, g_ent, mask=inb)

    if HAS_LM:
        w_lm = tl.where(valid, tl.load(lmw_ptr + seq, mask=inb, other=0.0).to(ACC), zero)
        s_lm = -tl.sum(tl.where(valid, w_lm * lp, zero), axis=0)
        g_lp = g_lp - tl.where(valid, tl.load(k_ptr + _K_LM) * w_lm, zero)

    if HAS_LOGP and NEED_GRAD:
        tl.store(g_lp_ptr + idx, g_lp, mask=inb)

    _store_sums(
        part_ptr, pid.to(tl.int64), s_pg, s_vf, s_kl, s_ent, s_lm, s_tokens, s_clip_low,
        s_clip_high, s_dual, s_nlr, s_k3, s_ratio, r_min, r_max, s_vf_clip, s_ret, s_ret_sq,
        s_err, s_err_sq, s_roll_raw, s_roll_w, roll_min, roll_max, s_roll_out, s_roll_kl,
        s_roll_k3,
    )


# --------------------------------------------------------------------------------------
# Host side


def _scalar_params(params, dtype, device, temperature=1.0) -> torch.Tensor:
    """The _K_* scalars: derived in float64, rounded once to ``dtype``, cached per options,
    dtype and device (kernels only read them): no host-to-device copy per call."""
    return _device_cache.values(_scalar_values(tuple(params), float(temperature)), dtype,
                                torch.device(device))


@functools.lru_cache(maxsize=256)
def _scalar_values(params: tuple, temperature: float) -> tuple:
    k = [0.0] * _NUM_K
    k[_K_LO], k[_K_HI] = 1.0 - params[L.P_CLIP_LOW], 1.0 + params[L.P_CLIP_HIGH]
    k[_K_DUAL], k[_K_CLAMP] = params[L.P_DUAL_CLIP], params[L.P_RATIO_CLAMP]
    k[_K_VEPS], k[_K_VF] = params[L.P_VALUE_CLIP], params[L.P_VF_COEF]
    k[_K_KL], k[_K_ENT] = params[L.P_KL_COEF], params[L.P_ENTROPY_COEF]
    k[_K_LM], k[_K_TAU] = params[L.P_LM_COEF], temperature
    k[_K_ROLLOUT_UPPER] = params[L.P_ROLLOUT_IS_UPPER]
    k[_K_ROLLOUT_LOWER] = params[L.P_ROLLOUT_IS_LOWER]
    return tuple(k)


def _empty_sums(dtype, device, rollout: int) -> torch.Tensor:
    """The sums of a call without tokens: 0, with +inf / -inf in the min / max slots.
    Slices, not integer indices: ``t[i] = x`` copies from a host scalar (a device sync on
    CUDA, refused in a CUDA graph), ``t[i:i + 1].fill_(x)`` launches a fill."""
    sums = torch.zeros(L.NUM_SUMS, dtype=dtype, device=device)
    slots = [(L.S_RATIO_MIN, math.inf), (L.S_RATIO_MAX, -math.inf)]
    if rollout:
        slots += [(L.S_ROLLOUT_IS_MIN, math.inf), (L.S_ROLLOUT_IS_MAX, -math.inf)]
    for slot, value in slots:
        sums[slot : slot + 1].fill_(value)
    return sums


def _seq_weight(seq_weight, valid, n: int, num_seqs: int, dtype, device) -> torch.Tensor:
    """The (S,) weights a kernel reads: ``seq_weight`` in ``dtype``, or, when it is None,
    the token mean - 1 / max(1, valid tokens), in float64 and rounded once (the
    reference's bits), counted on the device: no sync. ``valid``: bool or None."""
    if seq_weight is None:
        count = float(max(n, 1)) if valid is None else valid.sum(dtype=torch.float64).clamp_(min=1)
        seq_weight = torch.ones(num_seqs, dtype=torch.float64, device=device) / count
    return seq_weight.to(dtype).contiguous()


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1).contiguous()


# The token inputs of the kernel contract, in order, for errors.
_TOKEN_NAMES = ("logp", "old_logp", "advantages", "values", "old_values", "returns",
                "ref_logp", "entropy", "is_weights")


def _check_params(params) -> list[float]:
    try:
        params = [float(p) for p in params]
    except (TypeError, ValueError):
        raise ValueError(f"params must be {L.NUM_PARAMS} floats") from None
    if len(params) != L.NUM_PARAMS:
        raise ValueError(f"params must have {L.NUM_PARAMS} entries, got {len(params)}")
    return params


def _check_token_inputs(tokens, mask, offsets, seq_weight, lm_weight) -> None:
    """token_loss's tensors: token tensors of one shape (N elements), float dtype and device,
    a mask of that shape, (S + 1,) integer offsets, (S,) float weights."""
    first_name, first = None, None
    for name, t in zip(_TOKEN_NAMES, tokens):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor or None, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if first is None:
            first_name, first = name, t
            continue
        if t.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype} "
                             "(token tensors share one dtype)")
        if t.shape != first.shape:
            raise ValueError(f"{name} must have shape {tuple(first.shape)} like {first_name}, "
                             f"got {tuple(t.shape)}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device}, {first_name} on {first.device}")
    n, device = first.numel(), first.device
    if mask is not None:
        _check_tensor("mask", mask, tuple(first.shape), torch.bool, device, like=first_name)
    if (not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.numel() < 1
            or offsets.dtype not in (torch.int32, torch.int64)):
        raise ValueError("offsets must be a 1-D int32 / int64 tensor of S + 1 >= 1 entries")
    n_seqs = offsets.numel() - 1
    _check_tensor("offsets", offsets, (n_seqs + 1,), None, device, like=first_name)
    if n > 0 and n_seqs == 0:
        raise ValueError(f"offsets has no sequence for the {n} tokens")
    for name, w in (("seq_weight", seq_weight), ("lm_weight", lm_weight)):
        w = _check_tensor(name, w, (n_seqs,), None, device, optional=True, like=first_name)
        if w is not None and not w.dtype.is_floating_point:
            raise ValueError(f"{name} must be a float tensor, got {w.dtype}")


def _rollout_level(params) -> int:
    level = params[L.P_ROLLOUT_IS]
    if level not in (0.0, 1.0, 2.0, 3.0):
        raise ValueError(f"params[P_ROLLOUT_IS] must be 0..3, got {level}")
    return int(level)


def _sequence_weights(level, old_logp, rollout_logp, mask, offsets, dtype, interpreting):
    """(S,) raw weights of the sequence levels in the compute ``dtype`` (a launch of
    _rollout_sequence_kernel), or None at token level. ``mask``: flat bool or None."""
    if level < 2:
        return None
    n_seqs = offsets.numel() - 1
    w = torch.empty(n_seqs, dtype=dtype, device=old_logp.device)
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    if n_seqs:
        block = INTERPRET_BLOCK if interpreting else GPU_BLOCK
        _rollout_sequence_kernel[(n_seqs,)](
            old_logp, rollout_logp, old_logp if mask is None else mask, offsets,
            old_logp.numel(), w,
            GEOMETRIC=level == 3, HAS_MASK=mask is not None, BLOCK=block, ACC=acc,
            num_warps=max(1, min(GPU_NUM_WARPS, block // 128)),
        )
    return w


def token_loss(
    logp, old_logp, advantages, values, old_values, returns, ref_logp, entropy, is_weights,
    mask, offsets, seq_weight, lm_weight, params, need_grad, *, block: int | None = None,
):
    """The kernel contract of :func:`vapo_kernels.ops.loss_spec.reference_kernel`.

    ``block`` (tokens per program, a power of two) overrides the launch plan; tests use
    a small one to put block boundaries inside and across sequences. Shapes, dtypes and
    devices are checked here (ValueError naming the argument: a length mismatch would
    read out of bounds); values are not, since that would wait for the device: the
    offsets must be non-decreasing from 0 to N (the op checks them).
    """
    present = [t for t in (logp, values, entropy) if t is not None]
    if not present:
        raise ValueError("token_loss needs at least one of logp, values or entropy")
    params = _check_params(params)
    _check_token_inputs(
        (logp, old_logp, advantages, values, old_values, returns, ref_logp, entropy, is_weights),
        mask, offsets, seq_weight, lm_weight,
    )
    out_dtype = torch.float64 if present[0].dtype == torch.float64 else torch.float32
    device = present[0].device
    n = present[0].numel()
    rollout = _rollout_level(params)

    has_policy = advantages is not None
    if has_policy and (logp is None or old_logp is None):
        raise ValueError("the policy term needs logp, old_logp and advantages")
    value_mode = _V_NONE
    if returns is not None:
        if values is None:
            raise ValueError("the value term needs values and returns")
        if params[L.P_VALUE_CLIP] < 0:
            value_mode = _V_UNCLIPPED
        else:
            if old_values is None:
                raise ValueError("a clipped value term needs old_values")
            value_mode = _V_OPENRLHF if params[L.P_VALUE_CLIP_OPENRLHF] else _V_VERL
    kl_kind = int(params[L.P_KL_KIND]) if ref_logp is not None else 0
    if kl_kind not in (0, 1, 2, 3, 4):
        raise ValueError(f"params[P_KL_KIND] must be 0..4, got {params[L.P_KL_KIND]}")
    if kl_kind and logp is None:
        raise ValueError("the KL term needs logp")
    has_lm = lm_weight is not None
    if has_lm and logp is None:
        raise ValueError("the positive-example LM term needs logp")
    if rollout and not (has_policy and is_weights is not None):
        raise ValueError(
            "the rollout correction (params[P_ROLLOUT_IS] > 0) needs the policy term and the "
            "rollout log-probs in is_weights"
        )

    def grad_buffer(src, present_term):
        # A fresh tensor per output: the op must not return aliased tensors.
        size = present[0].shape if (need_grad and src is not None and present_term) else (0,)
        return torch.empty(size, dtype=out_dtype, device=device)

    g_logp = grad_buffer(logp, True)
    g_values = grad_buffer(values, value_mode != _V_NONE)
    g_entropy = grad_buffer(entropy, True)
    if n == 0:
        sums = _empty_sums(out_dtype, device, rollout)
        return L.loss_total(sums, params), sums, g_logp, g_values, g_entropy

    if block is None:
        block = INTERPRET_BLOCK if _interpreting() else GPU_BLOCK
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")

    tensors = [_flat(t) for t in (logp, old_logp, advantages, values, old_values, returns,
                                  ref_logp, entropy, is_weights)]
    dummy = next(t for t in tensors if t is not None)  # never read where its flag is off
    tensors = [dummy if t is None else t for t in tensors]
    # Shapes, dtypes and devices are checked above: only layout and width conversions.
    if mask is not None:
        mask = _flat(mask)
    offsets = offsets.to(torch.int64).contiguous()
    seq_weight = _seq_weight(seq_weight, mask, n, offsets.numel() - 1, out_dtype, device)
    lm_w = lm_weight.to(out_dtype).contiguous() if has_lm else seq_weight

    k_t = _scalar_params(params, out_dtype, device)

    # Sequences of the first and last token of every block: [first..., last...].
    n_blocks = triton.cdiv(n, block)
    block_first = torch.arange(n_blocks, dtype=torch.int64, device=device) * block
    block_last = torch.clamp(block_first + (block - 1), max=n - 1)
    span = torch.searchsorted(offsets, torch.cat([block_first, block_last]), right=True) - 1
    span = span.contiguous()

    acc = tl.float64 if out_dtype == torch.float64 else tl.float32
    rsw = _sequence_weights(rollout, tensors[1], tensors[8], mask, offsets, out_dtype,
                            _interpreting())
    part = torch.empty((n_blocks, L.NUM_SUMS), dtype=out_dtype, device=device)
    _token_loss_kernel[(n_blocks,)](
        *tensors, mask if mask is not None else dummy,
        offsets, span, seq_weight, lm_w, seq_weight if rsw is None else rsw, k_t,
        part,
        g_logp if g_logp.numel() else part,
        g_values if g_values.numel() else part,
        g_entropy if g_entropy.numel() else part,
        n, n_blocks,
        HAS_LOGP=logp is not None, HAS_POLICY=has_policy,
        HAS_ISW=_isw_code(has_policy and is_weights is not None, rollout, params),
        HAS_DUAL=has_policy and params[L.P_DUAL_CLIP] > 0, VALUE_MODE=value_mode,
        KL_KIND=kl_kind, KL_STRAIGHT=bool(params[L.P_KL_STRAIGHT]), HAS_ENTROPY=entropy is not None,
        HAS_LM=has_lm, HAS_MASK=mask is not None, NEED_GRAD=bool(need_grad),
        BLOCK=block, ACC=acc, num_warps=max(1, min(GPU_NUM_WARPS, block // 128)),
    )
    sums = _reduce_rows(part)
    return L.loss_total(sums, params), sums, g_logp, g_values, g_entropy


# The min / max slots: reduced over the per-program rows by min / max, not summed (the
# rollout ones hold 0 in every row when the correction is off).
_EXTREMES = (
    (L.S_RATIO_MIN, torch.amin), (L.S_RATIO_MAX, torch.amax),
    (L.S_ROLLOUT_IS_MIN, torch.amin), (L.S_ROLLOUT_IS_MAX, torch.amax),
)
# (sum slot, centred sum-of-squares slot): each row's squares are about its own mean.
_CENTRED = ((L.S_RETURNS, L.S_RETURNS_SQ), (L.S_VALUE_ERR, L.S_VALUE_ERR_SQ))


def _reduce_rows(part: torch.Tensor) -> torch.Tensor:
    """The sums vector from the (programs, NUM_SUMS) partial rows, deterministically (torch
    reductions in a fixed order, no atomics): sums in float64; min / max; the centred
    squares merged by Chan's rule, sum_b M2_b + sum_b n_b (mean_b - mean)^2."""
    rows = part.to(torch.float64)
    totals = rows.sum(0)
    n = rows[:, L.S_TOKENS]
    for s_slot, sq_slot in _CENTRED:
        row_mean = rows[:, s_slot] / n.clamp(min=1)
        mean = totals[s_slot] / totals[L.S_TOKENS].clamp(min=1)
        totals[sq_slot] += (n * (row_mean - mean).square()).sum()
    sums = totals.to(part.dtype)
    for slot, reduce in _EXTREMES:
        sums[slot] = reduce(part[:, slot])
    return sums


# --------------------------------------------------------------------------------------
# vapo::logits_loss: from logits to the loss sums and d loss / d logits in one kernel
#
# One program per row (token), a 1-D grid of N programs; a row's work (two streaming
# passes over V logits) dwarfs the per-program overhead, and nothing about sequences
# is on the grid. A valid row runs, in registers:
#   _row_forward (max, log_norm, H, logp; logprobs.py) -> its sequence by a search over
#   offsets -> the token's loss terms with the token kernel's helpers on 0-d values ->
#   g_logp, g_H -> _row_backward (d loss / d z, logprobs.py) into ``out``.
# An invalid row writes a zero gradient row and loads nothing else, so garbage in its
# logits or token inputs reaches no output. Each program writes its row of NUM_SUMS
# partial sums to an (N, NUM_SUMS) buffer, reduced by the host in a fixed order.
#
# In place (out is logits): a program only touches its own row; the forward pass has
# read the whole row (including the target logit) before the backward starts, since the
# backward's values depend on (max, log_norm), logp and H, and _row_backward loads each
# chunk before storing over it.

# Launch parameters. GPU (not yet tuned on a device): the same streaming pattern as the
# log-prob kernels, so the same chunk: 8192 logits over 16 warps (logprobs.py explains
# it); the loss terms in between are a few dozen scalar operations per row.
# Interpreter: every tl op is a numpy call per program; a chunk of 64 keeps the tests'
# small vocabularies over several chunks, and tests pass block_v= to move boundaries.
LOGITS_GPU_BLOCK_V = 8192
LOGITS_INTERPRET_BLOCK_V = 64

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
    offs_ptr, n_seqs, sw_ptr, lmw_ptr, rsw_ptr, k_ptr, part_ptr, out_ptr, stride_out, V,
    HAS_ISW: tl.constexpr, HAS_DUAL: tl.constexpr, KL_KIND: tl.constexpr,
    KL_STRAIGHT: tl.constexpr, HAS_LM: tl.constexpr, HAS_GH: tl.constexpr,
    NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 before multiplying by the row stride
    # A valid row whose target is -100 counts as invalid: the contract excludes it, and
    # its logit load would fall outside the row.
    y, keep = _keep_row(y_ptr, valid_ptr, row, V, True)
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
    s_roll_raw = zero
    s_roll_w = zero
    s_roll_out = zero
    s_roll_kl = zero
    s_roll_k3 = zero
    if HAS_ISW >= 2:  # min / max identities; 0 when the correction is off
        roll_min = zero + float("inf")
        roll_max = zero - float("inf")
    else:
        roll_min = zero
        roll_max = zero
    if keep:
        z_row = z_ptr + row * stride_z
        inv_tau = 1.0 / tl.load(k_ptr + _K_TAU)
        z_max, log_norm, ent, lp = _row_forward(z_row, y, V, inv_tau, BLOCK_V, ACC)
        seq = _sequence_of(offs_ptr, n_seqs, row)
        w = tl.load(sw_ptr + seq)
        s_tokens = one

        # k_ptr holds the _K_* scalars (_scalar_params); no value term here.
        olp = tl.load(olp_ptr + row)
        pg, g_lp, f_low, f_high, f_dual, log_ratio, ratio = _policy(
            lp, olp, tl.load(adv_ptr + row), tl.load(k_ptr + _K_LO),
            tl.load(k_ptr + _K_HI), tl.load(k_ptr + _K_DUAL), tl.load(k_ptr + _K_CLAMP),
            HAS_DUAL,
        )
        if HAS_ISW:
            isw = tl.load(isw_ptr + row)
            if HAS_ISW >= 2:  # isw holds the rollout log-prob: the weight from it
                if HAS_ISW >= 4:  # a sequence level: the sequence's weight
                    w_seq = tl.load(rsw_ptr + seq)
                else:
                    w_seq = zero
                isw, raw, out, e, ee = _rollout(
                    olp, isw, w_seq, tl.load(k_ptr + _K_ROLLOUT_UPPER),
                    tl.load(k_ptr + _K_ROLLOUT_LOWER), HAS_ISW >= 4, HAS_ISW % 2 == 1,
                )
                s_roll_raw = raw
                s_roll_w = isw
                s_roll_out = tl.where(out, one, zero)
                s_roll_kl = -e
                s_roll_k3 = _expm1_minus_x(e, ee)
                roll_min = raw
                roll_max = raw
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
            g_lp = g_lp + tl.load(k_ptr + _K_KL) * w * g_kl

        s_ent = w * ent
        g_h = -tl.load(k_ptr + _K_ENT) * w

        if HAS_LM:
            w_lm = tl.load(lmw_ptr + seq)
            s_lm = -(w_lm * lp)
            g_lp = g_lp - tl.load(k_ptr + _K_LM) * w_lm

        if NEED_GRAD:
            _row_backward(
                z_row, out_ptr + row * stride_out, y, V, inv_tau, z_max, log_norm, ent,
                g_lp, g_h, HAS_GH, BLOCK_V, ACC,
            )
    else:
        if NEED_GRAD:
            _row_zero(out_ptr + row * stride_out, V, BLOCK_V)

    # No value term from logits: its sums (vf, vf_clip, returns, value error) are 0.
    _store_sums(
        part_ptr, row, s_pg, zero, s_kl, s_ent, s_lm, s_tokens, s_clip_low, s_clip_high,
        s_dual, s_nlr, s_k3, s_ratio, r_min, r_max, zero, zero, zero, zero, zero,
        s_roll_raw, s_roll_w, roll_min, roll_max, s_roll_out, s_roll_kl, s_roll_k3,
    )


def _check_tensor(name, t, shape, dtype, device, optional=False, like="logits"):
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
        raise ValueError(f"{name} is on {t.device}, {like} on {device}")
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
    """The kernel contract of :func:`vapo_kernels.ops.logits_loss.reference_logits_kernel`.

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
    seq_weight = _check_tensor("seq_weight", seq_weight, (n_seqs,), acc, device, optional=True)
    seq_weight = _seq_weight(seq_weight, valid, n, n_seqs, acc, device)
    lm_weight = _check_tensor("lm_weight", lm_weight, (n_seqs,), acc, device, optional=True)

    params = _check_params(params)
    rollout = _rollout_level(params)
    if rollout and is_weights is None:
        raise ValueError(
            "the rollout correction (params[P_ROLLOUT_IS] > 0) needs the rollout log-probs "
            "in is_weights"
        )
    kl_kind = 0
    if ref_logp is not None:
        if params[L.P_KL_KIND] not in (0.0, 1.0, 2.0, 3.0, 4.0):
            raise ValueError(f"params[P_KL_KIND] must be 0..4, got {params[L.P_KL_KIND]}")
        kl_kind = int(params[L.P_KL_KIND])
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
        return _empty_sums(acc, device, rollout)

    block, num_warps = _lp._launch_params(
        vocab, block_v, gpu_block_v=LOGITS_GPU_BLOCK_V,
        interpret_block_v=LOGITS_INTERPRET_BLOCK_V,
    )
    # Temperature in the parameter tensor, in the accumulation dtype: a Python float
    # kernel argument would be passed as fp32 and round tau for fp64 logits.
    k_t = _scalar_params(params, acc, device, temperature)
    tl_acc = tl.float64 if acc == torch.float64 else tl.float32
    rsw = _sequence_weights(rollout, old_logp, is_weights, valid, offsets, acc,
                            _interpreting())
    part = torch.empty((n, L.NUM_SUMS), dtype=acc, device=device)
    need_grad = out is not None
    _logits_loss_kernel[(n,)](
        logits, logits.stride(0), targets, valid, old_logp, advantages,
        old_logp if ref_logp is None else ref_logp,  # never read where their flag is off
        old_logp if is_weights is None else is_weights,
        offsets, n_seqs, seq_weight, seq_weight if lm_weight is None else lm_weight,
        seq_weight if rsw is None else rsw, k_t,
        part, out if need_grad else logits, out.stride(0) if need_grad else 0, vocab,
        HAS_ISW=_isw_code(is_weights is not None, rollout, params),
        HAS_DUAL=params[L.P_DUAL_CLIP] > 0,
        KL_KIND=kl_kind, KL_STRAIGHT=bool(params[L.P_KL_STRAIGHT]), HAS_LM=lm_weight is not None,
        HAS_GH=params[L.P_ENTROPY_COEF] != 0, NEED_GRAD=need_grad, BLOCK_V=block,
        ACC=tl_acc, num_warps=num_warps,
    )
    return _reduce_rows(part)

