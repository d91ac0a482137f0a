"""C++ CPU kernel of the fused PPO / VAPO token loss (csrc/cpu/loss.cpp) against the spec.

The spec is ``reference_kernel`` of vapo_kernels/ops/loss_spec.py run in float64 on the very
same input values (bf16 / fp16 / fp32 inputs upcast exactly), so every difference is the
kernel's own rounding; the public wrappers are compared backend="cpp" against
backend="reference" on identical inputs, gradients included. The comparisons run under
``poisoned()``: outputs start as NaN, so an element the kernel forgot to write fails them.

Inputs are nudged away from the few places where the loss is discontinuous (a ratio a
rounding error away from a clip bound, a value at the edge of its clip range, ...): there
an fp32 kernel may legitimately take the other branch than the float64 spec. Exact ties
(ratio exactly 1 with clip_low = 0, v exactly at old_v + eps, |logp - old| exactly at the
clamp) are kept: they are computed exactly in every precision and must match.
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
from vapo_kernels._ragged import pack_to_padded
import vapo_kernels as vk
from vapo_kernels import _loss_layout as layout
from vapo_kernels.ops import loss_spec

# Slot -> name ("PG", ...), from the layout so that every slot, new ones included, is named.
SUM_NAMES = {v: k[2:] for k, v in layout.constants().items() if k.startswith("S_")}
COUNTS = [layout.S_TOKENS, layout.S_CLIP_LOW, layout.S_CLIP_HIGH, layout.S_DUAL_CLIP, layout.S_VF_CLIP]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def _extension_must_build():
    err = _backends.extension_error()
    assert err is None, err


def ext():
    return _backends.extension()


def out_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# Random ragged cases


@st.composite
def cases(draw, max_seqs=6, max_len=40):
    lengths = draw(
        st.lists(
            st.one_of(
                st.sampled_from([0, 1, 2]),
                st.integers(0, max_len),
                # across the kernel's tiles (128 fp32 / 64 fp64 tokens) and vector tails
                st.sampled_from([63, 64, 65, 127, 128, 129, 300]),
            ),
            min_size=0,
            max_size=max_seqs,
        )
    )
    policy = draw(st.booleans())
    value = draw(st.booleans())
    kl = draw(st.sampled_from([None, "k1", "abs", "k2", "k3", "k1+", "abs+", "k3+", "low_var_kl"]))
    entropy = draw(st.booleans())
    lm = draw(st.booleans())
    if not (policy or value or entropy or kl or lm):
        policy = True
    return {
        "lengths": lengths,
        "packed": draw(st.booleans()),
        "mask_kind": draw(
            st.sampled_from(["none", "random", "turns", "all_masked", "masked_rows"])
        ),
        "dtype": draw(st.sampled_from(FLOAT_DTYPES)),
        "pattern": draw(st.sampled_from(["randn", "extreme", "ties", "wide"])),
        "policy": policy,
        "value": value,
        "kl": kl,
        "entropy": entropy,
        "lm": lm,
        "is_weights": draw(st.booleans()),
        "clip_low": draw(st.sampled_from([0.2, 0.0, 0.1, 0.5, 1.0])),
        "clip_high": draw(st.sampled_from([0.28, 0.0, 0.2, 3.0])),
        # 1.0 (the kernel takes any c > 0; the wrappers need c > 1): with ratio exactly 1
        # (pattern "ties") pg equals the dual-clip floor, torch's min tie rule applies.
        "dual_clip": draw(st.sampled_from([None, 3.0, 1.5, 1.0])),
        "ratio_log_clamp": draw(st.sampled_from([20.0, 0.5, 5.0])),
        "value_clip": draw(st.sampled_from([None, 0.5, 0.2, 0.0])),
        "value_clip_form": draw(st.sampled_from(["verl", "openrlhf"])),
        "agg": draw(st.sampled_from(loss_spec.AGG_MODES)),
        "coefs": draw(
            st.sampled_from([(1.0, 0.1, 0.01, 0.1), (0.5, 1.0, -0.3, 1.0), (0.0, 0.0, 0.0, 0.0)])
        ),
        "need_grad": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def make_mask(kind, lengths, gen):
    parts = []
    for length in lengths:
        if kind == "none":
            m = torch.ones(length, dtype=torch.bool)
        elif kind == "all_masked":
            m = torch.zeros(length, dtype=torch.bool)
        elif kind == "masked_rows":
            m = (
                torch.zeros(length, dtype=torch.bool)
                if bool(torch.rand(1, generator=gen) < 0.5)
                else (torch.rand(length, generator=gen) < 0.7)
            )
        elif kind == "random":
            m = torch.rand(length, generator=gen) < 0.7
        else:  # "turns": alternating valid (model) and masked (tool output) spans
            m = torch.zeros(length, dtype=torch.bool)
            t, valid = 0, True
            while t < length:
                span = int(torch.randint(1, 8, (1,), generator=gen))
                m[t : t + span] = valid
                t, valid = t + span, not valid
        parts.append(m)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def _grid(x):
    """Values on a 1/8 grid, |x| < 32: exact in every dtype, so ties stay ties."""
    return (x * 8).round().clamp(-255, 255) / 8


def raw_inputs(case, gen):
    """Token tensors in float64 (already rounded through the case's dtype)."""
    n = sum(case["lengths"])
    pattern = case["pattern"]

    def randn(scale=1.0):
        return torch.randn(n, generator=gen, dtype=torch.float64) * scale

    logp = -randn().abs() * (3.0 if pattern == "wide" else 1.0)
    old = logp + randn(0.3 if pattern != "wide" else 2.0)
    adv = randn(1.0 if pattern != "wide" else 10.0)
    values, old_values, returns = randn(), randn(), randn()
    ref = logp + randn(0.5 if pattern != "wide" else 4.0)
    ent = randn().abs()
    isw = torch.rand(n, generator=gen, dtype=torch.float64) * 2
    if pattern == "extreme" and n:
        # |logp - old| past the ratio clamp, exactly at it, and KL past its clamps.
        pick = torch.randint(0, 6, (n,), generator=gen)
        clamp = case["ratio_log_clamp"]
        delta = torch.tensor([25.0, -25.0, clamp, -clamp, 0.0, 30.0], dtype=torch.float64)[pick]
        logp = _grid(-randn().abs())
        old = logp - delta
        ref = logp + torch.tensor([21.0, -21.0, 20.0, -20.0, 3.0, -9.0], dtype=torch.float64)[pick]
    if pattern == "ties" and n:
        logp, old, adv = _grid(logp), _grid(old), _grid(adv)
        values, old_values, returns = _grid(values), _grid(old_values), _grid(returns)
        ref, ent, isw = _grid(ref), _grid(ent), _grid(isw)
        pick = torch.rand(n, generator=gen)
        old = torch.where(pick < 0.3, logp, old)  # ratio exactly 1
        adv = torch.where((pick > 0.2) & (pick < 0.4), torch.zeros_like(adv), adv)  # A = 0
        eps = case["value_clip"] or 0.0
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, -1.0).double()
        values = torch.where(pick > 0.6, old_values + sign * eps, values)  # at the clip edge
        returns = torch.where(pick > 0.85, values, returns)  # v = R
        ref = torch.where(pick < 0.1, logp, ref)  # KL diff 0
    dt = case["dtype"]
    return [t.to(dt).double() for t in (logp, old, adv, values, old_values, returns, ref, ent, isw)]


def nudge(case, t):
    """Moves tokens off the discontinuities an fp32 kernel could resolve differently."""
    logp, old, adv, values, old_values, returns, ref, ent, isw = t
    if case["dtype"] == torch.float64 or logp.numel() == 0:
        return t
    tol = 1e-4

    def near(a, b):
        return ((a - b).abs() <= tol * (1 + b.abs())) & (a != b)

    clamp = case["ratio_log_clamp"]
    raw = logp - old
    ratio = torch.exp(raw.clamp(-clamp, clamp))
    bad = near(ratio, torch.full_like(ratio, 1 - case["clip_low"]))
    bad |= near(ratio, torch.full_like(ratio, 1 + case["clip_high"]))
    if case["dual_clip"]:
        bad |= near(ratio, torch.full_like(ratio, case["dual_clip"]))
    bad |= near(raw.abs(), torch.full_like(raw, clamp))
    old = torch.where(bad, logp, old)
    # KL k3: -diff at the +-20 clamp, the value at its +-10 clamp.
    diff = logp - ref
    lr = (-diff).clamp(-20, 20)
    k3 = torch.exp(lr) - lr - 1
    bad = near(diff.abs(), torch.full_like(diff, 20.0)) | near(k3, torch.full_like(k3, 10.0))
    ref = torch.where(bad, logp, ref)
    eps = case["value_clip"]
    if eps is not None:
        bad = near(values, old_values + eps) | near(values, old_values - eps)
        values = torch.where(bad, old_values, values)
        v_clip = torch.minimum(torch.maximum(values, old_values - eps), old_values + eps)
        a, b = (values - returns).square(), (v_clip - returns).square()
        bad = near(a, b)
        returns = torch.where(bad, values, returns)
    return [logp, old, adv, values, old_values, returns, ref, ent, isw]


def build(case):
    """(kernel args in the case's dtype, the same in float64, layout info)."""
    gen = torch.Generator().manual_seed(case["seed"])
    lengths = case["lengths"]
    dt, od = case["dtype"], out_dtype(case["dtype"])
    t = nudge(case, raw_inputs(case, gen))
    mask = make_mask(case["mask_kind"], lengths, gen)
    offsets = torch.tensor(
        [0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64
    )
    counts = torch.tensor(
        [int(mask[offsets[s] : offsets[s + 1]].sum()) for s in range(len(lengths))],
        dtype=torch.int64,
    )
    horizon = max(lengths, default=0)
    seq_w = loss_spec.sequence_weights(
        counts,
        case["agg"],
        horizon=horizon if not case["packed"] else None,
        loss_scale_factor=7.0 if case["packed"] else None,
    ).to(od)
    lm_w = None
    if case["lm"]:
        lm_w = (torch.rand(len(lengths), generator=gen) < 0.5).to(od) * torch.rand(
            len(lengths), generator=gen
        ).to(od)
    params = list(loss_spec.loss_params(
        clip_low=case["clip_low"],
        clip_high=case["clip_high"],
        dual_clip=case["dual_clip"] if case["dual_clip"] != 1.0 else 1.5,
        ratio_log_clamp=case["ratio_log_clamp"],
        value_clip=case["value_clip"] if case["value"] else None,
        value_clip_form=case["value_clip_form"],
        kl_kind=case["kl"],
        vf_coef=case["coefs"][0],
        kl_coef=case["coefs"][1],
        entropy_coef=case["coefs"][2],
        lm_coef=case["coefs"][3],
    ))
    if case["dual_clip"] == 1.0:
        params[layout.P_DUAL_CLIP] = 1.0
    logp, old, adv, values, old_values, returns, ref, ent, isw = t
    use_logp = (
        case["policy"]
        or case["kl"] is not None
        or case["lm"]
        or not (case["value"] or case["entropy"])
    )
    tokens = [
        logp if use_logp else None,
        old if case["policy"] else None,
        adv if case["policy"] else None,
        values if case["value"] else None,
        old_values if case["value"] and case["value_clip"] is not None else None,
        returns if case["value"] else None,
        ref if case["kl"] is not None else None,
        ent if case["entropy"] else None,
        isw if case["policy"] and case["is_weights"] else None,
    ]
    mask_arg = None if case["mask_kind"] == "none" else mask
    args = [None if x is None else x.to(dt) for x in tokens]
    args += [mask_arg, offsets, seq_w, lm_w, params, case["need_grad"]]
    args64 = [None if x is None else x for x in tokens]
    args64 += [
        mask_arg,
        offsets,
        seq_w.double(),
        None if lm_w is None else lm_w.double(),
        params,
        True,
    ]
    return args, args64, mask


# --------------------------------------------------------------------------------------
# Tolerances


def sum_scales(args64):
    """Per entry of ``sums``: the sum of |contributions|, the scale of its rounding error."""
    (
        logp,
        old,
        adv,
        values,
        old_values,
        returns,
        ref,
        ent,
        isw,
        mask,
        offsets,
        seq_w,
        lm_w,
        params,
        _,
    ) = args64
    present = [x for x in (logp, values, ent) if x is not None]
    n = present[0].shape[0]
    valid = torch.ones(n, dtype=torch.bool) if mask is None else mask
    seq_ids = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets[1:] - offsets[:-1])
    w = torch.where(valid, seq_w[seq_ids], 0.0).abs()

    def clean(x):
        return None if x is None else torch.where(valid, x, 0.0)

    logp, old, adv, values, old_values, returns, ref, ent, isw = map(
        clean, (logp, old, adv, values, old_values, returns, ref, ent, isw)
    )
    scale = torch.zeros(layout.NUM_SUMS, dtype=torch.float64)
    if adv is not None:
        pg, _, _, nlr, _, ratio = loss_spec._policy_terms(logp, old, adv, params)
        if isw is not None:
            pg = pg * isw
        scale[layout.S_PG] = (w * pg.abs()).sum()
        scale[layout.S_NEG_LOG_RATIO] = nlr.abs().sum()
        # k3 = (ratio - 1) - log_ratio cancels: its rounding scales with the operands.
        scale[layout.S_K3] = (ratio + 1 + nlr.abs()).sum()
        scale[layout.S_RATIO_SUM] = ratio.abs().sum()
    if returns is not None:
        vf, _, _ = loss_spec._value_terms(values, old_values, returns, params)
        scale[layout.S_VF] = (w * vf.abs()).sum()
        # Plain sums of R, R^2, R - v, (R - v)^2: R and v have either sign, so a sum can
        # cancel; the rounding of R - v in the compute dtype scales with |R| + |v|.
        scale[layout.S_RETURNS] = returns.abs().sum()
        scale[layout.S_RETURNS_SQ] = (returns * returns).sum()
        scale[layout.S_VALUE_ERR] = (returns.abs() + values.abs()).sum()
        scale[layout.S_VALUE_ERR_SQ] = ((returns.abs() + values.abs()) ** 2).sum()
    if ref is not None and params[layout.P_KL_KIND] > 0:
        kind = int(params[layout.P_KL_KIND])
        kl, _ = loss_spec._kl_terms(logp, ref, kind, bool(params[layout.P_KL_STRAIGHT]))
        if kind == 4:  # exp(lr) - lr - 1 cancels like k3 above
            lr = (ref - logp).clamp(-20, 20)
            kl = torch.exp(lr) + lr.abs() + 1
        scale[layout.S_KL] = (w * kl.abs()).sum()
    if ent is not None:
        scale[layout.S_ENTROPY] = (w * ent.abs()).sum()
    if lm_w is not None:
        wl = torch.where(valid, lm_w[seq_ids], 0.0).abs()
        scale[layout.S_LM] = (wl * logp.abs()).sum()
    return scale


def rtol_of(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-5


def check_sums(got, want, scale, dtype, what="sums", counts_want=None):
    assert got.dtype == out_dtype(dtype) and got.shape == (layout.NUM_SUMS,)
    got = got.double()
    assert not torch.isnan(got).any(), f"{what}: NaN in {got}"
    rtol = rtol_of(dtype)
    for k in range(layout.NUM_SUMS):
        g, w = got[k].item(), want[k].item()
        name = SUM_NAMES[k]
        if k in COUNTS:
            expect = w if counts_want is None else counts_want[k].item()
            assert g == expect, f"{what}[{name}]: {g} != {expect}"
        elif k in (layout.S_RATIO_MIN, layout.S_RATIO_MAX):
            if math.isinf(w):
                assert g == w, f"{what}[{name}]: {g} != {w}"
            else:
                assert abs(g - w) <= rtol * abs(w) * 4, f"{what}[{name}]: {g} != {w}"
        else:
            bound = rtol * (1e-6 + scale[k].item() + abs(w))
            assert abs(g - w) <= bound, f"{what}[{name}]: {g!r} vs {w!r} (bound {bound:.3g})"


def check_grad(got, want, dtype, what):
    if want is None or want.numel() == 0:
        assert got.numel() == 0 and got.shape == (0,), f"{what}: expected an empty tensor"
        return
    assert got.dtype == out_dtype(dtype) and got.shape == want.shape, what
    got = got.double()
    assert not torch.isnan(got).any(), (
        f"{what}: NaN at {torch.nonzero(torch.isnan(got))[:5].tolist()}"
    )
    rtol = rtol_of(dtype)
    bound = rtol * (got.new_full(want.shape, want.abs().max().item() + 1e-30) + want.abs())
    err = (got - want).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{what}: error {err[worst].item():.3g} at {worst} > {bound[worst].item():.3g} "
        f"(got {got[worst].item()!r}, want {want[worst].item()!r})"
    )


# --------------------------------------------------------------------------------------
# The kernel against the float64 spec


@settings(max_examples=400)
@given(case=cases())
def test_kernel_matches_float64_spec(case, poisoned):
    check_kernel_case(case, poisoned)


def _tie_case(dtype, **change):
    case = {
        "lengths": [70, 0, 1, 45],
        "packed": True,
        "mask_kind": "random",
        "dtype": dtype,
        "pattern": "ties",
        "policy": True,
        "value": True,
        "kl": "abs",
        "entropy": True,
        "lm": True,
        "is_weights": False,
        "clip_low": 0.2,
        "clip_high": 0.28,
        "dual_clip": 1.0,
        "ratio_log_clamp": 20.0,
        "value_clip": 0.5,
        "value_clip_form": "verl",
        "agg": "token-sum",
        "coefs": (1.0, 0.5, 0.01, 0.1),
        "need_grad": True,
        "seed": 1,
    }
    case.update(change)
    return case


TIE_CASES = {
    # ratio exactly 1 = the dual-clip floor's c: torch's min tie rule (half the gradient)
    "dual clip tie": {},
    # v exactly at old_v +- eps (0.5 is exact on the grid): min / max / clamp tie rules
    "value clip edge verl": {"value_clip": 0.5},
    "value clip edge openrlhf": {"value_clip_form": "openrlhf", "is_weights": True},
    "zero value clip": {"value_clip": 0.0, "kl": "k3+"},
    # ratio exactly 1 at a clip bound: clip_low = 0 or clip_high = 0
    "ratio at clip bounds": {"clip_low": 0.0, "clip_high": 0.0, "dual_clip": None, "kl": "k1"},
    # |logp - old| past and exactly at the clamp; KL past and at its clamps
    "clamp edges": {"pattern": "extreme", "ratio_log_clamp": 5.0, "kl": "k3"},
    "clamp edges straight": {"pattern": "extreme", "kl": "low_var_kl", "dual_clip": 3.0},
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", list(TIE_CASES))
def test_exact_ties_follow_torch_rules(name, dtype, poisoned):
    for seed in range(3):
        check_kernel_case(_tie_case(dtype, seed=seed, **TIE_CASES[name]), poisoned)


def check_kernel_case(case, poisoned):
    args, args64, mask = build(case)
    with poisoned():
        sums, g_logp, g_values, g_entropy = ext().token_loss_cpu(*args)
    want = loss_spec.reference_kernel(*args64)
    counts_want = None
    if case["dtype"] != torch.float64 and case["value_clip_form"] == "openrlhf":
        # v_old + (v - v_old) is not always v in fp32: the 'clipped won' flag of an
        # unclipped token follows fp32 rounding, as in the spec run in fp32.
        counts_want = want[0].clone()
        counts_want[layout.S_VF_CLIP] = loss_spec.reference_kernel(*args)[0][layout.S_VF_CLIP].double()
    check_sums(sums, want[0], sum_scales(args64), case["dtype"], counts_want=counts_want)
    for got, w, src, name in zip(
        (g_logp, g_values, g_entropy),
        want[1:],
        (args[0], args[5], args[7]),
        ("grad_logp", "grad_values", "grad_entropy"),
    ):
        check_grad(got, w if (case["need_grad"] and src is not None) else None, case["dtype"], name)
        if got.numel():
            # masked tokens: exactly +0
            assert bool((got[~mask] == 0).all()) and not bool(torch.signbit(got[~mask]).any()), name


# --------------------------------------------------------------------------------------
# The public wrappers: backend="cpp" against backend="reference" on the same inputs


def _layout(case, x, mask, cu):
    """The packed tensors of a case in its public layout (padded: (S, max_len))."""
    if case["packed"]:
        return x, mask, cu
    return pack_to_padded(x, cu), pack_to_padded(mask, cu, False), None


WRAPPERS = ["vapo_loss", "policy_loss", "value_loss", "kl_loss", "agg_loss", "positive_lm_loss"]


@settings(max_examples=100)
@given(
    case=cases(max_seqs=5, max_len=30),
    wrapper=st.sampled_from(WRAPPERS),
    pattern=st.sampled_from(["randn", "ties"]),
)
def test_public_wrappers_match_reference_backend(case, wrapper, pattern, poisoned):
    # Moderate magnitudes: tolerances relative to the loss (the kernel test covers the
    # extremes with per-sum error scales).
    case = {**case, "pattern": pattern, "lengths": case["lengths"] or [3]}
    if case["dual_clip"] == 1.0:
        case["dual_clip"] = 3.0
    gen = torch.Generator().manual_seed(case["seed"])
    dt = case["dtype"]
    t = [x.to(dt) for x in nudge(case, raw_inputs(case, gen))]
    mask = make_mask(case["mask_kind"], case["lengths"], gen)
    cu = torch.tensor([0, *torch.tensor(case["lengths"]).cumsum(0).tolist()], dtype=torch.int32)
    positive = (torch.rand(len(case["lengths"]), generator=gen) < 0.5).long()
    mask_arg = None if case["mask_kind"] == "none" and case["packed"] else mask

    def run(backend):
        leaves = [x.clone().requires_grad_(i in (0, 3, 7)) for i, x in enumerate(t)]
        public = [_layout(case, x, mask, cu)[0] for x in leaves]
        _, m, c = _layout(case, t[0], mask, cu)
        if mask_arg is None:
            m = None
        kw = {"backend": backend}
        agg = {"agg": case["agg"], "loss_scale_factor": 7.0 if case["packed"] else None}
        logp, old, adv, values, old_values, returns, ref, ent, isw = public
        with poisoned():
            if wrapper == "vapo_loss":
                loss, metrics = vk.vapo_loss(
                    logp,
                    old,
                    adv,
                    m,
                    c,
                    values=values,
                    old_values=old_values,
                    returns=returns,
                    ref_logp=ref,
                    entropy=ent,
                    positive=positive,
                    is_weights=isw if case["is_weights"] else None,
                    clip_low=case["clip_low"],
                    clip_high=case["clip_high"],
                    dual_clip=case["dual_clip"],
                    ratio_log_clamp=case["ratio_log_clamp"],
                    value_clip=case["value_clip"],
                    value_clip_form=case["value_clip_form"],
                    kl_kind=case["kl"] or "k3",
                    vf_coef=case["coefs"][0],
                    kl_coef=case["coefs"][1],
                    entropy_coef=case["coefs"][2],
                    lm_coef=case["coefs"][3],
                    **agg,
                    **kw,
                )
            elif wrapper == "policy_loss":
                loss, metrics = vk.policy_loss(
                    logp,
                    old,
                    adv,
                    m,
                    c,
                    clip_low=case["clip_low"],
                    clip_high=case["clip_high"],
                    dual_clip=case["dual_clip"],
                    ratio_log_clamp=case["ratio_log_clamp"],
                    is_weights=isw if case["is_weights"] else None,
                    **agg,
                    **kw,
                )
            elif wrapper == "value_loss":
                loss, metrics = vk.value_loss(
                    values,
                    old_values,
                    returns,
                    m,
                    c,
                    value_clip=case["value_clip"],
                    value_clip_form=case["value_clip_form"],
                    **agg,
                    **kw,
                )
            elif wrapper == "kl_loss":
                loss, metrics = vk.kl_loss(logp, ref, m, c, kl_kind=case["kl"] or "k1", **agg, **kw)
            elif wrapper == "agg_loss":
                loss, metrics = vk.agg_loss(ent, m, c, **agg, **kw)
            else:
                loss, metrics = vk.positive_lm_loss(logp, positive, m, c, **kw)
            loss.backward()
        grads = [x.grad for x in leaves if x.requires_grad]
        return loss, metrics, grads

    loss, metrics, grads = run("cpp")
    ref_loss, ref_metrics, ref_grads = run("reference")
    rtol = rtol_of(dt) * 10
    scale = 1e-6 + abs(ref_loss.item())
    assert loss.dtype == ref_loss.dtype
    assert abs(loss.item() - ref_loss.item()) <= rtol * (scale + 1), (loss.item(), ref_loss.item())
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
        a, b = metrics[k].item(), ref_metrics[k].item()
        assert a == b or abs(a - b) <= rtol * (1 + abs(b)) * 10, (k, a, b)
    for g, rg in zip(grads, ref_grads):
        if rg is None:
            assert g is None
            continue
        assert g.dtype == rg.dtype == dt and g.shape == rg.shape
        tol = {torch.bfloat16: 1e-2, torch.float16: 1e-3}.get(dt, rtol)
        top = rg.double().abs().max().item() if rg.numel() else 0.0
        torch.testing.assert_close(g.double(), rg.double(), rtol=tol, atol=tol * (1e-12 + top))


# --------------------------------------------------------------------------------------
# Masked slots, determinism, shapes


GARBAGE = [float("nan"), float("inf"), -float("inf"), 1e30, -1e38]


@settings(max_examples=60)
@given(case=cases(), garbage=st.sampled_from(GARBAGE))
def test_garbage_in_masked_slots_changes_nothing(case, garbage):
    case = {**case, "mask_kind": "turns", "need_grad": True}
    args, _, mask = build(case)
    clean = ext().token_loss_cpu(*args)
    dirty_args = list(args)
    for i in range(9):
        if args[i] is not None:
            x = args[i].clone()
            x[~mask] = garbage
            dirty_args[i] = x
    dirty = ext().token_loss_cpu(*dirty_args)
    for a, b in zip(clean, dirty):
        assert a.dtype == b.dtype and torch.equal(a, b), (a, b)  # NaN-free and bit for bit
        assert not torch.isnan(a).any()


def _big_case(dtype=torch.float32, n_seqs=40, seed=3):
    """Several kernel chunks (8192 tokens), long and empty sequences, every term on."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 2000, (n_seqs,), generator=gen)
    lengths[::7] = 0
    lengths[3] = 20000
    case = {
        "lengths": lengths.tolist(),
        "packed": True,
        "mask_kind": "random",
        "dtype": dtype,
        "pattern": "randn",
        "policy": True,
        "value": True,
        "kl": "k3",
        "entropy": True,
        "lm": True,
        "is_weights": True,
        "clip_low": 0.2,
        "clip_high": 0.28,
        "dual_clip": 3.0,
        "ratio_log_clamp": 20.0,
        "value_clip": 0.2,
        "value_clip_form": "verl",
        "agg": "seq-mean-token-mean",
        "coefs": (0.5, 0.1, 0.01, 0.1),
        "need_grad": True,
        "seed": seed,
    }
    return case, build(case)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_bitwise_reproducible_across_thread_counts(dtype):
    _, (args, _, _) = _big_case(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext().token_loss_cpu(*args)
        torch.set_num_threads(2)
        two = ext().token_loss_cpu(*args)
        again = ext().token_loss_cpu(*args)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_several_chunks_match_float64_spec(dtype, poisoned):
    _, (args, args64, _) = _big_case(dtype)
    with poisoned():
        got = ext().token_loss_cpu(*args)
    want = loss_spec.reference_kernel(*args64)
    check_sums(got[0], want[0], sum_scales(args64), dtype)
    for g, w, name in zip(got[1:], want[1:], ("grad_logp", "grad_values", "grad_entropy")):
        check_grad(g, w, dtype, name)


def test_one_million_token_sequence_and_many_empty_ones(poisoned):
    gen = torch.Generator().manual_seed(11)
    n = 1 << 20
    # One 1M-token sequence between 100k empty ones, then a few short ones.
    lengths = [0] * 100_000 + [n - 10] + [0] * 50_000 + [3, 0, 7]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    logp = -torch.rand(n, generator=gen, dtype=torch.float64)
    old = logp + torch.randn(n, generator=gen, dtype=torch.float64) * 0.2
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    ent = torch.rand(n, generator=gen, dtype=torch.float64)
    case = {
        "dtype": torch.float32,
        "ratio_log_clamp": 20.0,
        "clip_low": 0.2,
        "clip_high": 0.28,
        "dual_clip": 3.0,
        "value_clip": None,
    }
    logp, old, adv = [x.float().double() for x in (logp, old, adv)]
    ent = ent.float().double()
    _, old, *_ = nudge(case, [logp, old, adv, adv, adv, adv, logp, ent, ent])
    mask = torch.rand(n, generator=gen) < 0.9
    seq_w = torch.rand(len(lengths), generator=gen, dtype=torch.float64).float().double()
    params = list(loss_spec.loss_params(dual_clip=3.0, entropy_coef=0.01))
    args64 = [
        logp,
        old,
        adv,
        None,
        None,
        None,
        None,
        ent,
        None,
        mask,
        offsets,
        seq_w,
        None,
        params,
        True,
    ]
    with poisoned():
        got32 = ext().token_loss_cpu(
            *[
                x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                for x in args64
            ]
        )
        got64 = ext().token_loss_cpu(*args64)
    want = loss_spec.reference_kernel(*args64)
    scale = sum_scales(args64)
    check_sums(got64[0], want[0], scale, torch.float64)
    check_sums(got32[0], want[0], scale, torch.float32)
    for i, name in ((1, "grad_logp"), (3, "grad_entropy")):
        check_grad(got64[i], want[i], torch.float64, name)
        check_grad(got32[i], want[i], torch.float32, name)


def test_many_empty_sequences_are_cheap():
    # 2M sequences, most empty: the kernel walks each once (chunks binary-search their
    # first one), so this is milliseconds, not a scan per chunk.
    gen = torch.Generator().manual_seed(5)
    s = 2_000_000
    lengths = torch.zeros(s, dtype=torch.int64)
    idx = torch.randint(0, s, (20_000,), generator=gen)
    lengths[idx] = torch.randint(1, 30, (20_000,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(offsets[-1])
    ent = torch.rand(n, generator=gen, dtype=torch.float64)
    seq_w = torch.rand(s, generator=gen, dtype=torch.float64)
    params = list(loss_spec.loss_params(entropy_coef=1.0))
    args = [None] * 7 + [ent, None, None, offsets, seq_w, None, params, True]
    got = ext().token_loss_cpu(*args)
    seq_ids = torch.repeat_interleave(torch.arange(s), lengths)
    torch.testing.assert_close(
        got[0][layout.S_ENTROPY], (seq_w[seq_ids] * ent).sum(), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(got[3], -seq_w[seq_ids], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("lengths", [[], [0, 0, 0], [5, 0, 2]])
def test_empty_and_all_masked(dtype, lengths, poisoned):
    n = sum(lengths)
    od = out_dtype(dtype)
    x = torch.randn(n).to(dtype)
    mask = torch.zeros(n, dtype=torch.bool)
    offsets = torch.tensor(
        [0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64
    )
    seq_w = torch.ones(len(lengths), dtype=od)
    params = list(loss_spec.loss_params(
        dual_clip=2.0, value_clip=0.2, kl_kind="k3", kl_coef=1.0, entropy_coef=0.1, lm_coef=0.1
    ))
    with poisoned():
        sums, g_lp, g_v, g_e = ext().token_loss_cpu(
            x, x, x, x, x, x, x, x, x, mask, offsets, seq_w, seq_w, params, True
        )
    want = torch.zeros(layout.NUM_SUMS, dtype=od)
    want[layout.S_RATIO_MIN], want[layout.S_RATIO_MAX] = math.inf, -math.inf
    assert torch.equal(sums, want)
    for g in (g_lp, g_v, g_e):
        assert g.dtype == od and torch.equal(g, torch.zeros(n, dtype=od))
    # need_grad=False and absent inputs: empty (0,) gradients
    sums2, *grads = ext().token_loss_cpu(
        None,
        None,
        None,
        x,
        None,
        x,
        None,
        None,
        None,
        None,
        offsets,
        seq_w,
        None,
        loss_spec.loss_params(),
        False,
    )
    assert all(g.shape == (0,) and g.dtype == od for g in grads)
    assert sums2[layout.S_TOKENS].item() == n


def test_exact_values_by_hand():
    # One token, no mask, float64: every sum and gradient written out.
    d = torch.float64

    def t(v):
        return torch.tensor([v], dtype=d)

    logp, old, adv = t(-1.0), t(-1.5), t(2.0)
    values, old_values, returns = t(1.0), t(0.25), t(0.0)
    ref, ent = t(-1.0), t(0.7)
    offsets = torch.tensor([0, 1])
    params = list(loss_spec.loss_params(
        clip_low=0.2,
        clip_high=0.28,
        value_clip=0.5,
        kl_kind="k2",
        vf_coef=0.5,
        kl_coef=0.3,
        entropy_coef=0.1,
        lm_coef=0.2,
    ))
    sums, g_lp, g_v, g_e = ext().token_loss_cpu(
        logp,
        old,
        adv,
        values,
        old_values,
        returns,
        ref,
        ent,
        None,
        None,
        offsets,
        t(2.0),
        t(4.0),
        params,
        True,
    )
    ratio = math.exp(0.5)  # > 1.28: clipped, pg = -A * 1.28, no gradient
    assert sums[layout.S_PG].item() == pytest.approx(2.0 * -2.0 * 1.28, rel=1e-15)
    assert sums[layout.S_CLIP_HIGH].item() == 1 and sums[layout.S_CLIP_LOW].item() == 0
    # v = 1, clip to [-0.25, 0.75] -> 0.75: max(1, 0.5625) = 1 -> unclipped wins
    assert sums[layout.S_VF].item() == pytest.approx(2.0 * 0.5, rel=1e-15)
    assert sums[layout.S_VF_CLIP].item() == 0
    assert sums[layout.S_KL].item() == 0 and sums[layout.S_ENTROPY].item() == pytest.approx(1.4)
    assert sums[layout.S_LM].item() == pytest.approx(4.0)  # -(4 * -1)
    assert sums[layout.S_RATIO_MIN].item() == sums[layout.S_RATIO_MAX].item() == pytest.approx(ratio)
    assert g_lp.item() == pytest.approx(0.0 + 0.3 * 2.0 * 0.0 - 0.2 * 4.0)
    assert g_v.item() == pytest.approx(0.5 * 2.0 * 1.0)
    assert g_e.item() == pytest.approx(-0.1 * 2.0)


def test_nan_in_a_valid_slot_reaches_the_loss():
    # The op screens inputs through the loss only: each input's NaN must reach it.
    names = [
        "logp",
        "old_logp",
        "advantages",
        "values",
        "old_values",
        "returns",
        "ref_logp",
        "entropy",
        "is_weights",
    ]
    n = 20
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(i)
        x = [torch.randn(n, generator=gen) for _ in range(9)]
        x[8] = x[8].abs()
        x[i][5] = math.nan
        with pytest.raises(ValueError, match=f"{name} contains NaN"):
            vk.vapo_loss(
                x[0],
                x[1],
                x[2],
                None,
                torch.tensor([0, 9, 20], dtype=torch.int32),
                values=x[3],
                old_values=x[4],
                returns=x[5],
                ref_logp=x[6],
                entropy=x[7],
                is_weights=x[8],
                kl_coef=0.0,
                backend="cpp",
            )


# --------------------------------------------------------------------------------------
# Direct callers of the binding get errors, not out-of-bounds reads


def _good_args(**change):
    x = torch.randn(6)
    args = {
        "logp": x,
        "old_logp": x,
        "advantages": x,
        "values": None,
        "old_values": None,
        "returns": None,
        "ref_logp": None,
        "entropy": None,
        "is_weights": None,
        "mask": None,
        "offsets": torch.tensor([0, 2, 6]),
        "seq_weight": torch.ones(2),
        "lm_weight": None,
        "params": loss_spec.loss_params(),
        "need_grad": True,
    }
    args.update(change)
    return tuple(args.values())


BAD_CALLS = {
    "no input": (
        {"logp": None, "old_logp": None, "advantages": None},
        "at least one of logp, values or entropy",
    ),
    "integer logp": ({"logp": torch.ones(6, dtype=torch.long)}, "logp must be float16, bfloat16"),
    "2-D logp": ({"logp": torch.randn(2, 3)}, "logp must be a contiguous 1-D"),
    "strided logp": ({"logp": torch.randn(12)[::2]}, "logp must be a contiguous 1-D"),
    "mixed dtypes": ({"old_logp": torch.randn(6, dtype=torch.float64)}, "old_logp has dtype"),
    "short advantages": ({"advantages": torch.randn(5)}, "advantages has 5 tokens"),
    "policy without old_logp": ({"old_logp": None}, "policy term .* needs logp and old_logp"),
    "value without values": ({"returns": torch.randn(6)}, "value term"),
    "value clip without old_values": (
        {"values": torch.randn(6), "returns": torch.randn(6), "params": loss_spec.loss_params(value_clip=0.2)},
        "old_values unless",
    ),
    "kl without logp": (
        {
            "logp": None,
            "old_logp": None,
            "advantages": None,
            "entropy": torch.randn(6),
            "ref_logp": torch.randn(6),
            "params": loss_spec.loss_params(kl_kind="k1"),
        },
        "KL term .* needs logp",
    ),
    "bad kl kind": (
        {"ref_logp": torch.randn(6), "params": [*loss_spec.loss_params()[:6], 7.0, *loss_spec.loss_params()[7:]]},
        "P_KL_KIND",
    ),
    "lm without logp": (
        {
            "logp": None,
            "old_logp": None,
            "advantages": None,
            "entropy": torch.randn(6),
            "lm_weight": torch.ones(2),
        },
        "LM term .* needs logp",
    ),
    "float mask": ({"mask": torch.ones(6)}, "mask must be a contiguous bool"),
    "short mask": ({"mask": torch.ones(5, dtype=torch.bool)}, "mask must be a contiguous bool"),
    "int32 offsets": (
        {"offsets": torch.tensor([0, 2, 6], dtype=torch.int32)},
        "offsets must be a contiguous int64",
    ),
    "offsets past N": (
        {"offsets": torch.tensor([0, 2, 7])},
        "offsets must start at 0 and end at N",
    ),
    "offsets not from 0": (
        {"offsets": torch.tensor([1, 2, 6])},
        "offsets must start at 0 and end at N",
    ),
    "decreasing offsets": (
        {"offsets": torch.tensor([0, 4, 2, 6]), "seq_weight": torch.ones(3)},
        "non-decreasing",
    ),
    "seq_weight length": (
        {"seq_weight": torch.ones(3)},
        "seq_weight must be a contiguous \\(S,\\)",
    ),
    "seq_weight dtype": ({"seq_weight": torch.ones(2, dtype=torch.float64)}, "seq_weight must be"),
    "lm_weight length": ({"lm_weight": torch.ones(1)}, "lm_weight must be"),
    "params length": ({"params": [0.2, 0.28]}, "params must hold 12 floats"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_arguments_raise(name):
    change, message = BAD_CALLS[name]
    with pytest.raises(RuntimeError, match=message):
        ext().token_loss_cpu(*_good_args(**change))


def test_good_arguments_pass():
    ext().token_loss_cpu(*_good_args())


# --------------------------------------------------------------------------------------
# The SSE2 baseline build (this CPU likely runs the AVX2 one), in a subprocess


_ISA_CHECK = r"""
import torch
from vapo_kernels import _backends
import vapo_kernels as vk
from vapo_kernels import _loss_layout as layout
from vapo_kernels.ops import loss_spec
ext = _backends.extension()
gen = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    n = 1000
    x = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for _ in range(9)]
    x[8] = x[8].abs()
    mask = torch.rand(n, generator=gen) < 0.8
    od = torch.float64 if dtype == torch.float64 else torch.float32
    offsets = torch.tensor([0, 1, 300, 300, 1000])
    w = torch.rand(4, generator=gen).to(od)
    for kl in ("k1", "abs", "k2", "k3+"):
        for form in ("verl", "openrlhf"):
            params = list(loss_spec.loss_params(dual_clip=3.0, value_clip=0.3, value_clip_form=form, kl_kind=kl,
                               kl_coef=0.2, entropy_coef=0.1, lm_coef=0.1))
            args = [*x, mask, offsets, w, w, params, True]
            got = ext.token_loss_cpu(*args)
            want = loss_spec.reference_kernel(*args)  # in fp32 for fp32 / bf16 / fp16 inputs, as the kernel
            tol = 1e-10 if dtype == torch.float64 else 1e-4
            for g, r in zip(got, want):
                r = r.double()
                atol = tol * (1 + r.abs().max().item())
                assert torch.allclose(g.double(), r, rtol=tol, atol=atol), (dtype, kl, form, g, r)
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA variants")
def test_baseline_instruction_set():
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
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
    assert out.stdout.strip() == "DEFAULT"
