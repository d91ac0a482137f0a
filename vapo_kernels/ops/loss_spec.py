r"""PPO / VAPO losses as one fused pass over the tokens: policy, value, KL, entropy, LM.

Every loss here is a weighted sum over the valid tokens of ragged sequences::

    loss = sum_s sum_{t in s, valid} w_s * L_t

where ``w_s`` is the *aggregation weight* of sequence s (the same for every token of a
sequence in all of verl's modes, see :func:`sequence_weights`) and ``L_t`` is the sum of
the per-token terms that are switched on::

    d_t   = clamp(logp_t - old_logp_t, -C, C)                  C = ratio_log_clamp (20)
    r_t   = exp(d_t)
    pg_t  = max(-A_t r_t, -A_t clamp(r_t, 1 - eps_low, 1 + eps_high))        Clip-Higher
    pg_t  = min(pg_t, -A_t c)        if A_t < 0 and dual_clip = c is set     dual clip
    pg_t *= is_weight_t              if importance weights are given
    vf_t  = 0.5 max((v_t - R_t)^2, (clip(v_t, v_old_t - eps_v, v_old_t + eps_v) - R_t)^2)
    kl_t  = kl_penalty(logp_t, ref_logp_t, kind)                  k1 / abs / k2 / k3 (+)
    lm_t  = -logp_t                  on sequences marked positive (own weight, see below)

    L_t   = pg_t + vf_coef vf_t + kl_coef kl_t - entropy_coef H_t   (+ lm_coef lm_t)

The positive-example LM term (VAPO) has its own weight: the mean NLL over the valid
tokens of the sequences marked positive, ``w_lm = dp_size / (positive tokens)``.

Rollout correction (``rollout_logp`` with ``rollout_is`` set; replaces ``is_weights``):
when the log-probs the rollout engine reported for the sampled tokens (vLLM in bf16,
...) differ from the training engine's ``old_logp``, the policy term is reweighted by
the importance weight rho of the old policy over the rollout policy, computed in the
same pass. Over the valid tokens only (masked slots never enter)::

    e_t   = clamp(old_logp_t - rollout_logp_t, -20, 20)      per-token log-ratio
    token:      u_t = e_t
    sequence:   u_t = clamp(sum_{t' in s} e_t', -20, 20)      the same for every token of s
    geometric:  u_t = (sum_{t' in s} e_t') / T_s              (T_s: valid tokens of s)
    rho_raw_t = exp(u_t)
    truncate:   rho_t = min(rho_raw_t, C)                                     (TIS)
    mask:       rho_t = rho_raw_t if lower <= rho_raw_t <= C else 0       (IcePop; at
                the sequence levels a rejected weight rejects every token of its sequence)
    pg_t *= rho_t        (and d pg_t / d logp_t: the weight is a constant, as is_weights)

``C = rollout_is_threshold`` (default 2), ``lower = rollout_is_threshold_lower`` (default
1 / C, mask mode only). A rejected token stays in every count of the aggregation: its
policy term is 0, as with the zero weights of verl's IcePop bounds, which leave the
response mask as it is. The weights change the estimate, never the denominators, so
every ``agg`` mode (and the global counts of data-parallel runs) means exactly what it
means without the correction. A NaN weight (NaN in a valid slot) is neither truncated
nor rejected, so it reaches the loss. This is verl's ``compute_rollout_correction_weights``
(token / sequence level, TIS or IcePop bounds) except that each token's log-ratio is
clamped before the sequence sum (verl clamps only the sum): they differ only where a
token's |log-ratio| exceeds 20 (a -inf log-prob in either engine, where verl's sum can
be inf - inf = NaN). Metrics, means over the valid tokens: ``rollout_is_mean`` of
rho_raw, ``rollout_is_min`` / ``rollout_is_max`` its extremes (1 without valid tokens),
``rollout_is_weight_mean`` of rho (verl's ``rollout_is_mean``), ``rollout_is_truncated_frac``
(truncate: rho_raw > C) or ``rollout_is_masked_frac`` (mask: rejected), and the mismatch
between the two engines, ``rollout_kl`` = mean(-e) (the k1 estimate of KL(rollout ||
old), verl's ``rollout_corr/kl``) and ``rollout_k3`` = mean(expm1(e) - e) (verl's
``rollout_corr/k3_kl``).

Because the loss is linear in ``w`` and every term is elementwise, the forward pass can
write the gradient of each input as it goes (one read of every input, one write of each
gradient); the backward pass only scales those by the incoming gradient. Metrics
(clip fractions, approx-KL, ratio range, token count) come from the same pass.

This module is the spec every loss op shares: the per-token terms as the peers write
them, the reference kernel of ``vapo::token_loss`` (:func:`reference_kernel`, the
contract every backend implements), the aggregation weights, the options vector and the
metrics. The ops live in :mod:`.token_loss` (log-probs in), :mod:`.logits_loss` (logits
in) and :mod:`.hidden_loss` (hidden states and the LM head in).
Advantages, old log-probs, returns, old values, reference log-probs, importance
weights and rollout log-probs are data: no gradient flows to them (as in every peer).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .. import _loss_layout as L
from .._ragged import check_number

AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)

# The params / sums layout and the KL codes are defined once, in _loss_layout.
KL_KINDS = L.KL_CODES
ROLLOUT_IS_LEVELS = L.ROLLOUT_IS_CODES
ROLLOUT_IS_MODES = ("truncate", "mask")
# Bound of the rollout log-ratios (verl's SAFETY_BOUND), per token and per sequence.
ROLLOUT_LOG_CLAMP = 20.0


# --------------------------------------------------------------------------------------
# The spec: per-token terms written as the peers write them (so ties, clamps and their
# gradients follow torch's rules), gradients by autograd, all in the compute dtype.


def kl_penalty(logp: Tensor, ref_logp: Tensor, kl_kind: str = "k3") -> Tensor:
    """Per-token KL estimator of ``logp`` against ``ref_logp`` (verl's ``kl_penalty``).

    ``k1``/``kl``: logp - ref; ``abs``: |logp - ref|; ``k2``/``mse``: 0.5 (logp - ref)^2;
    ``k3``/``low_var_kl`` (the default, as in :func:`kl_loss` and :func:`vapo_loss`):
    expm1(ref - logp) - (ref - logp) with the log-ratio clamped to [-20, 20] and the
    result to [-10, 10]. A trailing ``+`` keeps the value and takes the gradient of k2
    (an unbiased gradient of KL; straight-through).
    """
    code, straight = kl_codes(kl_kind)
    diff = logp - ref_logp
    if code == 1:
        value = diff
    elif code == 2:
        value = diff.abs()
    elif code == 3:
        value = 0.5 * diff.square()
    else:
        log_ratio = torch.clamp(-diff, min=-20.0, max=20.0)
        value = torch.clamp(torch.expm1(log_ratio) - log_ratio, min=-10.0, max=10.0)
    if not straight or code == 3:
        return value
    surrogate = 0.5 * diff.square()
    return surrogate - surrogate.detach() + value.detach()


def _tie_split(a: Tensor, b: Tensor, grad_a: Tensor, grad_b: Tensor) -> Tensor:
    """Gradient of max(a, b) given those of a and b: torch's rule, a tie splits evenly."""
    return torch.where(a > b, grad_a, torch.where(b > a, grad_b, 0.5 * (grad_a + grad_b)))


def _in_range(x: Tensor, lo, hi) -> Tensor:
    """Where torch.clamp(x, lo, hi) passes its gradient (bounds included)."""
    return ((x >= lo) & (x <= hi)).to(x.dtype)


def _policy_terms(logp, old_logp, adv, params):
    """Per token: pg, d pg / d logp, flags (clip_low, clip_high, dual), -log_ratio, k3, ratio."""
    clamp = params[L.P_RATIO_CLAMP]
    raw = logp - old_logp
    log_ratio = torch.clamp(raw, min=-clamp, max=clamp)
    ratio = torch.exp(log_ratio)
    lo, hi = 1.0 - params[L.P_CLIP_LOW], 1.0 + params[L.P_CLIP_HIGH]
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, lo, hi)
    pg = torch.maximum(unclipped, clipped)
    d_ratio = _tie_split(unclipped, clipped, -adv, -adv * _in_range(ratio, lo, hi))
    was_clipped = clipped > unclipped
    dual = torch.zeros_like(was_clipped)
    if params[L.P_DUAL_CLIP] > 0:
        floor = -adv * params[L.P_DUAL_CLIP]
        negative = adv < 0
        dual = negative & (pg > floor)
        # min(pg, floor) with floor constant in logp: full gradient below, half at a tie.
        below = torch.where(pg < floor, d_ratio, torch.where(pg > floor, 0.0, 0.5 * d_ratio))
        d_ratio = torch.where(negative, below, d_ratio)
        pg = torch.where(negative, torch.minimum(pg, floor), pg)
    grad = d_ratio * ratio * _in_range(raw, -clamp, clamp)
    # expm1, not exp - 1: for |log_ratio| ~ 1e-3, exp(x) - 1 in float32 keeps ~4 digits
    # of x and k3 ~ x^2 / 2 would be ~20% off.
    k3 = torch.expm1(log_ratio) - log_ratio
    flags = (was_clipped & (ratio < lo), was_clipped & (ratio > hi), dual)
    return pg, grad, flags, -log_ratio, k3, ratio


def _value_terms(values, old_values, returns, params):
    """Per token: 0.5 max((v-R)^2, (v_clip-R)^2), its gradient in v, and 'clipped won'."""
    eps = params[L.P_VALUE_CLIP]
    err = values - returns
    unclipped = err * err
    if eps < 0:
        return 0.5 * unclipped, err, torch.zeros_like(unclipped, dtype=torch.bool)
    if params[L.P_VALUE_CLIP_OPENRLHF]:
        step = values - old_values
        v_clipped = old_values + step.clamp(-eps, eps)
        d_clip = _in_range(step, -eps, eps)
    else:  # verl's clip_by_value: max(min(v, old + eps), old - eps), torch's tie rules
        hi, lo = old_values + eps, old_values - eps
        upper = torch.min(values, hi)
        d_upper = torch.where(values < hi, 1.0, torch.where(values > hi, 0.0, 0.5)).to(values.dtype)
        v_clipped = torch.max(upper, lo)
        d_clip = d_upper * torch.where(upper > lo, 1.0, torch.where(upper < lo, 0.0, 0.5)).to(
            values.dtype
        )
    err_clipped = v_clipped - returns
    clipped = err_clipped * err_clipped
    # d/dv of 0.5 * max(...): the factor 2 of each square cancels the 0.5.
    grad = _tie_split(unclipped, clipped, err, err_clipped * d_clip)
    return 0.5 * torch.max(unclipped, clipped), grad, clipped > unclipped


def _kl_terms(logp, ref_logp, kind: int, straight: bool):
    """Per token: the KL estimator and its gradient in logp (see :func:`kl_penalty`)."""
    diff = logp - ref_logp
    if kind == 1:
        value, grad = diff, torch.ones_like(diff)
    elif kind == 2:
        value, grad = diff.abs(), torch.sign(diff)
    elif kind == 3:
        value, grad = 0.5 * diff * diff, diff
    else:
        log_ratio = torch.clamp(-diff, min=-20.0, max=20.0)
        raw = torch.expm1(log_ratio) - log_ratio
        value = torch.clamp(raw, min=-10.0, max=10.0)
        grad = (
            -torch.expm1(log_ratio)
            * _in_range(-diff, -20.0, 20.0)
            * _in_range(raw, -10.0, 10.0)
        )
    if straight:
        grad = diff
    return value, grad


def _rollout_terms(old_logp, rollout_logp, valid, seq_ids, num_seqs, params):
    """Per token (inputs already 0 on masked slots): the applied weight w, the raw weight
    w_raw, 'truncated or rejected', and the clamped log-ratio e (see the module
    docstring). Sequence sums over the valid tokens only."""
    bound = ROLLOUT_LOG_CLAMP
    e = torch.clamp(old_logp - rollout_logp, min=-bound, max=bound)
    e = torch.where(valid, e, torch.zeros_like(e))
    level = int(params[L.P_ROLLOUT_IS])
    if level == L.ROLLOUT_IS_CODES["token"]:
        u = e
    else:
        total = torch.zeros(num_seqs, dtype=e.dtype, device=e.device).index_add_(0, seq_ids, e)
        if level == L.ROLLOUT_IS_CODES["sequence"]:
            per_seq = torch.clamp(total, min=-bound, max=bound)
        else:
            counts = torch.zeros(num_seqs, dtype=e.dtype, device=e.device).index_add_(
                0, seq_ids, valid.to(e.dtype)
            )
            per_seq = total / counts.clamp(min=1)
        u = per_seq[seq_ids]
    w_raw = torch.exp(u)
    upper = params[L.P_ROLLOUT_IS_UPPER]
    if params[L.P_ROLLOUT_IS_MASK]:
        # Not 'lower <= w <= upper': a NaN weight must be kept, so that it reaches the loss.
        out = (w_raw < params[L.P_ROLLOUT_IS_LOWER]) | (w_raw > upper)
        w = torch.where(out, torch.zeros_like(w_raw), w_raw)
    else:
        out = w_raw > upper
        w = torch.clamp(w_raw, max=upper)
    return w, w_raw, out, e


def reference_kernel(
    logp: Tensor | None,
    old_logp: Tensor | None,
    advantages: Tensor | None,
    values: Tensor | None,
    old_values: Tensor | None,
    returns: Tensor | None,
    ref_logp: Tensor | None,
    entropy: Tensor | None,
    is_weights: Tensor | None,
    mask: Tensor | None,
    offsets: Tensor,
    seq_weight: Tensor | None,
    lm_weight: Tensor | None,
    params: Sequence[float],
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The kernel contract every backend implements.

    Token tensors: contiguous, all of one shape (any: (B, T) padded or (N,) packed; the
    tokens are their elements in memory order, N of them) and one float dtype, or None
    when their term is off. The policy term needs ``logp, old_logp, advantages``; the value term ``values,
    returns`` (and ``old_values`` unless ``params[L.P_VALUE_CLIP] < 0``); KL needs ``logp,
    ref_logp`` and ``params[L.P_KL_KIND] > 0``; the entropy term ``entropy``; the LM term
    ``logp`` and ``lm_weight``. With ``params[L.P_ROLLOUT_IS] > 0`` (rollout correction
    on, policy term only) ``is_weights`` holds the rollout engine's log-probs, from which
    the kernel computes the weights (module docstring); otherwise the weights themselves.
    ``mask``: bool of that shape or None (all valid); ``offsets``:
    (S+1,) int64; ``seq_weight``, ``lm_weight``: (S,) in the output dtype (``seq_weight``
    None: the token mean, ``1 / max(1, valid tokens)`` for every sequence). ``params``:
    L.NUM_PARAMS floats (P_* indices).

    Returns ``(loss, sums, grad_logp, grad_values, grad_entropy)``: ``sums`` (L.NUM_SUMS,)
    in the output dtype (float32; float64 for float64 inputs), the 0-d ``loss`` from them
    (:func:`vapo_kernels._loss_layout.loss_total`) and the gradients of ``sum_t w_t L_t``
    (coefficients applied) with respect to logp, values and entropy, in the token
    tensors' shape and the output dtype, zero on masked tokens; a gradient is an
    empty (0,) tensor when ``need_grad`` is False or its input is None. RATIO_MIN/MAX are
    +inf/-inf when no valid token has a policy term. Ties (max/min of equal terms) and
    clamp bounds follow torch's autograd rules, so gradients match the peers' autograd.
    The S_ROLLOUT_* sums are 0 unless the correction is on (min / max +inf / -inf when no
    token is valid).
    """
    present = [t for t in (logp, values, entropy) if t is not None]
    dtype = torch.float64 if present[0].dtype == torch.float64 else torch.float32
    device = present[0].device
    shape = present[0].shape
    n = present[0].numel()
    logp, old_logp, advantages, values, old_values, returns, ref_logp, entropy, is_weights, mask = (
        None if t is None else t.reshape(-1)
        for t in (logp, old_logp, advantages, values, old_values, returns, ref_logp, entropy,
                  is_weights, mask)
    )
    valid = torch.ones(n, dtype=torch.bool, device=device) if mask is None else mask
    lengths = offsets[1:] - offsets[:-1]
    seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    zero = torch.zeros((), dtype=dtype, device=device)
    if seq_weight is None:  # the token mean: 1 / valid tokens (in float64, rounded once)
        mean = 1.0 / max(1, int(valid.sum()))
        seq_weight = torch.full((lengths.numel(),), mean, dtype=dtype, device=device)
    w = torch.where(valid, seq_weight.to(dtype)[seq_ids], zero)  # 0 on masked tokens

    def clean(t):  # garbage in masked slots (NaN, 1e30) must not reach anything
        return None if t is None else torch.where(valid, t.to(dtype), zero)

    logp, old_logp, advantages, values, old_values, returns, ref_logp, entropy, is_weights = map(
        clean,
        (logp, old_logp, advantages, values, old_values, returns, ref_logp, entropy, is_weights),
    )
    sums = torch.zeros(L.NUM_SUMS, dtype=dtype, device=device)
    sums[L.S_RATIO_MIN], sums[L.S_RATIO_MAX] = math.inf, -math.inf
    sums[L.S_TOKENS] = valid.sum()
    g_logp = torch.zeros(n, dtype=dtype, device=device) if logp is not None else None
    g_values = g_entropy = None
    if advantages is not None:
        pg, grad, flags, neg_log_ratio, k3, ratio = _policy_terms(
            logp, old_logp, advantages, params
        )
        if is_weights is not None and params[L.P_ROLLOUT_IS] > 0:
            ris, ris_raw, ris_out, e = _rollout_terms(
                old_logp, is_weights, valid, seq_ids, lengths.numel(), params
            )
            pg, grad = pg * ris, grad * ris
            sums[L.S_ROLLOUT_IS_RAW] = torch.where(valid, ris_raw, zero).sum()
            sums[L.S_ROLLOUT_IS_WEIGHT] = torch.where(valid, ris, zero).sum()
            sums[L.S_ROLLOUT_IS_OUT] = (ris_out & valid).sum()
            sums[L.S_ROLLOUT_KL] = (-e).sum()  # e is 0 on masked tokens
            sums[L.S_ROLLOUT_K3] = torch.where(valid, torch.expm1(e) - e, zero).sum()
            sums[L.S_ROLLOUT_IS_MIN], sums[L.S_ROLLOUT_IS_MAX] = math.inf, -math.inf
            if bool(valid.any()):
                sums[L.S_ROLLOUT_IS_MIN] = ris_raw[valid].min()
                sums[L.S_ROLLOUT_IS_MAX] = ris_raw[valid].max()
        elif is_weights is not None:
            pg, grad = pg * is_weights, grad * is_weights
        sums[L.S_PG] = (w * pg).sum()
        g_logp += w * grad
        for idx, flag in zip((L.S_CLIP_LOW, L.S_CLIP_HIGH, L.S_DUAL_CLIP), flags):
            sums[idx] = (flag & valid).sum()
        sums[L.S_NEG_LOG_RATIO] = torch.where(valid, neg_log_ratio, zero).sum()
        sums[L.S_K3] = torch.where(valid, k3, zero).sum()
        sums[L.S_RATIO_SUM] = torch.where(valid, ratio, zero).sum()
        if bool(valid.any()):
            sums[L.S_RATIO_MIN], sums[L.S_RATIO_MAX] = ratio[valid].min(), ratio[valid].max()
    if returns is not None:
        vf, grad, vf_clipped = _value_terms(values, old_values, returns, params)
        sums[L.S_VF] = (w * vf).sum()
        sums[L.S_VF_CLIP] = (vf_clipped & valid).sum()
        err = returns - values  # 0 on masked tokens (both were cleaned)
        for x, s_slot, sq_slot in ((returns, L.S_RETURNS, L.S_RETURNS_SQ),
                                   (err, L.S_VALUE_ERR, L.S_VALUE_ERR_SQ)):
            # Centred, in float64: the variance's numerator without the cancellation of
            # sum(x^2) - sum(x)^2 / n.
            total = x.double().sum()
            mean = total / valid.sum().clamp(min=1)
            sums[s_slot] = total
            sums[sq_slot] = torch.where(valid, x.double() - mean, 0).square().sum()
        g_values = params[L.P_VF_COEF] * w * grad
    if ref_logp is not None and params[L.P_KL_KIND] > 0:
        kl, grad = _kl_terms(logp, ref_logp, int(params[L.P_KL_KIND]), bool(params[L.P_KL_STRAIGHT]))
        sums[L.S_KL] = (w * kl).sum()
        g_logp += params[L.P_KL_COEF] * w * grad
    if entropy is not None:
        sums[L.S_ENTROPY] = (w * entropy).sum()
        g_entropy = -params[L.P_ENTROPY_COEF] * w
    if lm_weight is not None:
        w_lm = torch.where(valid, lm_weight.to(dtype)[seq_ids], zero)
        sums[L.S_LM] = -(w_lm * logp).sum()
        g_logp -= params[L.P_LM_COEF] * w_lm
    grads = [
        g.view(shape) if (g is not None and need_grad) else torch.empty(0, dtype=dtype, device=device)
        for g in (g_logp, g_values, g_entropy)
    ]
    return L.loss_total(sums, params), sums, *grads


# --------------------------------------------------------------------------------------
# Aggregation weights


def sequence_weights(
    counts: Tensor,
    agg: str,
    *,
    horizon: int | None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
    dp_size: float = 1.0,
    loss_scale_factor: float | None = None,
) -> Tensor:
    """Per-sequence weight ``w_s`` of verl's ``agg_loss`` modes, (S,) in float64.

    ``counts``: valid tokens per sequence (S,). With local counts T = sum(counts) and
    S' = number of sequences with at least one valid token (fully masked sequences are
    excluded, as in verl), or the global counts when given (data-parallel training):

    * token-mean: dp / T;  token-sum: dp;  seq-mean-token-sum: dp / S';
    * seq-mean-token-sum-norm: dp / (S' * loss_scale_factor) (default: the padded
      horizon; packed inputs must pass loss_scale_factor);
    * seq-mean-token-mean: dp / (S' * counts_s).

    A zero count divides as if it were 1: the weight then multiplies no valid token, so an
    all-masked batch has loss 0 and zero gradient where verl's token-mean would divide 0
    by 0 (a zero *global* count gives weight 0). Few tensor ops, no host sync: this runs
    on every call.
    """
    dp = float(dp_size)
    num_seqs = counts.shape[0]
    if agg == "token-sum":
        return counts.new_full((num_seqs,), dp, dtype=torch.float64)
    if agg == "token-mean":
        if global_tokens is not None:
            return counts.new_full((num_seqs,), share(dp, global_tokens), dtype=torch.float64)
        return (dp / counts.sum(dtype=torch.float64).clamp(min=1)).expand(num_seqs).contiguous()
    if global_seqs is not None:
        per_seq = counts.new_full((num_seqs,), share(dp, global_seqs), dtype=torch.float64)
    else:
        seqs = (counts > 0).sum(dtype=torch.float64).clamp(min=1)
        per_seq = (dp / seqs).expand(num_seqs).contiguous()
    if agg == "seq-mean-token-sum":
        return per_seq
    if agg == "seq-mean-token-sum-norm":
        return per_seq / float(horizon if loss_scale_factor is None else loss_scale_factor)
    if agg == "seq-mean-token-mean":
        return per_seq / counts.clamp(min=1)
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def positive_weights(
    counts: Tensor, positive: Tensor, global_positive_tokens: float | None, dp_size: float
) -> Tensor:
    """Per-sequence weight of the positive-example LM term: ``dp / (positive tokens)`` on
    positive sequences, 0 on the others (S,) float64."""
    pos = (positive != 0).to(torch.float64)
    if global_positive_tokens is not None:
        return pos * share(float(dp_size), global_positive_tokens)
    return pos * (float(dp_size) / (pos * counts).sum().clamp(min=1))


def share(total: float, count: float) -> float:
    """``total / count`` for a global count (a Python float: no host-to-device copy, so no
    stream sync on CUDA), 0 when the count is 0."""
    return total / count if count > 0 else 0.0


def global_count(name: str, x) -> float | None:
    """A global count (data-parallel token or sequence count) as a Python float; a tensor
    from an all-reduce is read once here."""
    if x is None:
        return None
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a one-element tensor, got a tensor of shape "
                f"{tuple(x.shape)}"
            )
        x = x.item()
    check_number(name, x, lambda v: 0 <= v < math.inf, "a finite number >= 0 or None")
    return float(x)


def aggregation_scalars(
    global_tokens, global_seqs, global_positive_tokens, dp_size, loss_scale_factor
) -> tuple:
    """The loss ops' scalar aggregation arguments (consecutive fields of their args, in
    this order) from the public keywords, checked: global counts as Python floats."""
    if (global_tokens is None and global_seqs is None and global_positive_tokens is None
            and type(dp_size) is int and dp_size == 1 and loss_scale_factor is None):
        return _DEFAULT_AGGREGATION  # the common call, first
    if type(dp_size) is not int or dp_size != 1:  # the common value passes at once
        check_number("dp_size", dp_size, lambda v: v >= 1 and v == int(v),
                      "a whole number >= 1 (the data-parallel group's size)")
    if loss_scale_factor is not None:
        check_number("loss_scale_factor", loss_scale_factor, lambda v: 0 < v < math.inf,
                      "a finite number > 0 or None")
    return (
        global_count("global_tokens", global_tokens),
        global_count("global_seqs", global_seqs),
        global_count("global_positive_tokens", global_positive_tokens),
        float(dp_size),
        None if loss_scale_factor is None else float(loss_scale_factor),
    )


_DEFAULT_AGGREGATION = (None, None, None, 1.0, None)


def options_cache(fn):
    """``fn``, a function of options that checks them and returns something immutable,
    cached: a trainer passes the same options on every call. ``typed``: 1 and True (or
    0.5 and np.float32(0.5)) are equal keys, but only one may be valid. Under
    ``torch.compile`` dynamo traces the uncached function (instead of warning about the
    cache); an unhashable option (a list) takes it too, whose checks name it."""
    cached = functools.lru_cache(maxsize=256, typed=True)(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        try:
            return cached(*args, **kwargs)
        except TypeError:  # unhashable, or the checks' own TypeError (raised again)
            return fn(*args, **kwargs)

    return call


@options_cache
def loss_params(
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    ratio_log_clamp: float = 20.0,
    value_clip: float | None = None,
    value_clip_form: str = "verl",
    kl_kind: str | None = None,
    vf_coef: float = 1.0,
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    lm_coef: float = 0.0,
    rollout_is: str | None = None,
    rollout_is_mode: str | None = None,
    rollout_is_threshold: float | None = None,
    rollout_is_threshold_lower: float | None = None,
) -> tuple[float, ...]:
    """The ``params`` vector (``P_*`` slots) of the loss kernels from the options, each
    checked and named in the error."""
    for name, eps in (("clip_low", clip_low), ("clip_high", clip_high)):
        check_number(name, eps, lambda v: v >= 0, "a float >= 0")
    if clip_low > 1.0:
        raise ValueError(
            f"clip_low must be <= 1 (the ratio's lower bound 1 - clip_low >= 0), got {clip_low}"
        )
    if dual_clip is not None:
        check_number("dual_clip", dual_clip, lambda v: v > 1.0, "a float > 1 or None")
    check_number("ratio_log_clamp", ratio_log_clamp, lambda v: v > 0, "a float > 0")
    if value_clip is not None:
        check_number("value_clip", value_clip, lambda v: v >= 0, "a float >= 0 or None")
    if value_clip_form not in ("verl", "openrlhf"):
        raise ValueError(f"value_clip_form must be 'verl' or 'openrlhf', got {value_clip_form!r}")
    kind, straight = (0, 0) if kl_kind is None else kl_codes(kl_kind)
    coefs = {"vf_coef": vf_coef, "kl_coef": kl_coef, "entropy_coef": entropy_coef,
             "lm_coef": lm_coef}
    for name, c in coefs.items():
        check_number(name, c, math.isfinite, "a finite float")
    params = [0.0] * L.NUM_PARAMS
    params[L.P_CLIP_LOW], params[L.P_CLIP_HIGH] = float(clip_low), float(clip_high)
    params[L.P_DUAL_CLIP] = 0.0 if dual_clip is None else float(dual_clip)
    params[L.P_RATIO_CLAMP] = float(ratio_log_clamp)
    params[L.P_VALUE_CLIP] = -1.0 if value_clip is None else float(value_clip)
    params[L.P_VALUE_CLIP_OPENRLHF] = float(value_clip_form == "openrlhf")
    params[L.P_KL_KIND], params[L.P_KL_STRAIGHT] = float(kind), float(straight)
    params[L.P_VF_COEF], params[L.P_KL_COEF] = float(vf_coef), float(kl_coef)
    params[L.P_ENTROPY_COEF], params[L.P_LM_COEF] = float(entropy_coef), float(lm_coef)
    (
        params[L.P_ROLLOUT_IS],
        params[L.P_ROLLOUT_IS_MASK],
        params[L.P_ROLLOUT_IS_UPPER],
        params[L.P_ROLLOUT_IS_LOWER],
    ) = _rollout_params(
        rollout_is, rollout_is_mode, rollout_is_threshold, rollout_is_threshold_lower
    )
    return tuple(params)


def kl_codes(kl_kind) -> tuple[int, int]:
    """``(P_KL_KIND, P_KL_STRAIGHT)`` of a ``kl_kind`` name, checked."""
    base = kl_kind[:-1] if isinstance(kl_kind, str) and kl_kind.endswith("+") else kl_kind
    if not isinstance(base, str) or base not in KL_KINDS:
        raise ValueError(
            f"kl_kind must be one of {sorted(KL_KINDS)} (optionally '+'), got {kl_kind!r}"
        )
    return KL_KINDS[base], int(kl_kind.endswith("+"))


def _rollout_params(level, mode, upper, lower) -> list[float]:
    """Slots P_ROLLOUT_IS..P_ROLLOUT_IS_LOWER from the rollout-correction options."""
    if level is None:
        for name, value in (
            ("rollout_is_mode", mode),
            ("rollout_is_threshold", upper),
            ("rollout_is_threshold_lower", lower),
        ):
            if value is not None:
                raise ValueError(
                    f"{name}={value!r} is set but rollout_is is None (the rollout correction "
                    f"is off): pass rollout_is={sorted(ROLLOUT_IS_LEVELS)} and rollout_logp"
                )
        return [0.0, 0.0, 0.0, 0.0]
    if not isinstance(level, str) or level not in ROLLOUT_IS_LEVELS:
        raise ValueError(
            f"rollout_is must be one of {sorted(ROLLOUT_IS_LEVELS)} or None, got {level!r}"
        )
    mode = "truncate" if mode is None else mode
    if not isinstance(mode, str) or mode not in ROLLOUT_IS_MODES:
        raise ValueError(f"rollout_is_mode must be one of {ROLLOUT_IS_MODES}, got {mode!r}")
    upper = 2.0 if upper is None else upper
    check_number(
        "rollout_is_threshold", upper, lambda v: 0 < v < math.inf, "a finite float > 0"
    )
    if mode == "truncate":
        if lower is not None:
            raise ValueError(
                f"rollout_is_threshold_lower={lower!r} is set but rollout_is_mode is "
                "'truncate', which only caps the weights at rollout_is_threshold: pass "
                "rollout_is_mode='mask' to reject weights below a lower bound"
            )
        lower = 0.0
    else:
        lower = 1.0 / upper if lower is None else lower
        check_number(
            "rollout_is_threshold_lower", lower, lambda v: 0 <= v <= upper,
            f"a float in [0, rollout_is_threshold = {upper}]",
        )
    return [float(ROLLOUT_IS_LEVELS[level]), float(mode == "mask"), float(upper), float(lower)]


# verl's explained-variance guard: 1 - var(R - v) / (var(R) + 1e-5), unbiased variances.
_EXPLAINED_VAR_EPS = 1e-5


def loss_metrics(
    sums: Tensor, policy: bool, value: bool, kl: bool, entropy: bool, lm: bool,
    rollout: str | None = None,
) -> Mapping[str, Tensor]:
    """The metrics of a loss call from its sums (see :class:`LossMetrics`); a plain dict
    under ``torch.compile``. ``rollout``: the rollout correction's mode ('truncate' or
    'mask'), None when it is off."""
    if sums.requires_grad:  # never from the eager kernels (their sums need no detach)
        sums = sums.detach()
    metrics = LossMetrics(sums, policy, value, kl, entropy, lm, rollout)
    return dict(metrics) if torch.compiler.is_compiling() else metrics


class LossMetrics(Mapping):
    """The metrics of a loss call, as 0-d tensors (no device sync), computed from the
    call's sums vector when first read: means over the local valid tokens (0 when there
    are none; ratio min / mean / max are 1 then), the loss terms, and ``explained_var``,
    the critic's explained variance over the valid tokens as verl computes it
    (``1 - var(R - v) / (var(R) + 1e-5)``, unbiased; 0 with fewer than 2 tokens), and,
    with the rollout correction on (``rollout``: its mode), ``rollout_is_mean`` /
    ``rollout_is_min`` / ``rollout_is_max`` (the weights before truncation or rejection;
    min / max 1 when there is no valid token), ``rollout_is_weight_mean`` (the weights
    applied), ``rollout_is_truncated_frac`` (truncate mode) or ``rollout_is_masked_frac``
    (mask mode), ``rollout_kl`` and ``rollout_k3`` (module docstring).

    Lazy because a trainer calls the loss per micro-batch and reads a few metrics: a
    dozen 0-d tensors made eagerly cost more than the loss kernel at those sizes. A
    ``Mapping``: ``dict(metrics)``, ``metrics.items()`` and ``{**metrics}`` work.
    """

    def __init__(self, sums: Tensor, policy: bool, value: bool, kl: bool, entropy: bool,
                 lm: bool, rollout: str | None = None):
        self._sums = sums
        self._cache: dict[str, Tensor] = {}
        self._keys = _metric_keys(policy, value, kl, entropy, lm, rollout)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"LossMetrics({dict(self)!r})"

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._cache:
            if key not in self._keys:
                raise KeyError(key)
            self._cache[key] = self._compute(key)
        return self._cache[key]

    def _compute(self, key: str) -> Tensor:
        sums = self._sums
        tokens = sums[L.S_TOKENS]

        def mean(slot):
            return sums[slot] / tokens.clamp(min=1)

        if key in _TOTALS:
            return sums[_TOTALS[key]]
        if key in _MEANS:
            return mean(_MEANS[key])
        if key == "clipfrac":
            return mean(L.S_CLIP_LOW) + mean(L.S_CLIP_HIGH)
        if key in _RATIO:  # min/max hold +-inf when empty
            return torch.where(tokens > 0, sums[_RATIO[key]], 1.0)
        if key == "ratio_mean":
            return torch.where(tokens > 0, mean(L.S_RATIO_SUM), 1.0)
        # explained_var
        n = tokens.clamp(min=2)
        unbiased = n / (n - 1)
        var_err = mean(L.S_VALUE_ERR_SQ) * unbiased  # the slots are centred
        var_ret = mean(L.S_RETURNS_SQ) * unbiased
        return torch.where(tokens > 1, 1.0 - var_err / (var_ret + _EXPLAINED_VAR_EPS), 0.0)


@options_cache
def _metric_keys(policy, value, kl, entropy, lm, rollout) -> tuple[str, ...]:
    """The names of :class:`LossMetrics` for the terms that are on (one tuple per set:
    made on every loss call)."""
    keys = ["tokens"]
    if policy:
        keys += [
            "pg_loss", "clipfrac_low", "clipfrac_high", "clipfrac", "dual_clipfrac",
            "approx_kl", "approx_kl_k3", "ratio_mean", "ratio_min", "ratio_max",
        ]
    if value:
        keys += ["vf_loss", "vf_clipfrac", "explained_var"]
    keys += [k for k, on in (("kl_loss", kl), ("entropy", entropy), ("lm_loss", lm)) if on]
    if rollout is not None:
        keys += [
            "rollout_is_mean", "rollout_is_min", "rollout_is_max", "rollout_is_weight_mean",
            "rollout_is_masked_frac" if rollout == "mask" else "rollout_is_truncated_frac",
            "rollout_kl", "rollout_k3",
        ]
    return tuple(keys)


_TOTALS = {
    "tokens": L.S_TOKENS, "pg_loss": L.S_PG, "vf_loss": L.S_VF, "kl_loss": L.S_KL,
    "entropy": L.S_ENTROPY, "lm_loss": L.S_LM,
}
_MEANS = {
    "clipfrac_low": L.S_CLIP_LOW, "clipfrac_high": L.S_CLIP_HIGH,
    "dual_clipfrac": L.S_DUAL_CLIP, "approx_kl": L.S_NEG_LOG_RATIO, "approx_kl_k3": L.S_K3,
    "vf_clipfrac": L.S_VF_CLIP, "rollout_is_mean": L.S_ROLLOUT_IS_RAW,
    "rollout_is_weight_mean": L.S_ROLLOUT_IS_WEIGHT,
    "rollout_is_truncated_frac": L.S_ROLLOUT_IS_OUT, "rollout_is_masked_frac": L.S_ROLLOUT_IS_OUT,
    "rollout_kl": L.S_ROLLOUT_KL, "rollout_k3": L.S_ROLLOUT_K3,
}
_RATIO = {
    "ratio_min": L.S_RATIO_MIN, "ratio_max": L.S_RATIO_MAX,
    "rollout_is_min": L.S_ROLLOUT_IS_MIN, "rollout_is_max": L.S_ROLLOUT_IS_MAX,
}
