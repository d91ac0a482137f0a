"""The PPO loss adapters against the real peer functions (verl, OpenRLHF, TRL).

Every comparison runs with the default backend and with ``backend="reference"`` (set
through ``vapo_kernels.compat.set_backend``), on random ragged padded ``(B, T)`` batches:
multi-turn masks with holes, a fully masked row, a row with one valid token, finite
garbage in the masked slots, log-ratios that hit the clip ranges, the dual-clip bound and
verl's +-20 clamp, zero advantages. The loss, its gradients (autograd through both, with
respect to the log-probs / value predictions / per-token loss) and every metric are
compared, in fp32 and fp64, for every aggregation mode, with local counts and with global
counts that differ from the local ones (``dp_size > 1``).

Tolerances, relative to the size of the terms (S = the same aggregation applied to an
upper bound of |per-token loss|, so cancellation in the sum is accounted for):

* loss: ``tol * (1 + S)``; gradients: ``tol * (1 + max |g|)`` per entry plus ``tol``
  relative; metrics: ``tol * (1 + |metric|)``, with tol = 1e-6 in fp32, 1e-12 in fp64.

The deliberate differences (all-masked batches, NaN in masked slots, the float64 1e-8 of
verl's per-sequence mean, OpenRLHF's unclamped ``ppo_kl``) are tested explicitly.

How each peer is driven:

* verl 0.9.1: ``verl.trainer.ppo.core_algos`` itself, with a real ``ActorConfig``.
* OpenRLHF 0.11.2: the real ``openrlhf/models/loss.py``, imported with the package
  ``__init__``s bypassed and the GPU-only imports stubbed (``_openrlhf.py``).
* TRL 1.12.0: the loss lines of ``PPOTrainer.train`` (from ``vpredclipped = ...`` to
  ``loss = pg_loss + ...``, and the ``pg_clipfrac`` lines) and TRL's ``masked_mean`` are
  read from the installed ``ppo_trainer.py`` at test time and executed on our tensors.
"""

from __future__ import annotations

import ast
import math
import textwrap
import warnings
from types import ModuleType, SimpleNamespace

import pytest
import torch

from vapo_kernels import compat
from vapo_kernels import policy_loss

from ._peers import import_peer, openrlhf_modules, trl_ppo_trainer_source, use_backend

pytestmark = pytest.mark.peers

AGG_MODES = [
    "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
]
DTYPES = [torch.float32, torch.float64]
B, T = 7, 19


def tol_of(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-6


def _default_backend_missing() -> str | None:
    """Why the default backend cannot run the token-loss op here, or None."""
    x = torch.zeros(1, 2, requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            policy_loss(x, torch.zeros(1, 2), torch.zeros(1, 2))
    except AttributeError as e:  # the built extension predates the token_loss kernel
        if "token_loss" in str(e):
            return str(e)
        raise
    return None


@pytest.fixture(params=[None, "reference"], ids=["default", "reference"])
def backend(request):
    """The backend of the adapters, active for the whole test."""
    if request.param is None:
        why = _default_backend_missing()
        if why:
            pytest.skip(f"the default backend has no token_loss kernel yet: {why}")
    with use_backend(request.param):
        yield request.param


# --------------------------------------------------------------------------------------
# Inputs


def make_mask(seed, batch=B, length=T):
    """Ragged multi-turn mask: a fully masked row, a one-token row, holes elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    holes = torch.rand(batch, length, generator=gen) > 0.2
    mask = (torch.arange(length) < lengths[:, None]) & holes
    mask[0] = False
    mask[1] = False
    mask[1, 3] = True
    mask[2, :] = True
    return mask


def policy_inputs(seed, dtype, batch=B, length=T):
    """(log_prob, old_log_prob, advantages, mask): log-ratios spread over the clip ranges,
    the dual-clip bound (ratio > 3 with A < 0) and verl's +-20 clamp; zero advantages;
    finite garbage in masked slots."""
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(seed, batch, length)
    logp = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 4
    scale = torch.where(torch.rand(batch, length, generator=gen) < 0.8, 0.3, 1.5).double()
    old = logp + torch.randn(batch, length, generator=gen, dtype=torch.float64) * scale
    old[2, 0], old[2, 1] = logp[2, 0] + 25.0, logp[2, 1] - 25.0  # beyond the +-20 clamp
    adv = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    adv[2, 2] = adv[3, 0] = 0.0
    garbage = torch.randn(batch, length, generator=gen, dtype=torch.float64) * 40
    logp, old, adv = (torch.where(mask, x, garbage) for x in (logp, old, adv))
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask


def value_inputs(seed, dtype):
    """(vpreds, returns, old values, mask), about half of the valid values clipped at 0.5."""
    gen = torch.Generator().manual_seed(seed + 1000)
    mask = make_mask(seed)
    old = torch.randn(B, T, generator=gen, dtype=torch.float64)
    vpreds = old + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.6
    returns = old + torch.randn(B, T, generator=gen, dtype=torch.float64)
    garbage = torch.randn(B, T, generator=gen, dtype=torch.float64) * 40
    vpreds, returns, old = (torch.where(mask, x, garbage) for x in (vpreds, returns, old))
    return vpreds.to(dtype), returns.to(dtype), old.to(dtype), mask


def global_info(mask, mode_global):
    """verl's global batch info: local (dp 1, no counts) or counts unlike the local ones."""
    if not mode_global:
        return {}
    tokens = int(mask.sum())
    seqs = int((mask.sum(-1) > 0).sum())
    return {"dp_size": 4, "batch_num_tokens": 3 * tokens + 5,
            "global_batch_size": 4 * seqs - 1, "loss_scale_factor": 64}


def leaf(x):
    return x.detach().clone().requires_grad_()


def assert_loss(got, want, scale, dtype, what):
    tol = tol_of(dtype)
    got, want = float(got), float(want)
    assert math.isfinite(got) and abs(got - want) <= tol * (1 + abs(float(scale))), (
        f"{what}: ours {got!r} vs peer {want!r} (|diff| {abs(got - want):.3e}, "
        f"scale {float(scale):.3e})"
    )


def assert_grad(got, want, dtype, what):
    tol = tol_of(dtype)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    atol = tol * (1 + float(want.abs().max()))
    torch.testing.assert_close(got, want, atol=atol, rtol=tol, msg=lambda m: f"{what}: {m}")


def assert_metric(got, want, dtype, what):
    tol = tol_of(dtype)
    got, want = float(got), float(want)
    assert abs(got - want) <= tol * (1 + abs(want)), f"{what}: ours {got!r} vs peer {want!r}"


# --------------------------------------------------------------------------------------
# verl


def actor_config(clip_low, clip_high, clip_c, info, clip_ratio=0.2):
    from verl.workers.config.actor import ActorConfig

    cfg = ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=clip_ratio,
        clip_ratio_low=clip_low, clip_ratio_high=clip_high, clip_ratio_c=clip_c,
    )
    cfg.global_batch_info.update(info)
    return cfg


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("info_kind", ["local", "global"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_verl_policy_loss(verl_core, backend, mode, info_kind, dtype):
    from vapo_kernels.compat import verl as ours

    seed = AGG_MODES.index(mode) * 10 + (info_kind == "global") + 2 * (dtype == torch.float64)
    logp, old, adv, mask = policy_inputs(seed, dtype)
    gen = torch.Generator().manual_seed(seed)
    is_w = (torch.rand(B, T, generator=gen, dtype=torch.float64) * 2).to(dtype)
    info = global_info(mask, info_kind == "global")
    masks = [mask, mask.to(dtype)] if dtype == torch.float32 else [mask]
    # (clip_ratio_low, clip_ratio_high, clip_ratio_c, rollout_is_weights)
    configs = [(0.2, 0.2, 3.0, None), (0.2, 0.28, 3.0, is_w), (None, 0.28, 10.0, None),
               (1.5, 0.1, 1.5, is_w)]
    for m in masks:
        for clip_low, clip_high, clip_c, weights in configs:
            cfg = actor_config(clip_low, clip_high, clip_c, info)
            what = f"{mode} {info_kind} {dtype} mask {m.dtype} clips {clip_low, clip_high, clip_c}"
            x_peer, x_ours = leaf(logp), leaf(logp)
            args = (adv, m, mode, cfg, weights)
            want, want_m = verl_core.compute_policy_loss_vanilla(old, x_peer, *args)
            got, got_m = ours.compute_policy_loss_vanilla(old, x_ours, *args)
            assert got.dtype == want.dtype and got.shape == want.shape == (), what
            # |L| <= |A| max(ratio, c) * w: aggregate that bound with verl's own agg_loss
            ratio = torch.exp(torch.clamp(logp - old, -20, 20)).double()
            bound = adv.double().abs() * torch.clamp(ratio, min=clip_c)
            if weights is not None:
                bound = bound * weights.double()
            scale = verl_core.agg_loss(torch.where(m.bool(), bound, 0), m, mode, **info)
            assert_loss(got, want, scale, dtype, what)
            (g_peer,) = torch.autograd.grad(want, x_peer)
            (g_ours,) = torch.autograd.grad(got, x_ours)
            assert_grad(g_ours, g_peer, dtype, what + " d/dlog_prob")
            assert list(got_m) == list(want_m)
            for key in want_m:
                assert type(got_m[key]) is type(want_m[key]) is float
                assert_metric(got_m[key], want_m[key], dtype, f"{what} {key}")


def test_verl_policy_metrics_are_not_trivial(verl_core):
    """The inputs above do exercise both clip sides and the dual clip."""
    with use_backend("reference"):
        from vapo_kernels.compat import verl as ours

        logp, old, adv, mask = policy_inputs(0, torch.float32)
        _, m = ours.compute_policy_loss_vanilla(old, logp, adv, mask, "token-mean",
                                                actor_config(0.2, 0.28, 3.0, {}))
    assert 0.05 < m["actor/pg_clipfrac"] < 0.6
    assert m["actor/pg_clipfrac_lower"] > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_verl_deprecated_compute_policy_loss(verl_core, backend, dtype):
    from vapo_kernels.compat import verl as ours

    logp, old, adv, mask = policy_inputs(5, dtype)
    for kwargs in (
        {"cliprange": 0.2},
        {"cliprange": 0.2, "cliprange_high": 0.3, "clip_ratio_c": 4.0},
        {"cliprange_low": 0.1, "cliprange_high": 0.25, "loss_agg_mode": "seq-mean-token-sum"},
    ):
        x_peer, x_ours = leaf(logp), leaf(logp)
        with pytest.warns(FutureWarning, match="compute_policy_loss_vanilla"):
            want = verl_core.compute_policy_loss(old, x_peer, adv, mask, **kwargs)
        with pytest.warns(FutureWarning, match="compute_policy_loss_vanilla"):
            got = ours.compute_policy_loss(old, x_ours, adv, mask, **kwargs)
        assert len(got) == len(want) == 4
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape == ()
        ratio = torch.exp(torch.clamp(logp - old, -20, 20)).double()
        scale = (adv.double().abs() * ratio.clamp(min=4.0))[mask].sum()
        assert_loss(got[0], want[0], scale, dtype, f"pg_loss {kwargs}")
        assert_grad(torch.autograd.grad(got[0], x_ours)[0], torch.autograd.grad(want[0], x_peer)[0],
                    dtype, f"d pg_loss {kwargs}")
        for name, a, b in zip(("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"), got[1:], want[1:]):
            assert not a.requires_grad
            assert_metric(a, b, dtype, f"{name} {kwargs}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("info_kind", ["local", "global"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_verl_value_loss(verl_core, backend, mode, info_kind, dtype):
    from vapo_kernels.compat import verl as ours

    vpreds, returns, values, mask = value_inputs(AGG_MODES.index(mode), dtype)
    info = global_info(mask, info_kind == "global")
    masks = [mask, mask.to(dtype)] if dtype == torch.float32 else [mask]
    for m in masks:
        for clip in (0.5, 0.0, 100.0):
            what = f"{mode} {info_kind} {dtype} mask {m.dtype} clip {clip}"
            x_peer, x_ours = leaf(vpreds), leaf(vpreds)
            args = (returns, values, m, clip, mode)
            want, want_frac = verl_core.compute_value_loss(x_peer, *args, **info)
            got, got_frac = ours.compute_value_loss(x_ours, *args, **info)
            assert got.dtype == want.dtype and got.shape == want.shape == ()
            assert got_frac.dtype == want_frac.dtype and got_frac.shape == ()
            # every per-token term is >= 0: the loss is its own scale
            assert_loss(got, want, want, dtype, what)
            assert_grad(torch.autograd.grad(got, x_ours)[0], torch.autograd.grad(want, x_peer)[0],
                        dtype, what + " d/dvpreds")
            assert_metric(got_frac, want_frac, dtype, what + " vf_clipfrac")
            if clip == 0.5:
                assert 0.02 < float(want_frac) < 0.9  # both branches are exercised


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("info_kind", ["local", "global", "global-dp1"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_verl_agg_loss(verl_core, backend, mode, info_kind, dtype):
    from vapo_kernels.compat import verl as ours

    mask = make_mask(AGG_MODES.index(mode) + 40)
    gen = torch.Generator().manual_seed(7)
    loss_mat = torch.randn(B, T, generator=gen, dtype=torch.float64).to(dtype)
    info = global_info(mask, info_kind != "local")
    if info_kind == "global-dp1":  # global counts without data parallelism
        info["dp_size"] = 1
    # (a float64 mask differs in seq-mean-token-mean: test_verl_float64_mask_epsilon)
    for m in (mask, mask.float(), mask.long()):
        x_peer, x_ours = leaf(loss_mat), leaf(loss_mat)
        want = verl_core.agg_loss(x_peer, m, mode, **info)
        got = ours.agg_loss(x_ours, m, mode, **info)
        what = f"{mode} {info_kind} {dtype} mask {m.dtype}"
        assert got.dtype == want.dtype and got.shape == want.shape == ()
        scale = verl_core.agg_loss(loss_mat.abs(), m, mode, **info)
        assert_loss(got, want, scale, dtype, what)
        assert_grad(torch.autograd.grad(got, x_ours)[0], torch.autograd.grad(want, x_peer)[0],
                    dtype, what + " d/dloss_mat")


def test_verl_agg_loss_argument_errors(verl_core, backend):
    from vapo_kernels.compat import verl as ours

    x, mask = torch.randn(2, 3), torch.ones(2, 3)
    for args, kwargs in (
        (("token-mean",), {"dp_size": 2}),
        (("seq-mean-token-mean",), {"dp_size": 2, "batch_num_tokens": 6}),
        (("bogus",), {}),
    ):
        with pytest.raises(ValueError) as theirs:
            verl_core.agg_loss(x, mask, *args, **kwargs)
        with pytest.raises(ValueError) as mine:
            ours.agg_loss(x, mask, *args, **kwargs)
        assert str(mine.value) == str(theirs.value)
    # token-sum needs no global count
    torch.testing.assert_close(ours.agg_loss(x, mask, "token-sum", dp_size=2),
                               verl_core.agg_loss(x, mask, "token-sum", dp_size=2))


KL_NAMES = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", KL_NAMES + [n + "+" for n in KL_NAMES])
def test_verl_kl_penalty(verl_core, name, dtype):
    from vapo_kernels.compat import verl as ours

    gen = torch.Generator().manual_seed(3)
    logp = (-torch.rand(4, 9, generator=gen, dtype=torch.float64) * 5).to(dtype)
    ref = (logp.double() + torch.randn(4, 9, generator=gen, dtype=torch.float64)).to(dtype)
    ref[0, :4] = logp[0, :4] + torch.tensor([25.0, -25.0, 15.0, 0.0], dtype=dtype)  # clamps of k3
    upstream = torch.randn(4, 9, generator=gen, dtype=torch.float64).to(dtype)
    x_peer, x_ours = leaf(logp), leaf(logp)
    want = verl_core.kl_penalty(x_peer, ref, name)
    got = ours.kl_penalty(x_ours, ref, name)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=0, rtol=tol_of(dtype))
    (g_peer,) = torch.autograd.grad((want * upstream).sum(), x_peer)
    (g_ours,) = torch.autograd.grad((got * upstream).sum(), x_ours)
    torch.testing.assert_close(g_ours, g_peer, atol=0, rtol=tol_of(dtype))


def test_verl_kl_penalty_unknown(verl_core):
    from vapo_kernels.compat import verl as ours

    x = torch.zeros(3)
    for name in ("full", "bogus", "k4+"):
        with pytest.raises(NotImplementedError):
            verl_core.kl_penalty(x, x, name)
        with pytest.raises(NotImplementedError):
            ours.kl_penalty(x, x, name)


def test_verl_output_dtypes(verl_core, backend):
    """fp32 / fp64 follow verl's promotion (a float64 mask promotes); half inputs give
    float32 losses where verl computes in half precision."""
    from vapo_kernels.compat import verl as ours

    logp, old, adv, mask = policy_inputs(9, torch.float32)
    cfg = actor_config(0.2, 0.2, 3.0, {})
    for dt, mdt, want in ((torch.float32, torch.float64, torch.float64),
                          (torch.bfloat16, torch.bool, torch.float32),
                          (torch.float16, torch.bool, torch.float32)):
        args = (old.to(dt), logp.to(dt), adv.to(dt), mask.to(mdt))
        loss, _ = ours.compute_policy_loss_vanilla(*args, "token-mean", cfg)
        assert loss.dtype == want
        if dt == torch.float32:
            assert verl_core.compute_policy_loss_vanilla(*args, "token-mean", cfg)[0].dtype == want
        assert ours.agg_loss(args[1], args[3], "token-mean").dtype == want
        v = ours.compute_value_loss(args[1], args[0], args[2], args[3], 0.5)
        assert v[0].dtype == want
    bf = [t.to(torch.bfloat16) for t in (logp, old, adv)]
    # the bf16 result is the fp32 computation on the bf16 values, not rounded to bf16
    got, _ = ours.compute_policy_loss_vanilla(bf[1], bf[0], bf[2], mask, "token-mean", cfg)
    ref, _ = ours.compute_policy_loss_vanilla(bf[1].float(), bf[0].float(), bf[2].float(), mask,
                                              "token-mean", cfg)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_verl_all_masked_gives_zero_where_verl_gives_nan(verl_core, backend, mode):
    from vapo_kernels.compat import verl as ours

    logp, old, adv, _ = policy_inputs(11, torch.float32)
    vpreds, returns, values, _ = value_inputs(11, torch.float32)
    mask = torch.zeros(B, T, dtype=torch.bool)
    cfg = actor_config(0.2, 0.28, 3.0, {})
    x_peer, x_ours = leaf(logp), leaf(logp)
    want, want_m = verl_core.compute_policy_loss_vanilla(old, x_peer, adv, mask, mode, cfg)
    got, got_m = ours.compute_policy_loss_vanilla(old, x_ours, adv, mask, mode, cfg)
    assert float(got) == 0.0
    assert got_m == want_m == dict.fromkeys(want_m, 0.0)
    (g_ours,) = torch.autograd.grad(got, x_ours)
    assert not g_ours.any()
    if mode == "token-sum":  # nothing to divide
        assert float(want) == 0.0
    else:
        assert math.isnan(float(want))
    v_want, _ = verl_core.compute_value_loss(vpreds, returns, values, mask, 0.5, mode)
    v_got, v_frac = ours.compute_value_loss(vpreds, returns, values, mask, 0.5, mode)
    assert float(v_got) == 0.0 and float(v_frac) == 0.0
    assert math.isnan(float(v_want)) == (mode != "token-sum")


def test_verl_nan_in_masked_slots(verl_core, backend):
    """NaN garbage in masked slots: ours equals verl on the same batch with the garbage
    zeroed; verl's seq-mean loss is NaN, and NaN advantages make its gradient NaN there."""
    from vapo_kernels.compat import verl as ours

    logp, old, adv, mask = policy_inputs(13, torch.float32)
    cfg = actor_config(0.2, 0.28, 3.0, {})
    nan = float("nan")
    clean = [torch.where(mask, x, 0.0) for x in (logp, old, adv)]
    for mode in ("token-mean", "seq-mean-token-mean"):
        x_clean = leaf(clean[0])
        want, want_m = verl_core.compute_policy_loss_vanilla(
            clean[1], x_clean, clean[2], mask, mode, cfg
        )
        (g_want,) = torch.autograd.grad(want, x_clean)
        for dirty_logp in (False, True):
            dirty = [torch.where(mask, x, nan) for x in (logp, old, adv)]
            x_ours = leaf(dirty[0] if dirty_logp else logp)
            got, got_m = ours.compute_policy_loss_vanilla(
                dirty[1], x_ours, dirty[2], mask, mode, cfg
            )
            assert_loss(got, want, float(adv.abs().max()) * 3, torch.float32, mode)
            (g_ours,) = torch.autograd.grad(got, x_ours)
            assert_grad(g_ours, g_want, torch.float32, mode)
            assert not g_ours[~mask].any()
            for key in want_m:
                assert_metric(got_m[key], want_m[key], torch.float32, key)
        x_peer = leaf(logp)  # NaN advantages, finite garbage elsewhere
        peer, _ = verl_core.compute_policy_loss_vanilla(old, x_peer, dirty[2], mask, mode, cfg)
        if mode == "token-mean":  # verl's masked_sum selects: finite loss, NaN gradient
            assert_loss(peer, want, float(adv.abs().max()) * 3, torch.float32, "verl dirty")
            assert torch.autograd.grad(peer, x_peer)[0][~mask].isnan().any()
        else:  # seq-mean modes multiply by the mask
            assert math.isnan(float(peer))


def test_verl_float64_mask_epsilon(verl_core, backend):
    """float64 with a float64 mask: verl's per-sequence mean divides by n_s + 1e-8 (a
    relative 1e-8 / n_s), the adapter by n_s, which is verl's result with a bool mask.
    The metrics reproduce verl's + 1e-8."""
    from vapo_kernels.compat import verl as ours

    vpreds, returns, values, mask = value_inputs(17, torch.float64)
    m64 = mask.double()
    mode = "seq-mean-token-mean"
    want_bool, _ = verl_core.compute_value_loss(vpreds, returns, values, mask, 0.5, mode)
    want64, want_frac = verl_core.compute_value_loss(vpreds, returns, values, m64, 0.5, mode)
    got, got_frac = ours.compute_value_loss(vpreds, returns, values, m64, 0.5, mode)
    assert abs(float(got) - float(want_bool)) <= 1e-12 * float(want_bool)
    rel = abs(float(got) - float(want64)) / float(want64)
    assert 1e-11 < rel < 1e-8
    assert abs(float(got_frac) - float(want_frac)) <= 1e-15


def test_verl_fractional_mask_refused(verl_core):
    from vapo_kernels.compat import verl as ours

    logp, old, adv, mask = policy_inputs(19, torch.float32)
    frac = mask.float() * 0.5
    with pytest.raises(ValueError, match="binary"):
        ours.compute_policy_loss_vanilla(
            old, logp, adv, frac, "token-mean", actor_config(0.2, 0.2, 3.0, {})
        )
    with pytest.raises(ValueError, match="binary"):
        ours.agg_loss(logp, frac, "token-mean")


def test_verl_patch_swaps_and_restores(verl_core, monkeypatch):
    from vapo_kernels.compat import verl as adapter

    losses = import_peer("verl.workers.utils.losses")  # imports them by name
    names = ["compute_policy_loss_vanilla", "compute_policy_loss", "agg_loss",
             "compute_value_loss", "kl_penalty"]
    originals = {n: getattr(verl_core, n) for n in names}
    original_vanilla = verl_core.get_policy_loss_fn("vanilla")
    originals_losses = {
        n: getattr(losses, n) for n in ("agg_loss", "compute_value_loss", "kl_penalty")
    }
    assert original_vanilla is originals["compute_policy_loss_vanilla"]

    calls = []
    real = adapter._agg_loss_named  # vapo_kernels.agg_loss under verl's argument names

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(adapter, "_agg_loss_named", counted)
    logp, old, adv, mask = policy_inputs(23, torch.float32)
    cfg = actor_config(0.2, 0.28, 3.0, {})
    want_gpg = verl_core.get_policy_loss_fn("gpg")(old, logp, adv, mask, "token-mean", cfg)[0]
    try:
        adapter.patch(gae=False, logprobs=False, linear_ce=False)
        adapter.patch()  # idempotent, and completes the patch
        assert adapter.is_patched()
        for n in names:
            assert getattr(verl_core, n) is getattr(adapter, n), n
        for n in originals_losses:
            assert getattr(losses, n) is getattr(adapter, n), n
        assert verl_core.get_policy_loss_fn("vanilla") is adapter.compute_policy_loss_vanilla
        # verl's other policy losses aggregate through core_algos' agg_loss: the fused op
        got_gpg = verl_core.get_policy_loss_fn("gpg")(old, logp, adv, mask, "token-mean", cfg)[0]
        assert calls, "verl's gpg loss did not reach the adapter's agg_loss"
        torch.testing.assert_close(got_gpg, want_gpg, atol=1e-6, rtol=1e-6)
    finally:
        adapter.unpatch()
    adapter.unpatch()  # idempotent
    assert not adapter.is_patched()
    for n in names:
        assert getattr(verl_core, n) is originals[n], n
    for n, fn in originals_losses.items():
        assert getattr(losses, n) is fn, n
    assert verl_core.get_policy_loss_fn("vanilla") is original_vanilla


# --------------------------------------------------------------------------------------
# OpenRLHF


def openrlhf_info(mask, kind):
    if kind == "local":
        return {}
    if kind == "local-dp":  # dp_size without global counts: OpenRLHF ignores it
        return {"dp_size": 4}
    # as OpenRLHF's get_loss_batch_info builds them: float32 tensors (all-reduced)
    tokens = mask.sum().float()
    seqs = (mask.sum(-1) > 0).sum().float()
    return {"dp_size": 4, "batch_num_tokens": 3 * tokens + 5, "global_batch_size": 4 * seqs - 1}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("info_kind", ["local", "local-dp", "global"])
@pytest.mark.parametrize("token_level_loss", [True, False], ids=["token", "sample"])
def test_openrlhf_policy_loss(openrlhf_loss, backend, token_level_loss, info_kind, dtype):
    from vapo_kernels.compat import openrlhf as ours

    seed = 50 + 3 * token_level_loss + ["local", "local-dp", "global"].index(info_kind)
    logp, old, adv, mask = policy_inputs(seed, dtype)
    info = openrlhf_info(mask, info_kind)
    masks = [mask, mask.to(dtype)] if dtype == torch.float32 else [mask]
    for m in masks:
        for low, high, dual in ((0.2, 0.2, None), (0.2, 0.28, 3.0), (1.2, 0.1, 1.5)):
            kwargs = dict(clip_eps_low=low, clip_eps_high=high, dual_clip=dual,
                          token_level_loss=token_level_loss)
            what = f"{kwargs} {info_kind} {dtype} mask {m.dtype}"
            x_peer, x_ours = leaf(logp), leaf(logp)
            want = openrlhf_loss.PolicyLoss(**kwargs)(x_peer, old, adv, action_mask=m, **info)
            got = ours.PolicyLoss(**kwargs)(x_ours, old, adv, action_mask=m, **info)
            assert len(got) == len(want) == 5 and got[3:] == want[3:] == (None, None)
            for a, b in zip(got[:3], want[:3]):
                assert a.dtype == b.dtype and a.shape == b.shape == (), what
            ratio = torch.exp(torch.clamp(logp - old, -20, 20)).double()
            bound = adv.double().abs() * ratio.clamp(min=dual or 1.3)
            scale = openrlhf_loss.aggregate_loss(
                torch.where(m.bool(), bound, 0), m, token_level_loss, **info
            )
            assert_loss(got[0], want[0], scale, dtype, what)
            (g_ours,) = torch.autograd.grad(got[0], x_ours)
            assert_grad(g_ours, torch.autograd.grad(want[0], x_peer)[0], dtype, what + " d/dlogp")
            assert_metric(got[1], want[1], dtype, what + " clip_ratio")
            # OpenRLHF's ppo_kl averages the unclamped log-ratio, ours the clamped one: the
            # two log-ratios beyond +-20 (+25 and -25, row 2) cancel in both sums.
            assert_metric(got[2], want[2], dtype, what + " ppo_kl")
            assert not got[1].requires_grad and not got[2].requires_grad


def test_openrlhf_ppo_kl_uses_the_clamped_log_ratio(openrlhf_loss, backend):
    from vapo_kernels.compat import openrlhf as ours

    logp, old, adv, mask = policy_inputs(61, torch.float64)
    old[2, 0] = logp[2, 0] + 30.0  # one log-ratio of -30: clamped to -20 in ours
    old[2, 1] = logp[2, 1]
    want = openrlhf_loss.PolicyLoss()(logp, old, adv, mask)
    got = ours.PolicyLoss()(logp, old, adv, mask)
    n = int(mask.sum())
    assert abs(float(got[0]) - float(want[0])) <= 1e-12 * (1 + abs(float(want[0])))
    assert abs((float(want[2]) - float(got[2])) * n - 10.0) < 1e-9  # -(-30) vs -(-20)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("info_kind", ["local", "local-dp", "global"])
@pytest.mark.parametrize("token_level_loss", [True, False], ids=["token", "sample"])
def test_openrlhf_value_loss_and_aggregate(
    openrlhf_loss, backend, token_level_loss, info_kind, dtype
):
    from vapo_kernels.compat import openrlhf as ours

    vpreds, returns, values, mask = value_inputs(70 + token_level_loss, dtype)
    info = openrlhf_info(mask, info_kind)
    masks = [mask, mask.to(dtype)] if dtype == torch.float32 else [mask]
    for m in masks:
        for clip in (None, 0.2, 0.0):
            what = f"clip {clip} {token_level_loss} {info_kind} {dtype} mask {m.dtype}"
            x_peer, x_ours = leaf(vpreds), leaf(vpreds)
            args = (values, returns, m)
            want = openrlhf_loss.ValueLoss(clip, token_level_loss)(x_peer, *args, **info)
            got = ours.ValueLoss(clip, token_level_loss)(x_ours, *args, **info)
            assert got.dtype == want.dtype and got.shape == want.shape == ()
            assert_loss(got, want, want, dtype, what)
            assert_grad(torch.autograd.grad(got, x_ours)[0], torch.autograd.grad(want, x_peer)[0],
                        dtype, what + " d/dvalues")
        x_peer, x_ours = leaf(returns), leaf(returns)
        want = openrlhf_loss.aggregate_loss(x_peer, m, token_level_loss, **info)
        got = ours.aggregate_loss(x_ours, m, token_level_loss, **info)
        scale = openrlhf_loss.aggregate_loss(returns.abs(), m, token_level_loss, **info)
        assert got.dtype == want.dtype
        assert_loss(got, want, scale, dtype, f"aggregate_loss {token_level_loss} {info_kind}")
        assert_grad(torch.autograd.grad(got, x_ours)[0], torch.autograd.grad(want, x_peer)[0],
                    dtype, "d aggregate_loss")


def test_openrlhf_no_mask(openrlhf_loss, backend):
    from vapo_kernels.compat import openrlhf as ours

    logp, old, adv, mask = policy_inputs(80, torch.float32)
    logp, old, adv = (torch.where(mask, x, -1.0) for x in (logp, old, adv))
    want = openrlhf_loss.PolicyLoss(dual_clip=3.0)(logp, old, adv)
    got = ours.PolicyLoss(dual_clip=3.0)(logp, old, adv)
    for a, b in zip(got[:3], want[:3]):
        assert_metric(a, b, torch.float32, "no mask")
    vpreds, returns, values, _ = value_inputs(80, torch.float32)
    args = (vpreds, values, returns)
    assert_metric(ours.ValueLoss(0.2)(*args), openrlhf_loss.ValueLoss(0.2)(*args),
                  torch.float32, "value, no mask")


def test_openrlhf_all_masked_and_nan_garbage(openrlhf_loss, backend):
    from vapo_kernels.compat import openrlhf as ours

    logp, old, adv, mask = policy_inputs(83, torch.float32)
    none = torch.zeros_like(mask)
    for token_level_loss in (True, False):
        want = openrlhf_loss.PolicyLoss(token_level_loss=token_level_loss)(logp, old, adv, none)
        got = ours.PolicyLoss(token_level_loss=token_level_loss)(logp, old, adv, none)
        assert all(math.isnan(float(x)) for x in want[:3])
        assert all(float(x) == 0.0 for x in got[:3])
    dirty = [torch.where(mask, x, float("nan")) for x in (logp, old, adv)]
    clean = [torch.where(mask, x, 0.0) for x in (logp, old, adv)]
    want = openrlhf_loss.PolicyLoss(dual_clip=3.0)(*clean, mask)
    got = ours.PolicyLoss(dual_clip=3.0)(*dirty, mask)
    for a, b in zip(got[:3], want[:3]):
        assert_metric(a, b, torch.float32, "nan garbage")
    assert math.isnan(float(openrlhf_loss.PolicyLoss(dual_clip=3.0)(*dirty, mask)[0]))


def test_openrlhf_options(openrlhf_loss):
    from vapo_kernels.compat import openrlhf as ours

    for kwargs in ({"policy_loss_type": "gspo"}, {"is_correction_level": "token"},
                   {"is_correction_level": "seq", "is_correction_mode": "mask"}):
        openrlhf_loss.PolicyLoss(**kwargs)  # valid in OpenRLHF
        with pytest.raises(NotImplementedError, match="ppo"):
            ours.PolicyLoss(**kwargs)
    for kwargs, exc in (
        ({"dual_clip": 1.0}, AssertionError),
        ({"is_correction_level": "bogus"}, ValueError),
        ({"is_correction_mode": "clip", "is_correction_level": "seq"}, ValueError),
        ({"is_correction_gating": "tv", "is_correction_level": "token"}, ValueError),
    ):
        with pytest.raises(exc) as theirs:
            openrlhf_loss.PolicyLoss(**kwargs)
        with pytest.raises(exc) as mine:
            ours.PolicyLoss(**kwargs)
        assert str(mine.value) == str(theirs.value)


def test_openrlhf_patch_swaps_and_restores():
    from vapo_kernels.compat import openrlhf as adapter

    with openrlhf_modules("openrlhf.models.loss", "openrlhf.models") as (loss, models):
        names = ("PolicyLoss", "ValueLoss", "aggregate_loss")
        originals = {n: getattr(loss, n) for n in names}
        for n in names:  # the real package __init__ re-exports them
            setattr(models, n, originals[n])
        importer = ModuleType("openrlhf._vapo_importer")  # e.g. the Ray PPO actor
        importer.PolicyLoss = originals["PolicyLoss"]
        import sys

        sys.modules[importer.__name__] = importer
        try:
            adapter.patch(logprobs=False)
            adapter.patch()
            assert adapter.is_patched()
            for mod in (loss, models):
                assert issubclass(mod.PolicyLoss, adapter.PolicyLoss)
                assert mod.ValueLoss is adapter.ValueLoss
                assert mod.aggregate_loss is adapter.aggregate_loss
            assert importer.PolicyLoss is loss.PolicyLoss
            fused = models.PolicyLoss(0.2, 0.28, 3.0, True)
            assert isinstance(fused, adapter.PolicyLoss)
            gspo = models.PolicyLoss(0.2, 0.2, None, True, "gspo")  # falls back to OpenRLHF's
            assert type(gspo) is originals["PolicyLoss"] and gspo.policy_loss_type == "gspo"
            tis = models.PolicyLoss(is_correction_level="token", is_correction_mode="clip")
            assert type(tis) is originals["PolicyLoss"]
            logp, old, adv, mask = policy_inputs(90, torch.float32)
            with use_backend("reference"):
                got = fused(logp, old, adv, mask)[0]
            want = originals["PolicyLoss"](0.2, 0.28, 3.0, True)(logp, old, adv, mask)[0]
            assert_metric(got, want, torch.float32, "patched PolicyLoss")
        finally:
            adapter.unpatch()
            sys.modules.pop(importer.__name__, None)
        adapter.unpatch()
        assert not adapter.is_patched()
        for mod in (loss, models):
            for n in names:
                assert getattr(mod, n) is originals[n]
        assert importer.PolicyLoss is originals["PolicyLoss"]


# --------------------------------------------------------------------------------------
# TRL

_TRL_LOSS_START = "vpredclipped = torch.clamp("
_TRL_LOSS_END = "loss = pg_loss + args.vf_coef * vf_loss"
_TRL_CLIPFRAC = "pg_clipfrac = masked_mean("


@pytest.fixture(scope="module")
def trl_loss_block():
    """TRL's own lines, read from the installed ``ppo_trainer.py``: (namespace with its
    ``masked_mean`` and ``INVALID_LOGPROB``, the loss lines, the pg_clipfrac lines)."""
    path, source = trl_ppo_trainer_source()
    wanted = {"masked_mean", "INVALID_LOGPROB"}
    helpers = [
        n for n in ast.parse(source).body
        if (isinstance(n, ast.FunctionDef) and n.name in wanted)
        or (isinstance(n, ast.Assign) and any(getattr(t, "id", "") in wanted for t in n.targets))
    ]
    namespace = {"torch": torch}
    exec(compile(ast.Module(helpers, []), str(path), "exec"), namespace)  # noqa: S102 - TRL's code
    lines = source.splitlines()
    start = next(i for i, s in enumerate(lines) if _TRL_LOSS_START in s)
    end = next(i for i in range(start, len(lines)) if _TRL_LOSS_END in lines[i])
    clip = next(i for i in range(end, len(lines)) if _TRL_CLIPFRAC in lines[i])
    clip_end = next(i for i in range(clip, len(lines)) if lines[i].strip() == ")")
    loss_code = compile(textwrap.dedent("\n".join(lines[start : end + 1])), str(path), "exec")
    clip_code = compile(textwrap.dedent("\n".join(lines[clip : clip_end + 1])), str(path), "exec")
    return namespace, loss_code, clip_code


def trl_inputs(seed, dtype, batch=B, length=T):
    """TRL's micro-batch: masks from sequence lengths (-1: empty response), log-probs
    filled with INVALID_LOGPROB and value predictions with 0 where TRL fills them."""
    gen = torch.Generator().manual_seed(seed)
    seq_len = torch.randint(-1, length, (batch,), generator=gen)
    seq_len[0], seq_len[1] = -1, length - 1
    idx = torch.arange(length).repeat(batch, 1)
    padding_mask = idx > seq_len[:, None]
    padding_mask_p1 = idx > seq_len[:, None] + 1
    logp, old, adv, _ = policy_inputs(seed, torch.float64, batch, length)
    old[2, :2] = logp[2, :2] + torch.tensor([0.5, -0.5], dtype=torch.float64)  # no +-25 here
    logp, old = logp.masked_fill(padding_mask, 1.0), old.masked_fill(padding_mask, 1.0)
    adv = adv.masked_fill(padding_mask, 0)
    vpreds, returns, values, _ = value_inputs(seed, torch.float64)
    vpreds = vpreds[:batch, :length].masked_fill(padding_mask_p1, 0)
    values = values[:batch, :length].masked_fill(padding_mask_p1, 0)
    returns = returns[:batch, :length]
    return ([t.to(dtype) for t in (logp, old, adv, vpreds, values, returns)],
            padding_mask, padding_mask_p1)


def run_trl(block, tensors, padding_mask, padding_mask_p1, cliprange, cliprange_value, vf_coef):
    namespace, loss_code, clip_code = block
    logp, old, adv, vpreds, values, returns = tensors
    ns = dict(namespace)
    ns.update(
        args=SimpleNamespace(cliprange=cliprange, cliprange_value=cliprange_value, vf_coef=vf_coef),
        new_logprobs=logp, mb_logprobs=old, mb_advantage=adv, vpred=vpreds, mb_values=values,
        mb_return=returns, padding_mask=padding_mask, padding_mask_p1=padding_mask_p1,
        micro_batch_inds=torch.arange(logp.shape[0]),
    )
    exec(loss_code, ns)  # noqa: S102 - TRL's own lines, read from the installed file
    with torch.no_grad():
        exec(clip_code, ns)  # noqa: S102
    return ns["loss"], ns["pg_loss"], ns["vf_loss"], ns["pg_clipfrac"], ns["vf_clipfrac"]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize(("cliprange", "cliprange_value", "vf_coef"),
                         [(0.2, 0.2, 0.1), (0.1, 0.5, 1.0), (1.3, 0.0, 0.5)])
def test_trl_ppo_loss(trl_loss_block, backend, cliprange, cliprange_value, vf_coef, dtype):
    from vapo_kernels.compat.trl import ppo_loss

    tensors, pm, pm1 = trl_inputs(100 + int(cliprange * 10), dtype)
    # TRL's ratio is not clamped: keep the log-ratios in a range where exp is finite
    leaves_peer = [leaf(t) for t in tensors]
    leaves_ours = [leaf(t) for t in tensors]
    want = run_trl(trl_loss_block, leaves_peer, pm, pm1, cliprange, cliprange_value, vf_coef)
    got = ppo_loss(*leaves_ours, pm, pm1, cliprange, cliprange_value, vf_coef)
    logp, old, adv = tensors[:3]
    scale = (adv.double().abs() * torch.exp(logp.double() - old.double()).clamp(min=1.5))[~pm].sum()
    scale = scale / (~pm).sum() + float(want[2]) * vf_coef
    what = f"TRL {cliprange} {cliprange_value} {vf_coef} {dtype}"
    for name, a, b in zip(("loss", "pg_loss", "vf_loss"), got[:3], want[:3]):
        assert a.dtype == b.dtype and a.shape == b.shape == (), name
        assert_loss(a, b, scale, dtype, f"{what} {name}")
    for name, a, b in zip(("pg_clipfrac", "vf_clipfrac"), got[3:], want[3:]):
        assert a.dtype == b.dtype == torch.float32 and not a.requires_grad, name
        assert_metric(a, b, dtype, f"{what} {name}")
    for i, name in ((0, "new_logprobs"), (3, "vpred")):
        (g_ours,) = torch.autograd.grad(got[0], leaves_ours[i], retain_graph=True)
        (g_peer,) = torch.autograd.grad(want[0], leaves_peer[i], retain_graph=True)
        assert_grad(g_ours, g_peer, dtype, f"{what} d loss / d {name}")
    assert 0 < float(want[3]) < 1 and (cliprange_value == 0 or 0 < float(want[4]) < 1)


def test_trl_ppo_loss_large_log_ratios_are_not_clamped(trl_loss_block, backend):
    """TRL exponentiates the raw log-ratio (verl / OpenRLHF clamp it to +-20)."""
    from vapo_kernels.compat.trl import ppo_loss

    tensors, pm, pm1 = trl_inputs(120, torch.float64)
    spread = torch.linspace(-30, 30, int((~pm).sum()), dtype=torch.float64)
    tensors[1][~pm] = tensors[0][~pm] + spread
    leaves_peer, leaves_ours = [leaf(t) for t in tensors], [leaf(t) for t in tensors]
    want = run_trl(trl_loss_block, leaves_peer, pm, pm1, 0.2, 0.2, 0.1)
    got = ppo_loss(*leaves_ours, pm, pm1, 0.2, 0.2, 0.1)
    torch.testing.assert_close(got[1], want[1], atol=0, rtol=1e-12)
    (g_ours,) = torch.autograd.grad(got[0], leaves_ours[0])
    (g_peer,) = torch.autograd.grad(want[0], leaves_peer[0])
    torch.testing.assert_close(g_ours, g_peer, atol=0, rtol=1e-12)


def test_trl_ppo_loss_all_padding(trl_loss_block, backend):
    from vapo_kernels.compat.trl import ppo_loss

    tensors, _, _ = trl_inputs(130, torch.float32)
    everything = torch.ones(B, T, dtype=torch.bool)
    want = run_trl(trl_loss_block, tensors, everything, everything, 0.2, 0.2, 0.1)
    got = ppo_loss(*tensors, everything, everything, 0.2, 0.2, 0.1)
    assert all(math.isnan(float(x)) for x in want)
    assert all(float(x) == 0.0 for x in got)
