"""The backward of the losses whose kernels write their gradients in the forward pass
(token log-probs, logits, hidden states): one node that scales them. Against autograd's
rules a user relies on: retain_graph gives the same gradients again, a backward too many
and a double backward raise instead of crashing or returning zeros, and the gradients
are freed with the graph. On both paths: the C++ node and its Python twin."""

from __future__ import annotations

import pytest
import torch

import vapo_kernels as vk
from vapo_kernels import _library
from vapo_kernels.ops import loss_spec
from vapo_kernels.ops import token_loss as token_loss_mod

B, T, V, H = 3, 6, 11, 5


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True
    return {
        "logp": -torch.rand(B, T, generator=g, dtype=torch.float64),
        "old": -torch.rand(B, T, generator=g, dtype=torch.float64),
        "adv": torch.randn(B, T, generator=g, dtype=torch.float64),
        "values": torch.randn(B, T, generator=g, dtype=torch.float64),
        "logits": torch.randn(B, T, V, generator=g, dtype=torch.float64),
        "hidden": torch.randn(B, T, H, generator=g, dtype=torch.float64),
        "weight": torch.randn(V, H, generator=g, dtype=torch.float64),
        "bias": torch.randn(V, generator=g, dtype=torch.float64),
        "targets": torch.randint(0, V, (B, T), generator=g),
        "mask": mask,
    }


def _tokens(x):
    leaves = [x["logp"].clone().requires_grad_(), x["values"].clone().requires_grad_()]
    loss, _ = vk.vapo_loss(leaves[0], x["old"], x["adv"], x["mask"], values=leaves[1],
                           old_values=x["values"], returns=x["adv"], entropy=None)
    return loss, leaves


def _logits(x, inplace=False):
    leaf = x["logits"].clone().requires_grad_()
    # inplace_backward refuses a leaf: the logits come out of an op, as from an LM head.
    loss, _ = vk.policy_loss_from_logits(leaf * 1.0, x["targets"], x["old"], x["adv"],
                                         x["mask"], entropy_coef=0.01, temperature=0.8,
                                         inplace_backward=inplace)
    return loss, [leaf]


def _hidden(x):
    leaves = [x[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    loss, _ = vk.policy_loss_from_hidden(leaves[0], leaves[1], x["targets"], x["old"],
                                         x["adv"], x["mask"], bias=leaves[2],
                                         entropy_coef=0.01)
    return loss, leaves


def _policy_op_args(x, logp):
    """The arguments of a direct ``vapo::token_loss`` call (the op returns its gradient
    outputs, which the public losses drop)."""
    return token_loss_mod.TokenLossArgs(
        logp, x["old"], x["adv"], None, None, None, None, None, None, x["mask"], None, None,
        loss_spec.loss_params(), "token-mean", None, None, None, 1.0, None, True, "",
    )


LOSSES = {
    "tokens": _tokens,
    "logits": _logits,
    "logits-inplace": lambda x: _logits(x, inplace=True),
    "hidden": _hidden,
}


@pytest.fixture(params=["node", "python"])
def path(request, monkeypatch):
    if request.param == "python":  # as if the C++ extension had no loss node
        monkeypatch.setattr(_library, "_node_tried", True)
        monkeypatch.setattr(_library, "_node", None)
    return request.param


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_retain_graph_gives_the_same_gradients_again(path, loss_fn):
    x = _inputs(1)
    loss, leaves = LOSSES[loss_fn](x)
    scale = torch.tensor(2.5, dtype=torch.float64)
    first = torch.autograd.grad(loss * scale, leaves, retain_graph=True)
    second = torch.autograd.grad(loss * scale, leaves, retain_graph=True)
    last = torch.autograd.grad(loss * scale, leaves)  # the node may scale in place now
    fresh_loss, fresh_leaves = LOSSES[loss_fn](x)
    want = torch.autograd.grad(fresh_loss * scale, fresh_leaves)
    for grads in (first, second, last):
        for g, w in zip(grads, want):
            assert torch.equal(g, w)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("loss_fn", LOSSES)
@pytest.mark.parametrize("incoming", [None, 1.0, 2.5, -1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_last_backward_scales_in_place_to_the_same_bits(path, loss_fn, incoming, dtype):
    # On the graph's last backward the node scales its gradients where they lie, and by a
    # unit gradient (loss.backward()) not at all: the same bits as the out-of-place product
    # that a retained graph takes.
    x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _inputs(3).items()}
    loss, leaves = LOSSES[loss_fn](x)
    grad = None if incoming is None else torch.tensor(incoming, dtype=loss.dtype)
    kept = torch.autograd.grad(loss, leaves, grad, retain_graph=True)
    last = torch.autograd.grad(loss, leaves, grad)
    for k, g in zip(kept, last):
        assert torch.equal(k, g)
    if incoming not in (None, 1.0):
        unit = torch.autograd.grad(*LOSSES[loss_fn](x))
        for g, u in zip(last, unit):
            torch.testing.assert_close(g, incoming * u, rtol=0, atol=0)


@pytest.mark.parametrize("loss_fn", LOSSES)
@pytest.mark.parametrize("incoming", ["constant", "differentiable"])
def test_double_backward_raises_instead_of_missing_a_term(path, loss_fn, incoming):
    # With create_graph=True the first backward is right, but the gradients' dependence on
    # the inputs is not in the graph: anything that differentiates them again must raise,
    # whether the incoming gradient is a constant or has a graph of its own.
    x = _inputs(2)
    loss, leaves = LOSSES[loss_fn](x)
    w = torch.tensor(1.5, dtype=torch.float64, requires_grad=incoming == "differentiable")
    grads = torch.autograd.grad(loss * w, leaves, create_graph=True)
    assert all(g.requires_grad for g in grads)
    penalty = sum(g.square().sum() for g in grads)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(penalty + leaves[0].sum(), leaves)


@pytest.mark.parametrize("op", ["token_logprobs", "linear_logprobs"])
def test_log_prob_ops_refuse_a_double_backward(path, op):
    x = _inputs(9)
    if op == "token_logprobs":
        leaves = [x["logits"].clone().requires_grad_()]
        logp = vk.token_logprobs(leaves[0], x["targets"])
    else:
        leaves = [x[k].clone().requires_grad_() for k in ("hidden", "weight")]
        logp = vk.linear_logprobs(leaves[0], leaves[1], x["targets"])
    grads = torch.autograd.grad(logp.sum(), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)


def test_node_frees_its_gradients_with_the_graph():
    # The node holds the kernel's gradient until the backward has used it; without
    # retain_graph it lets go then (for a from-logits loss that is an N x V buffer).
    x = _inputs(3)
    logp = x["logp"].clone().requires_grad_()
    a = _policy_op_args(x, logp)
    loss, _, g_logp, *_ = token_loss_mod.token_loss_op(a)
    if not loss.grad_fn or "LossFromGradients" not in loss.grad_fn.name():
        pytest.skip("the C++ extension is not built here")  # CI builds it
    uses = torch._C._storage_Use_Count
    held = uses(g_logp.untyped_storage()._cdata)
    loss.backward(retain_graph=True)
    assert uses(g_logp.untyped_storage()._cdata) == held
    loss.backward()
    assert uses(g_logp.untyped_storage()._cdata) == held - 1


@pytest.mark.parametrize("loss_fn", ["tokens", "logits", "hidden"])
def test_a_backward_retried_after_a_failing_hook_is_not_scaled_twice(path, loss_fn):
    # The engine runs the node's post-hooks after it; one that raises leaves the graph
    # unreleased, and the user may run the backward again.
    x = _inputs(4)
    loss, leaves = LOSSES[loss_fn](x)
    fresh_loss, fresh_leaves = LOSSES[loss_fn](x)
    want = torch.autograd.grad(fresh_loss * 3.0, fresh_leaves)
    calls = []

    def refuse_once(grad_inputs, grad_outputs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("hook refused")

    loss.grad_fn.register_hook(refuse_once)
    with pytest.raises(RuntimeError, match="hook refused"):
        (loss * 3.0).backward()
    for t in leaves:
        t.grad = None
    (loss * 3.0).backward()
    for t, w in zip(leaves, want):
        assert torch.equal(t.grad, w)


def test_the_op_s_returned_gradients_stay_as_they_were(path):
    # token_loss_op hands its gradient outputs back; the backward must not scale the
    # caller's tensor in place (nor hand it to .grad, where later steps accumulate).
    x = _inputs(5)
    logp = x["logp"].clone().requires_grad_()
    a = _policy_op_args(x, logp)
    loss, _, g_logp, *_ = token_loss_mod.token_loss_op(a)
    before = g_logp.clone()
    (loss * 3.0).backward()
    assert torch.equal(g_logp, before)
    assert logp.grad.untyped_storage().data_ptr() != g_logp.untyped_storage().data_ptr()
    assert torch.equal(logp.grad, 3.0 * before)


@pytest.mark.parametrize("loss_fn", ["tokens", "logits", "hidden"])
def test_compiled_autograd_runs_the_backward(path, loss_fn):
    # torch._dynamo's compiled autograd traces every node of the backward: the node says
    # what its state is (compiled_args) and how to run on traced tensors.
    import torch._dynamo.compiled_autograd as compiled_autograd

    x = _inputs(6)
    fresh_loss, fresh_leaves = LOSSES[loss_fn](x)
    want = torch.autograd.grad(fresh_loss, fresh_leaves)
    loss, leaves = LOSSES[loss_fn](x)
    torch._dynamo.reset()
    with compiled_autograd._enable(torch.compile(backend="eager")):
        loss.backward()
    for t, w in zip(leaves, want):
        torch.testing.assert_close(t.grad, w, rtol=0, atol=0)


@pytest.mark.parametrize("loss_fn", ["tokens", "logits-inplace", "hidden"])
def test_torch_compile_fullgraph_of_the_public_losses(loss_fn):
    x = _inputs(7)
    fresh_loss, fresh_leaves = LOSSES[loss_fn](x)
    want = torch.autograd.grad(fresh_loss * 2.0, fresh_leaves)
    _, leaves = LOSSES[loss_fn](x)
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    torch._dynamo.reset()

    def body(*ts):
        if loss_fn == "tokens":
            loss, _ = vk.vapo_loss(ts[0], x["old"], x["adv"], x["mask"], values=ts[1],
                                   old_values=x["values"], returns=x["adv"])
        elif loss_fn == "hidden":
            loss, _ = vk.policy_loss_from_hidden(ts[0], ts[1], x["targets"], x["old"], x["adv"],
                                                 x["mask"], bias=ts[2], entropy_coef=0.01)
        else:
            loss, _ = vk.policy_loss_from_logits(ts[0] * 1.0, x["targets"], x["old"], x["adv"],
                                                 x["mask"], entropy_coef=0.01, temperature=0.8,
                                                 inplace_backward=True)
        return loss * 2.0

    (torch.compile(body, backend="aot_eager", fullgraph=True)(*leaves)).backward()
    for t, w in zip(leaves, want):
        torch.testing.assert_close(t.grad, w)


def test_the_last_backward_scales_the_kernel_s_gradient_where_it_lies():
    # No second copy of the gradient: the buffer the kernel wrote (for inplace_backward,
    # the logits themselves) becomes the leaf's .grad.
    x = _inputs(8)
    leaf = x["logits"].clone().requires_grad_()
    logits = leaf.clone()  # its backward passes the gradient on as it is
    loss, _ = vk.policy_loss_from_logits(logits, x["targets"], x["old"], x["adv"], x["mask"],
                                         inplace_backward=True)
    if "LossFromGradients" not in loss.grad_fn.name():
        pytest.skip("the C++ extension is not built here")  # CI builds it
    (loss * 2.0).backward()
    assert leaf.grad.data_ptr() == logits.data_ptr()
    logp = x["logp"].clone().requires_grad_()
    a = _policy_op_args(x, logp)
    loss, _, g_logp, *_ = token_loss_mod.token_loss_op(a)
    written = g_logp.data_ptr()
    del g_logp  # now only the node holds it
    (loss * 2.0).backward()
    assert logp.grad.data_ptr() == written


@pytest.mark.parametrize("incoming", [1.0, 2.0])
def test_a_functionalized_incoming_gradient_is_never_read_as_data(incoming):
    # The unit-gradient shortcut reads the gradient's value: a functionalization wrapper
    # has storage but no data, and the read threw where the product works (second review).
    x = _inputs(6)
    logp = x["logp"].clone().requires_grad_()
    loss, _ = vk.policy_loss(logp, x["old"], x["adv"], x["mask"])
    want = torch.autograd.grad(loss, logp, torch.tensor(incoming, dtype=loss.dtype),
                               retain_graph=True)[0]
    got = torch.func.functionalize(
        lambda gl: torch.autograd.grad(loss, logp, gl, retain_graph=True)[0]
    )(torch.tensor(incoming, dtype=loss.dtype))
    assert torch.equal(got, want)
