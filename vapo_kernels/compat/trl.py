r"""TRL <= 1.12 PPO drop-in: the advantage/return block of ``PPOTrainer.train``.

TRL has no GAE function: the computation is inline in ``PPOTrainer.train``
(``trl/experimental/ppo/ppo_trainer.py`` in TRL 1.12, steps "5. whiten rewards" and
"6. compute advantages and returns"). :func:`compute_advantages_and_returns` is that
block as a function of the tensors it reads. From ``sequence_lengths`` (index of the
last response token, -1 for an empty response) TRL derives two masks:

* ``padding_mask``    = position > sequence_length      (advantages are zeroed there);
* ``padding_mask_p1`` = position > sequence_length + 1  (values are zeroed there; TRL
  keeps one extra slot, where it also puts the score).

Then, in this order: values zeroed on ``padding_mask_p1``; optionally rewards whitened
over ``~padding_mask_p1`` keeping their mean (``whiten_rewards``), then zeroed on
``padding_mask_p1``; the plain GAE recurrence over *every* position of the row, with no
mask inside the loop (``mask_mode`` is irrelevant: the scan runs unmasked); returns =
A + V; advantages whitened over ``~padding_mask`` (unbiased variance, eps 1e-8);
advantages zeroed on ``padding_mask``.

TRL quirk reproduced on purpose: rewards past ``sequence_length + 1`` are not masked
out of the recurrence unless ``whiten_rewards`` is set, so a non-zero reward on padding
reaches the advantages of the valid tokens (in TRL's trainer they are 0 there).
Difference: where TRL's whitening divides by zero (a batch with a single response
token) and returns NaN, this raises ``ValueError`` while input validation is on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.gae import gae, masked_whiten
from . import _peer_dtype, _scalar, get_backend

__all__ = ["compute_advantages_and_returns"]


def compute_advantages_and_returns(
    values: Tensor,
    rewards: Tensor,
    sequence_lengths: Tensor,
    gamma: float,
    lam: float,
    whiten_rewards: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""TRL PPO's advantages and returns: ``(advantages, returns)``, both ``(B, T)``.

    With ``V`` zeroed past ``sequence_length + 1`` (and ``r`` whitened first if
    ``whiten_rewards``), backwards over every position t of a row::

        delta_t = r_t + gamma * V_{t+1} - V_t        (V_T = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V
        advantages = whiten(A over t <= sequence_length), then 0 for t > sequence_length

    ``values`` is the value model's output before TRL's zeroing (zeroing twice is
    harmless); TRL keeps using the zeroed values for its value loss, so callers zero
    them too: ``values.masked_fill(positions > sequence_lengths[:, None] + 1, 0)``.
    """
    if values.dim() != 2 or rewards.shape != values.shape:
        raise ValueError(
            f"values and rewards must both be (B, T), got {tuple(values.shape)} "
            f"and {tuple(rewards.shape)}"
        )
    dtype = _peer_dtype(values, rewards)  # before whitening turns half rewards into float32
    with torch.no_grad():
        backend = get_backend()
        positions = torch.arange(values.shape[1], device=values.device)
        lengths = sequence_lengths.reshape(-1, 1)
        padding_mask = positions > lengths
        padding_mask_p1 = positions > lengths + 1
        values = values.masked_fill(padding_mask_p1, 0)
        if whiten_rewards:
            rewards = masked_whiten(
                rewards, ~padding_mask_p1, unbiased=True, eps=1e-8, shift_mean=False,
                backend=backend,
            )
            rewards = rewards.masked_fill(padding_mask_p1, 0)
        adv, returns = gae(
            rewards,
            values,
            None,  # TRL's loop has no mask: every slot, padding included, is a step
            gamma=_scalar("gamma", gamma),
            lam=_scalar("lam", lam),
            backend=backend,
        )
        adv = masked_whiten(adv, ~padding_mask, unbiased=True, eps=1e-8, backend=backend)
        adv = adv.masked_fill(padding_mask, 0)
        return adv.to(dtype), returns.to(dtype)
