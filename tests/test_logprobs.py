"""Token log-probs / entropy op family: the op, its autograd and its kernel contract, under
every backend the registry reports (tests/strategies.py), against the float64 definitions
and spec.

Triton runs with 16-wide vocabulary chunks here, so small rows cross chunk boundaries;
without a GPU through the interpreter, on fewer and smaller cases (``examples``,
``interpreted``). The kernels themselves (each backend's forward and backward, as the
registry selects them) are checked on random cases against the spec run in float64 on
the same inputs, on strided rows, huge vocabularies and offsets past 2^31, and for the
errors their own argument checks raise; ``-m gpu`` adds a 152k vocabulary and buffers
past 2^31 elements for every CUDA backend. What one backend alone has (the C++
instruction-set variants, Triton's launch plans) is in test_cpp_kernels.py and
test_triton_kernels.py.
"""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vapo_kernels as vk
from vapo_kernels.ops.token_logprobs import reference_backward, reference_forward, token_logprobs
from vapo_kernels.triton import logprobs as triton_logprobs

import _dominant as dominant
from strategies import (
    GARBAGE, acc_dtype, backend_cases, backend_params, examples, interpreted, kernel_of,
    rows_beyond_int32,
)

BACKENDS = backend_params("logprobs")
# GPU-only checks at large shapes: the CUDA devices of BACKENDS (none without a GPU).
ON_GPU = [p for p in BACKENDS if p.values[1] == "cuda"]
# Checks on CPU tensors (by-hand values, errors, in-place rules): every backend there.
ON_CPU = vk.available_backends("logprobs", "cpu")


pytestmark = pytest.mark.usefixtures("extension_built")  # on CI a broken C++ build fails loudly


@pytest.fixture(autouse=True)
def _small_triton_chunks(monkeypatch):
    # 16-wide vocabulary chunks in the interpreter: chunk boundaries inside small rows.
    monkeypatch.setattr(triton_logprobs, "INTERPRET_BLOCK_V", 16)


def fp64_reference(logits, targets, temperature, mask=None):
    """Straight from the definitions, in float64, on the full (N, V) matrix."""
    z = logits.double() / temperature
    logsm = torch.log_softmax(z, dim=-1)
    keep = targets != -100
    if mask is not None:
        keep &= mask.bool()
    logp = logsm.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    p = logsm.exp()
    ent = -torch.where(p > 0, p * logsm, 0).sum(-1)
    return torch.where(keep, logp, 0), torch.where(keep, ent, 0)


@st.composite
def cases(draw):
    n = draw(st.integers(0, 12))
    vocab = draw(st.sampled_from([1, 2, 7, 31, 128, 129, 1000]))
    return {
        "n": n,
        "vocab": vocab,
        "dtype": draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])),
        "temperature": draw(st.sampled_from([1.0, 0.7, 1.3, 0.05])),
        "scale": draw(st.sampled_from([1.0, 10.0])),
        "ignore": draw(st.booleans()),
        "use_mask": draw(st.booleans()),
        "padded": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def build(case):
    gen = torch.Generator().manual_seed(case["seed"])
    n, vocab = case["n"], case["vocab"]
    logits = (case["scale"] * torch.randn(n, vocab, generator=gen, dtype=torch.float64)).to(case["dtype"])
    targets = torch.randint(0, vocab, (n,), generator=gen)
    if n:
        targets[0] = vocab - 1
    if case["ignore"] and n > 1:
        targets[1] = -100
    mask = (torch.rand(n, generator=gen) < 0.7) if case["use_mask"] else None
    if case["padded"] and n % 2 == 0:
        logits = logits.view(2, n // 2, vocab)
        targets = targets.view(2, n // 2)
        mask = None if mask is None else mask.view(2, n // 2)
    return logits, targets, mask


def on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_forward_matches_float64_definition(backend, device, poisoned):
    @examples(backend, device, cpu=40, interpreted=8)
    @given(case=cases())
    def check(case):
        forward_matches_float64_definition(backend, device, case, poisoned)

    check()


def forward_matches_float64_definition(backend, device, case, poisoned):
    logits, targets, mask = build(case)
    with poisoned():
        logp, ent = token_logprobs(
            *on(device, logits, targets), temperature=case["temperature"], return_entropy=True,
            mask=on(device, mask)[0], backend=backend,
        )
    logp, ent = logp.cpu(), ent.cpu()
    exp_logp, exp_ent = fp64_reference(logits, targets, case["temperature"], mask)
    assert logp.dtype == ent.dtype == (torch.float64 if case["dtype"] == torch.float64 else torch.float32)
    assert logp.shape == ent.shape == targets.shape
    tol = 1e-12 if case["dtype"] == torch.float64 else 2e-5
    torch.testing.assert_close(logp.double(), exp_logp, rtol=tol, atol=tol * (1 + case["scale"] / case["temperature"]))
    torch.testing.assert_close(ent.double(), exp_ent, rtol=tol, atol=tol * (1 + case["scale"] / case["temperature"]))
    # The documented ranges hold exactly, whatever the rounding.
    assert bool((logp <= 0).all())
    assert bool((ent >= 0).all()) and bool((ent <= math.log(case["vocab"]) + 1e-5).all())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backward_matches_autograd_of_the_definition(backend, device, poisoned):
    @examples(backend, device, cpu=25, interpreted=6)
    @given(case=cases(), g_ent=st.sampled_from([None, 0.5]))
    def check(case, g_ent):
        backward_matches_autograd_of_the_definition(backend, device, case, g_ent, poisoned)

    check()


def backward_matches_autograd_of_the_definition(backend, device, case, g_ent, poisoned):
    logits, targets, mask = build(case)
    mine = logits.detach().clone().to(device).requires_grad_(True)
    theirs = logits.detach().double().requires_grad_(True)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    w_lp = torch.randn(targets.shape, generator=gen, dtype=torch.float64)
    w_ent = torch.randn(targets.shape, generator=gen, dtype=torch.float64)
    with poisoned():
        logp, ent = token_logprobs(
            mine, *on(device, targets), temperature=case["temperature"], return_entropy=True,
            mask=on(device, mask)[0], backend=backend,
        )
        logp, ent = logp.cpu(), ent.cpu()
        loss = (logp.double() * w_lp).sum() + ((ent.double() * w_ent).sum() * g_ent if g_ent else 0)
        loss.backward()
    exp_logp, exp_ent = fp64_reference(theirs, targets, case["temperature"], mask)
    exp_loss = (exp_logp * w_lp).sum() + ((exp_ent * w_ent).sum() * g_ent if g_ent else 0)
    exp_loss.backward()
    assert mine.grad.dtype == logits.dtype
    if case["dtype"] == torch.float64:
        tol = dict(rtol=1e-10, atol=1e-10)
    elif case["dtype"] == torch.float32:
        tol = dict(rtol=1e-4, atol=1e-5 * (1 + case["scale"]) / case["temperature"])
    else:  # the gradient itself is rounded to the 8/11-bit mantissa of the logits' dtype
        tol = dict(rtol=2e-2, atol=2e-2 * (1 + case["scale"]) / case["temperature"])
    torch.testing.assert_close(mine.grad.double().cpu(), theirs.grad, **tol)


# Finite differences take ~100 calls (6-10 s in the Triton interpreter); Triton's float64
# gradients are held to autograd of the definition by test_backward_matches_autograd_of_the_definition.
@pytest.mark.parametrize("backend", [b for b in ON_CPU if b != "triton"])
def test_gradcheck_float64(backend):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (6,), generator=gen)
    y[2] = -100
    m = torch.tensor([True, True, True, False, True, True])
    fn = lambda z: token_logprobs(z, y, temperature=0.8, return_entropy=True, mask=m, backend=backend)
    assert torch.autograd.gradcheck(fn, (z,))


@pytest.mark.parametrize("backend", ON_CPU)
def test_extreme_logits(backend):
    vocab = 50
    z = torch.zeros(5, vocab)
    z[0, 3] = 1e4  # one dominant logit
    z[1, :] = -1e4
    z[1, 7] = 1e4
    z[2, 11] = float("-inf")  # a forbidden token
    z[3, :] = 7.0  # all equal: uniform, H = log V
    z[4, :] = torch.linspace(-1e4, 1e4, vocab)
    y = torch.tensor([3, 7, 11, 0, vocab - 1])
    zg = z.clone().requires_grad_(True)
    logp, ent = token_logprobs(zg, y, return_entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(zg.grad).all()
    assert logp[0] == 0 and logp[1] == 0 and ent[0] == 0
    assert logp[2] == float("-inf")  # the target has probability 0
    torch.testing.assert_close(ent[3], torch.tensor(math.log(vocab)))
    torch.testing.assert_close(logp[3], torch.tensor(-math.log(vocab)))
    assert torch.isfinite(ent).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.3, 0.7])
def test_gradient_at_dominant_logits_is_as_exact_as_elsewhere(backend, device, dtype, temperature):
    """A logit of +-1e4 among ordinary ones, and rows of only large logits: outputs and
    gradient as close to float64 as on ordinary rows (tests/_dominant.py says why)."""
    z, y, kinds = dominant.rows(dtype)
    gen = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(2, len(y), generator=gen, dtype=torch.float64)
    mine = z.clone().to(device).requires_grad_(True)
    logp, ent = token_logprobs(mine, y.to(device), temperature=temperature, return_entropy=True, backend=backend)
    logp, ent = logp.cpu(), ent.cpu()
    ((logp.double() * w_lp).sum() + (ent.double() * w_ent).sum()).backward()
    theirs = z.double().requires_grad_(True)
    exp_logp, exp_ent = dominant.fp64_logp_entropy(theirs, y, temperature)
    ((exp_logp * w_lp).sum() + (exp_ent * w_ent).sum()).backward()
    # The Triton interpreter's float32 -> bf16 cast truncates (a GPU rounds to nearest).
    rounding = 1.0 if (backend, device) == ("triton", "cpu") else 0.5
    dominant.assert_grad_exact(mine.grad, theirs.grad, kinds, dtype, backend, rounding)
    for got, want in ((logp, exp_logp), (ent, exp_ent)):
        torch.testing.assert_close(got.double(), want.detach(), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ignored_rows_cost_nothing_and_get_zero_gradient(backend, device, poisoned):
    """NaN, inf and -inf in the logits of ignored rows (by target or by mask) change no
    output bit; their log-prob, entropy and every element of their gradient rows are
    written as 0 (the outputs start as NaN)."""
    z = torch.randn(6, 16 * 3 + 5, device=device)
    y = torch.tensor([1, -100, 3, 4, -100, 52], device=device)
    m = torch.tensor([True, True, False, True, True, True], device=device)
    garbage = z.clone()
    garbage[1] = float("nan")  # ignored by target
    garbage[2] = float("inf")  # ignored by mask
    garbage[4] = -float("inf")  # ignored by target
    g = garbage.requires_grad_(True)
    with poisoned():
        logp, ent = token_logprobs(g, y, mask=m, temperature=1.3, return_entropy=True, backend=backend)
        assert (logp[[1, 2, 4]] == 0).all() and (ent[[1, 2, 4]] == 0).all()
        (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(g.grad).all() and (g.grad[[1, 2, 4]] == 0).all()
    clean = z.clone().requires_grad_(True)
    clean_lp, clean_ent = token_logprobs(clean, y, mask=m, temperature=1.3, return_entropy=True, backend=backend)
    (clean_lp.sum() + clean_ent.sum()).backward()
    for a, b in ((clean_lp, logp), (clean_ent, ent), (clean.grad, g.grad)):
        assert torch.equal(a, b)  # bit for bit
    all_ignored = token_logprobs(z, torch.full((6,), -100, device=device), backend=backend)
    assert torch.equal(all_ignored.cpu(), torch.zeros(6))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_garbage_in_masked_and_ignored_rows_changes_no_valid_output(backend, device):
    """Random batches: rows that are masked or have an ignored target hold NaN, inf or
    1e30; every valid row's log-prob, entropy and gradient stays the same, bit for bit."""

    @examples(backend, device, cpu=25, interpreted=5)
    @given(case=cases(), garbage=st.sampled_from(GARBAGE))
    def check(case, garbage):
        logits, targets, mask = build({**case, "use_mask": True, "ignore": True})
        valid = mask & (targets != -100)
        dirty = torch.where(valid[..., None], logits, torch.tensor(garbage, dtype=logits.dtype))

        def run(z):
            leaf = z.clone().to(device).requires_grad_(True)
            logp, ent = token_logprobs(
                leaf, *on(device, targets), temperature=case["temperature"], return_entropy=True,
                mask=on(device, mask)[0], backend=backend,
            )
            (logp.sum() + 0.5 * ent.sum()).backward()
            return logp.cpu(), ent.cpu(), leaf.grad.cpu()

        for a, b in zip(run(logits), run(dirty)):
            assert torch.equal(a[valid], b[valid])  # bit for bit

    check()


# --------------------------------------------------------------------------------------
# The kernel contract: each backend's forward and backward kernels, called directly as the
# registry selects them, against the float64 spec. Outputs start as NaN (poisoned()), so
# an element a kernel forgot to write fails.

# Vocabularies around Triton's 16-wide chunks (+- 1, several chunks) and the degenerate
# V = 1; for the compiled backends also around the C++ kernel's vector widths (4..16)
# and its 1024-logit block.
CHUNK = 16
CHUNK_V = [1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1, 4 * CHUNK - 1]
BLOCK_V = [1, 2, 3, 15, 16, 17, 33, 1023, 1024, 1025, 4099]
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
# Per-unit-of-scale error allowed from the accumulation dtype (~8 ulps of fp32).
ACC_RTOL = {torch.float32: 1e-6, torch.float64: 1e-13}
# Half an ulp of the output format, relative (gradients are stored in the logits' dtype).



@contextlib.contextmanager
def triton_chunks(backend, block_v):
    """Triton's kernels with ``block_v``-wide vocabulary chunks (the registry's kernels
    take the default plan); other backends have no plan to change."""
    if backend != "triton":
        yield
        return
    was = triton_logprobs.INTERPRET_BLOCK_V, triton_logprobs.GPU_BLOCK_V
    triton_logprobs.INTERPRET_BLOCK_V = triton_logprobs.GPU_BLOCK_V = block_v
    try:
        yield
    finally:
        triton_logprobs.INTERPRET_BLOCK_V, triton_logprobs.GPU_BLOCK_V = was


def kernels(backend, device, block_v=CHUNK):
    """(forward, backward) of ``backend``, Triton with ``block_v``-wide chunks."""
    fwd = kernel_of("token_logprobs", backend, device)
    bwd = kernel_of("token_logprobs_backward", backend, device)

    def forward(*args):
        with triton_chunks(backend, block_v):
            return fwd(*args)

    def backward(*args):
        with triton_chunks(backend, block_v):
            return bwd(*args)

    return forward, backward


@st.composite
def kernel_cases(draw, small=False):
    """``small``: vocabularies up to a few 16-wide chunks (the interpreter)."""
    if small:
        vocab = st.one_of(st.sampled_from(CHUNK_V), st.integers(1, 5 * CHUNK))
    else:
        vocab = st.one_of(st.sampled_from(CHUNK_V + BLOCK_V), st.integers(1, 3000))
    return {
        "n": draw(st.integers(0, 6)),
        "vocab": draw(vocab),
        "dtype": draw(st.sampled_from(DTYPES)),
        "temperature": draw(st.one_of(st.sampled_from([1.0, 0.7, 1.3, 2.5, 0.05, 4.0]), st.floats(0.05, 4.0))),
        "logits": draw(st.sampled_from(
            ["normal", "wide", "extreme", "levels", "equal", "neg_inf", "neg_inf_run", "spike"]
        )),
        "edge_targets": draw(st.booleans()),
        "ignore": draw(st.sampled_from(["none", "some", "all"])),
        "mask": draw(st.sampled_from(["none", "random", "all_false"])),
        "strided": draw(st.booleans()),
        "grad_entropy": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def make_logits(kind, n, vocab, dtype, gen, small):
    z = torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    if kind == "normal":
        z = 3 * z
    elif kind == "wide":
        z = 30 * z
    elif kind == "extreme":  # +-1e4 sprinkled over ordinary logits (fp16 holds 1e4)
        pick = torch.rand(n, vocab, generator=gen)
        z = torch.where(pick < 0.2, 1e4, torch.where(pick < 0.4, -1e4, z))
    elif kind == "levels":  # only -1e4, 0 and 1e4: many ties at the max
        z = torch.tensor([-1e4, 0.0, 1e4], dtype=torch.float64)[torch.randint(0, 3, (n, vocab), generator=gen)]
    elif kind == "equal":  # a flat row: p = 1/V, H = log V
        z = torch.full((n, vocab), 3.25, dtype=torch.float64)
    elif kind == "neg_inf" and vocab > 1:  # one -inf per row, never in column 0 (an
        # all -inf row has no softmax); build_kernel_case makes it row 0's target
        cols = torch.randint(1, vocab, (n,), generator=gen)
        z[torch.arange(n), cols] = -math.inf
    elif kind == "neg_inf_run" and vocab > 1:
        # A run of -inf long enough to fill whole chunks (of 16 / the C++ 1024), never
        # the whole row.
        run = 3 * CHUNK if small else 1100
        lo = int(torch.randint(0, vocab, (1,), generator=gen))
        z[:, lo : lo + run] = -math.inf
        z[:, (lo + run) % vocab if lo + run < vocab else 0] = 1.0
    elif kind == "spike":  # one logit 40 above the rest
        z[torch.arange(n), torch.randint(0, vocab, (n,), generator=gen)] += 40.0
    return z.to(dtype)


def build_kernel_case(case, device, small):
    """(logits, targets, valid) on ``device`` and the upstream gradients (output dtype).
    ``strided``: the logits are rows of a wider buffer (row stride V + 7, offset 3)."""
    gen = torch.Generator().manual_seed(case["seed"])
    n, vocab, dtype = case["n"], case["vocab"], case["dtype"]
    z = make_logits(case["logits"], n, vocab, dtype, gen, small)
    y = torch.randint(0, vocab, (n,), generator=gen)
    if case["edge_targets"] and n:
        y[0], y[-1] = vocab - 1, 0
    if case["logits"] == "neg_inf" and vocab > 1 and n:
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
    g_h = torch.randn(n, generator=gen, dtype=torch.float64).to(out) if case["grad_entropy"] else None
    z = z.to(device)
    if case["strided"]:
        wide = torch.randn(n, vocab + 7, generator=gen).to(dtype).to(device)
        wide[:, 3 : 3 + vocab] = z
        z = wide[:, 3 : 3 + vocab]
    return z, *on(device, y, valid, g_lp, g_h)


def exact_forward(z, y, valid, temperature):
    """The float64 spec on CPU, run on logits shifted so each row's max is 0:
    ((logp, entropy, stats), (shifted logits, their stats)); stats = (max, log_norm).

    Shifting changes nothing mathematically; it keeps the oracle independent of how the
    spec rounds large logits, so it is exact enough to hold the kernels to ~1e-13 at any
    logit scale: after the shift the large |s| only meet p ~ 0.
    """
    z = z.detach().cpu().double()
    top = torch.where(torch.isfinite(z), z, -math.inf).amax(-1, keepdim=True) if z.shape[0] else z[:, :1]
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
    return 1 + (finite.amax(-1) if s.shape[0] else finite.sum(-1)) + math.log(z.shape[-1])


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


def forward_tolerance(z, temperature):
    return ACC_RTOL[acc_dtype(z.dtype)] * row_scale(z, temperature)


def backward_tolerance(z, y, keep, temperature, stats, g_lp, g_h, exact):
    """Per element: rounding of the exact gradient to the output dtype (eps |dz|, or one
    subnormal step below the normal range) plus the accumulation error, relative to
    scale. p is off by ~eps scale relative to itself, E_s - s is up to ~2 scale, so the
    two terms carry p (and onehot) as a weight."""
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
    # The C++ kernel's vectorised fp32 exp flushes results below e^-87 (1.6e-38, just
    # above fp32's smallest normal) to 0 (csrc/cpu/logprobs.cpp).
    tiny = torch.finfo(acc_dtype(z.dtype)).tiny
    if acc_dtype(z.dtype) == torch.float32:
        tiny = max(tiny, math.exp(-87.0))
    floor = tiny * (1 + (g_lp + g_h * (1 + 2 * scale)) / temperature)
    floor = floor + torch.finfo(z.dtype).tiny * eps_out
    return eps_out * exact.abs() + rtol * (scale * weight / temperature + exact.abs()) + floor


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kernels_match_float64_spec(backend, device, poisoned):
    small = interpreted(backend, device)
    forward, backward = kernels(backend, device)

    @examples(backend, device, cpu=300, interpreted=150, reference=40)
    @given(case=kernel_cases(small))
    def check(case):
        z, y, valid, g_lp, g_h = build_kernel_case(case, device, small)
        tau, dtype = case["temperature"], case["dtype"]
        keep = keep_rows(y, valid)
        cpu_valid = None if valid is None else valid.cpu()
        exp, (shifted, stats_shifted) = exact_forward(z, y, valid, tau)

        with poisoned():
            got = forward(z, y, valid, tau)
        tol = forward_tolerance(z, tau)
        for name, g, e in zip(("logp", "entropy", "stats"), got, exp):
            assert g.dtype == acc_dtype(dtype) and g.device.type == device, name
            assert_close_with(g, e, tol if g.dim() == 1 else tol[:, None], name)
            assert (g.cpu()[~keep] == 0).all(), f"{name} of ignored rows must be 0"
        assert got[2].shape == (z.shape[0], 2) and got[2].is_contiguous()
        assert (got[0] <= 0).all() and (got[1] >= 0).all()
        assert torch.equal(got[2][:, 0].cpu().double(), exp[2][:, 0])  # the max logit: exact

        # Backward, given the same (exact) stats and entropy as the spec, so that only
        # the backward kernel's own rounding is measured.
        exact = torch.empty(z.shape, dtype=torch.float64)
        g_h_cpu = None if g_h is None else g_h.cpu().double()
        reference_backward(
            g_lp.cpu().double(), g_h_cpu, shifted, y.cpu(), cpu_valid, stats_shifted, exp[1],
            tau, exact,
        )
        stats, ent = (x.to(acc_dtype(dtype)).to(device) for x in exp[2:0:-1])
        with poisoned():
            grad = torch.empty(z.shape, dtype=dtype, device=device)
            backward(g_lp, g_h, z, y, valid, stats, ent, tau, grad)
        assert grad.dtype == z.dtype
        tol = backward_tolerance(z, y, keep, tau, exp[2], g_lp, g_h, exact)
        assert_close_with(grad, exact, tol, "grad")
        assert (grad.cpu()[~keep] == 0).all()

        # In place over a copy of the logits (strided like them): the same bits.
        inplace = z.clone() if not case["strided"] else z._base.clone()[:, 3 : 3 + z.shape[1]]
        backward(g_lp, g_h, inplace, y, valid, stats, ent, tau, inplace)
        assert torch.equal(inplace.cpu(), grad.cpu())

    check()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_without_entropy_gradient_equals_zero_entropy_gradient(dtype, backend, device):
    forward, backward = kernels(backend, device)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(5, 2 * CHUNK + 3, generator=gen, dtype=dtype).to(device)
    y = torch.tensor([0, 3, -100, 2 * CHUNK + 2, 7], device=device)
    g_lp = torch.randn(5, generator=gen, dtype=dtype).to(device)
    _, ent, stats = forward(z, y, None, 0.9)
    a, b = torch.empty_like(z), torch.empty_like(z)
    backward(g_lp, None, z, y, None, stats, ent, 0.9, a)
    backward(g_lp, torch.zeros_like(g_lp), z, y, None, stats, ent, 0.9, b)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kernels_known_values(backend, device):
    """Hand-checkable rows: a flat row has p = 1/V and H = log V; -inf logits drop out of
    a flat row (also when whole leading chunks are -inf, as with a banned-token mask);
    a one-hot-like row has H = 0 and logp = 0."""
    forward, backward = kernels(backend, device)
    vocab = 3 * CHUNK + 1
    z = torch.zeros(4, vocab, dtype=torch.float64)
    z[1, 5] = -math.inf
    z[2, : 2 * CHUNK] = -math.inf  # the first two chunks hold nothing
    z[3, 9] = 1e4
    y = torch.tensor([4, 6, 2 * CHUNK, 9])
    logp, ent, stats = (t.cpu() for t in forward(z.to(device), y.to(device), None, 1.0))
    flat = torch.tensor([vocab, vocab - 1, CHUNK + 1], dtype=torch.float64).log()
    torch.testing.assert_close(logp[:3], -flat, rtol=1e-15, atol=0)
    torch.testing.assert_close(ent[:3], flat, rtol=1e-15, atol=0)
    assert (stats[:3, 0] == 0).all()  # the row max
    torch.testing.assert_close(stats[:3, 1], flat, rtol=1e-15, atol=0)
    assert logp[3] == 0 and ent[3] == 0 and stats[3, 0] == 1e4 and stats[3, 1] == 0
    # -inf logits get exactly zero gradient (no 0 * inf NaN) from both terms.
    grad = torch.empty(4, vocab, dtype=torch.float64, device=device)
    ones = torch.ones(4, dtype=torch.float64, device=device)
    backward(ones, ones, z.to(device), y.to(device), None, stats.to(device), ent.to(device), 1.0, grad)
    grad = grad.cpu()
    assert torch.isfinite(grad).all() and grad[1, 5] == 0 and (grad[2, : 2 * CHUNK] == 0).all()
    # Gradients of logp + H sum to zero over each row (softmax shift invariance).
    torch.testing.assert_close(grad.sum(-1), torch.zeros_like(ent), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kernels_all_rows_ignored_and_empty(backend, device, poisoned):
    forward, backward = kernels(backend, device)
    z = torch.randn(4, 50, device=device)
    targets = torch.tensor([-100, 3, -100, 7], device=device)
    valid = torch.tensor([True, False, True, False], device=device)
    with poisoned():
        outs = forward(z, targets, valid, 1.0)
        grad = torch.empty_like(z)
        ones = torch.ones(4, device=device)
        backward(ones, ones, z, targets, valid, outs[2], outs[1], 1.0, grad)
    for o in outs:
        assert torch.equal(o, torch.zeros_like(o))
    assert torch.equal(grad, torch.zeros_like(z))
    with poisoned():
        z = torch.zeros(0, 50, device=device)
        y = torch.zeros(0, dtype=torch.long, device=device)
        logp, ent, stats = forward(z, y, None, 1.0)
        backward(logp, None, z, y, None, stats, ent, 1.0, torch.empty_like(z))
    assert [o.shape for o in (logp, ent, stats)] == [(0,), (0,), (0, 2)]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_logit_poisons_its_row_only(backend, device):
    forward, _ = kernels(backend, device)
    z = torch.randn(3, 2000)
    z[1, 1500] = math.nan
    logp, entropy, stats = (t.cpu() for t in forward(z.to(device), torch.tensor([1, 2, 3], device=device), None, 1.0))
    assert torch.isnan(logp[1]) and torch.isnan(entropy[1]) and torch.isnan(stats[1, 1])
    assert torch.isfinite(torch.stack([logp[[0, 2]], entropy[[0, 2]]])).all()
    assert torch.isfinite(stats[[0, 2]]).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")  # log2(0)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_row_of_only_neg_inf_does_not_crash(backend, device):
    """Invalid input; a kernel gives what the spec gives: logp NaN, H 0, stats (-inf,
    -inf) (lse -inf), and a finite gradient on the other rows."""
    forward, backward = kernels(backend, device)
    z = torch.randn(2, 3000)
    z[0] = -math.inf
    targets = torch.tensor([4, 5])
    logp, entropy, stats = forward(z.to(device), targets.to(device), None, 1.0)
    ref = reference_forward(z.double(), targets, None, 1.0)
    assert torch.isnan(logp[0]) and torch.isnan(ref[0][0])
    assert entropy[0] == ref[1][0] == 0
    assert torch.equal(stats[0].cpu().double(), ref[2][0]) and bool((stats[0] == -math.inf).all())
    grad = torch.empty(z.shape, device=device)
    ones = torch.ones(2, device=device)
    backward(ones, ones, z.to(device), targets.to(device), None, stats, entropy, 1.0, grad)
    assert torch.isfinite(grad[1]).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_kernels_read_and_write_strided_rows(dtype, backend, device, poisoned):
    """Logits that are every other row of a wider buffer at an offset (row stride
    2 (V + 11)): the same bits as from a contiguous copy; the gradient into a fresh
    tensor, into a strided view of another buffer, and in place, landing only in the
    view."""
    forward, backward = kernels(backend, device)
    gen = torch.Generator().manual_seed(5)
    vocab = 2 * CHUNK + 3 if interpreted(backend, device) else 2500
    buf = torch.randn(8, vocab + 11, generator=gen, dtype=dtype).to(device)
    z = buf[::2, 4 : 4 + vocab]
    assert z.stride() == (2 * (vocab + 11), 1)
    y = torch.tensor([0, vocab - 1, -100, 9], device=device)
    with poisoned():
        got = forward(z, y, None, 0.8)
    dense = forward(z.contiguous(), y, None, 0.8)
    for a, b in zip(got, dense):
        assert torch.equal(a, b)
    exp = reference_forward(z.cpu().double(), y.cpu(), None, 0.8)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g.cpu().double(), e, rtol=ACC_RTOL[dtype] * 10, atol=ACC_RTOL[dtype] * 10)
    g_lp = torch.randn(4, generator=gen, dtype=dtype).to(device)
    g_h = torch.randn(4, generator=gen, dtype=dtype).to(device)
    with poisoned():
        fresh = torch.empty(4, vocab, dtype=dtype, device=device)
    backward(g_lp, g_h, z, y, None, got[2], got[1], 0.8, fresh)
    exact = torch.empty(4, vocab, dtype=torch.float64)
    reference_backward(g_lp.cpu().double(), g_h.cpu().double(), z.cpu().double(), y.cpu(), None,
                       exp[2], exp[1], 0.8, exact)
    torch.testing.assert_close(fresh.cpu().double(), exact, rtol=ACC_RTOL[dtype] * 100, atol=ACC_RTOL[dtype] * 10)
    # Into a strided view of another buffer: the same bits there, zeros left around it.
    other = torch.zeros(8, vocab + 11, dtype=dtype, device=device)
    backward(g_lp, g_h, z, y, None, got[2], got[1], 0.8, other[::2, 4 : 4 + vocab])
    assert torch.equal(other[::2, 4 : 4 + vocab], fresh)
    around = torch.ones_like(other, dtype=torch.bool)
    around[::2, 4 : 4 + vocab] = False
    assert (other[around] == 0).all()
    # In place: the view holds the gradient, the rest of the buffer is untouched.
    before = buf.clone()
    backward(g_lp, g_h, z, y, None, got[2], got[1], 0.8, z)
    assert torch.equal(z, fresh) and torch.equal(buf[around], before[around])


@functools.lru_cache(maxsize=1)
def huge_vocabulary_case(n, dtype):
    """(inputs, spec outputs, tolerances) of n rows of V = 128k + 37 logits, shared by
    every backend: computing the float64 spec costs more than most kernels."""
    vocab = 131072 + 37
    gen = torch.Generator().manual_seed(n)
    z = (torch.randn(n, vocab, generator=gen) * 4).to(dtype)
    z[0, vocab - 5] = 30.0  # the row max in the last segment, after many rescales
    targets = torch.tensor([vocab - 1, 0, 12345][:n])
    valid = torch.tensor([True, True, False][:n])
    g = torch.randn(n, generator=gen)
    tau = 0.9
    exp, (shifted, stats_shifted) = exact_forward(z, targets, valid, tau)
    exact = torch.empty(z.shape, dtype=torch.float64)
    reference_backward(g.double(), -g.double(), shifted, targets, valid, stats_shifted, exp[1], tau, exact)
    keep = keep_rows(targets, valid)
    tols = forward_tolerance(z, tau), backward_tolerance(z, targets, keep, tau, exp[2], g, g, exact)
    return (z, targets, valid, g, tau), exp, exact, tols


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 3])
def test_huge_vocabulary_few_rows(n, dtype, backend, device, poisoned):
    """Few rows and V >= 128k: the C++ kernel cuts rows into segments (one task each)
    whose partial sums merge, and the backward writes each segment from its own task;
    Triton streams 8192-wide chunks."""
    forward, backward = kernels(backend, device, block_v=8192)
    (z, targets, valid, g, tau), exp, exact, (tol, grad_tol) = huge_vocabulary_case(n, dtype)
    zd, yd, vd, gd = on(device, z, targets, valid, g)
    with poisoned():
        logp, entropy, stats = forward(zd, yd, vd, tau)
    for name, got, e in zip(("logp", "entropy", "stats"), (logp, entropy, stats), exp):
        assert_close_with(got, e, tol if got.dim() == 1 else tol[:, None], name)
    stats_in, ent_in = (x.to(torch.float32).to(device) for x in exp[2:0:-1])
    with poisoned():
        out = torch.empty_like(zd)
        backward(gd, -gd, zd, yd, vd, stats_in, ent_in, tau, out)
    assert_close_with(out, exact, grad_tol, "grad")
    zd = zd.clone()
    backward(gd, -gd, zd, yd, vd, stats_in, ent_in, tau, zd)  # in place
    assert torch.equal(zd, out)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_row_offsets_beyond_int32_elements(backend, device):
    """Rows more than 2^31 elements into the buffer: a (3, V) fp16 view with a row stride
    of 2^30 + 64, so row 2 starts at 2^31 + 128 elements - past int32 although the stride
    itself fits. Row 1 is ignored, so only a few pages of the 4 GiB buffer are touched
    (on a GPU the -m gpu tests cover large buffers)."""
    if device != "cpu":
        pytest.skip("a CPU buffer that is mostly never touched")
    forward, backward = kernels(backend, device)
    vocab = 3 * CHUNK + 1 if interpreted(backend, device) else 1025
    z = rows_beyond_int32(vocab)
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(2, vocab, generator=gen).half()
    z[0], z[2] = rows[0], rows[1]
    y = torch.tensor([vocab - 1, -100, 5])
    dense = torch.stack([rows[0], rows[0], rows[1]]).double()  # the same rows, contiguous
    exp = reference_forward(dense, y, None, 1.0)
    got = forward(z, y, None, 1.0)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g.double(), e, rtol=1e-6, atol=1e-6)
    g_lp = torch.tensor([1.0, 1.0, -2.0])
    exact = torch.empty(3, vocab, dtype=torch.float64)
    reference_backward(g_lp.double(), None, dense, y, None, exp[2], exp[1], 1.0, exact)
    # In place, so the stores too land 2^31 elements out.
    backward(g_lp, None, z, y, None, got[2], got[1], 1.0, z)
    torch.testing.assert_close(z[[0, 2]].double(), exact[[0, 2]], rtol=2e-3, atol=1e-6)
    assert bool((z[1] == 0).all())


# Direct callers of a kernel get errors, not out-of-bounds reads. The spec (reference)
# checks nothing: the op checks its inputs before any kernel runs. Each entry: the change
# to good arguments and the message each backend's own checks raise (the C++ binding a
# RuntimeError, Triton a ValueError).
ERRORS = {"cpp": RuntimeError, "triton": ValueError}


def _forward_args(device, **change):
    args = {"logits": torch.randn(3, 8), "targets": torch.tensor([0, 1, 2]), "valid": None,
            "temperature": 1.0}
    args.update(change)
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args.values())


def _backward_args(device, **change):
    z = torch.randn(3, 8)
    args = {
        "grad_logp": torch.ones(3), "grad_entropy": None, "logits": z,
        "targets": torch.tensor([0, 1, 2]), "valid": None, "stats": torch.zeros(3, 2),
        "entropy": torch.zeros(3), "temperature": 1.0, "out": torch.empty_like(z),
    }
    args.update(change)
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args.values())


_WIDE = torch.randn(3, 9)
BAD_FORWARD = {
    "logits not 2-D": ({"logits": torch.randn(8)}, {"cpp": "must be \\(N, V\\)", "triton": "must be \\(N, V\\)"}),
    "integer logits": ({"logits": torch.ones(3, 8, dtype=torch.long)}, {"cpp": "fp16, bf16, fp32"}),
    "vocabulary strided": (
        {"logits": torch.randn(8, 3).t()},
        {"cpp": "contiguous along the vocab", "triton": "contiguous last dimension"},
    ),
    "int32 targets": ({"targets": torch.tensor([0, 1, 2], dtype=torch.int32)}, {"cpp": "targets must be"}),
    "targets too short": ({"targets": torch.tensor([0, 1])}, {"cpp": "targets must be", "triton": "targets and valid"}),
    "float mask": ({"valid": torch.ones(3)}, {"cpp": "valid must be"}),
    "mask too short": ({"valid": torch.ones(2, dtype=torch.bool)}, {"cpp": "valid must be", "triton": "targets and valid"}),
    "zero temperature": ({"temperature": 0.0}, {"cpp": "temperature"}),
    "negative temperature": ({"temperature": -1.0}, {"cpp": "temperature"}),
    "nan temperature": ({"temperature": math.nan}, {"cpp": "temperature"}),
    "inf temperature": ({"temperature": math.inf}, {"cpp": "temperature"}),
}
# Targets outside [0, V) and not -100, on a valid row or a masked one: the forward and
# the backward refuse them (an out-of-row read otherwise).
BAD_TARGETS = {
    f"target {bad}{' masked' if masked else ''}": (bad, masked, {"cpp": "targets must lie in"})
    for bad in (5, 6, -1, -99, -101, 2**40, -(2**40))
    for masked in (False, True)
}
BAD_BACKWARD = {
    "grad dtype": ({"grad_logp": torch.ones(3, dtype=torch.float64)}, {"cpp": "grad_logp must be"}),
    "grad length": ({"grad_logp": torch.ones(2)}, {"cpp": "grad_logp must be"}),
    "grad_entropy length": ({"grad_entropy": torch.ones(2)}, {"cpp": "grad_entropy must be"}),
    "stats length": ({"stats": torch.zeros(2, 2)}, {"cpp": "stats must be"}),
    "stats flat": ({"stats": torch.zeros(3)}, {"cpp": "stats must be"}),
    "entropy dtype": ({"entropy": torch.zeros(3, dtype=torch.float16)}, {"cpp": "entropy must be"}),
    "out dtype": ({"out": torch.empty(3, 8, dtype=torch.float64)}, {"cpp": "out must be"}),
    "out shape": ({"out": torch.empty(3, 7)}, {"cpp": "out must be", "triton": "out has shape"}),
    "out rows overlap": ({"out": torch.empty(1, 8).expand(3, 8)}, {"cpp": "out rows must not overlap"}),
    "out overlaps logits": ({"logits": _WIDE[:, :8], "out": _WIDE[:, 1:]}, {"cpp": "not overlap it"}),
}


@pytest.mark.parametrize("backend,device,name", backend_cases("logprobs", {k: v[1] for k, v in BAD_FORWARD.items()}))
def test_bad_forward_arguments_raise(backend, device, name):
    change, messages = BAD_FORWARD[name]
    forward, _ = kernels(backend, device)
    with pytest.raises(ERRORS[backend], match=messages[backend]):
        forward(*_forward_args(device, **change))


@pytest.mark.parametrize("backend,device,name", backend_cases("logprobs", {k: v[2] for k, v in BAD_TARGETS.items()}))
def test_bad_targets_raise(backend, device, name):
    bad, masked, messages = BAD_TARGETS[name]
    forward, backward = kernels(backend, device)
    z = torch.randn(3, 5, device=device)
    targets = torch.tensor([0, bad, 4], device=device)
    valid = torch.tensor([True, not masked, True], device=device)
    with pytest.raises(ERRORS[backend], match=messages[backend]):
        forward(z, targets, valid, 1.0)
    ok = forward(z, torch.tensor([0, 1, 4], device=device), None, 1.0)
    with pytest.raises(ERRORS[backend], match=messages[backend]):
        backward(torch.ones(3, device=device), None, z, targets, valid, ok[2], ok[1], 1.0, torch.empty_like(z))


@pytest.mark.parametrize("backend,device,name", backend_cases("logprobs", {k: v[1] for k, v in BAD_BACKWARD.items()}))
def test_bad_backward_arguments_raise(backend, device, name):
    change, messages = BAD_BACKWARD[name]
    _, backward = kernels(backend, device)
    with pytest.raises(ERRORS[backend], match=messages[backend]):
        backward(*_backward_args(device, **change))


# --------------------------------------------------------------------------------------
# GPU only: every CUDA backend's compiled kernels at the default launch plan, a real
# vocabulary (152k), rows beyond 2^31 elements


def _torch_fp32(z, y, temperature):
    """logp, entropy and the fp32 gradient of (logp + entropy).sum() by torch autograd."""
    z32 = z.float().requires_grad_()
    logsm = torch.log_softmax(z32 / temperature, -1)
    logp = logsm.gather(-1, y[:, None]).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    (logp.sum() + ent.sum()).backward()
    return logp.detach(), ent.detach(), z32.grad


@pytest.mark.gpu
@pytest.mark.parametrize("backend,device", ON_GPU)
def test_gpu_big_vocab_bf16_matches_torch_fp32(backend, device):
    forward = kernel_of("token_logprobs", backend, device)
    backward = kernel_of("token_logprobs_backward", backend, device)
    torch.manual_seed(0)
    n, vocab = 8192, 152064
    z = (4 * torch.randn(n, vocab, device=device)).bfloat16()
    y = torch.randint(0, vocab, (n,), device=device)
    logp, ent, stats = forward(z, y, None, 0.9)
    e_logp, e_ent, e_grad = _torch_fp32(z, y, 0.9)
    torch.testing.assert_close(logp, e_logp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent, e_ent, rtol=1e-5, atol=1e-4)
    ones = torch.ones(n, device=device)
    grad = torch.empty_like(z)
    backward(ones, ones, z, y, None, stats, ent, 0.9, grad)
    torch.testing.assert_close(grad.float(), e_grad, rtol=2**-7, atol=1e-6)
    backward(ones, ones, z, y, None, stats, ent, 0.9, z)  # in place
    assert torch.equal(z, grad)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,device", ON_GPU)
def test_gpu_beyond_int32_elements(backend, device):
    """N x V = 16384 x 152064 > 2^31 bf16 logits (~5 GB): rows past the int32 range."""
    forward = kernel_of("token_logprobs", backend, device)
    backward = kernel_of("token_logprobs_backward", backend, device)
    n, vocab = 16384, 152064
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * vocab * 2:
        pytest.skip("not enough GPU memory")
    torch.manual_seed(1)
    z = 3 * torch.randn(n, vocab, device=device, dtype=torch.bfloat16)
    y = torch.randint(0, vocab, (n,), device=device)
    logp, ent, stats = forward(z, y, None, 1.0)
    tail = slice(n - 64, n)  # rows whose offsets exceed 2^31 elements
    assert (n - 64) * vocab > 2**31
    e_logp, e_ent, e_grad = _torch_fp32(z[tail], y[tail], 1.0)
    torch.testing.assert_close(logp[tail], e_logp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent[tail], e_ent, rtol=1e-5, atol=1e-4)
    ones = torch.ones(n, device=device)
    backward(ones, ones, z, y, None, stats, ent, 1.0, z)  # in place
    torch.testing.assert_close(z[tail].float(), e_grad, rtol=2**-7, atol=1e-6)


# --------------------------------------------------------------------------------------
# In-place backward: saves an N x V buffer, and is refused or safe where it would hurt


@pytest.mark.parametrize("backend", ON_CPU)
def test_inplace_backward_equals_out_of_place(backend):
    w = torch.randn(6, 33, requires_grad=True)
    y = torch.randint(0, 33, (6,))

    def grad_of_w(inplace: bool):
        w.grad = None
        logits = w * 2.0  # a temporary, as the LM head's output is
        logp, ent = token_logprobs(logits, y, return_entropy=True, inplace_backward=inplace, backend=backend)
        (logp.sum() + 0.1 * ent.sum()).backward()
        return w.grad.clone(), logits.detach()

    expected, _ = grad_of_w(False)
    got, logits_after = grad_of_w(True)
    assert torch.equal(got, expected)
    # the logits buffer now holds the gradient: the documented hazard
    assert not torch.equal(logits_after, w.detach() * 2.0)


@pytest.mark.parametrize("backend", ON_CPU)
def test_inplace_backward_refuses_leaf_logits(backend):
    # At the call (as policy_loss_from_logits does), not at the backward.
    z = torch.randn(3, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf tensor"):
        token_logprobs(z, torch.tensor([0, 1, 2]), inplace_backward=True, backend=backend)
    with torch.no_grad():  # no backward, nothing overwritten: nothing to refuse
        token_logprobs(z, torch.tensor([0, 1, 2]), inplace_backward=True, backend=backend)
    # The op itself (a direct caller) still refuses at the backward.
    logp, _, _ = torch.ops.vapo.token_logprobs(z, torch.tensor([0, 1, 2]), None, 1.0, True, backend)
    with pytest.raises(RuntimeError, match="leaf tensor"):
        logp.sum().backward()
    assert z.grad is None


@pytest.mark.parametrize("backend", ON_CPU)
def test_inplace_backward_is_caught_when_another_node_still_needs_the_logits(backend):
    w = torch.randn(3, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    logits = w * 1.0
    other = (logits**2).sum()  # saves `logits`; its backward runs after ours
    logp = token_logprobs(logits, y, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logp.sum() + other).backward()
    # A consumer whose backward runs BEFORE ours reads the logits untouched: correct.
    w.grad = None
    logits = w * 1.0
    logp = token_logprobs(logits, y, inplace_backward=True, backend=backend)
    (logp.sum() + (logits**2).sum()).backward()
    got = w.grad.clone()
    w.grad = None
    logits = w * 1.0
    (token_logprobs(logits, y, backend=backend).sum() + (logits**2).sum()).backward()
    torch.testing.assert_close(got, w.grad)


# --------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument

Z = torch.randn(4, 10)
Y = torch.tensor([0, 1, 2, 3])
BAD = [
    ("targets must lie in", ValueError, lambda b: token_logprobs(Z, torch.tensor([0, 1, 2, 10]), backend=b)),
    ("targets must lie in", ValueError, lambda b: token_logprobs(Z, torch.tensor([0, 1, -101, 3]), backend=b)),
    ("targets must lie in", ValueError, lambda b: token_logprobs(Z, torch.tensor([0, 1, -1, 3]), backend=b)),
    ("targets has shape", ValueError, lambda b: token_logprobs(Z, torch.tensor([0, 1, 2]), backend=b)),
    ("targets must be int64", TypeError, lambda b: token_logprobs(Z, Y.float(), backend=b)),
    ("logits must be float", TypeError, lambda b: token_logprobs(Z.long(), Y, backend=b)),
    ("logits must be \\(N, V\\)", ValueError, lambda b: token_logprobs(torch.randn(10), torch.tensor(1), backend=b)),
    ("targets is on meta", ValueError, lambda b: token_logprobs(Z, Y.to("meta"), backend=b)),
    ("mask has shape", ValueError, lambda b: token_logprobs(Z, Y, mask=torch.ones(3, dtype=torch.bool), backend=b)),
    ("temperature must lie in", ValueError, lambda b: token_logprobs(Z, Y, temperature=0.0, backend=b)),
    ("temperature must lie in", ValueError, lambda b: token_logprobs(Z, Y, temperature=float("inf"), backend=b)),
    ("at least 1 entry", ValueError, lambda b: token_logprobs(torch.randn(4, 0), Y, backend=b)),
    # the op itself (the public function copies such logits: see the test below)
    ("contiguous along the vocabulary", ValueError,
     lambda b: torch.ops.vapo.token_logprobs(torch.randn(10, 4).t(), Y, None, 1.0, False, b)),
]


@pytest.mark.parametrize("backend", ON_CPU)
@pytest.mark.parametrize("match,exc,call", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_clear_error(backend, match, exc, call):
    with pytest.raises(exc, match=match):
        call(backend)


def test_strided_rows_are_read_in_place():
    wide = torch.randn(5, 40)
    view = wide[:, 3:20]  # row stride 40, vocabulary 17: no copy needed
    y = torch.randint(0, 17, (5,))
    got = token_logprobs(view, y)
    torch.testing.assert_close(got, fp64_reference(view, y, 1.0)[0].float())


@pytest.mark.parametrize("backend", ON_CPU)
def test_shifted_logits_are_copied_once_and_differentiate_to_the_original(backend):
    # logits[:, :-1] (a model output shifted by one) has no (N, V) row view: the public
    # functions copy it under autograd, as the peers' log_softmax would.
    full = torch.randn(2, 6, 11, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (2, 5))
    got = token_logprobs(full[:, :-1], y, backend=backend)
    want = torch.log_softmax(full[:, :-1], -1).gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(got, want)
    (g,) = torch.autograd.grad(got.sum(), full)
    (w,) = torch.autograd.grad(want.sum(), full)
    torch.testing.assert_close(g, w)
    loss, _ = vk.policy_loss_from_logits(full[:, :-1], y, want.detach(), torch.ones(2, 5),
                                         inplace_backward=True, backend=backend)
    loss.backward()  # the copy is ours to overwrite; full is untouched
    assert torch.isfinite(full.grad).all()


@pytest.mark.parametrize("backend", ON_CPU)
def test_inplace_backward_refuses_memory_the_caller_owns_or_that_overlaps(backend):
    leaf = torch.randn(4, 9, requires_grad=True)
    y = torch.randint(0, 9, (4,))
    for view in (leaf[:, :], leaf.view(1, 4, 9)):  # views of a leaf: still the caller's
        with pytest.raises(RuntimeError, match="leaf tensor \\(or a view of one\\)"):
            token_logprobs(view, y.view(view.shape[:-1]), inplace_backward=True, backend=backend)
        with pytest.raises(RuntimeError, match="leaf tensor \\(or a view of one\\)"):
            vk.policy_loss_from_logits(view, y.view(view.shape[:-1]), -torch.ones(y.shape),
                                       torch.ones(y.shape), cu_seqlens=torch.tensor([0, 4])
                                       if view.dim() == 2 else None, inplace_backward=True)
    expanded = (leaf[:1] * 1.0).expand(4, 9)  # four rows, one row of memory
    with pytest.raises(ValueError, match="rows overlap in memory"):
        token_logprobs(expanded, y, inplace_backward=True, backend=backend)


@pytest.mark.parametrize("backend", ON_CPU)
def test_a_masked_row_may_hold_any_target_id(backend):
    z = torch.randn(3, 7)
    y = torch.tensor([2, -1, 50_000])
    mask = torch.tensor([True, False, False])
    got = token_logprobs(z, y, mask, backend=backend)
    assert got[1:].eq(0).all() and torch.equal(got[:1], token_logprobs(z[:1], y[:1], backend=backend))
    with pytest.raises(ValueError, match="targets must lie in"):
        token_logprobs(z, y, torch.tensor([True, True, False]), backend=backend)
    h, w = torch.randn(3, 4), torch.randn(7, 4)
    cu = torch.tensor([0, 3])
    assert vk.linear_logprobs(h, w, y, mask, backend=backend)[1:].eq(0).all()
    loss, _ = vk.policy_loss_from_hidden(h, w, y, -torch.ones(3), torch.ones(3), mask, cu,
                                         backend=backend)
    want, _ = vk.policy_loss_from_hidden(h, w, y.clamp(0, 6), -torch.ones(3), torch.ones(3),
                                         mask, cu, backend=backend)
    assert torch.equal(loss, want)
    loss, _ = vk.policy_loss_from_logits(z, y, -torch.ones(3), torch.ones(3), mask, cu,
                                         backend=backend)
    assert torch.isfinite(loss)


def test_meta_tensors_go_to_the_fake_kernels():
    z = torch.empty(2, 5, 11, device="meta")
    y = torch.empty(2, 5, dtype=torch.long, device="meta")
    assert token_logprobs(z, y).shape == (2, 5)
    r = torch.empty(2, 5, device="meta")
    adv, ret = vk.gae(r, r)
    assert adv.shape == (2, 5) and adv.device.type == "meta"


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_every_public_function_runs_on_meta_tensors_with_a_mask(mask_dtype):
    # With a mask and validation on, the wrappers' data checks (masked target ids, the
    # mask's 0/1 check) called .item() on meta tensors (README review): they skip now.
    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, device="meta", dtype=dtype)

    B, T, V, H = 2, 4, 5, 3
    mask, ids = meta(B, T, dtype=mask_dtype), meta(B, T, dtype=torch.long)
    x = meta(B, T)
    calls = {
        "gae": lambda: vk.gae(x, x, mask, whiten=True),
        "decoupled_gae": lambda: vk.decoupled_gae(x, x, mask, alpha=0.5, whiten=True),
        "masked_whiten": lambda: vk.masked_whiten(x, mask),
        "token_logprobs": lambda: vk.token_logprobs(meta(B, T, V), ids, mask, return_entropy=True),
        "linear_logprobs": lambda: vk.linear_logprobs(meta(B, T, H), meta(V, H), ids, mask),
        "vapo_loss": lambda: vk.vapo_loss(
            x, x, x, mask, values=x, old_values=x, returns=x,
            positive=meta(B, dtype=torch.bool)),
        "agg_loss": lambda: vk.agg_loss(x, mask),
        "from_logits": lambda: vk.policy_loss_from_logits(meta(B, T, V), ids, x, x, mask),
        "from_hidden": lambda: vk.policy_loss_from_hidden(meta(B, T, H), meta(V, H), ids, x, x, mask),
    }
    for name, call in calls.items():
        out = call()
        first = out[0] if isinstance(out, tuple) else out
        assert first.device.type == "meta", name


# --------------------------------------------------------------------------------------
# torch.library


def test_opcheck():
    z = torch.randn(5, 11, requires_grad=True)
    y = torch.tensor([0, 3, -100, 10, 4])
    m = torch.tensor([True, True, True, False, True])
    for backend in ON_CPU:
        torch.library.opcheck(torch.ops.vapo.token_logprobs.default, (z, y, m, 0.9, False, backend))
        torch.library.opcheck(torch.ops.vapo.token_logprobs.default, (z.view(1, 5, 11), y.view(1, 5), None, 1.0, False, backend))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_and_backward(compile_backend):
    torch._dynamo.reset()

    def loss_fn(h, w, y):
        logits = h @ w.t()
        logp, ent = token_logprobs(logits, y, temperature=0.9, return_entropy=True)
        return -(logp.mean()) - 0.01 * ent.mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=compile_backend)
    h = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(30, 16, requires_grad=True)
    y = torch.randint(0, 30, (8,))
    out = compiled(h, w, y)
    out.backward()
    g = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    ref = loss_fn(h, w, y)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g[0], h.grad)
    torch.testing.assert_close(g[1], w.grad)


# --- found by an adversarial review (2026-12-07) ---------------------------------------


def _masked_garbage_inputs():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, generator=g)
    targets = torch.randint(0, 5, (2, 3), generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    clean = targets.clone()
    targets[0, 2], targets[1, 1] = 50_000, -7  # garbage where the caller masked
    return logits, targets, clean, mask


def test_masked_garbage_targets_under_compile_and_vmap():
    """Garbage ids in masked rows change nothing in eager mode; under torch.compile and
    vmap (no branch on the values there) they did raise or crash."""
    logits, targets, clean, mask = _masked_garbage_inputs()
    want = vk.token_logprobs(logits, clean, mask)
    torch.testing.assert_close(vk.token_logprobs(logits, targets, mask), want, rtol=0, atol=0)
    compiled = torch.compile(lambda z: vk.token_logprobs(z, targets, mask), backend="aot_eager")
    torch.testing.assert_close(compiled(logits), want, rtol=0, atol=0)
    old, adv = torch.randn(2, 3) - 1.5, torch.randn(2, 3)
    loss = torch.compile(lambda z: vk.policy_loss_from_logits(z, targets, old, adv, mask)[0],
                         backend="aot_eager")(logits)
    torch.testing.assert_close(loss, vk.policy_loss_from_logits(logits, clean, old, adv, mask)[0],
                               rtol=0, atol=0)
    batched = torch.func.vmap(lambda z, t, m: vk.token_logprobs(z, t, m))(
        logits[None].expand(2, -1, -1, -1), targets[None].expand(2, -1, -1), mask[None].expand(2, -1, -1))
    torch.testing.assert_close(batched, torch.stack([want, want]), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_plus_inf_logit_in_a_valid_row_is_refused_by_every_backend(backend):
    logits = torch.randn(1, 2, 4)
    logits[0, 0, 1] = math.inf
    targets = torch.tensor([[2, 0]])
    old, adv = torch.full((1, 2), -1.0), torch.ones(1, 2)
    with pytest.raises(ValueError, match=r"\+inf"):
        vk.policy_loss_from_logits(logits, targets, old, adv, entropy_coef=0.1, backend=backend)
    # token_logprobs too (it returned a NaN row, a review found): named, with the row.
    with pytest.raises(ValueError, match=r"logits contain NaN or \+inf.*row 0"):
        vk.token_logprobs(logits, targets, return_entropy=True, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, "all -inf"])
def test_token_logprobs_names_a_non_finite_valid_row_and_ignores_a_masked_one(backend, bad):
    logits = torch.randn(2, 3, 5)
    if bad == "all -inf":
        logits[1, 2] = -math.inf
    else:
        logits[1, 2, 3] = bad
    targets = torch.randint(0, 5, (2, 3))
    with pytest.raises(ValueError, match=r"logits contain NaN or \+inf \(or only -inf\).*row 5"):
        vk.token_logprobs(logits, targets, backend=backend)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    clean = logits.clone()
    clean[1, 2] = 0.0
    assert torch.equal(vk.token_logprobs(logits, targets, mask, backend=backend),
                       vk.token_logprobs(clean, targets, mask, backend=backend))
    vk.set_validation(False)
    try:  # validation off: no check, no sync; the row is NaN as log_softmax gives it
        assert math.isnan(vk.token_logprobs(logits, targets, backend=backend)[1, 2])
    finally:
        vk.set_validation(True)


def test_two_d_logits_strided_along_the_vocabulary_are_copied_not_refused():
    logits = torch.randn(5, 4).t()  # (N=4, V=5), vocabulary stride 4
    targets = torch.tensor([0, 4, 2, 1])
    want = torch.log_softmax(logits.double(), -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(vk.token_logprobs(logits, targets).double(), want)
