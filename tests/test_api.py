"""The public API's conventions (README "API conventions"): one vocabulary, errors that
name the user's argument instead of silent acceptance, metrics from the loss pass, and
the eager fast path of every op against its ``torch.ops.vapo`` twin."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vapo_kernels as vk
from vapo_kernels import _library
from vapo_kernels.ops import gae as gae_mod
from vapo_kernels.ops import loss_spec
from vapo_kernels.ops import token_loss as token_loss_mod

from strategies import backend_params, interpreted

B, T = 3, 7


def _batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=dtype)
    values = torch.randn(B, T, generator=g, dtype=dtype)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[:, 0] = True
    logp = -torch.rand(B, T, generator=g, dtype=dtype)
    old = logp + 0.1 * torch.randn(B, T, generator=g, dtype=dtype)
    return rewards, values, mask, logp, old


# --------------------------------------------------------------------------------------
# Silent acceptance, found by a new user: each is now an error naming the argument.


def test_fractional_float_mask_is_refused_everywhere():
    rewards, values, mask, logp, old = _batch()
    half = mask.float() * 0.5
    with pytest.raises(ValueError, match="mask must hold only 0 and 1.*0.5"):
        vk.gae(rewards, values, half)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        vk.policy_loss(logp, old, rewards, half)
    logits = torch.randn(B, T, 11)
    targets = torch.randint(0, 11, (B, T))
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        vk.token_logprobs(logits, targets, mask=half)
    # 0 / 1 floats and ints are masks, and give what the bool mask gives.
    want = vk.gae(rewards, values, mask)
    for as_dtype in (torch.float32, torch.int64, torch.uint8):
        got = vk.gae(rewards, values, mask.to(as_dtype))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_nan_in_a_float_mask_is_refused():
    rewards, values, mask, *_ = _batch()
    bad = mask.float()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        vk.gae(rewards, values, bad)


@pytest.mark.parametrize(
    "coef,needs", [("kl_coef", "ref_logp"), ("entropy_coef", "entropy"), ("lm_coef", "positive")]
)
def test_a_coefficient_without_its_term_is_an_error(coef, needs):
    rewards, values, mask, logp, old = _batch()
    with pytest.raises(ValueError, match=f"{coef}=0.1 is set but its term is off: pass {needs}"):
        vk.vapo_loss(logp, old, rewards, mask, **{coef: 0.1})
    vk.vapo_loss(logp, old, rewards, mask, **{coef: 0.0})  # an explicit 0 ignores nothing


def test_vf_coef_without_values_is_an_error():
    rewards, values, mask, logp, old = _batch()
    with pytest.raises(ValueError, match="vf_coef=0.5 is set but its term is off"):
        vk.vapo_loss(logp, old, rewards, mask, vf_coef=0.5)


def test_from_logits_coefficient_without_its_term_is_an_error():
    logits = torch.randn(B, T, 11)
    targets = torch.randint(0, 11, (B, T))
    rewards, _, mask, _, old = _batch()
    with pytest.raises(ValueError, match="kl_coef=0.1 is set but its term is off: pass ref_logp"):
        vk.policy_loss_from_logits(logits, targets, old, rewards, mask, kl_coef=0.1)


def test_flat_rows_without_cu_seqlens_name_the_users_argument():
    n, h, v = 10, 8, 13
    hidden = torch.randn(n, h)
    weight = torch.randn(v, h)
    targets = torch.randint(0, v, (n,))
    old, adv = -torch.rand(n), torch.randn(n)
    with pytest.raises(ValueError, match="hidden is flat.*pass cu_seqlens"):
        vk.policy_loss_from_hidden(hidden, weight, targets, old, adv)
    with pytest.raises(ValueError, match="logits is flat.*pass cu_seqlens"):
        vk.policy_loss_from_logits(torch.randn(n, v), targets, old, adv)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    loss, _ = vk.policy_loss_from_hidden(hidden, weight, targets, old, adv, None, cu)
    assert torch.isfinite(loss)


def test_kl_kind_none_or_unknown_is_refused_not_taken_as_off():
    rewards, _, mask, logp, old = _batch(11)
    logits = torch.randn(B, T, 9)
    targets = torch.randint(0, 9, (B, T))
    for kind in (None, 3, "bogus"):
        with pytest.raises(ValueError, match=f"kl_kind must be one of.*got {kind!r}"):
            vk.kl_loss(logp, old, mask, kl_kind=kind)
        with pytest.raises(ValueError, match="kl_kind must be one of"):
            vk.vapo_loss(logp, old, rewards, mask, ref_logp=old, kl_coef=0.5, kl_kind=kind)
        with pytest.raises(ValueError, match="kl_kind must be one of"):
            vk.policy_loss_from_logits(logits, targets, old, rewards, mask, ref_logp=old,
                                       kl_coef=1.0, kl_kind=kind)


@pytest.mark.parametrize("name, value", [
    ("dp_size", 0), ("dp_size", -1), ("dp_size", 1.5), ("dp_size", float("nan")),
    ("dp_size", "2"), ("dp_size", None), ("loss_scale_factor", 0), ("loss_scale_factor", -4.0),
    ("loss_scale_factor", float("nan")), ("global_tokens", float("inf")),
    ("global_tokens", -1), ("global_tokens", torch.tensor([4.0, 4.0])), ("clip_low", None),
    ("clip_high", [0.2]), ("clip_low", True), ("dual_clip", "3"),
])
def test_bad_scalar_options_are_refused_by_name(name, value):
    rewards, _, mask, logp, old = _batch(12)
    kw = {"agg": "seq-mean-token-sum-norm"} if name == "loss_scale_factor" else {}
    vk.policy_loss(logp, old, rewards, mask, clip_low=1)  # a cached 1 must not pass True
    with pytest.raises(ValueError, match=f"{name} must be"):
        vk.policy_loss(logp, old, rewards, mask, **{name: value}, **kw)


def test_numpy_scalars_and_one_element_tensors_are_numbers():
    np = pytest.importorskip("numpy")
    rewards, _, mask, logp, old = _batch(13)
    want, _ = vk.policy_loss(logp, old, rewards, mask, clip_low=0.5, global_tokens=8.0,
                             dp_size=2)
    for clip, tokens, dp in ((np.float32(0.5), np.int64(8), np.int64(2)),
                             (0.5, torch.tensor([8]), 2)):
        got, _ = vk.policy_loss(logp, old, rewards, mask, clip_low=clip, global_tokens=tokens,
                                dp_size=dp)
        assert torch.equal(got, want)


def test_positive_flags_hold_only_0_and_1():
    _, _, mask, logp, _ = _batch(14)
    for bad in (0.5, float("nan"), -1.0):
        flags = torch.tensor([1.0, bad, 0.0])
        with pytest.raises(ValueError, match="positive must hold only 0 and 1"):
            vk.positive_lm_loss(logp, flags, mask)
    want, _ = vk.positive_lm_loss(logp, torch.tensor([True, False, True]), mask)
    got, _ = vk.positive_lm_loss(logp, torch.tensor([1.0, 0.0, 1.0]), mask)
    assert torch.equal(got, want)


def test_errors_name_the_argument_the_user_passed():
    _, _, mask, logp, old = _batch(15)
    bad = logp.clone()
    bad[~mask] = float("nan")  # garbage where masked is fine
    vk.agg_loss(bad, mask)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="loss_mat contains NaN"):
        vk.agg_loss(bad, mask)
    with pytest.raises(TypeError, match="loss_mat must be float"):
        vk.agg_loss(logp.int(), mask)
    with pytest.raises(TypeError, match="logp must be a torch.Tensor"):
        vk.policy_loss(logp.tolist(), old, old, mask)
    hidden, weight = torch.randn(B, T, 4), torch.randn(6, 4)
    targets = torch.randint(0, 6, (B, T))
    for which, msg in (("hidden", "hidden contains NaN or inf"), ("weight", "weight contains")):
        h, w = hidden.clone(), weight.clone()
        (h[0, 0] if which == "hidden" else w[2]).fill_(float("nan"))
        with pytest.raises(ValueError, match=msg):
            vk.policy_loss_from_hidden(h, w, targets, old, old, mask)
    h = hidden.clone()
    h[~mask] = float("nan")  # a masked token's hidden state is garbage: ignored
    loss, _ = vk.policy_loss_from_hidden(h, weight, targets, old, old, mask)
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------------------
# One vocabulary


def test_every_loss_returns_loss_and_metrics():
    rewards, values, mask, logp, old = _batch()
    positive = torch.tensor([True, False, True])
    calls = {
        "policy_loss": lambda: vk.policy_loss(logp, old, rewards, mask),
        "value_loss": lambda: vk.value_loss(values, values.flip(0), rewards, mask, value_clip=0.2),
        "kl_loss": lambda: vk.kl_loss(logp, old, mask, kl_kind="k3"),
        "agg_loss": lambda: vk.agg_loss(rewards, mask),
        "positive_lm_loss": lambda: vk.positive_lm_loss(logp, positive, mask),
        "vapo_loss": lambda: vk.vapo_loss(logp, old, rewards, mask),
    }
    for name, call in calls.items():
        loss, metrics = call()
        assert loss.dim() == 0, name
        assert "tokens" in metrics and metrics["tokens"] == mask.sum(), name
        assert all(v.dim() == 0 for v in dict(metrics).values()), name


def test_metrics_are_a_read_only_mapping_of_the_pass():
    rewards, values, mask, logp, old = _batch()
    loss, m = vk.vapo_loss(
        logp, old, rewards, mask, values=values, old_values=values, returns=rewards
    )
    keys = list(m)
    assert keys[0] == "tokens" and "clipfrac_high" in keys and "explained_var" in keys
    assert set(dict(m)) == set(keys) == set({**m})
    with pytest.raises(KeyError):
        m["no_such_metric"]
    with pytest.raises(TypeError):
        m["tokens"] = 0  # a Mapping, not a dict
    assert m["clipfrac"] == m["clipfrac_low"] + m["clipfrac_high"]


def test_explained_variance_is_verls_formula():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(4, 9, generator=g, dtype=torch.float64)
    returns = values + 0.3 * torch.randn(4, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 9, generator=g) < 0.8
    garbage = torch.where(mask, returns, torch.tensor(1e30, dtype=torch.float64))
    _, m = vk.value_loss(values, None, garbage, mask, value_clip=None)
    r, v = returns[mask], values[mask]
    want = 1 - torch.var(r - v) / (torch.var(r) + 1e-5)  # verl's metric, unbiased
    torch.testing.assert_close(m["explained_var"], want, rtol=1e-10, atol=1e-12)
    nothing = torch.zeros(4, 9, dtype=torch.bool)
    _, empty = vk.value_loss(values, None, returns, nothing, value_clip=None)
    assert empty["explained_var"] == 0  # no valid token: 0, not NaN


@pytest.mark.parametrize("backend,device", backend_params("loss"))
@pytest.mark.parametrize("level", [1e3, -3e4])
def test_explained_variance_is_exact_when_returns_are_far_from_zero(backend, device, level):
    """fp32 returns at |R| ~ 1e3-1e4 with a spread of ~1: one-pass sums of R^2 put the
    metric 1e-2 off (or anywhere, at 1e4); the centred sums keep it to fp32's rounding of
    the inputs, over more than one block of every backend (and across C++ chunks)."""
    g = torch.Generator().manual_seed(5)
    shape = (3, 7000) if not interpreted(backend, device) else (2, 1500)
    returns = level + torch.randn(shape, generator=g)
    values = returns + 0.5 * torch.randn(shape, generator=g) + level / 3  # a biased critic
    mask = torch.rand(shape, generator=g) < 0.7
    r, v = returns.double()[mask], values.double()[mask]
    want = float(1 - torch.var(r - v) / (torch.var(r) + 1e-5))
    garbage = torch.where(mask, returns, torch.tensor(float("nan")))
    _, m = vk.value_loss(values.to(device), None, garbage.to(device), mask.to(device),
                         value_clip=None, backend=backend)
    assert abs(float(m["explained_var"]) - want) < 2e-5


# --------------------------------------------------------------------------------------
# The eager fast path and the dispatcher run the same code


def _gae_args(rewards, values, mask):
    return gae_mod.GaeArgs(
        rewards, values, mask, None, None, None, 0.9, 1.0, 0.99, 0.05, "skip", ""
    )


def test_eager_gae_equals_the_dispatched_op():
    rewards, values, mask, *_ = _batch(1)
    a = _gae_args(rewards, values, mask)
    fast = gae_mod.gae_op(a)
    slow = torch.ops.vapo.gae(*a)
    for f, s in zip(fast, slow):
        assert torch.equal(f, s)


def _python_autograd_function(monkeypatch):
    """As if the C++ extension had no loss node: eager calls take the Python Function."""
    monkeypatch.setattr(_library, "_node_tried", True)
    monkeypatch.setattr(_library, "_node", None)


def _token_loss_with_every_gradient(call, dtype):
    """A loss with a gradient for logp (policy, KL), values and entropy, backpropagated
    with a non-unit incoming gradient; returns what must agree across the paths."""
    rewards, values, mask, logp, old = _batch(2)
    x = logp.clone().to(dtype).requires_grad_()
    v = values.clone().to(dtype).requires_grad_()
    h = rewards.abs().to(dtype).requires_grad_()
    params = loss_spec.loss_params(
        dual_clip=3.0, value_clip=0.2, kl_kind="k3", vf_coef=0.5, kl_coef=0.1,
        entropy_coef=0.01,
    )
    a = token_loss_mod.TokenLossArgs(
        x, old.to(dtype), rewards.to(dtype), v, values.to(dtype), rewards.to(dtype),
        old.to(dtype), h, None, mask, None, None, params, "token-mean", None, None, None,
        1.0, None, True, "",
    )
    loss, sums, *_ = call(a)
    (loss * 3.0).backward()
    return loss.detach(), sums, x.grad, v.grad, h.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_token_loss_equals_the_dispatched_op_with_gradients(monkeypatch, dtype):
    # Three paths, one backward: the C++ loss node (eager default), the Python
    # autograd.Function (eager without the node) and the dispatcher's autograd.
    dispatched = _token_loss_with_every_gradient(lambda a: torch.ops.vapo.token_loss(*a), dtype)
    node = _token_loss_with_every_gradient(token_loss_mod.token_loss_op, dtype)
    assert node[0].grad_fn is None  # detached above; the live loss had the C++ node
    _python_autograd_function(monkeypatch)
    function = _token_loss_with_every_gradient(token_loss_mod.token_loss_op, dtype)
    for path in (node, function):
        for f, s in zip(path, dispatched):
            assert f.dtype == s.dtype and f.shape == s.shape
            assert torch.equal(f, s)


@pytest.mark.parametrize("path", ["node", "function"])
def test_backward_after_a_forward_without_gradients_names_the_problem(monkeypatch, path):
    if path == "function":
        _python_autograd_function(monkeypatch)
    rewards, _, mask, logp, old = _batch(3)
    x = logp.clone().requires_grad_()
    a = token_loss_mod.TokenLossArgs(
        x, old, rewards, None, None, None, None, None, None, mask, None, None,
        loss_spec.loss_params(), "token-mean", None, None, None, 1.0, None, False, "",
    )
    loss, *_ = token_loss_mod.token_loss_op(a)
    with pytest.raises(RuntimeError, match="need_grad=False"):
        loss.backward()


def test_eager_loss_backward_is_the_cpp_node_and_only_reaches_what_needs_a_gradient():
    rewards, values, mask, logp, old = _batch(4)
    x = logp.clone().requires_grad_()
    v = values.clone().requires_grad_()
    loss, _ = vk.vapo_loss(x, old, rewards, mask, values=v, old_values=values, returns=rewards)
    assert "LossFromGradients" in loss.grad_fn.name()
    loss.backward()
    assert x.grad is not None and v.grad is not None
    loss2, _ = vk.vapo_loss(x, old, rewards, mask, values=values, old_values=values,
                            returns=rewards)
    x.grad = None
    loss2.backward()
    assert x.grad is not None and values.grad is None


@pytest.mark.parametrize("path", ["node", "function"])
def test_loss_takes_in_place_ops_like_any_tensor(monkeypatch, path):
    # `loss /= accumulation_steps` is how trainers scale a micro-batch's loss.
    if path == "function":
        _python_autograd_function(monkeypatch)
    rewards, _, mask, logp, old = _batch(5)
    grads = []
    for scale_in_place in (False, True):
        x = logp.clone().requires_grad_()
        loss, _ = vk.policy_loss(x, old, rewards, mask)
        if scale_in_place:
            loss /= 4
        else:
            loss = loss / 4
        loss.backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


def test_loss_with_grad_only_on_an_input_without_a_gradient_matches_the_function(monkeypatch):
    # advantages that require grad (not detached): no gradient flows to them, and the loss
    # behaves on both eager paths as through the dispatcher.
    rewards, _, mask, logp, old = _batch(6)
    adv = rewards.clone().requires_grad_()
    outs = []
    for node in (True, False):
        if not node:
            _python_autograd_function(monkeypatch)
        loss, _ = vk.policy_loss(logp, old, adv, mask)
        outs.append((loss.requires_grad, loss.detach()))
    assert outs[0][0] == outs[1][0] and torch.equal(outs[0][1], outs[1][1])


def test_traced_calls_go_through_the_dispatcher():
    # Under a fake tensor mode the implementation cannot run (it reads data): the call
    # must reach the op's fake kernel.
    with FakeTensorMode():
        rewards = torch.randn(B, T)
        adv, ret = vk.gae(rewards, torch.randn(B, T), torch.ones(B, T, dtype=torch.bool))
        loss, metrics = vk.policy_loss(-torch.rand(B, T), -torch.rand(B, T), rewards)
    assert adv.shape == ret.shape == (B, T) and loss.shape == ()


def test_eager_inplace_op_bumps_the_version_counter():
    logits = torch.randn(B, T, 11, requires_grad=True) * 1.0  # not a leaf
    targets = torch.randint(0, 11, (B, T))
    rewards, _, mask, _, old = _batch()
    before = logits._version
    loss, _ = vk.policy_loss_from_logits(logits, targets, old, rewards, mask, inplace_backward=True)
    assert logits._version > before


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    import os
    import time

    from vapo_kernels import _backends

    lock = tmp_path / "lock"
    lock.touch()
    assert not _backends.clear_stale_lock(lock)  # a build may be running: keep it
    assert lock.exists()
    old = time.time() - _backends.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="stale build lock"):
        assert _backends.clear_stale_lock(lock)
    assert not lock.exists()
    assert not _backends.clear_stale_lock(lock)  # nothing there: nothing to do


# --------------------------------------------------------------------------------------
# The common call's one-pass checks (_ragged.plain_layout) against the full ones.

_LIKE = [
    lambda t: t,
    lambda t: t.double(),
    lambda t: t.bfloat16(),
    lambda t: t.long(),
    lambda t: t.t().contiguous().t() if t.dim() == 2 else t,  # strided when 2-D
    lambda t: t.unsqueeze(-1),
    lambda t: t[..., :1],
    lambda t: torch.nn.Parameter(t.clone()),  # a subclass
]
_MASKS = [
    lambda m: None,
    lambda m: m,
    lambda m: m.to(torch.uint8),
    lambda m: m.float(),
    lambda m: m.t().contiguous().t() if m.dim() == 2 else m,
    lambda m: m[..., :1],
    lambda m: [1, 0],
]
_OFFSETS = [
    lambda n: None,
    lambda n: torch.tensor([0, n], dtype=torch.int64),
    lambda n: torch.tensor([0, n], dtype=torch.int32),
    lambda n: torch.tensor([0, n, n], dtype=torch.int64),  # an empty sequence at the end
    lambda n: torch.tensor([0, n + 1], dtype=torch.int64),  # does not end at N
    lambda n: torch.tensor([1, n], dtype=torch.int64),
    lambda n: torch.tensor([0, n], dtype=torch.float32),
    lambda n: torch.tensor([[0, n]], dtype=torch.int64),
    lambda n: torch.tensor([0, 0, n], dtype=torch.int64)[::2],  # strided
]


@pytest.mark.parametrize("packed", [False, True])
def test_plain_layout_accepts_only_what_the_full_checks_pass_unconverted(packed):
    # The one-pass acceptance of the common call must never accept what check_layout
    # (or the offsets' values check) refuses, nor inputs the general path would convert:
    # every combination of argument kinds, each judged both ways.
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from vapo_kernels import _ragged

    shape = (5,) if packed else (2, 5)
    base = torch.randn(shape)
    mask = torch.rand(shape) < 0.5

    @settings(max_examples=300, deadline=None)
    @given(
        kinds=st.lists(st.sampled_from(range(len(_LIKE))), min_size=1, max_size=3),
        nones=st.lists(st.booleans(), min_size=3, max_size=3),
        mask_kind=st.sampled_from(range(len(_MASKS))),
        offsets_kind=st.sampled_from(range(len(_OFFSETS))),
    )
    def check(kinds, nones, mask_kind, offsets_kind):
        tensors = tuple(None if none else _LIKE[k](base) for k, none in zip(kinds, nones))
        m = _MASKS[mask_kind](mask)
        cu = _OFFSETS[offsets_kind](shape[0])
        given_tensors = {f"t{i}": t for i, t in enumerate(tensors) if t is not None}
        try:
            layout = _ragged.plain_layout(tensors, m, cu)
        except ValueError:  # only the offsets' values check raises, as the full path's
            full = _ragged.check_layout(given_tensors, m, cu)
            with pytest.raises(ValueError, match="cu_seqlens"):
                _ragged.check_cu_seqlens_values(cu, full.num_tokens)
            return
        if layout is None:
            return  # the full checks decide
        assert _ragged.check_layout(given_tensors, m, cu) == layout
        if cu is not None:
            _ragged.check_cu_seqlens_values(cu, layout.num_tokens)
        assert _ragged.as_bool_mask(m) is m
        dtype = next(iter(given_tensors.values())).dtype
        assert all(_ragged.dense(t, dtype) is t for t in given_tensors.values())

    check()


def test_the_common_loss_call_equals_the_general_path(monkeypatch):
    # The one-pass acceptance hands the kernel what the general checks and conversions
    # would: every term on, padded and packed (int32 offsets, an empty sequence), the
    # same loss, metrics and gradients bit for bit with the one-pass path switched off.
    g = torch.Generator().manual_seed(3)
    lengths = [4, 0, 1, 7]
    n = sum(lengths)
    cu = torch.tensor([0, 4, 4, 5, 12], dtype=torch.int32)
    mask = torch.rand(n, generator=g) < 0.7

    def run():
        x = {k: torch.randn(n, generator=torch.Generator().manual_seed(i))
             for i, k in enumerate(("logp", "old_logp", "advantages", "values", "old_values",
                                    "returns", "ref_logp", "entropy", "is_weights"))}
        x["logp"] = (-x["logp"].abs()).requires_grad_()
        x["values"].requires_grad_()
        x["entropy"] = x["entropy"].abs().requires_grad_()
        x["is_weights"] = x["is_weights"].abs()
        out = []
        for layout in ("packed", "padded"):
            if layout == "packed":
                args, m, offsets = x, mask, cu
            else:
                from strategies import to_padded

                args = {k: to_padded(v.detach(), cu).requires_grad_(v.requires_grad)
                        for k, v in x.items()}
                m, offsets = to_padded(mask, cu, False), None
            loss, metrics = vk.vapo_loss(
                args["logp"], args["old_logp"], args["advantages"], m, offsets,
                **{k: args[k] for k in ("values", "old_values", "returns", "ref_logp",
                                        "entropy", "is_weights")},
                kl_coef=0.1, entropy_coef=0.01,
            )
            loss.backward()
            out += [loss, *dict(metrics).values()]
            out += [args[k].grad for k in ("logp", "values", "entropy")]
        return out

    calls = []
    plain = token_loss_mod._plain_token_mean
    monkeypatch.setattr(token_loss_mod, "_plain_token_mean",
                        lambda a, tensors: calls.append(plain(a, tensors)) or calls[-1])
    one_pass = run()
    assert len(calls) == 2 and all(c is not None for c in calls)  # the one-pass path ran
    monkeypatch.setattr(token_loss_mod, "_plain_token_mean", lambda a, tensors: None)
    general = run()
    assert len(one_pass) == len(general)
    for a, b in zip(one_pass, general):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_kl_penalty_checks_its_kind_and_defaults_to_k3_like_the_losses():
    # kl_penalty defaulted to k1 while kl_loss / vapo_loss default to k3, and
    # kl_kind=None crashed with an AttributeError (README review).
    lp, ref = torch.randn(5), torch.randn(5)
    assert torch.equal(vk.kl_penalty(lp, ref), vk.kl_penalty(lp, ref, "k3"))
    for bad in (None, "k4", 3):
        with pytest.raises(ValueError, match="kl_kind must be one of"):
            vk.kl_penalty(lp, ref, bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_no_backend_is_available_for_cuda_tensors_without_a_gpu():
    for family in ("gae", "logprobs", "loss"):
        assert vk.available_backends(family, "cuda") == []


def _packed_policy_inputs():
    g = torch.Generator().manual_seed(11)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    lp = -torch.rand(7, generator=g)
    return lp, lp + 0.1 * torch.randn(7, generator=g), torch.randn(7, generator=g), cu


def test_packed_loss_compiles_fullgraph_without_reading_cu_seqlens():
    # The common call's one-pass check reads cu_seqlens' values: it must come after the
    # tracing checks, or torch.compile hits a data-dependent guard (second review).
    lp, old, adv, cu = _packed_policy_inputs()
    want = vk.policy_loss(lp, old, adv, None, cu)[0]
    fn = torch.compile(lambda *x: vk.policy_loss(*x)[0], fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(lp, old, adv, None, cu), want)


def test_packed_loss_on_meta_tensors_and_under_vmap():
    lp, old, adv, cu = _packed_policy_inputs()
    meta = vk.policy_loss(*(t.to("meta") for t in (lp, old, adv)), None, cu.to("meta"))[0]
    assert meta.is_meta and meta.shape == ()
    stack = [torch.stack([t, t.flip(0), t * 0.5]) for t in (lp, old, adv)]
    batched = torch.func.vmap(lambda a, b, c, o: vk.policy_loss(a, b, c, None, o)[0])(
        *stack, torch.stack([cu, cu, cu]))
    for i in range(3):
        torch.testing.assert_close(
            batched[i], vk.policy_loss(stack[0][i], stack[1][i], stack[2][i], None, cu)[0])
