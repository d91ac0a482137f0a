"""Fused logits -> loss kernel (``vapo_kernels.triton.loss.logits_loss``) against the
float64 spec :func:`vapo_kernels.ops.logits_loss.reference_logits_kernel`.

Without a GPU the kernel runs through the Triton interpreter on CPU tensors: shapes stay
small and ``block_v`` of 8..32 puts vocabulary-chunk boundaries inside the rows. On a
GPU the same tests run compiled on CUDA tensors; ``-m gpu`` adds a 152k vocabulary and a
single 1M-token sequence. The public op under backend="triton" is checked with every
other backend in test_loss.py (against independent float64 autograd code) and
test_logits_loss.py (dominant logits).

Exact discrete decisions. The log-probs are computed by the kernel (float32 for all but
float64 logits), so unlike the token-loss tests the inputs cannot sit exactly on a clip
bound. Instead ``old_logp`` and ``ref_logp`` are built from the exact float64 log-probs
of the logits and moved, where the log-ratio lies within MARGIN of a bound it is
compared with (ratio clip bounds, dual clip, the ratio clamp, |diff| = 0 for abs, the
k3 clamps), until it does not. MARGIN is far above the kernel's log-prob error (about
1e-6 per unit of row scale in float32), so every clip flag, count, branch and clamp
gradient is the same in float32 and float64, and what is left is rounding, checked
against per-token scales (see ``sum_tolerances`` and ``grad_tolerance``).
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

from vapo_kernels import _loss_layout as layout
from vapo_kernels.ops import loss_spec
from vapo_kernels.ops.token_logprobs import reference_forward
from vapo_kernels._loss_layout import NUM_SUMS
from vapo_kernels.ops.logits_loss import reference_logits_kernel
from vapo_kernels.triton import logprobs as tlp
from vapo_kernels.triton import loss as tloss


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
BLOCK_V = 16
# Vocabularies around chunk boundaries (BLOCK_V +- 1, several chunks) and the degenerate V=1.
EDGE_V = [1, 2, BLOCK_V - 1, BLOCK_V, BLOCK_V + 1, 2 * BLOCK_V + 1, 4 * BLOCK_V - 1]
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
KL_KINDS = [None, "k1", "abs", "k2", "k3", "low_var_kl", "k1+", "abs+", "k2+", "k3+"]
COUNT_SUMS = (layout.S_TOKENS, layout.S_CLIP_LOW, layout.S_CLIP_HIGH, layout.S_DUAL_CLIP, layout.S_VF_CLIP)
TOKEN_ARGS = ("old_logp", "advantages", "ref_logp", "is_weights")
# Per-unit-of-scale rounding of the accumulation dtype (as in test_logprobs_triton), and
# a safety factor for the few operations that compound it.
ACC_RTOL = {torch.float32: 1e-6, torch.float64: 1e-13}
SAFETY = 8.0
# Distance (in log-ratio units) every compared quantity keeps from its bound.
MARGIN = 2e-3


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def grid(x: torch.Tensor) -> torch.Tensor:
    """Multiples of 2^-10: advantages and weights exact in every dtype used."""
    return (x * 1024).round() / 1024


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern (so -0.0 != 0.0 and NaN == NaN of the same payload)."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().cpu().contiguous().view(ints[t.element_size()])


# --------------------------------------------------------------------------------------
# Cases


@st.composite
def cases(draw):
    return {
        # Packed sequences, empty and length-1 ones included.
        "lengths": draw(st.lists(st.sampled_from([0, 0, 1, 1, 2, 3, 5, 7]), max_size=5)),
        "vocab": draw(st.one_of(st.sampled_from(EDGE_V), st.integers(1, 4 * BLOCK_V))),
        "dtype": draw(st.sampled_from(DTYPES)),
        "temperature": draw(st.sampled_from([1.0, 0.7, 2.5, 0.5])),
        "logits": draw(st.sampled_from(["normal", "wide", "neg_inf"])),
        "mask": draw(st.sampled_from(["none", "random", "random", "all_false"])),
        "ignore": draw(st.booleans()),
        "garbage": draw(st.sampled_from([math.nan, 1e30, -math.inf])),
        "clip_low": draw(st.sampled_from([0.2, 0.0, 1.0])),
        "clip_high": draw(st.sampled_from([0.28, 0.0, 4.0])),
        "dual_clip": draw(st.sampled_from([None, 1.5, 3.0])),
        "ratio_log_clamp": draw(st.sampled_from([20.0, 0.5, 3.0])),
        "isw": draw(st.booleans()),
        "kl": draw(st.sampled_from(KL_KINDS)),
        "kl_coef": draw(st.sampled_from([0.3, 0.0, -0.7])),
        "entropy_coef": draw(st.sampled_from([0.0, 0.01, -0.7, 1.0])),
        "lm": draw(st.booleans()),
        "lm_coef": draw(st.sampled_from([0.5, 0.0, 1.0])),
        "spread": draw(st.sampled_from(["small", "wide"])),
        "zero_adv": draw(st.booleans()),
        "weights": draw(st.sampled_from(["random", "uniform", "some_zero"])),
        "out": draw(st.sampled_from(["none", "fresh", "inplace"])),
        "block_v": draw(st.sampled_from([BLOCK_V, BLOCK_V, 8, 2 * BLOCK_V])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def params_of(case) -> list[float]:
    return loss_spec.loss_params(
        clip_low=case["clip_low"], clip_high=case["clip_high"], dual_clip=case["dual_clip"],
        ratio_log_clamp=case["ratio_log_clamp"], kl_kind=case["kl"], kl_coef=case["kl_coef"],
        entropy_coef=case["entropy_coef"], lm_coef=case["lm_coef"],
    )


def _log_bound(b: float) -> float:
    return math.log(b) if b > 0 else -math.inf


def separate_policy(lp, olp, valid, params, acc):
    """Move old_logp until, on every valid token, the log-ratio (with old_logp as the
    kernel sees it, rounded to acc) keeps MARGIN from the clamp bounds +-C, the clip
    bounds and (with a dual clip) the dual-clip constant."""
    clamp = params[layout.P_RATIO_CLAMP]
    lo = _log_bound(1.0 - params[layout.P_CLIP_LOW])
    hi = _log_bound(1.0 + params[layout.P_CLIP_HIGH])
    for _ in range(100):
        raw = lp - olp.to(acc).double()
        lr = raw.clamp(-clamp, clamp)
        bad = ((raw.abs() - clamp).abs() < MARGIN) | ((lr - lo).abs() < MARGIN)
        bad |= (lr - hi).abs() < MARGIN
        if params[layout.P_DUAL_CLIP] > 0:
            top = torch.maximum(lr, lr.clamp(lo, hi))
            bad |= (top - math.log(params[layout.P_DUAL_CLIP])).abs() < MARGIN
        bad &= valid
        if not bad.any():
            return olp.to(acc)
        olp = torch.where(bad, olp - 0.37, olp)
    raise AssertionError("could not move old_logp away from the clip bounds")


def separate_kl(lp, ref, valid, params, acc):
    """Move ref_logp away from the kinks of the KL estimator (|diff| = 0 for abs; the
    clamps of -diff at +-20 and of k3 at 10)."""
    kind = int(params[layout.P_KL_KIND])
    for _ in range(100):
        diff = lp - ref.to(acc).double()
        bad = torch.zeros_like(valid)
        if kind == 2:
            bad |= diff.abs() < MARGIN
        if kind == 4:
            bad |= ((-diff).abs() - 20.0).abs() < MARGIN
            lr = (-diff).clamp(-20.0, 20.0)
            bad |= (torch.expm1(lr) - lr - 10.0).abs() < 10 * MARGIN
        bad &= valid
        if not bad.any():
            return ref.to(acc)
        ref = torch.where(bad, ref + 0.37, ref)
    raise AssertionError("could not move ref_logp away from the KL kinks")


def build(case, device=DEVICE):
    """Clean and dirty contract inputs (dicts of tensors on ``device``), and the rest.

    Clean and dirty differ only on invalid rows: the dirty logits rows and token inputs
    there hold the case's garbage."""
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, vocab = case["dtype"], case["vocab"]
    acc = acc_dtype(dtype)
    lengths = case["lengths"]
    offsets = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()])
    n = int(offsets[-1])
    num_seqs = len(lengths)

    scale = 6.0 if case["logits"] == "wide" else 2.0
    z = scale * torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    y = torch.randint(0, vocab, (n,), generator=gen)
    if n:
        y[0] = vocab - 1  # the last column, in the last chunk
    if case["logits"] == "neg_inf" and vocab > 1:
        # -inf logits (a banned-token mask), never at the target: logp stays finite.
        drop = torch.rand(n, vocab, generator=gen) < 0.3
        drop[torch.arange(n), y] = False
        z = torch.where(drop, -math.inf, z)
    z = z.to(dtype)
    if case["ignore"]:
        y = torch.where(torch.rand(n, generator=gen) < 0.25, -100, y)
    if case["mask"] == "none":
        mask = torch.ones(n, dtype=torch.bool)
    elif case["mask"] == "all_false":
        mask = torch.zeros(n, dtype=torch.bool)
    else:
        mask = torch.rand(n, generator=gen) < 0.7
    valid = mask & (y != -100)
    params = params_of(case)
    tau = case["temperature"]

    # The exact log-probs of the logits the kernel reads.
    lp, _, _ = reference_forward(z.double(), y, valid, tau)

    def rnd():
        return torch.randn(n, generator=gen, dtype=torch.float64)

    wide = case["spread"] == "wide"
    delta = grid(rnd() * (3.0 if wide else 0.3))
    delta = torch.where(torch.rand(n, generator=gen) < 0.2, 0.0, delta)  # ratio ~ 1
    old_logp = separate_policy(lp, lp + delta, valid, params, acc)
    adv = grid(rnd())
    if case["zero_adv"]:
        adv = torch.where(torch.rand(n, generator=gen) < 0.3, 0.0, adv)
    x = {"old_logp": old_logp, "advantages": adv.to(acc), "ref_logp": None, "is_weights": None}
    if case["kl"] is not None:
        ref = lp + grid(rnd() * (6.0 if wide else 0.5))
        x["ref_logp"] = separate_kl(lp, ref, valid, params, acc)
    if case["isw"]:
        isw = grid(2 * torch.rand(n, generator=gen, dtype=torch.float64))
        x["is_weights"] = torch.where(torch.rand(n, generator=gen) < 0.2, 0.0, isw).to(acc)

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
        lm_weight = lm_weight.to(acc)

    junk = case["garbage"]
    dirty = {k: None if t is None else torch.where(valid, t, junk).to(acc) for k, t in x.items()}
    dirty["logits"] = torch.where(valid[:, None], z, torch.tensor(junk).to(dtype))
    x["logits"] = z

    def dev(t):
        return None if t is None else t.to(device)

    rest = {
        "targets": dev(y), "valid": dev(valid), "offsets": dev(offsets),
        "seq_weight": dev(seq_weight.to(acc)), "lm_weight": dev(lm_weight),
        "params": params, "temperature": tau,
    }
    clean = {k: dev(t) for k, t in x.items()}
    dirty = {k: dev(t) for k, t in dirty.items()}
    return clean, dirty, rest


def run_kernel(x, rest, out_mode, block_v):
    """(sums, gradient or None); in place over a copy of the logits."""
    z = x["logits"]
    if out_mode == "inplace":
        z = z.clone()
        out = z
    elif out_mode == "fresh":
        out = torch.empty_like(z)
    else:
        out = None
    sums = tloss.logits_loss(
        z, rest["targets"], *(x[k] for k in TOKEN_ARGS), rest["valid"], rest["offsets"],
        rest["seq_weight"], rest["lm_weight"], rest["params"], rest["temperature"], out,
        block_v=block_v,
    )
    return sums, out


def cpu64(t):
    return None if t is None else t.detach().cpu().double()


def run_reference64(x, rest, with_grad=True):
    """The spec in float64 on the CPU (inputs upcast exactly): (sums, gradient)."""
    z = cpu64(x["logits"])
    out = torch.empty_like(z) if with_grad else None
    sums = reference_logits_kernel(
        z, rest["targets"].cpu(), *(cpu64(x[k]) for k in TOKEN_ARGS), rest["valid"].cpu(),
        rest["offsets"].cpu(), cpu64(rest["seq_weight"]), cpu64(rest["lm_weight"]),
        rest["params"], rest["temperature"], out,
    )
    return sums, out


# --------------------------------------------------------------------------------------
# Tolerances: rounding relative to the magnitudes that enter each output


def token_scales(x, rest):
    """Float64 per-token quantities on valid rows (zero elsewhere): the row scale
    (1 + max |s| + log V: the kernel's log-prob and entropy errors grow with it), exact
    log-probs and the magnitudes of each term and of its sensitivity to logp."""
    z = cpu64(x["logits"])
    y, valid = rest["targets"].cpu(), rest["valid"].cpu()
    tau, params = rest["temperature"], rest["params"]
    n, vocab = z.shape
    zero = torch.zeros((), dtype=torch.float64)

    def clean(t):
        return torch.where(valid, t, zero)

    s = z / tau
    row_scale = 1 + torch.where(torch.isfinite(s), s.abs(), 0).amax(-1) + math.log(vocab)
    lp, ent, stats = reference_forward(z, y, valid, tau)
    lse = stats[:, 0] / tau + stats[:, 1]  # stats = (max logit, log normaliser) per row
    offsets = rest["offsets"].cpu()
    seq = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets[1:] - offsets[:-1])
    w = clean(cpu64(rest["seq_weight"])[seq])
    olp = clean(cpu64(x["old_logp"]))
    adv = clean(cpu64(x["advantages"]))
    clamp = params[layout.P_RATIO_CLAMP]
    lr = (lp - olp).clamp(-clamp, clamp)
    r = clean(torch.exp(lr))
    isw = 1.0 if x["is_weights"] is None else clean(cpu64(x["is_weights"])).abs()
    big = 1 + params[layout.P_CLIP_HIGH] + params[layout.P_DUAL_CLIP]
    t = {
        "valid": valid, "row_scale": clean(row_scale), "lp": lp, "ent": ent, "lse": lse,
        "w": w, "r": r, "lr": lr, "inputs": clean(lp.abs() + olp.abs() + 1),
        "pg": adv.abs() * isw * (r + big),
    }
    t["g_lp"] = w * t["pg"]  # bounds |g_logp| and its sensitivity to logp
    t["kl"] = torch.zeros(n, dtype=torch.float64)
    if x["ref_logp"] is not None and params[layout.P_KL_KIND] > 0:
        d = (lp - clean(cpu64(x["ref_logp"]))).abs()
        t["kl"] = clean(1 + d + d * d + torch.exp(d.clamp(max=20)))
        t["g_lp"] = t["g_lp"] + abs(params[layout.P_KL_COEF]) * w * t["kl"]
    t["w_lm"] = torch.zeros(n, dtype=torch.float64)
    if rest["lm_weight"] is not None:
        t["w_lm"] = clean(cpu64(rest["lm_weight"])[seq])
        t["g_lp"] = t["g_lp"] + abs(params[layout.P_LM_COEF]) * t["w_lm"]
    t["g_h"] = abs(params[layout.P_ENTROPY_COEF]) * w
    return t


def sum_tolerances(t, rtol):
    """(NUM_SUMS,) float64: per token, the error u = rtol * row_scale of logp and H times
    each term's sensitivity, plus rounding of the term itself."""
    u = rtol * t["row_scale"]
    e = u + rtol * t["inputs"]  # error of the log-ratio
    tol = torch.zeros(NUM_SUMS, dtype=torch.float64)
    tol[layout.S_PG] = (t["w"] * t["pg"] * e).sum()
    tol[layout.S_KL] = (t["w"] * t["kl"] * e).sum()
    tol[layout.S_ENTROPY] = (t["w"] * (u + rtol * t["ent"])).sum()
    tol[layout.S_LM] = (t["w_lm"] * (u + rtol * t["lp"].abs())).sum()
    tol[layout.S_NEG_LOG_RATIO] = e.sum()
    tol[layout.S_K3] = ((t["r"] + 1 + t["lr"].abs()) * e).sum()
    tol[layout.S_RATIO_SUM] = (t["r"] * e).sum()
    extreme = (t["r"] * e).max() if t["r"].numel() else torch.zeros(())
    tol[layout.S_RATIO_MIN] = tol[layout.S_RATIO_MAX] = extreme
    return SAFETY * tol


def assert_sums_match(got, exp, tol, dtype, what=""):
    got = got.detach().cpu().double()
    rtol = ACC_RTOL[acc_dtype(dtype)]
    for i in COUNT_SUMS:
        assert got[i] == exp[i], f"{what} sum {i}: {got[i].item()} != {exp[i].item()}"
    for i in range(NUM_SUMS):
        if i in COUNT_SUMS:
            continue
        if math.isinf(exp[i]):
            assert got[i] == exp[i], f"{what} sum {i}: {got[i].item()} != {exp[i].item()}"
            continue
        bound = tol[i] + SAFETY * rtol * abs(exp[i]) + 1e-300
        assert abs(got[i] - exp[i]) <= bound, (
            f"{what} sum {i}: {got[i].item()!r} vs {exp[i].item()!r} (tol {bound.item():.3g})"
        )


def grad_tolerance(x, rest, t, exact, out_dtype):
    """Per element: rounding of the exact gradient to the output dtype, plus the
    accumulation error of (g_logp (onehot - p) + g_H p (E_s - s)) / tau, where g_logp
    is off by ~u |its sensitivity| and p, E_s by ~u relative to the row scale."""
    acc = acc_dtype(out_dtype)
    rtol, eps_out = ACC_RTOL[acc], torch.finfo(out_dtype).eps
    tau = rest["temperature"]
    valid = t["valid"]
    z = cpu64(x["logits"])
    s = z / tau
    p = torch.where(valid[:, None], torch.exp(s - t["lse"][:, None]), 0)
    onehot = torch.zeros_like(p)
    onehot[valid, rest["targets"].cpu()[valid]] = 1.0
    scale = t["row_scale"][:, None]
    g_lp, g_h = t["g_lp"][:, None], t["g_h"][:, None]
    weight = g_lp * (p + onehot) + g_h * p * (1 + 2 * scale)
    # Below the normal range relative precision is lost (see test_logprobs_triton).
    tiny = torch.finfo(acc).tiny
    floor = tiny * (1 + (g_lp + g_h * (1 + 2 * scale)) / tau)
    floor = floor + torch.finfo(out_dtype).tiny * eps_out
    return eps_out * exact.abs() + SAFETY * rtol * (scale * weight / tau + exact.abs()) + floor


def assert_grad_match(got, exp, tol, what="grad"):
    got = got.detach().cpu().double()
    assert got.shape == exp.shape, what
    err = (got - exp).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} off, worst err {err[bad].max().item():.3g}, "
        f"got {got[bad][0].item()!r}, expected {exp[bad][0].item()!r}, tol {tol[bad][0].item():.3g}"
    )


def check_against_reference(sums, grad, x, rest, dtype, what=""):
    acc = acc_dtype(dtype)
    exp_sums, exp_grad = run_reference64(x, rest, with_grad=grad is not None)
    t = token_scales(x, rest)
    assert sums.dtype == acc and sums.shape == (NUM_SUMS,) and sums.device.type == DEVICE
    assert_sums_match(sums, exp_sums, sum_tolerances(t, ACC_RTOL[acc]), dtype, what)
    if grad is not None:
        assert grad.dtype == dtype and grad.device.type == DEVICE
        assert_grad_match(grad, exp_grad, grad_tolerance(x, rest, t, exp_grad, dtype), what)
        assert (grad.cpu()[~rest["valid"].cpu()] == 0).all(), "invalid rows must be zero"


# --------------------------------------------------------------------------------------
# The kernel contract


@settings(max_examples=150, deadline=None)
@given(case=cases())
def test_kernel_matches_float64_reference(case, poisoned):
    clean, dirty, rest = build(case)
    block_v = case["block_v"]
    with poisoned():  # the gradient buffer and the partial sums: NaN until written
        sums, grad = run_kernel(clean, rest, "fresh", block_v)
    check_against_reference(sums, grad, clean, rest, case["dtype"])
    # Garbage in the invalid rows (logits and token inputs), through the case's output
    # mode (none / fresh / in place): every output bit the same as on clean inputs.
    with poisoned():
        d_sums, d_grad = run_kernel(dirty, rest, case["out"], block_v)
    assert torch.equal(bits(d_sums), bits(sums))
    if case["out"] != "none":
        assert torch.equal(bits(d_grad), bits(grad))


def fixed_case(**kw):
    case = {
        "lengths": [3, 0, 1, 5, 1, 0, 4], "vocab": 2 * BLOCK_V + 5, "dtype": torch.float32,
        "temperature": 0.7, "logits": "neg_inf", "mask": "random", "ignore": True,
        "garbage": math.nan, "clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0,
        "ratio_log_clamp": 3.0, "isw": True, "kl": "k3", "kl_coef": 0.3,
        "entropy_coef": 0.01, "lm": True, "lm_coef": 0.5, "spread": "wide",
        "zero_adv": True, "weights": "random", "out": "fresh", "block_v": BLOCK_V, "seed": 5,
    }
    case.update(kw)
    return case


TERM_SWITCHES = [
    {"kl": kind} for kind in KL_KINDS
] + [
    {"dual_clip": None}, {"isw": False}, {"entropy_coef": 0.0}, {"entropy_coef": -0.7},
    {"lm": False}, {"kl": None, "lm": False, "entropy_coef": 0.0, "isw": False,
                    "dual_clip": None},
    {"dtype": torch.float64, "temperature": 1.3}, {"dtype": torch.bfloat16},
    {"dtype": torch.float16, "temperature": 2.5},
]


@pytest.mark.parametrize("switch", TERM_SWITCHES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_every_term_on_and_off(switch, poisoned):
    """Each term (KL kinds 1..4 with and without straight-through, dual clip, importance
    weights, entropy coefficient, LM term) toggled on a fixed ragged case."""
    case = fixed_case(**switch)
    clean, dirty, rest = build(case)
    with poisoned():
        sums, grad = run_kernel(clean, rest, "fresh", BLOCK_V)
    check_against_reference(sums, grad, clean, rest, case["dtype"], what=str(switch))
    d_sums, d_grad = run_kernel(dirty, rest, "inplace", BLOCK_V)
    assert torch.equal(bits(d_sums), bits(sums)) and torch.equal(bits(d_grad), bits(grad))
    alone, none = run_kernel(clean, rest, "none", BLOCK_V)
    assert none is None and torch.equal(bits(alone), bits(sums))


def test_clip_flags_are_exercised():
    """The fixed case really takes the clip-low, clip-high and dual-clip branches."""
    case = fixed_case(lengths=[9, 0, 1, 12, 1, 9], spread="wide", ratio_log_clamp=20.0,
                      clip_low=0.2, clip_high=0.28, dual_clip=1.5, mask="none", ignore=False,
                      zero_adv=False)
    clean, _, rest = build(case)
    sums, grad = run_kernel(clean, rest, "fresh", 8)
    check_against_reference(sums, grad, clean, rest, case["dtype"])
    assert sums[layout.S_CLIP_LOW] > 0 and sums[layout.S_CLIP_HIGH] > 0 and sums[layout.S_DUAL_CLIP] > 0


def test_many_short_sequences():
    """Runs of empty and length-1 sequences (the binary search takes several steps and
    must skip repeated offsets), one longer sequence, trailing empties; every sequence
    its own weight."""
    lengths = [0, 9, 1, 1, 0, 1, 2, 1, 0, 0, 1, 5, 1, 0, 1, 1, 1, 0, 0]
    case = fixed_case(lengths=lengths, vocab=5, mask="random", weights="random", block_v=4)
    clean, _, rest = build(case)
    # Weights that tell every sequence apart.
    num_seqs = len(lengths)
    rest["seq_weight"] = (torch.arange(1, num_seqs + 1, dtype=torch.float32) / 7).to(DEVICE)
    rest["lm_weight"] = (torch.arange(num_seqs, dtype=torch.float32) % 4 / 5).to(DEVICE)
    sums, grad = run_kernel(clean, rest, "fresh", 4)
    check_against_reference(sums, grad, clean, rest, torch.float32)


def test_all_invalid_and_empty(poisoned):
    params = loss_spec.loss_params(dual_clip=3.0, kl_kind="k3", entropy_coef=0.1, lm_coef=0.1)
    expected = torch.zeros(NUM_SUMS)
    expected[layout.S_RATIO_MIN], expected[layout.S_RATIO_MAX] = math.inf, -math.inf
    for n, offsets in ((5, [0, 2, 5]), (3, [0, 0, 3, 3]), (0, [0, 0, 0]), (0, [0])):
        s = len(offsets) - 1
        z = torch.full((n, 7), math.nan, device=DEVICE)
        y = torch.zeros(n, dtype=torch.int64, device=DEVICE)
        tok = torch.full((n,), math.nan, device=DEVICE)
        valid = torch.zeros(n, dtype=torch.bool, device=DEVICE)
        offs = torch.tensor(offsets, device=DEVICE)
        sw = torch.ones(s, device=DEVICE)
        for inplace in (False, True):
            with poisoned():
                out = z.clone() if inplace else torch.empty_like(z)
                sums = tloss.logits_loss(
                    out if inplace else z, y, tok, tok, tok, tok, valid, offs, sw, sw, params,
                    1.0, out, block_v=4,
                )
            assert sums.dtype == torch.float32 and torch.equal(sums.cpu(), expected)
            assert (out == 0).all()


def test_ignored_target_on_a_valid_row_counts_as_invalid():
    """Outside the contract (the op never passes one), but no out-of-row read."""
    case = fixed_case(mask="none", ignore=False)
    clean, _, rest = build(case)
    y = rest["targets"].clone()
    y[2] = -100
    sums, grad = run_kernel(clean, dict(rest, targets=y), "fresh", BLOCK_V)
    exp, exp_grad = run_kernel(clean, dict(rest, valid=rest["valid"] & (y != -100)), "fresh",
                               BLOCK_V)
    assert torch.equal(bits(sums), bits(exp)) and torch.equal(bits(grad), bits(exp_grad))


@pytest.mark.parametrize("inplace", [False, True])
def test_strided_row_views(inplace, poisoned):
    """Logits that are every other row of a wider buffer, at an offset; the gradient
    lands only in the view."""
    case = fixed_case(dtype=torch.float64, lengths=[2, 0, 3], mask="none", ignore=False)
    clean, _, rest = build(case)
    n, vocab = clean["logits"].shape
    buf = torch.randn(2 * n, vocab + 11, dtype=torch.float64, device=DEVICE)
    view = buf[::2, 4 : 4 + vocab]
    view.copy_(clean["logits"])
    before = buf.clone()
    if inplace:
        out = view
    else:
        with poisoned():
            out = torch.empty(n, vocab, dtype=torch.float64, device=DEVICE)
    sums = tloss.logits_loss(
        view, rest["targets"], *(clean[k] for k in TOKEN_ARGS), rest["valid"], rest["offsets"],
        rest["seq_weight"], rest["lm_weight"], rest["params"], rest["temperature"], out,
        block_v=BLOCK_V,
    )
    exp_sums, exp_grad = run_kernel(clean, rest, "fresh", BLOCK_V)
    assert torch.equal(bits(sums), bits(exp_sums))
    assert torch.equal(bits(out), bits(exp_grad))
    untouched = torch.ones_like(buf, dtype=torch.bool)
    untouched[::2, 4 : 4 + vocab] = not inplace
    assert torch.equal(buf[untouched], before[untouched])


def test_row_offsets_are_int64():
    """Rows more than 2^31 elements into the buffer, on CPU: a (3, V) fp16 view with a
    row stride of 2^30 + 64, so row 2 starts past int32; only rows 0 and 2 are touched
    (row 1 is invalid and written with zeros), so the rest of the 4 GiB costs nothing."""
    if DEVICE != "cpu":
        pytest.skip("CPU variant; the GPU tests cover large buffers")
    vocab, stride = 3 * BLOCK_V + 1, 2**30 + 64
    try:
        buf = torch.empty(2 * stride + vocab, dtype=torch.float16)
    except RuntimeError:
        pytest.skip("cannot reserve 4 GiB of address space")
    z = buf.as_strided((3, vocab), (stride, 1))
    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(3, vocab, generator=gen).half()
    z.copy_(dense)
    y = torch.tensor([vocab - 1, 3, 5])
    valid = torch.tensor([True, False, True])
    tok = torch.tensor([-3.0, 0.0, -4.0])
    adv = torch.tensor([1.0, 0.0, -0.5])
    offs = torch.tensor([0, 1, 3])
    sw = torch.tensor([0.5, 0.25])
    params = loss_spec.loss_params(entropy_coef=0.1)
    args = (y, tok, adv, None, None, valid, offs, sw, None, params, 1.0)
    exp_grad = torch.empty(3, vocab, dtype=torch.float16)
    exp = tloss.logits_loss(dense, *args, exp_grad, block_v=BLOCK_V)
    got = tloss.logits_loss(z, *args, z, block_v=BLOCK_V)  # in place: stores 2^31 out too
    assert torch.equal(got, exp)
    assert torch.equal(bits(z), bits(exp_grad))


def test_deterministic():
    case = fixed_case(lengths=[7, 1, 0, 9], dtype=torch.bfloat16)
    clean, _, rest = build(case)
    a = run_kernel(clean, rest, "fresh", BLOCK_V)
    b = run_kernel(clean, rest, "fresh", BLOCK_V)
    for u, v in zip(a, b):
        assert torch.equal(bits(u), bits(v))


def test_launch_parameters():
    default = tloss.LOGITS_INTERPRET_BLOCK_V if INTERPRET else tloss.LOGITS_GPU_BLOCK_V
    assert tloss.LOGITS_GPU_BLOCK_V == 8192
    assert tlp._launch_params(
        152064, None, gpu_block_v=tloss.LOGITS_GPU_BLOCK_V,
        interpret_block_v=tloss.LOGITS_INTERPRET_BLOCK_V,
    )[0] == default
    case = fixed_case(lengths=[2, 1], vocab=5)
    clean, _, rest = build(case)
    with pytest.raises(ValueError, match="power of two"):
        run_kernel(clean, rest, "fresh", 24)
    # The default plan (a chunk no wider than next_pow2(V)) gives the same sums.
    default_sums, _ = run_kernel(clean, rest, "none", None)
    sums, _ = run_kernel(clean, rest, "none", BLOCK_V)
    torch.testing.assert_close(default_sums, sums, rtol=1e-6, atol=1e-7)


def _bad_call(change):
    case = fixed_case(lengths=[2, 0, 2], vocab=5, mask="none", ignore=False)
    clean, _, rest = build(case)
    kw = {"logits": clean["logits"], **{k: clean[k] for k in TOKEN_ARGS}, **rest, "out": None}
    kw.update(change(kw))
    return lambda: tloss.logits_loss(
        kw["logits"], kw["targets"], kw["old_logp"], kw["advantages"], kw["ref_logp"],
        kw["is_weights"], kw["valid"], kw["offsets"], kw["seq_weight"], kw["lm_weight"],
        kw["params"], kw["temperature"], kw["out"],
    )


BAD_ARGS = {
    "logits_3d": (lambda kw: {"logits": kw["logits"][None]}, "logits"),
    "logits_int": (lambda kw: {"logits": kw["logits"].long()}, "logits"),
    "logits_strided_vocab": (lambda kw: {"logits": kw["logits"].t().contiguous().t()}, "logits"),
    "targets_float": (lambda kw: {"targets": kw["targets"].float()}, "targets"),
    "targets_shape": (lambda kw: {"targets": kw["targets"][:-1]}, "targets"),
    "old_logp_shape": (lambda kw: {"old_logp": kw["old_logp"][:-1]}, "old_logp"),
    "old_logp_dtype": (lambda kw: {"old_logp": kw["old_logp"].double()}, "old_logp"),
    "advantages_none": (lambda kw: {"advantages": None}, "advantages"),
    "ref_logp_dtype": (lambda kw: {"ref_logp": kw["old_logp"].half()}, "ref_logp"),
    "is_weights_shape": (lambda kw: {"is_weights": kw["old_logp"][None]}, "is_weights"),
    "valid_dtype": (lambda kw: {"valid": kw["valid"].float()}, "valid"),
    "offsets_dtype": (lambda kw: {"offsets": kw["offsets"].int()}, "offsets"),
    "offsets_2d": (lambda kw: {"offsets": kw["offsets"][None]}, "offsets"),
    "offsets_no_seq": (lambda kw: {"offsets": kw["offsets"][:1]}, "offsets"),
    "seq_weight_shape": (lambda kw: {"seq_weight": kw["seq_weight"][:-1]}, "seq_weight"),
    "lm_weight_dtype": (lambda kw: {"lm_weight": kw["seq_weight"].double()}, "lm_weight"),
    "params_len": (lambda kw: {"params": kw["params"][:-1]}, "params"),
    "kl_kind": (lambda kw: {"params": [7.0 if i == layout.P_KL_KIND else p
                                       for i, p in enumerate(kw["params"])]}, "P_KL_KIND"),
    "temperature_zero": (lambda kw: {"temperature": 0.0}, "temperature"),
    "temperature_nan": (lambda kw: {"temperature": math.nan}, "temperature"),
    "out_dtype": (lambda kw: {"out": torch.empty_like(kw["logits"], dtype=torch.float64)}, "out"),
    "out_shape": (lambda kw: {"out": torch.empty_like(kw["logits"])[:-1]}, "out"),
    "out_overlaps": (lambda kw: _overlapping(kw["logits"]), "overlap"),
}


def _overlapping(z):
    """logits and an out that overlaps them without being them."""
    buf = torch.cat([z.reshape(-1), z.reshape(-1)])
    return {"logits": buf[: z.numel()].view_as(z), "out": buf[1 : 1 + z.numel()].view_as(z)}


@pytest.mark.parametrize("name", list(BAD_ARGS))
def test_bad_arguments_raise(name):
    change, match = BAD_ARGS[name]
    call = _bad_call(change)
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------------------
# GPU only: compiled kernel at the default launch plan


def _gpu_check(case):
    clean, dirty, rest = build(case, device="cuda")
    sums, grad = run_kernel(clean, rest, "fresh", None)
    check_against_reference(sums, grad, clean, rest, case["dtype"])
    d_sums, d_grad = run_kernel(dirty, rest, "inplace", None)
    assert torch.equal(bits(d_sums), bits(sums)) and torch.equal(bits(d_grad), bits(grad))
    again, _ = run_kernel(clean, rest, "none", None)
    assert torch.equal(bits(again), bits(sums)), "run to run"


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (compiled Triton)")
def test_gpu_big_vocab_bf16():
    """A 152k vocabulary (19 chunks of 8192), a few hundred bf16 rows."""
    lengths = [0, 1, 97, 0, 150, 1, 51]
    _gpu_check(fixed_case(lengths=lengths, vocab=152064, dtype=torch.bfloat16, logits="normal",
                          temperature=0.9, block_v=None, seed=1))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (compiled Triton)")
def test_gpu_one_long_sequence():
    """A single 1M-token sequence: no grid dimension depends on sequences."""
    _gpu_check(fixed_case(lengths=[1 << 20], vocab=100, dtype=torch.float32, block_v=None,
                          seed=2))
