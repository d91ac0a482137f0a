r"""``vapo::linear_logprobs``: token log-probs and entropy from hidden states and the LM
head, the N x V logits never materialised.

linear_logprobs(hidden, weight, targets) returns what token_logprobs returns on the
logits z = hidden @ weight.T + bias, but never holds the N x V logits: kernels walk
the vocabulary in tiles and keep, per row, the running maximum m of the RAW logits z
and three numbers measured from it, with d_v = (z_v - m) / tau:

    den = sum_v exp(d_v)                    softmax denominator
    mom = sum_v exp(d_v) * d_v              its first moment, centred on m
    t   = z_y                               picked from the tile that holds y

Two partial states (m1, den1, mom1), (m2, den2, mom2) merge exactly at M = max(m1, m2):
with c_i = (m_i - M) / tau and e_i = exp(c_i),

    den = e1 den1 + e2 den2,    mom = e1 (mom1 + c1 den1) + e2 (mom2 + c2 den2).

The same merge joins vocab tiles inside a kernel and vocabulary shards across ranks
(``process_group=``). At the end, as token_logprobs has them (module docstring),

    log_norm = log den,    H = log_norm - mom / den,    logp = (t - m) / tau - log_norm,

and the backward gets stats = (m, log_norm). Centring the moment on m keeps H free of
the cancellation that ``lse - sum p s`` suffers on large logits (|s| ~ 1e4 in fp32
loses ~1e-3 absolute); taking m on z rather than on z / tau keeps z - m exact near the
max, where z / tau - max would carry the rounding of the division, ~ulp(1e4) ~ 1e-3.

Backward, with u = (z - m) / tau - log_norm (p = exp(u)) and E_s - s_v = -(H + u_v) in
the gradient of the module docstring:

    dz_v = ( g_logp (onehot(y)_v - p_v) - g_H p_v (H + u_v) ) / tau      (0 where p_v = 0)
    grad_hidden = dz @ W,   grad_weight = dz^T @ hidden,   grad_bias = sum_rows dz

The tile recomputed by the backward must be the forward's bit for bit at the max (a
one-ulp difference in a logit of 1e4 would be a 1e-3 error in its p): every backend
computes a logit by the same tile code in both passes.

each logits tile is recomputed, and the sums run in fp32 (fp64 for fp64 inputs) before
one cast to the parameters' dtypes. Exact: no tile is skipped for a small gradient.

Cost, with N kept rows: forward 2 N H V FLOP. Backward: the reference recomputes each
tile once and feeds both GEMMs from it, 6 N H V; the Triton backend recomputes it in
each of its two kernels (one owns row blocks, one vocab blocks, so neither needs
atomics), 8 N H V. Extra memory is a few tiles plus the fp32 gradient accumulators
(N x H, and V x H for non-fp32 weights in the Triton backend): never N x V.

Backends: "reference" (below; PyTorch, any device, also the CPU path - there is no
C++ kernel for this op, a CPU GEMM is already the right tool) and "triton".
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .. import _backends, _ragged
from .._library import Op, first_order
from .token_logprobs import (
    IGNORE_INDEX,
    _check_targets_in_range,
    _check_targets_mask_temperature,
    _flat_mask,
    _out_dtype,
    check_temperature,
    masked_targets,
)

# Reference tiles: fp32 working set of a tile is 1024 x 8192 x 4 B = 32 MiB, a few of
# them live at once; a bigger tile buys nothing on CPU, where the GEMMs dominate.
_LINEAR_ROWS_PER_CHUNK = 1024
_LINEAR_VOCAB_PER_CHUNK = 8192


def _shift(m: Tensor) -> Tensor:
    """The row max to measure from: 0 where it is -inf (a row of only -inf logits so far:
    -inf - -inf would be NaN). A +inf max stays, so its row comes out NaN as the spec (and
    token_logprobs, and the Triton kernel) says a +inf logit makes it; shifting it to 0
    gave a -inf log-prob instead."""
    return torch.where(m == float("-inf"), 0, m)


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


_backends.register("linear_logprobs", "reference")(reference_linear_forward)
_backends.register("linear_logprobs_backward", "reference")(reference_linear_backward)


_backends.register("linear_logprobs", "triton")(
    _backends.from_module("vapo_kernels.triton.linear_logprobs", "linear_logprobs_fwd")
)
_backends.register("linear_logprobs_backward", "triton")(
    _backends.from_module("vapo_kernels.triton.linear_logprobs", "linear_logprobs_bwd")
)


def _finalise_state(m, den, mom, t, keep, temperature):
    """(logp, entropy, stats) from a row's full-vocabulary state; 0 on ignored rows."""
    log_norm = torch.log(den)
    # Same documented ranges as token_logprobs, exactly: logp <= 0, H >= 0.
    logp = ((t - _shift(m)) / temperature - log_norm).clamp_(max=0)
    entropy = (log_norm - mom / den).clamp_(min=0)
    stats = torch.where(keep[:, None], torch.stack([m, log_norm], dim=1), 0)
    return torch.where(keep, logp, 0), torch.where(keep, entropy, 0), stats


def screen_nonfinite(logp: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                     valid: Tensor) -> None:
    """A valid row's log-prob is NaN exactly when its logits hold a NaN or a +inf, or are
    all -inf (skipped rows give 0): one sum screens them, as in token_logprobs. The
    precise checks run only then, to name the input that holds the NaN or inf - or, all
    finite, to say the logits overflowed. ``valid``: the rows computed, flat bool."""
    if not _ragged.validation_enabled() or not math.isnan(logp.sum().item()):
        return
    name_nonfinite_input(hidden, weight, bias, valid)
    row = int(torch.nonzero(logp.reshape(-1).isnan())[0, 0])
    raise ValueError(
        "the logits hidden @ weight.T (+ bias) hold +inf (an overflow: every input is "
        f"finite) or only -inf in a valid row: row {row} of the (N, H) rows"
    )


def name_nonfinite_input(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                         valid: Tensor | None) -> None:
    """For a NaN log-prob or entropy at a valid token, with data checks on: raise naming
    the LM-head input that holds a NaN or inf (``hidden`` in a ``valid`` row, ``weight``,
    ``bias`` - where -inf is allowed); return when none does."""
    if not _ragged.validation_enabled():
        return
    rows = ~torch.isfinite(hidden).all(-1)
    if valid is not None:
        rows &= valid.reshape(rows.shape)
    if bool(rows.any()):
        raise ValueError("hidden contains NaN or inf in a valid token's row")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or inf")
    # A -inf bias is a forbidden token, not an error.
    if bias is not None and bool((torch.isnan(bias) | (bias == math.inf)).any()):
        raise ValueError("bias contains NaN or +inf")


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
    # reshape(-1, 0) is ambiguous for H = 0: the row count comes from the targets.
    return hidden.reshape(flat.shape[0], hidden.shape[-1]), flat, keep


# --------------------------------------------------------------------------------------
# The ops


class LinearLogprobsArgs(NamedTuple):
    """The arguments of ``vapo::linear_logprobs``."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    targets: Tensor
    mask: Tensor | None
    temperature: float
    backend: str


class LinearLogprobsBackwardArgs(NamedTuple):
    """The arguments of ``vapo::linear_logprobs_backward``."""

    grad_logp: Tensor
    grad_entropy: Tensor | None
    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    targets: Tensor
    mask: Tensor | None
    stats: Tensor
    entropy: Tensor
    temperature: float
    need_hidden: bool
    need_weight: bool
    backend: str


def _forward(a: LinearLogprobsArgs):
    """(logp, entropy, stats) of ``hidden @ weight.T + bias``: logp and entropy of shape
    targets.shape, stats of shape targets.shape + (2,) (the backward's (m, log_norm) per
    row, non-differentiable; see token_logprobs)."""
    _check_linear_static(a.hidden, a.weight, a.bias, a.targets, a.mask, a.temperature)
    _check_targets_in_range(a.targets, a.weight.shape[0])
    shape = a.targets.shape
    if a.targets.numel() == 0:
        empty = torch.zeros(shape, dtype=_out_dtype(a.hidden.dtype), device=a.hidden.device)
        return empty, empty.clone(), empty.new_zeros((*shape, 2))
    rows, flat, keep = _linear_rows(a.hidden, a.targets, a.mask)
    _, kernel = _backends.select("linear_logprobs", a.hidden.device, a.backend)
    state = kernel(rows, a.weight, a.bias, flat, keep, float(a.temperature))
    logp, entropy, stats = _finalise_state(*state, keep, float(a.temperature))
    screen_nonfinite(logp, a.hidden, a.weight, a.bias, keep)
    return logp.view(shape), entropy.view(shape), stats.view(*shape, 2)


def _forward_fake(a: LinearLogprobsArgs):
    _check_linear_static(a.hidden, a.weight, a.bias, a.targets, a.mask, a.temperature)
    out = torch.empty(a.targets.shape, dtype=_out_dtype(a.hidden.dtype), device=a.hidden.device)
    return out, torch.empty_like(out), out.new_empty((*a.targets.shape, 2))


def _backward_kernel(a: LinearLogprobsBackwardArgs, vocab_start: int = 0):
    """Runs the backend's backward kernel on (N, ...) rows; grad_hidden stays in the
    accumulation dtype."""
    rows, flat, keep = _linear_rows(a.hidden, a.targets, a.mask)
    _, kernel = _backends.select("linear_logprobs_backward", a.hidden.device, a.backend)
    return kernel(
        a.grad_logp.reshape(-1).contiguous(),
        None if a.grad_entropy is None else a.grad_entropy.reshape(-1).contiguous(),
        rows, a.weight, a.bias, flat - vocab_start, keep,
        a.stats.reshape(-1, 2).contiguous(), a.entropy.reshape(-1).contiguous(),
        float(a.temperature), a.need_hidden, a.need_weight,
    )


def _backward_impl(a: LinearLogprobsBackwardArgs):
    """(grad_hidden, grad_weight, grad_bias) in the dtypes of hidden, weight and bias.

    A gradient not asked for (``need_hidden`` / ``need_weight`` False, or no bias) is an
    empty (0,) tensor: a schema cannot return an optional tensor.
    """
    gh, gw, gb = _backward_kernel(a)
    gh = None if gh is None else gh.to(a.hidden.dtype).view(a.hidden.shape)
    return tuple(a.hidden.new_empty(0) if g is None else g for g in (gh, gw, gb))


def _backward_fake(a: LinearLogprobsBackwardArgs):
    nothing = a.hidden.new_empty(0)
    gh = gw = gb = None
    if a.need_hidden:
        gh = torch.empty(a.hidden.shape, dtype=a.hidden.dtype, device=a.hidden.device)
    if a.need_weight:
        gw = torch.empty(a.weight.shape, dtype=a.weight.dtype, device=a.weight.device)
        gb = None if a.bias is None else torch.empty_like(a.bias)
    return tuple(nothing.clone() if g is None else g for g in (gh, gw, gb))


linear_logprobs_backward_op = Op(
    "linear_logprobs_backward", LinearLogprobsBackwardArgs, "(Tensor, Tensor, Tensor)",
    _backward_impl, _backward_fake,
)


def _linear_grads_in(grad_logp, grad_entropy, entropy):
    """Upstream gradients in the accumulation dtype (entropy's); a missing grad_logp is
    zeros."""
    grad_logp = torch.zeros_like(entropy) if grad_logp is None else grad_logp.to(entropy.dtype)
    grad_entropy = None if grad_entropy is None else grad_entropy.to(entropy.dtype)
    return grad_logp, grad_entropy


def _setup_context(ctx, a: LinearLogprobsArgs, output):
    _, entropy, stats = output
    ctx.save_for_backward(a.hidden, a.weight, a.bias, a.targets, a.mask, stats, entropy)
    ctx.mark_non_differentiable(stats)  # statistics kept for the backward, not a result
    ctx.temperature = a.temperature
    ctx.backend = a.backend


@first_order  # the kernels' gradients have no graph: a double backward would miss them
def _backward(ctx, grad_logp, grad_entropy, grad_stats):
    hidden, weight, bias, targets, mask, stats, entropy = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_weight = need_w or (bias is not None and need_b)
    if not (need_h or need_weight):
        return linear_logprobs_op.grads()
    grad_logp, grad_entropy = _linear_grads_in(grad_logp, grad_entropy, entropy)
    gh, gw, gb = linear_logprobs_backward_op(LinearLogprobsBackwardArgs(
        grad_logp, grad_entropy, hidden, weight, bias, targets, mask, stats, entropy,
        ctx.temperature, need_h, need_weight, ctx.backend,
    ))
    return linear_logprobs_op.grads(
        hidden=gh if need_h else None,
        weight=gw if need_w else None,
        bias=gb if bias is not None and need_b else None,
    )


linear_logprobs_op = Op(
    "linear_logprobs", LinearLogprobsArgs, "(Tensor, Tensor, Tensor)", _forward, _forward_fake,
    setup_context=_setup_context, backward=_backward,
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
        targets = masked_targets(targets, vocab, mask)  # against the global vocabulary
        _check_targets_in_range(targets, vocab)
        shape = targets.shape
        rows, flat, keep = _linear_rows(hidden, targets, mask)
        _, kernel = _backends.select("linear_logprobs", hidden.device, backend)
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
        # Every rank sees the same NaN (the sums are global): all raise, none waits.
        screen_nonfinite(logp, hidden, weight, bias, keep)
        ctx.save_for_backward(hidden, weight, bias, targets, mask, stats, entropy)
        ctx.temperature, ctx.backend = temperature, backend
        ctx.group, ctx.vocab_start = group, vocab_start
        return logp.view(shape), entropy.view(shape)

    @staticmethod
    @first_order
    def backward(ctx, grad_logp, grad_entropy):
        import torch.distributed as dist

        hidden, weight, bias, targets, mask, stats, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_weight = need_w or (bias is not None and need_b)
        grad_logp, grad_entropy = _linear_grads_in(grad_logp, grad_entropy, entropy)
        gh, gw, gb = _backward_kernel(
            LinearLogprobsBackwardArgs(
                grad_logp, grad_entropy, hidden, weight, bias, targets, mask, stats, entropy,
                ctx.temperature, need_h, need_weight, ctx.backend,
            ),
            ctx.vocab_start,
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
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
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
    temperature = check_temperature(temperature)
    # Not vocabulary-parallel: there a rank's weight holds a shard, not all V rows.
    if process_group is None and isinstance(weight, Tensor) and weight.dim() == 2:
        targets = masked_targets(targets, weight.shape[0], mask)
    if process_group is not None:
        logp, entropy = _VocabParallelLinearLogprobs.apply(
            hidden, weight, bias, targets, mask, temperature, backend or "", process_group
        )
    else:
        logp, entropy, _ = linear_logprobs_op(
            LinearLogprobsArgs(hidden, weight, bias, targets, mask, temperature, backend or "")
        )
    return (logp, entropy) if return_entropy else logp
