"""``vapo::logits_loss``: log-probs, the PPO/VAPO loss and d loss / d logits in one kernel,
under every backend the registry reports, against the float64 spec.

The spec (``reference_logits_kernel``) is by definition the log-prob forward, the
token-loss kernel and the log-prob backward in sequence; ``tests/test_loss.py`` checks the
public wrapper against an independent composition. Here: each backend's kernel, as the
registry selects it (tests/strategies.py: ``backend_params``, ``kernel_of``), against the
spec run in float64 on the same inputs, on random ragged batches (empty and length-1
sequences, masked rows, ignored targets, -inf logits, vocabularies across Triton's
16-wide chunks and, compiled, the C++ kernel's row blocks up to 70k logits), every term
switched on and off, garbage in invalid rows, in place / fresh / no gradient, strided
rows, offsets past 2^31, the kernels' own argument checks; then the op: layouts, errors,
opcheck and torch.compile. Triton runs with 8- to 32-wide chunks; without a GPU through the
interpreter, on fewer and smaller cases. ``-m gpu`` adds a 152k vocabulary and a 1M-token
sequence for every CUDA backend. What one backend alone has is in test_cpp_kernels.py
(thread counts) and test_triton_kernels.py (launch plans).

Exact discrete decisions. The log-probs are computed by the kernel (float32 for all but
float64 logits), so unlike the token-loss tests the inputs cannot sit exactly on a clip
bound. Instead ``old_logp`` and ``ref_logp`` are built from the exact float64 log-probs
of the logits and moved, where the log-ratio lies within MARGIN of a bound it is
compared with (ratio clip bounds, dual clip, the ratio clamp, |diff| = 0 for abs, the
k3 clamps), until it does not. MARGIN is far above the kernels' log-prob error (about
1e-6 per unit of row scale in float32), so every clip flag, count, branch and clamp
gradient is the same in float32 and float64, and what is left is rounding, checked
against per-token scales (see ``sum_tolerances`` and ``grad_tolerance``).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vapo_kernels as vk
from vapo_kernels import _loss_layout as layout
from vapo_kernels._loss_layout import NUM_SUMS
from vapo_kernels.ops import loss_spec
from vapo_kernels.ops import token_logprobs as LP
from vapo_kernels.ops.logits_loss import reference_logits_kernel
from vapo_kernels.ops.token_logprobs import reference_forward

import _dominant as dominant
from strategies import (
    GARBAGE, acc_dtype, backend_cases, backend_params, bits, examples, interpreted, kernel_of,
    random_lm_weights, random_sequence_weights, rows_beyond_int32,
)

F64 = torch.float64
BACKENDS = backend_params("logits_loss")
# GPU-only checks at large shapes: the CUDA devices of BACKENDS (none without a GPU).
ON_GPU = [p for p in BACKENDS if p.values[1] == "cuda"]
BLOCK_V = 16
# Vocabularies around chunk boundaries (BLOCK_V +- 1, several chunks) and the degenerate V=1;
# for the compiled backends also rows of several C++ row blocks, and rows alone in one.
EDGE_V = [1, 2, BLOCK_V - 1, BLOCK_V, BLOCK_V + 1, 2 * BLOCK_V + 1, 4 * BLOCK_V - 1]
BIG_V = [1500, 70_000]
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
KL_KINDS = [None, "k1", "abs", "k2", "k3", "low_var_kl", "k1+", "abs+", "k2+", "k3+"]
COUNT_SUMS = (
    layout.S_TOKENS, layout.S_CLIP_LOW, layout.S_CLIP_HIGH, layout.S_DUAL_CLIP, layout.S_VF_CLIP,
)
TOKEN_ARGS = ("old_logp", "advantages", "ref_logp", "is_weights")
# Per-unit-of-scale rounding of the accumulation dtype (as in test_logprobs.py), and
# a safety factor for the few operations that compound it.
ACC_RTOL = {torch.float32: 1e-6, torch.float64: 1e-13}
SAFETY = 8.0
# Distance (in log-ratio units) every compared quantity keeps from its bound.
MARGIN = 2e-3

# The Triton interpreter evaluates lanes that a kernel then discards with numpy, which
# warns; the outputs themselves are checked.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.usefixtures("extension_built"),  # on CI a broken C++ build fails loudly
]





def grid(x: torch.Tensor) -> torch.Tensor:
    """Multiples of 2^-10: advantages and weights exact in every dtype used."""
    return (x * 1024).round() / 1024


# --------------------------------------------------------------------------------------
# Cases


@st.composite
def cases(draw, small=False):
    """A random ragged batch of logits and every option of the contract. ``small``:
    vocabularies of a few 16-wide chunks (the interpreter); otherwise also 1500 and 70k
    (the C++ kernel's row blocks of one row), on a few rows."""
    vocab = st.one_of(st.sampled_from(EDGE_V), st.integers(1, 4 * BLOCK_V))
    if not small:
        vocab = st.one_of(vocab, st.sampled_from(BIG_V))
    case = {
        # Packed sequences, empty and length-1 ones included.
        "lengths": draw(st.lists(st.sampled_from([0, 0, 1, 1, 2, 3, 5, 7]), max_size=5)),
        "vocab": draw(vocab),
        "dtype": draw(st.sampled_from(DTYPES)),
        "temperature": draw(st.sampled_from([1.0, 0.7, 2.5, 0.5])),
        "logits": draw(st.sampled_from(["normal", "wide", "neg_inf"])),
        "mask": draw(st.sampled_from(["none", "random", "random", "all_false"])),
        "ignore": draw(st.booleans()),
        "garbage": draw(st.sampled_from(GARBAGE)),
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
        "block_v": draw(st.sampled_from([BLOCK_V, BLOCK_V, 8, 2 * BLOCK_V])),  # Triton's plan
        "seed": draw(st.integers(0, 2**31 - 1)),
    }
    if case["vocab"] in BIG_V:  # keep the case fast: few rows for big rows
        case["lengths"] = [min(k, 3) for k in case["lengths"][:2]]
    return case


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


def build(case, device="cpu"):
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
        seq_weight = random_sequence_weights(num_seqs, gen, case["weights"] == "some_zero")
    lm_weight = None
    if case["lm"]:
        lm_weight = random_lm_weights(num_seqs, gen).to(acc)

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


@contextlib.contextmanager
def triton_chunks(backend, block_v):
    """Triton's kernel with ``block_v``-wide vocabulary chunks (the registry's kernel
    takes the default plan, a chunk no wider than the row); other backends have no plan."""
    if backend != "triton" or block_v is None:
        yield
        return
    from vapo_kernels.triton import loss as tloss

    was = tloss.LOGITS_INTERPRET_BLOCK_V, tloss.LOGITS_GPU_BLOCK_V
    tloss.LOGITS_INTERPRET_BLOCK_V = tloss.LOGITS_GPU_BLOCK_V = block_v
    try:
        yield
    finally:
        tloss.LOGITS_INTERPRET_BLOCK_V, tloss.LOGITS_GPU_BLOCK_V = was


def run_kernel(backend, device, x, rest, out_mode, block_v=BLOCK_V):
    """(sums, gradient or None) of the backend's kernel; in place over a copy of the
    logits."""
    z = x["logits"]
    if out_mode == "inplace":
        z = z.clone()
        out = z
    elif out_mode == "fresh":
        out = torch.empty_like(z)
    else:
        out = None
    kernel = kernel_of("logits_loss", backend, device)
    with triton_chunks(backend, block_v):
        sums = kernel(
            z, rest["targets"], *(x[k] for k in TOKEN_ARGS), rest["valid"], rest["offsets"],
            rest["seq_weight"], rest["lm_weight"], rest["params"], rest["temperature"], out,
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
    # Below the normal range relative precision is lost (see test_logprobs.py).
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


def check_against_reference(sums, grad, x, rest, dtype, device, what=""):
    acc = acc_dtype(dtype)
    exp_sums, exp_grad = run_reference64(x, rest, with_grad=grad is not None)
    t = token_scales(x, rest)
    assert sums.dtype == acc and sums.shape == (NUM_SUMS,) and sums.device.type == device
    assert_sums_match(sums, exp_sums, sum_tolerances(t, ACC_RTOL[acc]), dtype, what)
    if grad is not None:
        assert grad.dtype == dtype and grad.device.type == device
        assert_grad_match(grad, exp_grad, grad_tolerance(x, rest, t, exp_grad, dtype), what)
        assert (grad.cpu()[~rest["valid"].cpu()] == 0).all(), "invalid rows must be zero"


# --------------------------------------------------------------------------------------
# The kernel contract against the float64 spec


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kernel_matches_float64_spec(backend, device, poisoned):
    """Random ragged batches; then garbage in the invalid rows (logits and token inputs),
    through the case's output mode (none / fresh / in place): every output bit the same
    as on clean inputs."""
    small = interpreted(backend, device)

    @examples(backend, device, cpu=80, interpreted=120, reference=20)
    @given(case=cases(small))
    def check(case):
        clean, dirty, rest = build(case, device)
        block_v = case["block_v"]
        with poisoned():  # the gradient buffer and the partial sums: NaN until written
            sums, grad = run_kernel(backend, device, clean, rest, "fresh", block_v)
        check_against_reference(sums, grad, clean, rest, case["dtype"], device)
        with poisoned():
            d_sums, d_grad = run_kernel(backend, device, dirty, rest, case["out"], block_v)
        assert torch.equal(bits(d_sums), bits(sums))
        if case["out"] != "none":
            assert torch.equal(bits(d_grad), bits(grad))

    check()


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


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("switch", TERM_SWITCHES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_every_term_on_and_off(switch, backend, device, poisoned):
    """Each term (KL kinds 1..4 with and without straight-through, dual clip, importance
    weights, entropy coefficient, LM term) toggled on a fixed ragged case; garbage in the
    invalid rows, in place, and without a gradient: the same sums, bit for bit."""
    case = fixed_case(**switch)
    clean, dirty, rest = build(case, device)
    with poisoned():
        sums, grad = run_kernel(backend, device, clean, rest, "fresh")
    check_against_reference(sums, grad, clean, rest, case["dtype"], device, what=str(switch))
    d_sums, d_grad = run_kernel(backend, device, dirty, rest, "inplace")
    assert torch.equal(bits(d_sums), bits(sums)) and torch.equal(bits(d_grad), bits(grad))
    alone, none = run_kernel(backend, device, clean, rest, "none")
    assert none is None and torch.equal(bits(alone), bits(sums))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_clip_flags_are_exercised(backend, device):
    """The fixed case really takes the clip-low, clip-high and dual-clip branches."""
    case = fixed_case(lengths=[9, 0, 1, 12, 1, 9], spread="wide", ratio_log_clamp=20.0,
                      clip_low=0.2, clip_high=0.28, dual_clip=1.5, mask="none", ignore=False,
                      zero_adv=False)
    clean, _, rest = build(case, device)
    sums, grad = run_kernel(backend, device, clean, rest, "fresh", 8)
    check_against_reference(sums, grad, clean, rest, case["dtype"], device)
    assert sums[layout.S_CLIP_LOW] > 0 and sums[layout.S_CLIP_HIGH] > 0 and sums[layout.S_DUAL_CLIP] > 0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_many_short_sequences(backend, device):
    """Runs of empty and length-1 sequences (Triton's binary search takes several steps
    and must skip repeated offsets), one longer sequence, trailing empties; every
    sequence its own weight."""
    lengths = [0, 9, 1, 1, 0, 1, 2, 1, 0, 0, 1, 5, 1, 0, 1, 1, 1, 0, 0]
    case = fixed_case(lengths=lengths, vocab=5, mask="random", weights="random", block_v=4)
    clean, _, rest = build(case, device)
    # Weights that tell every sequence apart.
    num_seqs = len(lengths)
    rest["seq_weight"] = (torch.arange(1, num_seqs + 1, dtype=torch.float32) / 7).to(device)
    rest["lm_weight"] = (torch.arange(num_seqs, dtype=torch.float32) % 4 / 5).to(device)
    sums, grad = run_kernel(backend, device, clean, rest, "fresh", 4)
    check_against_reference(sums, grad, clean, rest, torch.float32, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_one_long_sequence_of_many_row_blocks(backend, device, poisoned):
    """3000 rows of one sequence (the C++ kernel's row blocks hold a few hundred rows of
    64 logits; 64 rows, one program each, in the interpreter)."""
    n = 64 if interpreted(backend, device) else 3000
    case = fixed_case(lengths=[n], vocab=64, mask="random", ignore=False, kl=None, isw=False,
                      lm=False, dual_clip=None, entropy_coef=0.0, spread="small", seed=9)
    clean, _, rest = build(case, device)
    with poisoned():
        sums, grad = run_kernel(backend, device, clean, rest, "fresh", 64)
    check_against_reference(sums, grad, clean, rest, torch.float32, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_all_invalid_and_empty(backend, device, poisoned):
    """No valid row (NaN everywhere), or no row at all: zero sums, +-inf ratio bounds and
    every gradient element written as 0, in place and not."""
    kernel = kernel_of("logits_loss", backend, device)
    params = loss_spec.loss_params(dual_clip=3.0, kl_kind="k3", entropy_coef=0.1, lm_coef=0.1)
    expected = torch.zeros(NUM_SUMS)
    expected[layout.S_RATIO_MIN], expected[layout.S_RATIO_MAX] = math.inf, -math.inf
    for n, offsets in ((5, [0, 2, 5]), (3, [0, 0, 3, 3]), (0, [0, 0, 0]), (0, [0])):
        s = len(offsets) - 1
        z = torch.full((n, 7), math.nan, device=device)
        y = torch.zeros(n, dtype=torch.int64, device=device)
        tok = torch.full((n,), math.nan, device=device)
        valid = torch.zeros(n, dtype=torch.bool, device=device)
        offs = torch.tensor(offsets, device=device)
        sw = torch.ones(s, device=device)
        for inplace in (False, True):
            with poisoned():
                out = z.clone() if inplace else torch.empty_like(z)
                with triton_chunks(backend, 4):
                    sums = kernel(
                        out if inplace else z, y, tok, tok, tok, tok, valid, offs, sw, sw, params,
                        1.0, out,
                    )
            assert sums.dtype == torch.float32 and torch.equal(sums.cpu(), expected)
            assert (out == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ignored_target_on_a_valid_row_reads_only_its_row(backend, device):
    """Outside the contract (the op folds target -100 into the row's validity), but no
    read outside the row: the logits follow NaN (then 1e30) in their buffer, and a valid
    row with target -100 at the start must see neither (what such a row contributes is
    each backend's own; Triton's is in test_triton_kernels.py)."""
    case = fixed_case(mask="none", ignore=False, logits="normal")
    clean, _, rest = build(case, device)
    y = rest["targets"].clone()
    y[0] = y[2] = -100
    n, vocab = clean["logits"].shape
    results = []
    for junk in (math.nan, 1e30):
        buf = torch.full((256 + n * vocab,), junk, device=device)
        z = buf[256:].view(n, vocab)
        z.copy_(clean["logits"])
        results.append(run_kernel(backend, device, dict(clean, logits=z), dict(rest, targets=y), "fresh"))
    (sums, grad), (again, again_grad) = results
    assert torch.isfinite(sums).all() and torch.isfinite(grad).all()
    assert torch.equal(bits(sums), bits(again)) and torch.equal(bits(grad), bits(again_grad))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_strided_row_views(inplace, backend, device, poisoned):
    """Logits that are every other row of a wider buffer, at an offset: the same bits as
    from contiguous logits; the gradient lands only in the view."""
    case = fixed_case(dtype=torch.float64, lengths=[2, 0, 3], mask="none", ignore=False)
    clean, _, rest = build(case, device)
    n, vocab = clean["logits"].shape
    buf = torch.randn(2 * n, vocab + 11, dtype=torch.float64, device=device)
    view = buf[::2, 4 : 4 + vocab]
    view.copy_(clean["logits"])
    before = buf.clone()
    if inplace:
        out = view
    else:
        with poisoned():
            out = torch.empty(n, vocab, dtype=torch.float64, device=device)
    with triton_chunks(backend, BLOCK_V):
        sums = kernel_of("logits_loss", backend, device)(
            view, rest["targets"], *(clean[k] for k in TOKEN_ARGS), rest["valid"],
            rest["offsets"], rest["seq_weight"], rest["lm_weight"], rest["params"],
            rest["temperature"], out,
        )
    exp_sums, exp_grad = run_kernel(backend, device, clean, rest, "fresh")
    assert torch.equal(bits(sums), bits(exp_sums))
    assert torch.equal(bits(out), bits(exp_grad))
    untouched = torch.ones_like(buf, dtype=torch.bool)
    untouched[::2, 4 : 4 + vocab] = not inplace
    assert torch.equal(buf[untouched], before[untouched])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_row_offsets_are_int64(backend, device):
    """Rows more than 2^31 elements into the buffer, on CPU: a (3, V) fp16 view with a
    row stride of 2^30 + 64, so row 2 starts past int32; only rows 0 and 2 are touched
    (row 1 is invalid and written with zeros), so the rest of the 4 GiB costs nothing."""
    if device != "cpu":
        pytest.skip("a CPU buffer that is mostly never touched; the GPU tests cover large buffers")
    kernel = kernel_of("logits_loss", backend, device)
    vocab = 3 * BLOCK_V + 1
    z = rows_beyond_int32(vocab)
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
    with triton_chunks(backend, BLOCK_V):
        exp = kernel(dense, *args, exp_grad)
        got = kernel(z, *args, z)  # in place: stores 2^31 out too
    assert torch.equal(got, exp)
    assert torch.equal(bits(z), bits(exp_grad))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device):
    case = fixed_case(lengths=[7, 1, 0, 9], dtype=torch.bfloat16)
    clean, _, rest = build(case, device)
    a = run_kernel(backend, device, clean, rest, "fresh")
    b = run_kernel(backend, device, clean, rest, "fresh")
    for u, v in zip(a, b):
        assert torch.equal(bits(u), bits(v))


# --------------------------------------------------------------------------------------
# Direct callers of a kernel get errors, not out-of-bounds reads. The spec (reference)
# checks nothing: the op checks its inputs before any kernel runs. Each entry: the change
# to good arguments, and the message each backend's own checks raise (the C++ binding a
# RuntimeError, Triton a ValueError).

ERRORS = {"cpp": RuntimeError, "triton": ValueError}


def _overlapping(z):
    """logits and an out that overlaps them without being them."""
    buf = torch.cat([z.reshape(-1), z.reshape(-1)])
    return {"logits": buf[: z.numel()].view_as(z), "out": buf[1 : 1 + z.numel()].view_as(z)}


def _both(cpp, triton=None):
    return {"cpp": cpp, "triton": cpp if triton is None else triton}


BAD_ARGS = {
    "logits_3d": (lambda kw: {"logits": kw["logits"][None]}, _both("logits")),
    "logits_int": (lambda kw: {"logits": kw["logits"].long()}, _both("logits")),
    "logits_strided_vocab": (lambda kw: {"logits": kw["logits"].t().contiguous().t()}, _both("logits")),
    "targets_float": (lambda kw: {"targets": kw["targets"].float()}, _both("targets")),
    "targets_shape": (lambda kw: {"targets": kw["targets"][:-1]}, _both("targets")),
    "targets_out_of_range": (lambda kw: {"targets": kw["targets"] + 5}, {"cpp": "targets"}),
    "old_logp_shape": (lambda kw: {"old_logp": kw["old_logp"][:-1]}, _both("old_logp")),
    "old_logp_dtype": (lambda kw: {"old_logp": kw["old_logp"].double()}, _both("old_logp")),
    "advantages_short": (lambda kw: {"advantages": kw["advantages"][:3]}, _both("advantages")),
    "advantages_none": (lambda kw: {"advantages": None}, {"triton": "advantages"}),
    "ref_logp_dtype": (lambda kw: {"ref_logp": kw["old_logp"].half()}, _both("ref_logp")),
    "is_weights_shape": (lambda kw: {"is_weights": kw["old_logp"][None]}, _both("is_weights")),
    "valid_dtype": (lambda kw: {"valid": kw["valid"].float()}, _both("valid")),
    "valid_int": (lambda kw: {"valid": kw["valid"].int()}, _both("valid")),
    "offsets_dtype": (lambda kw: {"offsets": kw["offsets"].int()}, _both("offsets")),
    "offsets_2d": (lambda kw: {"offsets": kw["offsets"][None]}, _both("offsets")),
    "offsets_no_seq": (lambda kw: {"offsets": kw["offsets"][:1]}, _both("offsets")),
    "offsets_decreasing": (lambda kw: {"offsets": torch.tensor([0, 3, 2, 4])}, {"cpp": "non-decreasing"}),
    "offsets_past_n": (lambda kw: {"offsets": torch.tensor([0, 2, 2, 5])}, {"cpp": "end at N"}),
    "seq_weight_shape": (lambda kw: {"seq_weight": kw["seq_weight"][:-1]}, _both("seq_weight")),
    "lm_weight_dtype": (lambda kw: {"lm_weight": kw["seq_weight"].double()}, _both("lm_weight")),
    "params_len": (lambda kw: {"params": kw["params"][:-1]}, _both("params")),
    "kl_kind": (lambda kw: {"params": [7.0 if i == layout.P_KL_KIND else p
                                       for i, p in enumerate(kw["params"])]}, _both("P_KL_KIND")),
    "temperature_zero": (lambda kw: {"temperature": 0.0}, _both("temperature")),
    "temperature_nan": (lambda kw: {"temperature": math.nan}, _both("temperature")),
    "out_dtype": (lambda kw: {"out": torch.empty_like(kw["logits"], dtype=torch.float64)}, _both("out")),
    "out_shape": (lambda kw: {"out": torch.empty_like(kw["logits"])[:-1]}, _both("out")),
    "out_overlaps": (lambda kw: _overlapping(kw["logits"]), _both("overlap")),
}


@pytest.mark.parametrize("backend,device,name", backend_cases("logits_loss", {k: v[1] for k, v in BAD_ARGS.items()}))
def test_bad_arguments_raise(backend, device, name):
    change, messages = BAD_ARGS[name]
    case = fixed_case(lengths=[2, 0, 2], vocab=5, mask="none", ignore=False)
    clean, _, rest = build(case, device)
    kw = {"logits": clean["logits"], **{k: clean[k] for k in TOKEN_ARGS}, **rest, "out": None}
    kw.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in change(kw).items()})
    with pytest.raises(ERRORS[backend], match=messages[backend]):
        kernel_of("logits_loss", backend, device)(
            kw["logits"], kw["targets"], kw["old_logp"], kw["advantages"], kw["ref_logp"],
            kw["is_weights"], kw["valid"], kw["offsets"], kw["seq_weight"], kw["lm_weight"],
            kw["params"], kw["temperature"], kw["out"],
        )


# --------------------------------------------------------------------------------------
# GPU only: every CUDA backend's compiled kernel at the default launch plan


def _gpu_check(backend, device, case):
    clean, dirty, rest = build(case, device=device)
    sums, grad = run_kernel(backend, device, clean, rest, "fresh", None)
    check_against_reference(sums, grad, clean, rest, case["dtype"], device)
    d_sums, d_grad = run_kernel(backend, device, dirty, rest, "inplace", None)
    assert torch.equal(bits(d_sums), bits(sums)) and torch.equal(bits(d_grad), bits(grad))
    again, _ = run_kernel(backend, device, clean, rest, "none", None)
    assert torch.equal(bits(again), bits(sums)), "run to run"


@pytest.mark.gpu
@pytest.mark.parametrize("backend,device", ON_GPU)
def test_gpu_big_vocab_bf16(backend, device):
    """A 152k vocabulary (19 chunks of 8192), a few hundred bf16 rows."""
    lengths = [0, 1, 97, 0, 150, 1, 51]
    _gpu_check(backend, device, fixed_case(
        lengths=lengths, vocab=152064, dtype=torch.bfloat16, logits="normal", temperature=0.9,
        block_v=None, seed=1,
    ))


@pytest.mark.gpu
@pytest.mark.parametrize("backend,device", ON_GPU)
def test_gpu_one_long_sequence(backend, device):
    """A single 1M-token sequence: no grid dimension depends on sequences."""
    _gpu_check(backend, device, fixed_case(
        lengths=[1 << 20], vocab=100, dtype=torch.float32, block_v=None, seed=2,
    ))


# --------------------------------------------------------------------------------------
# The op and the wrapper


def _op_batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    B, T, V = 3, 5, 19
    logits = torch.randn(B, T, V, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[1, 2] = -100
    old = -torch.rand(B, T, generator=g) * 3
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    return logits, targets, old, adv, mask


def _op_args(logits, targets, old, adv, mask, **over):
    args = dict(
        logits=logits, targets=targets, old_logp=old, advantages=adv, ref_logp=None,
        is_weights=None, mask=mask, cu_seqlens=None, positive=None,
        params=loss_spec.loss_params(entropy_coef=0.01), temperature=1.0, agg="token-mean",
        global_tokens=None, global_seqs=None, global_positive_tokens=None, dp_size=1.0,
        loss_scale_factor=None,
    )
    args.update(over)
    return args


@pytest.mark.parametrize("backend", vk.available_backends("loss", "cpu"))
def test_packed_equals_padded(backend):
    logits, targets, old, adv, mask = _op_batch(1)
    B, T, V = logits.shape
    # Padded (B, T, V) + mask vs packed (N, V) + cu_seqlens of the same tokens.
    lengths = [T, 2, 4]
    keep = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        keep[b, :n] = True
    pm = mask & keep
    pad, _ = vk.policy_loss_from_logits(logits, targets, old, adv, pm, backend=backend)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    pk, _ = vk.policy_loss_from_logits(
        logits[keep], targets[keep], old[keep], adv[keep], mask[keep], cu, backend=backend
    )
    torch.testing.assert_close(pk, pad, rtol=1e-6, atol=1e-7)


def test_op_errors_name_the_argument():
    logits, targets, old, adv, mask = _op_batch(2)
    f = vk.policy_loss_from_logits
    with pytest.raises(ValueError, match="old_logp"):
        f(logits, targets, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        f(logits, targets, old, adv[:2], mask)
    with pytest.raises(ValueError, match="targets"):
        f(logits, targets.clamp(max=5) + 30, old, adv, mask)
    with pytest.raises(ValueError, match="agg"):
        f(logits, targets, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match="clip_low"):
        f(logits, targets, old, adv, mask, clip_low=-0.1)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_in_a_valid_row_is_an_error(backend, device):
    """The op screens its inputs through the loss and the logits gradient: a NaN logit
    of a valid row, or a NaN old log-prob, must reach them (in place too)."""
    logits, targets, old, adv, mask = (t.to(device) for t in _op_batch(2))
    f = vk.policy_loss_from_logits
    bad = logits.clone()
    bad[0, 0, 3] = float("nan")
    m = mask.clone()
    m[0, 0] = True
    targets = targets.clone()
    targets[0, 0] = 1
    with pytest.raises(ValueError, match="logits"):
        f(bad, targets, old, adv, m, backend=backend)
    x = bad.clone().requires_grad_()
    with pytest.raises(ValueError, match="logits"):
        f(x * 1.0, targets, old, adv, m, inplace_backward=True, backend=backend)
    nan_old = old.clone()
    nan_old[0, 0] = float("nan")
    with pytest.raises(ValueError, match="old_logp"):
        f(logits, targets, nan_old, adv, m, backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    logits, targets, old, adv, mask = (t.to(device) for t in _op_batch(3, F64))
    args = _op_args(logits, targets, old.double(), adv.double(), mask)
    for need_grad in (True, False):
        torch.library.opcheck(
            torch.ops.vapo.logits_loss.default, (*args.values(), need_grad, backend)
        )
    torch.library.opcheck(
        torch.ops.vapo.logits_loss_.default,
        (*{**args, "logits": logits.clone()}.values(), True, backend),
    )


def test_torch_compile_fullgraph():
    logits, targets, old, adv, mask = _op_batch(4)
    params = loss_spec.loss_params(entropy_coef=0.01)

    def step(x):
        loss, sums, grad = torch.ops.vapo.logits_loss(
            x, targets, old, adv, None, None, mask, None, None, params, 1.0, "token-mean",
            None, None, None, 1.0, None, True, "",
        )
        return loss * 2, sums, grad

    eager = step(logits)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(logits)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_wrapper_metrics_and_gradient_scale_with_upstream():
    logits, targets, old, adv, mask = _op_batch(5)
    x = logits.clone().requires_grad_()
    loss, metrics = vk.policy_loss_from_logits(x, targets, old, adv, mask, entropy_coef=0.01)
    (3.0 * loss).backward()
    y = logits.clone().requires_grad_()
    lp, ent = LP.token_logprobs(y, targets, mask=mask, return_entropy=True)
    want, wm = vk.vapo_loss(lp, old, adv, mask & (targets != -100), entropy=ent,
                           entropy_coef=0.01, lm_coef=0.0)
    (3.0 * want).backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)
    assert set(metrics) == set(wm)
    for k in wm:
        torch.testing.assert_close(metrics[k], wm[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_params("loss"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.3, 0.7])
def test_gradient_at_dominant_logits_is_as_exact_as_elsewhere(backend, device, dtype, temperature):
    """A logit of +-1e4 among ordinary ones, and rows of only large logits: the fused
    loss's logits gradient, under every backend, as close to the float64 reference as on
    ordinary rows (tests/_dominant.py says why)."""
    got, want, kinds = dominant.policy_loss_grads(dtype, temperature, backend, device)
    assert got.dtype == dtype
    # The Triton interpreter's float32 -> bf16 cast truncates (a GPU rounds to nearest).
    rounding = 1.0 if (backend, device) == ("triton", "cpu") else 0.5
    dominant.assert_grad_exact(got, want, kinds, dtype, backend, rounding)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mask", ["random", "none"])
def test_no_seq_weight_is_the_token_mean(mask, backend, device):
    """``seq_weight=None`` is the token mean, as for the token loss: every sequence weighs
    1 / (valid rows), in float64 rounded once - bit for bit the call with those weights."""
    clean, _, rest = build(fixed_case(mask=mask), device)
    valid = int(rest["valid"].sum())
    acc = rest["seq_weight"].dtype
    weights = torch.full(rest["seq_weight"].shape, 1.0 / max(1, valid), dtype=torch.float64)
    want = run_kernel(backend, device, clean, dict(rest, seq_weight=weights.to(acc).to(device)), "fresh")
    got = run_kernel(backend, device, clean, dict(rest, seq_weight=None), "fresh")
    for g, w in zip(got, want):
        assert torch.equal(g, w)
