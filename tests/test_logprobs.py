"""Token log-probs / entropy op family: the op, its autograd and its contract, under every
backend the registry reports (tests/strategies.py), against the float64 definitions.

Triton runs with 16-wide vocabulary chunks here, so small rows cross chunk boundaries.
Each backend's kernel contract (called directly, with its own rounding budget) has its
own file: test_logprobs_cpp.py, test_logprobs_triton.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vapo_kernels as vk
from vapo_kernels.ops.token_logprobs import token_logprobs
from vapo_kernels.triton import logprobs as triton_logprobs

import _dominant as dominant
from strategies import GARBAGE, backend_params, examples

BACKENDS = backend_params("logprobs")
# Checks on CPU tensors (by-hand values, errors, in-place rules): every backend there.
ON_CPU = vk.available_backends("logprobs", "cpu")


@pytest.fixture(autouse=True)
def _small_triton_chunks(monkeypatch):
    # 16-wide vocabulary chunks in the interpreter: chunk boundaries inside small rows.
    monkeypatch.setattr(triton_logprobs, "INTERPRET_BLOCK_V", 16)


def fp64_reference(logits, targets, temperature, mask=None):
    """Straight from the definitions, in float64, on the full (N, V) matrix."""
    z = logits.double() / temperature
    logsm = torch.log_softmax(z, dim=-1)
    keep = targets != -100
    if mask is not None:
        keep &= mask.bool()
    logp = logsm.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    p = logsm.exp()
    ent = -torch.where(p > 0, p * logsm, 0).sum(-1)
    return torch.where(keep, logp, 0), torch.where(keep, ent, 0)


@st.composite
def cases(draw):
    n = draw(st.integers(0, 12))
    vocab = draw(st.sampled_from([1, 2, 7, 31, 128, 129, 1000]))
    return {
        "n": n,
        "vocab": vocab,
        "dtype": draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])),
        "temperature": draw(st.sampled_from([1.0, 0.7, 1.3, 0.05])),
        "scale": draw(st.sampled_from([1.0, 10.0])),
        "ignore": draw(st.booleans()),
        "use_mask": draw(st.booleans()),
        "padded": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def build(case):
    gen = torch.Generator().manual_seed(case["seed"])
    n, vocab = case["n"], case["vocab"]
    logits = (case["scale"] * torch.randn(n, vocab, generator=gen, dtype=torch.float64)).to(case["dtype"])
    targets = torch.randint(0, vocab, (n,), generator=gen)
    if n:
        targets[0] = vocab - 1
    if case["ignore"] and n > 1:
        targets[1] = -100
    mask = (torch.rand(n, generator=gen) < 0.7) if case["use_mask"] else None
    if case["padded"] and n % 2 == 0:
        logits = logits.view(2, n // 2, vocab)
        targets = targets.view(2, n // 2)
        mask = None if mask is None else mask.view(2, n // 2)
    return logits, targets, mask


def on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_forward_matches_float64_definition(backend, device, poisoned):
    @examples(backend, device, cpu=40, interpreted=8)
    @given(case=cases())
    def check(case):
        forward_matches_float64_definition(backend, device, case, poisoned)

    check()


def forward_matches_float64_definition(backend, device, case, poisoned):
    logits, targets, mask = build(case)
    with poisoned():
        logp, ent = token_logprobs(
            *on(device, logits, targets), temperature=case["temperature"], return_entropy=True,
            mask=on(device, mask)[0], backend=backend,
        )
    logp, ent = logp.cpu(), ent.cpu()
    exp_logp, exp_ent = fp64_reference(logits, targets, case["temperature"], mask)
    assert logp.dtype == ent.dtype == (torch.float64 if case["dtype"] == torch.float64 else torch.float32)
    assert logp.shape == ent.shape == targets.shape
    tol = 1e-12 if case["dtype"] == torch.float64 else 2e-5
    torch.testing.assert_close(logp.double(), exp_logp, rtol=tol, atol=tol * (1 + case["scale"] / case["temperature"]))
    torch.testing.assert_close(ent.double(), exp_ent, rtol=tol, atol=tol * (1 + case["scale"] / case["temperature"]))
    # The documented ranges hold exactly, whatever the rounding.
    assert bool((logp <= 0).all())
    assert bool((ent >= 0).all()) and bool((ent <= math.log(case["vocab"]) + 1e-5).all())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backward_matches_autograd_of_the_definition(backend, device, poisoned):
    @examples(backend, device, cpu=25, interpreted=6)
    @given(case=cases(), g_ent=st.sampled_from([None, 0.5]))
    def check(case, g_ent):
        backward_matches_autograd_of_the_definition(backend, device, case, g_ent, poisoned)

    check()


def backward_matches_autograd_of_the_definition(backend, device, case, g_ent, poisoned):
    logits, targets, mask = build(case)
    mine = logits.detach().clone().to(device).requires_grad_(True)
    theirs = logits.detach().double().requires_grad_(True)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    w_lp = torch.randn(targets.shape, generator=gen, dtype=torch.float64)
    w_ent = torch.randn(targets.shape, generator=gen, dtype=torch.float64)
    with poisoned():
        logp, ent = token_logprobs(
            mine, *on(device, targets), temperature=case["temperature"], return_entropy=True,
            mask=on(device, mask)[0], backend=backend,
        )
        logp, ent = logp.cpu(), ent.cpu()
        loss = (logp.double() * w_lp).sum() + ((ent.double() * w_ent).sum() * g_ent if g_ent else 0)
        loss.backward()
    exp_logp, exp_ent = fp64_reference(theirs, targets, case["temperature"], mask)
    exp_loss = (exp_logp * w_lp).sum() + ((exp_ent * w_ent).sum() * g_ent if g_ent else 0)
    exp_loss.backward()
    assert mine.grad.dtype == logits.dtype
    if case["dtype"] == torch.float64:
        tol = dict(rtol=1e-10, atol=1e-10)
    elif case["dtype"] == torch.float32:
        tol = dict(rtol=1e-4, atol=1e-5 * (1 + case["scale"]) / case["temperature"])
    else:  # the gradient itself is rounded to the 8/11-bit mantissa of the logits' dtype
        tol = dict(rtol=2e-2, atol=2e-2 * (1 + case["scale"]) / case["temperature"])
    torch.testing.assert_close(mine.grad.double().cpu(), theirs.grad, **tol)


# Finite differences take ~100 calls (6-10 s in the Triton interpreter); Triton's float64
# gradients are held to autograd of the definition by test_backward_matches_autograd_of_the_definition.
@pytest.mark.parametrize("backend", [b for b in ON_CPU if b != "triton"])
def test_gradcheck_float64(backend):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (6,), generator=gen)
    y[2] = -100
    m = torch.tensor([True, True, True, False, True, True])
    fn = lambda z: token_logprobs(z, y, temperature=0.8, return_entropy=True, mask=m, backend=backend)
    assert torch.autograd.gradcheck(fn, (z,))


@pytest.mark.parametrize("backend", ON_CPU)
def test_extreme_logits(backend):
    vocab = 50
    z = torch.zeros(5, vocab)
    z[0, 3] = 1e4  # one dominant logit
    z[1, :] = -1e4
    z[1, 7] = 1e4
    z[2, 11] = float("-inf")  # a forbidden token
    z[3, :] = 7.0  # all equal: uniform, H = log V
    z[4, :] = torch.linspace(-1e4, 1e4, vocab)
    y = torch.tensor([3, 7, 11, 0, vocab - 1])
    zg = z.clone().requires_grad_(True)
    logp, ent = token_logprobs(zg, y, return_entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(zg.grad).all()
    assert logp[0] == 0 and logp[1] == 0 and ent[0] == 0
    assert logp[2] == float("-inf")  # the target has probability 0
    torch.testing.assert_close(ent[3], torch.tensor(math.log(vocab)))
    torch.testing.assert_close(logp[3], torch.tensor(-math.log(vocab)))
    assert torch.isfinite(ent).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.3, 0.7])
def test_gradient_at_dominant_logits_is_as_exact_as_elsewhere(backend, device, dtype, temperature):
    """A logit of +-1e4 among ordinary ones, and rows of only large logits: outputs and
    gradient as close to float64 as on ordinary rows (tests/_dominant.py says why)."""
    z, y, kinds = dominant.rows(dtype)
    gen = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(2, len(y), generator=gen, dtype=torch.float64)
    mine = z.clone().to(device).requires_grad_(True)
    logp, ent = token_logprobs(mine, y.to(device), temperature=temperature, return_entropy=True, backend=backend)
    logp, ent = logp.cpu(), ent.cpu()
    ((logp.double() * w_lp).sum() + (ent.double() * w_ent).sum()).backward()
    theirs = z.double().requires_grad_(True)
    exp_logp, exp_ent = dominant.fp64_logp_entropy(theirs, y, temperature)
    ((exp_logp * w_lp).sum() + (exp_ent * w_ent).sum()).backward()
    # The Triton interpreter's float32 -> bf16 cast truncates (a GPU rounds to nearest).
    rounding = 1.0 if (backend, device) == ("triton", "cpu") else 0.5
    dominant.assert_grad_exact(mine.grad, theirs.grad, kinds, dtype, backend, rounding)
    for got, want in ((logp, exp_logp), (ent, exp_ent)):
        torch.testing.assert_close(got.double(), want.detach(), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", ON_CPU)
def test_ignored_rows_cost_nothing_and_get_zero_gradient(backend):
    z = torch.randn(4, 16, requires_grad=True)
    y = torch.tensor([1, -100, 3, 4])
    m = torch.tensor([True, True, False, True])
    garbage = z.detach().clone()
    garbage[1] = float("nan")  # ignored by target
    garbage[2] = float("inf")  # ignored by mask
    g = garbage.requires_grad_(True)
    logp, ent = token_logprobs(g, y, mask=m, return_entropy=True, backend=backend)
    assert logp[1] == logp[2] == ent[1] == ent[2] == 0
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(g.grad[1:3], torch.zeros(2, 16))
    clean_lp, clean_ent = token_logprobs(z, y, mask=m, return_entropy=True, backend=backend)
    assert torch.equal(clean_lp, logp) and torch.equal(clean_ent, ent)  # bit for bit
    all_ignored = token_logprobs(z, torch.full((4,), -100), backend=backend)
    assert torch.equal(all_ignored, torch.zeros(4))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_garbage_in_masked_and_ignored_rows_changes_no_valid_output(backend, device):
    """Random batches: rows that are masked or have an ignored target hold NaN, inf or
    1e30; every valid row's log-prob, entropy and gradient stays the same, bit for bit."""

    @examples(backend, device, cpu=25, interpreted=5)
    @given(case=cases(), garbage=st.sampled_from(GARBAGE))
    def check(case, garbage):
        logits, targets, mask = build({**case, "use_mask": True, "ignore": True})
        valid = mask & (targets != -100)
        dirty = torch.where(valid[..., None], logits, torch.tensor(garbage, dtype=logits.dtype))

        def run(z):
            leaf = z.clone().to(device).requires_grad_(True)
            logp, ent = token_logprobs(
                leaf, *on(device, targets), temperature=case["temperature"], return_entropy=True,
                mask=on(device, mask)[0], backend=backend,
            )
            (logp.sum() + 0.5 * ent.sum()).backward()
            return logp.cpu(), ent.cpu(), leaf.grad.cpu()

        for a, b in zip(run(logits), run(dirty)):
            assert torch.equal(a[valid], b[valid])  # bit for bit

    check()


# --------------------------------------------------------------------------------------
# In-place backward: saves an N x V buffer, and is refused or safe where it would hurt


@pytest.mark.parametrize("backend", ON_CPU)
def test_inplace_backward_equals_out_of_place(backend):
    w = torch.randn(6, 33, requires_grad=True)
    y = torch.randint(0, 33, (6,))

    def grad_of_w(inplace: bool):
        w.grad = None
        logits = w * 2.0  # a temporary, as the LM head's output is
        logp, ent = token_logprobs(logits, y, return_entropy=True, inplace_backward=inplace, backend=backend)
        (logp.sum() + 0.1 * ent.sum()).backward()
        return w.grad.clone(), logits.detach()

    expected, _ = grad_of_w(False)
    got, logits_after = grad_of_w(True)
    assert torch.equal(got, expected)
    # the logits buffer now holds the gradient: the documented hazard
    assert not torch.equal(logits_after, w.detach() * 2.0)


@pytest.mark.parametrize("backend", ON_CPU)
def test_inplace_backward_refuses_leaf_logits(backend):
    z = torch.randn(3, 5, requires_grad=True)
    logp = token_logprobs(z, torch.tensor([0, 1, 2]), inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="leaf tensor"):
        logp.sum().backward()
    assert z.grad is None


@pytest.mark.parametrize("backend", ON_CPU)
def test_inplace_backward_is_caught_when_another_node_still_needs_the_logits(backend):
    w = torch.randn(3, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    logits = w * 1.0
    other = (logits**2).sum()  # saves `logits`; its backward runs after ours
    logp = token_logprobs(logits, y, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logp.sum() + other).backward()
    # A consumer whose backward runs BEFORE ours reads the logits untouched: correct.
    w.grad = None
    logits = w * 1.0
    logp = token_logprobs(logits, y, inplace_backward=True, backend=backend)
    (logp.sum() + (logits**2).sum()).backward()
    got = w.grad.clone()
    w.grad = None
    logits = w * 1.0
    (token_logprobs(logits, y, backend=backend).sum() + (logits**2).sum()).backward()
    torch.testing.assert_close(got, w.grad)


# --------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument

Z = torch.randn(4, 10)
Y = torch.tensor([0, 1, 2, 3])
BAD = [
    ("targets must lie in", ValueError, lambda b: token_logprobs(Z, torch.tensor([0, 1, 2, 10]), backend=b)),
    ("targets must lie in", ValueError, lambda b: token_logprobs(Z, torch.tensor([0, 1, -101, 3]), backend=b)),
    ("targets must lie in", ValueError, lambda b: token_logprobs(Z, torch.tensor([0, 1, -1, 3]), backend=b)),
    ("targets has shape", ValueError, lambda b: token_logprobs(Z, torch.tensor([0, 1, 2]), backend=b)),
    ("targets must be int64", TypeError, lambda b: token_logprobs(Z, Y.float(), backend=b)),
    ("logits must be float", TypeError, lambda b: token_logprobs(Z.long(), Y, backend=b)),
    ("logits must be \\(N, V\\)", ValueError, lambda b: token_logprobs(torch.randn(10), torch.tensor(1), backend=b)),
    ("targets is on meta", ValueError, lambda b: token_logprobs(Z, Y.to("meta"), backend=b)),
    ("mask has shape", ValueError, lambda b: token_logprobs(Z, Y, mask=torch.ones(3, dtype=torch.bool), backend=b)),
    ("temperature must be a positive", ValueError, lambda b: token_logprobs(Z, Y, temperature=0.0, backend=b)),
    ("temperature must be a positive", ValueError, lambda b: token_logprobs(Z, Y, temperature=float("inf"), backend=b)),
    ("at least 1 entry", ValueError, lambda b: token_logprobs(torch.randn(4, 0), Y, backend=b)),
    ("contiguous along the vocabulary", ValueError, lambda b: token_logprobs(torch.randn(10, 4).t(), Y, backend=b)),
    ("viewable as \\(N, V\\) rows", ValueError, lambda b: token_logprobs(torch.randn(3, 2, 5).transpose(0, 1), torch.zeros(2, 3, dtype=torch.long), backend=b)),
]


@pytest.mark.parametrize("backend", ON_CPU)
@pytest.mark.parametrize("match,exc,call", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_clear_error(backend, match, exc, call):
    with pytest.raises(exc, match=match):
        call(backend)


def test_strided_rows_are_read_in_place():
    wide = torch.randn(5, 40)
    view = wide[:, 3:20]  # row stride 40, vocabulary 17: no copy needed
    y = torch.randint(0, 17, (5,))
    got = token_logprobs(view, y)
    torch.testing.assert_close(got, fp64_reference(view, y, 1.0)[0].float())


# --------------------------------------------------------------------------------------
# torch.library


def test_opcheck():
    z = torch.randn(5, 11, requires_grad=True)
    y = torch.tensor([0, 3, -100, 10, 4])
    m = torch.tensor([True, True, True, False, True])
    for backend in ON_CPU:
        torch.library.opcheck(torch.ops.vapo.token_logprobs.default, (z, y, m, 0.9, False, backend))
        torch.library.opcheck(torch.ops.vapo.token_logprobs.default, (z.view(1, 5, 11), y.view(1, 5), None, 1.0, False, backend))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_and_backward(compile_backend):
    torch._dynamo.reset()

    def loss_fn(h, w, y):
        logits = h @ w.t()
        logp, ent = token_logprobs(logits, y, temperature=0.9, return_entropy=True)
        return -(logp.mean()) - 0.01 * ent.mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=compile_backend)
    h = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(30, 16, requires_grad=True)
    y = torch.randint(0, 30, (8,))
    out = compiled(h, w, y)
    out.backward()
    g = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    ref = loss_fn(h, w, y)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g[0], h.grad)
    torch.testing.assert_close(g[1], w.grad)
