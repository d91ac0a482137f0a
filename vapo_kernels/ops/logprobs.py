r"""Token log-probs and entropy from logits, forward and backward, fp32 out.

Per row (token) with logits z (V entries), temperature tau, s = z / tau and target y::

    lse   = logsumexp(s)
    logp  = s_y - lse                                  (<= 0 always)
    H     = lse - sum_v p_v s_v,   p = softmax(s)      (in [0, log V])

Gradients, with upstream g_logp and g_H (E_s = sum_v p_v s_v = lse - H)::

    dz_v = ( g_logp * (onehot(y)_v - p_v)  +  g_H * p_v * (E_s - s_v) ) / tau

The entropy gradient is written in the ``p * (E_s - s)`` form: ``p * log p`` would give
``0 * (-inf) = NaN`` for a logit of -inf. Every backend accumulates in fp32 (fp64 for
fp64 logits) whatever the input dtype, reads the logits once per pass, and never makes
an fp32 copy of them.

Everything is measured from the row max ``m = max_v z_v`` of the RAW logits: with
``t = (z - m) / tau`` and ``log_norm = log sum_v exp(t_v)`` (so ``lse = m / tau +
log_norm``),

    logp = t_y - log_norm,    H = log_norm - sum_v p_v t_v,    u = t - log_norm = log p,
    dz_v = ( g_logp * (onehot(y)_v - p_v)  -  g_H * p_v * (H + u_v) ) / tau

(``E_s - s = E_t - t = -(H + u)``). ``z - m`` is exact for the logits near the max, the
ones that carry the probability, so a dominant logit gets ``u = 0`` and ``p = 1``
exactly, and a row of logits ~1e4 keeps every digit of its differences. Forming
``z / tau - lse`` instead subtracts two numbers ~1e4 that each carry ~ulp(1e4) ~ 1e-3 of
rounding in fp32: the gradient came out 1e-4 (tau = 1.3) to 1e-3 (tau = 0.7) off there.
So the forward hands the backward the pair ``stats = (m, log_norm)`` per row, not lse.

Ignored rows - target ``-100`` or ``mask`` 0 - get logp = H = 0 and a zero gradient,
and kernels skip their logits entirely.

With ``inplace_backward=True`` the gradient is written into the logits buffer (what
verl does through flash-attn's cross-entropy) to save an N x V allocation. That is only
safe when nothing reads the logits afterwards: the backward refuses logits that are a
leaf tensor (the caller owns them), and since the write bumps the version counter,
autograd raises if another node saved the same logits for its own backward.

Data-flow: :func:`token_logprobs` -> ``torch.ops.vapo.token_logprobs`` (autograd
registered) -> a backend kernel chosen by ``_backends.select``. The kernel contract is
the docstring of :func:`reference_forward` and :func:`reference_backward`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _backends, _ragged

IGNORE_INDEX = -100
_ROWS_PER_CHUNK = 1024  # bounds the reference's fp32 working set to 1024 x V


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# The spec: a readable reference, chunked over rows so it also serves as a CPU fallback.


def reference_forward(
    logits: Tensor, targets: Tensor, valid: Tensor | None, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel contract, forward.

    logits (N, V), any float dtype, last dim contiguous (row stride arbitrary);
    targets (N,) int64 in [0, V) on valid rows; valid (N,) bool or None (all rows valid;
    rows whose target is -100 are always ignored). Returns (logp, entropy, stats): logp
    and entropy (N,), stats (N, 2) = (m, log_norm) per row as in the module docstring
    (m the max logit, exact; a row of only -inf logits has (-inf, -inf)), all fp32 (fp64
    for fp64 logits); ignored rows get 0 everywhere. stats is only for the backward.
    """
    n = logits.shape[0]
    acc = _out_dtype(logits.dtype)
    logp = torch.zeros(n, dtype=acc, device=logits.device)
    entropy = torch.zeros_like(logp)
    stats = torch.zeros(n, 2, dtype=acc, device=logits.device)
    keep = targets != IGNORE_INDEX
    if valid is not None:
        keep &= valid
    for lo in range(0, n, _ROWS_PER_CHUNK):
        rows = torch.nonzero(keep[lo : lo + _ROWS_PER_CHUNK]).flatten() + lo
        if rows.numel() == 0:
            continue
        z = logits[rows].to(acc)  # a copy (advanced indexing): free to work in place
        # t = (z - max z) / tau, not z / tau - max: the subtraction is then exact near the
        # max, and entropy = log_norm - E_p[t] is a difference of small numbers, where
        # lse - E_p[s] cancels catastrophically for large logits (2% off in fp32 at
        # |s| ~ 600). A max of +-inf shifts by 0 instead (inf - inf is NaN).
        row_max = z.amax(dim=-1, keepdim=True)
        shift = torch.where(torch.isfinite(row_max), row_max, 0)
        t = z.sub_(shift).div_(temperature)
        log_norm = torch.logsumexp(t, dim=-1)
        p = torch.exp(t - log_norm[:, None])
        # p * t with p = 0 and t = -inf is 0, not NaN.
        expected_t = torch.where(p > 0, p * t, 0).sum(-1)
        logp[rows] = t.gather(1, targets[rows, None]).squeeze(1) - log_norm
        entropy[rows] = log_norm - expected_t
        stats[rows] = torch.stack([row_max.squeeze(1), log_norm], dim=1)
    # Rounding can push an entropy a hair below 0 or a log-prob above 0; clamp both so
    # the documented ranges hold exactly.
    return logp.clamp_(max=0), entropy.clamp_(min=0), stats


def reference_backward(
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    logits: Tensor,
    targets: Tensor,
    valid: Tensor | None,
    stats: Tensor,
    entropy: Tensor,
    temperature: float,
    out: Tensor,
) -> None:
    """Kernel contract, backward: writes dL/dlogits into ``out`` (N, V), logits' dtype.

    ``out`` may be ``logits`` itself (in-place backward): each element is read before
    its gradient is written. grad_* are (N,) in the output dtype; grad_entropy may be
    None (no gradient through the entropy). stats (N, 2) and entropy (N,) are the
    forward's. Ignored rows get zeros.
    """
    n = logits.shape[0]
    acc = _out_dtype(logits.dtype)
    keep = targets != IGNORE_INDEX
    if valid is not None:
        keep &= valid
    for lo in range(0, n, _ROWS_PER_CHUNK):
        hi = min(n, lo + _ROWS_PER_CHUNK)
        row_max, log_norm = stats[lo:hi, 0:1], stats[lo:hi, 1:2]
        shift = torch.where(torch.isfinite(row_max), row_max, 0)
        # u = log p relative to the max, as the forward measured it (module docstring).
        u = (logits[lo:hi].to(acc) - shift) / temperature - log_norm
        p = torch.exp(u)
        g = -grad_logp[lo:hi, None] * p
        g.scatter_add_(1, targets[lo:hi, None].clamp(min=0), grad_logp[lo:hi, None])
        if grad_entropy is not None:
            # p (E_s - s) = -p (H + u); 0 where p = 0 (u = -inf would give 0 * -inf).
            h_u = torch.where(p > 0, p * (entropy[lo:hi, None] + u), 0)
            g -= grad_entropy[lo:hi, None] * h_u
        g = torch.where(keep[lo:hi, None], g / temperature, 0)
        out[lo:hi] = g.to(out.dtype)


_backends.register("token_logprobs_fwd", "reference")(reference_forward)
_backends.register("token_logprobs_bwd", "reference")(reference_backward)


_backends.register("token_logprobs_fwd", "cpp")(_backends.from_extension("token_logprobs_fwd_cpu"))
_backends.register("token_logprobs_bwd", "cpp")(_backends.from_extension("token_logprobs_bwd_cpu"))
for _name in ("token_logprobs_fwd", "token_logprobs_bwd"):
    _backends.register(_name, "triton")(_backends.from_module("vapo_kernels.triton.logprobs", _name))


# --------------------------------------------------------------------------------------
# Validation


def _check_static(logits, targets, mask, temperature):
    _ragged.check_float("logits", logits)
    if logits.dim() < 2:
        raise ValueError(f"logits must be (N, V) or (B, T, V), got shape {tuple(logits.shape)}")
    _check_targets_mask_temperature(targets, "logits", logits, mask, temperature)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a vocabulary of at least 1 entry, got V = 0")
    if logits.stride(-1) != 1 and logits.numel() > 0:
        raise ValueError("logits must be contiguous along the vocabulary (last) dimension")


def _check_targets_mask_temperature(targets, rows_name, rows, mask, temperature):
    """Shared by both ops: targets of shape ``rows.shape[:-1]`` on rows' device, a mask
    like the targets, a positive finite temperature."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32), got {targets.dtype}")
    if targets.shape != rows.shape[:-1]:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)} but {rows_name} {tuple(rows.shape)} "
            f"need {tuple(rows.shape[:-1])}"
        )
    if targets.device != rows.device:
        raise ValueError(f"targets is on {targets.device} but {rows_name} is on {rows.device}")
    _ragged.check_mask(mask, "targets", targets)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite float, got {temperature}")


def _check_targets_in_range(targets: Tensor, vocab: int) -> None:
    if not _ragged.validation_enabled() or targets.numel() == 0:
        return
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(
            f"targets must lie in [0, V={vocab}) or equal {IGNORE_INDEX} (ignored), got {value}"
        )


def _rows(logits: Tensor) -> Tensor:
    """(..., V) -> (N, V) as a view; refuses a layout that would need an N x V copy."""
    vocab = logits.shape[-1]
    try:
        return logits.view(-1, vocab)
    except RuntimeError:
        raise ValueError(
            "logits must be viewable as (N, V) rows without a copy "
            "(contiguous leading dimensions)"
        ) from None


def _flat_mask(mask: Tensor | None) -> Tensor | None:
    mask = _ragged.as_bool_mask(mask)
    return None if mask is None else mask.reshape(-1).contiguous()


# --------------------------------------------------------------------------------------
# The torch ops


@torch.library.custom_op("vapo::token_logprobs", mutates_args=())
def token_logprobs_op(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor | None,
    temperature: float,
    inplace_backward: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, stats): logp and entropy of shape logits.shape[:-1], stats of shape
    logits.shape[:-1] + (2,), the per-row (max logit, log normaliser) that the backward
    takes (non-differentiable). See the module docstring."""
    _check_static(logits, targets, mask, temperature)
    _check_targets_in_range(targets, logits.shape[-1])
    shape = targets.shape
    if targets.numel() == 0:
        empty = torch.zeros(shape, dtype=_out_dtype(logits.dtype), device=logits.device)
        return empty, empty.clone(), empty.new_zeros((*shape, 2))
    _, kernel = _backends.select("token_logprobs_fwd", logits.device, backend or None)
    logp, entropy, stats = kernel(
        _rows(logits), targets.reshape(-1).long().contiguous(), _flat_mask(mask), float(temperature)
    )
    return logp.view(shape), entropy.view(shape), stats.view(*shape, 2)


@token_logprobs_op.register_fake
def _token_logprobs_fake(logits, targets, mask, temperature, inplace_backward, backend):
    _check_static(logits, targets, mask, temperature)
    out = torch.empty(targets.shape, dtype=_out_dtype(logits.dtype), device=logits.device)
    return out, torch.empty_like(out), out.new_empty((*targets.shape, 2))


def _write_logits_grad(out, grad_logp, grad_entropy, logits, targets, mask, stats, entropy,
                       temperature, backend):
    """Run the backend's backward kernel, writing dL/dlogits into ``out`` (may be logits)."""
    if not logits.numel():
        return
    _, kernel = _backends.select("token_logprobs_bwd", logits.device, backend or None)
    kernel(
        grad_logp.reshape(-1).contiguous(),
        None if grad_entropy is None else grad_entropy.reshape(-1).contiguous(),
        _rows(logits),
        targets.reshape(-1).long().contiguous(),
        _flat_mask(mask),
        stats.reshape(-1, 2).contiguous(),
        entropy.reshape(-1).contiguous(),
        float(temperature),
        _rows(out),
    )


@torch.library.custom_op("vapo::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    logits: Tensor,
    targets: Tensor,
    mask: Tensor | None,
    stats: Tensor,
    entropy: Tensor,
    temperature: float,
    backend: str,
) -> Tensor:
    """dL/dlogits in a new tensor of logits' shape and dtype."""
    grad = _backends.empty_output(logits)
    _write_logits_grad(
        grad, grad_logp, grad_entropy, logits, targets, mask, stats, entropy, temperature, backend
    )
    return grad


@token_logprobs_backward_op.register_fake
def _token_logprobs_backward_fake(grad_logp, grad_entropy, logits, *rest):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("vapo::token_logprobs_backward_", mutates_args=("logits",))
def token_logprobs_backward_inplace_op(
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    logits: Tensor,
    targets: Tensor,
    mask: Tensor | None,
    stats: Tensor,
    entropy: Tensor,
    temperature: float,
    backend: str,
) -> None:
    """dL/dlogits written over the logits themselves (bumps their version counter)."""
    _write_logits_grad(
        logits, grad_logp, grad_entropy, logits, targets, mask, stats, entropy, temperature, backend
    )


@token_logprobs_backward_inplace_op.register_fake
def _token_logprobs_backward_inplace_fake(*args):
    return None


def _setup_context(ctx, inputs, output):
    logits, targets, mask, temperature, inplace_backward, backend = inputs
    _, entropy, stats = output
    ctx.save_for_backward(logits, targets, mask, stats, entropy)
    ctx.mark_non_differentiable(stats)  # statistics kept for the backward, not a result
    ctx.temperature = temperature
    ctx.inplace = inplace_backward
    ctx.backend = backend
    ctx.logits_is_leaf = logits.is_leaf


def _backward(ctx, grad_logp, grad_entropy, grad_stats):
    logits, targets, mask, stats, entropy = ctx.saved_tensors
    out_dtype = _out_dtype(logits.dtype)
    grad_logp = torch.zeros_like(entropy) if grad_logp is None else grad_logp.to(out_dtype)
    grad_entropy = None if grad_entropy is None else grad_entropy.to(out_dtype)
    args = (grad_logp, grad_entropy, logits, targets, mask, stats, entropy, ctx.temperature, ctx.backend)
    if not ctx.inplace:
        return torch.ops.vapo.token_logprobs_backward(*args), None, None, None, None, None
    if ctx.logits_is_leaf:
        raise RuntimeError(
            "token_logprobs(inplace_backward=True) would overwrite logits that are a leaf "
            "tensor the caller owns; pass inplace_backward=False"
        )
    torch.ops.vapo.token_logprobs_backward_(*args)
    return logits, None, None, None, None, None


torch.library.register_autograd("vapo::token_logprobs", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# Public API


def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    mask: Tensor | None = None,
    inplace_backward: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Log-probability of each target token, and optionally the entropy of its row.

    ``logits`` (N, V) packed or (B, T, V) padded, any float dtype; ``targets`` of shape
    ``logits.shape[:-1]``; rows with target -100 or ``mask`` 0 are ignored (0 out, zero
    gradient, no cost). Returns fp32 ``logp`` (and ``entropy``), differentiable with
    respect to ``logits``. See the module docstring for the formulas and
    ``inplace_backward``.
    """
    logp, entropy, _ = torch.ops.vapo.token_logprobs(
        logits, targets, mask, float(temperature) if isinstance(temperature, int) else temperature,
        bool(inplace_backward), backend or "",
    )
    return (logp, entropy) if return_entropy else logp


# ---- Fused linear log-probs (LM head): logits never materialised ----
#
# linear_logprobs(hidden, weight, targets) returns what token_logprobs returns on the
# logits z = hidden @ weight.T + bias, but never holds the N x V logits: kernels walk
# the vocabulary in tiles and keep, per row, the running maximum m of the RAW logits z
# and three numbers measured from it, with d_v = (z_v - m) / tau:
#
#     den = sum_v exp(d_v)                    softmax denominator
#     mom = sum_v exp(d_v) * d_v              its first moment, centred on m
#     t   = z_y                               picked from the tile that holds y
#
# Two partial states (m1, den1, mom1), (m2, den2, mom2) merge exactly at M = max(m1, m2):
# with c_i = (m_i - M) / tau and e_i = exp(c_i),
#
#     den = e1 den1 + e2 den2,    mom = e1 (mom1 + c1 den1) + e2 (mom2 + c2 den2).
#
# The same merge joins vocab tiles inside a kernel and vocabulary shards across ranks
# (``process_group=``). At the end, as token_logprobs has them (module docstring),
#
#     log_norm = log den,    H = log_norm - mom / den,    logp = (t - m) / tau - log_norm,
#
# and the backward gets stats = (m, log_norm). Centring the moment on m keeps H free of
# the cancellation that ``lse - sum p s`` suffers on large logits (|s| ~ 1e4 in fp32
# loses ~1e-3 absolute); taking m on z rather than on z / tau keeps z - m exact near the
# max, where z / tau - max would carry the rounding of the division, ~ulp(1e4) ~ 1e-3.
#
# Backward, with u = (z - m) / tau - log_norm (p = exp(u)) and E_s - s_v = -(H + u_v) in
# the gradient of the module docstring:
#
#     dz_v = ( g_logp (onehot(y)_v - p_v) - g_H p_v (H + u_v) ) / tau      (0 where p_v = 0)
#     grad_hidden = dz @ W,   grad_weight = dz^T @ hidden,   grad_bias = sum_rows dz
#
# The tile recomputed by the backward must be the forward's bit for bit at the max (a
# one-ulp difference in a logit of 1e4 would be a 1e-3 error in its p): every backend
# computes a logit by the same tile code in both passes.
#
# each logits tile is recomputed, and the sums run in fp32 (fp64 for fp64 inputs) before
# one cast to the parameters' dtypes. Exact: no tile is skipped for a small gradient.
#
# Cost, with N kept rows: forward 2 N H V FLOP. Backward: the reference recomputes each
# tile once and feeds both GEMMs from it, 6 N H V; the Triton backend recomputes it in
# each of its two kernels (one owns row blocks, one vocab blocks, so neither needs
# atomics), 8 N H V. Extra memory is a few tiles plus the fp32 gradient accumulators
# (N x H, and V x H for non-fp32 weights in the Triton backend): never N x V.
#
# Backends: "reference" (below; PyTorch, any device, also the CPU path - there is no
# C++ kernel for this op, a CPU GEMM is already the right tool) and "triton".

# Reference tiles: fp32 working set of a tile is 1024 x 8192 x 4 B = 32 MiB, a few of
# them live at once; a bigger tile buys nothing on CPU, where the GEMMs dominate.
_LINEAR_ROWS_PER_CHUNK = 1024
_LINEAR_VOCAB_PER_CHUNK = 8192


def _shift(m: Tensor) -> Tensor:
    """The row max to measure from: 0 where it is +-inf (inf - inf would be NaN)."""
    return torch.where(torch.isfinite(m), m, 0)


def _rescale_state(
    m: Tensor, den: Tensor, mom: Tensor, new_m: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """(den, mom) of a partial softmax state moved from its maximum ``m`` to ``new_m >= m``
    (both raw logits; den and mom are measured in z / tau).

    An empty state (den = 0, e.g. every logit -inf so far) stays (0, 0); a maximum of -inf
    everywhere uses 0 as the shift so that no -inf - -inf = NaN appears.
    """
    c = (m - _shift(new_m)) / temperature
    scale = torch.exp(c)
    moment = torch.where(den > 0, scale * (mom + c * den), 0)
    return den * scale, moment


def _merge_state(m1, den1, mom1, m2, den2, mom2, temperature):
    m = torch.maximum(m1, m2)
    den1, mom1 = _rescale_state(m1, den1, mom1, m, temperature)
    den2, mom2 = _rescale_state(m2, den2, mom2, m, temperature)
    return m, den1 + den2, mom1 + mom2


def _tile_state(z: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(m, den, mom) of one tile of raw logits; overwrites ``z`` (it is a temporary)."""
    m = z.max(dim=1).values
    d = z.sub_(_shift(m)[:, None]).div_(temperature)  # (z - m) / tau, <= 0
    p = torch.exp(d)
    den = p.sum(dim=1)
    # p * d with p = 0 and d = -inf is 0, not NaN.
    mom = d.mul_(p).masked_fill_(p == 0, 0).sum(dim=1)
    return m, den, mom


def _reference_logits(hidden, rows, w_tile, b_tile, acc):
    """(hidden rows in acc, their raw logits z on this tile): the one place both passes
    compute a logit, so the backward's z is the forward's bit for bit."""
    h = hidden[rows].to(acc)
    return h, (h @ w_tile.T if b_tile is None else torch.addmm(b_tile, h, w_tile.T))


def reference_linear_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    valid: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Kernel contract, forward.

    hidden (N, H), weight (V, H), bias (V,) or None, one float dtype; targets (N,) int64
    vocabulary ids LOCAL to this weight: a row's target logit is picked only where
    0 <= target < V, so a tensor-parallel rank that does not own the target adds 0;
    valid (N,) bool. Returns the partial state (row_max m, sum_exp den, moment mom,
    target_logit t) of every row over this weight's vocabulary as in the section comment
    (m and t raw logits z, den and mom measured in z / tau from m), (N,) each, fp32 (fp64
    for fp64 inputs); rows that are not valid get 0 in all four.
    """
    acc = _out_dtype(hidden.dtype)
    n, vocab = hidden.shape[0], weight.shape[0]
    out = [torch.zeros(n, dtype=acc, device=hidden.device) for _ in range(4)]
    rows = torch.nonzero(valid).flatten()  # ignored rows cost nothing
    kept = rows.numel()
    if kept == 0:
        return tuple(out)
    m = torch.full((kept,), float("-inf"), dtype=acc, device=hidden.device)
    den = torch.zeros_like(m)
    mom = torch.zeros_like(m)
    t = torch.zeros_like(m)
    y = targets[rows]
    # Vocab tiles outside, rows inside: each weight tile is converted once, and the
    # per-row state is only 4 x N numbers.
    for v0 in range(0, vocab, _LINEAR_VOCAB_PER_CHUNK):
        v1 = min(vocab, v0 + _LINEAR_VOCAB_PER_CHUNK)
        w_tile = weight[v0:v1].to(acc)
        b_tile = None if bias is None else bias[v0:v1].to(acc)
        for r0 in range(0, kept, _LINEAR_ROWS_PER_CHUNK):
            r1 = min(kept, r0 + _LINEAR_ROWS_PER_CHUNK)
            _, z = _reference_logits(hidden, rows[r0:r1], w_tile, b_tile, acc)
            local = y[r0:r1] - v0
            here = (local >= 0) & (local < v1 - v0)
            picked = z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            t[r0:r1] += torch.where(here, picked, 0)  # exactly one tile (or rank) adds
            state = _tile_state(z, temperature)
            m[r0:r1], den[r0:r1], mom[r0:r1] = _merge_state(
                m[r0:r1], den[r0:r1], mom[r0:r1], *state, temperature
            )
    for dst, src in zip(out, (m, den, mom, t)):
        dst[rows] = src
    return tuple(out)


def reference_linear_backward(
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    valid: Tensor,
    stats: Tensor,
    entropy: Tensor,
    temperature: float,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Kernel contract, backward.

    Inputs as in :func:`reference_linear_forward`, plus grad_* (N,), the GLOBAL stats
    (N, 2) = (m, log_norm) and entropy (N,) of the op's forward, all in the accumulation
    dtype (grad_entropy None: no gradient through the entropy). Returns (grad_hidden
    (N, H) in the ACCUMULATION dtype, so a tensor-parallel caller can sum it across ranks
    before rounding; grad_weight (V, H) in weight's dtype; grad_bias (V,) in bias's dtype
    or None). grad_hidden is None unless
    ``need_hidden``, grad_weight and grad_bias None unless ``need_weight``. Rows that are
    not valid contribute nothing and get zero grad_hidden.
    """
    acc = _out_dtype(hidden.dtype)
    n, dim = hidden.shape
    vocab = weight.shape[0]
    rows = torch.nonzero(valid).flatten()
    kept = rows.numel()
    y, g_lp, ent_k = targets[rows], grad_logp[rows], entropy[rows]
    shift_k, log_norm_k = _shift(stats[rows, 0]), stats[rows, 1]
    g_ent = None if grad_entropy is None else grad_entropy[rows]
    dev = hidden.device
    gh = torch.zeros(kept, dim, dtype=acc, device=dev) if need_hidden else None
    grad_weight = grad_bias = None
    if need_weight:
        grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
        grad_bias = None if bias is None else torch.empty_like(bias)
    for v0 in range(0, vocab, _LINEAR_VOCAB_PER_CHUNK):
        v1 = min(vocab, v0 + _LINEAR_VOCAB_PER_CHUNK)
        w_tile = weight[v0:v1].to(acc)
        b_tile = None if bias is None else bias[v0:v1].to(acc)
        # This tile's weight gradient is complete once every row chunk has passed, so
        # the fp32 accumulator is one tile of W, not all of it.
        gw_tile = torch.zeros(v1 - v0, dim, dtype=acc, device=dev) if need_weight else None
        gb_tile = torch.zeros(v1 - v0, dtype=acc, device=dev) if grad_bias is not None else None
        for r0 in range(0, kept, _LINEAR_ROWS_PER_CHUNK):
            r1 = min(kept, r0 + _LINEAR_ROWS_PER_CHUNK)
            h, z = _reference_logits(hidden, rows[r0:r1], w_tile, b_tile, acc)
            # In place throughout: two tiles (z -> u, then p -> dz) and a bool one are live.
            # u = log p, from the row max as in the forward (section comment).
            u = z.sub_(shift_k[r0:r1, None]).div_(temperature).sub_(log_norm_k[r0:r1, None])
            p = torch.exp(u)
            if g_ent is not None:
                # p (H + u); 0 where p = 0 (u = -inf would give 0 * -inf = NaN)
                u.add_(ent_k[r0:r1, None]).mul_(p).masked_fill_(p == 0, 0)
                u.mul_(g_ent[r0:r1, None])
            dz = p.mul_(-g_lp[r0:r1, None])
            if g_ent is not None:
                dz.sub_(u)
            local = y[r0:r1] - v0
            here = torch.nonzero((local >= 0) & (local < v1 - v0)).flatten()
            dz.index_put_((here, local[here]), g_lp[r0:r1][here], accumulate=True)
            dz.div_(temperature)
            if need_hidden:
                gh[r0:r1].addmm_(dz, w_tile)
            if need_weight:
                gw_tile.addmm_(dz.T, h)
            if gb_tile is not None:
                gb_tile += dz.sum(dim=0)
        if need_weight:
            grad_weight[v0:v1] = gw_tile.to(weight.dtype)
            if grad_bias is not None:
                grad_bias[v0:v1] = gb_tile.to(bias.dtype)
    grad_hidden = None
    if need_hidden:
        grad_hidden = torch.zeros(n, dim, dtype=acc, device=hidden.device)
        grad_hidden[rows] = gh
    return grad_hidden, grad_weight, grad_bias


_backends.register("linear_logprobs_fwd", "reference")(reference_linear_forward)
_backends.register("linear_logprobs_bwd", "reference")(reference_linear_backward)


for _name in ("linear_logprobs_fwd", "linear_logprobs_bwd"):
    _backends.register(_name, "triton")(
        _backends.from_module("vapo_kernels.triton.linear_logprobs", _name)
    )


def _finalise_state(m, den, mom, t, keep, temperature):
    """(logp, entropy, stats) from a row's full-vocabulary state; 0 on ignored rows."""
    log_norm = torch.log(den)
    # Same documented ranges as token_logprobs, exactly: logp <= 0, H >= 0.
    logp = ((t - _shift(m)) / temperature - log_norm).clamp_(max=0)
    entropy = (log_norm - mom / den).clamp_(min=0)
    stats = torch.where(keep[:, None], torch.stack([m, log_norm], dim=1), 0)
    return torch.where(keep, logp, 0), torch.where(keep, entropy, 0), stats


# --------------------------------------------------------------------------------------
# Validation


def _check_linear_static(hidden, weight, bias, targets, mask, temperature):
    _ragged.check_float("hidden", hidden)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (N, H) or (B, T, H), got shape {tuple(hidden.shape)}")
    _ragged.check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (V, H) = (vocabulary, hidden), the nn.Linear / LM-head layout, "
            f"with H = hidden.shape[-1] = {hidden.shape[-1]}; got shape {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have a vocabulary of at least 1 row, got V = 0")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}; cast one")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        _ragged.check_float("bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(
                f"bias must be (V,) = ({weight.shape[0]},), one entry per row of weight; "
                f"got shape {tuple(bias.shape)}"
            )
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but weight has {weight.dtype}")
        if bias.device != weight.device:
            raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
    _check_targets_mask_temperature(targets, "hidden", hidden, mask, temperature)


def _linear_rows(hidden: Tensor, targets: Tensor, mask: Tensor | None):
    """(N, H) hidden rows (a copy only for a layout that cannot be viewed; that is N x H,
    never N x V), flat int64 targets, and the (N,) rows to compute."""
    flat = targets.reshape(-1).long().contiguous()
    keep = flat != IGNORE_INDEX
    mask = _flat_mask(mask)
    if mask is not None:
        keep &= mask
    return hidden.reshape(-1, hidden.shape[-1]), flat, keep


# --------------------------------------------------------------------------------------
# The torch ops


@torch.library.custom_op("vapo::linear_logprobs", mutates_args=())
def linear_logprobs_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    mask: Tensor | None,
    temperature: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, stats) of ``hidden @ weight.T + bias``: logp and entropy of shape
    targets.shape, stats of shape targets.shape + (2,) (the backward's (m, log_norm) per
    row, non-differentiable; see token_logprobs)."""
    _check_linear_static(hidden, weight, bias, targets, mask, temperature)
    _check_targets_in_range(targets, weight.shape[0])
    shape = targets.shape
    if targets.numel() == 0:
        empty = torch.zeros(shape, dtype=_out_dtype(hidden.dtype), device=hidden.device)
        return empty, empty.clone(), empty.new_zeros((*shape, 2))
    rows, flat, keep = _linear_rows(hidden, targets, mask)
    _, kernel = _backends.select("linear_logprobs_fwd", hidden.device, backend or None)
    state = kernel(rows, weight, bias, flat, keep, float(temperature))
    logp, entropy, stats = _finalise_state(*state, keep, float(temperature))
    return logp.view(shape), entropy.view(shape), stats.view(*shape, 2)


@linear_logprobs_op.register_fake
def _linear_logprobs_fake(hidden, weight, bias, targets, mask, temperature, backend):
    _check_linear_static(hidden, weight, bias, targets, mask, temperature)
    out = torch.empty(targets.shape, dtype=_out_dtype(hidden.dtype), device=hidden.device)
    return out, torch.empty_like(out), out.new_empty((*targets.shape, 2))


def _linear_backward_kernel(args, backend, vocab_start=0):
    """Runs the backend's backward kernel on (N, ...) rows; grad_hidden stays in the
    accumulation dtype. ``args`` as in the backward op, without the flags."""
    (grad_logp, grad_entropy, hidden, weight, bias, targets, mask, stats, entropy,
     temperature, need_hidden, need_weight) = args
    rows, flat, keep = _linear_rows(hidden, targets, mask)
    _, kernel = _backends.select("linear_logprobs_bwd", hidden.device, backend or None)
    return kernel(
        grad_logp.reshape(-1).contiguous(),
        None if grad_entropy is None else grad_entropy.reshape(-1).contiguous(),
        rows, weight, bias, flat - vocab_start, keep,
        stats.reshape(-1, 2).contiguous(), entropy.reshape(-1).contiguous(),
        float(temperature), need_hidden, need_weight,
    )


@torch.library.custom_op("vapo::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward_op(
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    mask: Tensor | None,
    stats: Tensor,
    entropy: Tensor,
    temperature: float,
    need_hidden: bool,
    need_weight: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias) in the dtypes of hidden, weight and bias.

    A gradient not asked for (``need_hidden`` / ``need_weight`` False, or no bias) is an
    empty (0,) tensor: a schema cannot return an optional tensor.
    """
    gh, gw, gb = _linear_backward_kernel(
        (grad_logp, grad_entropy, hidden, weight, bias, targets, mask, stats, entropy,
         temperature, need_hidden, need_weight),
        backend,
    )
    gh = None if gh is None else gh.to(hidden.dtype).view(hidden.shape)
    return tuple(hidden.new_empty(0) if g is None else g for g in (gh, gw, gb))


@linear_logprobs_backward_op.register_fake
def _linear_logprobs_backward_fake(
    grad_logp, grad_entropy, hidden, weight, bias, targets, mask, stats, entropy,
    temperature, need_hidden, need_weight, backend,
):
    nothing = hidden.new_empty(0)
    gh = gw = gb = None
    if need_hidden:
        gh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    if need_weight:
        gw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        gb = None if bias is None else torch.empty_like(bias)
    return tuple(nothing.clone() if g is None else g for g in (gh, gw, gb))


def _linear_grads_in(grad_logp, grad_entropy, entropy):
    """Upstream gradients in the accumulation dtype (entropy's); a missing grad_logp is
    zeros."""
    grad_logp = torch.zeros_like(entropy) if grad_logp is None else grad_logp.to(entropy.dtype)
    grad_entropy = None if grad_entropy is None else grad_entropy.to(entropy.dtype)
    return grad_logp, grad_entropy


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, mask, temperature, backend = inputs
    _, entropy, stats = output
    ctx.save_for_backward(hidden, weight, bias, targets, mask, stats, entropy)
    ctx.mark_non_differentiable(stats)  # statistics kept for the backward, not a result
    ctx.temperature = temperature
    ctx.backend = backend


def _linear_backward(ctx, grad_logp, grad_entropy, grad_stats):
    hidden, weight, bias, targets, mask, stats, entropy = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_weight = need_w or (bias is not None and need_b)
    if not (need_h or need_weight):
        return None, None, None, None, None, None, None
    grad_logp, grad_entropy = _linear_grads_in(grad_logp, grad_entropy, entropy)
    gh, gw, gb = torch.ops.vapo.linear_logprobs_backward(
        grad_logp, grad_entropy, hidden, weight, bias, targets, mask, stats, entropy,
        ctx.temperature, need_h, need_weight, ctx.backend,
    )
    return (
        gh if need_h else None,
        gw if need_w else None,
        gb if bias is not None and need_b else None,
        None, None, None, None,
    )


torch.library.register_autograd(
    "vapo::linear_logprobs", _linear_backward, setup_context=_linear_setup_context
)


# --------------------------------------------------------------------------------------
# Vocabulary-parallel path (process_group=): collectives around the same kernels. Not a
# torch op (a process group cannot cross an op schema), so opcheck / torch.compile cover
# only the single-process op above.


def _vocab_shard(weight: Tensor, group) -> tuple[int, int]:
    """(first global vocabulary id of this rank's rows, global V): shards are contiguous
    and in group-rank order, as Megatron's vocab-parallel embedding lays them out."""
    import torch.distributed as dist

    size = torch.tensor([weight.shape[0]], dtype=torch.int64, device=weight.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


class _VocabParallelLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, temperature, backend, group):
        import torch.distributed as dist

        _check_linear_static(hidden, weight, bias, targets, mask, temperature)
        vocab_start, vocab = _vocab_shard(weight, group)
        _check_targets_in_range(targets, vocab)
        shape = targets.shape
        rows, flat, keep = _linear_rows(hidden, targets, mask)
        _, kernel = _backends.select("linear_logprobs_fwd", hidden.device, backend or None)
        m, den, mom, t = kernel(rows, weight, bias, flat - vocab_start, keep, float(temperature))
        # Global max first, then every rank's (den, mom) moved to it and summed; the target
        # logit is summed too: only the owning rank holds a non-zero one.
        m_all = m.clone()
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
        den, mom = _rescale_state(m, den, mom, m_all, float(temperature))
        sums = torch.stack([den, mom, t])
        dist.all_reduce(sums, group=group)
        logp, entropy, stats = _finalise_state(
            m_all, sums[0], sums[1], sums[2], keep, float(temperature)
        )
        ctx.save_for_backward(hidden, weight, bias, targets, mask, stats, entropy)
        ctx.temperature, ctx.backend = temperature, backend
        ctx.group, ctx.vocab_start = group, vocab_start
        return logp.view(shape), entropy.view(shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        import torch.distributed as dist

        hidden, weight, bias, targets, mask, stats, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_weight = need_w or (bias is not None and need_b)
        grad_logp, grad_entropy = _linear_grads_in(grad_logp, grad_entropy, entropy)
        gh, gw, gb = _linear_backward_kernel(
            (grad_logp, grad_entropy, hidden, weight, bias, targets, mask, stats,
             entropy, ctx.temperature, need_h, need_weight),
            ctx.backend, ctx.vocab_start,
        )
        if need_h:
            # Each rank holds dz @ W_r for its own vocabulary rows; the full gradient is
            # their sum, taken in fp32 before the one rounding to hidden's dtype.
            dist.all_reduce(gh, group=ctx.group)
            gh = gh.to(hidden.dtype).view(hidden.shape)
        return (gh if need_h else None, gw if need_w else None,
                gb if bias is not None and need_b else None, None, None, None, None, None)


# --------------------------------------------------------------------------------------
# Public API


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    mask: Tensor | None = None,
    process_group=None,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""``token_logprobs(hidden @ weight.T + bias, targets, ...)`` without the N x V logits.

    ``hidden`` (N, H) packed or (B, T, H) padded; ``weight`` (V, H), the LM head's
    ``nn.Linear`` layout, same dtype; ``bias`` (V,) or None; ``targets`` of shape
    ``hidden.shape[:-1]``, -100 ignored; ``mask`` as in :func:`token_logprobs`. Returns
    fp32 (fp64 for fp64 inputs) ``logp`` (and ``entropy``), differentiable with respect
    to hidden, weight and bias; the logits are computed in fp32 from the input dtype.

    ``process_group``: vocabulary-parallel LM head. Every rank passes the same hidden,
    targets (GLOBAL vocabulary ids) and mask, and its own contiguous shard of weight /
    bias rows, shards in group-rank order; every rank gets the full logp / entropy and
    the full grad_hidden, while grad_weight / grad_bias stay per shard.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        # Here, not only in the op: a non-float would fail the op's schema first, with a
        # message that does not name the argument.
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if process_group is not None:
        logp, entropy = _VocabParallelLinearLogprobs.apply(
            hidden, weight, bias, targets, mask, temperature, backend or "", process_group
        )
    else:
        logp, entropy, _ = torch.ops.vapo.linear_logprobs(
            hidden, weight, bias, targets, mask, temperature, backend or ""
        )
    return (logp, entropy) if return_entropy else logp
