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

Because the loss is linear in ``w`` and every term is elementwise, the forward pass can
write the gradient of each input as it goes (one read of every input, one write of each
gradient); the backward pass only scales those by the incoming gradient. Metrics
(clip fractions, approx-KL, ratio range, token count) come from the same pass.

The data-flow: public wrappers (:func:`policy_loss`, :func:`value_loss`,
:func:`vapo_loss`, ...) -> ``torch.ops.vapo.token_loss`` -> the backend kernel chosen by
``_backends.select``; every backend implements :func:`reference_kernel`'s contract.
Advantages, old log-probs, returns, old values, reference log-probs and importance
weights are data: no gradient flows to them (as in every peer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _backends, _ragged
from .. import _loss_layout as L
from .._loss_layout import *  # noqa: F403 - P_*, S_*, NUM_* (transitional)
from . import logprobs as lp_ops

AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)

# The params / sums layout and the KL codes are defined once, in _loss_layout.
KL_KINDS = L.KL_CODES


# --------------------------------------------------------------------------------------
# The spec: per-token terms written as the peers write them (so ties, clamps and their
# gradients follow torch's rules), gradients by autograd, all in the compute dtype.


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """Per-token KL estimator of ``logp`` against ``ref_logp`` (verl's ``kl_penalty``).

    ``k1``/``kl``: logp - ref; ``abs``: |logp - ref|; ``k2``/``mse``: 0.5 (logp - ref)^2;
    ``k3``/``low_var_kl``: expm1(ref - logp) - (ref - logp) with the log-ratio clamped
    to [-20, 20] and the result to [-10, 10]. A trailing ``+`` keeps the value and takes
    the gradient of k2 (an unbiased gradient of KL; straight-through).
    """
    straight = kind.endswith("+")
    base = kind[:-1] if straight else kind
    if base not in KL_KINDS:
        raise ValueError(
            f"kind must be one of {sorted(KL_KINDS)} (optionally with '+'), got {kind!r}"
        )
    diff = logp - ref_logp
    code = KL_KINDS[base]
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
    clamp = params[P_RATIO_CLAMP]
    raw = logp - old_logp
    log_ratio = torch.clamp(raw, min=-clamp, max=clamp)
    ratio = torch.exp(log_ratio)
    lo, hi = 1.0 - params[P_CLIP_LOW], 1.0 + params[P_CLIP_HIGH]
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, lo, hi)
    pg = torch.maximum(unclipped, clipped)
    d_ratio = _tie_split(unclipped, clipped, -adv, -adv * _in_range(ratio, lo, hi))
    was_clipped = clipped > unclipped
    dual = torch.zeros_like(was_clipped)
    if params[P_DUAL_CLIP] > 0:
        floor = -adv * params[P_DUAL_CLIP]
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
    eps = params[P_VALUE_CLIP]
    err = values - returns
    unclipped = err * err
    if eps < 0:
        return 0.5 * unclipped, err, torch.zeros_like(unclipped, dtype=torch.bool)
    if params[P_VALUE_CLIP_OPENRLHF]:
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
    seq_weight: Tensor,
    lm_weight: Tensor | None,
    params: Sequence[float],
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The kernel contract every backend implements.

    Token tensors: (N,) contiguous, all the same float dtype, or None when their term is
    off. The policy term needs ``logp, old_logp, advantages``; the value term ``values,
    returns`` (and ``old_values`` unless ``params[P_VALUE_CLIP] < 0``); KL needs ``logp,
    ref_logp`` and ``params[P_KL_KIND] > 0``; the entropy term ``entropy``; the LM term
    ``logp`` and ``lm_weight``. ``mask``: (N,) bool or None (all valid); ``offsets``:
    (S+1,) int64; ``seq_weight``, ``lm_weight``: (S,) in the output dtype. ``params``:
    NUM_PARAMS floats (P_* indices).

    Returns ``sums`` (NUM_SUMS,) in the output dtype (float32; float64 for float64 inputs)
    and the gradients of ``sum_t w_t L_t`` (coefficients applied) with respect to logp,
    values and entropy, (N,) in the output dtype, zero on masked tokens; a gradient is an
    empty (0,) tensor when ``need_grad`` is False or its input is None. RATIO_MIN/MAX are
    +inf/-inf when no valid token has a policy term. Ties (max/min of equal terms) and
    clamp bounds follow torch's autograd rules, so gradients match the peers' autograd.
    """
    present = [t for t in (logp, values, entropy) if t is not None]
    dtype = torch.float64 if present[0].dtype == torch.float64 else torch.float32
    device = present[0].device
    n = present[0].shape[0]
    valid = torch.ones(n, dtype=torch.bool, device=device) if mask is None else mask
    lengths = offsets[1:] - offsets[:-1]
    seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    zero = torch.zeros((), dtype=dtype, device=device)
    w = torch.where(valid, seq_weight.to(dtype)[seq_ids], zero)  # 0 on masked tokens

    def clean(t):  # garbage in masked slots (NaN, 1e30) must not reach anything
        return None if t is None else torch.where(valid, t.to(dtype), zero)

    logp, old_logp, advantages, values, old_values, returns, ref_logp, entropy, is_weights = map(
        clean,
        (logp, old_logp, advantages, values, old_values, returns, ref_logp, entropy, is_weights),
    )
    sums = torch.zeros(NUM_SUMS, dtype=dtype, device=device)
    sums[S_RATIO_MIN], sums[S_RATIO_MAX] = math.inf, -math.inf
    sums[S_TOKENS] = valid.sum()
    g_logp = torch.zeros(n, dtype=dtype, device=device) if logp is not None else None
    g_values = g_entropy = None
    if advantages is not None:
        pg, grad, flags, neg_log_ratio, k3, ratio = _policy_terms(
            logp, old_logp, advantages, params
        )
        if is_weights is not None:
            pg, grad = pg * is_weights, grad * is_weights
        sums[S_PG] = (w * pg).sum()
        g_logp += w * grad
        for idx, flag in zip((S_CLIP_LOW, S_CLIP_HIGH, S_DUAL_CLIP), flags):
            sums[idx] = (flag & valid).sum()
        sums[S_NEG_LOG_RATIO] = torch.where(valid, neg_log_ratio, zero).sum()
        sums[S_K3] = torch.where(valid, k3, zero).sum()
        sums[S_RATIO_SUM] = torch.where(valid, ratio, zero).sum()
        if bool(valid.any()):
            sums[S_RATIO_MIN], sums[S_RATIO_MAX] = ratio[valid].min(), ratio[valid].max()
    if returns is not None:
        vf, grad, vf_clipped = _value_terms(values, old_values, returns, params)
        sums[S_VF] = (w * vf).sum()
        sums[S_VF_CLIP] = (vf_clipped & valid).sum()
        err = returns - values  # 0 on masked tokens (both were cleaned)
        sums[S_RETURNS], sums[S_RETURNS_SQ] = returns.sum(), (returns * returns).sum()
        sums[S_VALUE_ERR], sums[S_VALUE_ERR_SQ] = err.sum(), (err * err).sum()
        g_values = params[P_VF_COEF] * w * grad
    if ref_logp is not None and params[P_KL_KIND] > 0:
        kl, grad = _kl_terms(logp, ref_logp, int(params[P_KL_KIND]), bool(params[P_KL_STRAIGHT]))
        sums[S_KL] = (w * kl).sum()
        g_logp += params[P_KL_COEF] * w * grad
    if entropy is not None:
        sums[S_ENTROPY] = (w * entropy).sum()
        g_entropy = -params[P_ENTROPY_COEF] * w
    if lm_weight is not None:
        w_lm = torch.where(valid, lm_weight.to(dtype)[seq_ids], zero)
        sums[S_LM] = -(w_lm * logp).sum()
        g_logp -= params[P_LM_COEF] * w_lm
    grads = [
        g if (g is not None and need_grad) else torch.empty(0, dtype=dtype, device=device)
        for g in (g_logp, g_values, g_entropy)
    ]
    return sums, *grads


_backends.register("token_loss", "reference")(reference_kernel)
_backends.register("token_loss", "cpp")(_backends.from_extension("token_loss_cpu"))
_backends.register("token_loss", "triton")(
    _backends.from_module("vapo_kernels.triton.loss", "token_loss")
)


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
    """Per-sequence weight ``w_s`` of verl's ``agg_loss`` modes, in float64.

    ``counts``: valid tokens per sequence (S,). With local counts T = sum(counts) and
    S' = number of sequences with at least one valid token (fully masked sequences are
    excluded, as in verl), or the global counts when given (data-parallel training):

    * token-mean: dp / T;  token-sum: dp;  seq-mean-token-sum: dp / S';
    * seq-mean-token-sum-norm: dp / (S' * loss_scale_factor) (default: the padded
      horizon; packed inputs must pass loss_scale_factor);
    * seq-mean-token-mean: dp / (S' * counts_s).

    A zero denominator (nothing valid) gives weight 0, so an all-masked batch has loss 0
    and zero gradient where verl's token-mean would divide 0 by 0.
    """
    counts = counts.to(torch.float64)
    dp = float(dp_size)
    if agg == "token-sum":
        return torch.full_like(counts, dp)
    if agg == "token-mean":
        tokens = counts.sum() if global_tokens is None else global_tokens
        return torch.zeros_like(counts) + _share(dp, tokens)
    seqs = (counts > 0).sum() if global_seqs is None else global_seqs
    per_seq = _share(dp, seqs)
    if agg == "seq-mean-token-sum":
        return torch.zeros_like(counts) + per_seq
    if agg == "seq-mean-token-sum-norm":
        scale = horizon if loss_scale_factor is None else loss_scale_factor
        return (torch.zeros_like(counts) + per_seq) / float(scale)
    if agg == "seq-mean-token-mean":
        return torch.where(counts > 0, per_seq / counts.clamp(min=1), 0.0)
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def _share(total: float, count: Tensor | float) -> Tensor | float:
    """``total / count``, 0 when count is 0. A count passed as a number (a global count)
    stays a Python float: no host-to-device copy, hence no stream sync on CUDA. A tensor
    count is a local count of tokens or sequences, an integer."""
    if isinstance(count, Tensor):
        count = count.to(torch.float64)  # an int64 count would divide in float32
        return torch.where(count > 0, total / count.clamp(min=1), 0.0)
    return total / count if count > 0 else 0.0


# --------------------------------------------------------------------------------------
# The torch op


_TOKEN_ARGS = (
    "logp",
    "old_logp",
    "advantages",
    "values",
    "old_values",
    "returns",
    "ref_logp",
    "entropy",
    "is_weights",
)


def _check_static(tensors, mask, cu_seqlens, positive, params, agg, loss_scale_factor):
    given = {k: v for k, v in zip(_TOKEN_ARGS, tensors) if v is not None}
    if not given:
        raise ValueError("token_loss needs at least one of logp, values or entropy")
    layout = _ragged.check_layout(given, mask, cu_seqlens)
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if agg == "seq-mean-token-sum-norm" and layout.packed and loss_scale_factor is None:
        raise ValueError(
            "agg='seq-mean-token-sum-norm' on packed input needs loss_scale_factor "
            "(verl divides by the padded response length)"
        )
    if positive is not None:
        if not isinstance(positive, Tensor):
            raise TypeError(f"positive must be a tensor or None, got {type(positive).__name__}")
        if positive.shape != (layout.num_seqs,):
            raise ValueError(
                f"positive must have one entry per sequence, shape ({layout.num_seqs},), "
                f"got {tuple(positive.shape)}"
            )
    if len(params) != NUM_PARAMS:
        raise ValueError(f"params must hold {NUM_PARAMS} floats, got {len(params)}")
    return layout


def _out_dtype(tensors) -> torch.dtype:
    return (
        torch.float64
        if any(t is not None and t.dtype == torch.float64 for t in tensors)
        else torch.float32
    )


@torch.library.custom_op("vapo::token_loss", mutates_args=())
def token_loss_op(
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
    cu_seqlens: Tensor | None,
    positive: Tensor | None,
    params: Sequence[float],
    agg: str,
    global_tokens: float | None,
    global_seqs: float | None,
    global_positive_tokens: float | None,
    dp_size: float,
    loss_scale_factor: float | None,
    need_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """All loss terms in one pass: ``(loss, sums, grad_logp, grad_values, grad_entropy)``.

    ``loss`` is the total (coefficients applied); ``sums`` the NUM_SUMS vector of the
    kernel contract; the gradients are those of ``loss`` (shaped like their inputs, or
    empty when ``need_grad`` is False or the input is None).
    """
    tensors = (
        logp,
        old_logp,
        advantages,
        values,
        old_values,
        returns,
        ref_logp,
        entropy,
        is_weights,
    )
    layout = _check_static(tensors, mask, cu_seqlens, positive, params, agg, loss_scale_factor)
    first = next(t for t in tensors if t is not None)
    shape, device = first.shape, first.device
    mask = _ragged.as_bool_mask(mask)
    flat_mask = None if mask is None else mask.reshape(-1).contiguous()
    out_dtype = _out_dtype(tensors)
    # The kernels read one float dtype; mixed inputs (rare) are promoted once here.
    dtype = first.dtype
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    flat = [None if t is None else t.reshape(-1).to(dtype).contiguous() for t in tensors]

    name, kernel = _backends.select("token_loss", device, backend or None)
    offs, seq_w, lm_w = _aggregation_weights(
        layout, shape, device, cu_seqlens, flat_mask, positive, out_dtype, name, agg, global_tokens,
        global_seqs, global_positive_tokens, dp_size, loss_scale_factor,
    )
    sums, g_logp, g_values, g_entropy = kernel(
        *flat, flat_mask, offs, seq_w, lm_w, [float(p) for p in params], need_grad
    )
    loss = _total(sums, params)
    _screen_nan(loss, zip(_TOKEN_ARGS, tensors), mask)
    grads = []
    for g, src in ((g_logp, logp), (g_values, values), (g_entropy, entropy)):
        grads.append(
            g.view(src.shape) if (src is not None and g.numel() == src.numel() and need_grad) else g
        )
    return loss, sums, *grads


def _aggregation_weights(
    layout, shape, device, cu_seqlens, flat_mask, positive, out_dtype, backend_name, agg,
    global_tokens, global_seqs, global_positive_tokens, dp_size, loss_scale_factor,
):
    """``(offsets, seq_weight, lm_weight)`` of the kernel contract from the valid tokens
    (``shape``: the token tensors' shape, (B, T) padded or (N,) packed)."""
    if layout.packed:
        _ragged.check_cu_seqlens_values(cu_seqlens, layout.num_tokens)
    offs = _ragged.offsets(layout, shape, cu_seqlens, device)
    if flat_mask is None:
        counts = offs[1:] - offs[:-1]
    else:
        count_backend = "cpp" if backend_name == "cpp" else "reference"
        _, count_kernel = _backends.select("valid_counts", device, count_backend)
        counts = count_kernel(flat_mask, offs)
    horizon = shape[-1] if not layout.packed else None
    seq_w = sequence_weights(
        counts,
        agg,
        horizon=horizon,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        dp_size=dp_size,
        loss_scale_factor=loss_scale_factor,
    ).to(out_dtype)
    lm_w = None
    if positive is not None:
        pos = (positive != 0).to(torch.float64)
        pos_tokens = (
            (pos * counts).sum() if global_positive_tokens is None else global_positive_tokens
        )
        lm_w = (pos * _share(dp_size, pos_tokens)).to(out_dtype).contiguous()
    return offs, seq_w.contiguous(), lm_w


def _total(sums: Tensor, params: Sequence[float]) -> Tensor:
    """The loss: the five term sums with their coefficients (the metric slots hold +-inf
    for empty batches and must not meet a zero coefficient). Python-float coefficients:
    no host-to-device copy, so no stream sync on CUDA."""
    return (
        sums[S_PG]
        + params[P_VF_COEF] * sums[S_VF]
        + params[P_KL_COEF] * sums[S_KL]
        - params[P_ENTROPY_COEF] * sums[S_ENTROPY]
        + params[P_LM_COEF] * sums[S_LM]
    )


def _screen_nan(loss: Tensor, named_inputs, mask: Tensor | None) -> None:
    """A NaN in a valid input always reaches its term's sum, and masked slots never
    produce one: one check of the loss screens every input; per-input checks run only
    when something is wrong, to name the argument."""
    if _ragged.validation_enabled() and bool(torch.isnan(loss)):
        for arg, t in named_inputs:
            if t is not None:
                _ragged.check_no_nan_where_valid(arg, t, mask)


@token_loss_op.register_fake
def _token_loss_fake(
    logp,
    old_logp,
    advantages,
    values,
    old_values,
    returns,
    ref_logp,
    entropy,
    is_weights,
    mask,
    cu_seqlens,
    positive,
    params,
    agg,
    global_tokens,
    global_seqs,
    global_positive_tokens,
    dp_size,
    loss_scale_factor,
    need_grad,
    backend,
):
    tensors = (
        logp,
        old_logp,
        advantages,
        values,
        old_values,
        returns,
        ref_logp,
        entropy,
        is_weights,
    )
    _check_static(tensors, mask, cu_seqlens, positive, params, agg, loss_scale_factor)
    first = next(t for t in tensors if t is not None)
    dtype = _out_dtype(tensors)
    loss = first.new_empty((), dtype=dtype)
    sums = first.new_empty((NUM_SUMS,), dtype=dtype)
    grads = []
    # As in the kernels: values get a gradient only when the value term is on (returns).
    for src in (logp, values if returns is not None else None, entropy):
        if need_grad and src is not None:
            grads.append(first.new_empty(src.shape, dtype=dtype))
        else:
            grads.append(first.new_empty((0,), dtype=dtype))
    return loss, sums, *grads


def _setup_context(ctx, inputs, output):
    _, sums, g_logp, g_values, g_entropy = output
    ctx.mark_non_differentiable(sums, g_logp, g_values, g_entropy)
    # Only the loss is differentiable: without this, autograd would allocate and zero-fill
    # a token-sized gradient for each of the other outputs on every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(g_logp, g_values, g_entropy)
    ctx.dtypes = [None if inputs[i] is None else inputs[i].dtype for i in (0, 3, 7)]
    ctx.had_grads = inputs[19]  # need_grad


def _backward(ctx, grad_loss, *unused):
    g_logp, g_values, g_entropy = ctx.saved_tensors
    out = [None] * 21
    if grad_loss is None:
        return tuple(out)
    for slot, g, dtype in zip((0, 3, 7), (g_logp, g_values, g_entropy), ctx.dtypes):
        if not ctx.needs_input_grad[slot]:
            continue
        if not ctx.had_grads:
            raise RuntimeError(
                "vapo token_loss: a gradient was requested but the forward ran with "
                "need_grad=False; call the loss with grad mode on"
            )
        out[slot] = (g * grad_loss.to(g.dtype)).to(dtype)
    return tuple(out)


torch.library.register_autograd("vapo::token_loss", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# Public API


def _count(name, x):
    """A global count as a float (a tensor from an all-reduce is read once here)."""
    if x is None:
        return None
    if isinstance(x, Tensor):
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0:
        raise ValueError(f"{name} must be a non-negative number or None, got {x!r}")
    return float(x)


def _params(
    *,
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=None,
    ratio_log_clamp=20.0,
    value_clip=None,
    value_clip_form="verl",
    kl_kind=None,
    vf_coef=1.0,
    kl_coef=0.0,
    entropy_coef=0.0,
    lm_coef=0.0,
) -> list[float]:
    for name, eps in (("clip_low", clip_low), ("clip_high", clip_high)):
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"{name} must be a float >= 0, got {eps!r}")
    if clip_low > 1.0:
        raise ValueError(
            f"clip_low must be <= 1 (the ratio's lower bound 1 - clip_low >= 0), got {clip_low}"
        )
    if dual_clip is not None and not (isinstance(dual_clip, (int, float)) and dual_clip > 1.0):
        raise ValueError(f"dual_clip must be a float > 1 or None, got {dual_clip!r}")
    if not (isinstance(ratio_log_clamp, (int, float)) and ratio_log_clamp > 0):
        raise ValueError(f"ratio_log_clamp must be a float > 0, got {ratio_log_clamp!r}")
    if value_clip is not None and not (isinstance(value_clip, (int, float)) and value_clip >= 0):
        raise ValueError(f"value_clip must be a float >= 0 or None, got {value_clip!r}")
    if value_clip_form not in ("verl", "openrlhf"):
        raise ValueError(f"value_clip_form must be 'verl' or 'openrlhf', got {value_clip_form!r}")
    kind, straight = 0, 0
    if kl_kind is not None:
        base = kl_kind[:-1] if kl_kind.endswith("+") else kl_kind
        if base not in KL_KINDS:
            raise ValueError(
                f"kl_kind must be one of {sorted(KL_KINDS)} (optionally '+'), got {kl_kind!r}"
            )
        kind, straight = KL_KINDS[base], int(kl_kind.endswith("+"))
    for name, c in (
        ("vf_coef", vf_coef),
        ("kl_coef", kl_coef),
        ("entropy_coef", entropy_coef),
        ("lm_coef", lm_coef),
    ):
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
            raise ValueError(f"{name} must be a finite float, got {c!r}")
    params = [0.0] * NUM_PARAMS
    params[P_CLIP_LOW], params[P_CLIP_HIGH] = float(clip_low), float(clip_high)
    params[P_DUAL_CLIP] = 0.0 if dual_clip is None else float(dual_clip)
    params[P_RATIO_CLAMP] = float(ratio_log_clamp)
    params[P_VALUE_CLIP] = -1.0 if value_clip is None else float(value_clip)
    params[P_VALUE_CLIP_OPENRLHF] = float(value_clip_form == "openrlhf")
    params[P_KL_KIND], params[P_KL_STRAIGHT] = float(kind), float(straight)
    params[P_VF_COEF], params[P_KL_COEF] = float(vf_coef), float(kl_coef)
    params[P_ENTROPY_COEF], params[P_LM_COEF] = float(entropy_coef), float(lm_coef)
    return params


def _metrics(
    sums: Tensor, *, policy: bool, value: bool, kl: bool, entropy: bool, lm: bool
) -> dict[str, Tensor]:
    """0-d tensors (no device sync): means over the local valid tokens; 0 when none.

    Ratio min/mean/max are 1 (no policy change) when there is no valid token.
    """
    tokens = sums[S_TOKENS]
    denom = tokens.clamp(min=1)
    out = {"tokens": tokens}
    if policy:
        any_valid = tokens > 0
        one = torch.ones((), dtype=sums.dtype, device=sums.device)
        out.update(
            pg_loss=sums[S_PG],
            clipfrac_low=sums[S_CLIP_LOW] / denom,
            clipfrac_high=sums[S_CLIP_HIGH] / denom,
            clipfrac=(sums[S_CLIP_LOW] + sums[S_CLIP_HIGH]) / denom,
            dual_clipfrac=sums[S_DUAL_CLIP] / denom,
            approx_kl=sums[S_NEG_LOG_RATIO] / denom,
            approx_kl_k3=sums[S_K3] / denom,
            ratio_mean=torch.where(any_valid, sums[S_RATIO_SUM] / denom, one),
            ratio_min=torch.where(any_valid, sums[S_RATIO_MIN], one),
            ratio_max=torch.where(any_valid, sums[S_RATIO_MAX], one),
        )
    if value:
        out.update(vf_loss=sums[S_VF], vf_clipfrac=sums[S_VF_CLIP] / denom)
    if kl:
        out["kl_loss"] = sums[S_KL]
    if entropy:
        out["entropy"] = sums[S_ENTROPY]
    if lm:
        out["lm_loss"] = sums[S_LM]
    return {k: v.detach() for k, v in out.items()}


def _need_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def vapo_loss(
    logp: Tensor | None,
    old_logp: Tensor | None = None,
    advantages: Tensor | None = None,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    values: Tensor | None = None,
    old_values: Tensor | None = None,
    returns: Tensor | None = None,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    positive: Tensor | None = None,
    is_weights: Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    ratio_log_clamp: float = 20.0,
    value_clip: float | None = 0.5,
    value_clip_form: str = "verl",
    vf_coef: float = 1.0,
    kl_kind: str = "k3",
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    lm_coef: float = 0.1,
    agg: str = "token-mean",
    global_tokens: float | Tensor | None = None,
    global_seqs: float | Tensor | None = None,
    global_positive_tokens: float | Tensor | None = None,
    dp_size: int = 1,
    loss_scale_factor: float | None = None,
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""VAPO's whole token-level objective in one pass: ``(loss, metrics)``.

    ``loss = pg + vf_coef * vf + kl_coef * kl - entropy_coef * H + lm_coef * lm`` where
    each term is present when its inputs are given (policy: ``old_logp`` and
    ``advantages``; value: ``values, old_values, returns``; KL: ``ref_logp``; entropy:
    ``entropy``; positive-example LM: ``positive``, one flag per sequence). pg, vf, kl and
    H are aggregated with ``agg``; lm is the mean NLL over the valid tokens of positive
    sequences (VAPO: lm_coef = 0.1). See the module docstring for every formula.
    ``metrics`` holds 0-d tensors: each term, clip fractions (low / high / dual), the
    approx-KL (mean of -log-ratio and k3), ratio min/mean/max, value clip fraction and
    the token count.
    """
    policy = advantages is not None or old_logp is not None
    if policy and (logp is None or old_logp is None or advantages is None):
        raise ValueError("the policy term needs logp, old_logp and advantages")
    value = any(t is not None for t in (values, old_values, returns))
    if value and (
        values is None or returns is None or (value_clip is not None and old_values is None)
    ):
        raise ValueError(
            "the value term needs values and returns (and old_values when value_clip is set)"
        )
    if ref_logp is not None and logp is None:
        raise ValueError("the KL term needs logp")
    if positive is not None and logp is None:
        raise ValueError("the positive-example LM term needs logp")
    if is_weights is not None and not policy:
        raise ValueError(
            "is_weights applies to the policy term, which needs old_logp and advantages"
        )
    params = _params(
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        ratio_log_clamp=ratio_log_clamp,
        value_clip=value_clip if value else None,
        value_clip_form=value_clip_form,
        kl_kind=kl_kind if ref_logp is not None else None,
        vf_coef=vf_coef,
        kl_coef=kl_coef,
        entropy_coef=entropy_coef,
        lm_coef=lm_coef,
    )
    if value and value_clip is None:
        old_values = None
    loss, sums, *_ = torch.ops.vapo.token_loss(
        logp if (policy or ref_logp is not None or positive is not None) else None,
        old_logp,
        advantages,
        values,
        old_values,
        returns,
        ref_logp,
        entropy,
        is_weights,
        mask,
        cu_seqlens,
        positive,
        params,
        agg,
        _count("global_tokens", global_tokens),
        _count("global_seqs", global_seqs),
        _count("global_positive_tokens", global_positive_tokens),
        float(dp_size),
        None if loss_scale_factor is None else float(loss_scale_factor),
        _need_grad(logp, values, entropy),
        backend or "",
    )
    metrics = _metrics(
        sums,
        policy=policy,
        value=value,
        kl=ref_logp is not None,
        entropy=entropy is not None,
        lm=positive is not None,
    )
    return loss, metrics


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    ratio_log_clamp: float = 20.0,
    agg: str = "token-mean",
    is_weights: Tensor | None = None,
    global_tokens: float | Tensor | None = None,
    global_seqs: float | Tensor | None = None,
    dp_size: int = 1,
    loss_scale_factor: float | None = None,
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO policy loss with Clip-Higher, dual clip and verl's aggregation modes.

    Per-token advantages. ``clip_high < clip_low`` is allowed (it is just another
    asymmetric trust region); both must be >= 0 and ``clip_low <= 1``. Returns
    ``(loss, metrics)``; see :func:`vapo_loss` for the metrics.
    """
    return vapo_loss(
        logp,
        old_logp,
        advantages,
        mask,
        cu_seqlens,
        is_weights=is_weights,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        ratio_log_clamp=ratio_log_clamp,
        lm_coef=0.0,
        agg=agg,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        dp_size=dp_size,
        loss_scale_factor=loss_scale_factor,
        backend=backend,
    )


def value_loss(
    values: Tensor,
    old_values: Tensor | None,
    returns: Tensor,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    clip: float | None = 0.5,
    clip_form: str = "verl",
    agg: str = "token-mean",
    global_tokens: float | Tensor | None = None,
    global_seqs: float | Tensor | None = None,
    dp_size: int = 1,
    loss_scale_factor: float | None = None,
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``0.5 agg(max((v - R)^2, (clip(v, v_old +- clip) - R)^2))``.

    ``clip_form="verl"`` clips as ``max(min(v, v_old + c), v_old - c)``; ``"openrlhf"`` as
    ``v_old + clamp(v - v_old, -c, c)`` (the same number up to rounding). ``clip=None``:
    unclipped. Metrics: ``vf_loss``, ``vf_clipfrac``, ``tokens``.
    """
    return vapo_loss(
        None,
        values=values,
        old_values=old_values,
        returns=returns,
        mask=mask,
        cu_seqlens=cu_seqlens,
        value_clip=clip,
        value_clip_form=clip_form,
        vf_coef=1.0,
        lm_coef=0.0,
        agg=agg,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        dp_size=dp_size,
        loss_scale_factor=loss_scale_factor,
        backend=backend,
    )


def kl_loss(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    kind: str = "k3",
    agg: str = "token-mean",
    global_tokens: float | Tensor | None = None,
    global_seqs: float | Tensor | None = None,
    dp_size: int = 1,
    loss_scale_factor: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """``agg(kl_penalty(logp, ref_logp, kind))`` in one pass (verl's use_kl_loss term)."""
    loss, _ = vapo_loss(
        logp,
        ref_logp=ref_logp,
        mask=mask,
        cu_seqlens=cu_seqlens,
        kl_kind=kind,
        kl_coef=1.0,
        lm_coef=0.0,
        agg=agg,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        dp_size=dp_size,
        loss_scale_factor=loss_scale_factor,
        backend=backend,
    )
    return loss


def agg_loss(
    loss_mat: Tensor,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    agg: str = "token-mean",
    global_tokens: float | Tensor | None = None,
    global_seqs: float | Tensor | None = None,
    dp_size: int = 1,
    loss_scale_factor: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """Aggregate a per-token loss with verl's modes (e.g. an entropy bonus: ``agg_loss(H)``).

    Differentiable with respect to ``loss_mat``; masked slots never contribute.
    """
    loss, _ = vapo_loss(
        None,
        entropy=loss_mat,
        mask=mask,
        cu_seqlens=cu_seqlens,
        entropy_coef=-1.0,
        lm_coef=0.0,
        agg=agg,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        dp_size=dp_size,
        loss_scale_factor=loss_scale_factor,
        backend=backend,
    )
    return loss


def positive_lm_loss(
    logp: Tensor,
    positive: Tensor,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    global_positive_tokens: float | Tensor | None = None,
    dp_size: int = 1,
    backend: str | None = None,
) -> Tensor:
    """VAPO's positive-example LM loss: mean NLL ``-logp`` over the valid tokens of the
    sequences with ``positive[s]`` set (0 when there are none). Multiply by mu (0.1)."""
    loss, _ = vapo_loss(
        logp,
        positive=positive,
        mask=mask,
        cu_seqlens=cu_seqlens,
        lm_coef=1.0,
        global_positive_tokens=global_positive_tokens,
        dp_size=dp_size,
        backend=backend,
    )
    return loss


# --------------------------------------------------------------------------------------
# From logits to the loss and its gradient in one kernel: ``vapo::logits_loss``.
#
# Per row (token) the kernel reads the logits once for the log-sum-exp, the target's
# log-prob and the entropy; evaluates the token's loss terms, its metrics and
# d loss / d logp, d loss / d H in registers; and, reading the row again (from cache),
# writes d loss / d logits - in place over the logits with ``logits_loss_``. Nothing
# per token (log-prob, entropy, ratio, clip flags, gradients) goes through memory: the
# only outputs are the loss, the NUM_SUMS sums and the N x V gradient.
#
# From hidden states and the LM head, ``policy_loss_from_hidden`` composes the fused
# LM-head kernels of :mod:`vapo_kernels.ops.logprobs` (no N x V tensor exists at all)
# with the token-loss op; only per-token vectors (4 bytes x N) pass between them.


def reference_logits_kernel(
    logits: Tensor,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    ref_logp: Tensor | None,
    is_weights: Tensor | None,
    valid: Tensor,
    offsets: Tensor,
    seq_weight: Tensor,
    lm_weight: Tensor | None,
    params: Sequence[float],
    temperature: float,
    out: Tensor | None,
) -> Tensor:
    """The kernel contract of ``vapo::logits_loss``: log-probs, loss and gradient in one.

    ``logits`` (N, V) any float dtype, last dim contiguous; ``targets`` (N,) int64, in
    [0, V) on valid rows; ``old_logp, advantages, ref_logp, is_weights`` (N,) contiguous
    in the accumulation dtype (float32; float64 for float64 logits), the last two None
    when off; ``valid`` (N,) bool: the rows that count (mask set, target not -100);
    ``offsets, seq_weight, lm_weight, params`` as in :func:`reference_kernel` (the
    entropy of each row is always an input of the loss, with coefficient
    ``params[P_ENTROPY_COEF]``, so its weighted sum is a metric). ``out``: None (no
    gradient) or (N, V) in logits' dtype, possibly ``logits`` itself, which receives
    d loss / d logits (zero rows where not valid).

    Returns ``sums`` (NUM_SUMS,) in the accumulation dtype. By definition the result is
    :func:`vapo_kernels.ops.logprobs.reference_forward`, then :func:`reference_kernel`,
    then :func:`~vapo_kernels.ops.logprobs.reference_backward`; fused backends do the
    three per row without writing the per-token vectors in between.
    """
    logp, entropy, lse = lp_ops.reference_forward(logits, targets, valid, temperature)
    sums, g_logp, _, g_entropy = reference_kernel(
        logp, old_logp, advantages, None, None, None, ref_logp, entropy, is_weights, valid,
        offsets, seq_weight, lm_weight, params, out is not None,
    )
    if out is not None:
        lp_ops.reference_backward(
            g_logp, g_entropy if params[P_ENTROPY_COEF] != 0 else None, logits, targets,
            valid, lse, entropy, temperature, out,
        )
    return sums


_backends.register("logits_loss", "reference")(reference_logits_kernel)
_backends.register("logits_loss", "cpp")(_backends.from_extension("logits_loss_cpu"))
_backends.register("logits_loss", "triton")(
    _backends.from_module("vapo_kernels.triton.loss", "logits_loss")
)

_LOGITS_TOKEN_ARGS = ("old_logp", "advantages", "ref_logp", "is_weights")


def _check_logits_static(
    logits, targets, old_logp, advantages, ref_logp, is_weights, mask, cu_seqlens, positive,
    params, temperature, agg, loss_scale_factor,
):
    lp_ops._check_static(logits, targets, mask, temperature)
    for name, t in (("old_logp", old_logp), ("advantages", advantages)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    tensors = (None, old_logp, advantages, None, None, None, ref_logp, None, is_weights)
    layout = _check_static(tensors, mask, cu_seqlens, positive, params, agg, loss_scale_factor)
    if old_logp.shape != targets.shape:
        raise ValueError(
            f"old_logp has shape {tuple(old_logp.shape)} but targets {tuple(targets.shape)}: "
            "one entry per token"
        )
    return layout


def _logits_loss(
    logits, targets, old_logp, advantages, ref_logp, is_weights, mask, cu_seqlens, positive,
    params, temperature, agg, global_tokens, global_seqs, global_positive_tokens, dp_size,
    loss_scale_factor, out, backend,
) -> tuple[Tensor, Tensor]:
    """Both ops' body: ``(loss, sums)``, the gradient written into ``out`` unless None."""
    layout = _check_logits_static(
        logits, targets, old_logp, advantages, ref_logp, is_weights, mask, cu_seqlens,
        positive, params, temperature, agg, loss_scale_factor,
    )
    lp_ops._check_targets_in_range(targets, logits.shape[-1])
    device, shape = logits.device, targets.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat_targets = targets.reshape(-1).long().contiguous()
    valid = _loss_mask(mask, targets).reshape(-1).contiguous()
    name, kernel = _backends.select("logits_loss", device, backend or None)
    offs, seq_w, lm_w = _aggregation_weights(
        layout, shape, device, cu_seqlens, valid, positive, acc, name, agg, global_tokens,
        global_seqs, global_positive_tokens, dp_size, loss_scale_factor,
    )
    flat = [
        None if t is None else t.reshape(-1).to(acc).contiguous()
        for t in (old_logp, advantages, ref_logp, is_weights)
    ]
    sums = kernel(
        lp_ops._rows(logits), flat_targets, *flat, valid, offs, seq_w, lm_w,
        [float(p) for p in params], float(temperature),
        None if out is None else lp_ops._rows(out),
    )
    loss = _total(sums, params)
    if _ragged.validation_enabled() and bool(torch.isnan(loss)):
        _screen_nan(loss, zip(_LOGITS_TOKEN_ARGS, flat), valid)
        # A NaN (or +inf) logit makes its row's gradient NaN; in place the logits are
        # gone, but their gradient rows show it just as well.
        rows = lp_ops._rows(logits if out is None else out)
        if bool((rows.isnan().any(-1) & valid).any()):
            raise ValueError("logits contain NaN or +inf in a valid row")
    return loss, sums


@torch.library.custom_op("vapo::logits_loss", mutates_args=())
def logits_loss_op(
    logits: Tensor,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    ref_logp: Tensor | None,
    is_weights: Tensor | None,
    mask: Tensor | None,
    cu_seqlens: Tensor | None,
    positive: Tensor | None,
    params: Sequence[float],
    temperature: float,
    agg: str,
    global_tokens: float | None,
    global_seqs: float | None,
    global_positive_tokens: float | None,
    dp_size: float,
    loss_scale_factor: float | None,
    need_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, sums, grad_logits)`` from logits in one kernel; ``grad_logits`` has
    logits' shape and dtype (empty when ``need_grad`` is False). The gradient is the
    caller's to scale: this op has no autograd formula of its own (see
    :func:`policy_loss_from_logits`)."""
    grad = _backends.empty_output(logits) if need_grad else logits.new_empty((0,))
    loss, sums = _logits_loss(
        logits, targets, old_logp, advantages, ref_logp, is_weights, mask, cu_seqlens,
        positive, params, temperature, agg, global_tokens, global_seqs,
        global_positive_tokens, dp_size, loss_scale_factor, grad if need_grad else None,
        backend,
    )
    return loss, sums, grad


@torch.library.custom_op("vapo::logits_loss_", mutates_args=("logits",))
def logits_loss_inplace_op(
    logits: Tensor,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    ref_logp: Tensor | None,
    is_weights: Tensor | None,
    mask: Tensor | None,
    cu_seqlens: Tensor | None,
    positive: Tensor | None,
    params: Sequence[float],
    temperature: float,
    agg: str,
    global_tokens: float | None,
    global_seqs: float | None,
    global_positive_tokens: float | None,
    dp_size: float,
    loss_scale_factor: float | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(loss, sums)``; d loss / d logits is written over the logits themselves."""
    return _logits_loss(
        logits, targets, old_logp, advantages, ref_logp, is_weights, mask, cu_seqlens,
        positive, params, temperature, agg, global_tokens, global_seqs,
        global_positive_tokens, dp_size, loss_scale_factor, logits, backend,
    )


def _logits_loss_fake_outputs(logits, targets, old_logp, advantages, ref_logp, is_weights,
                              mask, cu_seqlens, positive, params, temperature, agg,
                              loss_scale_factor):
    _check_logits_static(
        logits, targets, old_logp, advantages, ref_logp, is_weights, mask, cu_seqlens,
        positive, params, temperature, agg, loss_scale_factor,
    )
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty((), dtype=acc), logits.new_empty((NUM_SUMS,), dtype=acc)


@logits_loss_op.register_fake
def _logits_loss_fake(
    logits, targets, old_logp, advantages, ref_logp, is_weights, mask, cu_seqlens, positive,
    params, temperature, agg, global_tokens, global_seqs, global_positive_tokens, dp_size,
    loss_scale_factor, need_grad, backend,
):
    loss, sums = _logits_loss_fake_outputs(
        logits, targets, old_logp, advantages, ref_logp, is_weights, mask, cu_seqlens,
        positive, params, temperature, agg, loss_scale_factor,
    )
    return loss, sums, torch.empty_like(logits) if need_grad else logits.new_empty((0,))


@logits_loss_inplace_op.register_fake
def _logits_loss_inplace_fake(
    logits, targets, old_logp, advantages, ref_logp, is_weights, mask, cu_seqlens, positive,
    params, temperature, agg, global_tokens, global_seqs, global_positive_tokens, dp_size,
    loss_scale_factor, backend,
):
    return _logits_loss_fake_outputs(
        logits, targets, old_logp, advantages, ref_logp, is_weights, mask, cu_seqlens,
        positive, params, temperature, agg, loss_scale_factor,
    )


# Keywords of :func:`vapo_loss` the from-logits / from-hidden paths pass through: every
# term whose gradient reaches the log-probs or entropies (a value term would not).
_PASSED_KEYWORDS = frozenset({
    "clip_low", "clip_high", "dual_clip", "ratio_log_clamp", "agg", "is_weights",
    "global_tokens", "global_seqs", "global_positive_tokens", "dp_size",
    "loss_scale_factor", "ref_logp", "kl_kind", "kl_coef", "entropy_coef", "positive",
    "lm_coef",
})


def _loss_kwargs(kw: dict) -> dict:
    unknown = set(kw) - _PASSED_KEYWORDS
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}")
    return {"lm_coef": 0.0, **kw}  # the positive-LM term only when asked for


# _params' keywords among policy_loss_from_logits' ones (the rest go to the op itself).
_PARAM_KEYWORDS = ("clip_low", "clip_high", "dual_clip", "ratio_log_clamp", "kl_coef",
                   "entropy_coef", "lm_coef")


def _logits_loss_args(logits, targets, old_logp, advantages, mask, cu_seqlens, temperature,
                      kw: dict) -> tuple:
    """The arguments of ``vapo::logits_loss(_)`` up to ``loss_scale_factor`` from
    :func:`policy_loss_from_logits`' own (defaults: :func:`_params`' and
    :func:`vapo_loss`')."""
    kw = _loss_kwargs(kw)
    ref_logp = kw.get("ref_logp")
    params = _params(
        kl_kind=kw.get("kl_kind", "k3") if ref_logp is not None else None,
        **{k: kw[k] for k in _PARAM_KEYWORDS if k in kw},
    )
    scale = kw.get("loss_scale_factor")
    return (
        logits, targets, old_logp, advantages, ref_logp, kw.get("is_weights"), mask,
        cu_seqlens, kw.get("positive"), params, temperature, kw.get("agg", "token-mean"),
        _count("global_tokens", kw.get("global_tokens")),
        _count("global_seqs", kw.get("global_seqs")),
        _count("global_positive_tokens", kw.get("global_positive_tokens")),
        float(kw.get("dp_size", 1)), None if scale is None else float(scale),
    )


def _logits_metrics(args: tuple, sums: Tensor) -> dict[str, Tensor]:
    """Metrics of a logits_loss call made with ``args`` (ref_logp: 4, positive: 8)."""
    return _metrics(
        sums, policy=True, value=False, kl=args[4] is not None, entropy=True,
        lm=args[8] is not None,
    )


def _loss_mask(mask: Tensor | None, targets: Tensor) -> Tensor:
    """Tokens the loss counts: mask set and target not the ignore index -100."""
    keep = targets != -100
    return keep if mask is None else keep & _ragged.as_bool_mask(mask)


def _loss_and_grads(logp, entropy, old_logp, advantages, mask, cu_seqlens, kw, need_grad, backend):
    """:func:`vapo_loss` on log-probs and entropies: ``(loss, metrics, d logp, d entropy)``.

    The gradients come from the op's own backward (they were written in its forward);
    d entropy is None when the entropy term has no coefficient (the entropy is still
    measured: the log-prob kernels compute it anyway).
    """
    args = (old_logp, advantages, mask, cu_seqlens)
    if not need_grad:
        loss, metrics = vapo_loss(logp, *args, entropy=entropy, backend=backend, **kw)
        return loss, metrics, None, None
    with_entropy = bool(kw.get("entropy_coef"))
    with torch.enable_grad():  # autograd.Function.forward runs without grad mode
        logp = logp.detach().requires_grad_()
        entropy = entropy.detach().requires_grad_(with_entropy)
        loss, metrics = vapo_loss(logp, *args, entropy=entropy, backend=backend, **kw)
        grads = torch.autograd.grad(loss, [logp, entropy] if with_entropy else [logp])
    return loss.detach(), metrics, grads[0], (grads[1] if with_entropy else None)


class _LossFromLogits(torch.autograd.Function):
    """The fused op in the forward; the backward scales the gradient it wrote."""

    @staticmethod
    def forward(ctx, logits, rest, inplace_backward, backend, metrics_out):
        args = (logits, *rest)
        if inplace_backward:
            loss, sums = torch.ops.vapo.logits_loss_(*args, backend)
            ctx.grad = logits
        else:
            loss, sums, ctx.grad = torch.ops.vapo.logits_loss(*args, True, backend)
        # ctx attribute, not save_for_backward: the in-place buffer has a bumped version.
        metrics_out.update(_logits_metrics(args, sums))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, ctx.grad = ctx.grad, None
        grad = grad.mul_(grad_loss.to(grad.dtype))  # scaled where it lies: no new N x V
        return grad, None, None, None, None


def policy_loss_from_logits(
    logits: Tensor,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    temperature: float = 1.0,
    inplace_backward: bool = False,
    backend: str | None = None,
    **kw,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Policy loss straight from logits ``(N, V)`` packed or ``(B, T, V)`` padded.

    Same result as ``policy_loss(token_logprobs(logits, targets, temperature=...), ...)``
    (plus, through ``kw``, the KL, entropy and positive-LM terms of :func:`vapo_loss`:
    ``ref_logp, kl_kind, kl_coef, entropy_coef, positive, lm_coef``), computed by one
    kernel (``vapo::logits_loss``) that also writes the gradient of the logits during the
    forward; ``inplace_backward=True`` writes it over the logits, which must then not be
    used again (leaf logits are refused). Targets -100 are left out. Computed in float32
    (float64 for float64 logits). Metrics include the aggregated entropy.
    """
    _check_temperature(temperature)
    if inplace_backward and logits.is_leaf and logits.requires_grad:
        raise RuntimeError(
            "policy_loss_from_logits(inplace_backward=True) would overwrite logits that are "
            "a leaf tensor the caller owns; pass inplace_backward=False"
        )
    args = _logits_loss_args(
        logits, targets, old_logp, advantages, mask, cu_seqlens, float(temperature), kw
    )
    backend = backend or ""
    if torch.is_grad_enabled() and logits.requires_grad:
        metrics: dict[str, Tensor] = {}
        loss = _LossFromLogits.apply(logits, args[1:], bool(inplace_backward), backend, metrics)
        return loss, metrics
    loss, sums, _ = torch.ops.vapo.logits_loss(*args, False, backend)
    return loss, _logits_metrics(args, sums)


def _check_temperature(temperature):
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not temperature > 0
    ):
        raise ValueError(f"temperature must be a float > 0, got {temperature!r}")


class _LossFromHidden(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, old_logp, advantages, mask, cu_seqlens,
        temperature, backend, kw, metrics_out,
    ):
        need_h = hidden.requires_grad
        need_w = weight.requires_grad or (bias is not None and bias.requires_grad)
        logp, entropy, lse = torch.ops.vapo.linear_logprobs(
            hidden, weight, bias, targets, mask, temperature, backend
        )
        loss, metrics, g_logp, g_ent = _loss_and_grads(
            logp, entropy, old_logp, advantages, _loss_mask(mask, targets), cu_seqlens, kw,
            True, backend,
        )
        gh, gw, gb = torch.ops.vapo.linear_logprobs_backward(
            g_logp, g_ent, hidden, weight, bias, targets, mask, lse, entropy, temperature,
            need_h, need_w, backend,
        )
        ctx.grads = (
            gh if need_h else None,
            gw if need_w else None,
            gb if (bias is not None and need_w) else None,
        )
        metrics_out.update(metrics)  # non-differentiable: handed back beside the graph
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        scaled = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        return (*scaled, *([None] * 9))


def policy_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    backend: str | None = None,
    **kw,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Policy loss from hidden states ``(N, H)`` / ``(B, T, H)`` and the LM head
    ``weight`` ``(V, H)`` (+ ``bias``): the N x V logits never exist (forward or
    backward). Gradients of hidden, weight and bias are computed in the forward pass.
    Keyword terms as in :func:`policy_loss_from_logits`."""
    kw = _loss_kwargs(kw)
    _check_temperature(temperature)
    temperature, backend = float(temperature), backend or ""
    params = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in params):
        metrics: dict[str, Tensor] = {}
        loss = _LossFromHidden.apply(
            hidden, weight, bias, targets, old_logp, advantages, mask, cu_seqlens,
            temperature, backend, kw, metrics,
        )
        return loss, metrics
    logp, entropy, _ = torch.ops.vapo.linear_logprobs(
        hidden, weight, bias, targets, mask, temperature, backend
    )
    loss, metrics, _, _ = _loss_and_grads(
        logp, entropy, old_logp, advantages, _loss_mask(mask, targets), cu_seqlens, kw,
        False, backend,
    )
    return loss, metrics
