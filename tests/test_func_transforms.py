"""torch.func's gradient transforms (grad, vjp, jacrev) through every differentiable public
op give the gradients .backward() gives; a transform that would differentiate a gradient
again (grad of grad) raises instead of dropping the second-order term; vmap runs
the ops per sample; forward mode (jvp, hessian) is one clear error. (Before: torch.func.grad raised inside torch, since the dispatcher's
autograd for a custom op does not support functorch.)"""

from __future__ import annotations

import pytest
import torch

import vapo_kernels as vk
from vapo_kernels._library import DOUBLE_BACKWARD

B, T, V, H = 3, 5, 11, 4


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = False  # an empty sequence
    logp = -torch.rand(B, T, generator=g)
    return {
        "logp": logp,
        "old_logp": logp + 0.2 * torch.randn(B, T, generator=g),
        "adv": torch.randn(B, T, generator=g),
        "values": torch.randn(B, T, generator=g),
        "returns": torch.randn(B, T, generator=g),
        "mask": mask,
        "logits": 3 * torch.randn(B, T, V, generator=g),
        "targets": torch.randint(V, (B, T), generator=g),
        "hidden": torch.randn(B, T, H, generator=g),
        "weight": torch.randn(V, H, generator=g),
    }


def _losses(d):
    """(name, function of the differentiable inputs, those inputs) for each public op."""
    policy = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0}
    return [
        ("policy_loss", lambda lp: vk.policy_loss(lp, d["old_logp"], d["adv"], d["mask"], **policy)[0],
         (d["logp"],)),
        ("vapo_loss", lambda lp, v: vk.vapo_loss(
            lp, d["old_logp"], d["adv"], d["mask"], values=v, old_values=d["returns"],
            returns=d["returns"] + 0.1, ref_logp=d["old_logp"], kl_coef=0.1, **policy)[0],
         (d["logp"], d["values"])),
        ("policy_loss_from_logits", lambda z: vk.policy_loss_from_logits(
            z, d["targets"], d["old_logp"], d["adv"], d["mask"], temperature=1.3)[0],
         (d["logits"],)),
        ("policy_loss_from_hidden", lambda h, w: vk.policy_loss_from_hidden(
            h, w, d["targets"], d["old_logp"], d["adv"], d["mask"])[0],
         (d["hidden"], d["weight"])),
        ("token_logprobs", lambda z: vk.token_logprobs(
            z, d["targets"], d["mask"], temperature=0.7).sum(), (d["logits"],)),
        ("token_logprobs+entropy", lambda z: vk.token_logprobs(
            z, d["targets"], d["mask"], return_entropy=True)[1].sum(), (d["logits"],)),
        ("linear_logprobs", lambda h, w: vk.linear_logprobs(h, w, d["targets"], d["mask"]).sum(),
         (d["hidden"], d["weight"])),
    ]


def _backward_grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*leaves), leaves)


@pytest.mark.parametrize("index", range(7))
def test_func_grad_equals_backward(data, index):
    name, fn, inputs = _losses(data)[index]
    want = _backward_grads(fn, inputs)
    got = torch.func.grad(fn, argnums=tuple(range(len(inputs))))(*inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)


def test_vjp_and_jacrev_of_token_logprobs(data):
    z, y, m = data["logits"], data["targets"], data["mask"]

    def logp(z):
        return vk.token_logprobs(z, y, m)

    ones = torch.ones(B, T)
    _, vjp = torch.func.vjp(logp, z)
    torch.testing.assert_close(vjp(ones)[0], _backward_grads(lambda t: logp(t).sum(), (z,))[0],
                               rtol=0, atol=0)
    # jacrev: d logp[b, t] / d z, one backward per output (vmapped); the reference is
    # log_softmax's Jacobian, zero at masked tokens.
    jac = torch.func.jacrev(logp)(z)
    want = torch.func.jacrev(
        lambda z: torch.log_softmax(z, -1).gather(-1, y[..., None])[..., 0] * m)(z)
    torch.testing.assert_close(jac, want, rtol=1e-5, atol=1e-6)


def test_a_second_gradient_transform_raises(data):
    fn = lambda lp: vk.policy_loss(lp, data["old_logp"], data["adv"], data["mask"])[0]  # noqa: E731
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.func.grad(torch.func.grad(lambda lp: fn(lp)))(data["logp"]).sum()
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.func.grad(torch.func.grad(lambda z: vk.token_logprobs(z, data["targets"]).sum()))(data["logits"])
    # A vjp_fn or jacrev's backward runs after its own transform has ended: these came back
    # as silent all-zero second derivatives (second reviewer) before the check looked at the
    # tensors rather than the transform stack.
    z, y, m = data["logits"], data["targets"], data["mask"]
    f = lambda z: vk.token_logprobs(z, y, m).sum()  # noqa: E731
    nested = [
        lambda: torch.func.jacrev(torch.func.jacrev(f))(z),
        lambda: torch.func.grad(lambda z: (torch.func.vjp(f, z)[1](torch.tensor(1.0))[0] ** 2).sum())(z),
        lambda: torch.func.vjp(torch.func.jacrev(f), z)[1](torch.ones_like(z)),
        lambda: torch.func.jacrev(torch.func.jacrev(fn))(data["logp"]),
        lambda: torch.func.jacrev(torch.func.jacrev(lambda z: vk.policy_loss_from_logits(
            z, y, data["old_logp"], data["adv"], m)[0]))(z),
    ]
    for second_order in nested:
        with pytest.raises(RuntimeError, match="no double backward"):
            second_order()
    assert "no double backward" in DOUBLE_BACKWARD


def test_forward_mode_is_refused_with_one_clear_error(data):
    with pytest.raises(RuntimeError, match="forward mode"):
        torch.func.hessian(lambda z: vk.token_logprobs(z, data["targets"]).sum())(data["logits"])
    with pytest.raises(RuntimeError, match="forward mode"):
        torch.func.jvp(lambda lp: vk.policy_loss(lp, data["old_logp"], data["adv"])[0],
                       (data["logp"],), (torch.ones(B, T),))  # was a silent zero tangent
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward mode"):
        vk.token_logprobs(fwAD.make_dual(data["logits"], torch.ones(B, T, V)), data["targets"])


def test_vmap_runs_per_sample(data):
    lp = torch.stack([data["logp"], data["old_logp"]])
    got = torch.func.vmap(lambda x: vk.policy_loss(x, data["old_logp"], data["adv"], data["mask"])[0])(lp)
    want = torch.stack([vk.policy_loss(x, data["old_logp"], data["adv"], data["mask"])[0] for x in lp])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gae_inside_func_grad_is_a_constant_as_under_backward(data):
    rewards = torch.rand(B, T, generator=torch.Generator().manual_seed(1))

    def value_loss(v):
        _, returns = vk.gae(rewards, v, data["mask"], gamma=1.0, lam=0.95)
        return ((v - returns) ** 2 * data["mask"]).sum()

    want = _backward_grads(value_loss, (data["values"],))[0]
    torch.testing.assert_close(torch.func.grad(value_loss)(data["values"]), want, rtol=0, atol=0)
