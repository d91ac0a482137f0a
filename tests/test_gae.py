"""GAE op family: every backend the registry reports against the float64 reference.

The kernel-vs-reference checks are parametrised over ``vk.available_backends("gae")``
(tests/strategies.py): reference, C++, Triton (through the interpreter on CPU, with
16-token chunks and a random number of segments so that small rows cross chunk and segment
boundaries) and, with a GPU, the CUDA devices. Below them: checks of one backend's own
machinery (the C++ chunked scan, the Triton launch plans and combine algebra). The CUDA
C++ kernel's launch configurations have their own GPU-only file, tests/test_gae_cuda.py,
and its block algorithm runs on a host emulator in tests/test_gae_cuda_host.py.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vapo_kernels as vk
from strategies import (
    GARBAGE, MASK_KINDS, backend_params, cu_seqlens, examples, kernel_of, ragged_lengths,
    ragged_mask, to_packed, to_padded,
)
from vapo_kernels import _backends
from vapo_kernels.ops.gae import reference_kernel
from vapo_kernels.triton import gae as tg

BACKENDS = backend_params("gae")
# Checks on CPU tensors (by-hand values, errors, dtypes): every backend that runs there.
ON_CPU = vk.available_backends("gae", "cpu")
TRITON_BLOCK = 16  # tokens per Triton chunk in these tests (the interpreter's default is 32)


pytestmark = pytest.mark.usefixtures("extension_built")  # on CI a broken C++ build fails loudly


@contextlib.contextmanager
def triton_plan(segments: int = 1):
    """Triton launches within the block use 16-token chunks and ``segments`` pieces per
    sequence (the automatic plan on CPU is always one), so the public op reaches chunk and
    segment boundaries on small inputs."""
    saved = tg.INTERPRET_BLOCK, tg._auto_segments
    tg.INTERPRET_BLOCK, tg._auto_segments = TRITON_BLOCK, lambda *_: segments
    try:
        yield
    finally:
        tg.INTERPRET_BLOCK, tg._auto_segments = saved


# --------------------------------------------------------------------------------------
# Random ragged batches


@st.composite
def ragged_batches(draw, max_seqs=6, max_len=80):
    return {
        "lengths": draw(ragged_lengths(max_seqs, max_len)),
        "packed": draw(st.booleans()),
        "mask_kind": draw(st.sampled_from(MASK_KINDS)),
        "mode": draw(st.sampled_from(["skip", "zero"])),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        "gamma": draw(st.one_of(st.sampled_from([0.0, 0.5, 0.99, 1.0]), st.floats(0, 1))),
        "lam": draw(st.one_of(st.sampled_from([0.0, 0.95, 1.0]), st.floats(0, 1))),
        "per_seq_lam": draw(st.booleans()),
        "segments": draw(st.sampled_from([1, 1, 2, 4])),  # Triton's plan; others ignore it
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def build(case):
    """Inputs of one case in the flat (packed) form, on CPU."""
    gen = torch.Generator().manual_seed(case["seed"])
    lengths = case["lengths"]
    n = sum(lengths)
    rewards = torch.randn(n, generator=gen, dtype=torch.float64).to(case["dtype"])
    values = torch.randn(n, generator=gen, dtype=torch.float64).to(case["dtype"])
    mask = ragged_mask(case["mask_kind"], lengths, gen)
    lam = (
        torch.rand(len(lengths), generator=gen, dtype=torch.float64)
        if case["per_seq_lam"]
        else case["lam"]
    )
    return rewards, values, mask, cu_seqlens(lengths), lam


def expected_flat(rewards, values, mask, cu, lam, gamma, mode):
    num_seqs = cu.numel() - 1
    lam_t = lam if isinstance(lam, torch.Tensor) else torch.full((num_seqs,), lam, dtype=torch.float64)
    coef = gamma * lam_t.to(torch.float64)
    return reference_kernel(
        rewards.double(), values.double(), mask, cu.long(), coef, coef, gamma, mode == "skip"
    )


def run_public(case, backend, device, rewards, values, mask, cu, *, fn=None, garbage=None, **kw):
    """``fn`` (vk.gae) on ``device`` in the case's layout; outputs packed, on CPU.
    ``garbage``: the value of every masked slot and, padded, of every padding slot."""
    fn = fn or vk.gae
    if garbage is not None:
        rewards = torch.where(mask, rewards, garbage)
        values = torch.where(mask, values, garbage)
    mask_arg = None if case["mask_kind"] == "none" else mask
    dev = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x
    kw = {k: dev(v) for k, v in kw.items()}
    plan = triton_plan(case["segments"]) if backend == "triton" else contextlib.nullcontext()
    with plan:
        if case["packed"]:
            args = [dev(x) for x in (rewards, values, mask_arg, cu)]
            out = fn(*args, gamma=case["gamma"], mask_mode=case["mode"], backend=backend, **kw)
            return [x.cpu() for x in out]
        fill = 0 if garbage is None else garbage
        # Padded input always needs a mask to mark the padding of short rows.
        args = [dev(to_padded(x, cu, f)) for x, f in ((rewards, fill), (values, fill), (mask, False))]
        out = fn(*args, gamma=case["gamma"], mask_mode=case["mode"], backend=backend, **kw)
        return [to_packed(x.cpu(), cu) for x in out]


def serial_tolerance(dtype, expected: torch.Tensor, max_len: int) -> float:
    """Backends that run each sequence as one loop (reference, C++ below its chunk size):
    the error of a length-L recurrence grows at most ~L * eps * scale."""
    scale = 1 + (expected.abs().max().item() if expected.numel() else 0)
    if dtype == torch.float64:
        return 1e-11 * (1 + max_len) * scale
    return 4 * (1 + max_len) * 1.2e-7 * scale


def scan_tolerance(rewards, values, cu, dtype) -> torch.Tensor:
    """Parallel scans (Triton, CUDA) compose affine maps in a tree: a per-token budget
    relative to the size of the sum from t on, rel * (1 + sum_{k >= t} (|r_k| + |V_k|) + |V_t|)."""
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    mag = rewards.double().abs() + values.double().abs()
    to_go = torch.empty_like(mag)
    for s, e in itertools.pairwise(cu.tolist()):
        to_go[s:e] = mag[s:e].flip(0).cumsum(0).flip(0)
    return rel * (1 + to_go + values.double().abs())


def assert_matches(got, exp, tol, what):
    got = got.double()
    assert got.shape == exp.shape, what
    # Every element, masked ones included: a slot left unwritten (NaN-poisoned) fails.
    err = (got - exp).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} elements off, worst err {err.max().item():.3g} at "
        f"{int(err.argmax())} (tol there {torch.as_tensor(tol).expand_as(err)[err.argmax()].item():.3g})"
    )


# --------------------------------------------------------------------------------------
# Correctness against the float64 spec, every backend


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_matches_float64_reference(backend, device, poisoned):
    @examples(backend, device, cpu=60, interpreted=30)
    @given(case=ragged_batches())
    def check(case):
        rewards, values, mask, cu, lam = build(case)
        with poisoned():
            adv, ret = run_public(case, backend, device, rewards, values, mask, cu, lam=lam)
        exp_adv, exp_ret = expected_flat(rewards, values, mask, cu, lam, case["gamma"], case["mode"])
        out_dtype = torch.float64 if case["dtype"] == torch.float64 else torch.float32
        assert adv.dtype == ret.dtype == out_dtype
        max_len = max(case["lengths"], default=0)
        for got, exp, what in ((adv, exp_adv, "advantages"), (ret, exp_ret, "returns")):
            if backend in ("reference", "cpp"):
                tol = serial_tolerance(case["dtype"], exp, max_len)
            else:
                tol = scan_tolerance(rewards, values, cu, case["dtype"])
            assert_matches(got, exp, tol, what)

    check()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", ["skip", "zero"])
def test_garbage_in_masked_and_padded_slots_changes_no_valid_output(backend, device, mode):
    @examples(backend, device, cpu=30, interpreted=6)
    @given(case=ragged_batches(), garbage=st.sampled_from(GARBAGE))
    def check(case, garbage):
        case = {**case, "mode": mode, "mask_kind": "turns"}
        rewards, values, mask, cu, lam = build(case)
        clean = run_public(case, backend, device, rewards, values, mask, cu, lam=lam)
        dirty = run_public(case, backend, device, rewards, values, mask, cu, lam=lam, garbage=garbage)
        for a, b in zip(clean, dirty):
            assert torch.equal(a[mask], b[mask])  # bit for bit
        # Advantages of masked tokens are carried from the next valid token (skip mode)
        # or computed with r = V = 0 there (zero mode), so they are garbage-free too.
        assert torch.equal(clean[0], dirty[0])
        if mode == "zero":  # returns too; skip mode adds the slot's own raw V, as verl does
            assert torch.equal(clean[1], dirty[1])

    check()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_decoupled_is_two_single_lambda_runs_in_one_pass(backend, device):
    @examples(backend, device, cpu=30, interpreted=4)
    @given(case=ragged_batches(), lam_critic=st.sampled_from([1.0, 0.9]))
    def check(case, lam_critic):
        case = {**case, "dtype": torch.float64}
        rewards, values, mask, cu, lam = build(case)
        args = (case, backend, device, rewards, values, mask, cu)
        adv, targets = run_public(*args, fn=vk.decoupled_gae, lam_policy=lam, lam_critic=lam_critic)
        assert torch.equal(adv, run_public(*args, lam=lam)[0])
        assert torch.equal(targets, run_public(*args, lam=lam_critic)[1])

    check()


@pytest.mark.parametrize("backend", ON_CPU)
def test_skip_semantics_by_hand(backend):
    # One sequence: valid, masked (tool output), valid, trailing pad. gamma = 0.5, lam = 1.
    r = torch.tensor([[1.0, 100.0, 2.0, 7.0]])
    v = torch.tensor([[0.5, 9.0, 0.25, 3.0]])
    m = torch.tensor([[True, False, True, False]])
    adv, ret = vk.gae(r, v, m, gamma=0.5, lam=1.0, backend=backend)
    a2 = 2.0 - 0.25  # last valid token: nothing after it
    a0 = 1.0 + 0.5 * 0.25 - 0.5 + 0.5 * a2  # the masked token is skipped: V_next = V_2
    torch.testing.assert_close(adv, torch.tensor([[a0, a2, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a2 + 9.0, a2 + 0.25, 3.0]]))
    # zero mode: V and r of masked tokens are 0 and the recurrence runs through them.
    adv, ret = vk.gae(r, v, m, gamma=0.5, lam=1.0, mask_mode="zero", backend=backend)
    z2 = 2.0 - 0.25
    z1 = 0.0 + 0.5 * 0.25 - 0.0 + 0.5 * z2
    z0 = 1.0 + 0.5 * 0.0 - 0.5 + 0.5 * z1
    torch.testing.assert_close(adv, torch.tensor([[z0, z1, z2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[z0 + 0.5, z1, z2 + 0.25, 0.0]]))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kernel_takes_any_shape(backend, device):
    """The gae kernels take rewards, values and mask in any shape (the tokens in memory
    order, as the offsets count them) and return the outputs in it: a (B, T) call is the
    (B*T,) call, bit for bit, reshaped."""
    gen = torch.Generator().manual_seed(5)
    b, t = 3, 9
    r, v = (torch.randn(b, t, generator=gen).to(device) for _ in range(2))
    m = (torch.rand(b, t, generator=gen) < 0.7).to(device)
    offs = (torch.arange(b + 1) * t).to(device)
    coef = torch.full((b,), 0.9, device=device)
    kernel = kernel_of("gae", backend, device)
    two = kernel(r, v, m, offs, coef, coef * 0.5, 0.99, True)
    one = kernel(r.reshape(-1), v.reshape(-1), m.reshape(-1), offs, coef, coef * 0.5, 0.99, True)
    for a, b_ in zip(two, one):
        assert a.shape == (b, t) and torch.equal(a.reshape(-1), b_)


# The Python-loop reference is the spec, not meant for 100k-token scans; the interpreted
# Triton scan is a Python loop too (test_triton_monte_carlo_returns_are_reward_to_go
# holds it to the same closed form on chunk-crossing lengths).
_MAX_LONG = {"reference": 20000, "triton": 1}


@pytest.mark.parametrize(
    "backend,length",
    [(b, n) for b in ON_CPU for n in (1, 16323, 40001, 127323, 131072) if n <= _MAX_LONG.get(b, n)],
)
def test_long_sequence_is_reward_to_go(backend, length):
    """gamma = lam = 1: returns are the reward-to-go over valid tokens, A = returns - V.

    Lengths above the C++ chunk size exercise the chunk-parallel path; the closed form
    (a reverse cumulative sum) keeps the check cheap in float64.
    """
    gen = torch.Generator().manual_seed(length)
    r = torch.randn(length, generator=gen, dtype=torch.float64)
    v = torch.randn(length, generator=gen, dtype=torch.float64)
    m = torch.rand(length, generator=gen) < 0.8
    cu = torch.tensor([0, length], dtype=torch.int32)
    adv, ret = vk.gae(r, v, m, cu, gamma=1.0, lam=1.0, backend=backend)
    to_go = torch.where(m, r, 0).flip(0).cumsum(0).flip(0)
    torch.testing.assert_close(ret[m], to_go[m], rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(adv[m], (to_go - v)[m], rtol=1e-12, atol=1e-9)


def test_chunked_cpu_scan_equals_serial_with_slow_decay():
    # gamma*lam close to 1 so that carries between chunks matter (no underflow shortcut).
    gen = torch.Generator().manual_seed(7)
    n = 70001
    r = torch.randn(1, n, generator=gen, dtype=torch.float64)
    v = torch.randn(1, n, generator=gen, dtype=torch.float64)
    m = torch.rand(1, n, generator=gen) < 0.5
    for mode in ("skip", "zero"):
        exp = vk.decoupled_gae(r, v, m, gamma=0.9999, lam_policy=0.9995, mask_mode=mode, backend="reference")
        got = vk.decoupled_gae(r, v, m, gamma=0.9999, lam_policy=0.9995, mask_mode=mode, backend="cpp")
        for a, b in zip(got, exp):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_big_batch_512_by_16k(poisoned):
    gen = torch.Generator().manual_seed(1)
    b, t = 512, 16384
    r = torch.randn(b, t, generator=gen)
    v = torch.randn(b, t, generator=gen)
    lengths = torch.randint(0, t + 1, (b,), generator=gen)
    m = torch.arange(t) < lengths[:, None]
    with poisoned():  # outputs this large come from the huge-page allocator: NaN-filled too
        adv, ret = vk.gae(r, v, m, gamma=1.0, lam=1.0, backend="cpp")
    assert bool(torch.isfinite(adv).all()) and bool(torch.isfinite(ret).all())
    to_go = torch.where(m, r.double(), 0).flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(ret[m].double(), to_go[m], rtol=1e-4, atol=2e-3)


# --------------------------------------------------------------------------------------
# Decoupled and length-adaptive GAE


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.float64])
def test_length_adaptive_lambda_formula_and_input_untouched(dtype):
    lengths = torch.tensor([0, 1, 5, 19, 20, 21, 100, 4096, 10**6]).to(dtype)
    kept = lengths.clone()
    for alpha in (0.013, 0.05, 1.0):
        scaled = (alpha * kept.to(torch.float64)).clamp(min=1.0)
        expected = (1.0 - 1.0 / scaled).clamp(0.0, 1.0)
        assert torch.equal(vk.length_adaptive_lambda(lengths, alpha), expected)
    assert torch.equal(lengths, kept)  # computed in place on a copy, never on the counts
    if dtype.is_floating_point:  # a differentiable input keeps working with autograd
        x = kept.clone().requires_grad_()
        vk.length_adaptive_lambda(x, 0.05).sum().backward()
        assert x.grad is not None


@pytest.mark.parametrize("backend", ON_CPU)
def test_length_adaptive_lambda(backend):
    # Valid lengths 0, 1, 20, 21, 300: alpha*l = 0, .05, 1, 1.05, 15.
    lengths = [0, 1, 20, 21, 300]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    n = sum(lengths)
    gen = torch.Generator().manual_seed(3)
    r, v = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    lam = vk.length_adaptive_lambda(torch.tensor(lengths), 0.05)
    torch.testing.assert_close(lam, torch.tensor([0.0, 0.0, 0.0, 1 - 1 / 1.05, 1 - 1 / 15], dtype=torch.float64))
    adv, targets = vk.decoupled_gae(r, v, None, cu, gamma=1.0, alpha=0.05, backend=backend)
    exp_adv, _ = vk.gae(r, v, None, cu, gamma=1.0, lam=lam, backend=backend)
    _, exp_targets = vk.gae(r, v, None, cu, gamma=1.0, lam=1.0, backend=backend)
    assert torch.equal(adv, exp_adv) and torch.equal(targets, exp_targets)
    # The length counts valid (mask = 1) tokens only, in both layouts.
    m = torch.ones(n, dtype=torch.bool)
    m[cu[4] : cu[4] + 100] = False  # 200 valid tokens left in the last sequence
    adv_m, _ = vk.decoupled_gae(r, v, m, cu, gamma=1.0, alpha=0.05, backend=backend)
    lam_m = lam.clone()
    lam_m[4] = 1 - 1 / 10
    assert torch.equal(adv_m, vk.gae(r, v, m, cu, gamma=1.0, lam=lam_m, backend=backend)[0])


@given(lengths=ragged_lengths(max_seqs=8, max_len=300), kind=st.sampled_from(MASK_KINDS),
       alpha=st.one_of(st.sampled_from([0.05, 1 / 21, 1e-300, 1e300]),
                       st.floats(1e-4, 10.0, allow_nan=False)),
       gamma=st.floats(0.0, 1.0), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**16))
@examples("cpp", "cpu", cpu=60, interpreted=60)
def test_adaptive_coefficients_kernel_equals_reference_bit_for_bit(lengths, kind, alpha, gamma,
                                                                  dtype, seed):
    # The C++ kernel computes gamma * lambda(l) in one call where the reference takes eight
    # tensor ops; the same float64 arithmetic, so every coefficient is the same float.
    offs = cu_seqlens(lengths).to(torch.int64)
    mask = None if kind == "none" else ragged_mask(kind, lengths, torch.Generator().manual_seed(seed))
    ref = _backends.select("adaptive_coefficients", torch.device("cpu"), "reference")[1]
    got = kernel_of("adaptive_coefficients", "cpp", "cpu")(mask, offs, alpha, gamma, dtype)
    want = ref(mask, offs, alpha, gamma, dtype)
    assert got.dtype == dtype and got.shape == (len(lengths),)
    assert torch.equal(got, want), (got, want)


def test_adaptive_coefficients_kernel_checks_its_offsets():
    kernel = kernel_of("adaptive_coefficients", "cpp", "cpu")
    mask = torch.ones(6, dtype=torch.bool)
    for offs, match in (([0, 4, 2, 6], "non-decreasing"), ([1, 2, 6], "start at 0 and end at N"),
                        ([0, 2, 7], "start at 0 and end at N")):
        with pytest.raises(RuntimeError, match=match):
            kernel(mask, torch.tensor(offs), 0.05, 1.0, torch.float32)
    with pytest.raises(RuntimeError, match="non-decreasing"):  # no mask: still checked
        kernel(None, torch.tensor([0, 4, 2, 6]), 0.05, 1.0, torch.float32)


def test_lambda_zero_is_one_step_td_and_gamma_lambda_one_is_monte_carlo():
    r = torch.randn(3, 9, dtype=torch.float64)
    v = torch.randn(3, 9, dtype=torch.float64)
    adv, ret = vk.gae(r, v, gamma=0.9, lam=0.0)
    next_v = torch.cat([v[:, 1:], torch.zeros(3, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(adv, r + 0.9 * next_v - v)
    _, ret = vk.gae(r, v, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, r.flip(1).cumsum(1).flip(1))


# --------------------------------------------------------------------------------------
# Whitening


@pytest.mark.parametrize("backend", ON_CPU)
@pytest.mark.parametrize("shape", [(4, 11), (3, 20000), (50001,)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_masked_whiten_matches_formula(backend, shape, dtype, poisoned):
    gen = torch.Generator().manual_seed(5)
    x = (3 + 2 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    m = torch.rand(shape, generator=gen) < 0.6
    xd = x.double()
    sel = xd[m]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    for unbiased in (True, False):
        exp = (xd - sel.mean()) * torch.rsqrt(sel.var(unbiased=unbiased) + 1e-8)
        with poisoned():
            got = vk.masked_whiten(x, m, unbiased=unbiased, backend=backend)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got.double(), exp, **tol)
    exp = (xd - sel.mean()) * torch.rsqrt(sel.var() + 1e-8) + sel.mean()
    torch.testing.assert_close(vk.masked_whiten(x, m, shift_mean=False, backend=backend).double(), exp, **tol)
    full = vk.masked_whiten(x, backend=backend).double()
    torch.testing.assert_close(full, (xd - xd.mean()) * torch.rsqrt(xd.var() + 1e-8), **tol)
    garbage = x.clone()
    garbage[~m] = float("nan")
    assert torch.equal(vk.masked_whiten(garbage, m, backend=backend)[m], vk.masked_whiten(x, m, backend=backend)[m])


def test_whiten_option_whitens_advantages_not_returns():
    r, v = torch.randn(3, 8), torch.randn(3, 8)
    m = torch.rand(3, 8) < 0.7
    m[0, 0] = m[1, 1] = True
    adv, ret = vk.gae(r, v, m, gamma=0.99, lam=0.95, whiten=True)
    raw_adv, raw_ret = vk.gae(r, v, m, gamma=0.99, lam=0.95)
    assert torch.equal(ret, raw_ret)
    torch.testing.assert_close(adv, vk.masked_whiten(raw_adv, m))


@pytest.mark.parametrize("backend", ON_CPU)
def test_masked_whiten_rejects_degenerate_masks(backend):
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="mask selects no element"):
        vk.masked_whiten(x, torch.zeros(2, 3, dtype=torch.bool), backend=backend)
    one = torch.zeros(2, 3, dtype=torch.bool)
    one[0, 0] = True
    with pytest.raises(ValueError, match="one element"):
        vk.masked_whiten(x, one, backend=backend)
    assert torch.isfinite(vk.masked_whiten(x, one, unbiased=False, backend=backend)[0, 0])
    with pytest.raises(ValueError, match="mask has shape"):
        vk.masked_whiten(x, torch.ones(3, 2, dtype=torch.bool), backend=backend)
    with pytest.raises(TypeError, match="x must be float"):
        vk.masked_whiten(x.long(), backend=backend)


# --------------------------------------------------------------------------------------
# Empty inputs, dtypes


@pytest.mark.parametrize("backend", ON_CPU)
def test_empty_inputs(backend):
    for shape in [(0, 5), (3, 0), (0, 0)]:
        adv, ret = vk.gae(torch.randn(shape), torch.randn(shape), backend=backend)
        assert adv.shape == ret.shape == shape
    no_seqs = torch.zeros(1, dtype=torch.int32)
    adv, _ = vk.gae(torch.randn(0), torch.randn(0), None, no_seqs, backend=backend)
    assert adv.shape == (0,)
    empty_seqs = torch.tensor([0, 0, 3, 3], dtype=torch.int32)
    adv, ret = vk.gae(torch.ones(3), torch.zeros(3), None, empty_seqs, gamma=1.0, lam=1.0, backend=backend)
    torch.testing.assert_close(ret, torch.tensor([3.0, 2.0, 1.0]))


@pytest.mark.parametrize("backend", ON_CPU)
def test_mixed_and_half_dtypes(backend):
    r = torch.randn(2, 50, dtype=torch.float16)
    v = torch.randn(2, 50, dtype=torch.bfloat16)
    adv, ret = vk.gae(r, v, gamma=0.99, backend=backend)
    assert adv.dtype == torch.float32
    exp, _ = vk.gae(r.double(), v.double(), gamma=0.99, backend="reference")
    torch.testing.assert_close(adv.double(), exp, rtol=1e-5, atol=1e-4)
    int_mask = (torch.rand(2, 50) < 0.5).long()
    assert torch.equal(
        vk.gae(r, v, int_mask, backend=backend)[0], vk.gae(r, v, int_mask.bool(), backend=backend)[0]
    )


# --------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, never a crash or a silent answer

R, V = torch.randn(2, 5), torch.randn(2, 5)
PR, PV = torch.randn(6), torch.randn(6)
CU = torch.tensor([0, 2, 6], dtype=torch.int32)

BAD_CALLS = [
    ("values has shape", ValueError, lambda b: vk.gae(R, torch.randn(2, 4), backend=b)),
    ("rewards must be float", TypeError, lambda b: vk.gae(R.long(), V, backend=b)),
    ("mask has shape", ValueError, lambda b: vk.gae(R, V, torch.ones(2, 4, dtype=torch.bool), backend=b)),
    ("values is on meta", ValueError, lambda b: vk.gae(R, V.to("meta"), backend=b)),
    ("must be 2-D", ValueError, lambda b: vk.gae(PR, PV, backend=b)),
    ("must be 1-D", ValueError, lambda b: vk.gae(R, V, None, CU, backend=b)),
    ("cu_seqlens must be int32", TypeError, lambda b: vk.gae(PR, PV, None, CU.float(), backend=b)),
    ("cu_seqlens must start at 0", ValueError, lambda b: vk.gae(PR, PV, None, torch.tensor([1, 2, 6], dtype=torch.int32), backend=b)),
    ("cu_seqlens must end at", ValueError, lambda b: vk.gae(PR, PV, None, torch.tensor([0, 2, 5], dtype=torch.int32), backend=b)),
    ("cu_seqlens must end at", ValueError, lambda b: vk.gae(PR, PV, None, torch.tensor([0, 2, 7], dtype=torch.int32), backend=b)),
    ("non-decreasing", ValueError, lambda b: vk.gae(PR, PV, None, torch.tensor([0, 4, 2, 6], dtype=torch.int32), backend=b)),
    # Past _ragged._FEW_OFFSETS offsets the check runs as tensor ops, not a Python loop.
    ("non-decreasing", ValueError, lambda b: vk.gae(PR, PV, None, torch.tensor([0, 4, 2, *[6] * 600]), backend=b)),
    ("must start at 0", ValueError, lambda b: vk.gae(PR, PV, None, torch.tensor([1, *[6] * 600]), backend=b)),
    ("gamma must lie in", ValueError, lambda b: vk.gae(R, V, gamma=1.5, backend=b)),
    ("gamma must lie in", ValueError, lambda b: vk.gae(R, V, gamma=float("nan"), backend=b)),
    ("^lam must lie in", ValueError, lambda b: vk.gae(R, V, lam=-0.1, backend=b)),
    ("lam_critic must lie in", ValueError, lambda b: vk.decoupled_gae(R, V, lam_critic=1.01, backend=b)),
    ("^lam must lie in", ValueError, lambda b: vk.gae(R, V, lam=torch.tensor([0.5, 1.5]), backend=b)),
    ("^lam must have one entry per sequence", ValueError, lambda b: vk.gae(R, V, lam=torch.tensor([0.5, 0.5, 0.5]), backend=b)),
    ("^lam must be float", TypeError, lambda b: vk.gae(R, V, lam=torch.tensor([1, 0]), backend=b)),
    ("alpha must be a finite float > 0", ValueError, lambda b: vk.decoupled_gae(R, V, alpha=0.0, backend=b)),
    ("values contains NaN", ValueError, lambda b: vk.gae(R, torch.where(torch.eye(2, 5).bool(), float("nan"), V), backend=b)),
    ("rewards contains NaN", ValueError, lambda b: vk.gae(torch.full_like(R, float("nan")), V, backend=b)),
    ("mask_mode must be one of", ValueError, lambda b: vk.gae(R, V, mask_mode="carry", backend=b)),
    ("mask must be a torch.Tensor", TypeError, lambda b: vk.gae(R, V, [[1] * 5] * 2, backend=b)),
    ("mask must be bool, integer or real", TypeError, lambda b: vk.gae(R, V, torch.ones(2, 5, dtype=torch.complex64), backend=b)),
    ("alpha must be a finite float > 0", ValueError, lambda b: vk.decoupled_gae(R, V, alpha=float("inf"), backend=b)),
    ("alpha must be a finite float > 0", ValueError, lambda b: vk.length_adaptive_lambda(torch.tensor([3, 4]), -1.0)),
    ("whiten must be True or False", TypeError, lambda b: vk.gae(R, V, whiten="no", backend=b)),
    ("eps must be a finite float >= 0", ValueError, lambda b: vk.masked_whiten(R, eps=-1.0, backend=b)),
    ("cu_seqlens must end at", ValueError, lambda b: vk.masked_whiten(PR, None, torch.tensor([0, 999]), backend=b)),
]


@pytest.mark.parametrize("backend", ON_CPU)
@pytest.mark.parametrize("match,exc,call", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_clear_error(backend, match, exc, call):
    with pytest.raises(exc, match=match):
        call(backend)


def test_outputs_are_constants_even_when_values_require_grad():
    # A critic's values usually require grad; every peer computes GAE under no_grad.
    v = V.clone().requires_grad_(True)
    adv, ret = vk.gae(R, v, whiten=False)
    white = vk.masked_whiten(v)
    assert not adv.requires_grad and not ret.requires_grad and not white.requires_grad
    loss = (v * 2).sum() + ret.sum()  # gradient flows through v's other uses only
    loss.backward()
    assert torch.equal(v.grad, torch.full_like(v, 2.0))


def test_nan_in_masked_slot_is_not_an_error():
    v = V.clone()
    v[0, 0] = float("nan")
    m = torch.ones(2, 5, dtype=torch.bool)
    m[0, 0] = False
    vk.gae(R, v, m)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("where, value", [
    ("values", math.inf), ("values", -math.inf), ("rewards", math.inf), ("rewards", -math.inf),
    ("values", math.nan),
])
def test_a_non_finite_valid_input_is_named(backend, device, where, value):
    # +-inf in a valid slot gave NaN / inf advantages without an error (kernel review).
    r, v = R.clone().to(device), V.clone().to(device)
    (v if where == "values" else r)[1, 2] = value
    with pytest.raises(ValueError, match=f"^{where} contains"):
        vk.gae(r, v, backend=backend)
    m = torch.ones(2, 5, dtype=torch.bool, device=device)
    m[1, 2] = False  # masked: ignored, as any garbage there
    assert torch.isfinite(vk.gae(r, v, m, backend=backend)[0]).all()


def test_advantages_overflowing_from_finite_inputs_is_an_error_not_inf():
    r = torch.full((1, 4), 3e38)
    with pytest.raises(ValueError, match="overflowed although every valid reward and value"):
        vk.gae(r, torch.zeros(1, 4), lam=1.0)
    # A sum over finite advantages that overflows is not an error.
    vk.gae(torch.full((1, 4), 2e38), torch.zeros(1, 4), gamma=0.0, lam=0.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_value_targets_overflowing_from_finite_inputs_is_an_error_not_inf(backend, device):
    # lambda_policy 0 keeps each advantage at one reward (finite); lambda_critic 1 sums
    # two of them into the first target: inf, which was returned without a word.
    r = torch.full((1, 2), 3e38, device=device)
    with pytest.raises(ValueError, match="^the value targets overflowed"):
        vk.decoupled_gae(r, torch.zeros(1, 2, device=device), lam_policy=0.0,
                         lam_critic=1.0, backend=backend)
    # Garbage in a masked slot of the values lands in that slot's target (skip mode adds
    # the slot's value): not an error, and the valid outputs stay as they were.
    v = torch.zeros(1, 3, device=device)
    m = torch.tensor([[True, False, True]], device=device)
    clean = vk.gae(torch.ones(1, 3, device=device), v, m, backend=backend)
    v[0, 1] = math.nan
    dirty = vk.gae(torch.ones(1, 3, device=device), v, m, backend=backend)
    for a, b in zip(clean, dirty):
        assert torch.equal(a[m], b[m])


def test_validation_can_be_switched_off():
    bad = torch.tensor([0, 2, 7], dtype=torch.int32)
    vk.set_validation(False)
    try:
        # The op no longer checks offsets, but the C++ kernel still refuses to read past N.
        with pytest.raises(RuntimeError, match="offsets must start at 0 and end at N"):
            vk.gae(PR, PV, None, bad, backend="cpp")
    finally:
        vk.set_validation(True)


# --------------------------------------------------------------------------------------
# Backend registry


def test_unknown_or_unavailable_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        vk.gae(R, V, backend="fastest")
    with pytest.raises(RuntimeError, match="cuda backend runs on CUDA tensors"):
        vk.gae(R, V, backend="cuda")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("VAPO_BACKEND", "reference")
    assert _backends.select("gae", torch.device("cpu"))[0] == "reference"
    monkeypatch.setenv("VAPO_BACKEND", "cpp")
    assert _backends.select("gae", torch.device("cpu"))[0] == "cpp"
    assert _backends.select("gae", torch.device("cpu"), "reference")[0] == "reference"


def test_import_falls_back_when_the_extension_cannot_build():
    code = (
        "import warnings, torch, vapo_kernels as vk\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a, _ = vk.gae(torch.ones(1, 3), torch.zeros(1, 3), gamma=1.0, lam=1.0)\n"
        "    vk.gae(torch.ones(1, 3), torch.zeros(1, 3))\n"
        "assert a.tolist() == [[3.0, 2.0, 1.0]], a\n"
        "msgs = [str(x.message) for x in w if 'falling back' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'VAPO_NO_EXTENSION' in msgs[0], msgs\n"
        "print(vk.available_backends())\n"
    )
    env = {**os.environ, "VAPO_NO_EXTENSION": "1"}
    env.pop("VAPO_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "'cpp'" not in out.stdout


# --------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile


def _opcheck_samples():
    # (rewards, values, mask, cu_seqlens, lam_policy, lam_critic, scalar_lam_policy,
    #  scalar_lam_critic, gamma, alpha, mask_mode, backend)
    m = torch.rand(3, 7) < 0.7
    lam = torch.full((3,), 0.9)
    yield (torch.randn(3, 7), torch.randn(3, 7), m, None, lam, torch.ones(3), 0.0, 0.0, 0.99, 0.0, "skip", "")
    yield (torch.randn(3, 7), torch.randn(3, 7), m, None, None, None, 0.9, 1.0, 0.99, 0.05, "skip", "cpp")
    yield (torch.randn(6), torch.randn(6), None, CU, torch.full((2,), 0.5), None, 0.0, 1.0, 1.0, 0.0, "zero", "cpp")
    yield (torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64), None, CU,
           torch.full((2,), 0.5, dtype=torch.float64), torch.ones(2, dtype=torch.float64), 0.0, 0.0,
           1.0, 0.5, "skip", "reference")


@pytest.mark.parametrize("args", list(_opcheck_samples()))
def test_opcheck_gae(args):
    torch.library.opcheck(torch.ops.vapo.gae.default, args)


def test_opcheck_masked_whiten():
    torch.library.opcheck(torch.ops.vapo.masked_whiten.default, (torch.randn(3, 7), torch.rand(3, 7) < 0.8, True, 1e-8, True, "cpp"))
    torch.library.opcheck(torch.ops.vapo.masked_whiten.default, (torch.randn(5), None, False, 1e-6, False, "reference"))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_torch_compile_fullgraph(compile_backend, mask_dtype):
    # Int and float 0/1 masks too: their 0/1 check reads values, so it must not run in the
    # traced wrapper (a review found gae failing there with a dynamo error naming nothing).
    torch._dynamo.reset()

    def step(r, v, m, cu):
        adv, targets = vk.decoupled_gae(r, v, m, cu, gamma=1.0, alpha=0.05, whiten=True)
        return (adv * 2).sum() + targets.mean()

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    r, v = torch.randn(10), torch.randn(10)
    m = torch.rand(10) < 0.8
    m[0] = m[1] = True
    m = m.to(mask_dtype)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    torch.testing.assert_close(compiled(r, v, m, cu), step(r, v, m, cu))


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float32])
def test_vmap_over_a_batch_of_int_or_float_masks(mask_dtype):
    r, v = torch.randn(3, 2, 6), torch.randn(3, 2, 6)
    m = (torch.rand(3, 2, 6) < 0.7).to(mask_dtype)
    got = torch.vmap(lambda r, v, m: vk.gae(r, v, m, whiten=False)[0])(r, v, m)
    want = torch.stack([vk.gae(r[i], v[i], m[i])[0] for i in range(3)])
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------
# Triton: the launch plans and the scan algebra (the kernel contract, called directly)
#
# The interpreter scans sequentially, so it only ever composes a single token (or
# segment) onto an accumulated prefix; a GPU scan is a tree that also composes groups
# with groups. Holding the algebra itself (map composition, associativity) covers that.

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif("triton" not in vk.available_backends("gae", TRITON_DEVICE),
                                  reason="Triton cannot run here")


def scan_inputs(lengths, *, gamma, lam_policy, lam_critic, seed, dtype=torch.float64, mask_kind="turns"):
    """Flat kernel-contract inputs on TRITON_DEVICE: r, v, mask, int64 offsets, coefs.
    ``lam_*``: a number, or "random" for a random lambda per sequence."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    r = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    mask = ragged_mask(mask_kind, lengths, gen)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def coef(lam):
        if lam == "random":
            return (gamma * torch.rand(len(lengths), generator=gen, dtype=torch.float64)).to(out_dtype)
        return torch.full((len(lengths),), gamma * lam, dtype=out_dtype)

    cp, cc = coef(lam_policy), coef(lam_critic)
    offsets = cu_seqlens(lengths).long()
    return [x.to(TRITON_DEVICE) for x in (r, v, mask, offsets, cp, cc)]


def scan_expected(r, v, mask, offsets, cp, cc, gamma, skip):
    """The spec in float64 on the same (already rounded) inputs, on CPU."""
    cpu = lambda x: None if x is None else x.cpu()
    return reference_kernel(
        cpu(r).double(), cpu(v).double(), cpu(mask), cpu(offsets),
        cpu(cp).double(), cpu(cc).double(), gamma, skip,
    )


def _apply_segment(m, carry):
    eg, eb, pa, pk, pb, ca, ck, cb = m
    e, p, c = carry
    return eg * e + eb, pa * p + pk * e + pb, ca * c + ck * e + cb


def test_triton_combine_functions_compose_maps_and_are_associative():
    gen = torch.Generator().manual_seed(0)
    rand = lambda k: tuple(torch.randn(64, generator=gen, dtype=torch.float64) for _ in range(k))
    close = lambda xs, ys: all(torch.allclose(x, y, rtol=1e-12, atol=1e-12) for x, y in zip(xs, ys))
    for fn, width in ((tg._affine, 2), (tg._affine_two_inputs, 3), (tg._compose_segments, 8)):
        f = fn.fn
        x, y, z = rand(width), rand(width), rand(width)
        assert close(f(*f(*x, *y), *z), f(*x, *f(*y, *z))), fn
    # first argument = the later (right) map, applied first
    f = tg._compose_segments.fn
    later, cur, carry = rand(8), rand(8), rand(3)
    assert close(_apply_segment(f(*later, *cur), carry), _apply_segment(cur, _apply_segment(later, carry)))
    # a carry y entering (g, u) leaves as g * y + u; both inputs of the two-input scan too
    g, u, k = rand(3)
    y, one = rand(1)[0], torch.ones(64, dtype=torch.float64)
    assert close([tg._affine.fn(one, y, g, u)[1]], [g * y + u])
    _, u2, k2 = tg._affine_two_inputs.fn(one, y, 2 * y, g, u, k)
    assert close([u2, k2], [g * y + u, g * 2 * y + k])


@needs_triton
def test_triton_segment_plans_agree_with_one_program_per_sequence():
    # Long-ish sequences with a slow decay, so carries across chunks and segments matter.
    args = scan_inputs([9 * TRITON_BLOCK + 3, 1, 0, 6 * TRITON_BLOCK], gamma=0.999,
                       lam_policy=0.999, lam_critic=1.0, seed=5)
    exp = scan_expected(*args, 0.999, True)
    for segments in (1, 2, 4, 8, 16):  # 16 segments: more than the chunks of any sequence
        got = tg.gae_scan(*args, 0.999, True, block=TRITON_BLOCK, segments=segments)
        for g, e in zip(got, exp):
            torch.testing.assert_close(g.cpu(), e, rtol=1e-12, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("skip", [True, False])
def test_triton_fully_masked_chunks_and_segments(skip):
    """Valid tokens, then a masked span covering whole chunks (and with 4 segments, a whole
    segment), then valid tokens: the next valid value must cross the gap in skip mode."""
    block = TRITON_BLOCK
    n = 8 * block  # 4 segments of 2 chunks
    gen = torch.Generator().manual_seed(8)
    r = torch.randn(n, generator=gen, dtype=torch.float64)
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    m = torch.ones(n, dtype=torch.bool)
    m[block + 3 : 5 * block + 1] = False  # covers segment 1 (chunks 2, 3) entirely
    m[6 * block : 7 * block] = False  # a whole chunk inside segment 3
    offsets = torch.tensor([0, n], dtype=torch.int64)
    cp, cc = torch.tensor([0.97]), torch.tensor([0.995])
    args = [x.to(TRITON_DEVICE) for x in (r, v, m, offsets, cp.double(), cc.double())]
    exp = scan_expected(*args, 0.999, skip)
    for segments in (1, 2, 4, 8):
        got = tg.gae_scan(*args, 0.999, skip, block=block, segments=segments)
        for g, e in zip(got, exp):
            torch.testing.assert_close(g.cpu(), e, rtol=1e-12, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("segments", [1, 2])
def test_triton_monte_carlo_returns_are_reward_to_go(segments):
    """gamma = lam = 1, skip mode: returns are the reward-to-go over valid tokens and
    A = returns - V on valid tokens; a fully masked row reports zeros."""
    block = TRITON_BLOCK
    gen = torch.Generator().manual_seed(2)
    lengths = [3 * block + 7, block, 5]
    offsets = cu_seqlens(lengths).long()
    n = sum(lengths)
    r = torch.randn(n, generator=gen, dtype=torch.float64)
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    m = torch.rand(n, generator=gen) < 0.7
    m[offsets[1] : offsets[2]] = False  # one all-masked row
    ones = torch.ones(3, dtype=torch.float64)
    adv, ret = tg.gae_scan(
        *(x.to(TRITON_DEVICE) for x in (r, v, m, offsets, ones, ones)), 1.0, True,
        block=block, segments=segments,
    )
    adv, ret = adv.cpu(), ret.cpu()
    for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        to_go = torch.where(m[s:e], r[s:e], 0).flip(0).cumsum(0).flip(0)
        sel = m[s:e]
        torch.testing.assert_close(ret[s:e][sel], to_go[sel], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(adv[s:e][sel], (to_go - v[s:e])[sel], rtol=1e-12, atol=1e-12)
    assert torch.equal(adv[offsets[1] : offsets[2]], torch.zeros(block, dtype=torch.float64))


@needs_triton
def test_triton_lambda_zero_is_one_step_td():
    gen = torch.Generator().manual_seed(4)
    n = 2 * TRITON_BLOCK + 3
    r = torch.randn(n, generator=gen, dtype=torch.float64)
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    offsets = torch.tensor([0, n], dtype=torch.int64)
    coef_p, coef_c = torch.zeros(1, dtype=torch.float64), torch.full((1,), 0.9, dtype=torch.float64)
    adv, _ = tg.gae_scan(
        *(x.to(TRITON_DEVICE) for x in (r, v)), None,
        *(x.to(TRITON_DEVICE) for x in (offsets, coef_p, coef_c)), 0.9, False, block=TRITON_BLOCK,
    )
    next_v = torch.cat([v[1:], torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(adv.cpu(), r + 0.9 * next_v - v, rtol=1e-14, atol=1e-14)


@needs_triton
def test_triton_empty_batches_and_empty_sequences(poisoned):
    f32 = {"dtype": torch.float32, "device": TRITON_DEVICE}
    i64 = {"dtype": torch.int64, "device": TRITON_DEVICE}
    empty = torch.zeros(0, **f32)
    # S = 0
    adv, ret = tg.gae_scan(empty, empty, None, torch.zeros(1, **i64), empty, empty, 0.99, True)
    assert adv.shape == ret.shape == (0,)
    # only empty sequences
    ones = torch.ones(3, **f32)
    adv, _ = tg.gae_scan(empty, empty, None, torch.zeros(4, **i64), ones, ones, 0.99, True)
    assert adv.shape == (0,)
    # empty sequences between non-empty ones, every output written
    offsets = torch.tensor([0, 0, 3, 3, 4, 4], **i64)
    with poisoned():
        adv, ret = tg.gae_scan(
            torch.ones(4, **f32), torch.zeros(4, **f32), None, offsets, torch.ones(5, **f32),
            torch.ones(5, **f32), 1.0, True, block=TRITON_BLOCK,
        )
    torch.testing.assert_close(ret.cpu(), torch.tensor([3.0, 2.0, 1.0, 1.0]))


def test_triton_automatic_plan(monkeypatch):
    monkeypatch.setattr(tg, "_num_sms", lambda device: 132)
    cuda, block = torch.device("cuda"), tg.GPU_BLOCK
    plan = lambda s, n: tg._auto_segments(s, n, block, cuda)
    assert tg._auto_segments(1, 2**20, block, torch.device("cpu")) == 1
    assert plan(1, 128 * 1024) == 64  # 128 chunks -> 64 segments of 2 chunks
    assert plan(1, 2**31) == tg.MAX_SEGMENTS
    assert plan(16, 16 * 65536) == 32  # min(8 * 132 / 16 = 66, 64 chunks / 2) -> 32
    assert plan(4096, 4096 * 16384) == 1  # enough sequences for every SM
    assert plan(64, 64 * 1024) == 1  # one chunk per sequence: nothing to split
    assert plan(1, 1) == 1


@needs_triton
def test_triton_bad_plan_arguments_raise():
    x = torch.zeros(4, device=TRITON_DEVICE)
    offsets = torch.tensor([0, 4], dtype=torch.int64, device=TRITON_DEVICE)
    one = torch.ones(1, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="powers of two"):
        tg.gae_scan(x, x, None, offsets, one, one, 1.0, True, block=24)
    with pytest.raises(ValueError, match="powers of two"):
        tg.gae_scan(x, x, None, offsets, one, one, 1.0, True, segments=3)


# GPU only: compiled Triton at the default launch plan and beyond 2^31 tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled Triton)")
@pytest.mark.parametrize(
    "lengths",
    [[131072], [65536, 3, 100000], [1000] * 600, [0, 1, 1025, 4097, 1023]],
    ids=["one-long", "few-long", "many-short", "edges"],
)
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("segments", [None, 4], ids=["auto", "seg4"])
def test_triton_gpu_default_plan_matches_cpu_reference(lengths, skip, segments):
    r, v, mask, offsets, cp, cc = scan_inputs(lengths, gamma=0.999, lam_policy="random",
                                              lam_critic="random", seed=1, dtype=torch.float32)
    adv, ret = tg.gae_scan(r, v, mask, offsets, cp, cc, 0.999, skip, segments=segments)
    # The Python-loop spec is too slow at 100k tokens, so the float32 default plan is held
    # against a float64 one-program-per-sequence run, and that against the spec when small.
    adv64, ret64 = tg.gae_scan(r.double(), v.double(), mask, offsets, cp.double(), cc.double(),
                               0.999, skip, segments=1)
    tol = scan_tolerance(r.cpu(), v.cpu(), offsets.cpu(), torch.float32)
    assert ((adv.double().cpu() - adv64.cpu()).abs() <= tol).all()
    assert ((ret.double().cpu() - ret64.cpu()).abs() <= tol).all()
    if sum(lengths) <= 10000:
        exp = scan_expected(r, v, mask, offsets, cp, cc, 0.999, skip)
        tol64 = scan_tolerance(r.cpu(), v.cpu(), offsets.cpu(), torch.float64)
        assert_matches(adv64.cpu(), exp[0], tol64, "advantages")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled Triton)")
def test_triton_gpu_indices_beyond_int32():
    """A sequence starting past 2^31 tokens: int64 offsets and indices all the way down."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs ~30 GB of GPU memory")
    first = 2**31 + 77
    n = first + 3000
    gen = torch.Generator(device="cuda").manual_seed(0)
    r = torch.randn(n, generator=gen, device="cuda", dtype=torch.float16)
    v = torch.randn(n, generator=gen, device="cuda", dtype=torch.float16)
    offsets = torch.tensor([0, first, n], dtype=torch.int64, device="cuda")
    coef = torch.full((2,), 0.5, device="cuda")  # fast decay: a window sees all that matters
    for segments in (None, 1):
        adv, ret = tg.gae_scan(r, v, None, offsets, coef, coef, 1.0, True, segments=segments)
        # The whole second sequence, and the last 500 tokens of the first (a sequence's
        # tail does not depend on what precedes it).
        for s, e in ((first, n), (first - 500, first)):
            sl = slice(s, e)
            exp = reference_kernel(
                r[sl].double().cpu(), v[sl].double().cpu(), None,
                torch.tensor([0, e - s]), coef[:1].double().cpu(), coef[:1].double().cpu(), 1.0, True,
            )
            for g, x in zip((adv, ret), exp):
                torch.testing.assert_close(g[sl].cpu().double(), x, rtol=1e-5, atol=1e-5)
        del adv, ret


@pytest.mark.parametrize("lam", [1.5, torch.tensor([0.5]), torch.tensor([0.5, 2.0]), "0.9"])
def test_gae_names_its_lam_not_decoupled_gaes_lambdas(lam):
    # gae has one lam; its errors said lam_policy, an argument gae does not take.
    with pytest.raises((ValueError, TypeError)) as info:
        vk.gae(R, V, lam=lam)
    assert "lam" in str(info.value) and "lam_policy" not in str(info.value)
    assert "lam_critic" not in str(info.value)
