r"""GAE as a fused reverse scan: plain, decoupled (VAPO) and length-adaptive.

Per sequence, backwards in time, with rewards r, values V, mask m and two per-sequence
coefficients c_p = gamma * lambda_policy and c_c = gamma * lambda_critic::

    delta_t = r_t + gamma * V_next - V_t
    A_t     = delta_t + c_p * A_next          -> advantages
    G_t     = delta_t + c_c * G_next          -> returns / value targets = G_t + V_t

Both recurrences share delta and run in ONE pass over the data (VAPO's decoupled GAE:
lambda_critic = 1 gives Monte-Carlo value targets, lambda_policy < 1 the advantages).

Masked tokens (m_t = 0), two semantics selected by ``mask_mode``:

* ``"skip"`` (verl's multi-turn semantics): a masked token is skipped. It does not
  change ``V_next`` (the next *valid* value is carried across the gap), its reward is
  dropped, and A/G carry the running value, so it reports the advantage of the next
  valid token. Returns there are ``G + V_t`` with its own (raw) V_t, as in verl.
* ``"zero"`` (OpenRLHF): V and r are taken as 0 on masked tokens and the plain
  recurrence runs through them.

In both modes, whatever is stored in a masked slot (huge numbers, NaN) leaves every
valid output bit-for-bit unchanged. Outputs are float32 (float64 for float64 inputs).

The data-flow is: public wrappers (:func:`gae`, :func:`decoupled_gae`) -> the
``vapo::gae`` op -> the backend kernel chosen by ``_backends.select``. Every backend
implements the *kernel contract* of :func:`reference_kernel`. Whitening is its own op,
:mod:`.whiten`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .. import _backends, _device_cache, _ragged
from .._library import Op, mark_outputs_constant, no_gradient, no_values
from .whiten import masked_whiten

MASK_MODES = ("skip", "zero")


# --------------------------------------------------------------------------------------
# The spec: a readable reference. Vectorised over sequences, a Python loop over time.


def reference_padded(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    coef_policy: Tensor,
    coef_critic: Tensor,
    gamma: float,
    skip_masked: bool,
) -> tuple[Tensor, Tensor]:
    """Padded (B, T) inputs in the compute dtype, bool mask, (B,) coefficients."""
    if not skip_masked:
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        values = torch.where(mask, values, zero)
        rewards = torch.where(mask, rewards, zero)
    advantages = torch.empty_like(values)
    returns = torch.empty_like(values)
    batch, length = values.shape
    next_value = values.new_zeros(batch)
    adv_policy = values.new_zeros(batch)
    adv_critic = values.new_zeros(batch)
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        new_policy = delta + coef_policy * adv_policy
        new_critic = delta + coef_critic * adv_critic
        if skip_masked:
            valid = mask[:, t]
            adv_policy = torch.where(valid, new_policy, adv_policy)
            adv_critic = torch.where(valid, new_critic, adv_critic)
            next_value = torch.where(valid, values[:, t], next_value)
        else:
            adv_policy, adv_critic, next_value = new_policy, new_critic, values[:, t]
        advantages[:, t] = adv_policy
        returns[:, t] = adv_critic + values[:, t]
    return advantages, returns


def reference_kernel(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor | None,
    offsets: Tensor,
    coef_policy: Tensor,
    coef_critic: Tensor,
    gamma: float,
    skip_masked: bool,
) -> tuple[Tensor, Tensor]:
    """The kernel contract every backend implements.

    rewards, values: contiguous, one shape (any: (B, T) padded or (N,) packed; the
    tokens are their N elements in memory order) and one float dtype. mask: bool of that
    shape or None (all valid). offsets: (S+1,) int64, 0 = offsets[0] <= ... <= offsets[S]
    = N. coef_policy, coef_critic: (S,) gamma*lambda per sequence, in the output dtype.
    Returns (advantages, returns) in the inputs' shape, float32 (float64 for float64
    inputs).
    """
    out_dtype = _ragged.acc_dtype(rewards.dtype)
    r = rewards.reshape(-1).to(out_dtype)
    v = values.reshape(-1).to(out_dtype)
    m = torch.ones_like(r, dtype=torch.bool) if mask is None else mask.reshape(-1)
    padded = [_ragged.pack_to_padded(x, offsets, fill) for x, fill in ((r, 0), (v, 0), (m, False))]
    adv, ret = reference_padded(*padded, coef_policy, coef_critic, gamma, skip_masked)
    return (_ragged.padded_to_pack(adv, offsets).view(rewards.shape),
            _ragged.padded_to_pack(ret, offsets).view(rewards.shape))


_backends.register("gae", "reference")(reference_kernel)


def reference_valid_counts(mask: Tensor, offsets: Tensor) -> Tensor:
    """Kernel contract: flat bool mask (N,), int64 offsets (S+1,) -> (S,) int64 counts."""
    prefix = torch.cat([mask.new_zeros(1, dtype=torch.int64), mask.cumsum(0, dtype=torch.int64)])
    return prefix[offsets[1:]] - prefix[offsets[:-1]]


_backends.register("valid_counts", "reference")(reference_valid_counts)


_backends.register("valid_counts", "cpp")(_backends.from_extension("valid_counts_cpu"))


def reference_adaptive_coefficients(mask: Tensor | None, offsets: Tensor, alpha: float,
                                    gamma: float, dtype: torch.dtype) -> Tensor:
    """Kernel contract: flat bool mask (N,) or None (all valid), int64 offsets (S+1,) ->
    (S,) ``gamma * length_adaptive_lambda(valid tokens, alpha)`` in float64, rounded once
    to ``dtype``."""
    counts = offsets[1:] - offsets[:-1] if mask is None else reference_valid_counts(mask, offsets)
    return (gamma * length_adaptive_lambda(counts, alpha)).to(dtype)


_backends.register("adaptive_coefficients", "reference")(reference_adaptive_coefficients)
_backends.register("adaptive_coefficients", "cpp")(
    _backends.from_extension("adaptive_coefficients_cpu"))


_backends.register("gae", "cpp")(_backends.from_extension("gae_scan_cpu"))
_backends.register("gae", "cuda")(_backends.from_extension("gae_scan_cuda"))
_backends.register("gae", "triton")(_backends.from_module("vapo_kernels.triton.gae", "gae_scan"))


# --------------------------------------------------------------------------------------
# The op: one schema, a fake kernel, a body that validates and dispatches.


class GaeArgs(NamedTuple):
    """The arguments of ``vapo::gae``. A per-sequence lambda tensor (S,), when given,
    replaces its scalar; ``alpha > 0`` replaces lambda_policy by the length-adaptive
    lambda of each sequence's valid-token count; ``backend=""`` is automatic."""

    rewards: Tensor
    values: Tensor
    mask: Tensor | None
    cu_seqlens: Tensor | None
    lam_policy: Tensor | None
    lam_critic: Tensor | None
    scalar_lam_policy: float
    scalar_lam_critic: float
    gamma: float
    alpha: float
    mask_mode: str
    backend: str


def _check_static(a: GaeArgs) -> _ragged.Layout:
    layout = _ragged.check_layout({"rewards": a.rewards, "values": a.values}, a.mask, a.cu_seqlens)
    _ragged.check_unit_interval("gamma", a.gamma)
    if (isinstance(a.alpha, bool) or not isinstance(a.alpha, (int, float))
            or not 0 <= a.alpha < math.inf):
        raise ValueError(f"alpha must be a finite float > 0 (0: off), got {a.alpha!r}")
    if a.mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {a.mask_mode!r}")
    # Field by field, not a loop over names: this runs on every call.
    _ragged.check_unit_interval("lam_policy", a.scalar_lam_policy)
    _ragged.check_unit_interval("lam_critic", a.scalar_lam_critic)
    if a.lam_policy is not None:
        _check_lambda_tensor("lam_policy", a.lam_policy, layout, a.rewards.device)
    if a.lam_critic is not None:
        _check_lambda_tensor("lam_critic", a.lam_critic, layout, a.rewards.device)
    return layout


def _check_lambda_tensor(name: str, lam: Tensor, layout: _ragged.Layout, device) -> None:
    _ragged.check_float(name, lam)
    if lam.shape != (layout.num_seqs,):
        raise ValueError(
            f"{name} must have one entry per sequence, shape ({layout.num_seqs},), "
            f"got {tuple(lam.shape)}"
        )
    if lam.device != device:
        raise ValueError(f"{name} is on {lam.device} but rewards is on {device}")


def _coefficients(lam: Tensor | None, scalar: float, gamma: float, name: str, num_seqs: int,
                  dtype: torch.dtype, device) -> Tensor:
    """gamma * lambda per sequence, in float64 first and then rounded once (what
    ``gamma * lam * A`` does in the peers); a scalar lambda costs one op."""
    if lam is None:
        return _device_cache.full(num_seqs, gamma * scalar, dtype, device)
    if _ragged.validation_enabled() and lam.numel() and not bool(((lam >= 0) & (lam <= 1)).all()):
        raise ValueError(f"{name} must lie in [0, 1] for every sequence")
    return (gamma * lam.to(torch.float64)).to(dtype).contiguous()


def _impl(a: GaeArgs) -> tuple[Tensor, Tensor]:
    layout = _check_static(a)
    rewards, device = a.rewards, a.rewards.device
    mask = _ragged.as_bool_mask(a.mask)
    if layout.packed:
        _ragged.check_cu_seqlens_values(a.cu_seqlens, layout.num_tokens)
    dtype = torch.promote_types(rewards.dtype, a.values.dtype)
    acc = _ragged.acc_dtype(dtype)
    if layout.num_tokens == 0:
        empty = torch.empty(rewards.shape, dtype=acc, device=device)
        return empty, empty.clone()
    tokens = [_ragged.dense(x, dtype) for x in (rewards, a.values)]
    mask = _ragged.dense(mask, torch.bool)
    offs = _ragged.offsets(layout, rewards.shape, a.cu_seqlens, device)
    n = layout.num_seqs
    if a.alpha > 0:
        coef_p = _backends.select("adaptive_coefficients", device, a.backend)[1](
            None if mask is None else mask.reshape(-1), offs, a.alpha, a.gamma, acc)
    else:
        coef_p = _coefficients(
            a.lam_policy, a.scalar_lam_policy, a.gamma, "lam_policy", n, acc, device
        )
    coef_c = _coefficients(a.lam_critic, a.scalar_lam_critic, a.gamma, "lam_critic", n, acc, device)
    _, kernel = _backends.select("gae", device, a.backend)
    adv, ret = kernel(*tokens, mask, offs, coef_p, coef_c, float(a.gamma), a.mask_mode == "skip")
    # A NaN or an infinity in a valid reward or value always reaches that token's
    # advantage and value target, so one sum of each screens both inputs (two .item()s
    # cost less than adding the sums as tensors); the precise checks (several passes) run
    # only when a sum is not finite - something is wrong, or garbage sits in a masked
    # slot of the targets (skip mode adds the slot's value there), which they tell apart.
    if _ragged.validation_enabled() and not math.isfinite(adv.sum().item() + ret.sum().item()):
        _ragged.name_nonfinite_input((("values", a.values), ("rewards", rewards)), mask,
                                     "the advantages")
        for name, out in (("advantages", adv), ("value targets", ret)):
            if not bool(torch.isfinite(out if mask is None else out[mask]).all()):
                raise ValueError(
                    f"the {name} overflowed although every valid reward and value is "
                    "finite: rewards or values near the dtype's largest number"
                )
    return adv, ret


def _fake(a: GaeArgs):
    _check_static(a)
    acc = _ragged.acc_dtype(torch.promote_types(a.rewards.dtype, a.values.dtype))
    out = torch.empty(a.rewards.shape, dtype=acc, device=a.rewards.device)
    return out, torch.empty_like(out)


gae_op = Op(
    "gae", GaeArgs, "(Tensor, Tensor)", _impl, _fake,
    setup_context=mark_outputs_constant, backward=no_gradient,
)


# --------------------------------------------------------------------------------------
# Public API


def _lambda(lam) -> tuple[Tensor | None, float]:
    """A lambda argument as (per-sequence tensor or None, scalar); the op checks both."""
    return (lam, 0.0) if isinstance(lam, Tensor) else (None, lam)


def _finite_positive(x: float) -> bool:
    return 0 < x < math.inf


def length_adaptive_lambda(valid_tokens: Tensor, alpha: float) -> Tensor:
    """VAPO's lambda_policy = 1 - 1/(alpha * l), clamped as NeMo-RL does.

    ``clamp(1 - 1 / clamp(alpha * l, min=1), 0, 1)``: sequences with alpha*l <= 1
    (including empty ones) get lambda = 0 instead of a negative or infinite value.
    """
    _ragged.check_number("alpha", alpha, _finite_positive, "a finite float > 0")
    scaled = valid_tokens.to(torch.float64) * alpha  # a copy: never the counts passed in
    if scaled.requires_grad:  # out of place: autograd needs each step's result
        return (1.0 - 1.0 / scaled.clamp(min=1.0)).clamp(0.0, 1.0)
    # In place (one allocation: this runs on every decoupled call). alpha * l >= 1 after
    # the clamp, so 1 - 1/(alpha l) already lies in [0, 1): the outer clamp is a no-op.
    return scaled.clamp_(min=1.0).reciprocal_().neg_().add_(1.0)


def decoupled_gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam_critic: float | Tensor = 1.0,
    lam_policy: float | Tensor = 0.95,
    alpha: float | None = None,
    mask_mode: str = "skip",
    whiten: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    r"""VAPO's decoupled GAE in one pass: ``(advantages, value_targets)``.

    Advantages use ``lam_policy``; value targets are ``G + V`` with ``lam_critic``
    (1.0: Monte-Carlo returns). With ``alpha`` set, lambda_policy is length-adaptive per
    sequence, :math:`\lambda = 1 - 1/(\alpha l)` (l = valid tokens, see
    :func:`length_adaptive_lambda`), and ``lam_policy`` is ignored. Lambdas are floats or
    per-sequence tensors of shape (S,). ``whiten=True`` whitens the advantages over the
    valid tokens of the batch (unbiased variance, eps 1e-8); targets are never whitened.
    """
    if alpha is not None:
        _ragged.check_number("alpha", alpha, _finite_positive, "a finite float > 0")
        lam_policy = 0.0  # placeholder: the op derives lambda_policy from alpha
    lam_p, scalar_p = _lambda(lam_policy)
    lam_c, scalar_c = _lambda(lam_critic)
    if isinstance(mask, Tensor) and mask.dtype != torch.bool and not no_values(mask):
        # Once here, not again in the whitening op. Not while traced (torch.compile, vmap)
        # or on meta tensors: the 0/1 check reads the mask's values (the ops check inside).
        mask = _ragged.as_bool_mask(mask)
    adv, targets = gae_op(GaeArgs(
        rewards, values, mask, cu_seqlens, lam_p, lam_c, scalar_p, scalar_c, gamma,
        float(alpha or 0.0), mask_mode, backend or "",
    ))
    if not isinstance(whiten, bool):  # "no" would count as True
        raise TypeError(f"whiten must be True or False, got {whiten!r}")
    if whiten:
        adv = masked_whiten(adv, mask, backend=backend)
    return adv, targets


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float | Tensor = 0.95,
    mask_mode: str = "skip",
    whiten: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation: ``(advantages, returns)``, returns = A + V.

    One lambda (float or per-sequence tensor) for both outputs; returns are computed
    before any whitening. See the module docstring for ``mask_mode``.
    """
    return _decoupled_as_gae(
        rewards, values, mask, cu_seqlens, gamma=gamma, lam_critic=lam, lam_policy=lam,
        mask_mode=mask_mode, whiten=whiten, backend=backend,
    )


# gae's one lambda is both of decoupled_gae's: its errors name it as gae's caller passed it.
_decoupled_as_gae = _ragged.named_as(decoupled_gae, lam_policy="lam", lam_critic="lam")

