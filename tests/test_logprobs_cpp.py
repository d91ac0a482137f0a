"""C++ CPU kernels of token_logprobs (csrc/cpu/logprobs.cpp) against the float64 spec.

The spec is ``reference_forward`` / ``reference_backward`` run in float64 on the very
same input values (bf16 / fp16 logits upcast exactly), so every difference is the
kernel's own rounding. The comparisons run under ``poisoned()``: outputs start as NaN, so
an element the kernel forgot to write fails them.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vapo_kernels import _backends
from vapo_kernels.ops.token_logprobs import reference_backward, reference_forward, token_logprobs

EPS32 = 2.0**-24  # half an fp32 ulp, relative
# Half an ulp of the output format, relative (gradients are stored in logits' dtype).
OUT_HALF_ULP = {
    torch.float32: 2.0**-24,
    torch.float64: 2.0**-53,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


@pytest.fixture(scope="module", autouse=True)
def _extension_must_build():
    err = _backends.extension_error()
    assert err is None, err


def ext():
    return _backends.extension()


# --------------------------------------------------------------------------------------
# Inputs


@st.composite
def cases(draw):
    return {
        "n": draw(st.integers(0, 6)),
        # Around the kernel's vector widths (4..16) and block (1024), and anything else.
        "vocab": draw(
            st.one_of(
                st.sampled_from([1, 2, 3, 15, 16, 17, 33, 1023, 1024, 1025, 4099]),
                st.integers(1, 3000),
            )
        ),
        "dtype": draw(
            st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
        ),
        "temperature": draw(st.sampled_from([1.0, 0.7, 1.3, 0.05, 4.0])),
        "pattern": draw(
            st.sampled_from(
                ["randn", "wide", "extreme", "equal", "one_neg_inf", "neg_inf_runs", "spike"]
            )
        ),
        "edge_targets": draw(st.booleans()),
        "ignore": draw(st.booleans()),
        "mask": draw(st.sampled_from(["none", "random", "all_false"])),
        "strided": draw(st.booleans()),
        "grad_entropy": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def make_logits(pattern, n, vocab, dtype, gen, strided):
    if pattern == "extreme":
        z = torch.tensor([-1e4, 0.0, 1e4], dtype=torch.float64)[
            torch.randint(0, 3, (n, vocab), generator=gen)
        ]
    elif pattern == "equal":
        z = torch.full((n, vocab), 5.0, dtype=torch.float64)
    else:
        z = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * (
            30.0 if pattern == "wide" else 3.0
        )
        if pattern == "one_neg_inf" and vocab > 1:
            z[torch.arange(n), torch.randint(0, vocab, (n,), generator=gen)] = -math.inf
        elif pattern == "neg_inf_runs" and vocab > 1:
            # A run of -inf long enough to fill whole blocks, but never the whole row.
            lo = int(torch.randint(0, vocab, (1,), generator=gen))
            z[:, lo : lo + 1100] = -math.inf
            z[:, (lo + 1100) % vocab if lo + 1100 < vocab else 0] = 1.0
        elif pattern == "spike":
            z[torch.arange(n), torch.randint(0, vocab, (n,), generator=gen)] += 40.0
    z = z.to(dtype)
    if strided:
        # Rows of a wider buffer: the row stride is not V.
        wide = torch.randn(n, vocab + 7, generator=gen).to(dtype)
        wide[:, 3 : 3 + vocab] = z
        z = wide[:, 3 : 3 + vocab]
        assert n < 2 or not z.is_contiguous()
    return z


def build(case):
    gen = torch.Generator().manual_seed(case["seed"])
    n, vocab = case["n"], case["vocab"]
    z = make_logits(case["pattern"], n, vocab, case["dtype"], gen, case["strided"])
    targets = torch.randint(0, vocab, (n,), generator=gen)
    if case["edge_targets"] and n:
        targets[0] = 0
        targets[-1] = vocab - 1
    if case["ignore"] and n > 1:
        targets[1] = -100
    valid = {
        "none": None,
        "random": torch.rand(n, generator=gen) < 0.7,
        "all_false": torch.zeros(n, dtype=torch.bool),
    }[case["mask"]]
    return z, targets, valid


def kept(targets, valid):
    keep = targets != -100
    return keep if valid is None else keep & valid


def assert_close(got, want, atol, rtol, what):
    """|got - want| <= atol + rtol |want| elementwise; infinities must match exactly."""
    got, want = got.double(), want.double()
    atol = torch.as_tensor(atol, dtype=torch.float64).expand_as(want)
    assert not torch.isnan(got).any(), (
        f"{what}: NaN at {torch.nonzero(torch.isnan(got))[:5].tolist()}"
    )
    inf = torch.isinf(want)
    assert torch.equal(got[inf], want[inf]), f"{what}: infinities differ"
    err = (got - want).abs()[~inf]
    bound = (atol + rtol * want.abs())[~inf]
    if err.numel():
        worst = int(torch.argmax(err - bound))
        assert bool((err <= bound).all()), (
            f"{what}: error {err[worst].item():.3g} > bound {bound[worst].item():.3g} "
            f"(got {got[~inf][worst].item()!r}, want {want[~inf][worst].item()!r})"
        )


def max_abs_s(z, temperature):
    """max |z / tau| over the finite logits of each row."""
    finite = torch.where(torch.isfinite(z.double()), z.double(), 0)
    return (
        finite.abs().amax(-1) / temperature
        if z.shape[-1]
        else torch.zeros(z.shape[0], dtype=torch.float64)
    )


def forward_tolerance(z, temperature):
    """(atol per row, rtol) for logp / entropy / log_norm computed from these logits."""
    s_max = max_abs_s(z, temperature)
    # The float64 spec is off by ~eps64 |s|^2 itself: lse carries ~eps64 |s|, which
    # lands on p and then on sum p s, relative to |s|.
    spec = 4e-16 * s_max**2
    if z.dtype == torch.float64:
        return 1e-12 * (1 + s_max) + spec, 1e-12
    # fp32 arithmetic on x = (z - max) / tau: a few ulps of |x| per term, |x| <~ 88;
    # measured <= 1e-6 over thousands of examples, on each instruction set.
    return 5e-6 + spec, 5e-6


def backward_tolerance(z, temperature, ref_grad, grad_logp, grad_entropy):
    """atol per row, rtol: the fp32 rounding of s = z / tau and of the output format."""
    s_max = max_abs_s(z, temperature)
    mag = (
        ref_grad.abs().amax(-1)
        + (grad_logp.double().abs() + grad_entropy.double().abs()) / temperature
    )
    if z.dtype == torch.float64:
        atol = mag * 1e-12 * (1 + s_max)
    else:
        # t = (z - m) / tau - log_norm is off by ~ulp(|z - m| / tau) <= ulp(2 |s|max): p
        # is off by that much relatively.
        atol = mag * 16 * EPS32 * (1 + s_max)
        if z.dtype == torch.float16:
            atol = atol + 2.0**-24  # fp16 subnormal spacing
    return atol[:, None], 1.001 * OUT_HALF_ULP[z.dtype]


# --------------------------------------------------------------------------------------
# The kernels against the float64 spec


@settings(max_examples=300)
@given(case=cases())
def test_forward_backward_match_float64_spec(case, poisoned):
    z, targets, valid = build(case)
    tau = case["temperature"]
    n = z.shape[0]
    with poisoned():
        logp, entropy, stats = ext().token_logprobs_fwd_cpu(z, targets, valid, tau)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    assert logp.dtype == entropy.dtype == stats.dtype == acc
    assert stats.shape == (n, 2) and stats.is_contiguous()
    ref = reference_forward(z.double(), targets, valid, tau)
    atol, rtol = forward_tolerance(z, tau)
    for got, want, name in zip((logp, entropy), ref, ("logp", "entropy")):
        assert_close(got, want, atol, rtol, name)
    assert torch.equal(stats[:, 0].double(), ref[2][:, 0])  # the max logit: exact
    assert_close(stats[:, 1], ref[2][:, 1], atol, rtol, "log_norm")
    keep = kept(targets, valid)
    assert bool((logp[keep] <= 0).all()) and bool((entropy >= 0).all())
    assert bool(
        (logp[~keep] == 0).all() and (entropy[~keep] == 0).all() and (stats[~keep] == 0).all()
    )

    gen = torch.Generator().manual_seed(case["seed"] + 1)
    grad_logp = torch.randn(n, generator=gen).to(acc)
    grad_entropy = torch.randn(n, generator=gen).to(acc) if case["grad_entropy"] else None
    with poisoned():
        out = torch.empty_like(z)  # NaN-filled: every element must be written
        ext().token_logprobs_bwd_cpu(
            grad_logp, grad_entropy, z, targets, valid, stats, entropy, tau, out
        )
    # The spec fed with the kernel's own (fp32) stats and entropy, so that the comparison
    # measures the backward only.
    want = torch.empty(z.shape, dtype=torch.float64)
    g_h64 = None if grad_entropy is None else grad_entropy.double()
    reference_backward(
        grad_logp.double(),
        g_h64,
        z.double(),
        targets,
        valid,
        stats.double(),
        entropy.double(),
        tau,
        want,
    )
    g_h_mag = torch.zeros(n) if grad_entropy is None else grad_entropy
    atol, rtol = backward_tolerance(z, tau, want, grad_logp, g_h_mag)
    assert_close(out, want, atol, rtol, "grad")
    assert bool((out[~keep] == 0).all())

    # In place: the same kernel writing over the logits gives the very same bits.
    buf = z.clone() if not case["strided"] else z._base.clone()[:, 3 : 3 + z.shape[1]]
    ext().token_logprobs_bwd_cpu(
        grad_logp, grad_entropy, buf, targets, valid, stats, entropy, tau, buf
    )
    assert torch.equal(buf, out)


def test_strided_rows_give_the_same_bits_as_contiguous(poisoned):
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(9, 3000, generator=gen)
    z = wide[:, 100:2600]
    assert z.stride(0) == 3000 and z.stride(1) == 1
    targets = torch.randint(0, 2500, (9,), generator=gen)
    with poisoned():
        a = ext().token_logprobs_fwd_cpu(z, targets, None, 0.8)
        b = ext().token_logprobs_fwd_cpu(z.contiguous(), targets, None, 0.8)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    g = torch.randn(9, generator=gen)
    out_a, out_b = torch.empty_like(z), torch.empty_like(z)
    ext().token_logprobs_bwd_cpu(g, g, z, targets, None, a[2], a[1], 0.8, out_a)
    ext().token_logprobs_bwd_cpu(g, g, z.contiguous(), targets, None, a[2], a[1], 0.8, out_b)
    assert torch.equal(out_a, out_b)
    # And the gradient can go into a strided view too.
    out_wide = torch.zeros(9, 3000)
    ext().token_logprobs_bwd_cpu(g, g, z, targets, None, a[2], a[1], 0.8, out_wide[:, 100:2600])
    assert torch.equal(out_wide[:, 100:2600], out_b)
    assert bool((out_wide[:, :100] == 0).all() and (out_wide[:, 2600:] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3])
def test_huge_vocabulary_few_rows(n, dtype, poisoned):
    # Few rows and V >= 128k: rows are cut into segments (one task each) whose partial
    # sums merge; the backward writes each segment from its own task.
    vocab = 131072 + 37
    gen = torch.Generator().manual_seed(n)
    z = (torch.randn(n, vocab, generator=gen) * 4).to(dtype)
    z[0, vocab - 5] = 30.0  # the row max in the last segment, after many rescales
    targets = torch.tensor([vocab - 1, 0, 12345][:n])
    valid = torch.tensor([True, True, False][:n])
    tau = 0.9
    with poisoned():
        logp, entropy, stats = ext().token_logprobs_fwd_cpu(z, targets, valid, tau)
    want = reference_forward(z.double(), targets, valid, tau)
    atol, rtol = forward_tolerance(z, tau)
    for got, w, name in zip((logp, entropy), want, ("logp", "entropy")):
        assert_close(got, w, atol, rtol, name)
    assert torch.equal(stats[:, 0].double(), want[2][:, 0])
    assert_close(stats[:, 1], want[2][:, 1], atol, rtol, "log_norm")
    g = torch.randn(n, generator=gen)
    with poisoned():
        out = torch.empty_like(z)
        ext().token_logprobs_bwd_cpu(g, -g, z, targets, valid, stats, entropy, tau, out)
    want = torch.empty(z.shape, dtype=torch.float64)
    reference_backward(
        g.double(),
        -g.double(),
        z.double(),
        targets,
        valid,
        stats.double(),
        entropy.double(),
        tau,
        want,
    )
    atol, rtol = backward_tolerance(z, tau, want, g, g)
    assert_close(out, want, atol, rtol, "grad")
    ext().token_logprobs_bwd_cpu(g, -g, z, targets, valid, stats, entropy, tau, z)  # in place
    assert torch.equal(z, out)


def test_all_rows_ignored_and_empty(poisoned):
    z = torch.randn(4, 50)
    targets = torch.tensor([-100, 3, -100, 7])
    valid = torch.tensor([True, False, True, False])
    with poisoned():
        outs = ext().token_logprobs_fwd_cpu(z, targets, valid, 1.0)
        grad = torch.empty_like(z)
        ext().token_logprobs_bwd_cpu(
            torch.ones(4), torch.ones(4), z, targets, valid, outs[2], outs[1], 1.0, grad
        )
    for o in outs:
        assert torch.equal(o, torch.zeros_like(o))
    assert torch.equal(grad, torch.zeros_like(z))
    with poisoned():
        outs = ext().token_logprobs_fwd_cpu(
            torch.randn(0, 50), torch.zeros(0, dtype=torch.long), None, 1.0
        )
    assert [o.shape for o in outs] == [(0,), (0,), (0, 2)]


def test_ignored_rows_are_never_read():
    # NaN and inf in ignored rows cannot reach any output.
    z = torch.randn(3, 40)
    z[0] = math.nan
    z[2] = math.inf
    targets = torch.tensor([-100, 5, 6])
    valid = torch.tensor([True, True, False])
    logp, entropy, stats = ext().token_logprobs_fwd_cpu(z, targets, valid, 1.0)
    assert torch.isfinite(torch.stack([logp, entropy, *stats.T])).all()
    grad = torch.empty_like(z)
    ext().token_logprobs_bwd_cpu(
        torch.ones(3), torch.ones(3), z, targets, valid, stats, entropy, 1.0, grad
    )
    assert torch.isfinite(grad).all() and bool((grad[[0, 2]] == 0).all())


def test_nan_logit_poisons_its_row_only():
    z = torch.randn(3, 2000)
    z[1, 1500] = math.nan
    logp, entropy, stats = ext().token_logprobs_fwd_cpu(z, torch.tensor([1, 2, 3]), None, 1.0)
    assert torch.isnan(logp[1]) and torch.isnan(entropy[1]) and torch.isnan(stats[1, 1])
    assert torch.isfinite(torch.stack([logp[[0, 2]], entropy[[0, 2]]])).all()
    assert torch.isfinite(stats[[0, 2]]).all()


def test_row_of_only_neg_inf_does_not_crash():
    # Invalid input; the kernel gives what the reference gives: logp NaN, H 0, stats
    # (-inf, -inf) (lse -inf).
    z = torch.randn(2, 3000)
    z[0] = -math.inf
    targets = torch.tensor([4, 5])
    logp, entropy, stats = ext().token_logprobs_fwd_cpu(z, targets, None, 1.0)
    ref = reference_forward(z.double(), targets, None, 1.0)
    assert torch.isnan(logp[0]) and torch.isnan(ref[0][0])
    assert entropy[0] == ref[1][0] == 0
    assert torch.equal(stats[0].double(), ref[2][0]) and bool((stats[0] == -math.inf).all())
    grad = torch.empty_like(z)
    ext().token_logprobs_bwd_cpu(
        torch.ones(2), torch.ones(2), z, targets, None, stats, entropy, 1.0, grad
    )
    assert torch.isfinite(grad[1]).all()


# --------------------------------------------------------------------------------------
# Through the public op, with autograd


@settings(max_examples=40)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    shape=st.sampled_from([(5, 1), (3, 4, 17), (6, 1100), (2, 3, 2051)]),
    temperature=st.sampled_from([1.0, 0.6, 2.5]),
    use_mask=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_public_op_autograd(dtype, shape, temperature, use_mask, seed, poisoned):
    gen = torch.Generator().manual_seed(seed)
    vocab = shape[-1]
    z64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(0, vocab, shape[:-1], generator=gen)
    targets.view(-1)[0] = -100
    targets.view(-1)[-1] = vocab - 1
    mask = (torch.rand(shape[:-1], generator=gen) < 0.8) if use_mask else None
    g_lp = torch.randn(shape[:-1], generator=gen)
    g_h = torch.randn(shape[:-1], generator=gen)

    def run(z, backend, inplace=False):
        leaf = z.detach().clone().requires_grad_()
        src = leaf * 1 if inplace else leaf  # in-place backward refuses a leaf
        with poisoned():
            logp, ent = token_logprobs(
                src,
                targets,
                temperature=temperature,
                return_entropy=True,
                mask=mask,
                inplace_backward=inplace,
                backend=backend,
            )
            ((logp * g_lp).sum() + (ent * g_h).sum()).backward()
        return logp, ent, leaf.grad

    z = z64.to(dtype)
    logp, ent, grad = run(z, "cpp")
    ref_logp, ref_ent, ref_grad = run(z.double(), "reference")
    assert_close(logp, ref_logp, 1e-5, 1e-5, "logp")
    assert_close(ent, ref_ent, 1e-5, 1e-5, "entropy")
    assert grad.dtype == dtype
    flat = z.view(-1, vocab)
    atol, rtol = backward_tolerance(
        flat, temperature, ref_grad.view(-1, vocab), g_lp.view(-1), g_h.view(-1)
    )
    # ref_grad used fp64 stats; the kernel's fp32 log_norm adds ~ulp(log_norm) to t.
    assert_close(grad.view(-1, vocab), ref_grad.view(-1, vocab), atol * 4, rtol, "grad")
    _, _, grad_inplace = run(z, "cpp", inplace=True)
    assert torch.equal(grad_inplace, grad)


# --------------------------------------------------------------------------------------
# Direct callers of the binding get errors, not out-of-bounds reads


@pytest.mark.parametrize("bad", [5, 6, -1, -99, -101, 2**40, -(2**40)])
@pytest.mark.parametrize("masked", [False, True])
def test_bad_targets_raise(bad, masked):
    z = torch.randn(3, 5)
    targets = torch.tensor([0, bad, 4])
    valid = torch.tensor([True, not masked, True])
    with pytest.raises(RuntimeError, match="targets must lie in"):
        ext().token_logprobs_fwd_cpu(z, targets, valid, 1.0)
    ok = ext().token_logprobs_fwd_cpu(z, torch.tensor([0, 1, 4]), None, 1.0)
    with pytest.raises(RuntimeError, match="targets must lie in"):
        ext().token_logprobs_bwd_cpu(
            torch.ones(3), None, z, targets, valid, ok[2], ok[1], 1.0, torch.empty_like(z)
        )


def _forward_args(**change):
    args = {"logits": torch.randn(3, 8), "targets": torch.tensor([0, 1, 2]), "valid": None}
    args["temperature"] = 1.0
    args.update(change)
    return tuple(args.values())


BAD_FORWARD = {
    "logits not 2-D": ({"logits": torch.randn(8)}, "must be \\(N, V\\)"),
    "integer logits": ({"logits": torch.ones(3, 8, dtype=torch.long)}, "fp16, bf16, fp32"),
    "vocabulary strided": ({"logits": torch.randn(8, 3).t()}, "contiguous along the vocab"),
    "int32 targets": ({"targets": torch.tensor([0, 1, 2], dtype=torch.int32)}, "targets must be"),
    "targets too short": ({"targets": torch.tensor([0, 1])}, "targets must be"),
    "float mask": ({"valid": torch.ones(3)}, "valid must be"),
    "mask too short": ({"valid": torch.ones(2, dtype=torch.bool)}, "valid must be"),
    "zero temperature": ({"temperature": 0.0}, "temperature"),
    "negative temperature": ({"temperature": -1.0}, "temperature"),
    "nan temperature": ({"temperature": math.nan}, "temperature"),
    "inf temperature": ({"temperature": math.inf}, "temperature"),
}


@pytest.mark.parametrize("name", list(BAD_FORWARD))
def test_bad_forward_arguments_raise(name):
    change, message = BAD_FORWARD[name]
    with pytest.raises(RuntimeError, match=message):
        ext().token_logprobs_fwd_cpu(*_forward_args(**change))


def _backward_args(**change):
    z = torch.randn(3, 8)
    args = {
        "grad_logp": torch.ones(3),
        "grad_entropy": None,
        "logits": z,
        "targets": torch.tensor([0, 1, 2]),
        "valid": None,
        "stats": torch.zeros(3, 2),
        "entropy": torch.zeros(3),
        "temperature": 1.0,
        "out": torch.empty_like(z),
    }
    args.update(change)
    return tuple(args.values())


_WIDE = torch.randn(3, 9)
BAD_BACKWARD = {
    "grad dtype": ({"grad_logp": torch.ones(3, dtype=torch.float64)}, "grad_logp must be"),
    "grad length": ({"grad_logp": torch.ones(2)}, "grad_logp must be"),
    "grad_entropy length": ({"grad_entropy": torch.ones(2)}, "grad_entropy must be"),
    "stats length": ({"stats": torch.zeros(2, 2)}, "stats must be"),
    "stats flat": ({"stats": torch.zeros(3)}, "stats must be"),
    "entropy dtype": ({"entropy": torch.zeros(3, dtype=torch.float16)}, "entropy must be"),
    "out dtype": ({"out": torch.empty(3, 8, dtype=torch.float64)}, "out must be"),
    "out shape": ({"out": torch.empty(3, 7)}, "out must be"),
    "out rows overlap": ({"out": torch.empty(1, 8).expand(3, 8)}, "out rows must not overlap"),
    "out overlaps logits": ({"logits": _WIDE[:, :8], "out": _WIDE[:, 1:]}, "not overlap it"),
}


@pytest.mark.parametrize("name", list(BAD_BACKWARD))
def test_bad_backward_arguments_raise(name):
    change, message = BAD_BACKWARD[name]
    with pytest.raises(RuntimeError, match=message):
        ext().token_logprobs_bwd_cpu(*_backward_args(**change))


# --------------------------------------------------------------------------------------
# Every instruction-set variant (the kernel picks AVX-512, AVX2 or the SSE2 baseline at
# run time, capped by torch's ATEN_CPU_CAPABILITY): the ones this CPU would not pick
# are run in subprocesses.

_ISA_CHECK = r"""
import torch
from vapo_kernels import _backends
from vapo_kernels.ops.token_logprobs import reference_backward, reference_forward
ext = _backends.extension()
gen = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for vocab in (1, 13, 1000, 2063):
        z = (torch.randn(5, vocab, generator=gen, dtype=torch.float64) * 4).to(dtype)
        if vocab > 1:
            z[0, 0] = -float("inf")
        t = torch.randint(0, vocab, (5,), generator=gen)
        t[1] = -100
        tau = 0.7
        got = ext.token_logprobs_fwd_cpu(z, t, None, tau)
        want = reference_forward(z.double(), t, None, tau)
        for g, w in zip(got, want):
            assert torch.allclose(g.double(), w, rtol=1e-5, atol=1e-5), (dtype, vocab, g, w)
        gl = torch.randn(5, generator=gen).to(got[0].dtype)
        out = torch.empty_like(z)
        ext.token_logprobs_bwd_cpu(gl, gl, z, t, None, got[2], got[1], tau, out)
        ref = torch.empty(z.shape, dtype=torch.float64)
        reference_backward(gl.double(), gl.double(), z.double(), t, None, got[2].double(), got[1].double(), tau, ref)
        tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}.get(dtype, 1e-5)
        assert torch.allclose(out.double(), ref, rtol=tol, atol=1e-5), (dtype, vocab)
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA variants")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_other_instruction_sets(capability):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", _ISA_CHECK],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]


def test_row_offsets_beyond_int32_elements():
    """Rows more than 2^31 elements into the buffer: a (3, V) fp16 view with a row stride
    of 2^30 + 64, so row 2 starts at 2^31 + 128 elements - past int32 although the stride
    itself fits. Row 1 is ignored, so only a few pages of the 4 GiB buffer are touched."""
    ext = _backends.extension()
    vocab, stride = 1025, 2**30 + 64
    try:
        buf = torch.empty(2 * stride + vocab, dtype=torch.float16)
    except RuntimeError:
        pytest.skip("cannot reserve 4 GiB of address space")
    z = buf.as_strided((3, vocab), (stride, 1))
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(2, vocab, generator=gen).half()
    z[0], z[2] = rows[0], rows[1]
    y = torch.tensor([vocab - 1, -100, 5])
    dense = torch.stack([rows[0], rows[0], rows[1]]).double()  # the same rows, contiguous
    exp = reference_forward(dense, y, None, 1.0)
    got = ext.token_logprobs_fwd_cpu(z, y, None, 1.0)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g.double(), e, rtol=1e-6, atol=1e-6)
    g_lp = torch.tensor([1.0, 1.0, -2.0])
    exact = torch.empty(3, vocab, dtype=torch.float64)
    reference_backward(g_lp.double(), None, dense, y, None, exp[2], exp[1], 1.0, exact)
    # In place, so the stores too land 2^31 elements out.
    ext.token_logprobs_bwd_cpu(g_lp, None, z, y, None, got[2], got[1], 1.0, z)
    torch.testing.assert_close(z[[0, 2]].double(), exact[[0, 2]], rtol=2e-3, atol=1e-6)
    assert bool((z[1] == 0).all())
