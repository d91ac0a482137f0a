r"""Fused LM head + log-probs in Triton: the ``triton`` backend of ``vapo::linear_logprobs``.

Implements the kernel contract of :func:`vapo_kernels.ops.linear_logprobs.reference_linear_forward`
and :func:`~vapo_kernels.ops.linear_logprobs.reference_linear_backward`; the maths (online
(max, denominator, centred moment) state, merge rule, dz) is the comment that opens the
"Fused linear log-probs" docstring of :mod:`vapo_kernels.ops.linear_logprobs`. The CPU path of
that op is its PyTorch reference (a CPU GEMM is already the right tool; there is no C++
kernel); these kernels run on CUDA tensors, and on CPU tensors only under
``TRITON_INTERPRET=1`` (the tests).

Three kernels, 1-D grids, int64 offsets, no atomics (results are deterministic):

* ``_fwd_kernel``: one program per BLOCK_N rows walks the vocabulary in BLOCK_V tiles.
  A tile of logits is a GEMM over H in BLOCK_K steps (``tl.dot``, fp32 accumulation);
  the per-row state (m, den, mom) and the target logit live in registers, m and the
  target as raw logits, den and mom measured from m in z / tau. Writes the state; the op
  finishes (and, vocabulary-parallel, first merges across ranks).
* ``_bwd_hidden_kernel`` (A): one program per BLOCK_N rows walks the vocabulary again,
  recomputes each tile, forms dz and adds ``dz @ W_tile`` to its rows of grad_hidden.
* ``_bwd_weight_kernel`` (B): one program per BLOCK_V vocabulary rows walks the row
  blocks, recomputes each tile, forms dz and adds ``dz^T @ hidden_block`` to its rows of
  grad_weight; grad_bias (a sum over rows) stays in registers.

A program's accumulator row (BLOCK_N or BLOCK_V rows by all of H) does not fit in
registers for H in the thousands, so A and B keep it in an fp32 buffer in global memory
that only that program touches (read-modify-write once per tile and BLOCK_K slice). That
costs 8 H bytes per accumulator row per tile on top of the GEMM traffic, so each kernel
uses wide tiles along the dimension it sums over (see GPU_BWD_*_BLOCKS). If that traffic
still dominates on the GPU, the way out is the chunked one: write dz for a row chunk to
memory (chunk x V) and hand both GEMMs to cuBLAS, trading memory for speed.

Cost: forward 2 N H V FLOP; backward 8 N H V (each kernel recomputes the logits: 2 + 2
for A, 2 + 2 for B), against 6 N H V for a backward sharing one recompute.

Rows that are ignored are never loaded (masked loads read 0 instead of whatever the
buffer holds) and get dz = 0; a row block with no valid row skips all its tiles.

Both passes measure a logit from its row's max as ``(z - m) / tau`` (the op's stats
carry m and log_norm to the backward): a dominant logit then has p = 1 exactly, and
rows of logits ~1e4 keep their differences. That needs the backward's tile to equal the
forward's at the max, bit for bit: all three kernels build a logit with the same
``_logits_tile`` (the same BLOCK_K steps over H, in the same order); the GEMM tile
shapes differ between kernels on a GPU, and whether ``tl.dot`` then rounds an element
the same way is for the device check to confirm.

Precision: fp32 inputs use ``input_precision="ieee"`` (TF32 would round the logits to
10 mantissa bits); bf16/fp16 inputs feed the tensor cores as they are, products exact
in fp32. In the backward dz is rounded to the input dtype for the second GEMM, as the
materialised path rounds its dlogits to the logits' dtype; the sums stay fp32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Launch parameters (kept next to the kernels).
# GPU (H100, not yet run on a device - guesses to tune): a 64 x 128 fp32 logits tile over
# 8 warps is 32 registers per thread; BLOCK_K = 64 bf16 gives 64 x 64 and 128 x 64 operand
# tiles (8 + 16 KiB) per pipeline stage, 3 stages in shared memory. fp64 halves the
# vocabulary tile to keep the same register footprint.
GPU_BLOCK_N = 64
GPU_BLOCK_V = 128
GPU_BLOCK_K = 64
GPU_NUM_WARPS = 8
GPU_NUM_STAGES = 3
# Backward: a kernel does 4 x BLOCK_N x BLOCK_V x H FLOP per tile against 8 x H bytes of
# accumulator traffic per accumulated row, i.e. BLOCK_V / 2 FLOP per byte in kernel A and
# BLOCK_N / 2 in kernel B. Their accumulators (1-2 MiB per program at H = 4096) do not
# stay in L2, and an H100 needs ~260 FLOP per DRAM byte, so the dimension each kernel
# sums over is made wider there and the other narrower, keeping the 16k-entry tile:
# (BLOCK_N, BLOCK_V) = (64, 256) for A, (256, 64) for B.
GPU_BWD_HIDDEN_BLOCKS = (64, 256)
GPU_BWD_WEIGHT_BLOCKS = (256, 64)
# Interpreter: tl.dot needs every dimension >= 16; the smallest legal tiles let small
# test shapes cross row, vocabulary and H tile boundaries.
INTERPRET_BLOCK = 16


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------
# Shared pieces


@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST: the interpreter hands bf16 operands to numpy as raw uint16
    bits, so there they are widened first (exact: a bf16 value is an fp32 value).
    out_dtype is acc's (fp64 for fp64 inputs): triton 3.6, the GPU machines' version,
    asserts that it matches instead of taking it from acc."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    else:
        return tl.dot(a, b, acc, out_dtype=acc.dtype)


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    """z = hidden[rows] @ weight[cols].T + bias[cols], (BLOCK_N, BLOCK_V) in ACC: the raw
    logits, before the temperature.

    Rows or columns outside the masks read 0 (never the buffer's contents)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), ACC)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_ok = k < H
        h = tl.load(
            h_ptr + rows[:, None] * stride_h + k[None, :],
            mask=row_ok[:, None] & k_ok[None, :], other=0.0,
        )
        # weight is (V, H): its (BLOCK_K, BLOCK_V) transposed tile, contiguous along k.
        w = tl.load(
            w_ptr + cols[None, :] * stride_w + k[:, None],
            mask=col_ok[None, :] & k_ok[:, None], other=0.0,
        )
        acc = _mm(h, w, acc, IEEE, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    return acc


@triton.jit
def _row_block(y_ptr, valid_ptr, rows, N):
    in_range = rows < N
    valid = tl.load(valid_ptr + rows, mask=in_range, other=0) != 0
    y = tl.load(y_ptr + rows, mask=valid, other=-1)
    any_valid = tl.max(valid.to(tl.int32), axis=0)
    return valid, y, any_valid


@triton.jit
def _row_grads(glp_ptr, gent_ptr, stats_ptr, ent_ptr, rows, valid, HAS_GENT: tl.constexpr):
    """Per row: upstream gradients, the shift (row max m, or 0 where m is +-inf: inf - inf
    would be NaN), log_norm and the entropy; stats is (N, 2) = (m, log_norm)."""
    g_lp = tl.load(glp_ptr + rows, mask=valid, other=0.0)
    m = tl.load(stats_ptr + 2 * rows, mask=valid, other=0.0)
    log_norm = tl.load(stats_ptr + 2 * rows + 1, mask=valid, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=valid, other=0.0)
    if HAS_GENT:
        g_ent = tl.load(gent_ptr + rows, mask=valid, other=0.0)
    else:
        g_ent = tl.zeros_like(g_lp)
    shift = tl.where((m > float("-inf")) & (m < float("inf")), m, 0.0)
    return g_lp, g_ent, shift, log_norm, ent


@triton.jit
def _dz_tile(
    z, inv_tau, cols, col_ok, y, valid, g_lp, g_ent, shift, log_norm, ent,
    HAS_GENT: tl.constexpr,
):
    """dL/dz for one tile of raw logits z; 0 off the valid rows and the real columns."""
    # u = log p measured from the row max, as the forward measured it: exactly 0 at a
    # dominant logit (p = 1), where z * inv_tau - lse would be off by ~ulp(z / tau).
    u = (z - shift[:, None]) * inv_tau - log_norm[:, None]
    p = tl.exp(u)
    dz = tl.where(cols[None, :] == y[:, None], g_lp[:, None], 0.0) - g_lp[:, None] * p
    if HAS_GENT:
        # p (H + u), with 0 where p = 0 (u = -inf would give 0 * -inf = NaN)
        dz -= g_ent[:, None] * p * tl.where(p > 0.0, ent[:, None] + u, 0.0)
    return tl.where(valid[:, None] & col_ok[None, :], dz * inv_tau, 0.0)


# --------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _fwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, valid_ptr, tau_ptr, m_ptr, den_ptr, mom_ptr, t_ptr,
    N, V, H, stride_h, stride_w,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid, y, any_valid = _row_block(y_ptr, valid_ptr, rows, N)
    inv_tau = 1.0 / tl.load(tau_ptr)
    m = tl.full((BLOCK_N,), float("-inf"), ACC)
    den = tl.zeros((BLOCK_N,), ACC)
    mom = tl.zeros((BLOCK_N,), ACC)
    t = tl.zeros((BLOCK_N,), ACC)
    offs_v = tl.arange(0, BLOCK_V).to(tl.int64)
    for i in range(tl.cdiv(V, BLOCK_V) * any_valid):  # no tiles for an all-ignored block
        cols = i * BLOCK_V + offs_v
        col_ok = cols < V
        z = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, valid, cols, col_ok, H, stride_h, stride_w,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, ACC, IEEE, UPCAST,
        )
        z = tl.where(col_ok[None, :], z, float("-inf"))
        # The target's tile adds its logit; every other tile adds exactly 0. A local
        # target >= V (owned by a later rank) must not match a padding column.
        hit = (cols[None, :] == y[:, None]) & col_ok[None, :]
        t += tl.sum(tl.where(hit, z, 0.0), axis=1)
        # Online merge of this tile into (m, den, mom); see the op's section comment.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: no NaN
        c = (m - shift) * inv_tau  # the old max measured from the new one, <= 0
        alpha = tl.exp(c)
        d = (z - shift[:, None]) * inv_tau
        p = tl.exp(d)
        # The where()s pick the factor, not the product, so no branch ever forms
        # 0 * -inf (m = -inf while den = 0; d = -inf where p = 0).
        carry = tl.where(den > 0.0, c, 0.0) * den
        den = alpha * den + tl.sum(p, axis=1)
        mom = alpha * (mom + carry) + tl.sum(p * tl.where(p > 0.0, d, 0.0), axis=1)
        m = m_new
    in_range = rows < N
    tl.store(m_ptr + rows, tl.where(valid, m, 0.0), mask=in_range)
    tl.store(den_ptr + rows, tl.where(valid, den, 0.0), mask=in_range)
    tl.store(mom_ptr + rows, tl.where(valid, mom, 0.0), mask=in_range)
    tl.store(t_ptr + rows, tl.where(valid, t, 0.0), mask=in_range)


@triton.jit
def _bwd_hidden_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, valid_ptr, tau_ptr, glp_ptr, gent_ptr, stats_ptr, ent_ptr,
    gh_ptr, N, V, H, stride_h, stride_w,
    HAS_BIAS: tl.constexpr, HAS_GENT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Kernel A: grad_hidden[rows] (fp32 buffer, zeroed by the host) += dz @ W."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid, y, any_valid = _row_block(y_ptr, valid_ptr, rows, N)
    g_lp, g_ent, shift, log_norm, ent = _row_grads(
        glp_ptr, gent_ptr, stats_ptr, ent_ptr, rows, valid, HAS_GENT
    )
    inv_tau = 1.0 / tl.load(tau_ptr)
    offs_v = tl.arange(0, BLOCK_V).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    for i in range(tl.cdiv(V, BLOCK_V) * any_valid):
        cols = i * BLOCK_V + offs_v
        col_ok = cols < V
        z = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, valid, cols, col_ok, H, stride_h, stride_w,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, ACC, IEEE, UPCAST,
        )
        dz = _dz_tile(
            z, inv_tau, cols, col_ok, y, valid, g_lp, g_ent, shift, log_norm, ent, HAS_GENT
        )
        dz = dz.to(w_ptr.dtype.element_ty)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + ks
            k_ok = k < H
            w = tl.load(
                w_ptr + cols[:, None] * stride_w + k[None, :],
                mask=col_ok[:, None] & k_ok[None, :], other=0.0,
            )
            # Ignored rows have dz = 0: their accumulator is neither read nor written.
            io = valid[:, None] & k_ok[None, :]
            ptrs = gh_ptr + rows[:, None] * H + k[None, :]
            acc = tl.load(ptrs, mask=io, other=0.0)
            tl.store(ptrs, _mm(dz, w, acc, IEEE, UPCAST), mask=io)


@triton.jit
def _bwd_weight_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, valid_ptr, tau_ptr, glp_ptr, gent_ptr, stats_ptr, ent_ptr,
    gw_ptr, gb_ptr, N, V, H, stride_h, stride_w,
    HAS_BIAS: tl.constexpr, HAS_GENT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Kernel B: grad_weight[cols] (fp32 buffer, zeroed by the host) += dz^T @ hidden,
    grad_bias[cols] = sum over rows of dz."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    inv_tau = 1.0 / tl.load(tau_ptr)
    gb = tl.zeros((BLOCK_V,), ACC)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    for j in range(tl.cdiv(N, BLOCK_N)):
        rows = j * BLOCK_N + offs_n
        valid, y, any_valid = _row_block(y_ptr, valid_ptr, rows, N)
        if any_valid > 0:
            g_lp, g_ent, shift, log_norm, ent = _row_grads(
                glp_ptr, gent_ptr, stats_ptr, ent_ptr, rows, valid, HAS_GENT
            )
            z = _logits_tile(
                h_ptr, w_ptr, b_ptr, rows, valid, cols, col_ok, H, stride_h, stride_w,
                HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, ACC, IEEE, UPCAST,
            )
            dz = _dz_tile(
                z, inv_tau, cols, col_ok, y, valid, g_lp, g_ent, shift, log_norm, ent,
                HAS_GENT,
            )
            gb += tl.sum(dz, axis=0)
            dz_t = tl.trans(dz.to(h_ptr.dtype.element_ty))
            for k0 in range(0, H, BLOCK_K):
                k = k0 + ks
                k_ok = k < H
                h = tl.load(
                    h_ptr + rows[:, None] * stride_h + k[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0,
                )
                io = col_ok[:, None] & k_ok[None, :]
                ptrs = gw_ptr + cols[:, None] * H + k[None, :]
                acc = tl.load(ptrs, mask=io, other=0.0)
                tl.store(ptrs, _mm(dz_t, h, acc, IEEE, UPCAST), mask=io)
    if HAS_BIAS:
        tl.store(gb_ptr + cols, gb, mask=col_ok)


# --------------------------------------------------------------------------------------
# Host side


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _meta(dtype: torch.dtype, block_n, block_v, block_k, kernel: str = "fwd") -> dict:
    interp = _interpreting()
    fp64 = dtype == torch.float64
    gpu_n, gpu_v = {
        "bwd_hidden": GPU_BWD_HIDDEN_BLOCKS, "bwd_weight": GPU_BWD_WEIGHT_BLOCKS
    }.get(kernel, (GPU_BLOCK_N, GPU_BLOCK_V))
    if fp64:  # 8-byte tiles: halved to stay within an H100 block's 227 KiB of shared memory
        gpu_v //= 2  # (bwd_weight's pipelined 256-row hidden tile alone took 3 x 128 KiB)
        gpu_n //= 2 if kernel == "bwd_weight" else 1
    meta = {
        "BLOCK_N": block_n or (INTERPRET_BLOCK if interp else gpu_n),
        "BLOCK_V": block_v or (INTERPRET_BLOCK if interp else gpu_v),
        "BLOCK_K": block_k or (INTERPRET_BLOCK if interp else GPU_BLOCK_K),
        "ACC": tl.float64 if fp64 else tl.float32,
        "IEEE": dtype in (torch.float32, torch.float64),
        "UPCAST": interp and dtype == torch.bfloat16,
    }
    for name in ("BLOCK_N", "BLOCK_V", "BLOCK_K"):
        size = meta[name]
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {size}")
    if not interp:
        meta.update(num_warps=GPU_NUM_WARPS, num_stages=GPU_NUM_STAGES)
    return meta


def _operands(hidden, weight, bias, targets, valid, temperature):
    # Kernels index rows by stride and columns contiguously; a copy here is of hidden or
    # weight (N x H, V x H), never of logits, and the op already passes such layouts.
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    # A tensor, not a Python float: a float argument is passed as fp32, which would round
    # the temperature for fp64 inputs.
    tau = torch.full((1,), float(temperature), dtype=_acc_dtype(hidden.dtype), device=hidden.device)
    # The row mask as int32, not bool: a bool mask in the dot operands' load masks made
    # triton 3.6 refuse every fp64 kernel for sm_90 (fp64 MMA "largeK" assertion).
    return hidden, weight, bias, targets.contiguous(), valid.to(torch.int32), tau


def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
    *,
    block_n: int | None = None,
    block_v: int | None = None,
    block_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel contract of :func:`vapo_kernels.ops.linear_logprobs.reference_linear_forward`.

    ``block_*`` override the tile sizes (powers of two >= 16); tests use them to put
    tile boundaries inside small shapes.
    """
    n, dim = hidden.shape
    vocab = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    state = tuple(torch.empty(n, dtype=acc, device=hidden.device) for _ in range(4))
    if n == 0:  # a 0-program grid is invalid
        return state
    hidden, weight, bias, targets, valid, tau = _operands(
        hidden, weight, bias, targets, valid, temperature
    )
    meta = _meta(hidden.dtype, block_n, block_v, block_k)
    grid = (triton.cdiv(n, meta["BLOCK_N"]),)
    _fwd_kernel[grid](
        hidden, weight, bias if bias is not None else tau, targets, valid, tau, *state,
        n, vocab, dim, hidden.stride(0), weight.stride(0),
        HAS_BIAS=bias is not None, **meta,
    )
    return state


def linear_logprobs_bwd(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    valid: torch.Tensor,
    stats: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    need_hidden: bool,
    need_weight: bool,
    *,
    block_n: int | None = None,
    block_v: int | None = None,
    block_k: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The kernel contract of :func:`vapo_kernels.ops.linear_logprobs.reference_linear_backward`."""
    n, dim = hidden.shape
    vocab = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    device = hidden.device
    hidden, weight, bias, targets, valid, tau = _operands(
        hidden, weight, bias, targets, valid, temperature
    )
    # Absent optional inputs get a placeholder pointer; HAS_* keeps the kernels off them.
    g_ent = grad_logp if grad_entropy is None else grad_entropy.contiguous()
    common = (
        hidden, weight, tau if bias is None else bias, targets, valid, tau,
        grad_logp.contiguous(), g_ent, stats.reshape(n, 2).contiguous(), entropy.contiguous(),
    )
    flags = {"HAS_BIAS": bias is not None, "HAS_GENT": grad_entropy is not None}

    grad_hidden = grad_weight = grad_bias = None
    if need_hidden:
        # Zeroed: rows of all-ignored blocks are never written, and the kernel adds.
        grad_hidden = torch.zeros(n, dim, dtype=acc, device=device)
        if n:
            meta = _meta(hidden.dtype, block_n, block_v, block_k, "bwd_hidden")
            grid = (triton.cdiv(n, meta["BLOCK_N"]),)
            _bwd_hidden_kernel[grid](
                *common, grad_hidden, n, vocab, dim, hidden.stride(0), weight.stride(0),
                **flags, **meta,
            )
    if need_weight:
        gw = torch.zeros(vocab, dim, dtype=acc, device=device)
        gb = torch.zeros(vocab, dtype=acc, device=device) if bias is not None else tau
        meta = _meta(hidden.dtype, block_n, block_v, block_k, "bwd_weight")
        grid = (triton.cdiv(vocab, meta["BLOCK_V"]),)
        _bwd_weight_kernel[grid](
            *common, gw, gb, n, vocab, dim, hidden.stride(0), weight.stride(0),
            **flags, **meta,
        )
        grad_weight = gw.to(weight.dtype)  # no copy for fp32 weights
        grad_bias = gb.to(bias.dtype) if bias is not None else None
    return grad_hidden, grad_weight, grad_bias
