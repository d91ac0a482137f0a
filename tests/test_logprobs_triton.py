"""Triton token log-prob kernels (``vapo_kernels.triton.logprobs``) against the float64 spec.

Without a GPU the kernels run through the Triton interpreter on CPU tensors: shapes stay
small and ``block_v=16`` puts vocabulary-chunk boundaries inside them. On a GPU the same
tests run compiled on CUDA tensors; ``-m gpu`` adds a real vocabulary (152k) and rows
beyond 2^31 elements. The public op under backend="triton" (autograd, dominant logits,
in-place backward) is checked with every other backend in test_logprobs.py.
"""

from __future__ import annotations

import math
import os

import torch

# Must precede the first import of triton (tests/conftest.py does the same).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vapo_kernels.ops.token_logprobs import reference_backward, reference_forward
from vapo_kernels.triton import logprobs as tlp

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
BLOCK = 16
# Vocabularies around chunk boundaries (BLOCK +- 1, several chunks) and the degenerate V=1.
EDGE_V = [1, 2, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 1, 4 * BLOCK - 1]
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
# Per-unit-of-scale error allowed from the accumulation dtype (~8 ulps of fp32).
ACC_RTOL = {torch.float32: 1e-6, torch.float64: 1e-13}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# Cases


@st.composite
def cases(draw):
    return {
        "n": draw(st.integers(1, 6)),
        "vocab": draw(st.one_of(st.sampled_from(EDGE_V), st.integers(1, 5 * BLOCK))),
        "dtype": draw(st.sampled_from(DTYPES)),
        "temperature": draw(st.one_of(st.sampled_from([1.0, 0.7, 2.5]), st.floats(0.05, 4.0))),
        "logits": draw(st.sampled_from(["normal", "wide", "extreme", "equal", "neg_inf"])),
        "ignore": draw(st.sampled_from(["none", "some", "all"])),
        "mask": draw(st.sampled_from(["none", "random", "all_false"])),
        "grad_entropy": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def make_logits(kind, n, vocab, dtype, gen):
    z = torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    if kind == "wide":
        z = 20 * z
    elif kind == "extreme":  # +-1e4 sprinkled over ordinary logits (fp16 holds 1e4)
        pick = torch.rand(n, vocab, generator=gen)
        z = torch.where(pick < 0.2, 1e4, torch.where(pick < 0.4, -1e4, z))
    elif kind == "equal":  # a flat row: p = 1/V, H = log V
        z = torch.full((n, vocab), 3.25, dtype=torch.float64)
    elif kind == "neg_inf" and vocab > 1:  # one -inf per row, never in column 0 (an
        # all -inf row has no softmax); build() makes it row 0's target
        cols = torch.randint(1, vocab, (n,), generator=gen)
        z[torch.arange(n), cols] = -math.inf
    return z.to(dtype)


def build(case):
    """(logits, targets, valid) on DEVICE, and the upstream gradients (output dtype)."""
    gen = torch.Generator().manual_seed(case["seed"])
    n, vocab, dtype = case["n"], case["vocab"], case["dtype"]
    z = make_logits(case["logits"], n, vocab, dtype, gen)
    y = torch.randint(0, vocab, (n,), generator=gen)
    y[0] = vocab - 1
    if n > 1:
        y[1] = 0
    if case["logits"] == "neg_inf" and vocab > 1:
        y[0] = int(torch.isinf(z[0]).nonzero()[0, 0])  # logp = -inf, a finite gradient
    if case["ignore"] == "some":
        y[torch.rand(n, generator=gen) < 0.4] = -100
    elif case["ignore"] == "all":
        y[:] = -100
    valid = None
    if case["mask"] == "random":
        valid = torch.rand(n, generator=gen) < 0.7
    elif case["mask"] == "all_false":
        valid = torch.zeros(n, dtype=torch.bool)
    out = acc_dtype(dtype)
    g_lp = torch.randn(n, generator=gen, dtype=torch.float64).to(out)
    g_h = torch.randn(n, generator=gen, dtype=torch.float64).to(out)
    g_h = g_h if case["grad_entropy"] else None
    dev = lambda x: None if x is None else x.to(DEVICE)
    return dev(z), dev(y), dev(valid), dev(g_lp), dev(g_h)


def exact_forward(z, y, valid, temperature):
    """The float64 reference on CPU, run on logits shifted so each row's max is 0:
    ((logp, entropy, stats), (shifted logits, their stats)); stats = (max, log_norm).

    Shifting changes nothing mathematically; it keeps the oracle independent of how the
    reference rounds large logits (a reference forming H = lse - sum p s loses
    eps * max|s| * |s|, 7.5e-9 at |s| = 1e4 even in float64): after the shift the large
    |s| only meet p ~ 0, so the oracle is exact enough to hold the kernels to ~1e-13 at
    any logit scale.
    """
    z = z.detach().cpu().double()
    top = torch.where(torch.isfinite(z), z, -math.inf).amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0)
    valid = None if valid is None else valid.cpu()
    logp, ent, stats_shifted = reference_forward(z - top, y.cpu(), valid, temperature)
    # The shift moves the max and leaves log_norm as it is.
    stats = stats_shifted + torch.cat([top, torch.zeros_like(top)], dim=1)
    stats = torch.where(keep_rows(y, valid)[:, None], stats, 0)
    return (logp, ent, stats), (z - top, stats_shifted)


def keep_rows(y, valid):
    keep = y.cpu() != -100
    return keep if valid is None else keep & valid.cpu()


def row_scale(z, temperature):
    """Per row, 1 + max |s| over finite logits + log V: fp rounding of s, of lse and of
    the exponents grows with it."""
    s = z.detach().cpu().double() / temperature
    finite = torch.where(torch.isfinite(s), s.abs(), 0)
    return 1 + finite.amax(-1) + math.log(z.shape[-1])


def assert_close_with(got, exp, tol, what):
    got = got.detach().cpu().double()
    assert got.shape == exp.shape, what
    # Same infinities in the same places (a -inf target gives logp = -inf); elsewhere
    # every element - ignored rows included, so a NaN-poisoned unwritten slot fails.
    inf = torch.isinf(exp)
    assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], exp[inf]), what
    fin = torch.isfinite(exp)
    err = torch.where(fin, (got - exp).abs(), 0)
    bad = ~(err <= tol) | (fin & ~torch.isfinite(got))
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} off, worst err {err.max().item():.3g} at {int(err.argmax())} "
        f"(tol there {tol.flatten()[err.argmax()].item():.3g})"
    )


def forward_tolerance(z, temperature, dtype):
    return ACC_RTOL[acc_dtype(dtype)] * row_scale(z, temperature)


def backward_tolerance(z, y, keep, temperature, stats, g_lp, g_h, exact):
    """Per element: rounding of the exact gradient to the output dtype (eps |dz|, or one
    subnormal step below the normal range) plus the
    accumulation error, relative to scale. p is off by ~eps scale relative to itself,
    E_s - s is up to ~2 scale, so the two terms carry p (and onehot) as a weight."""
    eps_out = torch.finfo(z.dtype).eps
    rtol = ACC_RTOL[acc_dtype(z.dtype)]
    scale = row_scale(z, temperature)[:, None]
    stats = stats.cpu().double()
    u = (z.detach().cpu().double() - stats[:, :1]) / temperature - stats[:, 1:]
    # Ignored rows have stats = 0 (their exact gradient is 0, checked exactly elsewhere).
    p = torch.where(keep[:, None], torch.exp(u), 0)
    onehot = torch.zeros_like(p)
    onehot.scatter_(1, y.cpu().clamp(min=0)[:, None], 1.0)
    g_lp = g_lp.cpu().double().abs()[:, None]
    g_h = 0 if g_h is None else g_h.cpu().double().abs()[:, None]
    weight = g_lp * (p + onehot) + g_h * p * (1 + 2 * scale)
    # Below the normal range relative precision is lost: p itself underflows in the
    # accumulation dtype (fp32: below 1.2e-38, flushed to 0 on a GPU), and results round
    # to a multiple of the output dtype's smallest subnormal (fp16: 6e-8). The Triton
    # interpreter's own fp32 -> bf16 cast mangles fp32 subnormals (off by < 2^-126).
    tiny = torch.finfo(acc_dtype(z.dtype)).tiny
    floor = tiny * (1 + (g_lp + g_h * (1 + 2 * scale)) / temperature)
    floor = floor + torch.finfo(z.dtype).tiny * eps_out
    return eps_out * exact.abs() + rtol * (scale * weight / temperature + exact.abs()) + floor


# --------------------------------------------------------------------------------------
# The kernel contract


@settings(max_examples=200, deadline=None)
@given(case=cases())
def test_kernels_match_float64_reference(case, poisoned):
    z, y, valid, g_lp, g_h = build(case)
    tau, dtype = case["temperature"], case["dtype"]
    keep = keep_rows(y, valid)
    cpu_valid = None if valid is None else valid.cpu()
    exp, (shifted, stats_shifted) = exact_forward(z, y, valid, tau)

    with poisoned():
        got = tlp.token_logprobs_fwd(z, y, valid, tau, block_v=BLOCK)
    tol = forward_tolerance(z, tau, dtype)
    for name, g, e in zip(("logp", "entropy", "stats"), got, exp):
        assert g.dtype == acc_dtype(dtype) and g.device.type == DEVICE, name
        assert_close_with(g, e, tol if g.dim() == 1 else tol[:, None], name)
        assert (g.cpu()[~keep] == 0).all(), f"{name} of ignored rows must be 0"
    assert (got[0] <= 0).all() and (got[1] >= 0).all()
    assert torch.equal(got[2][:, 0].cpu().double(), exp[2][:, 0])  # the max logit: exact

    # Backward, given the same (exact) stats and entropy as the reference, so that only
    # the backward kernel's own rounding is measured.
    exact = torch.empty(z.shape, dtype=torch.float64)
    g_h_cpu = None if g_h is None else g_h.cpu().double()
    reference_backward(
        g_lp.cpu().double(), g_h_cpu, shifted, y.cpu(), cpu_valid, stats_shifted, exp[1], tau,
        exact,
    )
    stats, ent = (x.to(acc_dtype(dtype)).to(DEVICE) for x in exp[2:0:-1])
    with poisoned():
        grad = torch.empty_like(z)
        tlp.token_logprobs_bwd(g_lp, g_h, z, y, valid, stats, ent, tau, grad, block_v=BLOCK)
    assert grad.dtype == z.dtype
    tol = backward_tolerance(z, y, keep, tau, exp[2], g_lp, g_h, exact)
    assert_close_with(grad, exact, tol, "grad")
    assert (grad.cpu()[~keep] == 0).all()

    # In place over a copy of the logits: bit-for-bit the out-of-place result.
    inplace = z.clone()
    tlp.token_logprobs_bwd(g_lp, g_h, inplace, y, valid, stats, ent, tau, inplace, block_v=BLOCK)
    assert torch.equal(inplace.cpu(), grad.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_without_entropy_gradient_equals_zero_entropy_gradient(dtype):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(5, 2 * BLOCK + 3, generator=gen, dtype=dtype).to(DEVICE)
    y = torch.tensor([0, 3, -100, 2 * BLOCK + 2, 7], device=DEVICE)
    g_lp = torch.randn(5, generator=gen, dtype=dtype).to(DEVICE)
    _, ent, stats = tlp.token_logprobs_fwd(z, y, None, 0.9, block_v=BLOCK)
    a, b = torch.empty_like(z), torch.empty_like(z)
    tlp.token_logprobs_bwd(g_lp, None, z, y, None, stats, ent, 0.9, a, block_v=BLOCK)
    zero = torch.zeros_like(g_lp)
    tlp.token_logprobs_bwd(g_lp, zero, z, y, None, stats, ent, 0.9, b, block_v=BLOCK)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_known_values():
    """Hand-checkable rows: a flat row has p = 1/V and H = log V; -inf logits drop out of
    a flat row (also when whole leading chunks are -inf, as with a banned-token mask);
    a one-hot-like row has H = 0 and logp = 0."""
    vocab = 3 * BLOCK + 1
    z = torch.zeros(4, vocab, dtype=torch.float64)
    z[1, 5] = -math.inf
    z[2, :2 * BLOCK] = -math.inf  # the first two chunks hold nothing
    z[3, 9] = 1e4
    y = torch.tensor([4, 6, 2 * BLOCK, 9])
    logp, ent, stats = tlp.token_logprobs_fwd(z.to(DEVICE), y.to(DEVICE), None, 1.0, block_v=BLOCK)
    logp, ent, stats = logp.cpu(), ent.cpu(), stats.cpu()
    flat = torch.tensor([vocab, vocab - 1, BLOCK + 1], dtype=torch.float64).log()
    torch.testing.assert_close(logp[:3], -flat, rtol=1e-15, atol=0)
    torch.testing.assert_close(ent[:3], flat, rtol=1e-15, atol=0)
    assert (stats[:3, 0] == 0).all()  # the row max
    torch.testing.assert_close(stats[:3, 1], flat, rtol=1e-15, atol=0)
    assert logp[3] == 0 and ent[3] == 0 and stats[3, 0] == 1e4 and stats[3, 1] == 0
    # -inf logits get exactly zero gradient (no 0 * inf NaN) from both terms.
    grad = torch.empty(4, vocab, dtype=torch.float64, device=DEVICE)
    ones = torch.ones(4, dtype=torch.float64, device=DEVICE)
    tlp.token_logprobs_bwd(
        ones, ones, z.to(DEVICE), y.to(DEVICE), None, stats.to(DEVICE), ent.to(DEVICE), 1.0,
        grad, block_v=BLOCK,
    )
    grad = grad.cpu()
    assert torch.isfinite(grad).all() and grad[1, 5] == 0 and (grad[2, : 2 * BLOCK] == 0).all()
    # Gradients of logp + H sum to zero over each row (softmax shift invariance).
    torch.testing.assert_close(grad.sum(-1), torch.zeros_like(ent), rtol=0, atol=1e-12)


def test_ignored_rows_are_invisible(poisoned):
    """Garbage (NaN, inf) in the logits of ignored rows changes nothing, and every row of
    the gradient is written, zeros for the ignored ones."""
    gen = torch.Generator().manual_seed(7)
    vocab = 3 * BLOCK + 5
    z = torch.randn(6, vocab, generator=gen).to(DEVICE)
    y = torch.tensor([1, -100, 2, 3, -100, vocab - 1], device=DEVICE)
    valid = torch.tensor([True, True, False, True, True, True], device=DEVICE)
    dirty = z.clone()
    dirty[1] = math.nan
    dirty[2] = math.inf
    dirty[4] = -math.inf
    clean = tlp.token_logprobs_fwd(z, y, valid, 1.3, block_v=BLOCK)
    with poisoned():
        got = tlp.token_logprobs_fwd(dirty, y, valid, 1.3, block_v=BLOCK)
    for a, b in zip(clean, got):
        assert torch.equal(a, b)
    g = torch.randn(6, generator=gen).to(DEVICE)
    with poisoned():
        out = torch.empty_like(dirty)
        tlp.token_logprobs_bwd(g, g, dirty, y, valid, got[2], got[1], 1.3, out, block_v=BLOCK)
    ref = torch.empty_like(z)
    tlp.token_logprobs_bwd(g, g, z, y, valid, clean[2], clean[1], 1.3, ref, block_v=BLOCK)
    assert torch.equal(out, ref)
    assert (out[[1, 2, 4]] == 0).all()


def test_empty_batch(poisoned):
    z = torch.zeros(0, 7, device=DEVICE)
    y = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    logp, ent, stats = tlp.token_logprobs_fwd(z, y, None, 1.0)
    assert logp.shape == ent.shape == (0,) and stats.shape == (0, 2)
    tlp.token_logprobs_bwd(logp, None, z, y, None, stats, ent, 1.0, torch.empty_like(z))


@pytest.mark.parametrize("inplace", [False, True])
def test_strided_row_views(inplace, poisoned):
    """Logits that are a slice of a wider buffer (row stride > V, a storage offset), and
    every other row of it; the gradient lands only in the slice."""
    gen = torch.Generator().manual_seed(5)
    vocab = 2 * BLOCK + 3
    buf = torch.randn(8, vocab + 11, generator=gen, dtype=torch.float64).to(DEVICE)
    z = buf[::2, 4 : 4 + vocab]  # row stride 2 (V + 11), offset 4
    assert z.stride() == (2 * (vocab + 11), 1)
    y = torch.tensor([0, vocab - 1, -100, 9], device=DEVICE)
    got = tlp.token_logprobs_fwd(z, y, None, 0.8, block_v=BLOCK)
    exp = reference_forward(z.cpu(), y.cpu(), None, 0.8)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-13, atol=1e-13)
    g_lp = torch.randn(4, generator=gen, dtype=torch.float64).to(DEVICE)
    g_h = torch.randn(4, generator=gen, dtype=torch.float64).to(DEVICE)
    exact = torch.empty(4, vocab, dtype=torch.float64)
    reference_backward(g_lp.cpu(), g_h.cpu(), z.cpu(), y.cpu(), None, exp[2], exp[1], 0.8, exact)
    before = buf.clone()
    if inplace:
        out = z
    else:
        with poisoned():
            out = torch.empty(4, vocab, dtype=torch.float64, device=DEVICE)
    tlp.token_logprobs_bwd(g_lp, g_h, z, y, None, got[2], got[1], 0.8, out, block_v=BLOCK)
    torch.testing.assert_close(out.cpu(), exact, rtol=1e-12, atol=1e-13)
    untouched = torch.ones_like(buf, dtype=torch.bool)
    untouched[::2, 4 : 4 + vocab] = not inplace
    assert torch.equal(buf[untouched], before[untouched])


def test_row_offsets_are_int64(monkeypatch):
    """Rows more than 2^31 elements into the buffer, on CPU: a (3, V) fp16 view with a row
    stride of 2^30 + 64, so row 2 starts at 2^31 + 128 elements - past int32 even though
    the stride itself fits. Only rows 0 and 2 are used (row 1 is ignored), so only their
    pages are ever touched; the untouched rest of the 4 GiB buffer costs no memory."""
    if DEVICE != "cpu":
        pytest.skip("CPU variant; see test_gpu_beyond_int32_elements")
    vocab, stride = 3 * BLOCK + 1, 2**30 + 64
    try:
        buf = torch.empty(2 * stride + vocab, dtype=torch.float16)
    except RuntimeError:
        pytest.skip("cannot reserve 4 GiB of address space")
    z = buf.as_strided((3, vocab), (stride, 1))
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(2, vocab, generator=gen).half()
    z[0], z[2] = rows[0], rows[1]
    y = torch.tensor([vocab - 1, -100, 5])
    dense = torch.stack([rows[0], rows[0], rows[1]]).double()  # the same rows, contiguous
    exp = reference_forward(dense, y, None, 1.0)
    got = tlp.token_logprobs_fwd(z, y, None, 1.0, block_v=BLOCK)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g.double(), e, rtol=1e-6, atol=1e-6)
    g_lp = torch.tensor([1.0, 1.0, -2.0])
    exact = torch.empty(3, vocab, dtype=torch.float64)
    reference_backward(g_lp.double(), None, dense, y, None, exp[2], exp[1], 1.0, exact)
    # In place, so the stores too go 2^31 elements out.
    tlp.token_logprobs_bwd(g_lp, None, z, y, None, got[2], got[1], 1.0, z, block_v=BLOCK)
    torch.testing.assert_close(z[[0, 2]].double(), exact[[0, 2]], rtol=2e-3, atol=1e-6)
    assert (z[1] == 0).all()


def test_launch_parameters():
    default = tlp.INTERPRET_BLOCK_V if INTERPRET else tlp.GPU_BLOCK_V
    assert tlp._launch_params(152064, None)[0] == default
    # The GPU plan, checked whatever device runs the test.
    assert (tlp.GPU_BLOCK_V, tlp.MAX_NUM_WARPS) == (8192, 16)
    assert tlp._launch_params(152064, 8192) == (8192, 16)
    assert tlp._launch_params(152064, 4096) == (4096, 8)
    assert tlp._launch_params(1000, 1024) == (1024, 2)
    assert tlp._launch_params(1, 16) == (16, 1)
    assert tlp._launch_params(1, None)[0] == 1  # a chunk no wider than the row
    with pytest.raises(ValueError, match="power of two"):
        tlp._launch_params(100, 24)


# --------------------------------------------------------------------------------------
# GPU only: compiled kernels at the default launch plan, a real vocabulary, > 2^31


def _torch_fp32(z, y, temperature):
    """logp, entropy and the fp32 gradient of (logp + entropy).sum() by torch autograd."""
    z32 = z.float().requires_grad_()
    logsm = torch.log_softmax(z32 / temperature, -1)
    logp = logsm.gather(-1, y[:, None]).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    (logp.sum() + ent.sum()).backward()
    return logp.detach(), ent.detach(), z32.grad


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (compiled Triton)")
def test_gpu_big_vocab_bf16_matches_torch_fp32():
    torch.manual_seed(0)
    n, vocab = 8192, 152064
    z = (4 * torch.randn(n, vocab, device="cuda")).bfloat16()
    y = torch.randint(0, vocab, (n,), device="cuda")
    logp, ent, stats = tlp.token_logprobs_fwd(z, y, None, 0.9)
    e_logp, e_ent, e_grad = _torch_fp32(z, y, 0.9)
    torch.testing.assert_close(logp, e_logp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent, e_ent, rtol=1e-5, atol=1e-4)
    ones = torch.ones(n, device="cuda")
    grad = torch.empty_like(z)
    tlp.token_logprobs_bwd(ones, ones, z, y, None, stats, ent, 0.9, grad)
    torch.testing.assert_close(grad.float(), e_grad, rtol=2**-7, atol=1e-6)
    tlp.token_logprobs_bwd(ones, ones, z, y, None, stats, ent, 0.9, z)  # in place
    assert torch.equal(z, grad)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (compiled Triton)")
def test_gpu_beyond_int32_elements():
    """N x V = 16384 x 152064 > 2^31 bf16 logits (~5 GB): rows past the int32 range."""
    n, vocab = 16384, 152064
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * vocab * 2:
        pytest.skip("not enough GPU memory")
    torch.manual_seed(1)
    z = (3 * torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16))
    y = torch.randint(0, vocab, (n,), device="cuda")
    logp, ent, stats = tlp.token_logprobs_fwd(z, y, None, 1.0)
    tail = slice(n - 64, n)  # rows whose offsets exceed 2^31 elements
    assert (n - 64) * vocab > 2**31
    e_logp, e_ent, e_grad = _torch_fp32(z[tail], y[tail], 1.0)
    torch.testing.assert_close(logp[tail], e_logp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent[tail], e_ent, rtol=1e-5, atol=1e-4)
    ones = torch.ones(n, device="cuda")
    tlp.token_logprobs_bwd(ones, ones, z, y, None, stats, ent, 1.0, z)  # in place
    torch.testing.assert_close(z[tail].float(), e_grad, rtol=2**-7, atol=1e-6)
