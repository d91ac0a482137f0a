r"""Token log-probs and entropy in Triton: the ``triton`` backend of ``vapo::token_logprobs``.

Implements the kernel contract of :func:`vapo_kernels.ops.token_logprobs.reference_forward`
and :func:`~vapo_kernels.ops.token_logprobs.reference_backward` (the maths is in the docstring
of :mod:`vapo_kernels.ops.token_logprobs`).

One program per row (token), a 1-D grid over rows. Ignored rows (target -100 or
``valid`` False) branch away before any logit is touched.

Forward: a single streaming pass over the row in BLOCK_V chunks keeps, in the
accumulation dtype (fp32, fp64 for fp64 logits), a running max ``m`` of the raw logits and

    S = sum_v 2^d_v,    W = sum_v 2^d_v d_v,    d = (z - m) c,    c = log2(e) / tau,

rescaled by ``2^dm``, ``dm = (m_old - m_new) c``, when a chunk raises the max (W also
picks up ``dm S_old`` because its weights are measured from m). Then, with the stats
(m, log_norm) that the backward takes (the module docstring of ops/token_logprobs.py),

    log_norm = ln2 log2 S,    H = ln2 (log2 S - W / S),    logp = ln2 ((z_y - m) c - log2 S).

Working in base 2 folds 1/tau and log2(e) into one multiply per logit before ``exp2``
(``tl.exp`` multiplies by log2(e) anyway). Measuring W from the running max rather than
accumulating ``sum p s`` keeps the entropy free of the cancellation ``lse - E[s]`` suffers
when the logits are large (|s| ~ 1e4 would cost ~1e-3 absolute in fp32); subtracting the
max before scaling, ``(z - m) c`` rather than ``z c - m c``, keeps the exponents of a row
of logits ~1e4 exact to the last digit. Both cost nothing extra: ``z - m`` is needed for
the exponent anyway. A logit of -inf contributes exactly 0 to S and W (guarded, never
``0 * inf``).

Backward: one pass per row, recomputing ``p = 2^((z - m) c - log_norm log2 e)`` from the
saved stats - measured from the max as in the forward, so a dominant logit gets p = 1
exactly (``z c - lse log2 e`` was ~1e-4 off there at tau = 1.3) - and writing
``dz = (g_lp (onehot - p) + g_H p (E_s - s)) / tau`` in ``out``'s dtype. Every chunk is
loaded into registers before the same program stores that chunk's gradient, and no
program touches another row, so ``out`` may be the logits buffer itself.

Row offsets are int64 (``row * row_stride`` exceeds 2^31 elements at N x V > 2^31);
column offsets stay int32 (V < 2^31).

The per-row bodies are the jit functions ``_row_forward`` / ``_row_backward`` /
``_row_zero``, so the fused loss kernel (``vapo::logits_loss``, triton/loss.py) runs
the same arithmetic, bit for bit, with the loss terms in between.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# Launch parameters (kept next to the kernels).
# GPU (not yet tuned on a device): the kernels stream memory, so a chunk must be wide
# enough to keep many bytes in flight per program: 8192 logits (16 KiB of bf16) over 16
# warps is 16 elements per thread - four 16-byte vector loads of bf16 - and the few fp32
# temporaries per element stay in registers. A 152k vocabulary is 19 chunks, so the
# per-chunk block reductions (max, two sums) are amortised over 8192 elements. Smaller
# vocabularies get a chunk of next_pow2(V) and proportionally fewer warps.
GPU_BLOCK_V = 8192
ELEMENTS_PER_THREAD = 16
MAX_NUM_WARPS = 16
# Interpreter: every tl op is a numpy call per program, so a small chunk keeps the tests'
# small vocabularies (tens of entries) spread over several chunks at little cost.
INTERPRET_BLOCK_V = 64

# Globals read inside @triton.jit functions must be constexpr.
IGNORE_INDEX = tl.constexpr(-100)
_LOG2E = tl.constexpr(math.log2(math.e))
_LN2 = tl.constexpr(math.log(2.0))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _keep_row(y_ptr, valid_ptr, row, V, HAS_VALID: tl.constexpr):
    """(target, whether the row counts). A target outside [0, V) (only possible with the
    data checks off) drops its row rather than read outside it."""
    y = tl.load(y_ptr + row)
    keep = (y != IGNORE_INDEX) & (y >= 0) & (y < V)
    if HAS_VALID:
        keep = keep & (tl.load(valid_ptr + row) != 0)
    return y, keep


@triton.jit
def _row_forward(z_row, y, V, inv_tau, BLOCK_V: tl.constexpr, ACC: tl.constexpr):
    """(m, log_norm, entropy, logp of target y) of the row at ``z_row``, in ACC: m the
    max raw logit and log_norm = ln sum exp((z - m) / tau), the backward's stats.

    Shared by the log-prob kernel and the fused loss kernel (triton/loss.py).
    """
    # Constants built in ACC: a Python float literal would be rounded to fp32 first.
    ln2 = tl.full([], _LN2, ACC)
    # d = (z - m) * c; c is formed exactly as in _row_backward, so both passes see
    # bit-identical exponents.
    c = tl.full([], _LOG2E, ACC) * inv_tau
    m = tl.full([], float("-inf"), ACC)
    s_sum = tl.full([], 0.0, ACC)
    w_sum = tl.full([], 0.0, ACC)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        # Padding lanes read as -inf: they add exactly 0 below, like a -inf logit.
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # While every logit so far is -inf, shift by 0 instead (-inf - -inf is NaN).
        shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        d = (z - shift) * c
        e = tl.exp2(d)
        # W's weights were measured from the old max: re-measure from the new one.
        # S == 0 means m is still -inf; pick m = shift there so no inf * 0 appears
        # (alpha is then 1, times S = W = 0).
        dm = (tl.where(s_sum > 0, m, shift) - shift) * c
        alpha = tl.exp2(dm)
        w_sum = alpha * (w_sum + dm * s_sum)
        s_sum = alpha * s_sum + tl.sum(e, axis=0)
        # e == 0 exactly when d is -inf (or underflows): its term is 0, not 0 * inf.
        w_sum += tl.sum(e * tl.where(e > 0, d, 0.0), axis=0)
        m = m_new
    # The max lane contributes exactly 2^0 = 1 and every d <= 0, so S >= 1, W <= 0
    # and z_y <= m (same load): H >= 0 and logp <= 0 hold by construction.
    # The clamps only make the contract's ranges explicit; they cost nothing per logit.
    # They keep NaN (a NaN logit poisons its row, as in the spec): tl.minimum/maximum
    # drop it by default. A row of only -inf logits (S = 0) has entropy 0 and logp NaN.
    log2_s = tl.log2(s_sum)
    z_y = tl.load(z_row + y).to(ACC)
    ent = tl.maximum((log2_s - w_sum / s_sum) * ln2, 0.0, propagate_nan=tl.PropagateNan.ALL)
    ent = tl.where(s_sum == 0, 0.0, ent)
    logp = (z_y - tl.where(m > float("-inf"), m, 0.0)) * c - log2_s
    logp = tl.minimum(logp * ln2, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return m, log2_s * ln2, ent, logp


@triton.jit
def _row_backward(
    z_row, out_row, y, V, inv_tau, m, log_norm, ent, g_lp, g_h,
    HAS_GH: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    """Writes d/dz of (g_lp logp + g_h H) for the row at ``z_row`` into ``out_row``, from
    the forward's stats (m, log_norm) (ent and g_h are not read without HAS_GH).

    Every chunk is loaded into registers before this program stores that chunk's
    gradient, and nothing else is read after, so ``out_row`` may be ``z_row``.
    """
    log2e = tl.full([], _LOG2E, ACC)
    c = log2e * inv_tau
    # The forward's shift: the max, or 0 where it is -inf (a row of -inf logits, whose
    # gradient is NaN as its logp is).
    shift = tl.where(m > float("-inf"), m, 0.0)
    norm2 = log_norm * log2e
    # dz = a onehot + p (b (E_t - t) - a), everything in base-2 units t = (z - m) c,
    # measured from the max as in the forward: a = g_lp / tau,  b = g_H ln2 / tau,
    # E_t = (log_norm - H) log2(e).
    a = g_lp * inv_tau
    if HAS_GH:
        b = g_h * inv_tau * tl.full([], _LN2, ACC)
        e_t = (log_norm - ent) * log2e
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < V
        z = tl.load(z_row + cols, mask=inside, other=float("-inf")).to(ACC)
        t = (z - shift) * c
        p = tl.exp2(t - norm2)
        if HAS_GH:
            # Where p == 0 (t = -inf) the entropy term is 0; replacing t by E_t
            # there keeps (E_t - t) finite, so no 0 * inf is ever formed.
            t_safe = tl.where(p > 0, t, e_t)
            g = p * (b * (e_t - t_safe) - a)
        else:
            g = -a * p
        g = tl.where(cols == y, g + a, g)
        tl.store(out_row + cols, g.to(out_row.dtype.element_ty), mask=inside)


@triton.jit
def _row_zero(out_row, V, BLOCK_V: tl.constexpr):
    """Zeros over an ignored row: still written, ``out`` is usually fresh torch.empty."""
    zeros = tl.zeros([BLOCK_V], dtype=out_row.dtype.element_ty)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        tl.store(out_row + cols, zeros, mask=cols < V)


@triton.jit
def _token_logprobs_fwd_kernel(
    z_ptr, stride_z, y_ptr, valid_ptr, tau_ptr, logp_ptr, ent_ptr, stats_ptr, V,
    HAS_VALID: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 before multiplying by the row stride
    y, keep = _keep_row(y_ptr, valid_ptr, row, V, HAS_VALID)
    zero = tl.full([], 0.0, ACC)
    logp = zero
    ent = zero
    m = zero
    log_norm = zero
    if keep:
        inv_tau = 1.0 / tl.load(tau_ptr)
        m, log_norm, ent, logp = _row_forward(
            z_ptr + row * stride_z, y, V, inv_tau, BLOCK_V, ACC
        )
    tl.store(logp_ptr + row, logp)
    tl.store(ent_ptr + row, ent)
    tl.store(stats_ptr + 2 * row, m)
    tl.store(stats_ptr + 2 * row + 1, log_norm)


@triton.jit
def _token_logprobs_bwd_kernel(
    gl_ptr, gh_ptr, z_ptr, stride_z, y_ptr, valid_ptr, stats_ptr, ent_ptr, tau_ptr,
    out_ptr, stride_out, V,
    HAS_VALID: tl.constexpr, HAS_GH: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y, keep = _keep_row(y_ptr, valid_ptr, row, V, HAS_VALID)
    out_row = out_ptr + row * stride_out
    if keep:
        zero = tl.full([], 0.0, ACC)
        ent = zero
        g_h = zero
        if HAS_GH:
            ent = tl.load(ent_ptr + row)
            g_h = tl.load(gh_ptr + row)
        _row_backward(
            z_ptr + row * stride_z, out_row, y, V, 1.0 / tl.load(tau_ptr),
            tl.load(stats_ptr + 2 * row), tl.load(stats_ptr + 2 * row + 1), ent,
            tl.load(gl_ptr + row), g_h, HAS_GH, BLOCK_V, ACC,
        )
    else:
        _row_zero(out_row, V, BLOCK_V)


# --------------------------------------------------------------------------------------
# Host side


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_params(
    vocab: int,
    block_v: int | None,
    *,
    gpu_block_v: int | None = None,
    interpret_block_v: int | None = None,
) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of ``vocab`` logits; other row-streaming kernels
    pass their own default chunk widths (None: this module's, read at call time)."""
    if block_v is None:
        if _interpreting():
            block_v = INTERPRET_BLOCK_V if interpret_block_v is None else interpret_block_v
        else:
            block_v = GPU_BLOCK_V if gpu_block_v is None else gpu_block_v
        # A chunk wider than the row would only be padding.
        block_v = min(block_v, triton.next_power_of_2(vocab))
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    num_warps = max(1, min(MAX_NUM_WARPS, block_v // (32 * ELEMENTS_PER_THREAD)))
    return block_v, num_warps


def _check_rows(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2 or (x.stride(1) != 1 and x.shape[1] > 1):
        raise ValueError(f"{name} must be (N, V) with a contiguous last dimension")


def _row_args(targets, valid, n, device):
    targets = targets.to(device=device, dtype=torch.int64).contiguous()
    if valid is not None:
        valid = valid.to(device=device)
        valid = (valid if valid.dtype == torch.bool else valid != 0).contiguous()
    if targets.shape != (n,) or (valid is not None and valid.shape != (n,)):
        raise ValueError(f"targets and valid must have shape ({n},)")
    return targets, valid


def token_logprobs_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor | None,
    temperature: float,
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel contract of :func:`vapo_kernels.ops.token_logprobs.reference_forward`.

    ``block_v`` (a power of two) overrides the chunk width; tests use it to put chunk
    boundaries inside small vocabularies.
    """
    _check_rows("logits", logits)
    n, vocab = logits.shape
    device = logits.device
    acc = _acc_dtype(logits.dtype)
    logp = torch.empty(n, dtype=acc, device=device)
    entropy = torch.empty(n, dtype=acc, device=device)
    stats = torch.empty(n, 2, dtype=acc, device=device)
    if n == 0:  # a 0-program grid is invalid
        return logp, entropy, stats
    targets, valid = _row_args(targets, valid, n, device)
    # Temperature as a tensor of the accumulation dtype: a Python float kernel argument
    # would be passed as fp32 and round tau for fp64 logits. torch.full is a fill kernel
    # on the stream, not a host-to-device copy (which would synchronise).
    tau = torch.full((1,), float(temperature), dtype=acc, device=device)
    block, num_warps = _launch_params(vocab, block_v)
    _token_logprobs_fwd_kernel[(n,)](
        logits, logits.stride(0), targets, valid if valid is not None else targets, tau,
        logp, entropy, stats, vocab,
        HAS_VALID=valid is not None, BLOCK_V=block,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, num_warps=num_warps,
    )
    return logp, entropy, stats


def token_logprobs_bwd(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor | None,
    stats: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    out: torch.Tensor,
    *,
    block_v: int | None = None,
) -> None:
    """The kernel contract of :func:`vapo_kernels.ops.token_logprobs.reference_backward`.

    Writes dL/dlogits into ``out`` (N, V), which may be ``logits`` itself.
    """
    _check_rows("logits", logits)
    _check_rows("out", out)
    n, vocab = logits.shape
    if out.shape != logits.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, logits {tuple(logits.shape)}")
    if n == 0 or vocab == 0:
        return
    device = logits.device
    acc = _acc_dtype(logits.dtype)
    targets, valid = _row_args(targets, valid, n, device)
    def vec(x, *shape):
        return x.to(device=device, dtype=acc).reshape(n, *shape).contiguous()

    grad_logp, stats, entropy = vec(grad_logp), vec(stats, 2), vec(entropy)
    has_gh = grad_entropy is not None
    grad_entropy = vec(grad_entropy) if has_gh else grad_logp  # never read without HAS_GH
    tau = torch.full((1,), float(temperature), dtype=acc, device=device)
    block, num_warps = _launch_params(vocab, block_v)
    _token_logprobs_bwd_kernel[(n,)](
        grad_logp, grad_entropy, logits, logits.stride(0), targets,
        valid if valid is not None else targets, stats, entropy, tau,
        out, out.stride(0), vocab,
        HAS_VALID=valid is not None, HAS_GH=has_gh, BLOCK_V=block,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, num_warps=num_warps,
    )
