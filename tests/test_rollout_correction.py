"""Rollout correction in the loss op (issue 13): importance weights of the training
engine's old log-probs over the rollout engine's, truncated or masked, at token, sequence
and geometric level, computed in the loss pass with their metrics.

Every backend of ``token_loss`` (and of ``logits_loss``, through the from-logits and
from-hidden losses) is compared with :func:`eager`, a float64 implementation written here
from the formulas (not from ``loss_spec``), on random ragged batches; then garbage in
masked slots, ``rollout_logp == old_logp``, each bad option, the NaN screen, and verl's
own ``compute_rollout_correction_weights`` / ``compute_offpolicy_metrics``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import (
    GARBAGE,
    MASK_KINDS,
    assert_compiled_matches_eager,
    backend_params,
    cu_seqlens,
    examples,
    ragged_lengths,
    ragged_mask,
    to_padded,
)

import vapo_kernels as vk
from vapo_kernels.ops import loss_spec, token_loss

BACKENDS = backend_params("token_loss")
LOGITS_BACKENDS = backend_params("logits_loss")
LEVELS = ("token", "sequence", "geometric")
MODES = ("truncate", "mask")
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
BOUND = 20.0  # log-ratios (per token, and a sequence's sum) are clamped to +-20


# --------------------------------------------------------------------------------------
# The formulas, eagerly, in float64 (packed (N,) tensors, offsets (S + 1,))


def eager_weights(old, rollout, valid, offsets, level, mode, upper, lower):
    """Per token: (applied weight, raw weight, truncated-or-rejected, clamped log-ratio)."""
    zero = torch.zeros_like(old)
    e = torch.where(valid, (torch.where(valid, old, zero) - torch.where(valid, rollout, zero))
                    .clamp(-BOUND, BOUND), zero)
    u = e.clone()
    if level != "token":
        for s in range(offsets.numel() - 1):
            a, b = int(offsets[s]), int(offsets[s + 1])
            total = e[a:b].sum()
            count = int(valid[a:b].sum())
            if level == "sequence":
                u[a:b] = total.clamp(-BOUND, BOUND)
            else:
                u[a:b] = total / max(count, 1)
    raw = torch.exp(u)
    if mode == "truncate":
        return torch.minimum(raw, torch.full_like(raw, upper)), raw, raw > upper, e, u
    lower = 1.0 / upper if lower is None else lower
    kept = (raw >= lower) & (raw <= upper)
    return torch.where(kept, raw, zero), raw, ~kept, e, u


def eager(logp, old, adv, rollout, valid, offsets, *, level, mode, upper, lower, agg):
    """(loss, metrics) of the clipped policy loss with the rollout correction."""
    zero = torch.zeros_like(old)
    logp = torch.where(valid, logp, zero)
    old_c, adv = torch.where(valid, old, zero), torch.where(valid, adv, zero)
    ratio = torch.exp((logp - old_c).clamp(-BOUND, BOUND))
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH))
    w, raw, out, e, _ = eager_weights(old, rollout, valid, offsets, level, mode, upper, lower)
    per_token = torch.where(valid, pg * w, zero)
    tokens = int(valid.sum())
    if agg == "token-mean":
        loss = per_token.sum() / max(tokens, 1)
    elif agg == "token-sum":
        loss = per_token.sum()
    else:  # seq-mean-token-mean: sequences with a valid token; rejected tokens count
        means = []
        for s in range(offsets.numel() - 1):
            a, b = int(offsets[s]), int(offsets[s + 1])
            n = int(valid[a:b].sum())
            if n:
                means.append(per_token[a:b].sum() / n)
        loss = torch.stack(means).mean() if means else per_token.sum() * 0
    v = valid
    t = max(tokens, 1)
    out_key = f"rollout_is_{'truncated' if mode == 'truncate' else 'masked'}_frac"
    metrics = {
        "rollout_is_mean": raw[v].sum() / t,
        "rollout_is_min": raw[v].min() if tokens else torch.tensor(1.0),
        "rollout_is_max": raw[v].max() if tokens else torch.tensor(1.0),
        "rollout_is_weight_mean": w[v].sum() / t,
        out_key: out[v].double().sum() / t,
        "rollout_kl": (-e[v]).sum() / t,
        "rollout_k3": (torch.expm1(e[v]) - e[v]).sum() / t,
    }
    return loss, metrics


# --------------------------------------------------------------------------------------
# Random ragged batches


def batch(lengths, mask_kind, seed, scale, dtype):
    """Packed float64 inputs of sequences of ``lengths`` (``scale``: spread of the
    rollout engine's log-probs around old_logp), their mask and cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    old = -torch.rand(n, generator=gen, dtype=torch.float64) * 3
    x = {
        "logp": old + 0.2 * torch.randn(n, generator=gen, dtype=torch.float64),
        "old": old,
        "adv": torch.randn(n, generator=gen, dtype=torch.float64),
        "rollout": old + scale * torch.randn(n, generator=gen, dtype=torch.float64),
    }
    x = {k: t.to(dtype).double() for k, t in x.items()}  # values the dtype can hold
    return x, ragged_mask(mask_kind, lengths, gen), cu_seqlens(lengths)


def far_from_bounds(x, valid, offsets, level, mode, upper, lower, margin):
    """No weight within ``margin`` (in log space) of a bound: a backend rounding
    differently must not flip a truncation or a rejection."""
    *_, u = eager_weights(x["old"], x["rollout"], valid, offsets, level, "truncate", upper, None)
    bounds = [math.log(upper)]
    if mode == "mask":
        low = 1.0 / upper if lower is None else lower
        bounds += [math.log(low)] if low > 0 else []
    return all(bool(((u[valid] - b).abs() > margin).all()) for b in bounds)


def call(x, mask, cu, *, packed, dtype, backend, rollout=None, grad=True, fn=None, fill=0.0,
         **kw):
    """``vk.policy_loss`` (or ``fn``) on the batch, padded or packed, in ``dtype``:
    (loss, metrics, packed gradient of logp). ``fill``: rollout_logp's padding."""
    rollout = x["rollout"] if rollout is None else rollout
    if packed:
        args = [t.to(dtype) for t in (x["logp"], x["old"], x["adv"])]
        m, extra, r = mask, cu, rollout.to(dtype)
    else:
        args = [to_padded(t, cu).to(dtype) for t in (x["logp"], x["old"], x["adv"])]
        m, extra, r = to_padded(mask, cu, False), None, to_padded(rollout, cu, fill).to(dtype)
    logp = args[0].requires_grad_(grad)
    loss, metrics = (fn or vk.policy_loss)(
        logp, *args[1:], m, extra, rollout_logp=r, backend=backend, **kw
    )
    g = None
    if grad:
        (g,) = torch.autograd.grad(loss, logp)
        g = g if packed else g[to_padded(torch.ones_like(mask), cu, False)]
    return loss, dict(metrics), g


def padded_layout(mask, cu):
    """The padded layout's valid mask and offsets, flattened (rows = sequences)."""
    b, t = len(cu) - 1, int((cu[1:] - cu[:-1]).max()) if len(cu) > 1 else 0
    return to_padded(mask, cu, False).reshape(-1), torch.arange(b + 1) * t


options = st.fixed_dictionaries({
    "lengths": ragged_lengths(max_seqs=5, max_len=40),
    "mask_kind": st.sampled_from(MASK_KINDS),
    "seed": st.integers(0, 2**31 - 1),
    "scale": st.sampled_from([0.0, 0.05, 0.3, 1.5, 30.0]),
    "upper": st.sampled_from([1.0, 1.3, 2.0, 5.0]),
    "lower": st.sampled_from([None, 0.0, 0.5, 0.95]),
    "packed": st.booleans(),
    "dtype": st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    "agg": st.sampled_from(["token-mean", "token-sum", "seq-mean-token-mean"]),
})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_every_backend_matches_the_formulas(backend, device, level, mode):
    @examples(backend, device, cpu=20, interpreted=8, reference=10)
    @given(o=options)
    def check(o):
        dtype, packed = o["dtype"], o["packed"]
        lower = o["lower"] if mode == "mask" else None
        x, mask, cu = batch(o["lengths"], o["mask_kind"], o["seed"], o["scale"], dtype)
        if packed:
            valid, offsets = mask, cu.long()
            flat = x
        else:
            valid, offsets = padded_layout(mask, cu)
            flat = {k: to_padded(t, cu).reshape(-1) for k, t in x.items()}
        margin = 1e-9 if dtype == torch.float64 else 1e-4
        assume(far_from_bounds(flat, valid, offsets, level, mode, o["upper"], lower, margin))
        opts = {"rollout_is": level, "rollout_is_mode": mode,
                "rollout_is_threshold": o["upper"], "rollout_is_threshold_lower": lower,
                "agg": o["agg"]}
        loss, metrics, grad = call(x, mask, cu, packed=packed, dtype=dtype, backend=backend,
                                   **opts)
        lp = flat["logp"].clone().requires_grad_()
        want, want_m = eager(lp, flat["old"], flat["adv"], flat["rollout"], valid, offsets,
                             level=level, mode=mode, upper=o["upper"], lower=lower,
                             agg=o["agg"])
        (want_g,) = torch.autograd.grad(want, lp, allow_unused=True)
        want_g = torch.zeros_like(lp) if want_g is None else want_g
        if not packed:
            want_g = want_g[to_padded(torch.ones_like(mask), cu, False).reshape(-1)]
        tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {
            "rtol": 2e-4, "atol": 1e-5}
        torch.testing.assert_close(loss.double(), want.detach(), **tol)
        # The gradient comes back in logp's dtype: bf16 rounds it to 2^-9 relative.
        g_tol = {"rtol": 8e-3, "atol": 1e-5} if dtype == torch.bfloat16 else tol
        torch.testing.assert_close(grad.double(), want_g, **g_tol)
        assert set(want_m) <= set(metrics)
        for k, v in want_m.items():
            torch.testing.assert_close(metrics[k].double(), v.double(), **tol, msg=k)

    check()


# --------------------------------------------------------------------------------------
# Garbage, identity, metrics keys


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_garbage_in_masked_slots_changes_nothing(backend, device):
    lengths = [5, 0, 1, 17, 9]
    x, mask, cu = batch(lengths, "turns", 3, 0.5, torch.float32)
    mask[0] = False
    masked = (~mask).nonzero().squeeze(1)
    case = 0
    for level in LEVELS:
        for mode in MODES:
            opts = {"rollout_is": level, "rollout_is_mode": mode, "rollout_is_threshold": 1.5}
            for packed in (True, False):
                clean = call(x, mask, cu, packed=packed, dtype=torch.float32, backend=backend,
                             **opts)
                for _ in range(2):  # two garbage mixes per case: every value several times
                    junk, other = GARBAGE[case % len(GARBAGE)], GARBAGE[(case + 2) % len(GARBAGE)]
                    case += 1
                    dirty = x["rollout"].clone()
                    dirty[masked] = junk
                    dirty[masked[::2]] = other
                    got = call(x, mask, cu, packed=packed, dtype=torch.float32,
                               backend=backend, rollout=dirty, fill=junk, **opts)
                    what = f"{level}/{mode}/packed={packed}/{junk}"
                    assert torch.equal(got[0], clean[0]), what
                    assert torch.equal(got[2], clean[2]), what
                    for k in clean[1]:
                        assert torch.equal(got[1][k], clean[1][k]), f"{what}: {k}"


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_long_sequences_across_chunks_and_thread_counts(backend, device):
    # Sequences longer than the C++ kernel's 8192-token chunks (so one sequence's weight
    # is used by several chunks), and the same bits on 1 and 2 threads.
    if backend == "triton" and device == "cpu":
        pytest.skip("too long for the interpreter")
    lengths = [20000, 3, 0, 9000]
    x, mask, cu = batch(lengths, "long_turns", 7, 0.02, torch.float32)
    offsets = cu.long()
    threads = torch.get_num_threads()
    for level in LEVELS:
        for mode in MODES:
            kw = {"rollout_is": level, "rollout_is_mode": mode, "rollout_is_threshold": 1.5,
                  "agg": "seq-mean-token-mean"}
            runs = []
            for n in (1, 2):
                torch.set_num_threads(n)
                try:
                    runs.append(call(x, mask, cu, packed=True, dtype=torch.float32,
                                     backend=backend, **kw))
                finally:
                    torch.set_num_threads(threads)
            assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][2], runs[1][2])
            assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
            lp = x["logp"].clone().requires_grad_()
            want, want_m = eager(lp, x["old"], x["adv"], x["rollout"], mask, offsets,
                                 level=level, mode=mode, upper=1.5, lower=None,
                                 agg="seq-mean-token-mean")
            (want_g,) = torch.autograd.grad(want, lp)
            loss, metrics, grad = runs[0]
            tol = {"rtol": 2e-4, "atol": 1e-6}
            torch.testing.assert_close(loss.double(), want.detach(), **tol)
            torch.testing.assert_close(grad.double(), want_g, **tol)
            for k, v in want_m.items():
                torch.testing.assert_close(metrics[k].double(), v.double(), **tol, msg=k)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_rollout_equal_to_old_is_exactly_the_uncorrected_loss(backend, device):
    x, mask, cu = batch([7, 1, 0, 30, 12], "random", 5, 0.0, torch.float32)
    plain = call(x, mask, cu, packed=True, dtype=torch.float32, backend=backend,
                 rollout=None, fn=lambda *a, rollout_logp, **k: vk.policy_loss(*a, **k))
    for level in LEVELS:
        for mode, upper, lower in (("truncate", 1.0, None), ("truncate", 2.0, None),
                                   ("mask", 2.0, None), ("mask", 1.0, 1.0)):
            got = call(x, mask, cu, packed=True, dtype=torch.float32, backend=backend,
                       rollout=x["old"], rollout_is=level, rollout_is_mode=mode,
                       rollout_is_threshold=upper, rollout_is_threshold_lower=lower)
            what = f"{level}/{mode}/{upper}"
            assert torch.equal(got[0], plain[0]), what
            assert torch.equal(got[2], plain[2]), what
            for k in plain[1]:
                assert torch.equal(got[1][k], plain[1][k]), f"{what}: {k}"
            assert float(got[1]["rollout_kl"]) == 0.0 and float(got[1]["rollout_k3"]) == 0.0
            assert float(got[1]["rollout_is_min"]) == float(got[1]["rollout_is_max"]) == 1.0


def test_metrics_only_with_the_correction_and_named_by_mode():
    x, mask, cu = batch([4, 6], "none", 0, 0.3, torch.float32)
    _, plain, _ = call(x, mask, cu, packed=True, dtype=torch.float32, backend="reference",
                       fn=lambda *a, rollout_logp, **k: vk.policy_loss(*a, **k))
    assert not any(k.startswith("rollout") for k in plain)
    _, trunc, _ = call(x, mask, cu, packed=True, dtype=torch.float32, backend="reference",
                       rollout_is="token")
    _, masked, _ = call(x, mask, cu, packed=True, dtype=torch.float32, backend="reference",
                        rollout_is="token", rollout_is_mode="mask")
    assert "rollout_is_truncated_frac" in trunc and "rollout_is_masked_frac" not in trunc
    assert "rollout_is_masked_frac" in masked and "rollout_is_truncated_frac" not in masked
    assert set(plain) < set(trunc)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_empty_batch_and_all_masked(backend, device):
    for lengths, kind in (([], "none"), ([0, 0], "none"), ([3, 4], "mixed_rows")):
        x, mask, cu = batch(lengths, kind, 1, 0.3, torch.float32)
        mask[:] = False
        loss, m, g = call(x, mask, cu, packed=True, dtype=torch.float32, backend=backend,
                          rollout_is="sequence", rollout_is_mode="mask")
        assert float(loss.detach()) == 0.0 and not g.any()
        assert float(m["rollout_is_min"]) == float(m["rollout_is_max"]) == 1.0
        assert float(m["rollout_is_mean"]) == float(m["rollout_is_masked_frac"]) == 0.0


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_with_every_term_equals_is_weights_of_the_same_weights(backend, device):
    # The correction beside the value, KL, entropy and LM terms: the same loss, gradients
    # and metrics as is_weights holding the weights the formulas give.
    lengths = [9, 0, 1, 14, 6]
    x, mask, cu = batch(lengths, "turns", 4, 0.4, torch.float64)
    gen = torch.Generator().manual_seed(4)
    n = sum(lengths)
    extra = {
        "values": torch.randn(n, generator=gen, dtype=torch.float64),
        "old_values": torch.randn(n, generator=gen, dtype=torch.float64),
        "returns": torch.randn(n, generator=gen, dtype=torch.float64),
        "ref_logp": x["old"] + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64),
        "entropy": torch.rand(n, generator=gen, dtype=torch.float64),
    }
    positive = torch.tensor([True, False, True, False, True])
    for level in LEVELS:
        for mode in MODES:
            w, *_ = eager_weights(x["old"], x["rollout"], mask, cu.long(), level, mode, 1.5, None)
            outs = []
            for kw in ({"rollout_logp": x["rollout"], "rollout_is": level,
                        "rollout_is_mode": mode, "rollout_is_threshold": 1.5},
                       {"is_weights": w}):
                leaves = {k: t.clone().requires_grad_() for k, t in
                          (("logp", x["logp"]), ("values", extra["values"]),
                           ("entropy", extra["entropy"]))}
                loss, m = vk.vapo_loss(
                    leaves["logp"], x["old"], x["adv"], mask, cu, values=leaves["values"],
                    old_values=extra["old_values"], returns=extra["returns"],
                    ref_logp=extra["ref_logp"], kl_coef=0.1, entropy=leaves["entropy"],
                    entropy_coef=0.01, positive=positive, agg="seq-mean-token-mean",
                    backend=backend, **kw,
                )
                grads = torch.autograd.grad(loss, list(leaves.values()))
                outs.append((loss, dict(m), grads))
            (got, got_m, got_g), (want, want_m, want_g) = outs
            tol = {"rtol": 1e-9, "atol": 1e-12}
            torch.testing.assert_close(got, want, **tol)
            for g, h in zip(got_g, want_g):
                torch.testing.assert_close(g, h, **tol)
            for k in want_m:
                torch.testing.assert_close(got_m[k], want_m[k], **tol, msg=k)


def test_opcheck_and_torch_compile():
    x, mask, cu = batch([5, 0, 8], "random", 6, 0.3, torch.float32)
    params = loss_spec.loss_params(rollout_is="geometric", rollout_is_mode="mask",
                                   rollout_is_threshold=1.5)
    # The op's is_weights slot carries rollout_logp when params say so.
    args = token_loss.TokenLossArgs(
        x["logp"].float().requires_grad_(), x["old"].float(), x["adv"].float(), None, None,
        None, None, None, x["rollout"].float(), mask, cu, None, params, "token-mean", None,
        None, None, 1.0, None, True, "",
    )
    torch.library.opcheck(torch.ops.vapo.token_loss.default, tuple(args))

    def fn(lp):
        loss, m = vk.policy_loss(lp, x["old"], x["adv"], mask, cu, rollout_logp=x["rollout"],
                                 rollout_is="sequence", rollout_is_mode="mask",
                                 backend="reference")
        return loss, m["rollout_is_masked_frac"]

    assert_compiled_matches_eager(fn, x["logp"])


# --------------------------------------------------------------------------------------
# Errors


def _small():
    x, mask, cu = batch([3, 4], "none", 0, 0.3, torch.float32)
    return [to_padded(x[k], cu).float() for k in ("logp", "old", "adv", "rollout")] + [
        to_padded(mask, cu, False)]


BAD = [
    ({"rollout_is": "tokens"}, "rollout_is must be one of"),
    ({"rollout_is": 1}, "rollout_is must be one of"),
    ({"rollout_is": "token", "rollout_logp": None}, "needs rollout_logp"),
    ({"rollout_is": None}, "rollout_logp is given but rollout_is is None"),
    ({"rollout_is": None, "rollout_logp": None, "rollout_is_mode": "mask"}, "rollout_is_mode="),
    ({"rollout_is": None, "rollout_logp": None, "rollout_is_threshold": 2.0},
     "rollout_is_threshold="),
    ({"rollout_is": None, "rollout_logp": None, "rollout_is_threshold_lower": 0.5},
     "rollout_is_threshold_lower="),
    ({"rollout_is_mode": "clip"}, "rollout_is_mode must be"),
    ({"rollout_is_threshold": 0.0}, "rollout_is_threshold must be"),
    ({"rollout_is_threshold": -1.0}, "rollout_is_threshold must be"),
    ({"rollout_is_threshold": math.inf}, "rollout_is_threshold must be"),
    ({"rollout_is_threshold": True}, "rollout_is_threshold must be"),
    ({"rollout_is_threshold_lower": 0.5}, "rollout_is_threshold_lower=0.5 is set but"),
    ({"rollout_is_mode": "mask", "rollout_is_threshold": 2.0,
      "rollout_is_threshold_lower": 3.0}, "rollout_is_threshold_lower must be"),
    ({"rollout_is_mode": "mask", "rollout_is_threshold_lower": -0.1},
     "rollout_is_threshold_lower must be"),
    ({"is_weights": "ones"}, "is_weights and rollout_logp"),
    ({"rollout_logp": "short"}, "rollout_logp"),
]


@pytest.mark.parametrize("change, match", BAD)
def test_bad_options_raise_naming_them(change, match):
    logp, old, adv, rollout, mask = _small()
    kw = {"rollout_logp": rollout, "rollout_is": "token", **change}
    if kw.get("is_weights") == "ones":
        kw["is_weights"] = torch.ones_like(old)
    if kw.get("rollout_logp") == "short":
        kw["rollout_logp"] = rollout[:, :-1]
    with pytest.raises(ValueError, match=match):
        vk.policy_loss(logp, old, adv, mask, **kw)
    # The same checks on every loss that has the policy term.
    if change.get("rollout_logp") != "short":
        logits = torch.randn(*logp.shape, 5)
        targets = torch.randint(0, 5, logp.shape)
        with pytest.raises(ValueError, match=match):
            vk.policy_loss_from_logits(logits, targets, old, adv, mask, **kw)


def test_rollout_logp_needs_the_policy_term():
    logp, old, adv, rollout, mask = _small()
    with pytest.raises(ValueError, match="rollout_logp corrects the policy term"):
        vk.vapo_loss(None, mask=mask, values=logp, returns=old, value_clip=None,
                     rollout_logp=rollout, rollout_is="token")


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_nan_in_a_valid_rollout_slot_is_named(backend, device):
    logp, old, adv, rollout, mask = _small()
    for level in LEVELS:
        for mode in MODES:
            bad = rollout.clone()
            bad[1, 2] = math.nan
            with pytest.raises(ValueError, match="rollout_logp contains NaN"):
                vk.policy_loss(logp, old, adv, mask, rollout_logp=bad, rollout_is=level,
                               rollout_is_mode=mode, backend=backend)


# --------------------------------------------------------------------------------------
# From logits and from hidden states: the same policy term


@pytest.mark.parametrize("backend, device", LOGITS_BACKENDS)
def test_from_logits_and_hidden_equal_logprobs_then_loss(backend, device):
    gen = torch.Generator().manual_seed(11)
    lengths, V, H = [6, 1, 0, 9], 7, 5
    n = sum(lengths)
    cu = cu_seqlens(lengths)
    mask = torch.rand(n, generator=gen) < 0.8
    hidden = torch.randn(n, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    logits = hidden @ weight.T
    targets = torch.randint(0, V, (n,), generator=gen)
    old = vk.token_logprobs(logits, targets, backend="reference")
    old = old + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    rollout = old + 0.4 * torch.randn(n, generator=gen, dtype=torch.float64)
    for level in LEVELS:
        for mode in MODES:
            kw = {"rollout_logp": rollout, "rollout_is": level, "rollout_is_mode": mode,
                  "rollout_is_threshold": 1.4}
            z = logits.clone().requires_grad_()
            lp = vk.token_logprobs(z, targets, backend="reference")
            want, want_m = vk.policy_loss(lp, old, adv, mask, cu, backend="reference", **kw)
            (want_g,) = torch.autograd.grad(want, z)
            z2 = logits.clone().requires_grad_()
            got, got_m = vk.policy_loss_from_logits(z2, targets, old, adv, mask, cu,
                                                    backend=backend, **kw)
            (got_g,) = torch.autograd.grad(got, z2)
            h = hidden.clone().requires_grad_()
            got_h, got_hm = vk.policy_loss_from_hidden(h, weight, targets, old, adv, mask, cu,
                                                       backend=backend, **kw)
            (got_hg,) = torch.autograd.grad(got_h, h)
            (want_hg,) = torch.autograd.grad(
                vk.policy_loss(vk.token_logprobs(h @ weight.T, targets, backend="reference"),
                               old, adv, mask, cu, backend="reference", **kw)[0], h)
            tol = {"rtol": 1e-9, "atol": 1e-12}
            torch.testing.assert_close(got, want, **tol)
            torch.testing.assert_close(got_h, want, **tol)
            torch.testing.assert_close(got_g, want_g, **tol)
            torch.testing.assert_close(got_hg, want_hg, **tol)
            for k in want_m:
                if k.startswith("rollout"):
                    torch.testing.assert_close(got_m[k], want_m[k], **tol, msg=k)
                    torch.testing.assert_close(got_hm[k], want_m[k], **tol, msg=k)


# --------------------------------------------------------------------------------------
# verl's eager rollout-IS code (verl 0.9.1, trainer/ppo/rollout_corr_helper.py)


@pytest.mark.peers
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_weights_and_metrics_equal_verls(backend, device):
    from compat._peers import import_peer, require_version

    require_version("verl")
    helper = import_peer("verl.trainer.ppo.rollout_corr_helper")
    gen = torch.Generator().manual_seed(2)
    B, T = 4, 13
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    rollout = old + 0.15 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, T, generator=gen) < 0.8
    mask[:, 0] = True  # verl refuses an all-masked batch
    ones = torch.ones(B, T, dtype=torch.float64)
    # logp = old and A = 1 with token-sum: the policy term's gradient is -w per token.
    for level in ("token", "sequence"):
        for threshold, mode, lower in (("2.0", "truncate", None), (1.1, "truncate", None),
                                       ("0.5_2.0", "mask", 0.5), ("0.8_1.3", "mask", 0.8)):
            upper = float(str(threshold).split("_")[-1])
            want, verl_m = helper.compute_rollout_correction_weights(
                old - rollout, mask.double(), rollout_is=level, rollout_is_threshold=threshold,
            )
            logp = old.clone().requires_grad_()
            loss, m = vk.policy_loss(
                logp, old, ones, mask, rollout_logp=rollout, rollout_is=level,
                rollout_is_mode=mode, rollout_is_threshold=upper,
                rollout_is_threshold_lower=lower, agg="token-sum", backend=backend,
            )
            (g,) = torch.autograd.grad(loss, logp)
            assert bool((want > 0).any()), "a case where every weight is 0 tests little"
            torch.testing.assert_close(-g, want * mask, rtol=1e-12, atol=0,
                                       msg=f"{level} {threshold}")
            # verl's masked_mean divides by the count + 1e-8: rtol 1e-8.
            torch.testing.assert_close(float(m["rollout_is_weight_mean"]),
                                       verl_m["rollout_is_mean"], rtol=1e-8, atol=0)
    verl_off = helper.compute_offpolicy_metrics(old, rollout, mask.double())
    torch.testing.assert_close(float(m["rollout_kl"]), verl_off["kl"], rtol=1e-8, atol=1e-15)
    torch.testing.assert_close(float(m["rollout_k3"]), verl_off["k3_kl"], rtol=1e-8, atol=1e-15)
