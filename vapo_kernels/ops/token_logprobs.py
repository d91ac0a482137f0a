r"""Token log-probs and entropy from logits, forward and backward, fp32 out.

Per row (token) with logits z (V entries), temperature tau, s = z / tau and target y::

    lse   = logsumexp(s)
    logp  = s_y - lse                                  (<= 0 always)
    H     = lse - sum_v p_v s_v,   p = softmax(s)      (in [0, log V])

Gradients, with upstream g_logp and g_H (E_s = sum_v p_v s_v = lse - H)::

    dz_v = ( g_logp * (onehot(y)_v - p_v)  +  g_H * p_v * (E_s - s_v) ) / tau

The entropy gradient is written in the ``p * (E_s - s)`` form: ``p * log p`` would give
``0 * (-inf) = NaN`` for a logit of -inf. Every backend accumulates in fp32 (fp64 for
fp64 logits) whatever the input dtype, reads the logits once per pass, and never makes
an fp32 copy of them.

Everything is measured from the row max ``m = max_v z_v`` of the RAW logits: with
``t = (z - m) / tau`` and ``log_norm = log sum_v exp(t_v)`` (so ``lse = m / tau +
log_norm``),

    logp = t_y - log_norm,    H = log_norm - sum_v p_v t_v,    u = t - log_norm = log p,
    dz_v = ( g_logp * (onehot(y)_v - p_v)  -  g_H * p_v * (H + u_v) ) / tau

(``E_s - s = E_t - t = -(H + u)``). ``z - m`` is exact for the logits near the max, the
ones that carry the probability, so a dominant logit gets ``u = 0`` and ``p = 1``
exactly, and a row of logits ~1e4 keeps every digit of its differences. Forming
``z / tau - lse`` instead subtracts two numbers ~1e4 that each carry ~ulp(1e4) ~ 1e-3 of
rounding in fp32: the gradient came out 1e-4 (tau = 1.3) to 1e-3 (tau = 0.7) off there.
So the forward hands the backward the pair ``stats = (m, log_norm)`` per row, not lse.

Ignored rows - target ``-100`` or ``mask`` 0 - get logp = H = 0 and a zero gradient,
and kernels skip their logits entirely.

With ``inplace_backward=True`` the gradient is written into the logits buffer (what
verl does through flash-attn's cross-entropy) to save an N x V allocation. That is only
safe when nothing reads the logits afterwards: the backward refuses logits that are a
leaf tensor (the caller owns them), and since the write bumps the version counter,
autograd raises if another node saved the same logits for its own backward.

Data-flow: :func:`token_logprobs` -> the ``vapo::token_logprobs`` op (autograd
registered) -> a backend kernel chosen by ``_backends.select``. The fused LM-head
variant is :mod:`.linear_logprobs`. The kernel contract is
the docstring of :func:`reference_forward` and :func:`reference_backward`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .. import _backends, _ragged
from .._library import Op, first_order, no_values

IGNORE_INDEX = -100
_ROWS_PER_CHUNK = 1024  # bounds the reference's fp32 working set to 1024 x V


_out_dtype = _ragged.acc_dtype  # fp32 outputs, fp64 for fp64 logits


# --------------------------------------------------------------------------------------
# The spec: a readable reference, chunked over rows so it also serves as a CPU fallback.


def reference_forward(
    logits: Tensor, targets: Tensor, valid: Tensor | None, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel contract, forward.

    logits (N, V), any float dtype, last dim contiguous (row stride arbitrary);
    targets (N,) int64 in [0, V) on valid rows; valid (N,) bool or None (all rows valid;
    rows whose target is -100 are always ignored). Returns (logp, entropy, stats): logp
    and entropy (N,), stats (N, 2) = (m, log_norm) per row as in the module docstring
    (m the max logit, exact; a row of only -inf logits has (-inf, -inf)), all fp32 (fp64
    for fp64 logits); ignored rows get 0 everywhere. stats is only for the backward.
    """
    n = logits.shape[0]
    acc = _out_dtype(logits.dtype)
    logp = torch.zeros(n, dtype=acc, device=logits.device)
    entropy = torch.zeros_like(logp)
    stats = torch.zeros(n, 2, dtype=acc, device=logits.device)
    keep = targets != IGNORE_INDEX
    if valid is not None:
        keep &= valid
    for lo in range(0, n, _ROWS_PER_CHUNK):
        rows = torch.nonzero(keep[lo : lo + _ROWS_PER_CHUNK]).flatten() + lo
        if rows.numel() == 0:
            continue
        z = logits[rows].to(acc)  # a copy (advanced indexing): free to work in place
        # t = (z - max z) / tau, not z / tau - max: the subtraction is then exact near the
        # max, and entropy = log_norm - E_p[t] is a difference of small numbers, where
        # lse - E_p[s] cancels catastrophically for large logits (2% off in fp32 at
        # |s| ~ 600). A max of -inf (every logit -inf) shifts by 0 instead; a +inf logit
        # makes the row NaN, as in the C++ and Triton kernels, for the NaN screen to name.
        row_max = z.amax(dim=-1, keepdim=True)
        shift = torch.where(row_max == -math.inf, 0, row_max)
        t = z.sub_(shift).div_(temperature)
        log_norm = torch.logsumexp(t, dim=-1)
        p = torch.exp(t - log_norm[:, None])
        # p * t with p = 0 and t = -inf is 0, not NaN.
        expected_t = torch.where(p > 0, p * t, 0).sum(-1)
        logp[rows] = t.gather(1, targets[rows, None]).squeeze(1) - log_norm
        entropy[rows] = log_norm - expected_t
        stats[rows] = torch.stack([row_max.squeeze(1), log_norm], dim=1)
    # Rounding can push an entropy a hair below 0 or a log-prob above 0; clamp both so
    # the documented ranges hold exactly.
    return logp.clamp_(max=0), entropy.clamp_(min=0), stats


def reference_backward(
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    logits: Tensor,
    targets: Tensor,
    valid: Tensor | None,
    stats: Tensor,
    entropy: Tensor,
    temperature: float,
    out: Tensor,
) -> None:
    """Kernel contract, backward: writes dL/dlogits into ``out`` (N, V), logits' dtype.

    ``out`` may be ``logits`` itself (in-place backward): each element is read before
    its gradient is written. grad_* are (N,) in the output dtype; grad_entropy may be
    None (no gradient through the entropy). stats (N, 2) and entropy (N,) are the
    forward's. Ignored rows get zeros.
    """
    n = logits.shape[0]
    acc = _out_dtype(logits.dtype)
    keep = targets != IGNORE_INDEX
    if valid is not None:
        keep &= valid
    for lo in range(0, n, _ROWS_PER_CHUNK):
        hi = min(n, lo + _ROWS_PER_CHUNK)
        row_max, log_norm = stats[lo:hi, 0:1], stats[lo:hi, 1:2]
        shift = torch.where(torch.isfinite(row_max), row_max, 0)
        # u = log p relative to the max, as the forward measured it (module docstring).
        u = (logits[lo:hi].to(acc) - shift) / temperature - log_norm
        p = torch.exp(u)
        g = -grad_logp[lo:hi, None] * p
        g.scatter_add_(1, targets[lo:hi, None].clamp(min=0), grad_logp[lo:hi, None])
        if grad_entropy is not None:
            # p (E_s - s) = -p (H + u); 0 where p = 0 (u = -inf would give 0 * -inf).
            h_u = torch.where(p > 0, p * (entropy[lo:hi, None] + u), 0)
            g -= grad_entropy[lo:hi, None] * h_u
        g = torch.where(keep[lo:hi, None], g / temperature, 0)
        out[lo:hi] = g.to(out.dtype)


_backends.register("token_logprobs", "reference")(reference_forward)
_backends.register("token_logprobs_backward", "reference")(reference_backward)


_backends.register("token_logprobs", "cpp")(_backends.from_extension("token_logprobs_fwd_cpu"))
_backends.register("token_logprobs_backward", "cpp")(
    _backends.from_extension("token_logprobs_bwd_cpu")
)
_backends.register("token_logprobs", "triton")(
    _backends.from_module("vapo_kernels.triton.logprobs", "token_logprobs_fwd")
)
_backends.register("token_logprobs_backward", "triton")(
    _backends.from_module("vapo_kernels.triton.logprobs", "token_logprobs_bwd")
)


# --------------------------------------------------------------------------------------
# Validation


def _check_static(logits, targets, mask, temperature):
    _ragged.check_float("logits", logits)
    if logits.dim() < 2:
        raise ValueError(f"logits must be (N, V) or (B, T, V), got shape {tuple(logits.shape)}")
    _check_targets_mask_temperature(targets, "logits", logits, mask, temperature)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a vocabulary of at least 1 entry, got V = 0")
    if logits.stride(-1) != 1 and logits.numel() > 0:
        raise ValueError("logits must be contiguous along the vocabulary (last) dimension")


def _check_targets_mask_temperature(targets, rows_name, rows, mask, temperature):
    """Shared by both ops: targets of shape ``rows.shape[:-1]`` on rows' device, a mask
    like the targets, a positive finite temperature."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32), got {targets.dtype}")
    if targets.shape != rows.shape[:-1]:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)} but {rows_name} {tuple(rows.shape)} "
            f"need {tuple(rows.shape[:-1])}"
        )
    if targets.device != rows.device:
        raise ValueError(f"targets is on {targets.device} but {rows_name} is on {rows.device}")
    _ragged.check_mask(mask, "targets", targets)
    check_temperature(temperature)


# Where the kernels' fp32 work (z / tau relative to the row max, exp of it) stays finite
# and the same in every backend for logits up to 1e4; sampling temperatures are ~0.1-10.
TEMPERATURE_RANGE = (1e-6, 1e6)


def check_temperature(temperature) -> float:
    """``temperature`` as a float, checked (every public function taking one calls this,
    before an op's schema would refuse a non-float without naming it)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    low, high = TEMPERATURE_RANGE
    if not low <= temperature <= high:
        raise ValueError(f"temperature must lie in [{low:g}, {high:g}], got {temperature}")
    return float(temperature)


def _check_targets_in_range(targets: Tensor, vocab: int) -> None:
    if not _ragged.validation_enabled() or targets.numel() == 0:
        return
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(
            f"targets must lie in [0, V={vocab}) or equal {IGNORE_INDEX} (ignored), got {value}"
        )


def refuse_overwriting_callers_leaf(fn: str, logits) -> None:
    """``inplace_backward`` writes the gradient over ``logits``: refused at the call, not
    at the backward, for a leaf (or a view of one) the caller owns - only when a backward
    can come (requires grad, grad mode on)."""
    if (isinstance(logits, Tensor) and logits.requires_grad and torch.is_grad_enabled()
            and _ragged.is_callers_leaf(logits)):
        raise RuntimeError(
            f"{fn}(inplace_backward=True) would overwrite logits that are a leaf tensor (or "
            "a view of one) the caller owns; pass inplace_backward=False"
        )


def masked_targets(targets, vocab: int, mask) -> Tensor:
    """``targets`` as the kernels take them: when a masked row holds an id out of
    [0, V) (garbage where the caller masked), those rows' ids become -100 (ignored, as
    the mask already says); an out-of-range id in a valid row is left for the op's check
    to name. One check in the common case, where every id is in range."""
    if (mask is None or not isinstance(targets, Tensor) or not isinstance(mask, Tensor)
            or not _ragged.validation_enabled() or targets.numel() == 0
            or targets.is_floating_point() or mask.shape != targets.shape):
        return targets  # the op's checks name anything odd
    if no_values(targets, mask):  # torch.compile, vmap, fake or meta tensors: no branch on
        # the values; every masked row's id becomes -100, which changes nothing (the
        # kernels skip both). (mask == 0, not as_bool_mask: the op's own checks look at
        # the mask's values.)
        return targets.masked_fill(mask == 0, IGNORE_INDEX)
    outside = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab))
    if not bool(outside.any()):
        return targets
    return targets.masked_fill(~_ragged.as_bool_mask(mask), IGNORE_INDEX)


def _rows(logits: Tensor, writable: bool = False) -> Tensor:
    """(..., V) -> (N, V) as a view; refuses a layout that would need an N x V copy, and,
    ``writable`` (a gradient written over the logits), rows that share memory."""
    vocab = logits.shape[-1]
    try:
        rows = logits.view(-1, vocab)
    except RuntimeError:
        raise ValueError(
            "logits must be viewable as (N, V) rows without a copy "
            "(contiguous leading dimensions)"
        ) from None
    n, row_stride, col_stride = rows.shape[0], rows.stride(0), rows.stride(1)
    overlap = (vocab > 1 and col_stride == 0) or (n > 1 and row_stride < vocab * col_stride)
    if writable and overlap:
        raise ValueError(
            "inplace_backward writes the gradient over the logits, whose rows overlap in "
            f"memory here (strides {rows.stride()}, e.g. an expanded tensor); pass "
            "inplace_backward=False"
        )
    return rows


def rows_viewable(logits: Tensor) -> Tensor:
    """``logits`` itself when its (N, V) rows are a view, else a contiguous copy (made
    under autograd, so the gradient reaches the original): the public functions take
    e.g. ``logits[:, :-1]``, a shifted model output, at the price of that one copy
    (slicing the hidden states before the LM head avoids it)."""
    if not isinstance(logits, Tensor) or logits.dim() < 2 or logits.is_contiguous():
        return logits  # the common case; anything odd goes to the op's checks
    if logits.stride(-1) == 1:  # the kernels read each row as one run of memory
        try:
            logits.view(-1, logits.shape[-1])
            return logits
        except RuntimeError:
            pass
    return logits.contiguous()


def _flat_mask(mask: Tensor | None) -> Tensor | None:
    mask = _ragged.as_bool_mask(mask)
    return None if mask is None else mask.reshape(-1).contiguous()


# --------------------------------------------------------------------------------------
# The ops


class TokenLogprobsArgs(NamedTuple):
    """The arguments of ``vapo::token_logprobs``."""

    logits: Tensor
    targets: Tensor
    mask: Tensor | None
    temperature: float
    inplace_backward: bool
    backend: str


class TokenLogprobsBackwardArgs(NamedTuple):
    """The arguments of ``vapo::token_logprobs_backward`` and its in-place twin
    ``vapo::token_logprobs_backward_`` (which writes over ``logits``)."""

    grad_logp: Tensor
    grad_entropy: Tensor | None
    logits: Tensor
    targets: Tensor
    mask: Tensor | None
    stats: Tensor
    entropy: Tensor
    temperature: float
    backend: str


def _forward(a: TokenLogprobsArgs):
    """(logp, entropy, stats): logp and entropy of shape logits.shape[:-1], stats of shape
    logits.shape[:-1] + (2,), the per-row (max logit, log normaliser) that the backward
    takes (non-differentiable). See the module docstring."""
    _check_static(a.logits, a.targets, a.mask, a.temperature)
    _check_targets_in_range(a.targets, a.logits.shape[-1])
    if a.inplace_backward and a.logits.requires_grad:
        _rows(a.logits, writable=True)  # refused now, not at the backward
    shape = a.targets.shape
    if a.targets.numel() == 0:
        empty = torch.zeros(shape, dtype=_out_dtype(a.logits.dtype), device=a.logits.device)
        return empty, empty.clone(), empty.new_zeros((*shape, 2))
    _, kernel = _backends.select("token_logprobs", a.logits.device, a.backend)
    logp, entropy, stats = kernel(
        _rows(a.logits), a.targets.reshape(-1).long().contiguous(), _flat_mask(a.mask),
        float(a.temperature),
    )
    # A valid row's log-prob is NaN exactly when its logits hold a NaN or a +inf (or are
    # all -inf); skipped rows give 0. One reduction screens them all.
    if _ragged.validation_enabled() and math.isnan(logp.sum().item()):
        row = int(torch.nonzero(logp.isnan())[0, 0])
        raise ValueError(
            f"logits contain NaN or +inf (or only -inf) in a valid row: row {row} of the "
            "(N, V) rows"
        )
    return logp.view(shape), entropy.view(shape), stats.view(*shape, 2)


def _forward_fake(a: TokenLogprobsArgs):
    _check_static(a.logits, a.targets, a.mask, a.temperature)
    out = torch.empty(a.targets.shape, dtype=_out_dtype(a.logits.dtype), device=a.logits.device)
    return out, torch.empty_like(out), out.new_empty((*a.targets.shape, 2))


def _write_logits_grad(out: Tensor, a: TokenLogprobsBackwardArgs) -> None:
    """Run the backend's backward kernel, writing dL/dlogits into ``out`` (may be logits)."""
    if not a.logits.numel():
        return
    _, kernel = _backends.select("token_logprobs_backward", a.logits.device, a.backend)
    kernel(
        a.grad_logp.reshape(-1).contiguous(),
        None if a.grad_entropy is None else a.grad_entropy.reshape(-1).contiguous(),
        _rows(a.logits),
        a.targets.reshape(-1).long().contiguous(),
        _flat_mask(a.mask),
        a.stats.reshape(-1, 2).contiguous(),
        a.entropy.reshape(-1).contiguous(),
        float(a.temperature),
        _rows(out, writable=True),
    )


def _backward_impl(a: TokenLogprobsBackwardArgs) -> Tensor:
    """dL/dlogits in a new tensor of logits' shape and dtype."""
    grad = _backends.empty_output(a.logits)
    _write_logits_grad(grad, a)
    return grad


def _backward_inplace_impl(a: TokenLogprobsBackwardArgs) -> None:
    """dL/dlogits written over the logits themselves (bumps their version counter)."""
    _write_logits_grad(a.logits, a)


token_logprobs_backward_op = Op(
    "token_logprobs_backward", TokenLogprobsBackwardArgs, "Tensor", _backward_impl,
    lambda a: torch.empty(a.logits.shape, dtype=a.logits.dtype, device=a.logits.device),
)
token_logprobs_backward_inplace_op = Op(
    "token_logprobs_backward_", TokenLogprobsBackwardArgs, "()", _backward_inplace_impl,
    lambda a: None, mutates=("logits",),
)


def _setup_context(ctx, a: TokenLogprobsArgs, output):
    _, entropy, stats = output
    ctx.save_for_backward(a.logits, a.targets, a.mask, stats, entropy)
    ctx.mark_non_differentiable(stats)  # statistics kept for the backward, not a result
    ctx.temperature = a.temperature
    ctx.inplace = a.inplace_backward
    ctx.backend = a.backend
    ctx.logits_is_leaf = _ragged.is_callers_leaf(a.logits)


@first_order  # the kernels' gradient has no graph: a double backward would miss it
def _backward(ctx, grad_logp, grad_entropy, grad_stats):
    logits, targets, mask, stats, entropy = ctx.saved_tensors
    out_dtype = _out_dtype(logits.dtype)
    grad_logp = torch.zeros_like(entropy) if grad_logp is None else grad_logp.to(out_dtype)
    grad_entropy = None if grad_entropy is None else grad_entropy.to(out_dtype)
    a = TokenLogprobsBackwardArgs(
        grad_logp, grad_entropy, logits, targets, mask, stats, entropy, ctx.temperature,
        ctx.backend,
    )
    if not ctx.inplace:
        return token_logprobs_op.grads(logits=token_logprobs_backward_op(a))
    if ctx.logits_is_leaf:
        raise RuntimeError(
            "token_logprobs(inplace_backward=True) would overwrite logits that are a leaf "
            "tensor (or a view of one) the caller owns; pass inplace_backward=False"
        )
    token_logprobs_backward_inplace_op(a)
    return token_logprobs_op.grads(logits=logits)


token_logprobs_op = Op(
    "token_logprobs", TokenLogprobsArgs, "(Tensor, Tensor, Tensor)", _forward, _forward_fake,
    setup_context=_setup_context, backward=_backward,
)


# --------------------------------------------------------------------------------------
# Public API


def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Log-probability of each target token, and optionally the entropy of its row.

    ``logits`` (N, V) packed or (B, T, V) padded, any float dtype; ``targets`` of shape
    ``logits.shape[:-1]``; rows with target -100 or ``mask`` 0 are ignored (0 out, zero
    gradient, no cost). Returns fp32 ``logp`` (and ``entropy``), differentiable with
    respect to ``logits``. See the module docstring for the formulas and
    ``inplace_backward``.
    """
    logits = rows_viewable(logits)
    if inplace_backward:
        refuse_overwriting_callers_leaf("token_logprobs", logits)
    if isinstance(logits, Tensor) and logits.dim() >= 1:
        targets = masked_targets(targets, logits.shape[-1], mask)
    logp, entropy, _ = token_logprobs_op(TokenLogprobsArgs(
        logits, targets, mask, check_temperature(temperature), bool(inplace_backward),
        backend or "",
    ))
    return (logp, entropy) if return_entropy else logp
