r"""OpenRLHF 0.11.2 drop-ins: GAE, advantage normalisation, token log-probs, entropy, PPO losses.

In OpenRLHF 0.11.2, GAE is the method
``openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker.get_advantages_and_returns``
(its ``self`` is unused). :func:`get_advantages_and_returns` here is that method as a
plain function: same arguments without ``self``, same results. Its masking is
``mask_mode="zero"`` of :func:`vapo_kernels.gae`: values and rewards are zeroed on masked
tokens and the plain recurrence runs through them (no carry).

The method itself does not normalise. ``RemoteExperienceMaker.compute_advantages_and_returns``
then normalises the advantages of all experiences together (for ``gae``,
``reinforce`` and ``reinforce_baseline``); :func:`normalize_advantages` reproduces that
step: masked mean, *biased* variance, ``rsqrt(clamp(var, min=1e-8))``, applied to every
token (masked ones too), or only the mean shift with ``no_std_norm=True``.

Differences from OpenRLHF, outside its well-defined inputs: NaN/inf stored in masked
slots stays out of the valid outputs here (OpenRLHF's ``mask * values`` turns it into
NaN); a fractional float mask raises ``ValueError``; ``gamma``/``lambd`` must lie in
[0, 1]; half-precision inputs accumulate in float32 and are rounded once.

**Log-probs and entropy** (``openrlhf.models.utils``, used by ``Actor.forward``):
:func:`log_probs_from_logits` and :func:`compute_entropy`, computed by
:func:`vapo_kernels.token_logprobs`::

    logp = z[label] / tau - logsumexp(z / tau)
    H    = logsumexp(z) - sum_v softmax(z)_v * z_v

OpenRLHF's ``log_probs_from_logits`` divides the logits by ``temperature`` *in place*,
then: fp32 / fp64 logits go to flash-attn's cross-entropy if it imports, else to a
gather minus a logsumexp over chunks of 1024 rows (result in the logits' dtype); bf16 /
fp16 logits go to a per-row ``log_softmax`` loop in half precision (bf16 result).
``compute_entropy`` is a ``torch.compile``d softmax formula in the logits' dtype.
OpenRLHF's actor casts the logits to float32 and applies the temperature itself before
calling either, so it calls ``log_probs_from_logits`` with ``temperature=1.0``.

Deliberate differences: the logits are never modified (the temperature is applied
inside the kernel: OpenRLHF's in-place division is a memory saving, not part of the
result); half-precision logits give float32 results instead of rounded bf16 ones; a
label of -100 gives 0 and no gradient (OpenRLHF's fallback raises on it; flash-attn
gives 0). :func:`patch` / :func:`unpatch` swap both functions into OpenRLHF.

**PPO losses** (``openrlhf.models.loss``): :class:`PolicyLoss` (``policy_loss_type="ppo"``,
``is_correction_level="off"``), :class:`ValueLoss` and :func:`aggregate_loss`, with
OpenRLHF's constructor arguments, forward signatures and returns, each one pass of the
fused token-loss op (:func:`vapo_kernels.policy_loss`, :func:`vapo_kernels.value_loss`,
:func:`vapo_kernels.agg_loss`; gradients written during the forward pass, metrics from
the same pass). fp32 agreement <= 1e-6 (``tests/compat/test_loss_peers.py``).
Differences, all outside OpenRLHF's well-defined inputs:

* No valid token (an all-masked micro-batch, or a zero global count): loss 0 with zero
  gradient, and ``clip_ratio`` / ``ppo_kl`` 0; OpenRLHF divides 0 by 0 (NaN).
* ``ppo_kl`` is the mean of the log-ratio *clamped* to [-20, 20] (the one the loss
  uses); OpenRLHF averages the raw one. They differ only on tokens where
  ``|log_probs - old_log_probs| > 20`` (a ratio beyond e^20).
* The op selects valid tokens instead of multiplying by the mask: NaN / inf in a masked
  slot never reaches the loss, the metrics or a gradient (OpenRLHF: NaN). A NaN in a
  valid slot raises ``ValueError`` while input validation is on.
* A fractional float mask raises ``ValueError`` (OpenRLHF weights tokens by it).
* ``token_level_loss=False`` in float64 with a float64 mask: OpenRLHF divides each
  row by ``n_s + 1e-8`` in float64 (a relative 1e-8 / n_s), here by ``n_s``; with bool
  masks (OpenRLHF's ``action_mask``) or float32 the 1e-8 vanishes and the two agree.
* Half-precision inputs: the loss and metrics are accumulated and returned in float32.
* ``action_mask=None`` works at sample level too (all tokens valid; OpenRLHF raises), and
  no gradient flows to ``old_log_probs``, ``advantages``, ``old_values`` or ``returns``.
* ``clip_eps_low > 1`` is accepted and clips nothing below (as in OpenRLHF: the ratio
  is positive).
* ``batch_num_tokens`` / ``global_batch_size`` tensors (OpenRLHF's
  ``get_loss_batch_info`` all-reduces them on the GPU) are read once on the host: one
  device sync per call.

:func:`patch` swaps ``PolicyLoss``, ``ValueLoss`` and ``aggregate_loss`` in as well;
``PolicyLoss`` configurations this module does not implement keep OpenRLHF's class.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..ops.gae import gae
from .. import _ragged, token_logprobs
from .. import agg_loss as _agg_loss
from .. import policy_loss, value_loss
from . import (
    _at_most_one, _check_binary_mask, _entropy, _peer_dtype, _peer_names, _scalar, _Swap,
    get_backend,
)

__all__ = [
    "PolicyLoss",
    "ValueLoss",
    "aggregate_loss",
    "compute_entropy",
    "get_advantages_and_returns",
    "is_patched",
    "log_probs_from_logits",
    "normalize_advantages",
    "patch",
    "unpatch",
]

# Our functions under OpenRLHF's argument names: their errors name what the user passed.
_gae = _peer_names(gae, mask="action_mask", lam="lambd")
_token_logprobs = _peer_names(token_logprobs, targets="labels")
_COUNTS = {"global_tokens": "batch_num_tokens", "global_seqs": "global_batch_size"}
_agg_loss_named = _peer_names(_agg_loss, loss_mat="loss", mask="loss_mask", **_COUNTS)
_policy_loss = _peer_names(
    policy_loss, logp="log_probs", old_logp="old_log_probs", mask="action_mask",
    clip_low="clip_eps_low", clip_high="clip_eps_high", **_COUNTS,
)
_value_loss = _peer_names(value_loss, mask="action_mask", value_clip="clip_eps", **_COUNTS)


def get_advantages_and_returns(
    values: Tensor,
    rewards: Tensor,
    action_mask: Tensor | None,
    gamma: float,
    lambd: float,
) -> tuple[Tensor, Tensor]:
    r"""OpenRLHF's GAE: ``(advantages, returns)``, both ``(batch, response_len)``.

    With V and r zeroed where ``action_mask`` is 0 (nothing is zeroed when it is None),
    backwards over t::

        delta_t = r_t + gamma * V_{t+1} - V_t        (V_T = 0)
        A_t     = delta_t + gamma * lambd * A_{t+1}
        returns = A + V

    Advantages are not normalised here; see :func:`normalize_advantages`.
    """
    with torch.no_grad():
        _check_binary_mask("action_mask", action_mask)
        adv, returns = _gae(
            rewards,
            values,
            action_mask,
            gamma=_scalar("gamma", gamma),
            lam=_scalar("lambd", lambd),
            mask_mode="zero",
            backend=get_backend(),
        )
        dtype = _peer_dtype(values, rewards, action_mask)
        return adv.to(dtype), returns.to(dtype)


def normalize_advantages(
    advantages: Tensor | Sequence[Tensor],
    action_masks: Tensor | Sequence[Tensor],
    no_std_norm: bool = False,
) -> Tensor | list[Tensor]:
    r"""OpenRLHF's normalisation of the advantages of all experiences at once.

    ``advantages`` and ``action_masks`` are one tensor or one per experience (any
    shapes, matching pairwise). With n the number of valid tokens over all of them::

        mean = sum(m * A) / n                   (statistics in float32)
        var  = sum(m * (A - mean)^2) / n        (biased)
        out  = (A - mean) * rsqrt(max(var, 1e-8))   or  A - mean  when no_std_norm

    applied to every token, masked ones included. Returns the same structure it was
    given; each output keeps its input's dtype, as in OpenRLHF. A mask value other than
    0 / 1 raises ``ValueError`` (OpenRLHF weights tokens by it; the statistics here count
    tokens).
    """
    single = isinstance(advantages, Tensor)
    advs = [advantages] if single else list(advantages)
    masks = [action_masks] if isinstance(action_masks, Tensor) else list(action_masks)
    if len(advs) != len(masks):
        raise ValueError(f"got {len(advs)} advantage tensors but {len(masks)} masks")
    with torch.no_grad():
        # Statistics in float32 whatever the advantage dtype, as OpenRLHF's ``.float()``.
        flat = torch.cat([a.reshape(-1) for a in advs]).float()
        # OpenRLHF weights tokens by the mask: a fractional one is refused, not binarised
        valid = _ragged.as_bool_mask(torch.cat([m.reshape(-1) for m in masks]), "action_masks")
        count = valid.sum()
        zero = flat.new_zeros(())
        mean = torch.where(valid, flat, zero).sum() / count
        if no_std_norm:
            out = [a - mean for a in advs]
        else:
            var = torch.where(valid, (flat - mean).square(), zero).sum() / count
            # clamp, not var + eps: a batch with var >= 1e-8 is scaled by exactly 1/std.
            rstd = var.clamp(min=1e-8).rsqrt()
            out = [(a - mean) * rstd for a in advs]
    return out[0] if single else out


# --------------------------------------------------------------------------------------
# Log-probs and entropy (openrlhf.models.utils)


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    r"""OpenRLHF's per-token log-probs: ``logits`` (..., V), ``labels`` (...) -> (...).

    ::

        logp = z[label] / tau - logsumexp(z / tau)
        d logp / dz = (onehot(label) - softmax(z / tau)) / tau

    float32 (float64 for float64 logits). Unlike OpenRLHF, ``logits`` is left unchanged
    (no in-place division by the temperature).
    """
    return _token_logprobs(logits, labels, temperature=temperature, backend=get_backend())


def compute_entropy(logits: Tensor) -> Tensor:
    r"""OpenRLHF's entropy of each row: ``logits`` (..., V) -> (...).

    ::

        H = logsumexp(z) - sum_v softmax(z)_v * z_v      dH/dz = p * (E_p[z] - z)

    float32 (float64 for float64 logits); OpenRLHF returns the logits' dtype.
    """
    return _entropy(logits)


# --------------------------------------------------------------------------------------
# PPO losses (openrlhf.models.loss)


def _agg_kwargs(token_level_loss, dp_size, batch_num_tokens, global_batch_size) -> dict:
    """OpenRLHF's ``aggregate_loss`` modes as the fused op's keywords.

    Token level: ``masked_mean`` (local tokens, ``dp_size`` ignored) or, with
    ``batch_num_tokens``, sum / batch_num_tokens * dp_size. Sample level: the mean of the
    per-sequence token means over the sequences with a valid token (``dp_size`` ignored)
    or, with ``global_batch_size``, their sum / global_batch_size * dp_size.
    """
    if token_level_loss:
        if batch_num_tokens is None:
            return {"agg": "token-mean", "backend": get_backend()}
        return {"agg": "token-mean", "global_tokens": batch_num_tokens, "dp_size": dp_size,
                "backend": get_backend()}
    if global_batch_size is None:
        return {"agg": "seq-mean-token-mean", "backend": get_backend()}
    return {"agg": "seq-mean-token-mean", "global_seqs": global_batch_size, "dp_size": dp_size,
            "backend": get_backend()}


def _in_peer_dtype(loss: Tensor, *tensors: Tensor | None) -> Tensor:
    """The op's result in the dtype OpenRLHF's arithmetic ends in, never below float32."""
    dtype = torch.promote_types(loss.dtype, _peer_dtype(*tensors))
    return loss if loss.dtype == dtype else loss.to(dtype)


def _metric(value: Tensor, mask: Tensor | None, value_dtype: torch.dtype) -> Tensor:
    """A 0-d metric in the dtype of OpenRLHF's ``masked_mean(x, mask)``."""
    if mask is not None and mask.is_floating_point():
        value_dtype = torch.promote_types(value_dtype, mask.dtype)
    return value.to(value_dtype)


def aggregate_loss(
    loss: Tensor,
    loss_mask: Tensor | None,
    token_level_loss: bool = True,
    dp_size: int = 1,
    batch_num_tokens: float | None = None,
    global_batch_size: float | None = None,
) -> Tensor:
    r"""OpenRLHF's aggregation of a per-token loss ``(B, T)`` into a scalar.

    With n_s the valid tokens of row s (``loss_mask``), N = sum n_s, S = rows with
    n_s > 0::

        token level:   sum_st l_st / N                  (batch_num_tokens None)
                       sum_st l_st / batch_num_tokens * dp_size
        sample level:  (1/S) sum_s (sum_t l_st) / n_s   (global_batch_size None)
                       sum_s (sum_t l_st) / n_s / global_batch_size * dp_size

    Differentiable in ``loss``. One pass of :func:`vapo_kernels.agg_loss`.
    """
    _check_binary_mask("loss_mask", loss_mask)
    kwargs = _agg_kwargs(token_level_loss, dp_size, batch_num_tokens, global_batch_size)
    out, _ = _agg_loss_named(_as_rows(loss), _as_rows(loss_mask), **kwargs)
    return _in_peer_dtype(out, loss, loss_mask)


def _as_rows(t: Tensor | None) -> Tensor | None:
    """OpenRLHF reduces rows over the last dim; everything before it is the batch."""
    if t is None or t.dim() == 2 or t.dim() == 0:
        return t
    return t.reshape(-1, t.shape[-1])


class PolicyLoss(nn.Module):
    r"""OpenRLHF's PPO policy loss (``policy_loss_type="ppo"``, no train/rollout
    importance-sampling correction), on the fused token-loss op.

    Per token, with eps_low / eps_high = ``clip_eps_low`` / ``clip_eps_high`` and c =
    ``dual_clip``::

        ratio = exp(clamp(log_probs - old_log_probs, -20, 20))
        L     = -min(ratio A, clamp(ratio, 1 - eps_low, 1 + eps_high) A)
        L     = -max(-L, c A) if c is set and A < 0                       (dual clip)
        loss  = aggregate_loss(L, action_mask, token_level_loss, ...)

    ``forward`` returns OpenRLHF's 5-tuple ``(loss, clip_ratio, ppo_kl, None, None)``:
    ``clip_ratio`` is the fraction of valid tokens where the clipped surrogate won,
    ``ppo_kl`` the mean of ``old_log_probs - log_probs`` over them (0-d tensors, no
    graph); the two ``None`` are ``vllm_kl`` and ``is_filter_ratio`` of the correction
    that is off.

    ``policy_loss_type="gspo"`` and ``is_correction_level`` other than ``"off"`` raise
    ``NotImplementedError`` (under :func:`patch` they get OpenRLHF's own class); invalid
    values raise OpenRLHF's ``ValueError`` / ``AssertionError``. Differences from
    OpenRLHF are listed in the module docstring.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: list = (0.5, 5.0),
    ) -> None:
        super().__init__()
        _check_policy_options(
            dual_clip, policy_loss_type, is_correction_level, is_correction_mode,
            is_correction_gating, is_correction_threshold,
        )
        unsupported = _unsupported(policy_loss_type, is_correction_level)
        if unsupported:
            raise NotImplementedError(
                f"vapo_kernels' PolicyLoss implements policy_loss_type='ppo' with "
                f"is_correction_level='off' only, got {unsupported}; use OpenRLHF's own "
                f"PolicyLoss for it (under vapo_kernels.compat.openrlhf.patch() such "
                f"configurations get it automatically)"
            )
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.token_level_loss = token_level_loss
        self.dual_clip = dual_clip
        self.policy_loss_type = policy_loss_type
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold

    def forward(
        self,
        log_probs: Tensor,
        old_log_probs: Tensor,
        advantages: Tensor,
        action_mask: Tensor | None = None,
        rollout_log_probs: Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | None = None,
        global_batch_size: float | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, None, None]:
        _check_binary_mask("action_mask", action_mask)
        kwargs = _agg_kwargs(self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        loss, m = _policy_loss(
            _as_rows(log_probs), _as_rows(old_log_probs), _as_rows(advantages),
            _as_rows(action_mask),
            clip_low=_at_most_one(self.clip_eps_low), clip_high=self.clip_eps_high,
            dual_clip=self.dual_clip, ratio_log_clamp=20.0, **kwargs,
        )
        loss = _in_peer_dtype(loss, log_probs, old_log_probs, advantages, action_mask)
        clip_ratio = _metric(m["clipfrac"], action_mask, torch.float32)
        ppo_kl = _metric(m["approx_kl"], action_mask, _peer_dtype(log_probs, old_log_probs))
        return loss, clip_ratio, ppo_kl, None, None


def _check_policy_options(dual_clip, policy_loss_type, is_correction_level, is_correction_mode,
                          is_correction_gating, is_correction_threshold) -> None:
    """OpenRLHF's constructor checks, with its exception types and messages."""
    if dual_clip is not None:
        assert dual_clip > 1.0, f"dual_clip must be > 1.0, got {dual_clip}"
    if is_correction_level not in {"off", "token", "seq"}:
        raise ValueError(f"is_correction_level must be off/token/seq, got {is_correction_level}")
    if is_correction_mode not in {"mask", "clip"}:
        raise ValueError(f"is_correction_mode must be mask/clip, got {is_correction_mode}")
    if is_correction_gating not in {"ratio", "binary_kl", "tv"}:
        raise ValueError(
            f"is_correction_gating must be ratio/binary_kl/tv, got {is_correction_gating}"
        )
    if is_correction_mode == "clip" and (
        is_correction_level == "seq" or is_correction_gating != "ratio"
    ):
        raise ValueError(
            "is_correction_mode=clip requires is_correction_level=token and "
            "is_correction_gating=ratio"
        )
    if (is_correction_gating != "ratio" and is_correction_level != "off"
            and is_correction_threshold[0] > 0):
        raise ValueError(
            f"is_correction_gating={is_correction_gating} takes an upper bound only "
            "(a single delta)"
        )
    if policy_loss_type not in ("ppo", "gspo"):
        raise ValueError(f"Invalid policy loss type: {policy_loss_type}")


def _unsupported(policy_loss_type, is_correction_level) -> str:
    parts = []
    if policy_loss_type != "ppo":
        parts.append(f"policy_loss_type={policy_loss_type!r}")
    if is_correction_level != "off":
        parts.append(f"is_correction_level={is_correction_level!r}")
    return ", ".join(parts)


class ValueLoss(nn.Module):
    r"""OpenRLHF's PPO value loss, on the fused token-loss op.

    ::

        v_clip = old_values + clamp(values - old_values, -eps, eps)      eps = clip_eps
        L      = max((v_clip - R)^2, (values - R)^2)     ((values - R)^2 if clip_eps is None)
        loss   = 0.5 aggregate_loss(L, action_mask, token_level_loss, ...)

    ``forward(values, old_values, returns, action_mask=None, dp_size=1,
    batch_num_tokens=None, global_batch_size=None)`` returns the scalar loss.
    """

    def __init__(self, clip_eps: float = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(
        self,
        values: Tensor,
        old_values: Tensor,
        returns: Tensor,
        action_mask: Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | None = None,
        global_batch_size: float | None = None,
    ) -> Tensor:
        _check_binary_mask("action_mask", action_mask)
        kwargs = _agg_kwargs(self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        clip = self.clip_eps
        loss, _ = _value_loss(
            _as_rows(values), None if clip is None else _as_rows(old_values), _as_rows(returns),
            _as_rows(action_mask), value_clip=None if clip is None else _scalar("clip_eps", clip),
            value_clip_form="openrlhf", **kwargs,
        )
        return _in_peer_dtype(loss, values, old_values if clip is not None else None, returns,
                              action_mask)


# --------------------------------------------------------------------------------------
# Swapping OpenRLHF's functions and classes in place.


class _PatchedPolicyLoss(PolicyLoss):
    """What :func:`patch` installs: :class:`PolicyLoss`, except that configurations it
    does not implement (GSPO, train/rollout IS correction) get OpenRLHF's own class."""

    def __new__(cls, *args, **kwargs):
        bound = inspect.signature(PolicyLoss.__init__).bind(None, *args, **kwargs)
        bound.apply_defaults()
        options = bound.arguments
        original = _LOSS_SWAPS[0].original
        if original is not None and _unsupported(
            options["policy_loss_type"], options["is_correction_level"]
        ):
            return original(*args, **kwargs)  # not an instance of cls: __init__ is skipped
        return super().__new__(cls)


_UTILS = "openrlhf.models.utils"
_LOSS = "openrlhf.models.loss"
_LOSS_SWAPS = [
    _Swap("openrlhf", _LOSS, "PolicyLoss", _PatchedPolicyLoss),
    _Swap("openrlhf", _LOSS, "ValueLoss", ValueLoss),
    _Swap("openrlhf", _LOSS, "aggregate_loss", aggregate_loss),
]
_SWAPS = [
    _Swap("openrlhf", _UTILS, "log_probs_from_logits", log_probs_from_logits),
    _Swap("openrlhf", _UTILS, "compute_entropy", compute_entropy),
    *_LOSS_SWAPS,
]


def patch(*, logprobs: bool = True, loss: bool = True) -> None:
    """Make OpenRLHF use the functions and classes of this module, in their home module
    and every loaded ``openrlhf.*`` module that imported them by name:

    * ``logprobs``: :func:`log_probs_from_logits` and :func:`compute_entropy` of
      ``openrlhf.models.utils`` (``openrlhf.models.actor``, whose ``Actor.forward``
      calls them);
    * ``loss``: ``PolicyLoss``, ``ValueLoss`` and ``aggregate_loss`` of
      ``openrlhf.models.loss`` (re-exported by ``openrlhf.models``; the Ray PPO actor and
      critic build their loss modules from there). ``PolicyLoss`` objects built with
      ``policy_loss_type="gspo"`` or an IS correction are OpenRLHF's own. Objects
      built before :func:`patch` keep their class.

    Idempotent; call again after importing more of OpenRLHF, in every process that runs
    the actor / critic (each Ray worker). GAE is not patched: OpenRLHF computes it in a
    method (see :func:`get_advantages_and_returns`).
    """
    for swap in _SWAPS:
        if (swap in _LOSS_SWAPS and loss) or (swap not in _LOSS_SWAPS and logprobs):
            swap.apply()


def unpatch() -> None:
    """Put OpenRLHF's own functions back. Idempotent."""
    for swap in _SWAPS:
        swap.undo()


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return any(swap.active for swap in _SWAPS)
