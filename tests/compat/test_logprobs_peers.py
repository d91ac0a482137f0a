"""The log-prob / entropy adapters against the real peer functions (verl, OpenRLHF, TRL).

Every comparison runs with the default backend and with ``backend="reference"`` (set
through ``vapo_kernels.compat.set_backend``). Outputs *and* gradients with respect to the
logits (and to hidden / weight for ``linear_cross_entropy``) are compared, with random
upstream gradients, on padded ``(B, T, V)`` and packed ``(N, V)`` logits, vocabularies
that are not powers of two, rows from flat to sharply peaked.

Tolerances (M = max_v |z_v| + log V of the row, g = upstream gradient of the row, p = the
row's softmax):

* fp32 / fp64: 1e-6 relative to the magnitude of the terms - ``1e-6 * (1 + max(|x|, M))``
  for log-probs and entropy (both are differences of O(M) numbers, so any fp32
  evaluation, the peer's included, carries an error of a few ulps of M), and
  ``1e-6 * |g| * (1 + p_v * M)`` for gradient entries (an upper bound on the entry's
  own magnitude).
* bf16 logits: the peers compute in bf16 and return bf16; the adapters return fp32.
  Both are measured against float64 computed on the same bf16 values. With u = 2^-8,
  bf16's unit roundoff (one rounding changes a value x by at most u |x|), the
  adapter-vs-peer tolerance is an a-priori bound on the peer's own rounding, counted
  step by step in its formula, plus the adapter's (one rounding of a gradient, fp32
  noise of a value):

  - log-prob, a per-row bf16 ``log_softmax``: ``z - max``, the log-sum and the result are
    rounded, each of size <= |logp| -> ``3u |logp|``;
  - entropy, differences of bf16-rounded quantities of size <= M (verl: softmax,
    ``p * z``, the sum, logsumexp, the difference - five roundings; TRL: the three of
    ``log_softmax``, ``exp``, the product, the sum - six) -> ``6u M``;
  - d logp, a bf16 ``log_softmax`` backward: ``exp`` of the rounded log-prob (its error,
    ``3u |logp|`` relative on p, times ``p |g| <= |g| / e``), the product and the result
    -> ``3u (|g| + |exact|)``;
  - d H: p is perturbed relatively by up to ``3u |log p| <= 3u M``, on terms of size
    ``|g| p (1 + M)`` -> ``4u |g| p M (1 + M)`` plus one rounding ``u |exact|``.

  On top of the tolerance, the adapter must be more accurate than the peer (strictly for
  log-probs, entropy and the entropy gradient; the log-prob gradient is a bf16 tensor
  for both and both sit at about one rounding, so there it must be no worse).

``linear_cross_entropy``: verl's kernel is Triton-on-CUDA only, so on CPU the adapter is
compared with verl's own eager functions applied to ``hidden @ weight.T / temperature``
(and with float64); the comparison with the real kernel is the ``gpu`` test at the end.
OpenRLHF is imported with its GPU-only dependencies stubbed for the import only (as in
``test_gae_peers.py``); its ``torch.compile``d ``compute_entropy`` is compared through the
eager function it wraps (``_torchdynamo_orig_callable``), to keep compilation out of the
test time.
"""

from __future__ import annotations

import math
import sys
import textwrap
import types

import pytest
import torch

import vapo_kernels.compat
from vapo_kernels import compat

from ._peers import import_peer, openrlhf_modules, use_backend

pytestmark = pytest.mark.peers

BACKENDS = [None, "reference"]  # None: the default (automatic) choice
SHAPES = [(3, 17), (41,)]  # leading dims: padded (B, T) and packed (N,)
# (leading dims, V not a power of two, dtype): each shape, vocabulary and dtype at least twice
CASES = [
    ((3, 17), 151, torch.float32),
    ((41,), 1000, torch.float32),
    ((3, 17), 1000, torch.float64),
    ((41,), 151, torch.float64),
]
TOL = 1e-6


@pytest.fixture(params=BACKENDS, ids=["default", "reference"])
def backend(request):
    """The backend of the adapters, active for the whole test."""
    with use_backend(request.param):
        yield request.param


def _openrlhf_entropy(utils):
    fn = utils.compute_entropy
    return getattr(fn, "_torchdynamo_orig_callable", fn)


# (peer fixture, the adapter's log-prob fn, the peer's, the adapter's entropy fn, the peer's)
def _peer_fns(name, request):
    if name == "verl":
        from vapo_kernels.compat import verl as ours

        peer = request.getfixturevalue("verl_F")
        return (ours.logprobs_from_logits, peer.logprobs_from_logits,
                ours.entropy_from_logits, peer.entropy_from_logits)
    if name == "openrlhf":
        from vapo_kernels.compat import openrlhf as ours

        peer = request.getfixturevalue("openrlhf_utils")
        return (ours.log_probs_from_logits, peer.log_probs_from_logits,
                ours.compute_entropy, _openrlhf_entropy(peer))
    from vapo_kernels.compat import trl as ours

    peer = request.getfixturevalue("trl_utils")
    return (ours.selective_log_softmax, peer.selective_log_softmax,
            ours.entropy_from_logits, peer.entropy_from_logits)


PEERS = ["verl", "openrlhf", "trl"]


# --------------------------------------------------------------------------------------
# Inputs and tolerances


def make_inputs(lead, vocab, seed, dtype=torch.float32):
    """logits (*lead, V) with per-row spreads from flat to sharply peaked, targets, and
    upstream gradients for the log-prob and the entropy."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.rand(*lead, 1, generator=gen) * 5.5 + 0.5
    logits = torch.randn(*lead, vocab, generator=gen) * spread
    targets = torch.randint(0, vocab, lead, generator=gen)
    g_logp = torch.randn(*lead, generator=gen)
    g_entropy = torch.randn(*lead, generator=gen)
    return logits.to(dtype), targets, g_logp, g_entropy


def row_scale(logits):
    """M = max |z| + log V per row: the size of the numbers whose difference is logp / H."""
    return logits.double().abs().amax(-1) + math.log(logits.shape[-1])


def exact(logits, targets, g_logp, g_entropy, temperature=1.0):
    """float64 logp, entropy and their gradients, from the values ``logits`` holds."""
    z = logits.detach().double().requires_grad_()
    logq = torch.log_softmax(z / temperature, -1)
    logp = logq.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logq.exp() * logq).sum(-1)
    (d_logp,) = torch.autograd.grad((logp * g_logp.double()).sum(), z, retain_graph=True)
    (d_entropy,) = torch.autograd.grad((entropy * g_entropy.double()).sum(), z)
    return logp.detach(), entropy.detach(), d_logp, d_entropy


def value_and_grad(fn, logits, upstream, *args, clone_for_peer=False):
    """fn's output on a fresh leaf copy of ``logits`` and d(sum(out * upstream))/dlogits."""
    leaf = logits.detach().clone().requires_grad_()
    x = leaf.clone() if clone_for_peer else leaf  # non-leaf input for in-place peers
    out = fn(x, *args)
    (grad,) = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), leaf)
    return out.detach(), grad


def assert_within(ours, theirs, bound, what):
    diff = (ours.double() - theirs.double()).abs()
    excess = diff - bound
    worst = int(excess.argmax())
    assert bool((excess <= 0).all()), (
        f"{what}: |diff| {diff.reshape(-1)[worst]:.3e} > bound "
        f"{torch.as_tensor(bound).expand_as(diff).reshape(-1)[worst]:.3e} (max |diff| "
        f"{diff.max():.3e})"
    )


def grad_bound(logits, g, scale, rel=TOL):
    """rel * |g| * (1 + p_v * M): the magnitude of a gradient entry, times rel."""
    p = torch.softmax(logits.double(), -1)
    return rel * g.double().abs().unsqueeze(-1) * (1 + p * scale.unsqueeze(-1))


# --------------------------------------------------------------------------------------
# fp32 / fp64: the adapters reproduce the peers


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize(("lead", "vocab", "dtype"), CASES)
def test_logprobs_and_entropy_match_peer(request, backend, peer, lead, vocab, dtype):
    ours_lp, peer_lp, ours_h, peer_h = _peer_fns(peer, request)
    logits, targets, g_logp, g_entropy = make_inputs(
        lead, vocab, seed=vocab + len(lead), dtype=dtype
    )
    scale = row_scale(logits)

    got, got_grad = value_and_grad(ours_lp, logits, g_logp, targets)
    want, want_grad = value_and_grad(peer_lp, logits, g_logp, targets)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape == lead
    assert_within(got, want, TOL * (1 + torch.maximum(want.double().abs(), scale)), "logp")
    assert_within(got_grad, want_grad, grad_bound(logits, g_logp, scale), "d logp / dz")

    got, got_grad = value_and_grad(ours_h, logits, g_entropy)
    want, want_grad = value_and_grad(peer_h, logits, g_entropy)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape == lead
    assert_within(got, want, TOL * (1 + scale), "entropy")
    # The entropy gradient is measured from the row max (exact at a dominant logit); the
    # peers' fp32 p * log p form carries its own rounding, up to ~3e-5 at V = 1000 - 40x
    # ours. So: ours within the bound of float64, and of the peer up to the peer's error.
    exact_grad = exact(logits, targets, g_logp, g_entropy)[3]
    bound = grad_bound(logits, g_entropy, scale)
    assert_within(got_grad, exact_grad, bound, "dH / dz against float64")
    peer_error = (want_grad.double() - exact_grad).abs()
    assert_within(got_grad, want_grad, bound + peer_error, "dH / dz against the peer")


@pytest.mark.parametrize(("lead", "temperature"), [((3, 17), 0.6), ((41,), 1.7)])
def test_openrlhf_temperature(openrlhf_utils, backend, temperature, lead):
    from vapo_kernels.compat.openrlhf import log_probs_from_logits

    logits, targets, g_logp, _ = make_inputs(lead, 1000, seed=7)
    scale = row_scale(logits / temperature)
    # OpenRLHF divides its input in place: give it a non-leaf copy of the leaf
    want, want_grad = value_and_grad(
        openrlhf_utils.log_probs_from_logits, logits, g_logp, targets, temperature,
        clone_for_peer=True,
    )
    before = logits.clone()
    got, got_grad = value_and_grad(log_probs_from_logits, logits, g_logp, targets, temperature)
    assert torch.equal(logits, before)
    assert_within(got, want, TOL * (1 + torch.maximum(want.abs().double(), scale)), "logp")
    bound = grad_bound(logits / temperature, g_logp, scale) / temperature
    assert_within(got_grad, want_grad, bound, "d logp / dz")
    _, _, d_exact, _ = exact(logits, targets, g_logp, g_logp, temperature)
    torch.testing.assert_close(got_grad.double(), d_exact, atol=1e-6, rtol=1e-5)


def test_openrlhf_modifies_its_input_and_the_adapter_does_not(openrlhf_utils):
    from vapo_kernels.compat.openrlhf import log_probs_from_logits

    logits, targets, _, _ = make_inputs((5,), 151, seed=1)
    theirs = logits.clone()
    openrlhf_utils.log_probs_from_logits(theirs, targets, 2.0)
    assert torch.equal(theirs, logits / 2.0)
    ours = logits.clone()
    log_probs_from_logits(ours, targets, 2.0)
    assert torch.equal(ours, logits)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("lead", SHAPES)
def test_trl_index_with_k_columns(trl_utils, backend, k, lead):
    from vapo_kernels.compat.trl import selective_log_softmax

    logits, _, _, _ = make_inputs(lead, 1000, seed=k)
    gen = torch.Generator().manual_seed(k)
    index = torch.randint(0, 1000, (*lead, k), generator=gen)
    upstream = torch.randn(*lead, k, generator=gen)
    got, got_grad = value_and_grad(selective_log_softmax, logits, upstream, index)
    want, want_grad = value_and_grad(trl_utils.selective_log_softmax, logits, upstream, index)
    assert got.shape == want.shape == (*lead, k) and got.dtype == want.dtype
    scale = row_scale(logits).unsqueeze(-1)
    assert_within(got, want, TOL * (1 + torch.maximum(want.abs().double(), scale)), "logp")
    torch.testing.assert_close(got_grad, want_grad, atol=TOL * k, rtol=TOL)


# --------------------------------------------------------------------------------------
# bf16 logits: the peers round to bf16, the adapters do not

_BF16_ERRORS: dict[str, dict[str, tuple[float, float]]] = {}


@pytest.mark.parametrize("peer", PEERS)
def test_bf16_more_accurate_than_peer(request, backend, peer):
    ours_lp, peer_lp, ours_h, peer_h = _peer_fns(peer, request)
    logits, targets, g_logp, g_entropy = make_inputs((4, 64), 1000, seed=0, dtype=torch.bfloat16)
    e_lp, e_h, e_dlp, e_dh = exact(logits, targets, g_logp, g_entropy)
    scale = row_scale(logits)
    p = torch.softmax(logits.double(), -1)
    m = scale.unsqueeze(-1)

    got_lp, got_dlp = value_and_grad(ours_lp, logits, g_logp, targets)
    want_lp, want_dlp = value_and_grad(peer_lp, logits, g_logp, targets)
    got_h, got_dh = value_and_grad(ours_h, logits, g_entropy)
    want_h, want_dh = value_and_grad(peer_h, logits, g_entropy)
    assert got_lp.dtype == got_h.dtype == torch.float32
    assert want_lp.dtype == want_h.dtype == torch.bfloat16  # the peers' half-precision path
    assert got_dlp.dtype == got_dh.dtype == torch.bfloat16

    # ours: fp32 results, bf16 gradients rounded once (u = 2^-8, a hair for fp32 noise)
    u = 2**-8
    assert_within(got_lp, e_lp, 1e-5 * (1 + scale), "ours logp vs fp64")
    assert_within(got_h, e_h, 1e-5 * (1 + scale), "ours H vs fp64")
    assert_within(got_dlp, e_dlp, 1.01 * u * e_dlp.abs() + 1e-6, "ours d logp vs fp64")
    assert_within(got_dh, e_dh, 1.01 * u * e_dh.abs() + 1e-6, "ours dH vs fp64")

    # ours vs the peer: the peer's rounding bound (module docstring) + ours
    g_lp, g_h = g_logp.double().abs().unsqueeze(-1), g_entropy.double().abs().unsqueeze(-1)
    assert_within(got_lp, want_lp, 3 * u * e_lp.abs() + 1e-5 * (1 + scale), "logp vs peer")
    assert_within(got_h, want_h, 6 * u * scale + 1e-5 * (1 + scale), "H vs peer")
    assert_within(got_dlp, want_dlp, 3 * u * (g_lp + e_dlp.abs()) + 1.01 * u * e_dlp.abs() + 1e-6,
                  "d logp vs peer")
    assert_within(got_dh, want_dh, 4 * u * g_h * p * m * (1 + m) + 2.01 * u * e_dh.abs() + 1e-6,
                  "dH vs peer")

    errors = {}
    for what, got, want, ref in (
        ("logp", got_lp, want_lp, e_lp), ("entropy", got_h, want_h, e_h),
        ("d logp", got_dlp, want_dlp, e_dlp), ("d H", got_dh, want_dh, e_dh),
    ):
        errors[what] = (
            float((got.double() - ref).abs().max()), float((want.double() - ref).abs().max())
        )
    _BF16_ERRORS[f"{peer}[{backend or 'default'}]"] = errors
    print(f"\nbf16 max |err| vs fp64, {peer} (ours, peer): "
          + ", ".join(f"{k} {a:.2e} / {b:.2e}" for k, (a, b) in errors.items()))
    for what in ("logp", "entropy", "d H"):
        ours_err, peer_err = errors[what]
        assert ours_err < peer_err, (
            f"{what}: ours {ours_err:.3e} not below the peer's {peer_err:.3e}"
        )
    ours_err, peer_err = errors["d logp"]
    assert ours_err <= peer_err * (1 + 1e-3) + 1e-7, f"d logp: ours {ours_err:.3e} > {peer_err:.3e}"


# --------------------------------------------------------------------------------------
# Ignored labels, verl's in-place backward


@pytest.mark.parametrize("peer", PEERS)
def test_ignore_index_gives_zero(request, backend, peer):
    ours_lp = _peer_fns(peer, request)[0]
    logits, targets, g_logp, _ = make_inputs((2, 6), 151, seed=3)
    targets[0, 2] = targets[1, 5] = -100
    got, grad = value_and_grad(ours_lp, logits, g_logp, targets)
    assert got[0, 2] == 0 and got[1, 5] == 0
    assert not grad[0, 2].any() and not grad[1, 5].any()


def test_verl_inplace_backward(verl_F, backend):
    from vapo_kernels.compat.verl import entropy_from_logits, logprobs_from_logits

    logits, targets, g_logp, _ = make_inputs((3, 9), 1000, seed=5)
    want, want_grad = value_and_grad(verl_F.logprobs_from_logits, logits, g_logp, targets)
    scale = row_scale(logits)

    leaf = logits.clone().requires_grad_()
    inner = leaf * 1.0  # non-leaf: its buffer may take the gradient
    got = logprobs_from_logits(inner, targets)  # inplace_backward=True, verl's default
    (got_grad,) = torch.autograd.grad((got * g_logp).sum(), leaf)
    assert_within(got.detach(), want, TOL * (1 + scale), "logp")
    assert_within(got_grad, want_grad, grad_bound(logits, g_logp, scale), "d logp / dz")
    assert torch.equal(inner.detach(), got_grad), "the gradient was not written in place"

    leaf = logits.clone().requires_grad_()  # a leaf is never overwritten
    got = logprobs_from_logits(leaf, targets, inplace_backward=True)
    (got_grad,) = torch.autograd.grad((got * g_logp).sum(), leaf)
    assert torch.equal(leaf.detach(), logits)
    assert_within(got_grad, want_grad, grad_bound(logits, g_logp, scale), "d logp / dz")

    # Another node saved the same logits and runs its backward after ours (it was
    # recorded first): refused, not silently fed the overwritten buffer.
    for entropy_fn in (verl_F.entropy_from_logits, entropy_from_logits):
        inner = logits.clone().requires_grad_() * 1.0
        entropy = entropy_fn(inner)
        loss = (logprobs_from_logits(inner, targets) + entropy).sum()
        with pytest.raises(RuntimeError, match="inplace"):
            loss.backward()


def test_verl_entropy_with_chunking(verl_F, backend):
    from vapo_kernels.compat.verl import entropy_from_logits_with_chunking

    logits, _, _, g = make_inputs((37,), 1000, seed=11, dtype=torch.bfloat16)
    got, got_grad = value_and_grad(entropy_from_logits_with_chunking, logits, g, 8)
    want, want_grad = value_and_grad(verl_F.entropy_from_logits_with_chunking, logits, g, 8)
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    scale = row_scale(logits)
    # verl upcasts each chunk to fp32 too: fp32 agreement, bf16 gradients
    assert_within(got, want, TOL * (1 + scale), "entropy")
    torch.testing.assert_close(got_grad, want_grad, atol=2**-8 * float(g.abs().max()), rtol=2**-7)


# --------------------------------------------------------------------------------------
# linear_cross_entropy


def linear_inputs(lead, hidden_size, vocab, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * (2.0 / math.sqrt(hidden_size))
    labels = torch.randint(0, vocab, lead, generator=gen)
    n = math.prod(lead)
    return (hidden.to(dtype), weight.to(dtype), labels,
            torch.randn(n, generator=gen), torch.randn(n, generator=gen))


def verl_eager_head(verl_F, hidden, weight, labels, temperature):
    """verl's own functions on ``hidden @ weight.T / temperature`` (flattened, as its kernel)."""
    logits = (hidden @ weight.T).reshape(-1, weight.shape[0]) / temperature
    return (verl_F.logprobs_from_logits(logits, labels.reshape(-1)),
            verl_F.entropy_from_logits(logits))


def head_grads(fn, hidden, weight, g_logp, g_entropy):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logp, entropy = fn(hidden, weight)
    loss = (logp.double() * g_logp.double()).sum() + (entropy.double() * g_entropy.double()).sum()
    d_hidden, d_weight = torch.autograd.grad(loss, (hidden, weight))
    return logp.detach(), entropy.detach(), d_hidden, d_weight


@pytest.mark.parametrize(
    ("lead", "temperature", "tiles", "dtype"),  # tiles (rows, vocab) of the reference kernel
    [
        ((2, 13), 0.7, (4, 64), torch.float64),  # several row and vocabulary tiles
        ((29,), 1.0, (1024, 8192), torch.float64),  # one tile
        ((2, 13), 1.0, (1024, 8192), torch.float32),
        ((29,), 1.3, (4, 100), torch.float32),
    ],
)
def test_verl_linear_cross_entropy(verl_F, backend, monkeypatch, lead, temperature, tiles, dtype):
    from vapo_kernels.compat import verl as adapter
    from vapo_kernels.ops import linear_logprobs as ops_logprobs

    vocab, hidden_size = 307, 24
    monkeypatch.setattr(ops_logprobs, "_LINEAR_ROWS_PER_CHUNK", tiles[0])
    monkeypatch.setattr(ops_logprobs, "_LINEAR_VOCAB_PER_CHUNK", tiles[1])
    hidden, weight, labels, g_logp, g_entropy = linear_inputs(lead, hidden_size, vocab, 2, dtype)
    got = head_grads(lambda h, w: adapter.linear_cross_entropy(h, w, labels, temperature),
                     hidden, weight, g_logp, g_entropy)
    want = head_grads(lambda h, w: verl_eager_head(verl_F, h, w, labels, temperature),
                      hidden, weight, g_logp, g_entropy)
    n = math.prod(lead)
    assert got[0].shape == got[1].shape == (n,)
    assert got[0].dtype == got[1].dtype == torch.float32  # verl's kernel returns fp32
    assert got[2].dtype == got[3].dtype == dtype
    tol = 1e-6 if dtype == torch.float64 else 1e-5  # fp32: the GEMM's own rounding
    for what, a, b in zip(("logp", "entropy", "d hidden", "d weight"), got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol, msg=what)


def test_verl_linear_cross_entropy_half_inputs_keep_fp32_logits(verl_F, backend):
    """bf16 hidden / weight: logits are accumulated in fp32, never rounded to bf16 (as in
    verl's kernel), so the results match float64 on the same bf16 values closely."""
    from vapo_kernels.compat.verl import linear_cross_entropy

    hidden, weight, labels, g_logp, g_entropy = linear_inputs((3, 11), 64, 1001, 4, torch.bfloat16)
    got = head_grads(lambda h, w: linear_cross_entropy(h, w, labels, 0.9),
                     hidden, weight, g_logp, g_entropy)
    ref = head_grads(
        lambda h, w: verl_eager_head(verl_F, h.double(), w.double(), labels, 0.9),
        hidden, weight, g_logp, g_entropy,
    )
    torch.testing.assert_close(got[0].double(), ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1].double(), ref[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[2:], ref[2:]):  # bf16 gradients: one rounding of the fp32 result
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=2**-7)


def test_verl_linear_cross_entropy_reductions_and_errors(verl_F, backend):
    from vapo_kernels.compat.verl import linear_cross_entropy

    hidden, weight, labels, _, _ = linear_inputs((2, 5), 16, 97, 6, torch.float64)
    logp, entropy = linear_cross_entropy(hidden, weight, labels)
    for reduction, want in (("sum", logp.sum()), ("mean", logp.mean()), ("none", logp)):
        got, got_entropy = linear_cross_entropy(hidden, weight, labels, 1.0, reduction)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_entropy, entropy)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, 1.0, "max")
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, weight.T, labels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="verl's fused kernel needs CUDA")
def test_verl_linear_cross_entropy_matches_verl_kernel_on_gpu(verl_F):
    """Against verl's real Triton kernel (bf16, H % 128 == 0, V not a multiple of 1024)."""
    kernel = import_peer("verl.utils.kernel.linear_cross_entropy").linear_cross_entropy
    from vapo_kernels.compat.verl import linear_cross_entropy

    hidden, weight, labels, g_logp, g_entropy = linear_inputs((2, 100), 256, 3001, 8, torch.float32)
    hidden, weight, labels = hidden.cuda().bfloat16(), weight.cuda().bfloat16(), labels.cuda()
    g_logp, g_entropy = g_logp.cuda(), g_entropy.cuda()
    got = head_grads(lambda h, w: linear_cross_entropy(h, w, labels, 0.8),
                     hidden, weight, g_logp, g_entropy)
    want = head_grads(lambda h, w: kernel(h, w, labels, 0.8, "none"),
                      hidden, weight, g_logp, g_entropy)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)
    for a, b in zip(got[2:], want[2:]):  # both round d_logits to bf16 before the GEMMs
        assert a.dtype == b.dtype == torch.bfloat16
        scale = float(b.double().abs().max())
        torch.testing.assert_close(a.double(), b.double(), atol=2**-7 * scale, rtol=2**-6)


_TP_SCRIPT = textwrap.dedent(
    r"""
    import sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    WORLD = 2


    def check(rank, init_file):
        from vapo_kernels.compat.verl import linear_cross_entropy

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=WORLD)
        group = dist.new_group(ranks=list(range(WORLD)))
        n, dim, vocab = 23, 16, 38
        shard = vocab // WORLD  # verl's kernel assumes equal shards in rank order
        v0, v1 = rank * shard, (rank + 1) * shard
        done = 0
        for dtype in (torch.float64, torch.float32):
            for temperature, reduction in ((0.8, "none"), (1.0, "sum")):
                gen = torch.Generator().manual_seed(5)  # identical data on every rank
                h = torch.randn(2, n, dim, generator=gen, dtype=torch.float64).to(dtype)
                w = (0.5 * torch.randn(vocab, dim, generator=gen, dtype=torch.float64)).to(dtype)
                y = torch.randint(0, vocab, (2, n), generator=gen)
                y[0, 0], y[0, 1], y[1, 0], y[1, 1] = 0, vocab - 1, shard - 1, shard  # shard edges
                g_lp = torch.randn(2 * n, generator=gen, dtype=torch.float64)
                g_ent = torch.randn(2 * n, generator=gen, dtype=torch.float64)

                def run(h, w, group):
                    lp, ent = linear_cross_entropy(h, w, y, temperature, reduction, group)
                    lp_term = lp.double() * (g_lp if reduction == "none" else 1.0)
                    (lp_term.sum() + (ent.double() * g_ent).sum()).backward()
                    return lp.detach(), ent.detach()

                full = [h.clone().requires_grad_(), w.clone().requires_grad_()]
                lp, ent = run(full[0], full[1], None)
                part = [h.clone().requires_grad_(), w[v0:v1].clone().requires_grad_()]
                lp_p, ent_p = run(part[0], part[1], group)

                tol = 1e-12 if dtype == torch.float64 else 2e-5

                def close(a, b):
                    torch.testing.assert_close(a, b, rtol=tol, atol=tol)

                what = f"rank {rank} {dtype} T={temperature} {reduction}"
                try:
                    assert lp_p.dtype == ent_p.dtype == torch.float32
                    close(lp_p, lp)  # every rank: the full log-probs and entropy
                    close(ent_p, ent)
                    close(part[1].grad, full[1].grad[v0:v1])  # its own rows of dL/dW
                    # dL/dhidden, verl's contract: the ranks' gradients sum to the full
                    # one (Megatron reduce-scatters them); here each rank holds 1 / WORLD
                    gh = part[0].grad.clone()
                    assert gh.dtype == dtype and gh.shape == h.shape
                    close(gh * WORLD, full[0].grad)
                    dist.all_reduce(gh, group=group)
                    close(gh, full[0].grad)
                except AssertionError as e:
                    raise AssertionError(f"{what}: {e}") from None
                done += 1
        dist.barrier()  # without it, destroy_process_group sometimes aborts on gloo
        dist.destroy_process_group()
        print(f"rank {rank}: {done} cases agree", flush=True)


    if __name__ == "__main__":
        mp.spawn(check, args=(sys.argv[1],), nprocs=WORLD, join=True)
    """
)


def test_verl_linear_cross_entropy_dist_process_group(tmp_path):
    """``dist_process_group``: the vocabulary sharded over 2 CPU processes (gloo), against
    the single-process result on the whole head. Fresh interpreter, as in
    ``tests/test_linear_logprobs_tp.py``."""
    import os
    import subprocess
    from pathlib import Path

    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",  # two ranks on a small machine
    }
    script = tmp_path / "verl_tp_check.py"
    script.write_text(_TP_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "init")],
        check=False, capture_output=True, text=True, env=env, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in range(2):
        assert f"rank {rank}: 4 cases agree" in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------
# patch() / unpatch()


def _counting(monkeypatch, module):
    """Count the adapter module's calls into the token log-prob op."""
    calls = []
    real = module.token_logprobs

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "token_logprobs", counted)
    # entropy adapters share vapo_kernels.compat._entropy, which calls the op from there
    monkeypatch.setattr(vapo_kernels.compat, "token_logprobs", counted)
    return calls


def test_verl_patch_swaps_and_restores(verl_F, monkeypatch):
    from vapo_kernels.compat import verl as adapter

    core = import_peer("verl.trainer.ppo.core_algos")
    lce = import_peer("verl.utils.kernel.linear_cross_entropy")
    naive = import_peer("verl.workers.rollout.naive.naive_rollout")  # imports by name
    names = ["logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking"]
    originals = {n: getattr(verl_F, n) for n in names}
    original_lce, original_naive = lce.linear_cross_entropy, naive.logprobs_from_logits
    original_gae = core.compute_gae_advantage_return
    calls = _counting(monkeypatch, adapter)

    logits = make_inputs((3, 8), 151, seed=9)[0]
    mask = torch.ones(3, 8)
    want = core.compute_entropy_loss(logits, mask)  # verl's call site: verl_F.entropy_from_logits
    assert not calls
    late = types.ModuleType("verl._vapo_late_importer")
    try:
        adapter.patch()
        adapter.patch()  # idempotent
        assert adapter.is_patched()
        for n in names:
            assert getattr(verl_F, n) is getattr(adapter, n)
        assert naive.logprobs_from_logits is adapter.logprobs_from_logits
        assert lce.linear_cross_entropy is adapter.linear_cross_entropy
        assert core.compute_gae_advantage_return is adapter.compute_gae_advantage_return
        got = core.compute_entropy_loss(logits, mask)
        assert len(calls) == 1, "verl's call site did not reach the adapter"
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        # a module importing by name after patch() gets ours, and unpatch() reverts it
        sys.modules[late.__name__] = late
        exec("from verl.utils.torch_functional import logprobs_from_logits", late.__dict__)  # noqa: S102
        assert late.logprobs_from_logits is adapter.logprobs_from_logits
    finally:
        adapter.unpatch()
        sys.modules.pop(late.__name__, None)
    adapter.unpatch()  # idempotent
    assert not adapter.is_patched()
    for n in names:
        assert getattr(verl_F, n) is originals[n]
    assert naive.logprobs_from_logits is original_naive
    assert late.logprobs_from_logits is original_naive
    assert lce.linear_cross_entropy is original_lce
    assert core.compute_gae_advantage_return is original_gae
    core.compute_entropy_loss(logits, mask)
    assert len(calls) == 1, "the adapter is still called after unpatch()"


def test_verl_partial_patch(verl_F):
    from vapo_kernels.compat import verl as adapter

    lce = import_peer("verl.utils.kernel.linear_cross_entropy")
    core = import_peer("verl.trainer.ppo.core_algos")
    original_lce, original_gae = lce.linear_cross_entropy, core.compute_gae_advantage_return
    try:
        adapter.patch(gae=False, linear_ce=False)
        assert verl_F.logprobs_from_logits is adapter.logprobs_from_logits
        assert lce.linear_cross_entropy is original_lce
        assert core.compute_gae_advantage_return is original_gae
        adapter.patch()  # completes the patch
        assert lce.linear_cross_entropy is adapter.linear_cross_entropy
    finally:
        adapter.unpatch()
    assert lce.linear_cross_entropy is original_lce and not adapter.is_patched()


def test_openrlhf_patch_swaps_and_restores():
    from vapo_kernels.compat import openrlhf as adapter

    with openrlhf_modules("openrlhf.models.utils", "openrlhf.models.actor") as (utils, actor):
        originals = (utils.log_probs_from_logits, utils.compute_entropy)
        assert actor.log_probs_from_logits is originals[0]
        try:
            adapter.patch()
            adapter.patch()
            assert adapter.is_patched()
            for module in (utils, actor):  # Actor.forward reads the actor module's globals
                assert module.log_probs_from_logits is adapter.log_probs_from_logits
                assert module.compute_entropy is adapter.compute_entropy
        finally:
            adapter.unpatch()
        adapter.unpatch()
        assert not adapter.is_patched()
        for module in (utils, actor):
            assert (module.log_probs_from_logits, module.compute_entropy) == originals


def test_trl_patch_swaps_and_restores(trl_utils):
    from vapo_kernels.compat import trl as adapter

    grpo = import_peer("trl.trainer.grpo_trainer")  # imports both by name
    originals = (trl_utils.selective_log_softmax, trl_utils.entropy_from_logits)
    assert (grpo.selective_log_softmax, grpo.entropy_from_logits) == originals
    try:
        adapter.patch()
        adapter.patch()
        assert adapter.is_patched()
        for module in (trl_utils, grpo):
            assert module.selective_log_softmax is adapter.selective_log_softmax
            assert module.entropy_from_logits is adapter.entropy_from_logits
    finally:
        adapter.unpatch()
    adapter.unpatch()
    assert not adapter.is_patched()
    for module in (trl_utils, grpo):
        assert (module.selective_log_softmax, module.entropy_from_logits) == originals
