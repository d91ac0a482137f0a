r"""verl 0.9.1 drop-ins: GAE, token log-probs / entropy, PPO losses, and an in-place :func:`patch`.

**GAE.** Matches ``verl.trainer.ppo.core_algos.compute_gae_advantage_return`` of verl 0.9.1,
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

**Log-probs and entropy** (``verl.utils.torch_functional`` and
``verl.utils.kernel.linear_cross_entropy``), all computed by
:func:`vapo_kernels.token_logprobs` (fp32 accumulation, one read of the logits per pass)::

    logp_t = z_t[y_t] / tau - logsumexp(z_t / tau)
    H_t    = logsumexp(z_t / tau) - sum_v softmax(z_t / tau)_v * z_{t,v} / tau

* :func:`logprobs_from_logits` - verl picks flash-attn's Triton cross-entropy when
  flash-attn is importable and ``VERL_DISABLE_FLASH_ATTN_CE`` is not 1 (fp32 result,
  optional in-place backward), else torch_npu,
  else ``logprobs_from_logits_v2``: a per-row loop returning the logits' dtype (fp32 /
  fp64: gather - logsumexp; bf16 / fp16: ``log_softmax`` in half precision, so the
  result is rounded to bf16). Here the result is always float32 (float64 for float64
  logits) - what verl's GPU path returns - never rounded to half precision.
* :func:`entropy_from_logits`, :func:`entropy_from_logits_with_chunking` - verl's eager
  softmax formula (in the logits' dtype; the chunked variant upcasts to fp32 and returns
  the default dtype). Here: float32 (float64 for float64 logits; the chunked variant
  returns the default dtype, as verl's).
* :func:`linear_cross_entropy` - verl's fused Triton kernel (CUDA only) on
  ``hidden @ weight.T`` with ``weight`` of shape ``(V, H)``, optionally with the
  vocabulary sharded over a tensor-parallel group. Here: :func:`vapo_kernels.linear_logprobs`,
  which never materialises the logits either (``process_group=`` for the shards).

Deliberate differences of the log-prob functions:

* Half-precision logits give float32 log-probs / entropy (verl's CPU fallback and eager
  entropy round them to bf16; measured in ``tests/compat/test_logprobs_peers.py``).
* ``logprobs_from_logits(..., inplace_backward=True)`` writes the gradient into the logits
  buffer (like flash-attn) only when the logits are a non-leaf tensor; for a leaf tensor
  (the caller owns it) the gradient goes to a new buffer. If another autograd node saved
  the same logits and its backward runs after this one (e.g. an entropy computed on them
  before the log-probs), backward raises autograd's in-place error instead of feeding
  that node the overwritten buffer (flash-attn writes through a Triton kernel, which the
  version counter does not see). verl's engines already pass ``inplace_backward=False``
  whenever they also compute the entropy.
* A label of ``-100`` gives log-prob 0 and a zero gradient (flash-attn's ``ignore_index``);
  verl's fallback raises on it, verl's fused linear kernel leaves it undefined. Under
  :func:`linear_cross_entropy` such a row also gets entropy 0. Other out-of-range labels
  raise ``ValueError``.
* ``linear_cross_entropy`` runs on any device and hidden size (verl: CUDA, H % 128 == 0),
  accepts an ``int`` temperature and uneven vocabulary shards (verl: equal ones). With a
  ``dist_process_group``, each rank's ``dL/dhidden`` is ``1 / group size`` of the full
  gradient where verl's is the rank's own shard's part: both sum to the full gradient
  over the group, which is what Megatron's reduce-scatter in front of the head takes.

**PPO losses** (``verl.trainer.ppo.core_algos``): :func:`compute_policy_loss_vanilla`
(and the deprecated :func:`compute_policy_loss`), :func:`agg_loss`,
:func:`compute_value_loss`, :func:`kl_penalty`. The losses are one pass each of the fused
token-loss op (:func:`vapo_kernels.policy_loss`, :func:`vapo_kernels.value_loss`,
:func:`vapo_kernels.agg_loss`), which writes the gradients during the forward pass;
metrics come from the same pass. Same signatures, return types, metric keys and
numerics (fp32 <= 1e-6, tested in ``tests/compat/test_loss_peers.py``); the formulas are
in each function's docstring. Differences, all outside verl's well-defined inputs:

* No valid token at all (an all-masked micro-batch, or a zero global count): the loss is
  0 with a zero gradient; verl's token-mean and seq-mean modes divide 0 by 0 (NaN loss,
  NaN gradients). Metrics are 0 in both.
* The op selects valid tokens instead of multiplying by the mask: NaN / inf in a masked
  slot of any input never reaches the loss, the metrics or a gradient. verl's
  ``masked_sum`` also selects, so its token-mean / token-sum losses stay finite, but its
  seq-mean modes multiply by the mask (NaN loss), and NaN advantages or value inputs in
  a masked slot make that slot's gradient NaN (``0 * NaN`` in backward). A NaN in a
  *valid* slot raises ``ValueError`` while input validation is on (verl returns NaN).
* A fractional float mask raises ``ValueError`` (verl weights tokens by it).
* float64 with a float64 mask, ``seq-mean-token-mean``: verl divides each sequence's sum
  by ``n_s + 1e-8`` in float64 (a relative 1e-8 / n_s), here by ``n_s``. With bool / int
  / float32 masks - verl's workers pass bool - the 1e-8 vanishes in float32 and the two
  agree. The metrics reproduce verl's ``+ 1e-8`` in every case.
* Half-precision inputs: the loss is accumulated and returned in float32 (verl: half
  precision arithmetic, half result); the metrics likewise.
* No gradient flows to ``advantages``, ``old_log_prob``, the old ``values``, ``returns``
  or ``rollout_is_weights`` (data in verl's trainers), and the deprecated
  ``compute_policy_loss``'s ``ppo_kl`` is detached (verl's keeps a graph).
* ``dp_size``, ``batch_num_tokens`` and ``global_batch_size`` may be tensors; a tensor
  count is read once on the host (a device sync).

**patch()** swaps all of the above into verl (see :func:`patch`).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..ops.gae import gae, masked_whiten
from .. import _ragged, linear_logprobs, token_logprobs
from .. import agg_loss as _agg_loss
from .. import kl_penalty as _kl_penalty
from .. import policy_loss, value_loss
from .._loss_layout import KL_CODES as KL_KINDS
from ..ops.loss_spec import kl_codes
from . import (
    _at_most_one, _check_binary_mask, _entropy, _peer_dtype, _peer_names, _scalar, _Swap,
    get_backend,
)

__all__ = [
    "agg_loss",
    "compute_gae_advantage_return",
    "compute_policy_loss",
    "compute_policy_loss_vanilla",
    "compute_value_loss",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "is_patched",
    "kl_penalty",
    "linear_cross_entropy",
    "logprobs_from_logits",
    "patch",
    "unpatch",
]


# Our functions under verl's argument names: their errors name what the user passed.
_gae = _peer_names(gae, rewards="token_level_rewards", mask="response_mask")
_masked_whiten = _peer_names(masked_whiten, mask="response_mask")
_token_logprobs = _peer_names(token_logprobs, targets="labels")
_linear_logprobs = _peer_names(
    linear_logprobs, targets="labels", process_group="dist_process_group"
)
_kl_penalty_named = _peer_names(
    _kl_penalty, logp="logprob", ref_logp="ref_logprob", kl_kind="kl_penalty"
)
_COUNTS = {  # agg_loss' arguments, which every loss takes
    "agg": "loss_agg_mode", "global_tokens": "batch_num_tokens",
    "global_seqs": "global_batch_size",
}
_agg_loss_named = _peer_names(_agg_loss, mask="loss_mask", **_COUNTS)
_value_loss = _peer_names(
    value_loss, values="vpreds", old_values="values", mask="response_mask",
    value_clip="cliprange_value", **_COUNTS,
)
_POLICY = {"logp": "log_prob", "old_logp": "old_log_prob", "mask": "response_mask", **_COUNTS}
_policy_loss_vanilla = _peer_names(  # the clip ranges come from the config
    policy_loss, is_weights="rollout_is_weights", **_POLICY,
    clip_low="config.clip_ratio_low (or config.clip_ratio)",
    clip_high="config.clip_ratio_high (or config.clip_ratio)", dual_clip="config.clip_ratio_c",
)
_policy_loss_deprecated = _peer_names(
    policy_loss, **_POLICY, clip_low="cliprange_low (or cliprange)",
    clip_high="cliprange_high (or cliprange)", dual_clip="clip_ratio_c",
)


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
        adv, returns = _gae(
            token_level_rewards,
            values,
            response_mask,
            gamma=_scalar("gamma", gamma),
            lam=_lam_arg(lam, token_level_rewards.shape[0]),
            mask_mode="skip",
            backend=backend,
        )
        adv = _masked_whiten(adv, response_mask, unbiased=True, eps=1e-8, backend=backend)
        dtype = _peer_dtype(token_level_rewards, values, response_mask)
        return adv.to(dtype), returns.to(dtype)


# --------------------------------------------------------------------------------------
# Log-probs and entropy (verl.utils.torch_functional)


def logprobs_from_logits(logits: Tensor, labels: Tensor, inplace_backward: bool = True) -> Tensor:
    r"""verl's per-token log-probabilities: ``logits`` (..., V), ``labels`` (...) -> (...).

    ::

        logp = z[label] - logsumexp(z)          d logp / dz = onehot(label) - softmax(z)

    float32 (float64 for float64 logits) whatever the logits' dtype. With
    ``inplace_backward`` the gradient overwrites the logits buffer when the logits are a
    non-leaf tensor (see the module docstring); labels of -100 give 0.
    """
    inplace = (bool(inplace_backward) and logits.requires_grad
               and not _ragged.is_callers_leaf(logits))
    return _token_logprobs(logits, labels, inplace_backward=inplace, backend=get_backend())


def entropy_from_logits(logits: Tensor) -> Tensor:
    r"""verl's entropy of each row: ``logits`` (..., V) -> (...).

    ::

        H = logsumexp(z) - sum_v softmax(z)_v * z_v     dH/dz = p * (E_p[z] - z)

    float32 (float64 for float64 logits); verl returns the logits' dtype.
    """
    return _entropy(logits)


def entropy_from_logits_with_chunking(logits: Tensor, chunk_size: int = 2048) -> Tensor:
    r"""verl's chunked entropy: ``logits`` (N, V) -> (N,) in the default dtype (float32).

    Same formula as :func:`entropy_from_logits`. ``chunk_size`` is accepted for
    compatibility and ignored: the op never holds more than a bounded block of rows in
    float32 anyway.
    """
    return _entropy(logits).to(torch.get_default_dtype())


# --------------------------------------------------------------------------------------
# linear_cross_entropy: log-probs and entropy straight from the last hidden states


class _PartialHiddenGrad(torch.autograd.Function):
    """Identity forward; backward divides the gradient by the group size.

    :func:`vapo_kernels.linear_logprobs` hands every vocabulary-parallel rank the FULL
    ``dL/dhidden`` (it all-reduces the per-shard parts). verl's kernel hands each rank
    only its own shard's part ``dz_r @ W_r`` and leaves the sum to Megatron, whose
    ``gather_from_sequence_parallel_region`` in front of the head reduce-scatters the
    gradient in backward. Dividing the full gradient by the group size W keeps that
    contract: the ranks' gradients still sum to the full one (exactly, for W a power of
    two), so the reduce-scatter yields what it yields with verl's kernel, instead of W
    times it.
    """

    @staticmethod
    def forward(ctx, x, world):
        ctx.world = world
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.world, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group=None,
) -> tuple[Tensor, Tensor]:
    r"""verl's fused head: ``(logprobs, entropy)`` of ``z = hidden @ weight.T``.

    ``hidden`` (..., H), ``weight`` (V, H) (verl's layout: the ``lm_head`` weight),
    ``labels`` with ``hidden.shape[:-1]`` elements. Per token, with s = z / temperature::

        logp = s[label] - logsumexp(s)
        H    = logsumexp(s) - sum_v softmax(s)_v * s_v
        dL/dhidden = dL/dz @ W,   dL/dW = dL/dz^T @ hidden,
        dL/dz = (g_logp * (onehot - p) + g_H * p * (E_p[s] - s)) / temperature

    Returns float32 tensors of shape ``(N,)``, N = number of tokens (flattened, as
    verl); with ``reduction="sum"`` / ``"mean"`` the log-probs are summed / averaged
    into a scalar (the entropy stays per token). Gradients come back in the inputs'
    dtypes (hidden and weight of different dtypes are first cast to the wider one).

    Computed by :func:`vapo_kernels.linear_logprobs`: the logits are never materialised
    (tiles of them are computed in fp32 and reduced on the fly, and recomputed in
    backward).

    ``dist_process_group``: a vocabulary-parallel head, as verl's Megatron path passes it
    (the tensor-parallel group): every rank passes the same hidden and labels (GLOBAL
    vocabulary ids) and its own contiguous shard of weight rows, shards in group-rank
    order; every rank gets the full logprobs / entropy and the gradient of its own
    shard of weight. ``dL/dhidden`` follows verl's kernel: the ranks' gradients SUM to
    the full one (Megatron's reduce-scatter in front of the head adds them up); here
    each rank holds ``1 / group size`` of the full gradient, not its shard's part. (The
    op all-reduces ``dL/dhidden`` across the group in backward - N x H values - which
    verl's kernel leaves to that reduce-scatter.)

    Raises ``ValueError`` for a reduction other than none / sum / mean.
    """
    if not isinstance(reduction, str) or reduction.lower() not in ("none", "sum", "mean"):
        raise ValueError(f"Invalid reduction: {reduction!r}; expected 'none', 'sum' or 'mean'")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"weight must be (V, H) with H = hidden.shape[-1]; got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    hidden_rows = hidden.reshape(-1, hidden.shape[-1])
    if labels.numel() != hidden_rows.shape[0]:
        raise ValueError(
            f"labels has {labels.numel()} elements but hidden has {hidden_rows.shape[0]} tokens"
        )
    if hidden_rows.dtype != weight.dtype:  # the op takes one dtype; the wider one loses nothing
        dtype = torch.promote_types(hidden_rows.dtype, weight.dtype)
        hidden_rows, weight = hidden_rows.to(dtype), weight.to(dtype)
    if dist_process_group is not None:
        import torch.distributed as dist

        world = dist.get_world_size(dist_process_group)
        if world > 1:
            hidden_rows = _PartialHiddenGrad.apply(hidden_rows, world)
    logp, entropy = _linear_logprobs(
        hidden_rows, weight, labels.reshape(-1), temperature=temperature, return_entropy=True,
        process_group=dist_process_group, backend=get_backend(),
    )
    logp, entropy = logp.float(), entropy.float()
    if reduction.lower() == "sum":
        logp = logp.sum()
    elif reduction.lower() == "mean":
        logp = logp.mean()
    return logp, entropy


# --------------------------------------------------------------------------------------
# PPO losses (verl.trainer.ppo.core_algos)


def _as_rows(t: Tensor | None) -> Tensor | None:
    """verl sums over the last dim per sequence and treats the rest as the batch."""
    if t is None or t.dim() == 2 or t.dim() == 0:
        return t
    return t.reshape(-1, t.shape[-1])


def _agg_kwargs(
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
) -> dict:
    """verl's ``agg_loss`` arguments as the fused op's keywords, with verl's checks."""
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None and dp_size > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        counts = {"global_tokens": batch_num_tokens}
    elif loss_agg_mode == "token-sum":
        counts = {}
    elif loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        if global_batch_size is None and dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        counts = {"global_seqs": global_batch_size}
        if loss_agg_mode == "seq-mean-token-sum-norm":
            counts["loss_scale_factor"] = loss_scale_factor
    else:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    return {"agg": loss_agg_mode, "dp_size": dp_size, "backend": get_backend(), **counts}


def _in_peer_dtype(loss: Tensor, *tensors: Tensor | None) -> Tensor:
    """The op's result (fp32, fp64 for fp64 inputs) in the dtype verl's arithmetic on
    ``tensors`` ends in, but never below float32."""
    dtype = torch.promote_types(loss.dtype, _peer_dtype(*tensors))
    return loss if loss.dtype == dtype else loss.to(dtype)


def _verl_masked_mean(
    mean: Tensor, tokens: Tensor, mask: Tensor, value_dtype: torch.dtype
) -> Tensor:
    """``verl_F.masked_mean(x, mask) = sum(x on mask) / (mask.sum() + 1e-8)`` from the op's
    ``sum / max(n, 1)``. The 1e-8 is added in the mask's dtype (the default dtype for a
    bool mask): it vanishes in float32 for n >= 1 and is reproduced in float64."""
    denom = mask.dtype if mask.is_floating_point() else torch.get_default_dtype()
    if denom == torch.float64:
        n = tokens.double()
        mean = mean.double() * (n / (n + 1e-8))
    return mean.to(torch.promote_types(value_dtype, denom))


def _policy(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c,
            loss_agg_mode, rollout_is_weights, global_batch_info, named_policy_loss):
    """verl's vanilla PPO policy loss: (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower).

    ``named_policy_loss``: :func:`vapo_kernels.policy_loss` under the caller's names.
    """
    assert clip_ratio_c > 1.0, (
        "The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0,"
        + f" but get the value: {clip_ratio_c}."
    )
    _check_binary_mask("response_mask", response_mask)
    kwargs = _agg_kwargs(loss_agg_mode, **global_batch_info)
    loss, m = named_policy_loss(
        _as_rows(log_prob), _as_rows(old_log_prob), _as_rows(advantages), _as_rows(response_mask),
        clip_low=_at_most_one(clip_low), clip_high=clip_high, dual_clip=clip_ratio_c,
        ratio_log_clamp=20.0, is_weights=_as_rows(rollout_is_weights), **kwargs,
    )
    loss = _in_peer_dtype(
        loss, log_prob, old_log_prob, advantages, response_mask, rollout_is_weights
    )
    tokens = m["tokens"]
    kl_dtype = _peer_dtype(log_prob, old_log_prob)
    return (
        loss,
        _verl_masked_mean(m["clipfrac"], tokens, response_mask, torch.float32),
        _verl_masked_mean(m["approx_kl"], tokens, response_mask, kl_dtype),
        _verl_masked_mean(m["dual_clipfrac"], tokens, response_mask, torch.float32),
    )


def compute_policy_loss_vanilla(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    r"""verl's PPO policy loss (the ``"vanilla"`` policy-loss mode): ``(pg_loss, metrics)``.

    Per token, with eps_low / eps_high = ``config.clip_ratio_low`` / ``clip_ratio_high``
    (each defaulting to ``config.clip_ratio``) and c = ``config.clip_ratio_c`` (3.0)::

        ratio = exp(clamp(log_prob - old_log_prob, -20, 20))
        L1    = max(-A ratio, -A clamp(ratio, 1 - eps_low, 1 + eps_high))
        L     = min(L1, -A c) if A < 0 else L1          (dual clip, always on in verl)
        L    *= rollout_is_weights                      (if given)
        pg_loss = agg_loss(L, response_mask, loss_agg_mode, **config.global_batch_info)

    ``metrics``: Python floats ``"actor/pg_clipfrac"`` (fraction of valid tokens where
    the clipped term won), ``"actor/ppo_kl"`` (mean of ``-clamp(log ratio)``) and
    ``"actor/pg_clipfrac_lower"`` (fraction where the dual clip bound won), each a
    ``masked_mean`` as verl computes it. One pass of :func:`vapo_kernels.policy_loss`;
    differences from verl in the module docstring.
    """
    assert config is not None
    clip_ratio = config.clip_ratio
    clip_low = config.clip_ratio_low if config.clip_ratio_low is not None else clip_ratio
    clip_high = config.clip_ratio_high if config.clip_ratio_high is not None else clip_ratio
    clip_ratio_c = config.get("clip_ratio_c", 3.0)
    loss, clipfrac, ppo_kl, clipfrac_lower = _policy(
        old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c,
        loss_agg_mode, rollout_is_weights, config.global_batch_info, _policy_loss_vanilla,
    )
    metrics = {
        "actor/pg_clipfrac": clipfrac.item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/pg_clipfrac_lower": clipfrac_lower.item(),
    }
    return loss, metrics


def compute_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    cliprange: float | None = None,
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""verl's deprecated policy loss: ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``.

    :func:`compute_policy_loss_vanilla` with the clip ranges as arguments
    (``cliprange_low`` / ``cliprange_high`` default to ``cliprange``), local aggregation
    only, and the metrics as 0-d tensors (detached; verl's ``ppo_kl`` keeps a graph).
    Warns ``FutureWarning`` as verl does.
    """
    warnings.warn(
        "Warning: Function 'verl.trainer.ppo.core_algos.compute_policy_loss' is deprecated. "
        "Please use 'verl.trainer.ppo.core_algos.compute_policy_loss_vanilla' instead.",
        category=FutureWarning,
        stacklevel=2,
    )
    clip_low = cliprange if cliprange_low is None else cliprange_low
    clip_high = cliprange if cliprange_high is None else cliprange_high
    return _policy(
        old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c,
        loss_agg_mode, None, {}, _policy_loss_deprecated,
    )


def agg_loss(
    loss_mat: Tensor,
    loss_mask: Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: int | Tensor | None = None,
    global_batch_size: int | Tensor | None = None,
    loss_scale_factor: int | None = None,
) -> Tensor:
    r"""verl's aggregation of a per-token loss ``(bs, T)`` into a scalar.

    With n_s the valid tokens of sequence s, N = sum n_s (or ``batch_num_tokens``), S =
    the sequences with n_s > 0 (or ``global_batch_size``) and dp = ``dp_size``::

        token-mean               dp / N        * sum_s sum_t l_st
        token-sum                dp            * sum_s sum_t l_st
        seq-mean-token-sum       dp / S        * sum_s sum_t l_st
        seq-mean-token-sum-norm  dp / (S F)    * sum_s sum_t l_st     F = loss_scale_factor or T
        seq-mean-token-mean      dp / S        * sum_s (sum_t l_st) / n_s

    Differentiable in ``loss_mat``. ``dp_size > 1`` needs the global count of its mode,
    as in verl. One pass of :func:`vapo_kernels.agg_loss`.
    """
    _check_binary_mask("loss_mask", loss_mask)
    kwargs = _agg_kwargs(
        loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
    )
    loss, _ = _agg_loss_named(_as_rows(loss_mat), _as_rows(loss_mask), **kwargs)
    return _in_peer_dtype(loss, loss_mat, loss_mask)


def compute_value_loss(
    vpreds: Tensor,
    returns: Tensor,
    values: Tensor,
    response_mask: Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens: int | Tensor | None = None,
    global_batch_size: int | Tensor | None = None,
    loss_scale_factor: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""verl's clipped value loss: ``(vf_loss, vf_clipfrac)`` (note the argument order:
    predictions, returns, then the old values).

    ::

        v_clip   = max(min(vpreds, values + eps), values - eps)        eps = cliprange_value
        vf_loss  = 0.5 agg_loss(max((vpreds - R)^2, (v_clip - R)^2), response_mask, ...)
        vf_clipfrac = masked_mean((v_clip - R)^2 > (vpreds - R)^2)     a 0-d tensor

    One pass of :func:`vapo_kernels.value_loss` (``value_clip_form="verl"``). ``cliprange_value``
    None (verl: an error) means no clipping.
    """
    _check_binary_mask("response_mask", response_mask)
    kwargs = _agg_kwargs(
        loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
    )
    clip = None if cliprange_value is None else _scalar("cliprange_value", cliprange_value)
    loss, m = _value_loss(
        _as_rows(vpreds), _as_rows(values), _as_rows(returns), _as_rows(response_mask),
        value_clip=clip, value_clip_form="verl", **kwargs,
    )
    loss = _in_peer_dtype(loss, vpreds, returns, values, response_mask)
    return loss, _verl_masked_mean(m["vf_clipfrac"], m["tokens"], response_mask, torch.float32)


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kl_penalty: str) -> Tensor:
    r"""verl's per-token KL estimator (elementwise, in the inputs' dtype).

    ``kl`` / ``k1``: logp - ref; ``abs``; ``mse`` / ``k2``: 0.5 (logp - ref)^2;
    ``low_var_kl`` / ``k3``: exp(ref - logp) - (ref - logp) - 1, log-ratio clamped to
    [-20, 20] and result to [-10, 10]. A trailing ``+`` keeps the value and takes the
    gradient of k2 (straight-through). Raises ``NotImplementedError`` for ``full`` and
    unknown names, as verl. Computed by :func:`vapo_kernels.kl_penalty`, except
    k3, which keeps verl's rounding here (elementwise drop-in); the loss op computes it
    as expm1(x) - x, exact to float32 rounding where exp(x) - 1 - x cancels.
    """
    try:
        code, straight = kl_codes(kl_penalty)
    except ValueError:  # verl's exception for a name it does not know
        raise NotImplementedError(f"kl_penalty {kl_penalty!r} is not implemented") from None
    if code != KL_KINDS["k3"]:
        return _kl_penalty_named(logprob, ref_logprob, kl_penalty)
    log_ratio = torch.clamp(ref_logprob - logprob, min=-20.0, max=20.0)
    value = torch.clamp(torch.exp(log_ratio) - log_ratio - 1, min=-10.0, max=10.0)
    if not straight:
        return value
    surrogate = 0.5 * (logprob - ref_logprob).square()
    return surrogate - surrogate.detach() + value.detach()


# --------------------------------------------------------------------------------------
# Swapping verl's functions in place.

_TF = "verl.utils.torch_functional"
_CORE = "verl.trainer.ppo.core_algos"

# Registries: verl's trainer looks GAE up as a module attribute at call time
# (``core_algos.compute_gae_advantage_return(...)`` in ``ray_trainer.compute_advantage``)
# and other code through the estimator registry (``get_adv_estimator_fn("gae")``); the
# policy loss is found through ``get_policy_loss_fn("vanilla")`` (the workers' ppo_loss).
# Module attributes are swapped by _Swap, registry entries here.

_MISSING = object()


class _RegistrySwap:
    """One entry of a registry dict of ``core_algos`` replaced (and put back)."""

    def __init__(self, registry: str, key: str, replacement) -> None:
        self.registry, self.key, self.replacement = registry, key, replacement
        self.original = _MISSING

    def _dict(self) -> dict | None:
        return getattr(_core_algos(), self.registry, None)

    def apply(self) -> None:
        registry = self._dict()
        if registry is None or self.key not in registry:
            return
        if self.original is _MISSING:
            if registry[self.key] is self.replacement:
                raise RuntimeError(f"{self.registry}[{self.key!r}] is already replaced")
            self.original = registry[self.key]
        registry[self.key] = self.replacement

    def undo(self) -> None:
        if self.original is _MISSING:
            return
        registry = self._dict()
        if registry is not None and registry.get(self.key) is self.replacement:
            registry[self.key] = self.original
        self.original = _MISSING

    @property
    def active(self) -> bool:
        return self.original is not _MISSING


# Each group of patch(): module attributes (_Swap) and registry entries (_RegistrySwap).
_SWAPS: dict[str, list[_Swap | _RegistrySwap]] = {
    "gae": [
        _Swap("verl", _CORE, "compute_gae_advantage_return", compute_gae_advantage_return),
        _RegistrySwap("ADV_ESTIMATOR_REGISTRY", "gae", compute_gae_advantage_return),
    ],
    "logprobs": [
        _Swap("verl", _TF, "logprobs_from_logits", logprobs_from_logits),
        _Swap("verl", _TF, "entropy_from_logits", entropy_from_logits),
        _Swap("verl", _TF, "entropy_from_logits_with_chunking", entropy_from_logits_with_chunking),
    ],
    "linear_ce": [
        _Swap(
            "verl", "verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy",
            linear_cross_entropy,
        )
    ],
    "loss": [
        _Swap("verl", _CORE, "compute_policy_loss_vanilla", compute_policy_loss_vanilla),
        _Swap("verl", _CORE, "compute_policy_loss", compute_policy_loss),
        _Swap("verl", _CORE, "agg_loss", agg_loss),
        _Swap("verl", _CORE, "compute_value_loss", compute_value_loss),
        _Swap("verl", _CORE, "kl_penalty", kl_penalty),
        _RegistrySwap("POLICY_LOSS_REGISTRY", "vanilla", compute_policy_loss_vanilla),
    ],
}


def _core_algos():
    from verl.trainer.ppo import core_algos  # imported here only: verl is optional

    return core_algos


def patch(
    *, gae: bool = True, logprobs: bool = True, linear_ce: bool = True, loss: bool = True
) -> None:
    """Make verl use the functions of this module. Idempotent; call again after importing
    more of verl to reach its new import sites.

    * ``gae``: ``core_algos.compute_gae_advantage_return`` and the ``"gae"`` entry of
      verl's advantage-estimator registry;
    * ``logprobs``: ``logprobs_from_logits``, ``entropy_from_logits`` and
      ``entropy_from_logits_with_chunking`` of ``verl.utils.torch_functional``, and every
      loaded ``verl.*`` module that imported them by name (the FSDP / torchtitan /
      automodel engines, the naive rollout, the prefix grouper);
    * ``linear_ce``: ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` and
      its importers (the transformers model forwards import it at call time; the Megatron
      forwards, which pass the tensor-parallel group, at import time);
    * ``loss``: ``compute_policy_loss_vanilla`` (also the ``"vanilla"`` entry of verl's
      policy-loss registry, which the workers' ``ppo_loss`` reads), the deprecated
      ``compute_policy_loss``, ``agg_loss``, ``compute_value_loss`` and ``kl_penalty`` of
      ``core_algos`` and their importers (``verl.workers.utils.losses``, the trainers).
      verl's other policy losses (gspo, clip_cov, ...) stay verl's, but they call
      ``agg_loss`` through ``core_algos``' globals, so they aggregate with the fused op.

    Patch before verl builds its workers' engines (they keep the entropy function they
    find at construction) and in every process that runs them (each Ray worker).
    """
    for group, wanted in (("gae", gae), ("logprobs", logprobs), ("linear_ce", linear_ce),
                          ("loss", loss)):
        if not wanted:
            continue
        for swap in _SWAPS[group]:
            swap.apply()


def _all_swaps():
    return [s for swaps in _SWAPS.values() for s in swaps]


def unpatch() -> None:
    """Put every verl function that :func:`patch` replaced back. Idempotent."""
    for swap in _all_swaps():
        swap.undo()


def is_patched() -> bool:
    """Whether any part of :func:`patch` is in effect."""
    return any(s.active for s in _all_swaps())
