"""The PPO/VAPO losses under every backend the registry reports, against independent
float64 autograd code.

Every backend writes every gradient by hand (the reference is the kernels' contract).
Here each term is written again the way peers write it (torch ops, autograd for the
gradient, agg_loss by its definition), in float64, and each backend must agree with it
(tests/strategies.py lists the backends). The kernel contract (``token_loss`` called
directly, every backend against the float64 spec on many random cases) is in
test_loss_kernel.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vapo_kernels as vk
from vapo_kernels import _loss_layout as layout
from vapo_kernels.ops import loss_spec

from strategies import assert_compiled_matches_eager, cu_seqlens, examples, ragged_lengths

F64 = torch.float64
# Every check that runs a loss op runs it under each backend the registry reports.
ON_CPU = vk.available_backends("loss", "cpu")

# The Triton interpreter evaluates lanes that a kernel then discards (a fully masked
# sequence's 0 / 0 mean) with numpy, which warns; the outputs themselves are checked.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")


@pytest.fixture(autouse=True)
def _small_triton_chunks(monkeypatch):
    # 16-wide vocabulary chunks in the interpreter: the from-logits losses' rows cross them.
    from vapo_kernels.triton import loss as triton_loss

    monkeypatch.setattr(triton_loss, "LOGITS_INTERPRET_BLOCK_V", 16)


# --------------------------------------------------------------------------------------
# Independent float64 model: per-token terms as peers write them + agg by definition.


def model_agg(mat, mask, agg, dp=1.0, g_tokens=None, g_seqs=None, scale=None):
    """verl's agg_loss on padded (B, T), 0 instead of 0/0."""
    m = mask.to(F64)
    mat = torch.where(mask, mat, 0.0)
    counts = m.sum(-1)
    if agg == "token-mean":
        den = counts.sum() if g_tokens is None else g_tokens
        return mat.sum() / den * dp if den > 0 else mat.sum() * 0
    if agg == "token-sum":
        return mat.sum() * dp
    seqs = (counts > 0).sum() if g_seqs is None else g_seqs
    if seqs == 0:
        return mat.sum() * 0
    if agg == "seq-mean-token-mean":
        per = torch.where(counts > 0, mat.sum(-1) / counts.clamp(min=1), 0.0)
        return per.sum() / seqs * dp
    out = mat.sum() / seqs * dp
    if agg == "seq-mean-token-sum-norm":
        out = out / (mask.shape[-1] if scale is None else scale)
    return out


def model_policy(logp, old, adv, lo=0.2, hi=0.28, c=None, clamp=20.0):
    ratio = torch.exp(torch.clamp(logp - old, -clamp, clamp))
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - lo, 1 + hi)
    out = torch.maximum(l1, l2)
    if c is not None:
        out = torch.where(adv < 0, torch.min(out, -adv * c), out)
    return out


def model_value(v, old, ret, eps=0.5, form="verl"):
    if eps is None:
        return 0.5 * (v - ret) ** 2
    if form == "verl":
        vc = torch.max(torch.min(v, old + eps), old - eps)
    else:
        vc = old + (v - old).clamp(-eps, eps)
    return 0.5 * torch.max((v - ret) ** 2, (vc - ret) ** 2)


def random_batch(seed, B=4, T=9, p_mask=0.3, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=F64) * 3
    old = logp + scale * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > p_mask
    return logp, old, adv, mask, g


def grads_of(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    got = torch.autograd.grad(out, leaves, allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if gr is None else gr for t, gr in zip(tensors, got)]


# --------------------------------------------------------------------------------------
# Policy


@pytest.mark.parametrize("agg", loss_spec.AGG_MODES)
@pytest.mark.parametrize("dual", [None, 3.0])
@pytest.mark.parametrize("backend", ON_CPU)
def test_policy_matches_model(backend, agg, dual):
    logp, old, adv, mask, _ = random_batch(1)
    mask[2] = False  # a fully masked sequence
    kw = dict(dp=2.0, g_tokens=57.0, g_seqs=7.0) if agg != "token-sum" else dict(dp=2.0)

    def ours(lp):
        loss, _ = vk.policy_loss(
            lp,
            old,
            adv,
            mask,
            dual_clip=dual,
            agg=agg,
            dp_size=2,
            global_tokens=kw.get("g_tokens"),
            global_seqs=kw.get("g_seqs"),
            backend=backend,
        )
        return loss

    def model(lp):
        return model_agg(model_policy(lp, old, adv, c=dual), mask, agg, **kw)

    want, (g_want,) = grads_of(model, logp)
    got, (g_got,) = grads_of(ours, logp)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ON_CPU)
def test_policy_metrics_match_their_definitions(backend):
    logp, old, adv, mask, _ = random_batch(2, B=6, T=40, scale=0.6)
    _, m = vk.policy_loss(logp, old, adv, mask, dual_clip=3.0, backend=backend)
    lr = torch.clamp(logp - old, -20, 20)
    r = lr.exp()
    l1, l2 = -adv * r, -adv * r.clamp(0.8, 1.28)
    clipped = (l2 > l1) & mask
    n = mask.sum()
    assert m["tokens"] == n
    torch.testing.assert_close(m["clipfrac"], clipped.sum().double() / n, rtol=0, atol=0)
    torch.testing.assert_close(
        m["clipfrac_high"], (clipped & (r > 1.28)).sum().double() / n, rtol=0, atol=0
    )
    torch.testing.assert_close(
        m["clipfrac_low"], (clipped & (r < 0.8)).sum().double() / n, rtol=0, atol=0
    )
    assert m["clipfrac_low"] > 0 and m["clipfrac_high"] > 0
    dual = (adv < 0) & (torch.maximum(l1, l2) > -adv * 3.0) & mask
    torch.testing.assert_close(m["dual_clipfrac"], dual.sum().double() / n, rtol=0, atol=0)
    torch.testing.assert_close(m["approx_kl"], (-lr)[mask].mean(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(m["approx_kl_k3"], (r - 1 - lr)[mask].mean(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(m["ratio_mean"], r[mask].mean(), rtol=1e-12, atol=0)
    assert m["ratio_min"] == r[mask].min() and m["ratio_max"] == r[mask].max()


@pytest.mark.parametrize("backend", ON_CPU)
def test_dual_clip_bounds_negative_advantages(backend):
    # A < 0 and a huge ratio: plain PPO grows without bound, dual clip caps at -A*c.
    logp = torch.tensor([[0.0, 0.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[-5.0, -5.0]], dtype=F64)
    adv = torch.tensor([[-1.0, 1.0]], dtype=F64)
    loss, m = vk.policy_loss(logp, old, adv, dual_clip=3.0, agg="token-sum", backend=backend)
    # token 0: min(max(e^5, 0.8), 3) = 3 ; token 1: max(-e^5, -1.28) = -1.28
    torch.testing.assert_close(loss, torch.tensor(3.0 - 1.28, dtype=F64))
    loss.backward()
    assert logp.grad.abs().max() == 0  # both tokens are clipped: no gradient
    assert m["dual_clipfrac"] == 0.5 and m["clipfrac_high"] == 0.5


@pytest.mark.parametrize("backend", ON_CPU)
def test_ratio_clamp_extremes_are_finite(backend):
    logp = torch.tensor([[0.0, -1000.0, 0.0]], dtype=torch.float32, requires_grad=True)
    old = torch.tensor([[-1000.0, 0.0, 0.0]], dtype=torch.float32)
    adv = torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float32)
    loss, m = vk.policy_loss(logp, old, adv, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert m["ratio_max"] == pytest.approx(math.exp(20), rel=1e-6)
    assert m["ratio_min"] == pytest.approx(math.exp(-20), rel=1e-6)
    assert logp.grad[0, 2] == 0  # A = 0: no gradient


@pytest.mark.parametrize("backend", ON_CPU)
def test_is_weights_scale_loss_and_gradient(backend):
    logp, old, adv, mask, g = random_batch(3)
    w = torch.rand(logp.shape, generator=g, dtype=F64)

    def ours(lp):
        return vk.policy_loss(lp, old, adv, mask, is_weights=w, backend=backend)[0]

    def model(lp):
        return model_agg(model_policy(lp, old, adv) * w, mask, "token-mean")

    want, (gw,) = grads_of(model, logp)
    got, (gg,) = grads_of(ours, logp)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gg, gw, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------
# Value, KL, entropy, LM


@pytest.mark.parametrize("form", ["verl", "openrlhf"])
@pytest.mark.parametrize("eps", [None, 0.2])
@pytest.mark.parametrize("backend", ON_CPU)
def test_value_matches_model(backend, form, eps):
    g = torch.Generator().manual_seed(4)
    v, old, ret = (torch.randn(5, 8, generator=g, dtype=F64) for _ in range(3))
    mask = torch.rand(5, 8, generator=g) > 0.3

    def ours(x):
        return vk.value_loss(x, old, ret, mask, value_clip=eps, value_clip_form=form, backend=backend)[0]

    def model(x):
        return model_agg(model_value(x, old, ret, eps, form), mask, "token-mean")

    want, (gw,) = grads_of(model, v)
    got, (gg,) = grads_of(ours, v)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gg, gw, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ON_CPU)
def test_value_clip_tie_splits_gradient_like_torch(backend):
    # v exactly at old + eps: torch.min's tie rule halves the clipped branch's gradient.
    v = torch.tensor([[1.5, 0.0]], dtype=F64)
    old = torch.tensor([[1.0, 0.0]], dtype=F64)
    ret = torch.tensor([[3.0, 0.0]], dtype=F64)

    def ours(x):
        return vk.value_loss(x, old, ret, value_clip=0.5, agg="token-sum", backend=backend)[0]

    def model(x):
        return model_agg(
            model_value(x, old, ret, 0.5), torch.ones_like(x, dtype=torch.bool), "token-sum"
        )

    _, (gw,) = grads_of(model, v)
    _, (gg,) = grads_of(ours, v)
    torch.testing.assert_close(gg, gw, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kind", ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "k3+", "abs+"]
)
@pytest.mark.parametrize("backend", ON_CPU)
def test_kl_kernel_matches_elementwise_kl_penalty(backend, kind):
    logp, ref, _, mask, _ = random_batch(5, scale=2.0)
    ref = ref.clone()
    ref[0, :3] = logp[0, :3] + 30.0  # clamps of k3 engaged

    def ours(lp):
        return vk.kl_loss(lp, ref, mask, kl_kind=kind, agg="seq-mean-token-mean", backend=backend)[0]

    def model(lp):
        return model_agg(vk.kl_penalty(lp, ref, kind), mask, "seq-mean-token-mean")

    want, (gw,) = grads_of(model, logp)
    got, (gg,) = grads_of(ours, logp)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gg, gw, rtol=1e-12, atol=1e-14)


def test_kl_penalty_values():
    lp = torch.tensor([-1.0, -2.0], dtype=F64)
    ref = torch.tensor([-1.5, -1.0], dtype=F64)
    d = lp - ref
    torch.testing.assert_close(vk.kl_penalty(lp, ref, "k1"), d)
    torch.testing.assert_close(vk.kl_penalty(lp, ref, "abs"), d.abs())
    torch.testing.assert_close(vk.kl_penalty(lp, ref, "k2"), 0.5 * d * d)
    torch.testing.assert_close(vk.kl_penalty(lp, ref, "k3"), torch.exp(-d) + d - 1)
    with pytest.raises(ValueError, match="kind"):
        vk.kl_penalty(lp, ref, "k4")


@pytest.mark.parametrize("backend", ON_CPU)
def test_k3_keeps_precision_for_small_log_ratios_in_float32(backend):
    # k3 = expm1(x) - x ~ x^2 / 2: computed as exp(x) - 1 - x in float32 it keeps a few
    # digits at |x| ~ 1e-3 (the metric was ~20% off). Every backend must hold 1e-4 relative.
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(1, 4096, generator=g) * 3
    for scale in (1e-2, 1e-3, 1e-4):
        x = (torch.rand(1, 4096, generator=g) * 2 - 1) * scale
        old = logp - x  # logp - old = x, rounded once in float32; the model uses the same
        x64 = (logp.double() - old.double())
        want = (torch.expm1(x64) - x64).sum()
        _, metrics = vk.policy_loss(logp, old, torch.ones(1, 4096), backend=backend)
        torch.testing.assert_close(metrics["approx_kl_k3"].double() * 4096, want, rtol=1e-4, atol=0)
        # KL k3 of logp against ref = old: the same estimator with the log-ratio negated.
        got = vk.kl_loss(logp, old, kl_kind="k3", agg="token-sum", backend=backend)[0]
        want_kl = (torch.expm1(-x64) + x64).sum()
        torch.testing.assert_close(got.double(), want_kl, rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", ON_CPU)
def test_agg_loss_and_positive_lm_loss(backend):
    logp, _, _, mask, g = random_batch(6, B=5)
    positive = torch.tensor([True, False, True, False, False])
    ent = torch.rand(logp.shape, generator=g, dtype=F64)
    for agg in loss_spec.AGG_MODES:
        got, _ = vk.agg_loss(ent, mask, agg=agg, backend=backend)
        torch.testing.assert_close(got, model_agg(ent, mask, agg), rtol=1e-12, atol=1e-14)

    def ours(lp):
        return vk.positive_lm_loss(lp, positive, mask, backend=backend)[0]

    def model(lp):
        sel = mask & positive[:, None]
        return -lp[sel].sum() / sel.sum()

    want, (gw,) = grads_of(model, logp)
    got, (gg,) = grads_of(ours, logp)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gg, gw, rtol=1e-12, atol=1e-14)
    none, _ = vk.positive_lm_loss(
        logp, torch.zeros(5, dtype=torch.bool), mask, backend=backend
    )
    assert none == 0


@pytest.mark.parametrize("backend", ON_CPU)
def test_vapo_loss_is_the_sum_of_its_terms(backend):
    logp, old, adv, mask, g = random_batch(7, B=5)
    v, vold, ret, ref, ent = (torch.randn(logp.shape, generator=g, dtype=F64) for _ in range(5))
    ref = logp + 0.1 * ref
    ent = ent.abs()
    positive = torch.tensor([True, False, True, True, False])
    coefs = dict(vf_coef=0.7, kl_coef=0.05, entropy_coef=0.01, lm_coef=0.1)

    def ours(lp, vv, hh):
        loss, _ = vk.vapo_loss(
            lp,
            old,
            adv,
            mask,
            values=vv,
            old_values=vold,
            returns=ret,
            ref_logp=ref,
            entropy=hh,
            positive=positive,
            dual_clip=3.0,
            kl_kind="k3",
            backend=backend,
            **coefs,
        )
        return loss

    def model(lp, vv, hh):
        sel = mask & positive[:, None]
        return (
            model_agg(model_policy(lp, old, adv, c=3.0), mask, "token-mean")
            + 0.7 * model_agg(model_value(vv, vold, ret), mask, "token-mean")
            + 0.05 * model_agg(vk.kl_penalty(lp, ref, "k3"), mask, "token-mean")
            - 0.01 * model_agg(hh, mask, "token-mean")
            + 0.1 * (-lp[sel].sum() / sel.sum())
        )

    want, gw = grads_of(model, logp, v, ent)
    got, gg = grads_of(ours, logp, v, ent)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    _, m = vk.vapo_loss(
        logp,
        old,
        adv,
        mask,
        values=v,
        old_values=vold,
        returns=ret,
        ref_logp=ref,
        entropy=ent,
        positive=positive,
        backend=backend,
    )
    assert {
        "pg_loss",
        "vf_loss",
        "kl_loss",
        "entropy",
        "lm_loss",
        "clipfrac",
        "vf_clipfrac",
    } <= set(m)


# --------------------------------------------------------------------------------------
# Ragged layouts, masks, garbage, empty batches


@st.composite
def ragged(draw):
    lengths = draw(ragged_lengths(max_seqs=6, max_len=17))
    n = sum(lengths)
    seed = draw(st.integers(0, 2**31 - 1))
    p_mask = draw(st.sampled_from([0.0, 0.3, 1.0]))
    return lengths, n, seed, p_mask


@pytest.mark.parametrize("backend", ON_CPU)
def test_packed_equals_padded(backend):
    @examples(backend, "cpu", cpu=60, interpreted=10)
    @given(ragged(), st.sampled_from(loss_spec.AGG_MODES), st.sampled_from([None, 2.5]))
    def check(case, agg, dual):
        packed_equals_padded(backend, case, agg, dual)

    check()


def packed_equals_padded(backend, case, agg, dual):
    lengths, n, seed, p_mask = case
    g = torch.Generator().manual_seed(seed)
    cu = cu_seqlens(lengths)
    logp = -torch.rand(n, generator=g, dtype=F64) * 2
    old = logp + torch.randn(n, generator=g, dtype=F64)
    adv = torch.randn(n, generator=g, dtype=F64)
    v, vold, ret = (torch.randn(n, generator=g, dtype=F64) for _ in range(3))
    mask = torch.rand(n, generator=g) >= p_mask
    T = max(lengths, default=0)
    S = len(lengths)
    positive = torch.rand(S, generator=g) > 0.5

    def pad(x, fill=0):
        out = torch.full((S, T), fill, dtype=x.dtype)
        for s in range(S):
            out[s, : lengths[s]] = x[cu[s] : cu[s + 1]]
        return out

    kw = dict(
        dual_clip=dual, agg=agg, backend=backend, loss_scale_factor=7.0, positive=positive
    )
    packed, mp = vk.vapo_loss(logp, old, adv, mask, cu, values=v, old_values=vold, returns=ret, **kw)
    padded, mq = vk.vapo_loss(
        pad(logp),
        pad(old),
        pad(adv),
        pad(mask, False),
        values=pad(v),
        old_values=pad(vold),
        returns=pad(ret),
        **kw,
    )
    assert torch.isfinite(packed)
    torch.testing.assert_close(packed, padded, rtol=1e-12, atol=1e-14)
    for k in mp:
        torch.testing.assert_close(mp[k], mq[k], rtol=1e-12, atol=1e-14)
    if not bool(mask.any()):
        assert packed == 0 and mp["tokens"] == 0 and mp["ratio_min"] == 1


@pytest.mark.parametrize("backend", ON_CPU)
def test_a_non_finite_loss_from_finite_inputs_says_what_overflowed(backend):
    # ratio_log_clamp=inf (TRL's no-clamp) and a log-ratio of 100: the fp32 ratio is inf
    # and a zero advantage times it NaN - the loss came back NaN without an error
    # (kernel review); every valid input is finite, so the error says what overflowed.
    logp, old = torch.tensor([[100.0, 0.0]]), torch.zeros(1, 2)
    adv = torch.tensor([[0.0, 1.0]])
    with pytest.raises(ValueError, match="every valid input is finite.*ratio_log_clamp"):
        vk.policy_loss(logp, old, adv, ratio_log_clamp=math.inf, backend=backend)
    loss, _ = vk.policy_loss(logp, old, adv, backend=backend)  # the default clamp: finite
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", ON_CPU)
@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_an_infinite_valid_input_that_makes_the_loss_infinite_is_named(backend, value):
    logp, old, adv, mask, g = random_batch(8)
    adv = adv.clone()
    first = tuple(int(i) for i in torch.nonzero(mask)[0])  # a valid token
    adv[first] = value
    with pytest.raises(ValueError, match="^advantages contains ±inf"):
        vk.policy_loss(logp, old, adv, mask, backend=backend)


@pytest.mark.parametrize("garbage", [float("nan"), 1e30, -float("inf")])
@pytest.mark.parametrize("backend", ON_CPU)
def test_garbage_in_masked_slots_changes_nothing(backend, garbage):
    logp, old, adv, mask, g = random_batch(8)
    v, vold, ret, ref, ent = (torch.randn(logp.shape, generator=g, dtype=F64) for _ in range(5))
    positive = torch.tensor([True, False, True, False])

    def run(*xs):
        lp, vv, hh = (x.clone().requires_grad_() for x in (xs[0], xs[5], xs[8]))
        loss, m = vk.vapo_loss(
            lp,
            xs[1],
            xs[2],
            mask,
            values=vv,
            old_values=xs[6],
            returns=xs[7],
            ref_logp=xs[3],
            entropy=hh,
            positive=positive,
            is_weights=xs[4].abs(),
            dual_clip=3.0,
            kl_coef=0.1,
            entropy_coef=0.01,
            backend=backend,
        )
        loss.backward()
        return [loss, *m.values(), lp.grad, vv.grad, hh.grad]

    clean = (logp, old, adv, ref, ent, v, vold, ret, ent)
    dirty = [torch.where(mask, x, torch.tensor(garbage, dtype=F64)) for x in clean]
    for a, b in zip(run(*clean), run(*dirty)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ON_CPU)
def test_all_masked_batch_has_zero_loss_and_gradient(backend):
    logp, old, adv, _, _ = random_batch(9)
    logp.requires_grad_()
    mask = torch.zeros(logp.shape, dtype=torch.bool)
    for agg in loss_spec.AGG_MODES:
        loss, m = vk.policy_loss(logp, old, adv, mask, agg=agg, backend=backend)
        loss.backward()
        assert loss == 0 and torch.equal(logp.grad, torch.zeros_like(logp))
        assert all(torch.isfinite(x) for x in m.values())
        logp.grad = None


@pytest.mark.parametrize("backend", ON_CPU)
def test_empty_batch(backend):
    x = torch.zeros(0, dtype=torch.float32, requires_grad=True)
    cu = torch.zeros(1, dtype=torch.int32)
    loss, m = vk.policy_loss(x, x.detach(), x.detach(), None, cu, backend=backend)
    loss.backward()
    assert loss == 0 and m["tokens"] == 0 and x.grad.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", ON_CPU)
def test_low_precision_inputs_fp32_compute(backend, dtype):
    logp, old, adv, mask, _ = random_batch(10)
    lp = logp.to(dtype).requires_grad_()
    loss, _ = vk.policy_loss(lp, old.to(dtype), adv.to(dtype), mask, backend=backend)
    assert loss.dtype == torch.float32
    loss.backward()
    assert lp.grad.dtype == dtype
    want, _ = vk.policy_loss(
        lp.detach().double(),
        old.to(dtype).double(),
        adv.to(dtype).double(),
        mask,
        backend="reference",
    )
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# torch.library integration


# Finite differences take ~100 calls (6-10 s in the Triton interpreter); Triton's float64
# gradients are held to autograd of the definition by the comparisons with the float64 model above.
@pytest.mark.parametrize("backend", [b for b in ON_CPU if b != "triton"])
def test_gradcheck_float64(backend):
    logp, old, adv, mask, g = random_batch(11, B=3, T=5)
    v, vold, ret = (torch.randn(logp.shape, generator=g, dtype=F64) for _ in range(3))
    ent = torch.rand(logp.shape, generator=g, dtype=F64)
    ref = logp + 0.2 * torch.randn(logp.shape, generator=g, dtype=F64)

    def fn(lp, vv, hh):
        return vk.vapo_loss(
            lp,
            old,
            adv,
            mask,
            values=vv,
            old_values=vold,
            returns=ret,
            ref_logp=ref,
            entropy=hh,
            positive=torch.tensor([True, False, True]),
            kl_coef=0.1,
            entropy_coef=0.1,
            dual_clip=3.0,
            agg="seq-mean-token-mean",
            backend=backend,
        )[0]

    leaves = [t.clone().requires_grad_() for t in (logp, v, ent)]
    assert torch.autograd.gradcheck(fn, leaves)


def test_opcheck():
    logp, old, adv, mask, g = random_batch(12, B=3, T=5)
    v, vold, ret = (torch.randn(logp.shape, generator=g, dtype=F64) for _ in range(3))
    params = loss_spec.loss_params(dual_clip=3.0, value_clip=0.2)
    args = (
        logp.clone().requires_grad_(),
        old,
        adv,
        v.clone().requires_grad_(),
        vold,
        ret,
        None,
        None,
        None,
        mask,
        None,
        None,
        params,
        "token-mean",
        None,
        None,
        None,
        1.0,
        None,
        True,
        "reference",
    )
    torch.library.opcheck(torch.ops.vapo.token_loss.default, args)


def test_torch_compile_fullgraph():
    logp, old, adv, mask, _ = random_batch(13)

    def fn(lp):
        loss, m = vk.policy_loss(lp, old, adv, mask, dual_clip=3.0, backend="reference")
        return loss, m["clipfrac"]

    assert_compiled_matches_eager(fn, logp)


@pytest.mark.parametrize("backend", ON_CPU)
def test_no_grad_skips_gradients(backend):
    logp, old, adv, mask, _ = random_batch(14)
    with torch.no_grad():
        loss, _ = vk.policy_loss(logp.requires_grad_(), old, adv, mask, backend=backend)
    assert not loss.requires_grad


# --------------------------------------------------------------------------------------
# Bad input


def test_bad_input_errors_name_the_argument():
    logp, old, adv, mask, _ = random_batch(15)
    with pytest.raises(ValueError, match="old_logp"):
        vk.policy_loss(logp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="mask"):
        vk.policy_loss(logp, old, adv, mask[:, :3])
    with pytest.raises(ValueError, match="agg"):
        vk.policy_loss(logp, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match="clip_low"):
        vk.policy_loss(logp, old, adv, mask, clip_low=-0.1)
    with pytest.raises(ValueError, match="clip_low"):
        vk.policy_loss(logp, old, adv, mask, clip_low=1.5)
    with pytest.raises(ValueError, match="clip_high"):
        vk.policy_loss(logp, old, adv, mask, clip_high=float("nan"))
    with pytest.raises(ValueError, match="dual_clip"):
        vk.policy_loss(logp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="ratio_log_clamp"):
        vk.policy_loss(logp, old, adv, mask, ratio_log_clamp=0)
    with pytest.raises(ValueError, match="global_tokens"):
        vk.policy_loss(logp, old, adv, mask, global_tokens=-1)
    with pytest.raises(ValueError, match="loss_scale_factor"):
        vk.policy_loss(
            logp.flatten(),
            old.flatten(),
            adv.flatten(),
            mask.flatten(),
            torch.tensor([0, 10, 36], dtype=torch.int32),
            agg="seq-mean-token-sum-norm",
        )
    with pytest.raises(ValueError, match="positive"):
        vk.positive_lm_loss(logp, torch.ones(3, dtype=torch.bool), mask)
    with pytest.raises(ValueError, match="value_clip_form"):
        vk.vapo_loss(None, values=logp, old_values=old, returns=adv, value_clip_form="trl")
    with pytest.raises(ValueError, match="kl_kind"):
        vk.vapo_loss(logp, ref_logp=old, kl_kind="k5")
    with pytest.raises(ValueError, match="cu_seqlens"):
        vk.policy_loss(
            logp.flatten(),
            old.flatten(),
            adv.flatten(),
            None,
            torch.tensor([0, 10, 30], dtype=torch.int32),
        )
    with pytest.raises(ValueError, match="NaN"):
        bad = logp.clone()
        bad[mask.nonzero()[0].tolist()] = float("nan")
        vk.policy_loss(bad, old, adv, mask)
    with pytest.raises(TypeError, match="old_logp"):
        vk.policy_loss(logp, old.long(), adv, mask)


# --------------------------------------------------------------------------------------
# One pass from logits / hidden states


def _lm_batch(seed, B=3, T=6, V=37, H=8, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * 3
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 0] = -100  # ignored: not counted by the loss either
    old = -torch.rand(B, T, generator=g, dtype=F64) * 4
    adv = torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.25
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) / 3
    kw = dict(
        dual_clip=3.0,
        entropy_coef=0.01,
        ref_logp=old + 0.1,
        kl_coef=0.1,
        kl_kind="k3",
        positive=torch.rand(B, generator=g) > 0.5,
        lm_coef=0.1,
        agg="seq-mean-token-mean",
    )
    return logits, targets, old, adv, mask, hidden, weight, kw


def _composed(logp, entropy, targets, old, adv, mask, kw):
    return vk.vapo_loss(
        logp, old, adv, mask & (targets != -100), entropy=entropy, backend="reference", **kw
    )


@pytest.mark.parametrize("backend", ON_CPU)
@pytest.mark.parametrize("inplace", [False, True])
def test_loss_from_logits_equals_logprobs_then_loss(backend, inplace):
    from vapo_kernels.ops.token_logprobs import token_logprobs

    logits, targets, old, adv, mask, _, _, kw = _lm_batch(20)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1.0 if inplace else leaf  # in-place needs a non-leaf buffer
    loss, m = vk.policy_loss_from_logits(
        x, targets, old, adv, mask, temperature=0.7, inplace_backward=inplace, backend=backend, **kw
    )
    loss.backward()
    ref_leaf = logits.clone().requires_grad_()
    lp, ent = token_logprobs(
        ref_leaf, targets, temperature=0.7, return_entropy=True, backend="reference"
    )
    want, wm = _composed(lp, ent, targets, old, adv, mask, kw)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-10, atol=1e-14)
    for k in wm:
        torch.testing.assert_close(m[k], wm[k], rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        again, _ = vk.policy_loss_from_logits(
            logits, targets, old, adv, mask, temperature=0.7, backend=backend, **kw
        )
    torch.testing.assert_close(again, want.detach(), rtol=1e-12, atol=1e-14)


def test_loss_from_logits_refuses_inplace_on_leaf():
    logits, targets, old, adv, mask, _, _, _ = _lm_batch(21)
    with pytest.raises(RuntimeError, match="leaf"):
        vk.policy_loss_from_logits(
            logits.requires_grad_(), targets, old, adv, mask, inplace_backward=True
        )
    with pytest.raises(TypeError, match="clip_hgh"):
        vk.policy_loss_from_logits(logits, targets, old, adv, mask, clip_hgh=0.3)
    with pytest.raises(ValueError, match="temperature"):
        vk.policy_loss_from_logits(logits, targets, old, adv, mask, temperature=0.0)


@pytest.mark.parametrize("backend", ON_CPU)
def test_loss_from_hidden_equals_logits_path(backend):
    logits, targets, old, adv, mask, hidden, weight, kw = _lm_batch(22)
    bias = torch.randn(weight.shape[0], dtype=F64)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    loss, m = vk.policy_loss_from_hidden(
        h, w, targets, old, adv, mask, bias=b, temperature=1.3, backend=backend, **kw
    )
    loss.backward()
    h2, w2, b2 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    want, wm = vk.policy_loss_from_logits(
        h2 @ w2.T + b2, targets, old, adv, mask, temperature=1.3, backend="reference", **kw
    )
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    for a, b_ in ((h, h2), (w, w2), (b, b2)):
        torch.testing.assert_close(a.grad, b_.grad, rtol=1e-10, atol=1e-13)
    for k in wm:
        torch.testing.assert_close(m[k], wm[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ON_CPU)
def test_loss_from_logits_packed_ragged(backend):
    @examples(backend, "cpu", cpu=25, interpreted=6)
    @given(ragged(), st.sampled_from(["token-mean", "seq-mean-token-sum"]))
    def check(case, agg):
        loss_from_logits_packed_ragged(backend, case, agg)

    check()


def loss_from_logits_packed_ragged(backend, case, agg):
    from vapo_kernels.ops.token_logprobs import token_logprobs

    lengths, n, seed, p_mask = case
    g = torch.Generator().manual_seed(seed)
    V = 11
    cu = cu_seqlens(lengths)
    logits = torch.randn(n, V, generator=g, dtype=torch.float32)
    targets = torch.randint(0, V, (n,), generator=g)
    old = -torch.rand(n, generator=g) * 3
    adv = torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) >= p_mask
    a = logits.clone().requires_grad_()
    loss, _ = vk.policy_loss_from_logits(
        a, targets, old, adv, mask, cu, agg=agg, backend=backend
    )
    loss.backward()
    b = logits.double().requires_grad_()
    lp = token_logprobs(b, targets, backend="reference")
    want, _ = vk.policy_loss(lp, old.double(), adv.double(), mask, cu, agg=agg, backend="reference")
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-6)
    if not bool(mask.any()):
        assert loss == 0 and not a.grad.any()
