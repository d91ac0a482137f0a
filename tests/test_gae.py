"""GAE op family: every CPU backend against the float64 reference (the spec).

The Triton kernels have their own file (they run through the interpreter, slowly); the
CUDA ones run in tests/test_gae_cuda.py on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vapo_kernels as vk
from vapo_kernels import _backends
from vapo_kernels.ops.gae import reference_kernel

CPU_BACKENDS = ["reference", "cpp"]


@pytest.fixture(scope="module", autouse=True)
def _extension_must_build():
    # On CI a broken C++ build must fail loudly, not silently test the fallback.
    err = _backends.extension_error()
    assert err is None, err


# --------------------------------------------------------------------------------------
# Random ragged batches


@st.composite
def ragged_batches(draw, max_seqs=6, max_len=40):
    lengths = draw(
        st.lists(
            st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, max_len)),
            min_size=0,
            max_size=max_seqs,
        )
    )
    return {
        "lengths": lengths,
        "packed": draw(st.booleans()),
        "mask_kind": draw(st.sampled_from(["none", "random", "turns", "all_masked_rows"])),
        "mode": draw(st.sampled_from(["skip", "zero"])),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        "gamma": draw(st.one_of(st.sampled_from([0.0, 0.5, 0.99, 1.0]), st.floats(0, 1))),
        "lam": draw(st.one_of(st.sampled_from([0.0, 0.95, 1.0]), st.floats(0, 1))),
        "per_seq_lam": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def make_mask(kind: str, length: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "none":
        return torch.ones(length, dtype=torch.bool)
    if kind == "random":
        return torch.rand(length, generator=gen) < 0.7
    if kind == "all_masked_rows":
        if torch.rand(1, generator=gen).item() < 0.5:
            return torch.zeros(length, dtype=torch.bool)
        return torch.rand(length, generator=gen) < 0.7
    # "turns": alternating valid (model) and masked (tool/observation) spans
    mask = torch.zeros(length, dtype=torch.bool)
    t, valid = 0, True
    while t < length:
        span = int(torch.randint(1, 8, (1,), generator=gen))
        mask[t : t + span] = valid
        t, valid = t + span, not valid
    return mask


def build(case):
    """Inputs of one case in both the public (padded or packed) form and the flat form."""
    gen = torch.Generator().manual_seed(case["seed"])
    lengths = case["lengths"]
    n = sum(lengths)
    rewards = torch.randn(n, generator=gen, dtype=torch.float64).to(case["dtype"])
    values = torch.randn(n, generator=gen, dtype=torch.float64).to(case["dtype"])
    mask = torch.cat([make_mask(case["mask_kind"], L, gen) for L in lengths]) if lengths else (
        torch.zeros(0, dtype=torch.bool)
    )
    cu = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)
    num_seqs = len(lengths)
    lam = (
        torch.rand(num_seqs, generator=gen, dtype=torch.float64)
        if case["per_seq_lam"]
        else case["lam"]
    )
    return rewards, values, mask, cu, lam


def expected_flat(rewards, values, mask, cu, lam, gamma, mode):
    num_seqs = cu.numel() - 1
    lam_t = lam if isinstance(lam, torch.Tensor) else torch.full((num_seqs,), lam, dtype=torch.float64)
    coef = gamma * lam_t.to(torch.float64)
    return reference_kernel(
        rewards.double(), values.double(), mask, cu.long(), coef, coef, gamma, mode == "skip"
    )


def to_padded(x, cu, fill=0):
    from vapo_kernels._ragged import pack_to_padded

    return pack_to_padded(x, cu, fill)


def run_public(case, backend, rewards, values, mask, cu, lam, **kw):
    mask_arg = None if case["mask_kind"] == "none" else mask
    if case["packed"]:
        return vk.gae(
            rewards, values, mask_arg, cu, gamma=case["gamma"], lam=lam, mask_mode=case["mode"],
            backend=backend, **kw,
        )
    pr, pv = to_padded(rewards, cu), to_padded(values, cu)
    # Padded input always needs a mask to mark the padding of short rows.
    pm = to_padded(mask, cu, False)
    adv, ret = vk.gae(pr, pv, pm, gamma=case["gamma"], lam=lam, mask_mode=case["mode"], backend=backend, **kw)
    from vapo_kernels._ragged import padded_to_pack

    return padded_to_pack(adv, cu), padded_to_pack(ret, cu)


def tolerance(dtype, expected: torch.Tensor, max_len: int) -> float:
    if dtype == torch.float64:
        return 1e-11 * (1 + max_len) * (1 + expected.abs().max().item() if expected.numel() else 1)
    # fp32 accumulation: the error of a length-L recurrence grows at most ~L * eps * scale.
    scale = 1 + (expected.abs().max().item() if expected.numel() else 0)
    return 4 * (1 + max_len) * 1.2e-7 * scale


# --------------------------------------------------------------------------------------
# Correctness against the float64 spec


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=60)
@given(case=ragged_batches())
def test_matches_float64_reference(backend, case, poisoned):
    rewards, values, mask, cu, lam = build(case)
    with poisoned():
        adv, ret = run_public(case, backend, rewards, values, mask, cu, lam)
    exp_adv, exp_ret = expected_flat(rewards, values, mask, cu, lam, case["gamma"], case["mode"])
    out_dtype = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    assert adv.dtype == ret.dtype == out_dtype
    max_len = max(case["lengths"], default=0)
    # Compare every element, masked ones included: an unwritten (NaN-poisoned) slot fails.
    torch.testing.assert_close(adv.double(), exp_adv, rtol=0, atol=tolerance(case["dtype"], exp_adv, max_len))
    torch.testing.assert_close(ret.double(), exp_ret, rtol=0, atol=tolerance(case["dtype"], exp_ret, max_len))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["skip", "zero"])
@settings(max_examples=30)
@given(case=ragged_batches(), garbage=st.sampled_from([float("nan"), 1e30, -1e38, float("inf")]))
def test_garbage_in_masked_slots_changes_no_valid_output(backend, mode, case, garbage):
    case = {**case, "mode": mode, "packed": True, "mask_kind": "turns"}
    rewards, values, mask, cu, lam = build(case)
    clean = vk.gae(rewards, values, mask, cu, gamma=case["gamma"], lam=lam, mask_mode=mode, backend=backend)
    dirty_r, dirty_v = rewards.clone(), values.clone()
    dirty_r[~mask] = garbage
    dirty_v[~mask] = garbage
    dirty = vk.gae(dirty_r, dirty_v, mask, cu, gamma=case["gamma"], lam=lam, mask_mode=mode, backend=backend)
    for a, b in zip(clean, dirty):
        assert torch.equal(a[mask], b[mask])  # bit for bit
    if mode == "skip":
        # Advantages of masked tokens are carried from the next valid token, so they are
        # garbage-free too (returns there add the slot's own V, as verl does).
        assert torch.equal(clean[0], dirty[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("length", [1, 16323, 40001, 127323, 131072])
def test_long_sequence_is_reward_to_go(backend, length):
    """gamma = lam = 1: returns are the reward-to-go over valid tokens, A = returns - V.

    Lengths above the C++ chunk size exercise the chunk-parallel path; the closed form
    (a reverse cumulative sum) keeps the check cheap in float64.
    """
    if backend == "reference" and length > 20000:
        pytest.skip("the Python-loop reference is the spec, not meant for 100k-token scans")
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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=30)
@given(case=ragged_batches(), lam_critic=st.sampled_from([1.0, 0.9]))
def test_decoupled_is_two_single_lambda_runs_in_one_pass(backend, case, lam_critic):
    rewards, values, mask, cu, lam = build({**case, "dtype": torch.float64})
    kw = dict(gamma=case["gamma"], mask_mode=case["mode"], backend=backend)
    adv, targets = vk.decoupled_gae(rewards, values, mask, cu, lam_policy=lam, lam_critic=lam_critic, **kw)
    assert torch.equal(adv, vk.gae(rewards, values, mask, cu, lam=lam, **kw)[0])
    assert torch.equal(targets, vk.gae(rewards, values, mask, cu, lam=lam_critic, **kw)[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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
    ("gamma must lie in", ValueError, lambda b: vk.gae(R, V, gamma=1.5, backend=b)),
    ("gamma must lie in", ValueError, lambda b: vk.gae(R, V, gamma=float("nan"), backend=b)),
    ("lam_policy must lie in", ValueError, lambda b: vk.gae(R, V, lam=-0.1, backend=b)),
    ("lam_critic must lie in", ValueError, lambda b: vk.decoupled_gae(R, V, lam_critic=1.01, backend=b)),
    ("lam_policy must lie in", ValueError, lambda b: vk.gae(R, V, lam=torch.tensor([0.5, 1.5]), backend=b)),
    ("lam_policy must have one entry per sequence", ValueError, lambda b: vk.gae(R, V, lam=torch.tensor([0.5, 0.5, 0.5]), backend=b)),
    ("lam_policy must be float", TypeError, lambda b: vk.gae(R, V, lam=torch.tensor([1, 0]), backend=b)),
    ("alpha must be a positive", ValueError, lambda b: vk.decoupled_gae(R, V, alpha=0.0, backend=b)),
    ("values contains NaN", ValueError, lambda b: vk.gae(R, torch.where(torch.eye(2, 5).bool(), float("nan"), V), backend=b)),
    ("rewards contains NaN", ValueError, lambda b: vk.gae(torch.full_like(R, float("nan")), V, backend=b)),
    ("mask_mode must be one of", ValueError, lambda b: vk.gae(R, V, mask_mode="carry", backend=b)),
    ("mask must be a torch.Tensor", TypeError, lambda b: vk.gae(R, V, [[1] * 5] * 2, backend=b)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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
def test_torch_compile_fullgraph(compile_backend):
    torch._dynamo.reset()

    def step(r, v, m, cu):
        adv, targets = vk.decoupled_gae(r, v, m, cu, gamma=1.0, alpha=0.05, whiten=True)
        return (adv * 2).sum() + targets.mean()

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    r, v = torch.randn(10), torch.randn(10)
    m = torch.rand(10) < 0.8
    m[0] = m[1] = True
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    torch.testing.assert_close(compiled(r, v, m, cu), step(r, v, m, cu))
