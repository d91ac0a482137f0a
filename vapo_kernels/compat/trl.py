r"""TRL 1.12 drop-ins: PPO's advantage/return and loss blocks, ``selective_log_softmax``, entropy.

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

**PPO loss.** The loss is inline in ``PPOTrainer.train`` too (the micro-batch loop:
value loss over ``~padding_mask_p1``, clipped policy loss over ``~padding_mask``);
:func:`ppo_loss` is that block as a function of the tensors it reads, on the fused
token-loss op (see its docstring for the formulas and the differences: all-masked
batches give 0 instead of NaN, exact-tie value-clip gradients, half precision). There
is nothing in TRL to patch it into.

**Log-probs and entropy** (``trl.trainer.utils``, imported by name by the GRPO, RLOO,
DPO, KTO, SFT, PPO, ... trainers): :func:`selective_log_softmax` and
:func:`entropy_from_logits`, computed by :func:`vapo_kernels.token_logprobs`::

    logp = z[index] - logsumexp(z)
    H    = logsumexp(z) - sum_v softmax(z)_v * z_v

TRL 1.12 computes fp32 / fp64 logits as a gather minus a per-row logsumexp, and bf16 /
fp16 logits with a per-row ``log_softmax`` in half precision (bf16 result); its entropy
is ``-(exp(log_softmax) * log_softmax).sum()`` over chunks of rows in the logits' dtype.
Deliberate differences: half-precision logits give float32 results (never rounded to
bf16); an ``index`` of -100 gives 0 and no gradient when ``index`` has the logits'
leading shape (TRL's gather raises); ``entropy_from_logits``' ``chunk_size`` is accepted
and ignored. :func:`patch` / :func:`unpatch` swap both functions into TRL.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..ops.gae import gae, masked_whiten
from .. import token_logprobs
from .. import policy_loss, value_loss
from . import _at_most_one, _entropy, _peer_dtype, _peer_names, _scalar, _Swap, get_backend

__all__ = [
    "compute_advantages_and_returns",
    "entropy_from_logits",
    "is_patched",
    "patch",
    "ppo_loss",
    "selective_log_softmax",
    "unpatch",
]

# Our functions under TRL's argument names: their errors name what the user passed. The
# masks TRL derives from sequence_lengths are named by it.
_whiten_rewards = _peer_names(masked_whiten, x="rewards", mask="sequence_lengths")
_whiten_advantages = _peer_names(masked_whiten, mask="sequence_lengths")
_policy_loss = _peer_names(
    policy_loss, logp="new_logprobs", old_logp="mb_logprobs", advantages="mb_advantage",
    mask="padding_mask", clip_low="cliprange", clip_high="cliprange",
)
_value_loss = _peer_names(
    value_loss, values="vpred", old_values="mb_values", returns="mb_return",
    mask="padding_mask_p1", value_clip="cliprange_value",
)
_token_logprobs = _peer_names(token_logprobs, targets="index")


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
            rewards = _whiten_rewards(
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
        adv = _whiten_advantages(adv, ~padding_mask, unbiased=True, eps=1e-8, backend=backend)
        adv = adv.masked_fill(padding_mask, 0)
        return adv.to(dtype), returns.to(dtype)


# --------------------------------------------------------------------------------------
# The PPO loss (inline in PPOTrainer.train)


def ppo_loss(
    new_logprobs: Tensor,
    mb_logprobs: Tensor,
    mb_advantage: Tensor,
    vpred: Tensor,
    mb_values: Tensor,
    mb_return: Tensor,
    padding_mask: Tensor,
    padding_mask_p1: Tensor,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""TRL PPO's loss block: ``(loss, pg_loss, vf_loss, pg_clipfrac, vf_clipfrac)``.

    The names are those of ``PPOTrainer.train`` (TRL 1.12, a micro-batch already
    selected: ``padding_mask[micro_batch_inds]`` is ``padding_mask`` here). With the
    policy term averaged over the tokens where ``padding_mask`` is False and the value
    term over those where ``padding_mask_p1`` is False (one slot more per response)::

        ratio   = exp(new_logprobs - mb_logprobs)                   (no clamp in TRL)
        pg_loss = mean(max(-A ratio, -A clamp(ratio, 1 - eps, 1 + eps)))   eps = cliprange
        v_clip  = clamp(vpred, mb_values - eps_v, mb_values + eps_v)       eps_v = cliprange_value
        vf_loss = 0.5 mean(max((vpred - R)^2, (v_clip - R)^2))
        loss    = pg_loss + vf_coef * vf_loss
        pg_clipfrac = mean(clipped term won),  vf_clipfrac = mean(clipped value won)

    ``loss``, ``pg_loss`` and ``vf_loss`` are differentiable in ``new_logprobs`` and
    ``vpred``; the clip fractions are detached 0-d float32 tensors (TRL computes them
    under ``no_grad``). Two passes of the fused op (:func:`vapo_kernels.policy_loss`,
    :func:`vapo_kernels.value_loss`): the two terms have different masks.

    Differences from TRL's lines: a batch with no valid token gives 0 (TRL: 0 / 0 =
    NaN); NaN / inf in padded slots never reaches a result (TRL fills them with
    ``INVALID_LOGPROB`` / 0 first, so its values are finite there too); a NaN in a valid
    slot raises ``ValueError`` while input validation is on; where ``vpred`` equals a
    clip bound exactly, the gradient through ``v_clip`` is halved (``max(min(...))``'s
    tie rule) where ``torch.clamp`` passes it whole - the loss value is the same;
    half-precision inputs give float32 results.
    """
    eps = _scalar("cliprange", cliprange)
    pg_loss, pm = _policy_loss(
        new_logprobs, mb_logprobs, mb_advantage, ~padding_mask.bool(),
        clip_low=_at_most_one(eps), clip_high=eps, ratio_log_clamp=math.inf, backend=get_backend(),
    )
    vf_loss, vm = _value_loss(
        vpred, mb_values, mb_return, ~padding_mask_p1.bool(),
        value_clip=_scalar("cliprange_value", cliprange_value), value_clip_form="verl", backend=get_backend(),
    )
    pg_loss = _in_peer_dtype(pg_loss, new_logprobs, mb_logprobs, mb_advantage)
    vf_loss = _in_peer_dtype(vf_loss, vpred, mb_values, mb_return)
    loss = pg_loss + vf_coef * vf_loss
    return loss, pg_loss, vf_loss, pm["clipfrac"].float(), vm["vf_clipfrac"].float()


def _in_peer_dtype(loss: Tensor, *tensors: Tensor) -> Tensor:
    dtype = torch.promote_types(loss.dtype, _peer_dtype(*tensors))
    return loss if loss.dtype == dtype else loss.to(dtype)


# --------------------------------------------------------------------------------------
# Log-probs and entropy (trl.trainer.utils)


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    r"""TRL's ``log_softmax(logits).gather(index)`` without the ``(..., V)`` log-softmax.

    ``logits`` (..., V); ``index`` (...) gives one log-prob per position, ``index``
    (..., K) gives K (e.g. top-K). Per position, for each selected token k::

        logp_k = z_k - logsumexp(z)          d logp_k / dz = onehot(k) - softmax(z)

    float32 (float64 for float64 logits). With K columns the row's logsumexp comes from
    one pass of the op at the row's largest logit m (its log-prob is the stable one, in
    [-log V, 0]): ``logp_k = z_k - m + logp_m``, exact whatever the selected logits are
    (-inf, -1e30); the argmax reads the logits once more, and the gather's backward adds
    a ``(..., V)`` buffer.
    """
    if index.dim() == logits.dim() - 1:
        return _token_logprobs(logits, index, backend=get_backend())
    if index.dim() != logits.dim() or index.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"index must have shape {tuple(logits.shape[:-1])} or "
            f"{tuple(logits.shape[:-1])} + (K,), got {tuple(index.shape)}"
        )
    top = logits.detach().argmax(-1) if logits.shape[-1] else index.new_zeros(logits.shape[:-1])
    logp_top = token_logprobs(logits, top, backend=get_backend())
    selected = logits.gather(-1, index.long()).to(logp_top.dtype)
    offset = logp_top - logits.gather(-1, top.unsqueeze(-1)).squeeze(-1).to(logp_top.dtype)
    return selected + offset.unsqueeze(-1)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    r"""TRL's entropy of each row: ``logits`` (..., V) -> (...).

    ::

        H = logsumexp(z) - sum_v softmax(z)_v * z_v      dH/dz = p * (E_p[z] - z)

    float32 (float64 for float64 logits); TRL returns the logits' dtype. ``chunk_size``
    is accepted for compatibility and ignored (the op bounds its working set itself).
    """
    return _entropy(logits)


_UTILS = "trl.trainer.utils"
_SWAPS = [
    _Swap("trl", _UTILS, "selective_log_softmax", selective_log_softmax),
    _Swap("trl", _UTILS, "entropy_from_logits", entropy_from_logits),
]


def patch() -> None:
    """Make TRL use :func:`selective_log_softmax` and :func:`entropy_from_logits` from
    here: in ``trl.trainer.utils`` and every loaded ``trl.*`` module that imported them
    by name (the trainers). Idempotent; call again after importing more of TRL. The PPO
    advantage block is inline in ``PPOTrainer.train`` and is not patched.
    """
    for swap in _SWAPS:
        swap.apply()


def unpatch() -> None:
    """Put TRL's own functions back. Idempotent."""
    for swap in _SWAPS:
        swap.undo()


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return any(swap.active for swap in _SWAPS)
