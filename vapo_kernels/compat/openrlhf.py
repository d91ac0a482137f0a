r"""OpenRLHF 0.11.2 drop-ins: GAE, the advantage normalisation, token log-probs, entropy.

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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..ops.gae import gae
from ..ops.logprobs import token_logprobs
from . import _check_binary_mask, _entropy, _peer_dtype, _scalar, _Swap, get_backend

__all__ = [
    "compute_entropy",
    "get_advantages_and_returns",
    "is_patched",
    "log_probs_from_logits",
    "normalize_advantages",
    "patch",
    "unpatch",
]


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
        adv, returns = gae(
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
    given; each output keeps its input's dtype, as in OpenRLHF.
    """
    single = isinstance(advantages, Tensor)
    advs = [advantages] if single else list(advantages)
    masks = [action_masks] if isinstance(action_masks, Tensor) else list(action_masks)
    if len(advs) != len(masks):
        raise ValueError(f"got {len(advs)} advantage tensors but {len(masks)} masks")
    with torch.no_grad():
        # Statistics in float32 whatever the advantage dtype, as OpenRLHF's ``.float()``.
        flat = torch.cat([a.reshape(-1) for a in advs]).float()
        valid = torch.cat([m.reshape(-1) for m in masks]) != 0
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
    return token_logprobs(logits, labels, temperature=temperature, backend=get_backend())


def compute_entropy(logits: Tensor) -> Tensor:
    r"""OpenRLHF's entropy of each row: ``logits`` (..., V) -> (...).

    ::

        H = logsumexp(z) - sum_v softmax(z)_v * z_v      dH/dz = p * (E_p[z] - z)

    float32 (float64 for float64 logits); OpenRLHF returns the logits' dtype.
    """
    return _entropy(logits)


_UTILS = "openrlhf.models.utils"
_SWAPS = [
    _Swap("openrlhf", _UTILS, "log_probs_from_logits", log_probs_from_logits),
    _Swap("openrlhf", _UTILS, "compute_entropy", compute_entropy),
]


def patch() -> None:
    """Make OpenRLHF use :func:`log_probs_from_logits` and :func:`compute_entropy` from
    here: in ``openrlhf.models.utils`` and every loaded ``openrlhf.*`` module that
    imported them by name (``openrlhf.models.actor``, whose ``Actor.forward`` calls
    them). Idempotent; call again after importing more of OpenRLHF, in every process
    that runs the actor (each Ray worker). GAE is not patched: OpenRLHF computes it in
    a method (see :func:`get_advantages_and_returns`).
    """
    for swap in _SWAPS:
        swap.apply()


def unpatch() -> None:
    """Put OpenRLHF's own functions back. Idempotent."""
    for swap in _SWAPS:
        swap.undo()


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return any(swap.active for swap in _SWAPS)
