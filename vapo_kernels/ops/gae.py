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
``torch.ops.vapo.gae`` custom op -> the backend kernel chosen by ``_backends.select``.
Every backend implements the *kernel contract* of :func:`reference_kernel`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backends, _ragged

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

    rewards, values: (N,) contiguous, same float dtype. mask: (N,) bool or None (all
    valid). offsets: (S+1,) int64, 0 = offsets[0] <= ... <= offsets[S] = N.
    coef_policy, coef_critic: (S,) gamma*lambda per sequence, in the output dtype.
    Returns (advantages, returns), (N,), float32 (float64 for float64 inputs).
    """
    out_dtype = _out_dtype(rewards.dtype)
    r = rewards.to(out_dtype)
    v = values.to(out_dtype)
    m = torch.ones_like(r, dtype=torch.bool) if mask is None else mask
    padded = [_ragged.pack_to_padded(x, offsets, fill) for x, fill in ((r, 0), (v, 0), (m, False))]
    adv, ret = reference_padded(*padded, coef_policy, coef_critic, gamma, skip_masked)
    return _ragged.padded_to_pack(adv, offsets), _ragged.padded_to_pack(ret, offsets)


_backends.register("gae", "reference")(reference_kernel)


def reference_valid_counts(mask: Tensor, offsets: Tensor) -> Tensor:
    """Kernel contract: flat bool mask (N,), int64 offsets (S+1,) -> (S,) int64 counts."""
    prefix = torch.cat([mask.new_zeros(1, dtype=torch.int64), mask.cumsum(0, dtype=torch.int64)])
    return prefix[offsets[1:]] - prefix[offsets[:-1]]


_backends.register("valid_counts", "reference")(reference_valid_counts)


_backends.register("valid_counts", "cpp")(_backends.from_extension("valid_counts_cpu"))


_backends.register("gae", "cpp")(_backends.from_extension("gae_scan_cpu"))
_backends.register("gae", "cuda")(_backends.from_extension("gae_scan_cuda"))
_backends.register("gae", "triton")(_backends.from_module("vapo_kernels.triton.gae", "gae_scan"))


# --------------------------------------------------------------------------------------
# The torch op: one schema, a fake kernel, a body that validates and dispatches.


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_static(rewards, values, mask, cu_seqlens, lam_policy, lam_critic, gamma, alpha, mask_mode):
    layout = _ragged.check_layout({"rewards": rewards, "values": values}, mask, cu_seqlens)
    _ragged.check_unit_interval("gamma", gamma)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"alpha must be a positive float (0: off), got {alpha!r}")
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    for name, lam in (("lam_policy", lam_policy), ("lam_critic", lam_critic)):
        _ragged.check_float(name, lam)
        if lam.shape != (layout.num_seqs,):
            raise ValueError(
                f"{name} must have one entry per sequence, shape ({layout.num_seqs},), "
                f"got {tuple(lam.shape)}"
            )
        if lam.device != rewards.device:
            raise ValueError(f"{name} is on {lam.device} but rewards is on {rewards.device}")
    return layout


@torch.library.custom_op("vapo::gae", mutates_args=())
def gae_op(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor | None,
    cu_seqlens: Tensor | None,
    lam_policy: Tensor,
    lam_critic: Tensor,
    gamma: float,
    alpha: float,
    mask_mode: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Fused two-lambda GAE scan. ``lam_*`` are per-sequence tensors; ``backend=""`` is auto.

    ``alpha > 0`` replaces ``lam_policy`` by the length-adaptive lambda of each sequence's
    valid-token count (counted here, by the backend's counting kernel).
    """
    layout = _check_static(
        rewards, values, mask, cu_seqlens, lam_policy, lam_critic, gamma, alpha, mask_mode
    )
    mask = _ragged.as_bool_mask(mask)
    if layout.packed:
        _ragged.check_cu_seqlens_values(cu_seqlens, layout.num_tokens)
    if _ragged.validation_enabled():
        for name, lam in (("lam_policy", lam_policy), ("lam_critic", lam_critic)):
            if lam.numel() and not bool(((lam >= 0) & (lam <= 1)).all()):
                raise ValueError(f"{name} must lie in [0, 1] for every sequence")

    dtype = torch.promote_types(rewards.dtype, values.dtype)
    out_dtype = _out_dtype(dtype)
    flat = [x.reshape(-1).to(dtype).contiguous() for x in (rewards, values)]
    flat_mask = None if mask is None else mask.reshape(-1).contiguous()
    offs = _ragged.offsets(layout, rewards.shape, cu_seqlens, rewards.device)
    # gamma*lambda in float64 first, then rounded once: matches `gamma * lam * A` in peers.
    coef_p = (gamma * lam_policy.to(torch.float64)).to(out_dtype).contiguous()
    coef_c = (gamma * lam_critic.to(torch.float64)).to(out_dtype).contiguous()
    name, kernel = _backends.select("gae", rewards.device, backend or None)
    if alpha > 0:
        if flat_mask is None:
            counts = offs[1:] - offs[:-1]
        else:
            # Only the C++ backend has its own counting kernel; torch's is fine elsewhere.
            count_backend = "cpp" if name == "cpp" else "reference"
            _, count_kernel = _backends.select("valid_counts", rewards.device, count_backend)
            counts = count_kernel(flat_mask, offs)
        coef_p = (gamma * length_adaptive_lambda(counts, alpha)).to(out_dtype).contiguous()
    if layout.num_tokens == 0:
        empty = torch.empty(rewards.shape, dtype=out_dtype, device=rewards.device)
        return empty, empty.clone()
    adv, ret = kernel(*flat, flat_mask, offs, coef_p, coef_c, float(gamma), mask_mode == "skip")
    # A NaN in a valid reward or value always reaches that token's advantage, and masked
    # slots never produce one, so one reduction over the output screens both inputs; the
    # per-argument check (several passes) runs only when something is wrong.
    if _ragged.validation_enabled() and bool(torch.isnan(adv.sum())):
        _ragged.check_no_nan_where_valid("values", values, mask)
        _ragged.check_no_nan_where_valid("rewards", rewards, mask)
    return adv.view(rewards.shape), ret.view(rewards.shape)


@gae_op.register_fake
def _gae_fake(
    rewards, values, mask, cu_seqlens, lam_policy, lam_critic, gamma, alpha, mask_mode, backend
):
    _check_static(rewards, values, mask, cu_seqlens, lam_policy, lam_critic, gamma, alpha, mask_mode)
    dtype = _out_dtype(torch.promote_types(rewards.dtype, values.dtype))
    out = torch.empty(rewards.shape, dtype=dtype, device=rewards.device)
    return out, torch.empty_like(out)


def reference_whiten_kernel(
    x: Tensor, mask: Tensor | None, unbiased: bool, eps: float, shift_mean: bool
) -> tuple[Tensor, Tensor]:
    """Kernel contract of masked whitening: flat x, flat bool mask or None ->
    (out in the output dtype, number of valid tokens as a 0-d int64 tensor)."""
    out_dtype = _out_dtype(x.dtype)
    x = x.to(out_dtype)
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    count = mask.sum()
    n = count.to(out_dtype)
    zero = torch.zeros((), dtype=out_dtype, device=x.device)
    mean = torch.where(mask, x, zero).sum() / n  # where, not x*mask: NaN garbage stays out
    centered = x - mean
    var = torch.where(mask, centered * centered, zero).sum() / (n - 1 if unbiased else n)
    out = centered * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean), count


_backends.register("masked_whiten", "reference")(reference_whiten_kernel)


_backends.register("masked_whiten", "cpp")(_backends.from_extension("masked_whiten_cpu"))


def _constants_of_the_data(ctx, inputs, output):
    # Advantages, returns and whitened values are constants of the batch in every peer
    # (computed under no_grad): mark them so, rather than let autograd fail later.
    ctx.mark_non_differentiable(*(output if isinstance(output, tuple) else (output,)))


def _no_gradient(ctx, *grads):
    raise RuntimeError("vapo GAE and whitening outputs are not differentiable")


torch.library.register_autograd("vapo::gae", _no_gradient, setup_context=_constants_of_the_data)


@torch.library.custom_op("vapo::masked_whiten", mutates_args=())
def masked_whiten_op(
    x: Tensor, mask: Tensor | None, unbiased: bool, eps: float, shift_mean: bool, backend: str
) -> Tensor:
    """(x - mean) * rsqrt(var + eps) with mean/var over the valid tokens of the whole batch."""
    _ragged.check_float("x", x)
    _ragged.check_mask(mask, "x", x)
    mask = _ragged.as_bool_mask(mask)
    flat_mask = None if mask is None else mask.reshape(-1).contiguous()
    _, kernel = _backends.select("masked_whiten", x.device, backend or None)
    out, count = kernel(x.reshape(-1).contiguous(), flat_mask, unbiased, float(eps), shift_mean)
    if _ragged.validation_enabled():
        n = int(count)
        if n == 0:
            raise ValueError("masked_whiten: mask selects no element; nothing to whiten")
        if unbiased and n == 1:
            raise ValueError("masked_whiten: mask selects one element; unbiased variance is undefined")
    return out.view(x.shape)


@masked_whiten_op.register_fake
def _masked_whiten_fake(x, mask, unbiased, eps, shift_mean, backend):
    return torch.empty(x.shape, dtype=_out_dtype(x.dtype), device=x.device)


torch.library.register_autograd(
    "vapo::masked_whiten", _no_gradient, setup_context=_constants_of_the_data
)


# --------------------------------------------------------------------------------------
# Public API


def _per_sequence_lambda(name: str, lam, layout: _ragged.Layout, device) -> Tensor:
    if isinstance(lam, Tensor):
        _ragged.check_float(name, lam)
        if lam.dim() == 0:
            lam = lam.expand(layout.num_seqs)
        return lam
    _ragged.check_unit_interval(name, lam)
    return torch.full((layout.num_seqs,), float(lam), dtype=torch.float64, device=device)


def length_adaptive_lambda(valid_tokens: Tensor, alpha: float) -> Tensor:
    """VAPO's lambda_policy = 1 - 1/(alpha * l), clamped as NeMo-RL does.

    ``clamp(1 - 1 / clamp(alpha * l, min=1), 0, 1)``: sequences with alpha*l <= 1
    (including empty ones) get lambda = 0 instead of a negative or infinite value.
    """
    scaled = (alpha * valid_tokens.to(torch.float64)).clamp(min=1.0)
    return (1.0 - 1.0 / scaled).clamp(0.0, 1.0)


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
    layout = _ragged.check_layout({"rewards": rewards, "values": values}, mask, cu_seqlens)
    device = rewards.device
    mask = _ragged.as_bool_mask(mask)  # once here, not again in the op
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"alpha must be a positive float, got {alpha!r}")
        lam_policy = 0.0  # placeholder: the op derives lambda_policy from alpha
    lam_p = _per_sequence_lambda("lam_policy", lam_policy, layout, device)
    lam_c = _per_sequence_lambda("lam_critic", lam_critic, layout, device)
    adv, targets = torch.ops.vapo.gae(
        rewards, values, mask, cu_seqlens, lam_p, lam_c, gamma, float(alpha or 0.0),
        mask_mode, backend or "",
    )
    if whiten:
        adv = torch.ops.vapo.masked_whiten(adv, mask, True, 1e-8, True, backend or "")
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
    return decoupled_gae(
        rewards, values, mask, cu_seqlens, gamma=gamma, lam_critic=lam, lam_policy=lam,
        mask_mode=mask_mode, whiten=whiten, backend=backend,
    )


def masked_whiten(
    x: Tensor,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    unbiased: bool = True,
    eps: float = 1e-8,
    shift_mean: bool = True,
    backend: str | None = None,
) -> Tensor:
    """Whiten ``x`` with the mean and variance of its valid tokens (over the whole batch).

    ``unbiased`` picks the n-1 (verl) or n (OpenRLHF) variance; ``shift_mean=False`` adds
    the mean back. ``cu_seqlens`` is accepted so packed callers can pass the same
    arguments as to :func:`gae`; the statistics are batch-wide in both layouts, and any
    shape is accepted.
    """
    if cu_seqlens is not None:
        _ragged.check_layout({"x": x}, mask, cu_seqlens)
    return torch.ops.vapo.masked_whiten(
        x, mask, bool(unbiased), float(eps), bool(shift_mean), backend or ""
    )
