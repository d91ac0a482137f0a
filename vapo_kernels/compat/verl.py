r"""verl 0.9.1 drop-ins: GAE, token log-probs / entropy, and an in-place :func:`patch`.

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
  ``hidden @ weight.T`` with ``weight`` of shape ``(V, H)``. Until the fused op of this
  package exists, it is computed here in row chunks (see its docstring for the memory
  bound); it will switch to the fused op without changing its interface.

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
  accepts an ``int`` temperature, and refuses ``dist_process_group`` (tensor-parallel
  vocabulary shards) with ``ValueError``; under :func:`patch` such calls go to verl's
  own kernel.

**patch()** swaps all of the above into verl (see :func:`patch`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.gae import gae, masked_whiten
from ..ops.logprobs import token_logprobs
from . import _check_binary_mask, _entropy, _peer_dtype, _scalar, _Swap, get_backend

__all__ = [
    "compute_gae_advantage_return",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "is_patched",
    "linear_cross_entropy",
    "logprobs_from_logits",
    "patch",
    "unpatch",
]


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
# Log-probs and entropy (verl.utils.torch_functional)


def logprobs_from_logits(logits: Tensor, labels: Tensor, inplace_backward: bool = True) -> Tensor:
    r"""verl's per-token log-probabilities: ``logits`` (..., V), ``labels`` (...) -> (...).

    ::

        logp = z[label] - logsumexp(z)          d logp / dz = onehot(label) - softmax(z)

    float32 (float64 for float64 logits) whatever the logits' dtype. With
    ``inplace_backward`` the gradient overwrites the logits buffer when the logits are a
    non-leaf tensor (see the module docstring); labels of -100 give 0.
    """
    inplace = bool(inplace_backward) and logits.requires_grad and not logits.is_leaf
    return token_logprobs(logits, labels, inplace_backward=inplace, backend=get_backend())


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

#: Bytes of float32 logits one chunk of :func:`linear_cross_entropy` may hold; a chunk
#: has ``max(1, LINEAR_CE_CHUNK_BYTES // (4 * V))`` rows.
LINEAR_CE_CHUNK_BYTES = 256 * 2**20

_HALF = (torch.float16, torch.bfloat16)


class _Gemm:
    """Products with the ``(V, H)`` weight, accumulated and returned in float32 (float64
    if either input is float64), so logits are never rounded to half precision.

    On CUDA, half inputs go through ``torch.mm(..., out_dtype=float32)``; elsewhere (or if
    that is unsupported) the weight is upcast once per call - an extra ``V x H`` buffer.
    """

    def __init__(self, hidden: Tensor, weight: Tensor) -> None:
        self.acc = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
        self.native = hidden.is_cuda and hidden.dtype == weight.dtype and hidden.dtype in _HALF
        self.weight = weight if self.native or weight.dtype == self.acc else weight.to(self.acc)

    def mm(self, a: Tensor, b: Tensor) -> Tensor:
        """``a @ b`` in the accumulation dtype."""
        if self.native:
            half = self.weight.dtype
            try:
                return torch.mm(a.to(half), b.to(half), out_dtype=self.acc)
            except (RuntimeError, NotImplementedError, TypeError):
                self.native = False
                self.weight = self.weight.to(self.acc)
                b = b.to(self.acc)
        return torch.mm(a.to(self.acc), b.to(self.acc))

    def logits(self, hidden_rows: Tensor) -> Tensor:
        return self.mm(hidden_rows, self.weight.t())


class _LinearTokenLogprobs(torch.autograd.Function):
    """(logp, entropy) of ``hidden @ weight.T`` computed chunk by chunk of rows.

    Forward keeps one chunk of logits alive at a time and saves only the inputs.
    Backward recomputes each chunk's logits, gets ``dL/dz`` from the token log-prob op,
    and folds it into ``dL/dhidden = dz @ W`` and ``dL/dW += dz^T @ hidden``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, backend, rows):
        gemm = _Gemm(hidden, weight)
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=gemm.acc, device=hidden.device)
        entropy = torch.empty_like(logp)
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            logits = gemm.logits(hidden[lo:hi])
            logp[lo:hi], entropy[lo:hi] = token_logprobs(
                logits, labels[lo:hi], temperature=temperature, return_entropy=True,
                backend=backend,
            )
            del logits
        ctx.save_for_backward(hidden, weight, labels)
        ctx.temperature, ctx.backend, ctx.rows = temperature, backend, rows
        return logp.float(), entropy.float()

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, labels = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        gemm = _Gemm(hidden, weight)
        n, rows = hidden.shape[0], ctx.rows
        d_hidden = torch.empty_like(hidden) if need_hidden else None
        d_weight = (
            torch.zeros(weight.shape, dtype=gemm.acc, device=weight.device) if need_weight else None
        )
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            logits = gemm.logits(hidden[lo:hi]).requires_grad_()
            with torch.enable_grad():
                logp, entropy = token_logprobs(
                    logits, labels[lo:hi], temperature=ctx.temperature, return_entropy=True,
                    backend=ctx.backend,
                )
                (d_logits,) = torch.autograd.grad(
                    (logp, entropy),
                    (logits,),
                    (grad_logp[lo:hi].to(logp.dtype), grad_entropy[lo:hi].to(entropy.dtype)),
                )
            del logits, logp, entropy
            if need_hidden:
                d_hidden[lo:hi] = gemm.mm(d_logits, gemm.weight).to(hidden.dtype)
            if need_weight:
                d_weight += gemm.mm(d_logits.t(), hidden[lo:hi])
            del d_logits
        if d_weight is not None:
            d_weight = d_weight.to(weight.dtype)
        return d_hidden, d_weight, None, None, None, None


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
    dtypes.

    Memory: the logits exist one chunk of ``max(1, LINEAR_CE_CHUNK_BYTES // (4 V))`` rows
    at a time, in float32 - peak ``chunk x V`` floats in forward, ``2 x chunk x V`` in
    backward (logits recomputed, plus their gradient) - plus, on CPU with half inputs, a
    float32 copy of the weight, and a float32 ``V x H`` gradient accumulator for the
    weight. Logits are recomputed in backward (one extra GEMM per chunk). This is the
    interim implementation on top of :func:`vapo_kernels.token_logprobs`; it will switch
    to the package's fused linear op with the same interface.

    Raises ``ValueError`` for ``dist_process_group`` (vocabulary-parallel shards are not
    supported) and for a reduction other than none / sum / mean.
    """
    if dist_process_group is not None:
        raise ValueError(
            "linear_cross_entropy: dist_process_group (tensor-parallel vocabulary shards) is "
            "not supported; pass None, or leave such calls to verl (patch() does)"
        )
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
    acc = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    itemsize = torch.empty((), dtype=acc).element_size()
    rows = max(1, LINEAR_CE_CHUNK_BYTES // (itemsize * max(1, weight.shape[0])))
    temperature = float(temperature) if isinstance(temperature, int) else temperature
    logp, entropy = _LinearTokenLogprobs.apply(
        hidden_rows, weight, labels.reshape(-1), temperature, get_backend(), rows
    )
    if reduction.lower() == "sum":
        logp = logp.sum()
    elif reduction.lower() == "mean":
        logp = logp.mean()
    return logp, entropy


# --------------------------------------------------------------------------------------
# Swapping verl's functions in place.


def _linear_cross_entropy_patched(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group=None,
) -> tuple[Tensor, Tensor]:
    """What :func:`patch` installs: :func:`linear_cross_entropy`, except that calls with a
    tensor-parallel ``dist_process_group`` go to verl's own kernel."""
    if dist_process_group is not None:
        original = _SWAPS["linear_ce"][0].original
        if original is not None:
            return original(hidden, weight, labels, temperature, reduction, dist_process_group)
    return linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group)


_TF = "verl.utils.torch_functional"
_SWAPS: dict[str, list[_Swap]] = {
    "logprobs": [
        _Swap("verl", _TF, "logprobs_from_logits", logprobs_from_logits),
        _Swap("verl", _TF, "entropy_from_logits", entropy_from_logits),
        _Swap("verl", _TF, "entropy_from_logits_with_chunking", entropy_from_logits_with_chunking),
    ],
    "linear_ce": [
        _Swap(
            "verl", "verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy",
            _linear_cross_entropy_patched,
        )
    ],
}

# GAE: verl's trainer looks the function up as a module attribute at call time
# (``core_algos.compute_gae_advantage_return(...)`` in ``ray_trainer.compute_advantage``),
# and other code goes through the estimator registry (``get_adv_estimator_fn("gae")``),
# so both are replaced.

_MISSING = object()
_saved: dict | None = None  # verl's GAE originals while patched


def _core_algos():
    from verl.trainer.ppo import core_algos  # imported here only: verl is optional

    return core_algos


def _patch_gae() -> None:
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


def _unpatch_gae() -> None:
    global _saved
    if _saved is None:
        return
    core_algos = _core_algos()
    core_algos.compute_gae_advantage_return = _saved["attr"]
    registry = getattr(core_algos, "ADV_ESTIMATOR_REGISTRY", None)
    if registry is not None and _saved["registry"] is not _MISSING:
        registry["gae"] = _saved["registry"]
    _saved = None


def patch(*, gae: bool = True, logprobs: bool = True, linear_ce: bool = True) -> None:
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
      forwards at import time). Calls with a ``dist_process_group`` still run verl's
      kernel.

    Patch before verl builds its workers' engines (they keep the entropy function they
    find at construction) and in every process that runs them (each Ray worker).
    """
    if gae:
        _patch_gae()
    for group, wanted in (("logprobs", logprobs), ("linear_ce", linear_ce)):
        if wanted:
            for swap in _SWAPS[group]:
                swap.apply()


def unpatch() -> None:
    """Put every verl function that :func:`patch` replaced back. Idempotent."""
    _unpatch_gae()
    for swaps in _SWAPS.values():
        for swap in swaps:
            swap.undo()


def is_patched() -> bool:
    """Whether any part of :func:`patch` is in effect."""
    return _saved is not None or any(s.active for swaps in _SWAPS.values() for s in swaps)
