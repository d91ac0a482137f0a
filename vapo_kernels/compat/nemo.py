r"""NeMo-RL drop-in: the GAE of ``GeneralizedAdvantageEstimator`` (VAPO options included).

NeMo-RL (``nemo_rl/algorithms/advantage_estimator.py`` on main, with ``GAEConfig``) is
not installable from PyPI, so this module reproduces its semantics as read from the
source; its test compares against a literal Python loop written from them.

NeMo-RL's estimator, after building token-level rewards (see
:func:`build_token_level_rewards`):

* resolves lambda_value = ``gae_lambda_value`` or ``gae_lambda``, and lambda_policy =
  the length-adaptive ``clamp(1 - 1/clamp(alpha * len, min=1), 0, 1)`` when
  ``length_adaptive_alpha > 0`` (len = valid tokens of the row), else
  ``gae_lambda_policy``, else ``gae_lambda``;
* runs the verl-style carry loop once per distinct lambda: returns from the lambda_value
  pass, advantages from the lambda_policy pass (here: ONE fused pass for both, via
  :func:`vapo_kernels.decoupled_gae`);
* whitens the advantages over the valid tokens (``normalize_advantages``; unbiased
  variance, ``rsqrt(var + 1e-8)``);
* zero-fills the advantages on masked positions (always). Returns are not zero-filled.

NeMo-RL also has a shortcut for gamma = lambda = 1 (reward-to-go minus the next valid
value); it is the same function and needs nothing special here.

Differences, outside NeMo-RL's well-defined inputs: a fractional float mask raises
``ValueError``; NaN/inf in masked slots stays out of the valid outputs; with exactly one
valid token in the batch NeMo-RL's whitening returns NaN while this raises ``ValueError``
(validation on); half-precision inputs accumulate in float32; lambda_policy of the
length-adaptive rule is computed in float64 instead of float32 (differs by < 1 ulp).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.gae import decoupled_gae, masked_whiten
from . import _check_binary_mask, _peer_dtype, _peer_names, _scalar, get_backend

__all__ = ["build_token_level_rewards", "compute_gae"]


def compute_gae(
    token_level_rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gae_lambda: float = 0.95,
    gae_gamma: float = 1.0,
    normalize_advantages: bool = True,
    gae_lambda_value: float | None = None,
    gae_lambda_policy: float | None = None,
    length_adaptive_alpha: float = 0.0,
) -> tuple[Tensor, Tensor]:
    r"""NeMo-RL's (decoupled, length-adaptive) GAE: ``(advantages, returns)``, ``(B, T)``.

    The keyword arguments and defaults are ``GAEConfig``'s fields. Per row, backwards
    over t, with the multi-turn carry of masked tokens (as verl)::

        delta_t = r_t + gamma * V_next - V_t
        A_t = delta_t + gamma * lam_policy * A_next     (advantages)
        G_t = delta_t + gamma * lam_value  * G_next     (returns = G + V)
        masked t: A_t = A_next, G_t = G_next, V_next unchanged

        lam_value  = gae_lambda_value ?? gae_lambda
        lam_policy = clamp(1 - 1 / clamp(alpha * len, min=1), 0, 1)   if alpha > 0
                     else gae_lambda_policy ?? gae_lambda

    then advantages are whitened over the valid tokens (if ``normalize_advantages``)
    and set to 0 where ``mask`` is 0.
    """
    with torch.no_grad():
        _check_binary_mask("mask", mask)
        backend = get_backend()
        # Each lambda under the GAEConfig field it comes from, for the errors.
        value_name = "gae_lambda" if gae_lambda_value is None else "gae_lambda_value"
        policy_name = "gae_lambda" if gae_lambda_policy is None else "gae_lambda_policy"
        lam_value = gae_lambda if gae_lambda_value is None else gae_lambda_value
        lam_policy = gae_lambda if gae_lambda_policy is None else gae_lambda_policy
        alpha = _scalar("length_adaptive_alpha", length_adaptive_alpha)
        named = _peer_names(
            decoupled_gae, rewards="token_level_rewards", gamma="gae_gamma",
            lam_critic=value_name, lam_policy=policy_name, alpha="length_adaptive_alpha",
        )
        adv, returns = named(
            token_level_rewards,
            values,
            mask,
            gamma=_scalar("gae_gamma", gae_gamma),
            lam_critic=_scalar(value_name, lam_value),
            lam_policy=_scalar(policy_name, lam_policy),
            alpha=alpha if alpha > 0 else None,
            mask_mode="skip",
            backend=backend,
        )
        valid = mask != 0
        # NeMo-RL's whitening of an all-masked batch is finite (its mean divides by
        # n + 1e-8) and the zero-fill below erases it, so skip it rather than raise.
        if normalize_advantages and bool(valid.any()):
            adv = masked_whiten(adv, valid, unbiased=True, eps=1e-8, backend=backend)
        adv = adv.masked_fill(~valid, 0)
        dtype = _peer_dtype(token_level_rewards, values, mask)
        return adv.to(dtype), returns.to(dtype)


def build_token_level_rewards(
    rewards: Tensor,
    mask: Tensor,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Tensor:
    r"""NeMo-RL's token-level rewards from one scalar reward per sequence.

    ``out = (-kl_coef * kl  [if kl given and kl_coef > 0]  +  reward at the last valid
    token of each row that has one) * mask``. ``rewards`` is ``(B,)``, ``mask`` and
    ``kl`` are ``(B, T)``; ``kl`` is NeMo-RL's per-token estimate (its ``calculate_kl``
    of the policy and reference log-probs, clamped). The dtype is ``rewards.dtype``
    promoted with ``kl``/``mask``.
    """
    batch, length = mask.shape
    out = torch.zeros(batch, length, dtype=rewards.dtype, device=rewards.device)
    if kl is not None and kl_coef > 0:
        out = out - kl_coef * kl
    if length:
        positions = torch.arange(length, device=mask.device)
        last = torch.where(mask != 0, positions, -1).amax(dim=1)  # -1: no valid token
        rows = torch.nonzero(last >= 0).reshape(-1)
        out[rows, last[rows]] += rewards[rows].to(out.dtype)
    return out * mask
