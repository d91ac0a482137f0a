r"""GAE as a chunked reverse scan in Triton: the ``triton`` backend of ``vapo::gae``.

Implements the kernel contract of :func:`vapo_kernels.ops.gae.reference_kernel` (the
maths and the two mask modes are in the docstring of :mod:`vapo_kernels.ops.gae`).

Every recurrence is first order, ``y_t = g_t * y_{t+1} + u_t``, so a block of tokens is
one ``tl.associative_scan(reverse=True)`` over (g, u) pairs whose result is affine in the
carry entering from the right: ``y_t = G_t * carry + U_t``. Per token, m the mask:

* next valid value  ``E_t = (1 - m_{t+1}) E_{t+1} + m_{t+1} V_{t+1}`` in "skip" mode (the
  shifted mask and values are loaded at t+1, so no in-register shift is needed); in
  "zero" mode and without a mask simply ``E_t = m_{t+1} V_{t+1}``, no scan.
* ``delta_t = r_t + gamma E_t - V_t`` (r, V zeroed on masked tokens in "zero" mode).
* ``A_t = c_p A_{t+1} + delta_t`` on stepping tokens; masked tokens in "skip" mode have
  gate 1 and input 0, so they report the carried advantage. ``C_t`` likewise with c_c,
  and returns are ``C_t + V_t``.

Masked slots only ever reach the arithmetic through ``tl.where`` (never a multiply by
the mask), so NaN or 1e30 stored there cannot change a valid output.

Two launch plans:

* ``_gae_seq_kernel``: one program per sequence walks its tokens from the end in BLOCK
  chunks, carrying (E, A, C) between chunks. Used when there are many sequences.
* few long sequences: each sequence is cut into NSEG segments (whole chunks).
  ``_gae_summary_kernel`` computes per segment the affine map from the carry entering
  at its right end to the carry leaving at its left end (E feeds delta, so the A and C
  maps have an E term). ``_gae_segment_kernel`` composes the maps of the segments to
  its right (a scan over NSEG entries, in registers) to get its true carry-in, then
  rescans its tokens and writes the outputs. Two launches; every SM gets work.

Accumulation is in the output dtype: float32, or float64 for float64 inputs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Launch parameters (kept next to the kernels).
# GPU (not yet tuned on a device): 1024 tokens per chunk over 4 warps is 8 tokens per
# thread, so each scan does 8 serial steps in registers before the cross-thread phase,
# and ~20 values live per token stay within the register file; a 128k-token sequence is
# 128 chunk iterations when walked by one program.
GPU_BLOCK = 1024
GPU_NUM_WARPS = 4
# Interpreter: tl.associative_scan is a Python loop over every lane, padding included,
# so small chunks waste less time on sequences shorter than a chunk.
INTERPRET_BLOCK = 32
# Two-phase plan (a guess to be tuned on a GPU): used when there are fewer than
# SEQS_PER_SM_SINGLE programs per SM, aiming at TARGET_PROGRAMS_PER_SM programs per SM so
# the serial chunk walks overlap their memory latency, with segments of at least
# MIN_CHUNKS_PER_SEGMENT chunks. At most MAX_SEGMENTS per sequence: every segment program
# reloads and scans the 8-number summaries of all segments of its sequence.
SEQS_PER_SM_SINGLE = 4
TARGET_PROGRAMS_PER_SM = 8
MIN_CHUNKS_PER_SEGMENT = 2
MAX_SEGMENTS = 512


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------
# Combine functions. A reverse scan calls combine(accumulated later tokens, this token),
# so the later map is applied first: y = g_cur * (g_later * y_in + u_later) + u_cur.


@triton.jit
def _affine(g_later, u_later, g_cur, u_cur):
    return g_later * g_cur, u_later * g_cur + u_cur


@triton.jit
def _affine_two_inputs(g_later, u_later, k_later, g_cur, u_cur, k_cur):
    # Two inputs through one gate: the constant part of delta and its E_in coefficient.
    return g_later * g_cur, u_later * g_cur + u_cur, k_later * g_cur + k_cur


@triton.jit
def _compose_segments(
    eg1, eb1, pa1, pk1, pb1, ca1, ck1, cb1, eg2, eb2, pa2, pk2, pb2, ca2, ck2, cb2
):
    # A segment maps its carry-in (E, P, C) to  E' = eg E + eb,  P' = pa P + pk E + pb,
    # C' = ca C + ck E + cb. Segment 1 lies to the right (applied first), then segment 2.
    return (
        eg1 * eg2,
        eb1 * eg2 + eb2,
        pa1 * pa2,
        pk1 * pa2 + pk2 * eg1,
        pb1 * pa2 + pk2 * eb1 + pb2,
        ca1 * ca2,
        ck1 * ca2 + ck2 * eg1,
        cb1 * ca2 + ck2 * eb1 + cb2,
    )


@triton.jit
def _lane0(x, lane):
    # The carry leaving a chunk is the scan result of its first token.
    return tl.sum(tl.where(lane == 0, x, 0.0), axis=0)


# --------------------------------------------------------------------------------------
# Shared pieces


@triton.jit
def _chunk_terms(
    r_ptr, v_ptr, m_ptr, idx, seg_end, seq_end,
    HAS_MASK: tl.constexpr, SKIP: tl.constexpr, ACC: tl.constexpr,
):
    """Per lane of a chunk: (in_seg, step, r, v, eg, eb).

    ``step``: the A/C recurrences take a step here (else gate 1, input 0). ``v`` is what
    returns add (raw V in skip mode, zeroed V in zero mode). The next valid value is
    ``E_t = eg * E_in + eb`` with E_in the value carried in from the right of the chunk.
    """
    in_seg = idx < seg_end
    # t + 1 is read across chunk and segment ends (it is another program's token, read
    # only); it is out of range only past the end of the sequence.
    nxt = idx + 1
    nxt_in = nxt < seq_end
    r = tl.load(r_ptr + idx, mask=in_seg, other=0.0).to(ACC)
    v = tl.load(v_ptr + idx, mask=in_seg, other=0.0).to(ACC)
    v_next = tl.load(v_ptr + nxt, mask=nxt_in, other=0.0).to(ACC)
    if HAS_MASK:
        valid = in_seg & (tl.load(m_ptr + idx, mask=in_seg, other=0) != 0)
        valid_next = nxt_in & (tl.load(m_ptr + nxt, mask=nxt_in, other=0) != 0)
    else:
        valid = in_seg
        valid_next = nxt_in
    if HAS_MASK and SKIP:
        # Last-valid selection as a scan: a valid t+1 resets E to V_{t+1} (gate 0), a
        # masked or absent one passes E_{t+1} through (gate 1). Lanes past the end of
        # the sequence are identities (gate 1, input 0).
        g_e = tl.where(valid_next, 0.0, 1.0).to(ACC)
        u_e = tl.where(valid_next, v_next, 0.0)
        eg, eb = tl.associative_scan((g_e, u_e), 0, _affine, reverse=True)
        step = valid
    else:
        # Zero mode: masked V and r are 0 and the recurrence runs through them.
        r = tl.where(valid, r, 0.0)
        v = tl.where(valid, v, 0.0)
        eg = tl.zeros_like(v)
        eb = tl.where(valid_next, v_next, 0.0)
        step = in_seg
    return in_seg, step, r, v, eg, eb


@triton.jit
def _scan_segment(
    r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr,
    seg_start, seg_end, seq_end, gamma, cp, cc, e, a, c,
    HAS_MASK: tl.constexpr, SKIP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """Write outputs for tokens [seg_start, seg_end), given the carries (E, A, C) that
    enter at seg_end. Chunks are aligned to seg_start, so only a chunk ending the
    sequence is partial."""
    lane = tl.arange(0, BLOCK)
    n_chunks = tl.cdiv(seg_end - seg_start, BLOCK)
    for i in range(n_chunks):
        idx = seg_start + (n_chunks - 1 - i) * BLOCK + lane
        in_seg, step, r, v, eg, eb = _chunk_terms(
            r_ptr, v_ptr, m_ptr, idx, seg_end, seq_end, HAS_MASK, SKIP, ACC
        )
        e_t = eg * e + eb
        u = tl.where(step, r + gamma * e_t - v, 0.0)
        pg, pb = tl.associative_scan((tl.where(step, cp, 1.0), u), 0, _affine, reverse=True)
        cg, cb = tl.associative_scan((tl.where(step, cc, 1.0), u), 0, _affine, reverse=True)
        adv = pg * a + pb
        crit = cg * c + cb
        tl.store(adv_ptr + idx, adv, mask=in_seg)
        tl.store(ret_ptr + idx, crit + v, mask=in_seg)
        e = _lane0(e_t, lane)
        a = _lane0(adv, lane)
        c = _lane0(crit, lane)


@triton.jit
def _seq_bounds(offs_ptr, seq, N):
    """[start, end) of sequence seq, clamped into [0, N]: with the data checks off, bad
    offsets give wrong numbers, never an access outside the token tensors."""
    start = tl.minimum(tl.maximum(tl.load(offs_ptr + seq), 0), N)
    end = tl.minimum(tl.maximum(tl.load(offs_ptr + seq + 1), start), N)
    return start, end


@triton.jit
def _segment_bounds(offs_ptr, N, seq, j, NSEG: tl.constexpr, BLOCK: tl.constexpr):
    """Segment j of sequence seq: NSEG pieces of whole chunks; trailing ones may be empty."""
    start, end = _seq_bounds(offs_ptr, seq, N)
    seg_len = tl.cdiv(tl.cdiv(end - start, NSEG), BLOCK) * BLOCK
    seg_start = tl.minimum(start + j * seg_len, end)
    seg_end = tl.minimum(seg_start + seg_len, end)
    return seg_start, seg_end, end


# --------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _gae_seq_kernel(
    r_ptr, v_ptr, m_ptr, offs_ptr, N, cp_ptr, cc_ptr, gamma_ptr, adv_ptr, ret_ptr,
    HAS_MASK: tl.constexpr, SKIP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """One program per sequence (1-D grid: any number of sequences)."""
    seq = tl.program_id(0)
    start, end = _seq_bounds(offs_ptr, seq, N)
    cp = tl.load(cp_ptr + seq)
    zero = tl.zeros_like(cp)
    _scan_segment(
        r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, start, end, end,
        tl.load(gamma_ptr), cp, tl.load(cc_ptr + seq), zero, zero, zero,
        HAS_MASK, SKIP, BLOCK, ACC,
    )


@triton.jit
def _gae_summary_kernel(
    r_ptr, v_ptr, m_ptr, offs_ptr, N, cp_ptr, cc_ptr, gamma_ptr, sum_ptr,
    HAS_MASK: tl.constexpr, SKIP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    NSEG: tl.constexpr,
):
    """Phase 1: the affine map carry_in -> carry_out of each segment, 8 numbers.

    The carry state is tracked symbolically in the segment's carry-in (E_s, P_s, C_s):
    E = eg E_s + eb, P = pa P_s + pk E_s + pb, C = ca C_s + ck E_s + cb.
    """
    pid = tl.program_id(0)
    seq = pid // NSEG
    seg_start, seg_end, seq_end = _segment_bounds(offs_ptr, N, seq, pid % NSEG, NSEG, BLOCK)
    gamma = tl.load(gamma_ptr)
    cp = tl.load(cp_ptr + seq)
    cc = tl.load(cc_ptr + seq)
    one = tl.full([], 1.0, ACC)
    zero = tl.zeros_like(one)
    eg_s, eb_s = one, zero
    pa_s, pk_s, pb_s = one, zero, zero
    ca_s, ck_s, cb_s = one, zero, zero
    lane = tl.arange(0, BLOCK)
    n_chunks = tl.cdiv(seg_end - seg_start, BLOCK)
    for i in range(n_chunks):
        idx = seg_start + (n_chunks - 1 - i) * BLOCK + lane
        _, step, r, v, eg, eb = _chunk_terms(
            r_ptr, v_ptr, m_ptr, idx, seg_end, seq_end, HAS_MASK, SKIP, ACC
        )
        # E_t = eg (eg_s E_s + eb_s) + eb: coefficient on E_s and constant part.
        e_k = eg * eg_s
        e_b = eg * eb_s + eb
        u_b = tl.where(step, r + gamma * e_b - v, 0.0)
        u_k = tl.where(step, gamma * e_k, 0.0)
        pg, pb, pk = tl.associative_scan(
            (tl.where(step, cp, 1.0), u_b, u_k), 0, _affine_two_inputs, reverse=True
        )
        cg, cb, ck = tl.associative_scan(
            (tl.where(step, cc, 1.0), u_b, u_k), 0, _affine_two_inputs, reverse=True
        )
        # P_t = pg (pa_s P_s + pk_s E_s + pb_s) + pb + pk E_s, taken at the first lane.
        pg0 = _lane0(pg, lane)
        pa_s, pk_s, pb_s = pg0 * pa_s, pg0 * pk_s + _lane0(pk, lane), pg0 * pb_s + _lane0(pb, lane)
        cg0 = _lane0(cg, lane)
        ca_s, ck_s, cb_s = cg0 * ca_s, cg0 * ck_s + _lane0(ck, lane), cg0 * cb_s + _lane0(cb, lane)
        eg_s, eb_s = _lane0(e_k, lane), _lane0(e_b, lane)
    out = sum_ptr + pid.to(tl.int64) * 8
    tl.store(out + 0, eg_s)
    tl.store(out + 1, eb_s)
    tl.store(out + 2, pa_s)
    tl.store(out + 3, pk_s)
    tl.store(out + 4, pb_s)
    tl.store(out + 5, ca_s)
    tl.store(out + 6, ck_s)
    tl.store(out + 7, cb_s)


@triton.jit
def _gae_segment_kernel(
    r_ptr, v_ptr, m_ptr, offs_ptr, N, cp_ptr, cc_ptr, gamma_ptr, sum_ptr, adv_ptr, ret_ptr,
    HAS_MASK: tl.constexpr, SKIP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    NSEG: tl.constexpr,
):
    """Phase 2: carry-in of segment j = maps of segments j+1..NSEG-1 applied to 0; rescan."""
    pid = tl.program_id(0)
    seq = pid // NSEG
    j = pid % NSEG
    seg_start, seg_end, seq_end = _segment_bounds(offs_ptr, N, seq, j, NSEG, BLOCK)
    q = tl.arange(0, NSEG)
    later = q > j  # earlier segments and this one become identity maps
    row = sum_ptr + (seq.to(tl.int64) * NSEG + q) * 8
    eg = tl.load(row + 0, mask=later, other=1.0)
    eb = tl.load(row + 1, mask=later, other=0.0)
    pa = tl.load(row + 2, mask=later, other=1.0)
    pk = tl.load(row + 3, mask=later, other=0.0)
    pb = tl.load(row + 4, mask=later, other=0.0)
    ca = tl.load(row + 5, mask=later, other=1.0)
    ck = tl.load(row + 6, mask=later, other=0.0)
    cb = tl.load(row + 7, mask=later, other=0.0)
    eg, eb, pa, pk, pb, ca, ck, cb = tl.associative_scan(
        (eg, eb, pa, pk, pb, ca, ck, cb), 0, _compose_segments, reverse=True
    )
    # Nothing enters past the end of the sequence, so the carry is the constant part.
    _scan_segment(
        r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, seg_start, seg_end, seq_end,
        tl.load(gamma_ptr), tl.load(cp_ptr + seq), tl.load(cc_ptr + seq),
        _lane0(eb, q), _lane0(pb, q), _lane0(cb, q),
        HAS_MASK, SKIP, BLOCK, ACC,
    )


# --------------------------------------------------------------------------------------
# Host side

_sm_count: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_count:
        _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_count[index]


def _auto_segments(num_seqs: int, num_tokens: int, block: int, device: torch.device) -> int:
    """Segments per sequence: 1 (one program per sequence) unless there are too few
    sequences to keep the GPU busy and they are long enough to split. Decided from
    shapes only (the mean length), so there is no device sync."""
    if device.type != "cuda":
        return 1
    sms = _num_sms(device)
    if num_seqs >= SEQS_PER_SM_SINGLE * sms:
        return 1
    mean_chunks = num_tokens // (num_seqs * block)
    want = min(triton.cdiv(TARGET_PROGRAMS_PER_SM * sms, num_seqs), mean_chunks // MIN_CHUNKS_PER_SEGMENT)
    if want < 2:
        return 1
    return min(MAX_SEGMENTS, 1 << (want.bit_length() - 1))  # a power of two, rounded down


def gae_scan(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    offsets: torch.Tensor,
    coef_policy: torch.Tensor,
    coef_critic: torch.Tensor,
    gamma: float,
    skip_masked: bool,
    *,
    block: int | None = None,
    segments: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel contract of :func:`vapo_kernels.ops.gae.reference_kernel`.

    ``block`` (tokens per chunk, a power of two) and ``segments`` (pieces per sequence,
    1 = one program per sequence, else a power of two for the two-phase plan) override
    the automatic launch plan; tests use them to exercise chunk and segment boundaries.
    """
    device = rewards.device
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    num_tokens = rewards.numel()
    num_seqs = offsets.numel() - 1
    # In the inputs' shape (the kernels index every token tensor as a flat array).
    advantages = torch.empty(rewards.shape, dtype=out_dtype, device=device)
    returns = torch.empty(rewards.shape, dtype=out_dtype, device=device)
    if num_tokens == 0 or num_seqs <= 0:  # nothing to write; a 0-program grid is invalid
        return advantages, returns

    rewards = rewards.reshape(-1).contiguous()
    values = values.reshape(-1).to(rewards.dtype).contiguous()
    if mask is not None:
        mask = mask.reshape(-1)
        mask = (mask if mask.dtype == torch.bool else mask != 0).contiguous()
    offsets = offsets.to(torch.int64).contiguous()
    coef_policy = coef_policy.to(out_dtype).contiguous()
    coef_critic = coef_critic.to(out_dtype).contiguous()
    # gamma as a tensor: a Python float kernel argument is passed as float32, which
    # would round gamma for float64 inputs.
    gamma_t = torch.full((1,), float(gamma), dtype=out_dtype, device=device)

    if block is None:
        block = INTERPRET_BLOCK if _interpreting() else GPU_BLOCK
    if segments is None:
        segments = _auto_segments(num_seqs, num_tokens, block, device)
    if block < 1 or block & (block - 1) or segments < 1 or segments & (segments - 1):
        raise ValueError(f"block and segments must be powers of two, got {block}, {segments}")

    acc = tl.float64 if out_dtype == torch.float64 else tl.float32
    flags = {"HAS_MASK": mask is not None, "SKIP": bool(skip_masked), "BLOCK": block, "ACC": acc}
    m_arg = mask if mask is not None else rewards  # never read without HAS_MASK
    common = (rewards, values, m_arg, offsets, num_tokens, coef_policy, coef_critic, gamma_t)
    if segments == 1:
        _gae_seq_kernel[(num_seqs,)](
            *common, advantages, returns, **flags, num_warps=GPU_NUM_WARPS
        )
    else:
        summaries = torch.empty(num_seqs * segments * 8, dtype=out_dtype, device=device)
        grid = (num_seqs * segments,)
        _gae_summary_kernel[grid](
            *common, summaries, **flags, NSEG=segments, num_warps=GPU_NUM_WARPS
        )
        _gae_segment_kernel[grid](
            *common, summaries, advantages, returns, **flags, NSEG=segments,
            num_warps=GPU_NUM_WARPS,
        )
    return advantages, returns
