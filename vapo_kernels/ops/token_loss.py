r"""``vapo::token_loss``: every PPO / VAPO loss term from per-token log-probs, in one pass.

The formulas are in :mod:`.loss_spec`. The op takes per-token tensors (padded ``(B, T)``
+ mask, or packed ``(N,)`` + ``cu_seqlens``), the options vector (``P_*`` slots of
:mod:`vapo_kernels._loss_layout`) and the aggregation; it returns ``(loss, sums,
grad_logp, grad_values, grad_entropy)``: the loss is linear in the per-sequence weights
and every term is elementwise, so the kernel writes the gradients as it reads the tokens
and the backward only scales them. The public losses below (:func:`vapo_loss`,
:func:`policy_loss`, :func:`value_loss`, :func:`kl_loss`, :func:`agg_loss`,
:func:`positive_lm_loss`) are this op with some terms switched off; each returns
``(loss, metrics)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .. import _backends, _ragged
from .. import _loss_layout as L
from .. import _library
from .._library import Op, first_order
from . import loss_spec
from .loss_spec import AGG_MODES, loss_metrics, loss_params, sequence_weights

_backends.register("token_loss", "reference")(loss_spec.reference_kernel)
_backends.register("token_loss", "cpp")(_backends.from_extension("token_loss_cpu"))
_backends.register("token_loss", "triton")(
    _backends.from_module("vapo_kernels.triton.loss", "token_loss")
)


class TokenLossArgs(NamedTuple):
    """The arguments of ``vapo::token_loss`` (its schema is made from these hints). With
    the rollout correction on (``params[P_ROLLOUT_IS] > 0``) ``is_weights`` holds
    ``rollout_logp``, from which the kernels compute the weights: the two never come
    together, and one slot keeps every kernel's signature as it was."""

    logp: Tensor | None
    old_logp: Tensor | None
    advantages: Tensor | None
    values: Tensor | None
    old_values: Tensor | None
    returns: Tensor | None
    ref_logp: Tensor | None
    entropy: Tensor | None
    is_weights: Tensor | None
    mask: Tensor | None
    cu_seqlens: Tensor | None
    positive: Tensor | None
    params: Sequence[float]
    agg: str
    global_tokens: float | None
    global_seqs: float | None
    global_positive_tokens: float | None
    dp_size: float
    loss_scale_factor: float | None
    need_grad: bool
    backend: str


# The per-token inputs, in the kernel contract's order; with the rollout correction on
# (params[P_ROLLOUT_IS] > 0) the is_weights slot holds rollout_logp, named so in errors.
TOKEN_INPUTS = TokenLossArgs._fields[:9]
ROLLOUT_INPUTS = (*TOKEN_INPUTS[:8], "rollout_logp")


def rollout_mode(params: Sequence[float]) -> str | None:
    """The rollout correction's mode ('truncate' or 'mask') in ``params``, None when off."""
    if not params[L.P_ROLLOUT_IS]:
        return None
    return "mask" if params[L.P_ROLLOUT_IS_MASK] else "truncate"


def rollout_options(
    rollout_logp, is_weights, policy: bool, rollout_is, rollout_is_mode, rollout_is_threshold,
    rollout_is_threshold_lower,
) -> dict:
    """The rollout-correction keywords of :func:`.loss_spec.loss_params` from the public
    ones, after the checks that need the inputs (the options' own checks are there);
    ``{}`` when nothing of it is given (the common path, checked first)."""
    if (rollout_logp is None and rollout_is is None and rollout_is_mode is None
            and rollout_is_threshold is None and rollout_is_threshold_lower is None):
        return {}  # the common path, first
    options = {
        "rollout_is": rollout_is,
        "rollout_is_mode": rollout_is_mode,
        "rollout_is_threshold": rollout_is_threshold,
        "rollout_is_threshold_lower": rollout_is_threshold_lower,
    }
    if rollout_logp is None:
        if rollout_is is not None:
            raise ValueError(
                f"rollout_is={rollout_is!r} needs rollout_logp, the log-probs the rollout "
                "engine reported for the sampled tokens"
            )
        return options  # loss_params names the option set while rollout_is is None
    if rollout_is is None:
        raise ValueError(
            "rollout_logp is given but rollout_is is None, so it would be ignored: pass "
            f"rollout_is={sorted(loss_spec.ROLLOUT_IS_LEVELS)} to correct the policy term"
        )
    if is_weights is not None:
        raise ValueError(
            "is_weights and rollout_logp are both given: the rollout correction computes the "
            "importance weights from rollout_logp; pass one of them"
        )
    if not policy:
        raise ValueError(
            "rollout_logp corrects the policy term, which needs old_logp and advantages"
        )
    if not isinstance(rollout_logp, Tensor):
        raise TypeError(f"rollout_logp must be a tensor, got {type(rollout_logp).__name__}")
    return options


def check_aggregation(a, layout: _ragged.Layout) -> None:
    """Static checks of the aggregation arguments shared by the loss ops (``a``: an args
    tuple with ``positive, params, agg, loss_scale_factor`` fields)."""
    if a.agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {a.agg!r}")
    if a.agg == "seq-mean-token-sum-norm" and layout.packed and a.loss_scale_factor is None:
        raise ValueError(
            "agg='seq-mean-token-sum-norm' on packed input needs loss_scale_factor "
            "(verl divides by the padded response length)"
        )
    if a.positive is not None:
        if not isinstance(a.positive, Tensor):
            raise TypeError(f"positive must be a tensor or None, got {type(a.positive).__name__}")
        if a.positive.shape != (layout.num_seqs,):
            raise ValueError(
                f"positive must have one entry per sequence, shape ({layout.num_seqs},), "
                f"got {tuple(a.positive.shape)}"
            )
    if len(a.params) != L.NUM_PARAMS:
        raise ValueError(f"params must hold {L.NUM_PARAMS} floats, got {len(a.params)}")
    if a.params[L.P_ROLLOUT_IS]:
        if a.params[L.P_ROLLOUT_IS] not in L.ROLLOUT_IS_CODES.values():
            raise ValueError(
                f"params[P_ROLLOUT_IS] must be 0 (off) or one of {L.ROLLOUT_IS_CODES}, "
                f"got {a.params[L.P_ROLLOUT_IS]}"
            )
        if a.is_weights is None or a.advantages is None:
            raise ValueError(
                "params[P_ROLLOUT_IS] is set: the policy term and rollout_logp (in the "
                "is_weights slot) are needed"
            )


def _input_names(a) -> tuple[str, ...]:
    """The names of the token inputs, for errors (the is_weights slot may hold rollout_logp).
    Without is_weights (the common case) no look at params: this runs on every call."""
    if a.is_weights is None or len(a.params) <= L.P_ROLLOUT_IS or not a.params[L.P_ROLLOUT_IS]:
        return TOKEN_INPUTS
    return ROLLOUT_INPUTS


def _check_static(a: TokenLossArgs) -> _ragged.Layout:
    given = {k: t for k, t in zip(_input_names(a), a) if t is not None}
    if not given:
        raise ValueError("token_loss needs at least one of logp, values or entropy")
    layout = _ragged.check_layout(given, a.mask, a.cu_seqlens)
    check_aggregation(a, layout)
    return layout


def _input_dtype(tensors) -> torch.dtype:
    """The one float dtype the kernels read: the inputs' promoted dtype (mixed inputs are
    rare, and converted once). Its ``_ragged.acc_dtype`` is the output dtype: float64 if
    any input is."""
    dtype = next(t for t in tensors if t is not None).dtype
    for t in tensors:
        if t is not None and t.dtype != dtype:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def aggregation_weights(a, layout, shape, device, mask, acc):
    """``(offsets, seq_weight, lm_weight)`` of the loss kernels' contract for the valid
    tokens (``shape``: the token tensors' shape, (B, T) padded or (N,) packed; ``mask``:
    bool of that shape or None; ``a``: the op's args). The plain token mean is
    ``seq_weight=None``: the kernels count the tokens themselves. Other token-level modes
    need only the total count (one reduction); the rest take per-sequence counts from the
    family's counting kernel."""
    if layout.packed:
        _ragged.check_cu_seqlens_values(a.cu_seqlens, layout.num_tokens)
    offs = _ragged.offsets(layout, shape, a.cu_seqlens, device)
    num_seqs = layout.num_seqs
    if a.agg in ("token-mean", "token-sum") and a.positive is None:
        # The common case (VAPO's token-mean) in as few ops as possible: at micro-batch
        # sizes each tensor op costs about as much as the loss kernel.
        dp = float(a.dp_size)
        if a.agg == "token-mean" and a.global_tokens is None and dp == 1.0:
            return offs, None, None  # VAPO's default, on one process
        if a.agg == "token-sum":
            scale = dp
        elif a.global_tokens is not None:
            scale = loss_spec.share(dp, a.global_tokens)
        elif mask is None:
            scale = loss_spec.share(dp, layout.num_tokens)
        elif device.type == "cpu":  # reading the count costs no device sync here
            scale = loss_spec.share(dp, int(torch.count_nonzero(mask)))
        else:  # on a GPU the count stays on the device: no sync on the hot path
            tokens = mask.sum(dtype=torch.float64).clamp_(min=1)  # 0 tokens: unused
            return offs, (dp / tokens).to(acc).expand(num_seqs).contiguous(), None
        # A fresh vector: the scale changes with every batch's counts, so caching it would
        # only evict the constants that do repeat.
        return offs, torch.full((num_seqs,), scale, dtype=acc, device=device), None
    if mask is None:
        counts = offs[1:] - offs[:-1]
    else:
        counts = _backends.select("valid_counts", device, a.backend)[1](mask.reshape(-1), offs)
    seq_w = sequence_weights(
        counts,
        a.agg,
        horizon=None if layout.packed else shape[-1],
        global_tokens=a.global_tokens,
        global_seqs=a.global_seqs,
        dp_size=a.dp_size,
        loss_scale_factor=a.loss_scale_factor,
    )
    lm_w = None
    if a.positive is not None:
        positive = _ragged.as_bool_mask(a.positive, "positive", "sequences")
        lm_w = loss_spec.positive_weights(
            counts, positive, a.global_positive_tokens, a.dp_size
        ).to(acc)
    return offs, seq_w.to(acc).contiguous(), lm_w


def screen_nonfinite(loss: Tensor, a: TokenLossArgs, mask: Tensor | None) -> None:
    """A NaN in a valid input always reaches its term's sum and so the loss (a zero
    coefficient too: 0 * NaN), and masked slots never produce one: one check of the loss
    screens every input; the per-input checks run only when the loss is NaN or infinite
    (useless to an optimizer either way), to name the argument - or, every valid input
    finite, to say what overflowed."""
    # .item(): one read of the 0-d loss (on a GPU the same one sync as bool(isnan(loss)));
    # on a CPU ~3 us less than building a bool tensor first.
    if _ragged.validation_enabled() and not math.isfinite(loss.item()):
        _ragged.name_nonfinite_input(zip(_input_names(a), a[:9]), mask, "the loss")
        raise ValueError(LOSS_OVERFLOW)


LOSS_OVERFLOW = (
    "the loss is NaN or infinite although every valid input is finite: an overflow in the "
    "input dtype (a log-ratio above ~88 in fp32 makes the ratio inf - with "
    "ratio_log_clamp=inf, or above 88 - and a zero advantage times it NaN; or |values - "
    "returns| above ~1.8e19 in fp32, whose square overflows)"
)


def _plain_token_mean(a: TokenLossArgs, tensors: tuple) -> _ragged.Layout | None:
    """The layout of the common call (VAPO's token mean on one process, inputs that need
    no conversion; see :func:`_ragged.plain_layout`), or None for the full checks.
    ``tensors``: ``a[:9]``, the token inputs."""
    if (a.agg != "token-mean" or a.positive is not None or a.global_tokens is not None
            or a.dp_size != 1.0 or len(a.params) != L.NUM_PARAMS or a.params[L.P_ROLLOUT_IS]):
        return None
    return _ragged.plain_layout(tensors, a.mask, a.cu_seqlens)


def _impl(a: TokenLossArgs):
    tensors = a[:9]
    layout = _plain_token_mean(a, tensors)
    if layout is not None:
        return _plain_impl(a, tensors, layout)
    layout = _check_static(a)
    first = next(t for t in tensors if t is not None)
    shape, device = first.shape, first.device
    mask = _ragged.dense(_ragged.as_bool_mask(a.mask), torch.bool)
    dtype = _input_dtype(tensors)
    dense = [_ragged.dense(t, dtype) for t in tensors]
    offs, seq_w, lm_w = aggregation_weights(
        a, layout, shape, device, mask, _ragged.acc_dtype(dtype))
    _, kernel = _backends.select("token_loss", device, a.backend)
    loss, sums, *grads = kernel(*dense, mask, offs, seq_w, lm_w, a.params, a.need_grad)
    screen_nonfinite(loss, a, mask)
    return loss, sums, *grads


def _plain_impl(a: TokenLossArgs, tensors: tuple, layout: _ragged.Layout):
    """:func:`_impl` of the common call (``layout`` from :func:`_plain_token_mean`): the
    kernel call the general path would make, without its conversions."""
    first = a.logp if a.logp is not None else next(t for t in tensors if t is not None)
    device = first.device
    offs = _ragged.offsets(layout, first.shape, a.cu_seqlens, device)
    _, kernel = _backends.select("token_loss", device, a.backend)
    out = kernel(*tensors, a.mask, offs, None, None, a.params, a.need_grad)
    screen_nonfinite(out[0], a, a.mask)
    return out


def _run(a: TokenLossArgs):
    """``token_loss_op(a)``. The common eager call (:func:`_plain_token_mean`, nothing
    tracing it) skips the Op's general vetting, which asks the same questions of any op
    in two more passes over the arguments: ~4 us of a ~105 us loss forward + backward at
    8 x 128 tokens."""
    tensors = a[:9]
    # Tracing, forward AD and meta tensors first: the layout check reads cu_seqlens'
    # values, which none of them have. (One device for all: one tensor tells if it is meta.)
    first = a.logp if a.logp is not None else next((t for t in tensors if t is not None), None)
    if first is None or forward_ad._current_level >= 0 or _library.no_values(first):
        return token_loss_op(a)
    layout = _plain_token_mean(a, tensors)
    if layout is None:
        return token_loss_op(a)
    # Any input that requires grad, as the Op counts them (mask and cu_seqlens cannot);
    # the common training call answers at its first test.
    wants_grad = first.requires_grad or any(t is not None and t.requires_grad for t in tensors)
    return token_loss_op.eager(a, wants_grad, lambda a: _plain_impl(a, tensors, layout))


def _fake(a: TokenLossArgs):
    _check_static(a)
    first = next(t for t in a[:9] if t is not None)
    dtype = _ragged.acc_dtype(_input_dtype(a[:9]))
    grads = [
        # As in the kernels: values get a gradient only when the value term is on.
        first.new_empty(src.shape if (a.need_grad and src is not None) else (0,), dtype=dtype)
        for src in (a.logp, a.values if a.returns is not None else None, a.entropy)
    ]
    return first.new_empty((), dtype=dtype), first.new_empty((L.NUM_SUMS,), dtype=dtype), *grads


def _setup_context(ctx, a: TokenLossArgs, output):
    _, sums, g_logp, g_values, g_entropy = output
    ctx.mark_non_differentiable(sums, g_logp, g_values, g_entropy)
    # Only the loss is differentiable: without this, autograd would allocate and zero-fill
    # a token-sized gradient for each of the other outputs on every backward.
    ctx.set_materialize_grads(False)
    # The inputs too, unused by the backward: first_order links a create_graph gradient
    # back to them.
    ctx.save_for_backward(g_logp, g_values, g_entropy, a.logp, a.values, a.entropy)
    ctx.dtypes = [None if t is None else t.dtype for t in (a.logp, a.values, a.entropy)]
    ctx.had_grads = a.need_grad


@first_order  # the saved gradients have no graph: a double backward would miss them
def _backward(ctx, grad_loss, *unused):
    if grad_loss is None:
        return token_loss_op.grads()
    wanted = {}
    saved = zip(("logp", "values", "entropy"), ctx.saved_tensors[:3], ctx.dtypes)
    for name, g, dtype in saved:
        if not ctx.needs_input_grad[TokenLossArgs._fields.index(name)]:
            continue
        if not ctx.had_grads:
            raise RuntimeError(
                "vapo token_loss: a gradient was requested but the forward ran with "
                "need_grad=False; call the loss with grad mode on"
            )
        wanted[name] = (g * grad_loss.to(g.dtype)).to(dtype)
    return token_loss_op.grads(**wanted)


token_loss_op = Op(
    "token_loss",
    TokenLossArgs,
    "(Tensor, Tensor, Tensor, Tensor, Tensor)",
    _impl,
    _fake,
    setup_context=_setup_context,
    backward=_backward,
    gradient_outputs=(("logp", 2), ("values", 3), ("entropy", 4)),
)


# --------------------------------------------------------------------------------------
# Public API: every function returns (loss, metrics).


def _need_grad(logp, values, entropy) -> bool:
    """One of the differentiable inputs requires grad (grad mode is the caller's test).
    isinstance: a wrong type gets to the checks that name it. (No generator: this runs
    on every loss call.)"""
    return (
        (isinstance(logp, Tensor) and logp.requires_grad)
        or (isinstance(values, Tensor) and values.requires_grad)
        or (isinstance(entropy, Tensor) and entropy.requires_grad)
    )


@loss_spec.options_cache
def _vapo_params(
    value, kl, entropy, positive, clip_low, clip_high, dual_clip, ratio_log_clamp, value_clip,
    value_clip_form, vf_coef, kl_kind, kl_coef, entropy_coef, lm_coef, rollout_is,
    rollout_is_mode, rollout_is_threshold, rollout_is_threshold_lower,
) -> tuple[float, ...]:
    """:func:`vapo_loss`'s ``params`` from its options and which terms are on (their
    inputs given): a coefficient left at None takes its default when its term is on and
    is 0 when it is off; one set for a term that is off raises (it would be ignored)."""
    coefs = {}
    for name, given, default, term, needs in (
        ("vf_coef", vf_coef, 1.0, value, "values and returns"),
        ("kl_coef", kl_coef, 0.0, kl, "ref_logp"),
        ("entropy_coef", entropy_coef, 0.0, entropy, "entropy"),
        ("lm_coef", lm_coef, 0.1, positive, "positive"),
    ):
        if not term and given:  # an explicit 0 ignores nothing
            raise ValueError(f"{name}={given!r} is set but its term is off: pass {needs}")
        coefs[name] = (default if given is None else given) if term else 0.0
    if kl_kind != "k3":  # checked with or without the KL term: None would turn it off
        loss_spec.kl_codes(kl_kind)
    return loss_params(
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        ratio_log_clamp=ratio_log_clamp,
        value_clip=value_clip if value else None,
        value_clip_form=value_clip_form,
        kl_kind=kl_kind if kl else None,
        **coefs,
        rollout_is=rollout_is,
        rollout_is_mode=rollout_is_mode,
        rollout_is_threshold=rollout_is_threshold,
        rollout_is_threshold_lower=rollout_is_threshold_lower,
    )


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
    vf_coef: float | None = None,
    kl_kind: str = "k3",
    kl_coef: float | None = None,
    entropy_coef: float | None = None,
    lm_coef: float | None = None,
    agg: str = "token-mean",
    global_tokens: float | Tensor | None = None,
    global_seqs: float | Tensor | None = None,
    global_positive_tokens: float | Tensor | None = None,
    dp_size: int = 1,
    loss_scale_factor: float | None = None,
    rollout_logp: Tensor | None = None,
    rollout_is: str | None = None,
    rollout_is_mode: str | None = None,
    rollout_is_threshold: float | None = None,
    rollout_is_threshold_lower: float | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Mapping[str, Tensor]]:
    r"""VAPO's whole token-level objective in one pass: ``(loss, metrics)``.

    ``loss = pg + vf_coef * vf + kl_coef * kl - entropy_coef * H + lm_coef * lm`` where
    each term is on when its inputs are given (policy: ``old_logp`` and ``advantages``;
    value: ``values, returns`` and, with ``value_clip`` set, ``old_values``; KL:
    ``ref_logp``; entropy: ``entropy``; positive-example LM: ``positive``, one flag per
    sequence). pg, vf, kl and H are aggregated with ``agg``; lm is the mean NLL over the
    valid tokens of positive sequences. A coefficient left at None takes its default when
    its term is on (vf_coef 1.0, kl_coef 0.0, entropy_coef 0.0, lm_coef 0.1, VAPO's mu);
    setting one whose term has no inputs is an error (it would be silently ignored).
    See :mod:`.loss_spec` for every formula. ``metrics`` holds 0-d tensors: each term,
    clip fractions (low / high / dual), approx-KL (mean -log-ratio and k3), ratio
    min/mean/max, value clip fraction, the critic's explained variance and the token count.

    Rollout correction (off by default): ``rollout_logp``, the log-probs the rollout engine
    reported for the sampled tokens, with ``rollout_is`` = ``"token"`` (w_t = exp(old_logp_t
    - rollout_logp_t)), ``"sequence"`` (w = exp of the sequence's sum of log-ratios, on
    each of its tokens) or ``"geometric"`` (exp of their mean) reweights the policy term
    in the same pass, like ``is_weights`` (which it replaces: passing both is an error).
    ``rollout_is_mode="truncate"`` (default) caps w at ``rollout_is_threshold`` C (default
    2.0); ``"mask"`` keeps w in [``rollout_is_threshold_lower`` (default 1/C), C] and
    zeroes the policy term of the token (token level) or of the whole sequence otherwise;
    rejected tokens stay in the aggregation's token and sequence counts. Log-ratios are
    clamped to [-20, 20]. Adds the metrics ``rollout_is_mean / _min / _max`` (weights
    before truncation or rejection), ``rollout_is_weight_mean`` (applied),
    ``rollout_is_truncated_frac`` or ``rollout_is_masked_frac``, ``rollout_kl`` and
    ``rollout_k3`` (see :mod:`.loss_spec`). Setting a rollout option without
    ``rollout_is``, or ``rollout_is`` without ``rollout_logp``, raises.
    """
    policy = advantages is not None or old_logp is not None
    if policy and (logp is None or old_logp is None or advantages is None):
        raise ValueError("the policy term needs logp, old_logp and advantages")
    value = values is not None or old_values is not None or returns is not None
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
    rollout_options(  # the checks that need the inputs; the options go to _vapo_params
        rollout_logp, is_weights, policy, rollout_is, rollout_is_mode, rollout_is_threshold,
        rollout_is_threshold_lower,
    )
    params = _vapo_params(
        value, ref_logp is not None, entropy is not None, positive is not None, clip_low,
        clip_high, dual_clip, ratio_log_clamp, value_clip, value_clip_form, vf_coef, kl_kind,
        kl_coef, entropy_coef, lm_coef, rollout_is, rollout_is_mode, rollout_is_threshold,
        rollout_is_threshold_lower,
    )
    if value and value_clip is None:
        old_values = None
    a = TokenLossArgs(
        logp if (policy or ref_logp is not None or positive is not None) else None,
        old_logp,
        advantages,
        values,
        old_values,
        returns,
        ref_logp,
        entropy,
        is_weights if rollout_logp is None else rollout_logp,
        mask,
        cu_seqlens,
        positive,
        params,
        agg,
        *loss_spec.aggregation_scalars(
            global_tokens, global_seqs, global_positive_tokens, dp_size, loss_scale_factor
        ),
        torch.is_grad_enabled() and _need_grad(logp, values, entropy),
        backend or "",
    )
    loss, sums, *_ = _run(a)
    # Positional: this runs on every loss call, and keywords cost ~0.5 us more.
    metrics = loss_metrics(sums, policy, value, ref_logp is not None, entropy is not None,
                           positive is not None, rollout_mode(params))
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
    is_weights: Tensor | None = None,
    agg: str = "token-mean",
    global_tokens: float | Tensor | None = None,
    global_seqs: float | Tensor | None = None,
    dp_size: int = 1,
    loss_scale_factor: float | None = None,
    rollout_logp: Tensor | None = None,
    rollout_is: str | None = None,
    rollout_is_mode: str | None = None,
    rollout_is_threshold: float | None = None,
    rollout_is_threshold_lower: float | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Mapping[str, Tensor]]:
    """Clipped PPO policy loss with Clip-Higher, dual clip and verl's aggregation modes.

    Per-token advantages. ``clip_high < clip_low`` is allowed (it is just another
    asymmetric trust region); both must be >= 0 and ``clip_low <= 1``. ``rollout_logp``
    and the ``rollout_is*`` options correct for the rollout engine's log-probs (see
    :func:`vapo_loss`). Returns ``(loss, metrics)``; see :func:`vapo_loss` for the metrics.
    """
    return vapo_loss(
        logp, old_logp, advantages, mask, cu_seqlens, is_weights=is_weights,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        ratio_log_clamp=ratio_log_clamp, agg=agg, global_tokens=global_tokens,
        global_seqs=global_seqs, dp_size=dp_size, loss_scale_factor=loss_scale_factor,
        rollout_logp=rollout_logp, rollout_is=rollout_is, rollout_is_mode=rollout_is_mode,
        rollout_is_threshold=rollout_is_threshold,
        rollout_is_threshold_lower=rollout_is_threshold_lower, backend=backend,
    )


def value_loss(
    values: Tensor,
    old_values: Tensor | None,
    returns: Tensor,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    value_clip: float | None = 0.5,
    value_clip_form: str = "verl",
    agg: str = "token-mean",
    global_tokens: float | Tensor | None = None,
    global_seqs: float | Tensor | None = None,
    dp_size: int = 1,
    loss_scale_factor: float | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Mapping[str, Tensor]]:
    """Clipped value loss ``0.5 agg(max((v - R)^2, (clip(v, v_old +- eps_v) - R)^2))``.

    ``value_clip_form="verl"`` clips as ``max(min(v, v_old + eps), v_old - eps)``;
    ``"openrlhf"`` as ``v_old + clamp(v - v_old, -eps, eps)`` (the same number up to
    rounding). ``value_clip=None``: unclipped (``old_values`` may then be None).
    Metrics: ``vf_loss``, ``vf_clipfrac``, ``explained_var``, ``tokens``.
    """
    return vapo_loss(
        None, mask=mask, cu_seqlens=cu_seqlens, values=values, old_values=old_values,
        returns=returns, value_clip=value_clip, value_clip_form=value_clip_form, agg=agg,
        global_tokens=global_tokens, global_seqs=global_seqs, dp_size=dp_size,
        loss_scale_factor=loss_scale_factor, backend=backend,
    )


def kl_loss(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    kl_kind: str = "k3",
    agg: str = "token-mean",
    global_tokens: float | Tensor | None = None,
    global_seqs: float | Tensor | None = None,
    dp_size: int = 1,
    loss_scale_factor: float | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Mapping[str, Tensor]]:
    """``agg(kl_penalty(logp, ref_logp, kl_kind))`` in one pass (verl's use_kl_loss term).
    Metrics: ``kl_loss``, ``tokens``."""
    return vapo_loss(
        logp, mask=mask, cu_seqlens=cu_seqlens, ref_logp=ref_logp, kl_kind=kl_kind,
        kl_coef=1.0, agg=agg, global_tokens=global_tokens, global_seqs=global_seqs,
        dp_size=dp_size, loss_scale_factor=loss_scale_factor, backend=backend,
    )


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
) -> tuple[Tensor, Mapping[str, Tensor]]:
    """Aggregate any per-token loss with verl's modes: ``(loss, {"tokens": ...})``.

    Differentiable with respect to ``loss_mat``; masked slots never contribute.
    """
    # loss_mat rides in the entropy slot: its checks run here first, naming it.
    _ragged.check_layout({"loss_mat": loss_mat}, mask, cu_seqlens)
    try:
        loss, metrics = vapo_loss(
            None, mask=mask, cu_seqlens=cu_seqlens, entropy=loss_mat, entropy_coef=-1.0,
            agg=agg, global_tokens=global_tokens, global_seqs=global_seqs, dp_size=dp_size,
            loss_scale_factor=loss_scale_factor, backend=backend,
        )
    except ValueError:  # a NaN where valid is named as the entropy's: say whose it is
        _ragged.check_no_nan_where_valid("loss_mat", loss_mat, _ragged.as_bool_mask(mask))
        raise
    return loss, {"tokens": metrics["tokens"]}


def positive_lm_loss(
    logp: Tensor,
    positive: Tensor,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    global_positive_tokens: float | Tensor | None = None,
    dp_size: int = 1,
    backend: str | None = None,
) -> tuple[Tensor, Mapping[str, Tensor]]:
    """VAPO's positive-example LM loss: the mean NLL ``-logp`` over the valid tokens of
    the sequences with ``positive[s]`` set (0 when there are none); multiply by mu (0.1).
    Metrics: ``lm_loss``, ``tokens``."""
    return vapo_loss(
        logp, mask=mask, cu_seqlens=cu_seqlens, positive=positive, lm_coef=1.0,
        global_positive_tokens=global_positive_tokens, dp_size=dp_size, backend=backend,
    )
