"""Triton token-loss kernel (``vapo_kernels.triton.loss``) against the float64 spec.

Without a GPU the kernel runs through the Triton interpreter on CPU tensors: shapes stay
small and ``block=16`` (and 8, 32) puts block boundaries inside and across sequences.
On a GPU the same tests run compiled on CUDA tensors; ``-m gpu`` adds millions of
tokens, a 1M-token sequence and indices beyond 2^31.

Exactness against a float64 spec from float32 compute: the test data sit on a grid
(multiples of 2^-10, |x| < 64), so differences and sums of inputs are exact in float32,
and tokens whose ratio (or KL estimator) lands within 1e-5 of a clip bound are moved
onto the bound's safe side (old_logp := logp, ref_logp := logp). Every discrete decision (clip, tie,
clamp gradient, clip counts) is then the same in float32 and float64, ties included
(logp == old_logp, A = 0, v == old_v +- eps, |v - R| == |v_clip - R|, log-ratio == +-C),
and what is left is rounding, checked against a per-token / per-sum scale.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

# Must precede the first import of triton (tests/conftest.py does the same).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vapo_kernels as vk
from vapo_kernels import _loss_layout as layout
from vapo_kernels.ops import loss_spec
from vapo_kernels._loss_layout import NUM_SUMS
from vapo_kernels.ops.loss_spec import reference_kernel
from vapo_kernels.triton import loss as tloss

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
BLOCK = 16
EDGE_LENGTHS = [0, 1, 2, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 1, 4 * BLOCK + 3]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
KL_KINDS = [None, "k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "abs+", "k2+", "k3+"]
COUNT_SUMS = (layout.S_TOKENS, layout.S_CLIP_LOW, layout.S_CLIP_HIGH, layout.S_DUAL_CLIP, layout.S_VF_CLIP)
# Rounding allowed per unit of scale: a few ulps of the compute dtype.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def out_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dev(t):
    return None if t is None else t.to(DEVICE)


def cpu(t):
    """Float64 on the CPU (exact for every input dtype)."""
    return None if t is None else t.detach().cpu().double()


@contextlib.contextmanager
def small_blocks(block=BLOCK):
    """The public wrappers take the default plan: shrink it so blocks split sequences."""
    was = tloss.INTERPRET_BLOCK, tloss.GPU_BLOCK
    tloss.INTERPRET_BLOCK = tloss.GPU_BLOCK = block
    try:
        yield
    finally:
        tloss.INTERPRET_BLOCK, tloss.GPU_BLOCK = was


# --------------------------------------------------------------------------------------
# Cases


@st.composite
def cases(draw, max_seqs=5):
    case = {
        "lengths": draw(
            st.lists(
                st.one_of(st.sampled_from(EDGE_LENGTHS), st.integers(0, 3 * BLOCK)),
                max_size=max_seqs,
            )
        ),
        "layout": draw(st.sampled_from(["packed", "padded"])),
        "mask": draw(st.sampled_from(["none", "random", "turns", "all_false"])),
        "garbage": draw(st.sampled_from([math.nan, 1e30, -math.inf])),
        "dtype": draw(st.sampled_from(DTYPES)),
        "policy": draw(st.booleans()),
        "isw": draw(st.booleans()),
        "value": draw(st.sampled_from([None, "unclipped", "verl", "openrlhf"])),
        "kl": draw(st.sampled_from(KL_KINDS)),
        "entropy": draw(st.booleans()),
        "lm": draw(st.booleans()),
        "clip_low": draw(st.sampled_from([0.2, 0.0, 0.1, 1.0])),
        "clip_high": draw(st.sampled_from([0.28, 0.0, 0.5, 4.0])),
        "dual_clip": draw(st.sampled_from([None, 1.5, 3.0])),
        "ratio_log_clamp": draw(st.sampled_from([20.0, 0.5, 3.0])),
        "value_clip": draw(st.sampled_from([0.5, 0.0, 0.125])),
        "coefs": draw(st.lists(st.sampled_from([1.0, 0.0, 0.3, -0.7]), min_size=4, max_size=4)),
        "spread": draw(st.sampled_from(["small", "wide"])),
        "zero_adv": draw(st.booleans()),
        "weights": draw(st.sampled_from(["random", "uniform", "some_zero"])),
        "need_grad": draw(st.sampled_from([True, True, False])),
        "block": draw(st.sampled_from([BLOCK, BLOCK, 8, 2 * BLOCK])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }
    if not (case["policy"] or case["value"] or case["kl"] or case["entropy"] or case["lm"]):
        case["entropy"] = True
    return case


def make_mask(kind: str, length: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "none":
        return torch.ones(length, dtype=torch.bool)
    if kind == "all_false":
        return torch.zeros(length, dtype=torch.bool)
    if kind == "random":
        return torch.rand(length, generator=gen) < 0.6
    mask = torch.zeros(length, dtype=torch.bool)  # "turns": alternating spans
    t, valid = 0, bool(torch.rand(1, generator=gen) < 0.5)
    while t < length:
        span = int(torch.randint(1, 8, (1,), generator=gen))
        mask[t : t + span] = valid
        t, valid = t + span, not valid
    return mask


def grid(x: torch.Tensor) -> torch.Tensor:
    """Multiples of 2^-10 in (-64, 64): sums and differences stay exact in float32."""
    return (x * 1024).round().clamp(-65000, 65000) / 1024


def params_of(case) -> list[float]:
    vf, kl, ent, lm = case["coefs"]
    value = case["value"]
    return loss_spec.loss_params(
        clip_low=case["clip_low"], clip_high=case["clip_high"], dual_clip=case["dual_clip"],
        ratio_log_clamp=case["ratio_log_clamp"],
        value_clip=None if value in (None, "unclipped") else case["value_clip"],
        value_clip_form="openrlhf" if value == "openrlhf" else "verl",
        kl_kind=case["kl"], vf_coef=vf, kl_coef=kl, entropy_coef=ent, lm_coef=lm,
    )


def near(x, b, params_dtype):
    """x lies near the bound b (as rounded by either dtype) without sitting on it."""
    bounds = [b, float(torch.tensor(b, dtype=params_dtype))]
    return sum(((x != c) & ((x - c).abs() <= 1e-5 * max(1.0, abs(c)))) for c in bounds) > 0


def separate_from_bounds(x, params, dtype):
    """old_logp := logp (ratio 1) and ref := logp (diff 0) where a ratio or a k3
    estimator is within 1e-5 of a bound it is compared with, so float32 and float64
    take the same branch. Returns new dtype tensors."""
    out = out_dtype(dtype)
    lp, olp, ref = x["logp"], x["old_logp"], x["ref_logp"]
    if olp is not None:
        raw = lp.double() - olp.double()
        clamp = params[layout.P_RATIO_CLAMP]
        ratio = torch.exp(raw.clamp(-clamp, clamp))
        lo, hi = 1.0 - params[layout.P_CLIP_LOW], 1.0 + params[layout.P_CLIP_HIGH]
        bad = near(ratio, lo, out) | near(ratio, hi, out)
        if params[layout.P_DUAL_CLIP] > 0:
            bad |= near(torch.maximum(ratio, ratio.clamp(lo, hi)), params[layout.P_DUAL_CLIP], out)
        x["old_logp"] = torch.where(bad, lp, olp)
    if ref is not None:
        lr = (ref.double() - lp.double()).clamp(-20, 20)
        bad = near(torch.exp(lr) - lr - 1, 10.0, out)
        x["ref_logp"] = torch.where(bad, lp, ref)
    return x


def build(case):
    """Contract inputs: a dict of token tensors (dtype, None when off; garbage in masked
    slots), mask, offsets, seq_weight and lm_weight (output dtype), params."""
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, lengths = case["dtype"], case["lengths"]
    num_seqs = len(lengths)
    if case["layout"] == "padded":
        width = max(lengths, default=0)
        offsets = torch.arange(num_seqs + 1, dtype=torch.int64) * width
        inside = torch.cat([torch.arange(width) < n for n in lengths] or [torch.zeros(0) > 0])
    else:
        offsets = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()])
        inside = torch.ones(int(offsets[-1]), dtype=torch.bool)
    n = int(offsets[-1])
    seg = [int(offsets[s + 1] - offsets[s]) for s in range(num_seqs)]
    content = torch.cat([make_mask(case["mask"], k, gen) for k in seg] or [torch.zeros(0) > 0])
    mask = None
    if case["mask"] != "none" or case["layout"] == "padded":
        mask = content & inside
        if case["mask"] == "none" and bool(mask.all()):
            mask = None

    params = params_of(case)
    wide = case["spread"] == "wide"
    def rnd():
        return torch.randn(n, generator=gen, dtype=torch.float64)

    def tie(a, b, p=0.2):  # copy a into b on a fraction p of the tokens (exact ties)
        return torch.where(torch.rand(n, generator=gen) < p, a, b)

    logp = -rnd().abs() * (4 if wide else 1)
    old_logp = tie(logp, logp + rnd() * (12 if wide else 0.3))
    # log-ratio exactly at +-C on some tokens (the clamp passes its gradient there)
    at_clamp = logp - case["ratio_log_clamp"] * rnd().sign()
    old_logp = tie(at_clamp, old_logp, 0.1)
    adv = rnd()
    if case["zero_adv"]:
        adv = torch.where(torch.rand(n, generator=gen) < 0.3, 0.0, adv)
    values = rnd()
    old_values = tie(values, values + 0.4 * rnd())
    returns = tie(values, rnd())
    ref = tie(logp, logp + rnd() * (12 if wide else 0.5))
    entropy = rnd().abs()
    isw = 2 * torch.rand(n, generator=gen, dtype=torch.float64)
    isw = torch.where(torch.rand(n, generator=gen) < 0.2, 0.0, isw)

    value = case["value"]
    has_logp = case["policy"] or case["kl"] is not None or case["lm"]
    x = {
        "logp": logp if has_logp else None,
        "old_logp": old_logp if case["policy"] else None,
        "advantages": adv if case["policy"] else None,
        "values": values if value else None,
        "old_values": old_values if value in ("verl", "openrlhf") else None,
        "returns": returns if value else None,
        "ref_logp": ref if case["kl"] is not None else None,
        "entropy": entropy if case["entropy"] else None,
        "is_weights": isw if case["policy"] and case["isw"] else None,
    }
    x = {k: None if t is None else grid(t).to(dtype) for k, t in x.items()}
    x = separate_from_bounds(x, params, dtype)
    if mask is not None:
        junk = torch.tensor(case["garbage"], dtype=dtype)
        x = {k: None if t is None else torch.where(mask, t, junk) for k, t in x.items()}

    out = out_dtype(dtype)
    if case["weights"] == "uniform":
        seq_weight = torch.full((num_seqs,), 1.0 / max(1, n), dtype=torch.float64)
    else:
        seq_weight = torch.rand(num_seqs, generator=gen, dtype=torch.float64)
        if case["weights"] == "some_zero":
            seq_weight = torch.where(torch.rand(num_seqs, generator=gen) < 0.3, 0.0, seq_weight)
    lm_weight = None
    if case["lm"]:
        lm_weight = torch.rand(num_seqs, generator=gen, dtype=torch.float64)
        lm_weight = torch.where(torch.rand(num_seqs, generator=gen) < 0.5, 0.0, lm_weight)
        lm_weight = lm_weight.to(out).to(DEVICE)
    x = {k: dev(t) for k, t in x.items()}
    return x, dev(mask), dev(offsets), dev(seq_weight.to(out)), lm_weight, params


ARGS = (
    "logp", "old_logp", "advantages", "values", "old_values", "returns", "ref_logp", "entropy",
    "is_weights",
)


def run_triton(x, mask, offsets, sw, lmw, params, need_grad, block=BLOCK):
    args = (x[k] for k in ARGS)
    return tloss.token_loss(*args, mask, offsets, sw, lmw, params, need_grad, block=block)


def run_reference64(x, mask, offsets, sw, lmw, params, need_grad):
    """The spec in float64 on CPU (inputs upcast exactly; weights as the kernel sees them)."""
    out = reference_kernel(
        *(cpu(x[k]) for k in ARGS), None if mask is None else mask.cpu(), offsets.cpu(),
        cpu(sw), cpu(lmw), params, need_grad,
    )
    return out


# --------------------------------------------------------------------------------------
# Tolerances: rounding relative to the magnitudes that enter each output


def scales(x, mask, offsets, sw, lmw, params):
    """Float64 (NUM_SUMS,) magnitudes of the sums and (N,) magnitudes of each gradient."""
    n = int(offsets[-1])
    valid = torch.ones(n, dtype=torch.bool) if mask is None else mask.cpu()
    lengths = (offsets[1:] - offsets[:-1]).cpu()
    seq = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    zero = torch.zeros((), dtype=torch.float64)
    c = {k: None if x[k] is None else torch.where(valid, cpu(x[k]), zero) for k in ARGS}
    w = torch.where(valid, cpu(sw)[seq], zero)
    s = torch.zeros(NUM_SUMS, dtype=torch.float64)
    g_lp = torch.zeros(n, dtype=torch.float64)
    g_v = torch.zeros(n, dtype=torch.float64)
    g_h = torch.zeros(n, dtype=torch.float64)

    def one(t):
        return torch.where(valid, t, zero)

    if c["advantages"] is not None:
        clamp = params[layout.P_RATIO_CLAMP]
        lr = (c["logp"] - c["old_logp"]).clamp(-clamp, clamp)
        r = torch.exp(lr)
        isw = 1.0 if c["is_weights"] is None else c["is_weights"].abs()
        big = 1 + params[layout.P_CLIP_HIGH] + params[layout.P_DUAL_CLIP]
        a = c["advantages"].abs() * isw
        s[layout.S_PG] = (w * a * (r + big)).sum()
        g_lp += w * a * r
        s[layout.S_NEG_LOG_RATIO] = one(lr.abs()).sum()
        s[layout.S_K3] = one(r + 1 + lr.abs()).sum()
        s[layout.S_RATIO_SUM] = one(r).sum()
    if c["returns"] is not None:
        eps = max(params[layout.P_VALUE_CLIP], 0.0)
        ov = c["values"] if c["old_values"] is None else c["old_values"]
        e = (c["values"] - c["returns"]).abs() + (ov - c["returns"]).abs() + eps
        s[layout.S_VF] = (w * e * e).sum()
        g_v += abs(params[layout.P_VF_COEF]) * w * e
        # Plain sums of R, R^2, R - v, (R - v)^2, which can cancel: scaled by magnitudes.
        r, a = c["returns"].abs(), c["returns"].abs() + c["values"].abs()
        s[layout.S_RETURNS], s[layout.S_RETURNS_SQ] = r.sum(), (r * r).sum()
        s[layout.S_VALUE_ERR], s[layout.S_VALUE_ERR_SQ] = a.sum(), (a * a).sum()
    if c["ref_logp"] is not None and params[layout.P_KL_KIND] > 0:
        d = (c["logp"] - c["ref_logp"]).abs()
        e = 1 + d + d * d + torch.exp(d.clamp(max=20))
        s[layout.S_KL] = (w * e).sum()
        g_lp += abs(params[layout.P_KL_COEF]) * w * e
    if c["entropy"] is not None:
        s[layout.S_ENTROPY] = (w * c["entropy"].abs()).sum()
        g_h += abs(params[layout.P_ENTROPY_COEF]) * w
    if lmw is not None:
        w_lm = torch.where(valid, cpu(lmw)[seq], zero)
        s[layout.S_LM] = (w_lm * c["logp"].abs()).sum()
        g_lp += abs(params[layout.P_LM_COEF]) * w_lm
    return s, (g_lp, g_v, g_h)


def assert_sums_match(got, exp, scale, dtype, what=""):
    got = got.detach().cpu().double()
    rtol = RTOL[out_dtype(dtype)]
    for i in COUNT_SUMS:
        assert got[i] == exp[i], f"{what} sum {i}: {got[i].item()} != {exp[i].item()}"
    for i in (layout.S_RATIO_MIN, layout.S_RATIO_MAX):
        if math.isinf(exp[i]):
            assert got[i] == exp[i], f"{what} sum {i}: {got[i].item()} != {exp[i].item()}"
        else:
            assert abs(got[i] - exp[i]) <= rtol * abs(exp[i]), (
                f"{what} sum {i}: {got[i].item()} vs {exp[i].item()}"
            )
    for i in range(NUM_SUMS):
        if i in COUNT_SUMS or i in (layout.S_RATIO_MIN, layout.S_RATIO_MAX):
            continue
        tol = rtol * (scale[i] + abs(exp[i])) + 1e-300
        assert abs(got[i] - exp[i]) <= tol, (
            f"{what} sum {i}: {got[i].item()!r} vs {exp[i].item()!r} (tol {tol.item():.3g})"
        )


def assert_grad_match(got, exp, scale, dtype, what):
    got = got.detach().cpu().double()
    assert got.shape == exp.shape, what
    tol = RTOL[out_dtype(dtype)] * (scale + exp.abs()) + 1e-300
    err = (got - exp).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} off, worst at {int(torch.where(bad, err, 0).argmax())}: "
        f"got {got[bad][0].item()!r}, expected {exp[bad][0].item()!r}"
    )


def check_against_reference(got, x, mask, offsets, sw, lmw, params, need_grad, dtype):
    exp = run_reference64(x, mask, offsets, sw, lmw, params, need_grad)
    s_scale, g_scales = scales(x, mask, offsets, sw, lmw, params)
    sums, *grads = got
    assert sums.dtype == out_dtype(dtype) and sums.shape == (NUM_SUMS,)
    assert sums.device.type == DEVICE
    assert_sums_match(sums, exp[0], s_scale, dtype)
    names = ("grad_logp", "grad_values", "grad_entropy")
    for name, g, e, sc in zip(names, grads, exp[1:], g_scales):
        assert g.dtype == out_dtype(dtype), name
        assert g.device.type == DEVICE, name
        if e.numel() == 0:
            assert g.shape == (0,), name
        else:
            assert_grad_match(g, e, sc, dtype, name)
            if mask is not None:
                assert (g.cpu()[~mask.cpu()] == 0).all(), f"{name} on masked tokens must be 0"


# --------------------------------------------------------------------------------------
# The kernel contract


@settings(max_examples=150, deadline=None)
@given(case=cases())
def test_kernel_matches_float64_reference(case, poisoned):
    x, mask, offsets, sw, lmw, params = build(case)
    need_grad, block = case["need_grad"], case["block"]
    with poisoned():
        got = run_triton(x, mask, offsets, sw, lmw, params, need_grad, block=block)
    check_against_reference(got, x, mask, offsets, sw, lmw, params, need_grad, case["dtype"])
    if mask is not None:
        # Other garbage in the masked slots: every output bit for bit the same.
        other = {k: None if t is None else torch.where(mask, t, 0.0) for k, t in x.items()}
        again = run_triton(other, mask, offsets, sw, lmw, params, need_grad, block=block)
        for a, b in zip(got, again):
            assert torch.equal(a, b)


def test_exact_ties_and_bounds():
    """Each of torch's tie / clamp-bound rules, hit exactly, in float32 against float64."""
    def t(*v):
        return torch.tensor(v, dtype=torch.float32, device=DEVICE)

    # Policy: clip 0 makes 1 both bounds (ratio 1, A = 0: ties); log-ratio exactly at
    # -C where the unclipped term wins (the clamp passes the gradient); dual clip.
    logp = t(-1.0, -1.0, -0.5, -3.0, -1.0, -2.0, -0.25, -1.0)
    old = t(-1.0, -1.0, -1.0, -2.5, -4.0, -1.0, -0.25, -1.25)
    adv = t(1.0, 0.0, -2.0, 1.0, -0.5, 3.0, -1.0, 0.0)
    # Value: v == old +- eps, |v - R| == |v_clip - R|, v == R, and clear cases.
    v = t(0.5, 1.5, -0.5, 1.5, 1.5, 0.75, 2.0, -1.0)
    ov = t(0.0, 0.0, 0.0, 0.0, 0.0, 0.25, 1.5, 0.0)
    ret = t(0.5, 1.0, -1.0, 0.25, 1.5, 0.5, 0.0, 3.0)
    # KL: -diff exactly at +-20 and 0.
    ref = t(19.0, -21.0, -0.5, -3.0, -1.0, -2.0, 19.75, 0.0)
    n = 8
    offsets = torch.tensor([0, 3, 8], dtype=torch.int64, device=DEVICE)
    sw = torch.tensor([0.5, 0.25], dtype=torch.float32, device=DEVICE)
    for form in ("verl", "openrlhf"):
        for kl in ("k3", "abs", "k3+"):
            params = loss_spec.loss_params(clip_low=0.0, clip_high=0.0, dual_clip=1.5, ratio_log_clamp=0.5,
                               value_clip=0.5, value_clip_form=form, kl_kind=kl, kl_coef=0.5)
            h = torch.rand(n, device=DEVICE)
            x = dict(zip(ARGS, (logp, old, adv, v, ov, ret, ref, h, None)))
            got = run_triton(x, None, offsets, sw, None, params, True, block=4)
            check_against_reference(got, x, None, offsets, sw, None, params, True, torch.float32)


def test_sequences_across_blocks_and_many_per_block():
    """Long sequences crossing many blocks, runs of empty and length-1 sequences inside
    one block (the per-token binary search takes several steps), trailing empties."""
    gen = torch.Generator().manual_seed(3)
    lengths = [0, 70, 1, 1, 0, 1, 2, 1, 1, 1, 3, 1, 0, 0, 1, 40, 1, 0, 0]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    n = int(offsets[-1])
    x = {k: None for k in ARGS}
    x["logp"] = grid(-torch.rand(n, generator=gen, dtype=torch.float64))
    x["entropy"] = grid(torch.rand(n, generator=gen, dtype=torch.float64))
    sw = torch.arange(1, len(lengths) + 1, dtype=torch.float64) / 7
    lmw = torch.arange(len(lengths), dtype=torch.float64) % 3 / 5
    params = loss_spec.loss_params(entropy_coef=0.25, lm_coef=0.5)
    x = {k: dev(t) for k, t in x.items()}
    mask = dev(torch.rand(n, generator=gen) < 0.8)
    offsets, sw, lmw = dev(offsets), dev(sw), dev(lmw)
    for block in (4, 8, 32, 128):
        got = run_triton(x, mask, offsets, sw, lmw, params, True, block=block)
        check_against_reference(got, x, mask, offsets, sw, lmw, params, True, torch.float64)


def test_all_masked_and_empty():
    params = loss_spec.loss_params(dual_clip=3.0, value_clip=0.5, kl_kind="k3", entropy_coef=0.1, lm_coef=0.1)
    for n, offsets in ((5, [0, 2, 5]), (0, [0, 0, 0]), (0, [0])):
        offs = torch.tensor(offsets, dtype=torch.int64, device=DEVICE)
        s = len(offsets) - 1
        x = {k: torch.full((n,), math.nan, device=DEVICE) for k in ARGS}
        mask = torch.zeros(n, dtype=torch.bool, device=DEVICE)
        sw = torch.ones(s, device=DEVICE)
        sums, g_lp, g_v, g_h = run_triton(x, mask, offs, sw, sw, params, True)
        exp = torch.zeros(NUM_SUMS)
        exp[layout.S_RATIO_MIN], exp[layout.S_RATIO_MAX] = math.inf, -math.inf
        assert torch.equal(sums.cpu(), exp)
        for g in (g_lp, g_v, g_h):
            assert g.shape == (n,) and (g == 0).all()


def test_no_grad_and_absent_inputs_give_empty_gradients():
    x = {k: None for k in ARGS}
    x["values"] = torch.randn(10, device=DEVICE, dtype=torch.float64)
    x["returns"] = torch.randn(10, device=DEVICE, dtype=torch.float64)
    offs = torch.tensor([0, 10], device=DEVICE)
    sw = torch.ones(1, device=DEVICE, dtype=torch.float64)
    params = loss_spec.loss_params(value_clip=None)
    sums, g_lp, g_v, g_h = run_triton(x, None, offs, sw, None, params, True)
    assert sums.dtype == torch.float64
    assert g_lp.shape == g_h.shape == (0,) and g_v.shape == (10,)
    assert g_lp.dtype == g_h.dtype == torch.float64
    sums2, *grads = run_triton(x, None, offs, sw, None, params, False)
    assert all(g.shape == (0,) and g.dtype == torch.float64 for g in grads)
    assert torch.equal(sums, sums2)


def test_deterministic():
    gen = torch.Generator().manual_seed(0)
    n = 300
    x = {k: None for k in ARGS}
    for k in ("logp", "old_logp", "advantages", "entropy"):
        x[k] = torch.randn(n, generator=gen).to(DEVICE)
    offs = torch.tensor([0, 7, 150, 300], device=DEVICE)
    sw = torch.rand(3, generator=gen).to(DEVICE)
    params = loss_spec.loss_params(entropy_coef=0.01)
    a = run_triton(x, None, offs, sw, None, params, True, block=32)
    b = run_triton(x, None, offs, sw, None, params, True, block=32)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_bad_block_raises():
    x = {k: None for k in ARGS}
    x["entropy"] = torch.zeros(4, device=DEVICE)
    offs = torch.tensor([0, 4], device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        run_triton(x, None, offs, torch.ones(1, device=DEVICE), None, loss_spec.loss_params(), True, block=24)


# --------------------------------------------------------------------------------------
# The public wrappers, backend="triton" against backend="reference" in float64


WRAPPERS = ["policy_loss", "value_loss", "vapo_loss", "kl_loss", "agg_loss", "positive_lm_loss"]


@st.composite
def wrapper_cases(draw):
    case = draw(cases(max_seqs=4))
    case["wrapper"] = draw(st.sampled_from(WRAPPERS))
    case["agg"] = draw(st.sampled_from(loss_spec.AGG_MODES))
    case["spread"] = "small"
    return case


def wrapper_inputs(case):
    """Token tensors (layout of the case, no garbage), mask, cu_seqlens, positive."""
    c = dict(case, policy=True, value="verl", kl="k3", entropy=True, lm=True, isw=True)
    c["layout"] = "packed"
    x, mask, offsets, *_ = build(c)
    x = {k: None if t is None else t.detach().cpu() for k, t in x.items()}
    mask = None if mask is None else mask.cpu()
    if mask is not None:  # no garbage: the reference would see it in the padded pads
        x = {k: None if t is None else torch.where(mask, t, 0.0) for k, t in x.items()}
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    positive = torch.rand(len(case["lengths"]), generator=gen) < 0.5
    cu = offsets.cpu()
    if case["layout"] == "padded" and len(case["lengths"]) > 0:
        from vapo_kernels._ragged import pack_to_padded

        m = torch.ones(int(cu[-1]), dtype=torch.bool) if mask is None else mask
        x = {k: None if t is None else pack_to_padded(t, cu, 0) for k, t in x.items()}
        mask = pack_to_padded(m, cu, False)
        cu = None
    return x, mask, cu, positive


def call_wrapper(case, x, mask, cu, positive, backend, dtype):
    def prep(t, grad=False):
        if t is None:
            return None
        t = t.to(DEVICE, dtype).detach()
        return t.requires_grad_(grad)

    lp, v, h = prep(x["logp"], True), prep(x["values"], True), prep(x["entropy"], True)
    kw = {"mask": dev(mask), "cu_seqlens": dev(cu), "backend": backend}
    norm = case["agg"] == "seq-mean-token-sum-norm"
    agg = {"agg": case["agg"], "loss_scale_factor": 7.0 if norm else None}
    form = case["value"] if case["value"] in ("verl", "openrlhf") else "verl"
    clip = None if case["value"] in (None, "unclipped") else case["value_clip"]
    name = case["wrapper"]
    metrics = {}
    if name == "policy_loss":
        loss, metrics = vk.policy_loss(
            lp, prep(x["old_logp"]), prep(x["advantages"]), **kw, **agg,
            clip_low=case["clip_low"], clip_high=case["clip_high"], dual_clip=case["dual_clip"],
            ratio_log_clamp=case["ratio_log_clamp"],
            is_weights=prep(x["is_weights"]) if case["isw"] else None,
        )
    elif name == "value_loss":
        loss, metrics = vk.value_loss(
            v, prep(x["old_values"]), prep(x["returns"]), **kw, **agg, value_clip=clip,
            value_clip_form=form,
        )
    elif name == "kl_loss":
        loss, _ = vk.kl_loss(lp, prep(x["ref_logp"]), **kw, **agg, kl_kind=case["kl"] or "k3")
    elif name == "agg_loss":
        loss, _ = vk.agg_loss(h, **kw, **agg)
    elif name == "positive_lm_loss":
        loss, _ = vk.positive_lm_loss(lp, positive.to(DEVICE), **kw)
    else:
        vf, klc, ent, lmc = case["coefs"]
        loss, metrics = vk.vapo_loss(
            lp, prep(x["old_logp"]), prep(x["advantages"]), **kw, **agg, values=v,
            old_values=prep(x["old_values"]), returns=prep(x["returns"]),
            ref_logp=prep(x["ref_logp"]), entropy=h, positive=positive.to(DEVICE),
            clip_low=case["clip_low"], clip_high=case["clip_high"],
            dual_clip=case["dual_clip"], value_clip=clip, value_clip_form=form, vf_coef=vf,
            kl_kind=case["kl"] or "k3", kl_coef=klc, entropy_coef=ent, lm_coef=lmc,
        )
    inputs = [t for t in (lp, v, h) if t is not None]
    used = [t for t in inputs if t.requires_grad]
    grads = [None] * len(used)
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, used, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(used, grads)]
    return loss, metrics, grads


@settings(max_examples=50, deadline=None)
@given(case=wrapper_cases())
def test_public_wrappers_match_reference(case):
    x, mask, cu, positive = wrapper_inputs(case)
    dtype = case["dtype"]
    with small_blocks():
        got = call_wrapper(case, x, mask, cu, positive, "triton", dtype)
    exp = call_wrapper(case, x, mask, cu, positive, "reference", torch.float64)
    rtol = RTOL[out_dtype(dtype)] * 10
    (loss, metrics, grads), (e_loss, e_metrics, e_grads) = got, exp
    assert loss.dtype == out_dtype(dtype) and loss.device.type == DEVICE
    scale = 1 + abs(e_loss.item()) + sum(g.abs().sum().item() for g in e_grads)
    assert abs(loss.item() - e_loss.item()) <= rtol * scale, (loss.item(), e_loss.item())
    assert metrics.keys() == e_metrics.keys()
    for k, m in metrics.items():
        e = e_metrics[k].item()
        assert abs(m.item() - e) <= rtol * (1 + abs(e)) * 10, (k, m.item(), e)
    eps_in = torch.finfo(dtype).eps  # the op returns gradients in the input dtype
    for g, e in zip(grads, e_grads):
        assert g.dtype == dtype and g.shape == e.shape
        e = e.detach().cpu()
        g = g.detach().cpu().double()
        # A gradient beyond the input dtype's range (ratio e^20) is +-inf there.
        over = torch.isinf(e.to(dtype))
        assert torch.equal(g[over], e.to(dtype).double()[over])
        e, g = e[~over], g[~over]
        tol = eps_in * e.abs() + rtol * (1 + (e.abs().max().item() if e.numel() else 0))
        assert ((g - e).abs() <= tol).all()


# --------------------------------------------------------------------------------------
# GPU only: compiled kernel at the default launch plan, large shapes


def _big_case(lengths, dtype, seed=0):
    """Random full-VAPO inputs on CUDA (not gridded: tolerance covers branch flips)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    n = int(offsets[-1])

    def r():
        return torch.randn(n, generator=gen, device="cuda")

    logp = -r().abs()
    x = {
        "logp": logp, "old_logp": logp + 0.1 * r(), "advantages": r(), "values": r(),
        "old_values": r(), "returns": r(), "ref_logp": logp + 0.1 * r(), "entropy": r().abs(),
        "is_weights": torch.rand(n, generator=gen, device="cuda"),
    }
    x = {k: t.to(dtype) for k, t in x.items()}
    mask = torch.rand(n, generator=gen, device="cuda") < 0.9
    s = len(lengths)
    sw = torch.rand(s, generator=gen, device="cuda", dtype=torch.float64) / n
    lmw = torch.rand(s, generator=gen, device="cuda", dtype=torch.float64) / n
    params = loss_spec.loss_params(
        dual_clip=3.0, value_clip=0.2, kl_kind="k3", kl_coef=0.1, entropy_coef=0.01, lm_coef=0.1
    )
    return x, mask, offsets, sw.to(out_dtype(dtype)), lmw.to(out_dtype(dtype)), params


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (compiled Triton)")
@pytest.mark.parametrize(
    "lengths",
    [[1 << 20], None, [0, 1, 1025, 4097, 1023, 65537]],
    ids=["one-1M-seq", "8M-tokens", "edges"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_default_plan_matches_float64_reference(lengths, dtype):
    if lengths is None:
        gen = torch.Generator().manual_seed(1)
        lengths = torch.randint(1, 4096, (2048,), generator=gen).tolist()
        lengths.append((1 << 23) - sum(lengths))
    x, mask, offsets, sw, lmw, params = _big_case(lengths, dtype)
    got = tloss.token_loss(*(x[k] for k in ARGS), mask, offsets, sw, lmw, params, True)
    x64 = (x[k].double() for k in ARGS)
    exp = reference_kernel(*x64, mask, offsets, sw.double(), lmw.double(), params, True)
    sums, *grads = got
    # Not gridded: a token within float32 rounding of a clip bound may take the other
    # branch; the counts may differ by a handful, the sums by that much of one token.
    n_valid = int(mask.sum())
    for i in range(NUM_SUMS):
        g, e = sums[i].double().item(), exp[0][i].item()
        if i in COUNT_SUMS:
            assert abs(g - e) <= max(2, 1e-6 * n_valid), (i, g, e)
        else:
            assert abs(g - e) <= 1e-4 * (1 + abs(e)), (i, g, e)
    for g, e in zip(grads, exp[1:]):
        err = (g.double() - e).abs()
        close = err <= 1e-5 * (e.abs() + e.abs().max())
        assert int((~close).sum()) <= max(2, 1e-6 * n_valid)
    again = tloss.token_loss(*(x[k] for k in ARGS), mask, offsets, sw, lmw, params, True)
    for a, b in zip(got, again):
        assert torch.equal(a, b), "run to run"


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (compiled Triton)")
def test_gpu_indices_beyond_int32():
    """A sequence starting past 2^31 tokens: int64 indices all the way down."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs ~14 GB of GPU memory")
    first = 2**31 + 77
    n = first + 3000
    h = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    h[first:] = torch.arange(3000, device="cuda", dtype=torch.float32).to(torch.bfloat16)
    offsets = torch.tensor([0, first, n], dtype=torch.int64, device="cuda")
    sw = torch.tensor([0.5, 0.25], device="cuda")
    params = loss_spec.loss_params(entropy_coef=2.0)
    x = {k: None for k in ARGS}
    x["entropy"] = h
    sums, _, _, g_h = tloss.token_loss(*(x[k] for k in ARGS), None, offsets, sw, None, params, True)
    h_tail = torch.arange(3000, dtype=torch.float64).to(torch.bfloat16).double()
    exp = 0.5 * first + 0.25 * h_tail.sum().item()
    assert abs(sums[layout.S_ENTROPY].item() - exp) <= 1e-6 * exp
    assert sums[layout.S_TOKENS].item() == float(n)
    assert (g_h[first - 5 : first] == -1.0).all() and (g_h[first:] == -0.5).all()
