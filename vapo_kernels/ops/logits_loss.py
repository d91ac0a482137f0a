r"""``vapo::logits_loss``: from logits to the policy loss and d loss / d logits, one kernel.

Per row (token) the kernel reads the logits once for the log-sum-exp, the target's
log-prob and the entropy; evaluates the token's loss terms (:mod:`.loss_spec`), its
metrics and d loss / d logp, d loss / d H in registers; and, reading the row again (from
cache), writes d loss / d logits - over the logits themselves with ``logits_loss_``.
Nothing per token (log-prob, entropy, ratio, clip flags, gradients) goes through memory:
the outputs are the loss, the sums vector and the N x V gradient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .. import _backends, _ragged
from .. import _loss_layout as L
from .._library import Op, loss_from_gradients
from . import loss_spec
from . import token_logprobs as lp_ops
from .token_loss import (
    LOSS_OVERFLOW,
    aggregation_weights,
    check_aggregation,
    rollout_mode,
    rollout_options,
)


def reference_logits_kernel(
    logits: Tensor,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    ref_logp: Tensor | None,
    is_weights: Tensor | None,
    mask: Tensor,
    offsets: Tensor,
    seq_weight: Tensor | None,
    lm_weight: Tensor | None,
    params: Sequence[float],
    temperature: float,
    out: Tensor | None,
) -> Tensor:
    """The kernel contract of ``vapo::logits_loss``: log-probs, loss and gradient in one.

    ``logits`` (N, V) any float dtype, last dim contiguous; ``targets`` (N,) int64, in
    [0, V) on valid rows; ``old_logp, advantages, ref_logp, is_weights`` (N,) contiguous
    in the accumulation dtype (float32; float64 for float64 logits), the last two None
    when off (``is_weights`` holds the rollout log-probs when ``params[P_ROLLOUT_IS] > 0``,
    as in :func:`.loss_spec.reference_kernel`); ``mask`` (N,) bool: the rows that count
    (mask set, target not -100);
    ``offsets, seq_weight, lm_weight, params`` as in :func:`.loss_spec.reference_kernel`
    (the entropy of each row is always an input of the loss, with coefficient
    ``params[P_ENTROPY_COEF]``, so its weighted sum is a metric). ``out``: None (no
    gradient) or (N, V) in logits' dtype, possibly ``logits`` itself, which receives
    d loss / d logits (zero rows where not valid).

    Returns ``sums`` (NUM_SUMS,) in the accumulation dtype. By definition the result is
    the log-prob forward, then the token-loss reference, then the log-prob backward;
    fused backends do the three per row without writing per-token vectors in between.
    """
    logp, entropy, lse = lp_ops.reference_forward(logits, targets, mask, temperature)
    _, sums, g_logp, _, g_entropy = loss_spec.reference_kernel(
        logp, old_logp, advantages, None, None, None, ref_logp, entropy, is_weights, mask,
        offsets, seq_weight, lm_weight, params, out is not None,
    )
    if out is not None:
        lp_ops.reference_backward(
            g_logp, g_entropy if params[L.P_ENTROPY_COEF] != 0 else None, logits, targets,
            mask, lse, entropy, temperature, out,
        )
    return sums


_backends.register("logits_loss", "reference")(reference_logits_kernel)
_backends.register("logits_loss", "cpp")(_backends.from_extension("logits_loss_cpu"))
_backends.register("logits_loss", "triton")(
    _backends.from_module("vapo_kernels.triton.loss", "logits_loss")
)


class LogitsLossArgs(NamedTuple):
    """The arguments of ``vapo::logits_loss`` and ``vapo::logits_loss_`` (the in-place op
    always writes the gradient: its ``need_grad`` must be True). With the rollout
    correction on (``params[P_ROLLOUT_IS] > 0``) ``is_weights`` holds ``rollout_logp``."""

    logits: Tensor
    targets: Tensor
    old_logp: Tensor
    advantages: Tensor
    ref_logp: Tensor | None
    is_weights: Tensor | None
    mask: Tensor | None
    cu_seqlens: Tensor | None
    positive: Tensor | None
    params: Sequence[float]
    temperature: float
    agg: str
    global_tokens: float | None
    global_seqs: float | None
    global_positive_tokens: float | None
    dp_size: float
    loss_scale_factor: float | None
    need_grad: bool
    backend: str


_TOKEN_INPUTS = ("old_logp", "advantages", "ref_logp", "is_weights")
_ROLLOUT_INPUTS = ("old_logp", "advantages", "ref_logp", "rollout_logp")


def _check_static(a: LogitsLossArgs) -> _ragged.Layout:
    lp_ops._check_static(a.logits, a.targets, a.mask, a.temperature)
    for name in ("old_logp", "advantages"):
        if not isinstance(getattr(a, name), Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(getattr(a, name)).__name__}")
    if a.old_logp.shape != a.targets.shape:
        raise ValueError(
            f"old_logp has shape {tuple(a.old_logp.shape)} but targets "
            f"{tuple(a.targets.shape)}: one entry per token"
        )
    rollout = len(a.params) > L.P_ROLLOUT_IS and a.params[L.P_ROLLOUT_IS]
    given = {
        name: t
        for name, t in zip(_ROLLOUT_INPUTS if rollout else _TOKEN_INPUTS,
                           (a.old_logp, a.advantages, a.ref_logp, a.is_weights))
        if t is not None
    }
    layout = _ragged.check_layout(given, a.mask, a.cu_seqlens)
    check_aggregation(a, layout)  # also: the rollout correction has its log-probs
    return layout


def _loss_sums(a: LogitsLossArgs, out: Tensor | None) -> tuple[Tensor, Tensor]:
    """Both ops' body: ``(loss, sums)``, the gradient written into ``out`` unless None."""
    layout = _check_static(a)
    lp_ops._check_targets_in_range(a.targets, a.logits.shape[-1])
    device, shape = a.logits.device, a.targets.shape
    acc = _ragged.acc_dtype(a.logits.dtype)
    valid = loss_mask(a.mask, a.targets).reshape(-1).contiguous()
    _, kernel = _backends.select("logits_loss", device, a.backend)
    offs, seq_w, lm_w = aggregation_weights(a, layout, shape, device, valid, acc)
    flat = [
        None if t is None else t.reshape(-1).to(acc).contiguous()
        for t in (a.old_logp, a.advantages, a.ref_logp, a.is_weights)
    ]
    sums = kernel(
        lp_ops._rows(a.logits), a.targets.reshape(-1).long().contiguous(), *flat, valid,
        offs, seq_w, lm_w, list(a.params), float(a.temperature),
        None if out is None else lp_ops._rows(out, writable=True),
    )
    loss = L.loss_total(sums, a.params)
    if _ragged.validation_enabled() and not math.isfinite(loss.item()):
        names = _ROLLOUT_INPUTS if a.params[L.P_ROLLOUT_IS] else _TOKEN_INPUTS
        named = [(name, t) for name, t in zip(names, flat) if t is not None]
        for name, t in named:  # a NaN input first: it also makes its row's gradient NaN
            _ragged.check_no_nan_where_valid(name, t, valid)
        # A NaN (or +inf) logit makes its row's gradient NaN; in place the logits are
        # gone, but their gradient rows show it just as well.
        rows = lp_ops._rows(a.logits if out is None else out)
        bad = rows.isnan() if out is not None else rows.isnan() | (rows == math.inf)
        if bool((bad.any(-1) & valid).any()):
            raise ValueError("logits contain NaN or +inf in a valid row")
        for name, t in named:
            _ragged.check_no_inf_where_valid(name, t, valid, "the loss")
        raise ValueError(LOSS_OVERFLOW)
    return loss, sums


def _impl(a: LogitsLossArgs):
    grad = _backends.empty_output(a.logits) if a.need_grad else a.logits.new_empty((0,))
    loss, sums = _loss_sums(a, grad if a.need_grad else None)
    return loss, sums, grad


def _fake(a: LogitsLossArgs):
    _check_static(a)
    acc = _ragged.acc_dtype(a.logits.dtype)
    grad = torch.empty_like(a.logits) if a.need_grad else a.logits.new_empty((0,))
    return a.logits.new_empty((), dtype=acc), a.logits.new_empty((L.NUM_SUMS,), dtype=acc), grad


def _impl_inplace(a: LogitsLossArgs):
    if not a.need_grad:
        raise ValueError("logits_loss_ writes the gradient over the logits: need_grad=True")
    return _loss_sums(a, a.logits)


def _fake_inplace(a: LogitsLossArgs):
    return _fake(a)[:2]


# Neither op has an autograd formula: the gradient is computed in the forward, and
# policy_loss_from_logits hands it to the loss node (_library.loss_from_gradients).
logits_loss_op = Op("logits_loss", LogitsLossArgs, "(Tensor, Tensor, Tensor)", _impl, _fake)
logits_loss_inplace_op = Op(
    "logits_loss_", LogitsLossArgs, "(Tensor, Tensor)", _impl_inplace, _fake_inplace,
    mutates=("logits",),
)


def loss_mask(mask: Tensor | None, targets: Tensor) -> Tensor:
    """Tokens the loss counts: mask set and target not the ignore index -100."""
    keep = targets != lp_ops.IGNORE_INDEX
    return keep if mask is None else keep & _ragged.as_bool_mask(mask)


# --------------------------------------------------------------------------------------
# Public API


# The keywords of vapo_loss that reach the log-probs or entropies (a value term would
# not), accepted by the from-logits and from-hidden losses, with their defaults.
LOGP_LOSS_KEYWORDS = {
    "clip_low": 0.2, "clip_high": 0.28, "dual_clip": None, "ratio_log_clamp": 20.0,
    "is_weights": None, "rollout_logp": None, "rollout_is": None, "rollout_is_mode": None,
    "rollout_is_threshold": None, "rollout_is_threshold_lower": None,
    "ref_logp": None, "kl_kind": "k3", "kl_coef": None,
    "entropy_coef": None, "positive": None, "lm_coef": None, "agg": "token-mean",
    "global_tokens": None, "global_seqs": None, "global_positive_tokens": None,
    "dp_size": 1, "loss_scale_factor": None,
}


def logp_loss_options(kw: dict) -> dict:
    """The from-logits / from-hidden keywords with defaults filled in and checked: an
    unknown keyword or a coefficient whose term has no input raises, naming it."""
    unknown = set(kw) - set(LOGP_LOSS_KEYWORDS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}")
    o = {**LOGP_LOSS_KEYWORDS, **kw}
    if o["kl_kind"] != "k3":  # checked with or without the KL term: None would turn it off
        loss_spec.kl_codes(o["kl_kind"])
    for coef, needs in (("kl_coef", "ref_logp"), ("lm_coef", "positive")):
        if o[coef] and o[needs] is None:  # an explicit 0 ignores nothing
            raise ValueError(f"{coef}={o[coef]!r} is set but its term is off: pass {needs}")
    rollout = rollout_options(
        o["rollout_logp"], o["is_weights"], True, o["rollout_is"], o["rollout_is_mode"],
        o["rollout_is_threshold"], o["rollout_is_threshold_lower"],
    )
    o["params"] = loss_spec.loss_params(
        clip_low=o["clip_low"], clip_high=o["clip_high"], dual_clip=o["dual_clip"],
        ratio_log_clamp=o["ratio_log_clamp"],
        kl_kind=o["kl_kind"] if o["ref_logp"] is not None else None,
        kl_coef=o["kl_coef"] or 0.0, entropy_coef=o["entropy_coef"] or 0.0,
        lm_coef=(0.1 if o["lm_coef"] is None else o["lm_coef"]) if o["positive"] is not None
        else 0.0,
        **rollout,
    )
    # The kernels read rollout_logp in the is_weights slot (params say which it holds).
    o["weights_slot"] = o["is_weights"] if o["rollout_logp"] is None else o["rollout_logp"]
    o["aggregation"] = loss_spec.aggregation_scalars(
        o["global_tokens"], o["global_seqs"], o["global_positive_tokens"], o["dp_size"],
        o["loss_scale_factor"],
    )
    return o


def logp_loss_metrics(o: dict, sums: Tensor) -> dict[str, Tensor]:
    """Metrics of a from-logits / from-hidden call (the entropy is always measured)."""
    return loss_spec.loss_metrics(
        sums, policy=True, value=False, kl=o["ref_logp"] is not None, entropy=True,
        lm=o["positive"] is not None, rollout=rollout_mode(o["params"]),
    )


def check_flat_input(name: str, x: Tensor, cu_seqlens: Tensor | None) -> None:
    """Flat (N, D) rows are packed sequences: they need cu_seqlens to say where each ends."""
    if isinstance(x, Tensor) and x.dim() == 2 and cu_seqlens is None:
        raise ValueError(
            f"{name} is flat, shape {tuple(x.shape)}: pass cu_seqlens for packed (N, D) rows, "
            f"or give {name} a batch dimension (B, T, D)"
        )


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
) -> tuple[Tensor, Mapping[str, Tensor]]:
    """Policy loss straight from logits ``(N, V)`` packed (with ``cu_seqlens``) or
    ``(B, T, V)`` padded: ``(loss, metrics)``.

    Same result as ``policy_loss(token_logprobs(logits, targets, temperature=...), ...)``
    (plus, through ``kw``, the importance weights, rollout correction, KL, entropy and
    positive-LM terms of :func:`vapo_loss`: ``is_weights, rollout_logp, rollout_is,
    rollout_is_mode, rollout_is_threshold, rollout_is_threshold_lower, ref_logp, kl_kind,
    kl_coef, entropy_coef, positive, lm_coef``), computed by one
    kernel (``vapo::logits_loss``) that also writes the gradient of the logits during the
    forward; ``inplace_backward=True`` writes it over the logits during this call (not
    at the backward, as :func:`token_logprobs` does), so they hold the gradient once it
    returns and must not be read again (leaf logits are refused). Targets -100 are left out. Computed in float32
    (float64 for float64 logits). Metrics include the aggregated entropy.
    """
    temperature = lp_ops.check_temperature(temperature)
    check_flat_input("logits", logits, cu_seqlens)
    logits = lp_ops.rows_viewable(logits)  # logits[:, :-1] is copied once
    if isinstance(logits, Tensor) and logits.dim() >= 1:
        targets = lp_ops.masked_targets(targets, logits.shape[-1], mask)
    if inplace_backward:
        lp_ops.refuse_overwriting_callers_leaf("policy_loss_from_logits", logits)
    o = logp_loss_options(kw)
    grad = torch.is_grad_enabled() and logits.requires_grad
    a = LogitsLossArgs(
        logits, targets, old_logp, advantages, o["ref_logp"], o["weights_slot"], mask,
        cu_seqlens, o["positive"], o["params"], temperature, o["agg"], *o["aggregation"],
        grad, backend or "",
    )
    if not grad:
        loss, sums, _ = logits_loss_op(a)
        return loss, logp_loss_metrics(o, sums)
    with torch.no_grad():  # the kernel writes the gradient: the graph is one node
        if inplace_backward:
            loss, sums = logits_loss_inplace_op(a)
            grad_logits = logits
        else:
            loss, sums, grad_logits = logits_loss_op(a)
    loss = loss_from_gradients(loss, [logits], [grad_logits], "logits_loss",
                               donated=bool(inplace_backward))
    return loss, logp_loss_metrics(o, sums)
