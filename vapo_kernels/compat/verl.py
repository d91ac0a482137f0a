r"""verl 0.9.1 drop-in: ``compute_gae_advantage_return`` and an in-place :func:`patch`.

Matches ``verl.trainer.ppo.core_algos.compute_gae_advantage_return`` of verl 0.9.1,
which has the multi-turn "carry" loop: a masked token (tool output, observation) is
skipped - its value and reward are ignored, the next valid value is carried across the
gap, and the masked position reports the advantage of the next valid token. This is
``mask_mode="skip"`` of :func:`vapo_kernels.gae`. The advantages are then whitened over
the valid tokens of the whole batch (unbiased variance, ``rsqrt(var + 1e-8)``).

Differences from verl, all outside its well-defined inputs:

* NaN/inf stored in a *masked* slot leaves every output of a valid token unchanged here;
  verl multiplies it by the zero mask and spreads NaN backwards through the row.
* A fractional float mask raises ``ValueError`` (verl blends by the weight).
* ``gamma`` and ``lam`` must lie in [0, 1]; ``lam`` may be a per-sequence tensor of
  shape ``(bs,)`` (verl broadcasts it the same way), ``gamma`` must be a scalar.
* Half-precision inputs are accumulated in float32 and rounded once to the dtype verl
  returns, instead of being rounded at every step.
* A boolean ``response_mask`` is accepted (verl's ``1 - mask`` rejects it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.gae import gae, masked_whiten
from . import _check_binary_mask, _peer_dtype, _scalar, get_backend

__all__ = ["compute_gae_advantage_return", "is_patched", "patch", "unpatch"]


def _lam_arg(lam, batch: int) -> float | Tensor:
    """verl writes ``gamma * lam * A`` with ``A`` of shape (bs,), so a (bs,) ``lam`` works."""
    if isinstance(lam, Tensor) and lam.numel() != 1:
        if lam.shape != (batch,):
            raise ValueError(
                f"lam must be a scalar or a per-sequence tensor of shape ({batch},), "
                f"got {tuple(lam.shape)}"
            )
        return lam if lam.is_floating_point() else lam.to(torch.float64)
    return _scalar("lam", lam)


def compute_gae_advantage_return(
    token_level_rewards: Tensor,
    values: Tensor,
    response_mask: Tensor,
    gamma: float | Tensor,
    lam: float | Tensor,
) -> tuple[Tensor, Tensor]:
    r"""verl's GAE with multi-turn carry: ``(advantages, returns)``, both ``(bs, T)``.

    Backwards over t, per row, with m_t the mask::

        delta_t = r_t + gamma * V_next - V_t
        A_t     = delta_t + gamma * lam * A_next      if m_t else A_next
        V_next  = V_t                                  if m_t else V_next   (0 past the end)
        returns = A + V
        advantages = (A - mean) * rsqrt(var + 1e-8)    mean, unbiased var over m_t = 1

    Raises ``ValueError`` like verl when the batch has fewer than two valid tokens.
    """
    with torch.no_grad():
        _check_binary_mask("response_mask", response_mask)
        backend = get_backend()
        adv, returns = gae(
            token_level_rewards,
            values,
            response_mask,
            gamma=_scalar("gamma", gamma),
            lam=_lam_arg(lam, token_level_rewards.shape[0]),
            mask_mode="skip",
            backend=backend,
        )
        adv = masked_whiten(adv, response_mask, unbiased=True, eps=1e-8, backend=backend)
        dtype = _peer_dtype(token_level_rewards, values, response_mask)
        return adv.to(dtype), returns.to(dtype)


# --------------------------------------------------------------------------------------
# Swapping verl's function in place. verl's trainer looks the function up as a module
# attribute at call time (``core_algos.compute_gae_advantage_return(...)`` in
# ``ray_trainer.compute_advantage``), and other code goes through the estimator registry
# (``core_algos.get_adv_estimator_fn("gae")``), so both are replaced.

_MISSING = object()
_saved: dict | None = None  # verl's originals while patched


def _core_algos():
    from verl.trainer.ppo import core_algos  # imported here only: verl is optional

    return core_algos


def patch() -> None:
    """Make verl use :func:`compute_gae_advantage_return` from here. Idempotent."""
    global _saved
    core_algos = _core_algos()
    registry = getattr(core_algos, "ADV_ESTIMATOR_REGISTRY", None)
    if _saved is None:
        _saved = {
            "attr": core_algos.compute_gae_advantage_return,
            "registry": _MISSING if registry is None else registry.get("gae", _MISSING),
        }
    core_algos.compute_gae_advantage_return = compute_gae_advantage_return
    if registry is not None and _saved["registry"] is not _MISSING:
        registry["gae"] = compute_gae_advantage_return


def unpatch() -> None:
    """Put verl's own functions back. Idempotent; a no-op when not patched."""
    global _saved
    if _saved is None:
        return
    core_algos = _core_algos()
    core_algos.compute_gae_advantage_return = _saved["attr"]
    registry = getattr(core_algos, "ADV_ESTIMATOR_REGISTRY", None)
    if registry is not None and _saved["registry"] is not _MISSING:
        registry["gae"] = _saved["registry"]
    _saved = None


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return _saved is not None
