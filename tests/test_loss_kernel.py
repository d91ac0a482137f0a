"""The ``token_loss`` kernel contract under every backend the registry reports, against
the float64 spec.

The spec is ``reference_kernel`` of vapo_kernels/ops/loss_spec.py run in float64 on the
very same input values (bf16 / fp16 / fp32 inputs upcast exactly), so every difference
is the backend's own rounding; each backend's kernel is called as the registry selects
it (tests/strategies.py: ``backend_params``, ``kernel_of``), the public wrappers are
compared with backend="reference" in float64, gradients included. The comparisons run
under ``poisoned()``: outputs start as NaN, so an element a kernel forgot to write fails.

Triton runs with 8- to 32-token blocks (``triton_blocks``), so block boundaries fall
inside and across sequences; without a GPU through the interpreter, on fewer and smaller
cases (``examples``, ``interpreted``). On a GPU, ``-m gpu`` adds millions of tokens, a
1M-token sequence and indices beyond 2^31 for every CUDA backend.

Exactness against a float64 spec from float32 compute: the test data sit on a grid
(multiples of 2^-10, |x| < 64), so differences and sums of inputs are exact in float32,
and tokens whose ratio (or KL estimator) lands within 1e-5 of a bound it is compared with
are moved onto the bound's safe side (old_logp := logp, ref_logp := logp). Every discrete
decision (clip, tie, clamp gradient, clip counts) is then the same in float32 and
float64, exact ties included (logp == old_logp, A = 0, v == old_v +- eps, v == R,
log-ratio == +-C, ratio == the dual-clip constant 1), and what is left is rounding,
checked against a per-token / per-sum scale (``scales``).

Checks of one backend's own machinery (C++ thread counts and instruction sets, Triton's
block argument) are in test_cpp_kernels.py and test_triton_kernels.py.
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
from vapo_kernels import _loss_layout as layout
from vapo_kernels._loss_layout import NUM_SUMS, loss_total
from vapo_kernels.ops import loss_spec
from vapo_kernels.ops.loss_spec import reference_kernel

from strategies import (
    GARBAGE, acc_dtype, MASK_KINDS, backend_cases, backend_params, examples, interpreted, kernel_of,
    make_mask, random_lm_weights, random_sequence_weights, repeats,
)

BACKENDS = backend_params("loss")
# GPU-only checks at large shapes: the CUDA devices of BACKENDS (none without a GPU).
ON_GPU = [p for p in BACKENDS if p.values[1] == "cuda"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
KL_KINDS = [None, "k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "abs+", "k2+", "k3+"]
COUNT_SUMS = (
    layout.S_TOKENS, layout.S_CLIP_LOW, layout.S_CLIP_HIGH, layout.S_DUAL_CLIP, layout.S_VF_CLIP,
)
# Rounding allowed per unit of scale: a few ulps of the compute dtype.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# Sequence lengths across the C++ kernel's tiles (128 fp32 / 64 fp64 tokens) and vector
# tails; too long for the interpreter, which gets the edges of 16-token blocks instead.
TILE_LENGTHS = [63, 64, 65, 127, 128, 129, 300]
BLOCK_LENGTHS = [0, 1, 2, 15, 16, 17, 33, 67]
ARGS = (
    "logp", "old_logp", "advantages", "values", "old_values", "returns", "ref_logp", "entropy",
    "is_weights",
)

# The Triton interpreter evaluates lanes that a kernel then discards (a fully masked
# sequence's 0 / 0) with numpy, which warns; the outputs themselves are checked.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.usefixtures("extension_built"),  # on CI a broken C++ build fails loudly
]





def cpu(t):
    """Float64 on the CPU (exact for every input dtype)."""
    return None if t is None else t.detach().cpu().double()


@contextlib.contextmanager
def triton_blocks(backend, block):
    """Triton's launch plan with ``block`` tokens per program (the public wrappers and
    the registry's kernel take the default plan); other backends have none to change."""
    if backend != "triton" or block is None:
        yield
        return
    from vapo_kernels.triton import loss as tloss

    was = tloss.INTERPRET_BLOCK, tloss.GPU_BLOCK
    tloss.INTERPRET_BLOCK = tloss.GPU_BLOCK = block
    try:
        yield
    finally:
        tloss.INTERPRET_BLOCK, tloss.GPU_BLOCK = was


def without_loss(out, params):
    """``(sums, *grads)`` of a kernel's ``(loss, sums, *grads)``, after checking its loss:
    exactly the layout's loss_total of its own sums (one definition, in every backend)."""
    loss, sums, *grads = out
    want = loss_total(sums, params)
    assert loss.shape == () and loss.dtype == sums.dtype
    assert torch.equal(loss, want) or (loss.isnan().item() and want.isnan().item()), (loss, want)
    return (sums, *grads)


def run_kernel(backend, device, x, mask, offsets, sw, lmw, params, need_grad, block=None):
    """The backend's token_loss kernel on the contract's inputs (on ``device``):
    ``(sums, *grads)``, its loss checked by :func:`without_loss`."""
    kernel = kernel_of("token_loss", backend, device)
    with triton_blocks(backend, block):
        out = kernel(*(x[k] for k in ARGS), mask, offsets, sw, lmw, params, need_grad)
    return without_loss(out, params)


def run_reference64(x, mask, offsets, sw, lmw, params, need_grad):
    """The spec in float64 on CPU (inputs upcast exactly; weights as the kernel sees them)."""
    return without_loss(reference_kernel(
        *(cpu(x[k]) for k in ARGS), None if mask is None else mask.cpu(), offsets.cpu(),
        cpu(sw), cpu(lmw), params, need_grad,
    ), params)


# --------------------------------------------------------------------------------------
# Cases


@st.composite
def cases(draw, small=False, max_seqs=6):
    """A random ragged batch and every option of the contract. ``small``: lengths up to a
    few 16-token blocks (the interpreter), else across the C++ tiles too."""
    if small:
        length = st.one_of(st.sampled_from(BLOCK_LENGTHS), st.integers(0, 48))
    else:
        length = st.one_of(
            st.sampled_from([0, 1, 2]), st.integers(0, 40), st.sampled_from(TILE_LENGTHS),
        )
    weights = draw(st.sampled_from(["random", "uniform", "some_zero", "agg"]))
    case = {
        "lengths": draw(st.lists(length, max_size=max_seqs - 1 if small else max_seqs)),
        "layout": draw(st.sampled_from(["packed", "padded"])),
        "mask": draw(st.sampled_from([*MASK_KINDS, "all_false"])),
        "garbage": draw(st.sampled_from(GARBAGE)),
        "dtype": draw(st.sampled_from(DTYPES)),
        "policy": draw(st.booleans()),
        "isw": draw(st.booleans()),
        "value": draw(st.sampled_from([None, "unclipped", "verl", "openrlhf"])),
        "kl": draw(st.sampled_from(KL_KINDS)),
        "entropy": draw(st.booleans()),
        "lm": draw(st.booleans()),
        "clip_low": draw(st.sampled_from([0.2, 0.0, 0.1, 0.5, 1.0])),
        "clip_high": draw(st.sampled_from([0.28, 0.0, 0.2, 0.5, 3.0, 4.0])),
        # 1.0: a kernel takes any c > 0 (the wrappers need c > 1); with a ratio exactly 1
        # pg equals the dual-clip floor, and torch's min tie rule applies.
        "dual_clip": draw(st.sampled_from([None, 1.5, 3.0, 1.0])),
        "ratio_log_clamp": draw(st.sampled_from([20.0, 0.5, 3.0, 5.0])),
        "value_clip": draw(st.sampled_from([0.5, 0.0, 0.125, 0.2])),
        "coefs": draw(st.lists(st.sampled_from([1.0, 0.0, 0.3, -0.7]), min_size=4, max_size=4)),
        # "extreme": log-ratios past the ratio clamp and exactly at it, KL past its clamps
        "spread": draw(st.sampled_from(["small", "wide", "extreme"])),
        "zero_adv": draw(st.booleans()),
        "weights": weights,
        "agg": draw(st.sampled_from(loss_spec.AGG_MODES)) if weights == "agg" else None,
        "need_grad": draw(st.sampled_from([True, True, False])),
        "block": draw(st.sampled_from([16, 16, 8, 32])),  # Triton's plan; others ignore it
        "seed": draw(st.integers(0, 2**31 - 1)),
    }
    if not (case["policy"] or case["value"] or case["kl"] or case["entropy"] or case["lm"]):
        case["entropy"] = True
    return case


def fixed_case(**change):
    """Every term on, ties and clamp edges, on a small ragged batch."""
    case = {
        "lengths": [70, 0, 1, 45], "layout": "packed", "mask": "random", "garbage": math.nan,
        "dtype": torch.float32, "policy": True, "isw": True, "value": "verl", "kl": "k3",
        "entropy": True, "lm": True, "clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0,
        "ratio_log_clamp": 20.0, "value_clip": 0.5, "coefs": [0.5, 0.1, 0.01, 0.1],
        "spread": "small", "zero_adv": True, "weights": "random", "agg": None,
        "need_grad": True, "block": 16, "seed": 1,
    }
    case.update(change)
    return case


def grid(x: torch.Tensor) -> torch.Tensor:
    """Multiples of 2^-10 in (-64, 64): sums and differences stay exact in float32."""
    return (x * 1024).round().clamp(-65000, 65000) / 1024


def params_of(case) -> list[float]:
    vf, kl, ent, lm = case["coefs"]
    value = case["value"]
    dual = case["dual_clip"]
    params = list(loss_spec.loss_params(
        clip_low=case["clip_low"], clip_high=case["clip_high"],
        dual_clip=1.5 if dual == 1.0 else dual, ratio_log_clamp=case["ratio_log_clamp"],
        value_clip=None if value in (None, "unclipped") else case["value_clip"],
        value_clip_form="openrlhf" if value == "openrlhf" else "verl",
        kl_kind=case["kl"], vf_coef=vf, kl_coef=kl, entropy_coef=ent, lm_coef=lm,
    ))
    if dual == 1.0:
        params[layout.P_DUAL_CLIP] = 1.0
    return params


def near(x, b, params_dtype):
    """x lies near the bound b (as rounded by either dtype) without sitting on it."""
    bounds = [b, float(torch.tensor(b, dtype=params_dtype))]
    return sum(((x != c) & ((x - c).abs() <= 1e-5 * max(1.0, abs(c)))) for c in bounds) > 0


def separate_from_bounds(x, params, dtype):
    """old_logp := logp (ratio 1) and ref := logp (diff 0) where a ratio or a k3
    estimator is within 1e-5 of a bound it is compared with, so float32 and float64
    take the same branch. Returns new dtype tensors."""
    out = acc_dtype(dtype)
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


def build(case, device="cpu"):
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
    kind = case["mask"]
    content = torch.cat(
        [torch.zeros(k, dtype=torch.bool) if kind == "all_false" else make_mask(kind, k, gen)
         for k in seg] or [torch.zeros(0) > 0]
    )
    mask = None
    if kind != "none" or case["layout"] == "padded":
        mask = content & inside
        if kind == "none" and bool(mask.all()):
            mask = None

    params = params_of(case)
    spread = case["spread"]
    wide = spread == "wide"

    def rnd():
        return torch.randn(n, generator=gen, dtype=torch.float64)

    def tie(a, b, p=0.2):  # copy a into b on a fraction p of the tokens (exact ties)
        return torch.where(torch.rand(n, generator=gen) < p, a, b)

    logp = -rnd().abs() * (4 if wide else 1)
    old_logp = tie(logp, logp + rnd() * (12 if wide else 0.3))
    # log-ratio exactly at +-C on some tokens (the clamp passes its gradient there)
    at_clamp = logp - case["ratio_log_clamp"] * rnd().sign()
    old_logp = tie(at_clamp, old_logp, 0.1)
    ref = tie(logp, logp + rnd() * (12 if wide else 0.5))
    if spread == "extreme":
        # |logp - old| past the ratio clamp, exactly at it, and KL past and at its clamps.
        pick = torch.randint(0, 6, (n,), generator=gen)
        clamp = case["ratio_log_clamp"]
        delta = torch.tensor([25.0, -25.0, clamp, -clamp, 0.0, 30.0], dtype=torch.float64)
        old_logp = logp - delta[pick]
        ref = logp + torch.tensor([21.0, -21.0, 20.0, -20.0, 3.0, -9.0], dtype=torch.float64)[pick]
    adv = rnd()
    if case["zero_adv"]:
        adv = torch.where(torch.rand(n, generator=gen) < 0.3, 0.0, adv)
    old_values = rnd()
    values = tie(old_values, old_values + 0.4 * rnd())
    eps = case["value_clip"]
    # v exactly at old_v +- eps (an exact tie where eps is on the grid)
    values = tie(old_values + eps * torch.where(rnd() < 0, -1.0, 1.0), values)
    returns = tie(values, rnd())
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

    out = acc_dtype(dtype)
    if case["weights"] == "uniform":
        seq_weight = torch.full((num_seqs,), 1.0 / max(1, n), dtype=torch.float64)
    elif case["weights"] == "agg":
        valid = torch.ones(n, dtype=torch.bool) if mask is None else mask
        counts = torch.tensor(
            [int(valid[offsets[s] : offsets[s + 1]].sum()) for s in range(num_seqs)], dtype=torch.int64
        )
        padded = case["layout"] == "padded"
        seq_weight = loss_spec.sequence_weights(
            counts, case["agg"], horizon=max(lengths, default=0) if padded else None,
            loss_scale_factor=None if padded else 7.0,
        ).double()
    else:
        seq_weight = random_sequence_weights(num_seqs, gen, case["weights"] == "some_zero")
    lm_weight = None
    if case["lm"]:
        lm_weight = random_lm_weights(num_seqs, gen).to(out).to(device)

    def dev(t):
        return None if t is None else t.to(device)

    x = {k: dev(t) for k, t in x.items()}
    return x, dev(mask), dev(offsets), dev(seq_weight.to(out)), lm_weight, params


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
    w = torch.where(valid, cpu(sw)[seq], zero).abs()
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
        # k3 = (ratio - 1) - log_ratio cancels: its rounding scales with the operands.
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
        w_lm = torch.where(valid, cpu(lmw)[seq], zero).abs()
        s[layout.S_LM] = (w_lm * c["logp"].abs()).sum()
        g_lp += abs(params[layout.P_LM_COEF]) * w_lm
    return s, (g_lp, g_v, g_h)


def assert_sums_match(got, exp, scale, dtype, what=""):
    got = got.detach().cpu().double()
    rtol = RTOL[acc_dtype(dtype)]
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
    tol = RTOL[acc_dtype(dtype)] * (scale + exp.abs()) + 1e-300
    err = (got - exp).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} off, worst at {int(torch.where(bad, err, 0).argmax())}: "
        f"got {got[bad][0].item()!r}, expected {exp[bad][0].item()!r}"
    )


def check_against_reference(got, x, mask, offsets, sw, lmw, params, need_grad, dtype, device,
                            expected=None):
    """``got`` against the spec in float64; ``expected``: (spec outputs, scales) of these
    inputs, where a test has them already."""
    if expected is None:
        expected = (run_reference64(x, mask, offsets, sw, lmw, params, need_grad),
                    scales(x, mask, offsets, sw, lmw, params))
    exp, (s_scale, g_scales) = expected
    sums, *grads = got
    assert sums.dtype == acc_dtype(dtype) and sums.shape == (NUM_SUMS,)
    assert sums.device.type == device
    assert_sums_match(sums, exp[0], s_scale, dtype)
    names = ("grad_logp", "grad_values", "grad_entropy")
    for name, g, e, sc in zip(names, grads, exp[1:], g_scales):
        assert g.dtype == acc_dtype(dtype), name
        assert g.device.type == device, name
        if e.numel() == 0:
            assert g.shape == (0,), name
        else:
            assert_grad_match(g, e, sc, dtype, name)
            if mask is not None:
                assert (g.cpu()[~mask.cpu()] == 0).all(), f"{name} on masked tokens must be 0"


# --------------------------------------------------------------------------------------
# The kernel contract against the float64 spec


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kernel_matches_float64_spec(backend, device, poisoned):
    """Random ragged batches; then other garbage in the masked (and padded) slots: every
    output bit for bit the same."""
    small = interpreted(backend, device)

    @examples(backend, device, cpu=400, interpreted=120, reference=40)
    @given(case=cases(small=small))
    def check(case):
        x, mask, offsets, sw, lmw, params = build(case, device)
        need_grad, block = case["need_grad"], case["block"]
        with poisoned():
            got = run_kernel(backend, device, x, mask, offsets, sw, lmw, params, need_grad, block)
        args = (mask, offsets, sw, lmw, params, need_grad)
        check_against_reference(got, x, *args, case["dtype"], device)
        if mask is not None:
            other = {k: None if t is None else torch.where(mask, t, 0.0) for k, t in x.items()}
            again = run_kernel(backend, device, other, *args, block)
            for a, b in zip(got, again):
                assert a.dtype == b.dtype and torch.equal(a, b)

    check()


TIE_CASES = {
    # ratio exactly 1 = the dual-clip floor's c: torch's min tie rule (half the gradient)
    "dual clip tie": {"dual_clip": 1.0},
    # v exactly at old_v +- eps (0.5 is exact on the grid): min / max / clamp tie rules
    "value clip edge verl": {"value_clip": 0.5},
    "value clip edge openrlhf": {"value": "openrlhf", "isw": True},
    "zero value clip": {"value_clip": 0.0, "kl": "k3+"},
    # ratio exactly 1 at a clip bound: clip_low = 0 or clip_high = 0
    "ratio at clip bounds": {"clip_low": 0.0, "clip_high": 0.0, "dual_clip": None, "kl": "k1"},
    # |logp - old| past and exactly at the clamp; KL past and at its clamps
    "clamp edges": {"spread": "extreme", "ratio_log_clamp": 5.0, "kl": "k3"},
    "clamp edges straight": {"spread": "extreme", "kl": "low_var_kl", "dual_clip": 3.0},
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(TIE_CASES))
def test_exact_ties_follow_torch_rules(name, dtype, backend, device, poisoned):
    """Each tie kind on a fixed ragged batch, several seeds (one in the interpreter)."""
    for seed in range(repeats(backend, device, cpu=3, interpreted=1, reference=1)):
        case = fixed_case(dtype=dtype, seed=seed, **TIE_CASES[name])
        x, mask, offsets, sw, lmw, params = build(case, device)
        with poisoned():
            got = run_kernel(backend, device, x, mask, offsets, sw, lmw, params, True)
        check_against_reference(got, x, mask, offsets, sw, lmw, params, True, dtype, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_exact_ties_and_bounds_by_hand(backend, device):
    """Each of torch's tie / clamp-bound rules, hit exactly, in float32 against float64."""
    def t(*v):
        return torch.tensor(v, dtype=torch.float32, device=device)

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
    offsets = torch.tensor([0, 3, 8], dtype=torch.int64, device=device)
    sw = torch.tensor([0.5, 0.25], dtype=torch.float32, device=device)
    for form in ("verl", "openrlhf"):
        for kl in ("k3", "abs", "k3+"):
            params = loss_spec.loss_params(
                clip_low=0.0, clip_high=0.0, dual_clip=1.5, ratio_log_clamp=0.5, value_clip=0.5,
                value_clip_form=form, kl_kind=kl, kl_coef=0.5,
            )
            h = torch.rand(n, device=device)
            x = dict(zip(ARGS, (logp, old, adv, v, ov, ret, ref, h, None)))
            got = run_kernel(backend, device, x, None, offsets, sw, None, params, True, block=4)
            args = (None, offsets, sw, None, params, True, torch.float32, device)
            check_against_reference(got, x, *args)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_exact_values_by_hand(backend, device):
    kernel = kernel_of("token_loss", backend, device)
    _assert_by_hand(*_by_hand(kernel, device))


def _by_hand(kernel, device):
    # One token, no mask, float64: every sum and gradient written out.
    def t(v):
        return torch.tensor([v], dtype=torch.float64, device=device)

    params = list(loss_spec.loss_params(
        clip_low=0.2, clip_high=0.28, value_clip=0.5, kl_kind="k2", vf_coef=0.5, kl_coef=0.3,
        entropy_coef=0.1, lm_coef=0.2,
    ))
    return kernel(
        t(-1.0), t(-1.5), t(2.0), t(1.0), t(0.25), t(0.0), t(-1.0), t(0.7), None, None,
        torch.tensor([0, 1], device=device), t(2.0), t(4.0), params, True,
    )


def _assert_by_hand(loss, sums, g_lp, g_v, g_e):
    loss, sums, g_lp, g_v, g_e = (v.cpu() for v in (loss, sums, g_lp, g_v, g_e))
    # pg + vf_coef vf + kl_coef kl - entropy_coef H + lm_coef lm, the sums below
    want = 2.0 * -2.0 * 1.28 + 0.5 * 1.0 + 0.3 * 0.0 - 0.1 * 1.4 + 0.2 * 4.0
    assert loss.item() == pytest.approx(want, rel=1e-15)
    ratio = math.exp(0.5)  # > 1.28: clipped, pg = -A * 1.28, no gradient
    assert sums[layout.S_PG].item() == pytest.approx(2.0 * -2.0 * 1.28, rel=1e-15)
    assert sums[layout.S_CLIP_HIGH].item() == 1 and sums[layout.S_CLIP_LOW].item() == 0
    # v = 1, clip to [-0.25, 0.75] -> 0.75: max(1, 0.5625) = 1 -> unclipped wins
    assert sums[layout.S_VF].item() == pytest.approx(2.0 * 0.5, rel=1e-15)
    assert sums[layout.S_VF_CLIP].item() == 0
    assert sums[layout.S_KL].item() == 0 and sums[layout.S_ENTROPY].item() == pytest.approx(1.4)
    assert sums[layout.S_LM].item() == pytest.approx(4.0)  # -(4 * -1)
    assert sums[layout.S_RATIO_MIN].item() == pytest.approx(ratio)
    assert sums[layout.S_RATIO_MAX].item() == pytest.approx(ratio)
    assert g_lp.item() == pytest.approx(0.0 + 0.3 * 2.0 * 0.0 - 0.2 * 4.0)
    assert g_v.item() == pytest.approx(0.5 * 2.0 * 1.0)
    assert g_e.item() == pytest.approx(-0.1 * 2.0)


# --------------------------------------------------------------------------------------
# Sequences and blocks, empty and fully masked batches, absent terms


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_runs_of_short_sequences_and_long_ones(backend, device):
    """Long sequences crossing many blocks, runs of empty and length-1 sequences inside
    one block (Triton's per-token binary search takes several steps), trailing empties;
    Triton with 4- to 128-token blocks."""
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
    x = {k: None if t is None else t.to(device) for k, t in x.items()}
    mask = (torch.rand(n, generator=gen) < 0.8).to(device)
    offsets, sw, lmw = offsets.to(device), sw.to(device), lmw.to(device)
    for block in (4, 8, 32, 128) if backend == "triton" else (None,):
        got = run_kernel(backend, device, x, mask, offsets, sw, lmw, params, True, block)
        check_against_reference(got, x, mask, offsets, sw, lmw, params, True, torch.float64, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", [[], [0, 0, 0], [5, 0, 2]], ids=str)
def test_empty_and_all_masked(lengths, dtype, backend, device, poisoned):
    """No token, or none valid (NaN in every slot): zero sums, +-inf ratio bounds, zero
    gradients; without need_grad, and for absent inputs, empty (0,) gradients."""
    n = sum(lengths)
    od = acc_dtype(dtype)
    x = torch.full((n,), math.nan, device=device).to(dtype)
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    offsets = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()],
                           dtype=torch.int64, device=device)
    seq_w = torch.ones(len(lengths), dtype=od, device=device)
    params = list(loss_spec.loss_params(
        dual_clip=2.0, value_clip=0.2, kl_kind="k3", kl_coef=1.0, entropy_coef=0.1, lm_coef=0.1
    ))
    kernel = kernel_of("token_loss", backend, device)
    with poisoned():
        sums, *grads = without_loss(
            kernel(x, x, x, x, x, x, x, x, x, mask, offsets, seq_w, seq_w, params, True), params
        )
    want = torch.zeros(NUM_SUMS, dtype=od)
    want[layout.S_RATIO_MIN], want[layout.S_RATIO_MAX] = math.inf, -math.inf
    assert sums.dtype == od and torch.equal(sums.cpu(), want)
    for g in grads:
        assert g.dtype == od and torch.equal(g.cpu(), torch.zeros(n, dtype=od))
    # need_grad=False and absent inputs: empty (0,) gradients
    v = torch.randn(n).to(dtype).to(device)
    sums2, *grads = without_loss(kernel(
        None, None, None, v, None, v, None, None, None, None, offsets, seq_w, None,
        loss_spec.loss_params(), False,
    ), loss_spec.loss_params())
    assert all(g.shape == (0,) and g.dtype == od for g in grads)
    assert sums2[layout.S_TOKENS].item() == n


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_absent_terms_give_empty_gradients(backend, device):
    """Only the value term: the logp and entropy gradients are empty (0,) tensors, the
    value gradient is there; without need_grad all three are empty and the sums the same."""
    x = {k: None for k in ARGS}
    x["values"] = torch.randn(10, dtype=torch.float64).to(device)
    x["returns"] = torch.randn(10, dtype=torch.float64).to(device)
    offs = torch.tensor([0, 10], device=device)
    sw = torch.ones(1, dtype=torch.float64, device=device)
    params = loss_spec.loss_params(value_clip=None)
    sums, g_lp, g_v, g_h = run_kernel(backend, device, x, None, offs, sw, None, params, True)
    assert sums.dtype == torch.float64
    assert g_lp.shape == g_h.shape == (0,) and g_v.shape == (10,)
    assert g_lp.dtype == g_h.dtype == torch.float64
    sums2, *grads = run_kernel(backend, device, x, None, offs, sw, None, params, False)
    assert all(g.shape == (0,) and g.dtype == torch.float64 for g in grads)
    assert torch.equal(sums, sums2)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device):
    """The same inputs twice: the same bits (partial sums reduced in a fixed order)."""
    gen = torch.Generator().manual_seed(0)
    n = 300
    x = {k: None for k in ARGS}
    for k in ("logp", "old_logp", "advantages", "entropy"):
        x[k] = torch.randn(n, generator=gen).to(device)
    offs = torch.tensor([0, 7, 150, 300], device=device)
    sw = torch.rand(3, generator=gen).to(device)
    params = loss_spec.loss_params(entropy_coef=0.01)
    a = run_kernel(backend, device, x, None, offs, sw, None, params, True, block=32)
    b = run_kernel(backend, device, x, None, offs, sw, None, params, True, block=32)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# --------------------------------------------------------------------------------------
# Large batches: several C++ chunks (8192 tokens), a 1M-token sequence, 2M sequences.
# Triton takes 4096-token blocks there in the interpreter (a few hundred programs).

BIG_BLOCK = 4096


@functools.lru_cache(maxsize=1)
def big_case():
    """Several kernel chunks, long and empty sequences, every term on; values on the grid,
    so the float32 and float64 runs (and every backend) share the float64 spec's outputs."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 2000, (40,), generator=gen)
    lengths[::7] = 0
    lengths[3] = 20000
    case = fixed_case(lengths=lengths.tolist(), dtype=torch.float32, spread="wide", seed=3,
                      weights="agg", agg="seq-mean-token-mean", value_clip=0.25)
    inputs = on("cpu", torch.float64, build(case))  # float32 values, exact in float64
    x, mask, offsets, sw, lmw, params = inputs
    return inputs, (run_reference64(*inputs, True), scales(x, mask, offsets, sw, lmw, params))


def on(device, dtype, inputs):
    """Contract inputs moved to ``device``, floating ones cast to ``dtype`` (exact here)."""
    def cast(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(device, dtype) if t.is_floating_point() else t.to(device)

    x, *rest = inputs
    return ({k: cast(t) for k, t in x.items()}, *(cast(t) for t in rest))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_several_chunks_match_float64_spec(dtype, backend, device, poisoned):
    inputs, expected = big_case()
    x, mask, offsets, sw, lmw, params = on(device, dtype, inputs)
    with poisoned():
        got = run_kernel(backend, device, x, mask, offsets, sw, lmw, params, True, BIG_BLOCK)
    check_against_reference(got, x, mask, offsets, sw, lmw, params, True, dtype, device, expected)


@functools.lru_cache(maxsize=2)
def long_sequence_case(n):
    """One n-token sequence between 150k empty ones, then a few short ones; the policy
    and entropy terms on the grid."""
    gen = torch.Generator().manual_seed(11)
    lengths = [0] * 100_000 + [n - 10] + [0] * 50_000 + [3, 0, 7]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    logp = grid(-torch.rand(n, generator=gen, dtype=torch.float64))
    x = {k: None for k in ARGS}
    x.update(
        logp=logp, old_logp=grid(logp + torch.randn(n, generator=gen, dtype=torch.float64) * 0.2),
        advantages=grid(torch.randn(n, generator=gen, dtype=torch.float64)),
        entropy=grid(torch.rand(n, generator=gen, dtype=torch.float64)),
    )
    mask = torch.rand(n, generator=gen) < 0.9
    seq_w = grid(torch.rand(len(lengths), generator=gen, dtype=torch.float64))
    params = list(loss_spec.loss_params(dual_clip=3.0, entropy_coef=0.01))
    x = separate_from_bounds(x, params, torch.float32)
    inputs = (x, mask, offsets, seq_w, None, params)
    return inputs, (run_reference64(*inputs, True), scales(x, mask, offsets, seq_w, None, params))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_long_sequence_among_many_empty_ones(dtype, backend, device, poisoned):
    """A 1M-token sequence (16k in the interpreter; a GPU runs 1M in the -m gpu tests)
    between 150k empty sequences."""
    inputs, expected = long_sequence_case(1 << 14 if interpreted(backend, device) else 1 << 20)
    x, mask, offsets, sw, lmw, params = on(device, dtype, inputs)
    with poisoned():
        got = run_kernel(backend, device, x, mask, offsets, sw, lmw, params, True, BIG_BLOCK)
    check_against_reference(got, x, mask, offsets, sw, lmw, params, True, dtype, device, expected)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_many_empty_sequences_are_cheap(backend, device):
    """2M sequences, most empty (200k in the interpreter): a kernel walks each once (the
    C++ chunks binary-search their first one), so this is milliseconds, not a scan per
    chunk."""
    gen = torch.Generator().manual_seed(5)
    s = 200_000 if interpreted(backend, device) else 2_000_000
    lengths = torch.zeros(s, dtype=torch.int64)
    idx = torch.randint(0, s, (s // 100,), generator=gen)
    lengths[idx] = torch.randint(1, 30, (s // 100,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(offsets[-1])
    ent = torch.rand(n, generator=gen, dtype=torch.float64)
    seq_w = torch.rand(s, generator=gen, dtype=torch.float64)
    params = list(loss_spec.loss_params(entropy_coef=1.0))
    x = {k: None for k in ARGS}
    x["entropy"] = ent.to(device)
    got = run_kernel(backend, device, x, None, offsets.to(device), seq_w.to(device), None, params,
                     True, BIG_BLOCK)
    seq_ids = torch.repeat_interleave(torch.arange(s), lengths)
    torch.testing.assert_close(
        got[0][layout.S_ENTROPY].cpu(), (seq_w[seq_ids] * ent).sum(), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(got[3].cpu(), -seq_w[seq_ids], rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# The op's NaN screen: it checks the loss only, so every input's NaN must reach it


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_in_a_valid_slot_reaches_the_loss(backend, device):
    names = ["logp", "old_logp", "advantages", "values", "old_values", "returns", "ref_logp",
             "entropy", "is_weights"]
    n = 20
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(i)
        x = [torch.randn(n, generator=gen) for _ in range(9)]
        x[8] = x[8].abs()
        x[i][5] = math.nan
        x = [t.to(device) for t in x]
        with pytest.raises(ValueError, match=f"{name} contains NaN"):
            vk.vapo_loss(
                x[0], x[1], x[2], None, torch.tensor([0, 9, 20], dtype=torch.int32, device=device),
                values=x[3], old_values=x[4], returns=x[5], ref_logp=x[6], entropy=x[7],
                is_weights=x[8], kl_coef=0.0, backend=backend,
            )


# --------------------------------------------------------------------------------------
# Direct callers of a kernel get errors, not out-of-bounds reads. The spec (reference)
# checks nothing: the op checks its inputs before any kernel runs. Each entry: the change
# to good arguments, and the message each backend's own checks raise (the C++ binding a
# RuntimeError, Triton a ValueError).


def _good_args(device, **change):
    x = torch.randn(6, device=device)
    args = {
        "logp": x, "old_logp": x, "advantages": x, "values": None, "old_values": None,
        "returns": None, "ref_logp": None, "entropy": None, "is_weights": None, "mask": None,
        "offsets": torch.tensor([0, 2, 6], device=device),
        "seq_weight": torch.ones(2, device=device), "lm_weight": None,
        "params": loss_spec.loss_params(), "need_grad": True,
    }
    args.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    return tuple(args.values())


ERRORS = {"cpp": RuntimeError, "triton": ValueError}
_P = loss_spec.loss_params()
_KL_7 = [*_P[: layout.P_KL_KIND], 7.0, *_P[layout.P_KL_KIND + 1 :]]


def _both(cpp, triton=None):
    """The messages of the C++ binding and of Triton (the same where only one is given)."""
    return {"cpp": cpp, "triton": cpp if triton is None else triton}


BAD_CALLS = {
    "no input": (
        {"logp": None, "old_logp": None, "advantages": None},
        _both("at least one of logp, values or entropy"),
    ),
    "integer logp": ({"logp": torch.ones(6, dtype=torch.long)}, {"cpp": "logp must be float16"}),
    "2-D logp, 1-D rest": ({"logp": torch.randn(2, 3)}, {"cpp": "old_logp has shape \\[6\\] but logp"}),
    "strided logp": ({"logp": torch.randn(12)[::2]}, {"cpp": "logp must be contiguous"}),
    "mixed dtypes": ({"old_logp": torch.randn(6, dtype=torch.float64)}, {"cpp": "old_logp has dtype"}),
    "short advantages": ({"advantages": torch.randn(5)}, {"cpp": "advantages has shape \\[5\\]"}),
    "policy without old_logp": (
        {"old_logp": None},
        _both("policy term .* needs logp and old_logp", "policy term needs logp, old_logp"),
    ),
    "value without values": ({"returns": torch.randn(6)}, _both("value term", "value term needs values")),
    "value clip without old_values": (
        {"values": torch.randn(6), "returns": torch.randn(6),
         "params": loss_spec.loss_params(value_clip=0.2)},
        _both("old_values unless", "clipped value term needs old_values"),
    ),
    "kl without logp": (
        {"logp": None, "old_logp": None, "advantages": None, "entropy": torch.randn(6),
         "ref_logp": torch.randn(6), "params": loss_spec.loss_params(kl_kind="k1")},
        _both("KL term .* needs logp", "KL term needs logp"),
    ),
    "bad kl kind": ({"ref_logp": torch.randn(6), "params": _KL_7}, _both("P_KL_KIND")),
    "lm without logp": (
        {"logp": None, "old_logp": None, "advantages": None, "entropy": torch.randn(6),
         "lm_weight": torch.ones(2)},
        _both("LM term .* needs logp", "LM term needs logp"),
    ),
    "float mask": ({"mask": torch.ones(6)}, {"cpp": "mask must be a contiguous bool"}),
    "short mask": ({"mask": torch.ones(5, dtype=torch.bool)}, {"cpp": "mask must be a contiguous bool"}),
    "int32 offsets": (
        {"offsets": torch.tensor([0, 2, 6], dtype=torch.int32)},
        {"cpp": "offsets must be a contiguous int64"},
    ),
    "offsets past N": (
        {"offsets": torch.tensor([0, 2, 7])}, {"cpp": "offsets must start at 0 and end at N"},
    ),
    "offsets not from 0": (
        {"offsets": torch.tensor([1, 2, 6])}, {"cpp": "offsets must start at 0 and end at N"},
    ),
    "decreasing offsets": (
        {"offsets": torch.tensor([0, 4, 2, 6]), "seq_weight": torch.ones(3)},
        {"cpp": "non-decreasing"},
    ),
    "seq_weight length": (
        {"seq_weight": torch.ones(3)}, {"cpp": "seq_weight must be a contiguous \\(S,\\)"},
    ),
    "seq_weight dtype": ({"seq_weight": torch.ones(2, dtype=torch.float64)}, {"cpp": "seq_weight must be"}),
    "lm_weight length": ({"lm_weight": torch.ones(1)}, {"cpp": "lm_weight must be"}),
    "params length": ({"params": [0.2, 0.28]}, {"cpp": f"params must hold {layout.NUM_PARAMS} floats"}),
}
EXPECTED_ERRORS = {name: messages for name, (_, messages) in BAD_CALLS.items()}


@pytest.mark.parametrize("backend,device,name", backend_cases("loss", EXPECTED_ERRORS))
def test_bad_arguments_raise(backend, device, name):
    change, messages = BAD_CALLS[name]
    kernel = kernel_of("token_loss", backend, device)
    with pytest.raises(ERRORS[backend], match=messages[backend]):
        kernel(*_good_args(device, **change))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_good_arguments_pass(backend, device):
    kernel_of("token_loss", backend, device)(*_good_args(device))


# --------------------------------------------------------------------------------------
# The public wrappers: backend=... against backend="reference" in float64


WRAPPERS = ["policy_loss", "value_loss", "vapo_loss", "kl_loss", "agg_loss", "positive_lm_loss"]


@st.composite
def wrapper_cases(draw, small):
    case = draw(cases(small=small, max_seqs=5))
    case["wrapper"] = draw(st.sampled_from(WRAPPERS))
    case["agg"] = draw(st.sampled_from(loss_spec.AGG_MODES))
    case["spread"] = "small"  # moderate magnitudes: the kernel test has the extremes
    if case["dual_clip"] == 1.0:  # the wrappers need c > 1
        case["dual_clip"] = 3.0
    return case


def wrapper_inputs(case):
    """Token tensors (layout of the case, no garbage), mask, cu_seqlens, positive."""
    c = dict(case, policy=True, value="verl", kl="k3", entropy=True, lm=True, isw=True)
    c["layout"] = "packed"
    x, mask, offsets, *_ = build(c)
    if mask is not None:  # no garbage: the reference would see it in the padded pads
        x = {k: None if t is None else torch.where(mask, t, 0.0) for k, t in x.items()}
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    positive = torch.rand(len(case["lengths"]), generator=gen) < 0.5
    cu = offsets
    if case["layout"] == "padded" and len(case["lengths"]) > 0:
        from vapo_kernels._ragged import pack_to_padded

        m = torch.ones(int(cu[-1]), dtype=torch.bool) if mask is None else mask
        x = {k: None if t is None else pack_to_padded(t, cu, 0) for k, t in x.items()}
        mask = pack_to_padded(m, cu, False)
        cu = None
    return x, mask, cu, positive


def call_wrapper(case, x, mask, cu, positive, backend, device, dtype):
    def dev(t):
        return None if t is None else t.to(device)

    def prep(t, grad=False):
        if t is None:
            return None
        return t.to(device, dtype).detach().requires_grad_(grad)

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
        loss, _ = vk.positive_lm_loss(lp, positive.to(device), **kw)
    else:
        vf, klc, ent, lmc = case["coefs"]
        loss, metrics = vk.vapo_loss(
            lp, prep(x["old_logp"]), prep(x["advantages"]), **kw, **agg, values=v,
            old_values=prep(x["old_values"]), returns=prep(x["returns"]),
            ref_logp=prep(x["ref_logp"]), entropy=h, positive=positive.to(device),
            is_weights=prep(x["is_weights"]) if case["isw"] else None,
            clip_low=case["clip_low"], clip_high=case["clip_high"],
            dual_clip=case["dual_clip"], ratio_log_clamp=case["ratio_log_clamp"],
            value_clip=clip, value_clip_form=form, vf_coef=vf,
            kl_kind=case["kl"] or "k3", kl_coef=klc, entropy_coef=ent, lm_coef=lmc,
        )
    inputs = [t for t in (lp, v, h) if t is not None]
    used = [t for t in inputs if t.requires_grad]
    grads = [None] * len(used)
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, used, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(used, grads)]
    return loss, metrics, grads


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_public_wrappers_match_reference(backend, device, poisoned):
    small = interpreted(backend, device)

    @examples(backend, device, cpu=100, interpreted=25, reference=20)
    @given(case=wrapper_cases(small))
    def check(case):
        x, mask, cu, positive = wrapper_inputs(case)
        dtype = case["dtype"]
        with poisoned(), triton_blocks(backend, 16):
            got = call_wrapper(case, x, mask, cu, positive, backend, device, dtype)
        exp = call_wrapper(case, x, mask, cu, positive, "reference", "cpu", torch.float64)
        rtol = RTOL[acc_dtype(dtype)] * 10
        (loss, metrics, grads), (e_loss, e_metrics, e_grads) = got, exp
        assert loss.dtype == acc_dtype(dtype) and loss.device.type == device
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

    check()


# --------------------------------------------------------------------------------------
# GPU only: every CUDA backend's compiled kernel at the default launch plan, large shapes


def _big_gpu_case(lengths, dtype, seed=0):
    """Random full-VAPO inputs on CUDA (not gridded: the tolerance covers branch flips)."""
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
    return x, mask, offsets, sw.to(acc_dtype(dtype)), lmw.to(acc_dtype(dtype)), params


@pytest.mark.gpu
@pytest.mark.parametrize("backend,device", ON_GPU)
@pytest.mark.parametrize(
    "lengths",
    [[1 << 20], None, [0, 1, 1025, 4097, 1023, 65537]],
    ids=["one-1M-seq", "8M-tokens", "edges"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_default_plan_matches_float64_reference(lengths, dtype, backend, device):
    if lengths is None:
        gen = torch.Generator().manual_seed(1)
        lengths = torch.randint(1, 4096, (2048,), generator=gen).tolist()
        lengths.append((1 << 23) - sum(lengths))
    x, mask, offsets, sw, lmw, params = _big_gpu_case(lengths, dtype)
    got = run_kernel(backend, device, x, mask, offsets, sw, lmw, params, True)
    x64 = (x[k].double() for k in ARGS)
    exp = without_loss(reference_kernel(*x64, mask, offsets, sw.double(), lmw.double(), params, True), params)
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
    again = run_kernel(backend, device, x, mask, offsets, sw, lmw, params, True)
    for a, b in zip(got, again):
        assert torch.equal(a, b), "run to run"


@pytest.mark.gpu
@pytest.mark.parametrize("backend,device", ON_GPU)
def test_gpu_indices_beyond_int32(backend, device):
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
    sums, _, _, g_h = run_kernel(backend, device, x, None, offsets, sw, None, params, True)
    h_tail = torch.arange(3000, dtype=torch.float64).to(torch.bfloat16).double()
    exp = 0.5 * first + 0.25 * h_tail.sum().item()
    assert abs(sums[layout.S_ENTROPY].item() - exp) <= 1e-6 * exp
    assert sums[layout.S_TOKENS].item() == float(n)
    assert (g_h[first - 5 : first] == -1.0).all() and (g_h[first:] == -0.5).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_any_shape_is_the_flat_call(backend, device):
    """The kernels take token tensors of any shape (the tokens in memory order, as the
    offsets count them) and return the gradients in that shape: a padded (B, T) call is
    the (B*T,) call, bit for bit, reshaped - so the op passes its users' tensors as they
    are, with no view per input and output."""
    gen = torch.Generator().manual_seed(11)
    b, t = 3, 7
    x = {k: torch.randn(b, t, generator=gen) for k in ARGS[:8]}
    x["logp"], x["old_logp"], x["ref_logp"] = (-x[k].abs() for k in ("logp", "old_logp", "ref_logp"))
    x["is_weights"] = None
    mask = torch.rand(b, t, generator=gen) < 0.7
    offsets = torch.arange(b + 1) * t
    sw, lmw = torch.rand(b, generator=gen), torch.rand(b, generator=gen)
    params = loss_spec.loss_params(value_clip=0.2, kl_kind="k3", kl_coef=0.1, entropy_coef=0.01,
                                   lm_coef=0.1)
    on = [v.to(device) for v in (mask, offsets, sw, lmw)]
    x2 = {k: None if v is None else v.to(device) for k, v in x.items()}
    x1 = {k: None if v is None else v.reshape(-1) for k, v in x2.items()}
    sums2, *grads2 = run_kernel(backend, device, x2, *on, params, True)
    sums1, *grads1 = run_kernel(backend, device, x1, on[0].reshape(-1), *on[1:], params, True)
    assert torch.equal(sums2, sums1)
    for g2, g1 in zip(grads2, grads1):
        assert g2.shape == (b, t) and torch.equal(g2.reshape(-1), g1)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("masked", ["mask", "no mask", "all masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_no_seq_weight_is_the_token_mean(dtype, masked, backend, device):
    """``seq_weight=None`` is the token mean: every sequence weighs 1 / (valid tokens), in
    float64 rounded once - bit for bit the call with those weights passed, with or
    without a mask, and with no valid token at all."""
    gen = torch.Generator().manual_seed(7)
    lengths = [0, 5, 1, 17, 3]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    n, s = int(offsets[-1]), len(lengths)
    x = {k: None for k in ARGS}
    for k in ("logp", "old_logp", "values", "old_values", "returns", "entropy"):
        x[k] = -torch.rand(n, generator=gen, dtype=torch.float64).to(dtype)
    x["advantages"] = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    mask = {"mask": torch.rand(n, generator=gen) < 0.6, "no mask": None,
            "all masked": torch.zeros(n, dtype=torch.bool)}[masked]
    valid = n if mask is None else int(mask.sum())
    od = acc_dtype(dtype)
    weights = torch.full((s,), 1.0 / max(1, valid), dtype=torch.float64).to(od)
    params = loss_spec.loss_params(value_clip=0.2, entropy_coef=0.1)
    x = {k: None if t is None else t.to(device) for k, t in x.items()}
    mask = None if mask is None else mask.to(device)
    offsets = offsets.to(device)
    want = run_kernel(backend, device, x, mask, offsets, weights.to(device), None, params, True)
    got = run_kernel(backend, device, x, mask, offsets, None, None, params, True)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
