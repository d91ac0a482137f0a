"""Fused LM head + log-probs (``linear_logprobs``): every backend against the unfused path.

The oracle is ``token_logprobs`` on the logits materialised in float64 (itself tested
against the definitions in test_logprobs.py) and autograd through that float64 matmul.
Without a GPU the Triton kernels run in the interpreter on CPU tensors, with 16-wide
tiles so small shapes cross row, vocabulary and H tile boundaries; the reference's tiles
are shrunk the same way where a case asks for it. The vocabulary-parallel path has its
own file (test_linear_logprobs_tp.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

# Must precede the first import of triton (tests/conftest.py does the same).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vapo_kernels as vk
from vapo_kernels import linear_logprobs, token_logprobs
from vapo_kernels.ops import linear_logprobs as ops
from vapo_kernels.triton import linear_logprobs as tll

import _dominant as dominant

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
# What the registry reports for the fused LM-head op here (reference and Triton today).
BACKENDS = vk.available_backends("linear_logprobs", DEVICE)


@contextlib.contextmanager
def small_tiles(enabled: bool = True):
    """Tiles of 16 in the Triton kernels (also on a GPU) and of 7 rows x 16 vocabulary
    entries in the reference, so that every boundary falls inside small shapes."""
    if not enabled:
        yield
        return
    names = {
        (ops, "_LINEAR_ROWS_PER_CHUNK"): 7,
        (ops, "_LINEAR_VOCAB_PER_CHUNK"): 16,
        (tll, "GPU_BLOCK_N"): 16,
        (tll, "GPU_BLOCK_V"): 16,
        (tll, "GPU_BLOCK_K"): 16,
        (tll, "GPU_BWD_HIDDEN_BLOCKS"): (16, 16),
        (tll, "GPU_BWD_WEIGHT_BLOCKS"): (16, 16),
    }
    saved = {key: getattr(*key) for key in names}
    try:
        for (mod, name), value in names.items():
            setattr(mod, name, value)
        yield
    finally:
        for (mod, name), value in saved.items():
            setattr(mod, name, value)


def materialised(hidden, weight, bias, targets, temperature, mask):
    """The unfused path in float64: logits, then token_logprobs (reference backend)."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    return token_logprobs(
        z, targets, temperature=temperature, return_entropy=True, mask=mask, backend="reference"
    )


# --------------------------------------------------------------------------------------
# Cases


@st.composite
def cases(draw):
    return {
        "n": draw(st.integers(0, 40)),
        "dim": draw(st.integers(16, 48)),
        # V = 1 (a single token), around one 16-wide tile, and several tiles
        "vocab": draw(st.sampled_from([1, 2, 15, 17, 33, 70])),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        "temperature": draw(st.sampled_from([1.0, 0.7, 1.3, 0.05])),
        "wscale": draw(st.sampled_from([0.1, 1.0])),
        "bias": draw(st.booleans()),
        "ignore": draw(st.sampled_from(["none", "some", "all"])),
        "use_mask": draw(st.booleans()),
        "padded": draw(st.booleans()),
        "small_tiles": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def build(case):
    gen = torch.Generator().manual_seed(case["seed"])
    n, dim, vocab, dtype = case["n"], case["dim"], case["vocab"], case["dtype"]

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)

    hidden = rand(n, dim)
    weight = rand(vocab, dim, scale=case["wscale"])
    bias = rand(vocab) if case["bias"] else None
    targets = torch.randint(0, vocab, (n,), generator=gen)
    if n:
        targets[0] = vocab - 1  # the last column: a partial tile
    if case["ignore"] == "some":
        targets[torch.rand(n, generator=gen) < 0.3] = -100
    elif case["ignore"] == "all":
        targets[:] = -100
    mask = (torch.rand(n, generator=gen) < 0.7) if case["use_mask"] else None
    targets = targets.to(DEVICE)
    mask = None if mask is None else mask.to(DEVICE)
    if case["padded"] and n % 2 == 0:
        hidden = hidden.view(2, n // 2, dim)
        targets = targets.view(2, n // 2)
        mask = None if mask is None else mask.view(2, n // 2)
    return hidden, weight, bias, targets, mask


def _scale(hidden, weight, bias, temperature):
    """Largest |logit / temperature|: tolerances scale with it."""
    if hidden.numel() == 0:
        return 1.0
    z = hidden.double().reshape(-1, hidden.shape[-1]) @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    return 1.0 + float(z.abs().max()) / temperature


# --------------------------------------------------------------------------------------
# Forward and backward against the materialised float64 path


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30)
@given(case=cases())
def test_forward_matches_materialised_float64(backend, case, poisoned):
    hidden, weight, bias, targets, mask = build(case)
    tau = case["temperature"]
    with poisoned(), small_tiles(case["small_tiles"]):
        logp, ent = linear_logprobs(
            hidden, weight, targets, bias=bias, temperature=tau, return_entropy=True,
            mask=mask, backend=backend,
        )
    exp_logp, exp_ent = materialised(hidden, weight, bias, targets, tau, mask)
    out_dtype = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    assert logp.dtype == ent.dtype == out_dtype
    assert logp.shape == ent.shape == targets.shape
    # bf16 inputs are exact in fp32, so bf16 is held to the fp32 tolerance.
    tol = (1e-12 if case["dtype"] == torch.float64 else 2e-6) * _scale(hidden, weight, bias, tau)
    torch.testing.assert_close(logp.double(), exp_logp, rtol=tol, atol=tol)
    torch.testing.assert_close(ent.double(), exp_ent, rtol=tol, atol=tol)
    assert bool((logp <= 0).all()) and bool((ent >= 0).all())
    assert bool((ent <= math.log(case["vocab"]) + 1e-5).all())


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20)
@given(case=cases(), g_ent=st.sampled_from([None, 0.5]))
def test_gradients_match_autograd_of_materialised_float64(backend, case, g_ent, poisoned):
    hidden, weight, bias, targets, mask = build(case)
    tau = case["temperature"]
    mine = [t.detach().clone().requires_grad_(True) for t in (hidden, weight)]
    theirs = [t.detach().double().requires_grad_(True) for t in (hidden, weight)]
    if bias is not None:
        mine.append(bias.detach().clone().requires_grad_(True))
        theirs.append(bias.detach().double().requires_grad_(True))
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    w_lp = torch.randn(targets.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    w_ent = torch.randn(targets.shape, generator=gen, dtype=torch.float64).to(DEVICE)

    def loss(logp, ent):
        return (logp.double() * w_lp).sum() + ((ent.double() * w_ent).sum() * g_ent if g_ent else 0)

    with poisoned(), small_tiles(case["small_tiles"]):
        b = mine[2] if bias is not None else None
        out = linear_logprobs(
            mine[0], mine[1], targets, bias=b, temperature=tau, return_entropy=True,
            mask=mask, backend=backend,
        )
        loss(*out).backward()
    b = theirs[2] if bias is not None else None
    loss(*materialised(theirs[0], theirs[1], b, targets, tau, mask)).backward()

    for got, want in zip(mine, theirs):
        assert got.grad.dtype == got.dtype and got.grad.shape == got.shape
        # Scaled by the largest gradient entry: bf16 gradients are rounded to 8 bits,
        # and the Triton backward also rounds dz to bf16 for its tensor-core GEMM.
        scale = 1.0 + float(want.grad.abs().max()) if want.grad.numel() else 1.0
        logit_scale = _scale(hidden, weight, bias, tau)
        tol = {
            torch.float64: 1e-12 * logit_scale,
            torch.float32: 1e-6 * logit_scale,
            torch.bfloat16: 1e-2 + 1e-6 * logit_scale,
        }[case["dtype"]]
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_gradients_to_rounding(backend):
    """One fixed case with everything on (bias, mask, ignored rows, entropy gradient,
    tile boundaries in rows, vocabulary and H) held to float64 rounding: a gradient that
    is off by 0.1% anywhere fails here even if no random case hits it."""
    gen = torch.Generator().manual_seed(7)
    n, dim, vocab = 37, 40, 53
    leaves = [
        torch.randn(n, dim, generator=gen, dtype=torch.float64),
        torch.randn(vocab, dim, generator=gen, dtype=torch.float64) * 0.5,
        torch.randn(vocab, generator=gen, dtype=torch.float64),
    ]
    y = torch.randint(0, vocab, (n,), generator=gen)
    y[::5] = -100
    m = torch.rand(n, generator=gen) < 0.8
    w_lp, w_ent = torch.randn(2, n, generator=gen, dtype=torch.float64)
    y, m, w_lp, w_ent = (t.to(DEVICE) for t in (y, m, w_lp, w_ent))
    mine = [t.to(DEVICE).clone().requires_grad_(True) for t in leaves]
    theirs = [t.to(DEVICE).clone().requires_grad_(True) for t in leaves]
    with small_tiles():
        logp, ent = linear_logprobs(
            *mine[:2], y, bias=mine[2], temperature=0.7, return_entropy=True, mask=m,
            backend=backend,
        )
        ((logp * w_lp).sum() + (ent * w_ent).sum()).backward()
    exp_logp, exp_ent = materialised(*theirs[:2], theirs[2], y, 0.7, m)
    ((exp_logp * w_lp).sum() + (exp_ent * w_ent).sum()).backward()
    torch.testing.assert_close(logp, exp_logp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, exp_ent, rtol=1e-12, atol=1e-12)
    for got, want in zip(mine, theirs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-11, atol=1e-12)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(6, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (6,), generator=gen)
    y[2] = -100
    m = torch.tensor([True, True, True, False, True, True])

    def fn(h, w, b):
        return linear_logprobs(
            h, w, y, bias=b, temperature=0.8, return_entropy=True, mask=m, backend="reference"
        )

    with small_tiles():  # 7-row and 16-entry tiles: the gradient crosses row chunks
        assert torch.autograd.gradcheck(fn, (h, w, b))
    assert torch.autograd.gradcheck(fn, (h, w, b))


# --------------------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_and_forbidden_tokens(backend):
    """-inf bias (forbidden tokens, a whole tile of them), huge and all-equal logits."""
    dim, vocab = 16, 40
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen)
    bias = torch.zeros(vocab)
    bias[16:32] = float("-inf")  # the whole second 16-wide tile
    bias[3] = float("-inf")
    hidden[1] *= 1e3  # logits ~1e4
    hidden[2] = 0.0  # all logits equal the bias: uniform over the allowed tokens
    y = torch.tensor([0, 5, 7, 3, 39, 20])  # rows 3 and 5 ask for a forbidden token
    hidden, weight, bias, y = (t.to(DEVICE) for t in (hidden, weight, bias, y))
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    with small_tiles():
        logp, ent = linear_logprobs(
            leaves[0], leaves[1], y, bias=leaves[2], return_entropy=True, backend=backend
        )
        (torch.where(torch.isfinite(logp), logp, 0).sum() + ent.sum()).backward()
    exp_logp, exp_ent = materialised(hidden, weight, bias, y, 1.0, None)
    allowed = vocab - 17
    assert logp[3] == logp[5] == float("-inf")
    torch.testing.assert_close(ent[2].double(), torch.tensor(math.log(allowed), dtype=torch.float64))
    finite = torch.isfinite(exp_logp)
    torch.testing.assert_close(logp[finite].double(), exp_logp[finite], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(ent.double(), exp_ent, rtol=1e-5, atol=1e-3)
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()


def _lm_head(seed=18, rows=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 16, generator=gen), torch.randn(20, 16, generator=gen), torch.zeros(20)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison, match", [
    ("bias+inf", r"^bias contains NaN or \+inf"),
    ("weight-nan", "^weight contains NaN or inf"),
    ("hidden-nan", "^hidden contains NaN or inf in a valid token's row"),
    ("bias-all-inf", r"only -inf in a valid row: row 0"),
    ("overflow", r"hold \+inf \(an overflow: every input is finite\)"),
])
def test_a_nan_log_prob_is_an_error_naming_its_input(backend, poison, match):
    # Both backends returned NaN (or, the reference for a +inf logit, -inf) without a
    # word, where token_logprobs on the same logits raises (Triton review, 12-07).
    hidden, weight, bias = _lm_head()
    if poison == "bias+inf":
        bias[4] = math.inf
    elif poison == "weight-nan":
        weight[7, 3] = math.nan
    elif poison == "hidden-nan":
        hidden[1, 5] = math.nan
    elif poison == "bias-all-inf":
        bias[:] = -math.inf
    else:
        hidden[0], weight[2] = 1e20, 1e20  # one logit 16e40: inf in fp32
    y = torch.tensor([0, 4, 7])
    args = [t.to(DEVICE) for t in (hidden, weight, y)]
    with pytest.raises(ValueError, match=match):
        linear_logprobs(*args, bias=bias.to(DEVICE), backend=backend)
    # With data checks off the row is NaN in every backend - as token_logprobs' spec says
    # of a +inf logit (the reference gave -inf for it) - and the other rows are untouched.
    vk.set_validation(False)
    try:
        logp, ent = linear_logprobs(*args, bias=bias.to(DEVICE), return_entropy=True,
                                    backend=backend)
    finally:
        vk.set_validation(True)
    bad = {"weight-nan": [0, 1, 2], "hidden-nan": [1]}.get(poison, [0, 1, 2])
    if poison == "overflow":
        bad = [0]
    assert logp[bad].isnan().all() and ent[bad].isnan().all()
    good = [r for r in range(3) if r not in bad]
    if good:
        clean = linear_logprobs(*[t.to(DEVICE) for t in (_lm_head()[0], weight, y)],
                                bias=bias.to(DEVICE), backend=backend)
        assert torch.equal(logp[good], clean[good])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_poisoned_row_that_is_masked_is_not_an_error(backend):
    hidden, weight, bias = _lm_head()
    clean = linear_logprobs(hidden.to(DEVICE), weight.to(DEVICE), torch.tensor([0, 4, 7], device=DEVICE),
                            bias=bias.to(DEVICE), backend=backend)
    hidden[1] = math.nan
    mask = torch.tensor([True, False, True], device=DEVICE)
    logp = linear_logprobs(hidden.to(DEVICE), weight.to(DEVICE), torch.tensor([0, 4, 7], device=DEVICE),
                           mask, bias=bias.to(DEVICE), backend=backend)
    assert torch.equal(logp[mask], clean[mask]) and logp[1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.3, 0.7])
def test_gradient_at_dominant_logits_is_as_exact_as_elsewhere(backend, dtype, temperature):
    """A logit of +-1e4 among ordinary ones, and rows of only large logits, as in
    test_logprobs.py. Row r of hidden is the unit vector e_r and column r of weight holds
    row r's logits: every logit is then exact in any dtype (the float64 oracle sees the
    same logits), and grad_weight[:, r] IS row r's dz. (grad_hidden = dz @ W multiplies dz
    by logits of 1e4: it says nothing more precise about dz.)"""
    z, y, kinds = dominant.rows(dtype)
    n, vocab = z.shape
    dim = 32
    hidden = torch.zeros(n, dim, dtype=dtype)
    hidden[torch.arange(n), torch.arange(n)] = 1
    weight = torch.zeros(vocab, dim, dtype=dtype)
    weight[:, :n] = z.T
    gen = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(2, n, generator=gen, dtype=torch.float64)
    mine = weight.to(DEVICE).requires_grad_(True)
    with small_tiles():
        logp, ent = linear_logprobs(
            hidden.to(DEVICE), mine, y.to(DEVICE), temperature=temperature,
            return_entropy=True, backend=backend,
        )
        ((logp.double().cpu() * w_lp).sum() + (ent.double().cpu() * w_ent).sum()).backward()
    theirs = z.double().requires_grad_(True)
    exp_logp, exp_ent = dominant.fp64_logp_entropy(theirs, y, temperature)
    ((exp_logp * w_lp).sum() + (exp_ent * w_ent).sum()).backward()
    # The interpreter's float32 -> bf16 cast truncates (a GPU rounds to nearest).
    rounding = 1.0 if backend == "triton" and INTERPRET else 0.5
    dominant.assert_grad_exact(mine.grad[:, :n].T, theirs.grad, kinds, dtype, backend, rounding)
    assert not mine.grad[:, n:].any()
    for got, want in ((logp, exp_logp), (ent, exp_ent)):
        torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_are_never_read_and_get_zero_gradient(backend):
    gen = torch.Generator().manual_seed(1)
    clean = torch.randn(5, 20, generator=gen).to(DEVICE)
    weight = torch.randn(23, 20, generator=gen).to(DEVICE)
    y = torch.tensor([1, -100, 3, 4, 22]).to(DEVICE)
    m = torch.tensor([True, True, False, True, True]).to(DEVICE)
    dirty = clean.clone()
    dirty[1] = float("nan")  # ignored by target
    dirty[2] = float("inf")  # ignored by mask
    results = []
    for h in (clean, dirty):
        hl, wl = h.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        logp, ent = linear_logprobs(hl, wl, y, mask=m, return_entropy=True, backend=backend)
        (logp.sum() + ent.sum()).backward()
        results.append((logp, ent, hl.grad, wl.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)  # bit for bit: the garbage rows are not touched
    logp, ent, gh, _ = results[1]
    assert logp[1] == logp[2] == ent[1] == ent[2] == 0
    assert torch.equal(gh[1:3], torch.zeros(2, 20, device=DEVICE))

    hl, wl = clean.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    all_ignored = linear_logprobs(hl, wl, torch.full((5,), -100, device=DEVICE), backend=backend)
    assert torch.equal(all_ignored, torch.zeros(5, device=DEVICE))
    all_ignored.sum().backward()
    assert torch.equal(hl.grad, torch.zeros_like(clean))
    assert torch.equal(wl.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_gradients_asked_for(backend):
    """A frozen LM head skips the weight kernel, a detached hidden the hidden kernel."""
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(9, 16, generator=gen).to(DEVICE)
    w = torch.randn(20, 16, generator=gen).to(DEVICE)
    b = torch.randn(20, generator=gen).to(DEVICE)
    y = torch.randint(0, 20, (9,), generator=gen).to(DEVICE)
    full = [t.clone().requires_grad_(True) for t in (h, w, b)]
    linear_logprobs(full[0], full[1], y, bias=full[2], backend=backend).sum().backward()
    for need in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        leaves = [t.clone().requires_grad_(r) for t, r in zip((h, w, b), need)]
        linear_logprobs(leaves[0], leaves[1], y, bias=leaves[2], backend=backend).sum().backward()
        for leaf, ref, r in zip(leaves, full, need):
            assert (leaf.grad is not None) == r
            if r:
                torch.testing.assert_close(leaf.grad, ref.grad)
    with torch.no_grad():
        out = linear_logprobs(full[0], full[1], y, backend=backend)
    assert not out.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_contract_targets_outside_this_shard(backend):
    """What the vocabulary-parallel path relies on: a local target outside [0, V) (the
    target lives on another rank) adds 0 to the target logit and changes nothing else."""
    from vapo_kernels import _backends

    _, fwd = _backends.select("linear_logprobs", torch.device(DEVICE), backend)
    gen = torch.Generator().manual_seed(8)
    h = torch.randn(6, 16, generator=gen, dtype=torch.float64).to(DEVICE)
    w = torch.randn(20, 16, generator=gen, dtype=torch.float64).to(DEVICE)
    inside = torch.tensor([0, 19, 5, 7, 1, 2]).to(DEVICE)
    outside = torch.tensor([20, 21, 31, -1, -20, -120]).to(DEVICE)  # 20..31: padding columns
    valid = torch.ones(6, dtype=torch.bool, device=DEVICE)
    with small_tiles():
        m, den, mom, t = fwd(h, w, None, inside, valid, 1.0)
        m2, den2, mom2, t2 = fwd(h, w, None, outside, valid, 1.0)
    assert torch.equal(t2, torch.zeros_like(t2))
    assert torch.equal(m, m2) and torch.equal(den, den2) and torch.equal(mom, mom2)
    torch.testing.assert_close(t, (h @ w.T).gather(1, inside[:, None]).squeeze(1))


def test_layouts_and_int32_targets():
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(6, 40, generator=gen)
    hidden = wide[:, ::2]  # strided rows and columns: read as they are or copied, N x H
    weight = torch.randn(11, 20, generator=gen)
    y = torch.randint(0, 11, (6,), generator=gen)
    got = linear_logprobs(hidden, weight, y.int())
    want = materialised(hidden, weight, None, y, 1.0, None)[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    got_t = linear_logprobs(hidden, weight.T.contiguous().T, y)  # column-major weight
    torch.testing.assert_close(got_t, got)
    assert "reference" in vk.available_backends("linear_logprobs", "cpu")


# --------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument

H_ = torch.randn(4, 8)
W_ = torch.randn(10, 8)
Y_ = torch.tensor([0, 1, 2, 9])
BAD = [
    ("hidden must be float", TypeError, lambda b: linear_logprobs(H_.long(), W_, Y_, backend=b)),
    ("hidden must be \\(N, H\\)", ValueError, lambda b: linear_logprobs(torch.randn(8), W_, torch.tensor(1), backend=b)),
    ("weight must be float", TypeError, lambda b: linear_logprobs(H_, W_.int(), Y_, backend=b)),
    ("weight must be \\(V, H\\)", ValueError, lambda b: linear_logprobs(H_, W_.T.contiguous(), Y_, backend=b)),
    ("weight must be \\(V, H\\)", ValueError, lambda b: linear_logprobs(H_, W_[None], Y_, backend=b)),
    ("weight must have a vocabulary", ValueError, lambda b: linear_logprobs(H_, W_[:0], Y_, backend=b)),
    ("weight has dtype", TypeError, lambda b: linear_logprobs(H_, W_.double(), Y_, backend=b)),
    ("weight is on meta", ValueError, lambda b: linear_logprobs(H_, W_.to("meta"), Y_, backend=b)),
    ("bias must be \\(V,\\)", ValueError, lambda b: linear_logprobs(H_, W_, Y_, bias=torch.zeros(9), backend=b)),
    ("bias has dtype", TypeError, lambda b: linear_logprobs(H_, W_, Y_, bias=torch.zeros(10).double(), backend=b)),
    ("bias must be float", TypeError, lambda b: linear_logprobs(H_, W_, Y_, bias=torch.zeros(10).long(), backend=b)),
    ("targets must lie in", ValueError, lambda b: linear_logprobs(H_, W_, torch.tensor([0, 1, 2, 10]), backend=b)),
    ("targets must lie in", ValueError, lambda b: linear_logprobs(H_, W_, torch.tensor([0, -101, 2, 3]), backend=b)),
    ("targets must lie in", ValueError, lambda b: linear_logprobs(H_, W_, torch.tensor([0, -1, 2, 3]), backend=b)),
    ("targets has shape", ValueError, lambda b: linear_logprobs(H_, W_, Y_[:3], backend=b)),
    ("targets must be int64", TypeError, lambda b: linear_logprobs(H_, W_, Y_.float(), backend=b)),
    ("targets is on meta", ValueError, lambda b: linear_logprobs(H_, W_, Y_.to("meta"), backend=b)),
    ("mask has shape", ValueError, lambda b: linear_logprobs(H_, W_, Y_, mask=torch.ones(3, dtype=torch.bool), backend=b)),
    ("temperature must lie in", ValueError, lambda b: linear_logprobs(H_, W_, Y_, temperature=0.0, backend=b)),
    ("temperature must lie in", ValueError, lambda b: linear_logprobs(H_, W_, Y_, temperature=float("nan"), backend=b)),
    ("temperature must be a float", TypeError, lambda b: linear_logprobs(H_, W_, Y_, temperature="1", backend=b)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("match,exc,call", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_clear_error(backend, match, exc, call):
    with pytest.raises(exc, match=match):
        call(backend)


def test_a_family_backend_without_a_kernel_here_runs_the_best_one():
    # "cpp" names the log-prob family's C++ kernels; the fused LM head has none on CPU
    # (a CPU GEMM is the right tool), so it runs its reference kernel - same numbers.
    torch.testing.assert_close(
        linear_logprobs(H_, W_, Y_, backend="cpp"),
        linear_logprobs(H_, W_, Y_, backend="reference"),
        rtol=0, atol=0,
    )
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_logprobs(H_, W_, Y_, backend="cuda_graphs")


# --------------------------------------------------------------------------------------
# torch.library


def test_opcheck():
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(5, 16, generator=gen, requires_grad=True)
    w = torch.randn(11, 16, generator=gen, requires_grad=True)
    b = torch.randn(11, generator=gen, requires_grad=True)
    y = torch.tensor([0, 3, -100, 10, 4])
    m = torch.tensor([True, True, True, False, True])
    op = torch.ops.vapo.linear_logprobs.default
    torch.library.opcheck(op, (h, w, b, y, m, 0.9, "reference"))
    torch.library.opcheck(op, (h.view(1, 5, 16), w, None, y.view(1, 5), None, 1.0, "reference"))
    with torch.no_grad():  # the backward op has no autograd (no double backward)
        _, ent, lse = op(h, w, b, y, m, 0.9, "reference")
    bwd = torch.ops.vapo.linear_logprobs_backward.default
    g = torch.randn(5, generator=gen)
    for need_h, need_w in [(True, True), (True, False), (False, True)]:
        args = (g, g * 0.5, h.detach(), w.detach(), b.detach(), y, m, lse, ent, 0.9, need_h, need_w, "reference")
        torch.library.opcheck(bwd, args)
    torch.library.opcheck(bwd, (g, None, h.detach(), w.detach(), None, y, None, lse, ent, 1.0, True, True, "reference"))


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()

    def loss_fn(h, w, b, y):
        h = torch.tanh(h)  # something for the compiler to fuse around the op
        logp, ent = linear_logprobs(h, w, y, bias=b, temperature=0.9, return_entropy=True)
        return -(logp.mean()) - 0.01 * ent.mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(6)
    leaves = [
        torch.randn(2, 4, 16, generator=gen, requires_grad=True),
        torch.randn(30, 16, generator=gen, requires_grad=True),
        torch.randn(30, generator=gen, requires_grad=True),
    ]
    y = torch.randint(0, 30, (2, 4), generator=gen)
    out = compiled(*leaves, y)
    out.backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    ref = loss_fn(*leaves, y)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for got, t in zip(grads, leaves):
        torch.testing.assert_close(got, t.grad)


# --------------------------------------------------------------------------------------
# Memory: the logits are never materialised

_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from vapo_kernels import linear_logprobs

    n, vocab, dim = int(sys.argv[1]), int(sys.argv[2]), 16
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, dim, generator=gen, requires_grad=True)
    weight = (0.1 * torch.randn(vocab, dim, generator=gen)).requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), generator=gen)

    def run(h, w, y):
        logp, ent = linear_logprobs(h, w, y, return_entropy=True, backend="reference")
        (logp.sum() + ent.sum()).backward()

    # Warm-up on a small problem: the first call faults in torch / BLAS code pages,
    # which count in RSS but are not the op's working memory.
    run(hidden[:64].detach().requires_grad_(True), weight[:100].detach().requires_grad_(True),
        targets[:64] % 100)
    page = resource.getpagesize()
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * page
    run(hidden, weight, targets)
    # VmHWM, not ru_maxrss: ru_maxrss survives execve, so it would report the forked
    # parent's (pytest's) size; VmHWM belongs to this address space.
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    print(json.dumps({"growth": peak - base}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_peak_memory_is_a_few_tiles_not_the_logits():
    """Forward + backward of 8192 rows x 32768 vocabulary: materialising the fp32 logits
    would take 1 GiB (2 GiB with their gradient). The process's peak RSS may grow by a
    few reference tiles (1024 x 8192 fp32 = 32 MiB each), whatever N x V is."""
    n, vocab = 8192, 32768
    logits_bytes = n * vocab * 4
    tile_bytes = ops._LINEAR_ROWS_PER_CHUNK * ops._LINEAR_VOCAB_PER_CHUNK * 4
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(n), str(vocab)],
        check=False, capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    growth = json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
    assert growth < 8 * tile_bytes, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    assert growth < logits_bytes / 4


@pytest.mark.parametrize("backend", vk.available_backends("logprobs", "cpu"))
def test_an_empty_hidden_dimension_gives_the_bias_log_probs(backend):
    # H = 0: every logit is the bias (or 0); the rows still come from the targets.
    hidden = torch.randn(3, 0, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 0, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, 2])
    got = vk.linear_logprobs(hidden, weight, y, bias=bias, backend=backend)
    want = torch.log_softmax(bias, -1)[y]
    torch.testing.assert_close(got, want)
    got.sum().backward()
    (g,) = torch.autograd.grad(torch.log_softmax(bias, -1)[y].sum(), bias)
    torch.testing.assert_close(bias.grad, g)
    assert hidden.grad.shape == (3, 0) and weight.grad.shape == (5, 0)
