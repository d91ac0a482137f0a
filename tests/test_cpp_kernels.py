"""The C++ CPU kernels' own machinery: what no other backend has.

Their results against the float64 spec are checked with every other backend's, in the
family files (test_loss_kernel.py, test_logprobs.py, test_logits_loss.py). Here: the
same bits whatever the thread count, the instruction-set variants this CPU would not
pick (in subprocesses), and +0 (never -0) in the gradient slots of masked tokens.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from vapo_kernels import _backends
from vapo_kernels.ops import loss_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


pytestmark = pytest.mark.usefixtures("extension_built")  # on CI a broken C++ build fails loudly


def ext():
    return _backends.extension()


def run_isa_check(script: str, capability: str) -> str:
    """Runs ``script`` in a subprocess with torch's CPU capability capped at
    ``capability`` (the kernels pick their variant under that cap); returns its stdout."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


# --------------------------------------------------------------------------------------
# token_loss (csrc/cpu/loss.cpp)


def token_loss_args(dtype, seed=3, n_seqs=40):
    """Several kernel chunks (8192 tokens), long and empty sequences, every term on."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 2000, (n_seqs,), generator=gen)
    lengths[::7] = 0
    lengths[3] = 20000
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(offsets[-1])
    od = torch.float64 if dtype == torch.float64 else torch.float32

    def r():
        return torch.randn(n, generator=gen, dtype=torch.float64)

    logp = -r().abs()
    tokens = [logp, logp + 0.3 * r(), r(), r(), r(), r(), logp + 0.5 * r(), r().abs(),
              2 * torch.rand(n, generator=gen, dtype=torch.float64)]
    mask = torch.rand(n, generator=gen) < 0.7
    seq_w = torch.rand(n_seqs, generator=gen, dtype=torch.float64).to(od)
    lm_w = torch.rand(n_seqs, generator=gen, dtype=torch.float64).to(od)
    params = list(loss_spec.loss_params(
        dual_clip=3.0, value_clip=0.2, kl_kind="k3", vf_coef=0.5, kl_coef=0.1, entropy_coef=0.01,
        lm_coef=0.1,
    ))
    return [*(t.to(dtype) for t in tokens), mask, offsets, seq_w, lm_w, params, True]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_token_loss_bitwise_reproducible_across_thread_counts(dtype):
    args = token_loss_args(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext().token_loss_cpu(*args)
        torch.set_num_threads(2)
        two = ext().token_loss_cpu(*args)
        again = ext().token_loss_cpu(*args)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("coefs", [(1.0, 0.1, 0.01, 0.1), (0.5, 1.0, -0.3, 1.0)], ids=str)
def test_token_loss_writes_plus_zero_on_masked_tokens(dtype, coefs):
    """Masked tokens get +0 in every gradient, whatever the sign of the term's
    coefficient and gradient (the spec's -coef * 0 may be -0: not a kernel's contract,
    but this one's)."""
    args = token_loss_args(dtype, seed=4, n_seqs=12)
    args[-2] = list(loss_spec.loss_params(
        dual_clip=3.0, value_clip=0.2, kl_kind="k3", vf_coef=coefs[0], kl_coef=coefs[1],
        entropy_coef=coefs[2], lm_coef=coefs[3],
    ))
    mask = args[9]
    _, _, *grads = ext().token_loss_cpu(*args)
    for g in grads:
        assert g.shape == mask.shape
        assert bool((g[~mask] == 0).all()) and not bool(torch.signbit(g[~mask]).any())


_TOKEN_LOSS_ISA_CHECK = r"""
import torch
from vapo_kernels import _backends
from vapo_kernels.ops import loss_spec
ext = _backends.extension()
gen = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    n = 1000
    x = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for _ in range(9)]
    x[8] = x[8].abs()
    mask = torch.rand(n, generator=gen) < 0.8
    od = torch.float64 if dtype == torch.float64 else torch.float32
    offsets = torch.tensor([0, 1, 300, 300, 1000])
    w = torch.rand(4, generator=gen).to(od)
    for kl in ("k1", "abs", "k2", "k3+"):
        for form in ("verl", "openrlhf"):
            params = list(loss_spec.loss_params(dual_clip=3.0, value_clip=0.3, value_clip_form=form, kl_kind=kl,
                               kl_coef=0.2, entropy_coef=0.1, lm_coef=0.1))
            args = [*x, mask, offsets, w, w, params, True]
            got = ext.token_loss_cpu(*args)
            want = loss_spec.reference_kernel(*args)  # in fp32 for fp32 / bf16 / fp16 inputs, as the kernel
            tol = 1e-10 if dtype == torch.float64 else 1e-4
            for g, r in zip(got, want):
                r = r.double()
                atol = tol * (1 + r.abs().max().item())
                assert torch.allclose(g.double(), r, rtol=tol, atol=atol), (dtype, kl, form, g, r)
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA variants")
def test_token_loss_baseline_instruction_set():
    """The SSE2 baseline build (this CPU likely runs the AVX2 one)."""
    assert run_isa_check(_TOKEN_LOSS_ISA_CHECK, "default").strip() == "DEFAULT"


# --------------------------------------------------------------------------------------
# token_logprobs (csrc/cpu/logprobs.cpp): every instruction-set variant (the kernel picks
# AVX-512, AVX2 or the SSE2 baseline at run time, capped by torch's ATEN_CPU_CAPABILITY)


_LOGPROBS_ISA_CHECK = r"""
import torch
from vapo_kernels import _backends
from vapo_kernels.ops.token_logprobs import reference_backward, reference_forward
ext = _backends.extension()
gen = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for vocab in (1, 13, 1000, 2063):
        z = (torch.randn(5, vocab, generator=gen, dtype=torch.float64) * 4).to(dtype)
        if vocab > 1:
            z[0, 0] = -float("inf")
        t = torch.randint(0, vocab, (5,), generator=gen)
        t[1] = -100
        tau = 0.7
        got = ext.token_logprobs_fwd_cpu(z, t, None, tau)
        want = reference_forward(z.double(), t, None, tau)
        for g, w in zip(got, want):
            assert torch.allclose(g.double(), w, rtol=1e-5, atol=1e-5), (dtype, vocab, g, w)
        gl = torch.randn(5, generator=gen).to(got[0].dtype)
        out = torch.empty_like(z)
        ext.token_logprobs_bwd_cpu(gl, gl, z, t, None, got[2], got[1], tau, out)
        ref = torch.empty(z.shape, dtype=torch.float64)
        reference_backward(gl.double(), gl.double(), z.double(), t, None, got[2].double(), got[1].double(), tau, ref)
        tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}.get(dtype, 1e-5)
        assert torch.allclose(out.double(), ref, rtol=tol, atol=1e-5), (dtype, vocab)
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA variants")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_logprobs_other_instruction_sets(capability):
    run_isa_check(_LOGPROBS_ISA_CHECK, capability)


# --------------------------------------------------------------------------------------
# logits_loss (csrc/cpu/logits_loss.cpp): row blocks in a fixed layout, summed in block
# order: the same bits for any number of threads


def logits_loss_args(dtype, lengths, vocab, seed=5):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(offsets[-1])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    z = (2 * torch.randn(n, vocab, generator=gen)).to(dtype)
    y = torch.randint(0, vocab, (n,), generator=gen)
    valid = torch.rand(n, generator=gen) < 0.8
    old = -torch.rand(n, generator=gen, dtype=torch.float64) * 3

    def tok(t):
        return t.to(acc).contiguous()

    params = list(loss_spec.loss_params(
        dual_clip=3.0, kl_kind="k3", kl_coef=0.1, entropy_coef=0.01, lm_coef=0.1,
    ))
    s = len(lengths)
    return (z, y, tok(old), tok(torch.randn(n, generator=gen, dtype=torch.float64)),
            tok(old + 0.2 * torch.randn(n, generator=gen, dtype=torch.float64)),
            tok(torch.rand(n, generator=gen, dtype=torch.float64) + 0.5), valid, offsets,
            tok(torch.rand(s, generator=gen, dtype=torch.float64) / n),
            tok(torch.rand(s, generator=gen, dtype=torch.float64) / n), params, 0.9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("vocab", [37, 70_000])
def test_logits_loss_threads_give_the_same_bits(dtype, vocab):
    """Many row blocks of 37-logit rows, or one 70k-logit row per block."""
    lengths = [3, 0, 1, 9, 4] * (40 if vocab < 1000 else 1)
    args = logits_loss_args(dtype, lengths, vocab)
    threads = torch.get_num_threads()
    out = []
    try:
        for k in (1, 2):
            torch.set_num_threads(k)
            grad = torch.empty_like(args[0])
            out.append((ext().logits_loss_cpu(*args, grad), grad))
    finally:
        torch.set_num_threads(threads)
    (s1, g1), (s2, g2) = out
    assert torch.equal(s1, s2) and torch.equal(g1, g2)


# ---- found under ASan / UBSan (2026-12-07 review) ---------------------------------------

def _odd_bool_mask(bytes_):
    """A bool mask holding bytes other than 0 / 1, as `uint8.view(torch.bool)` makes it
    (torch's own ops take any nonzero byte as true)."""
    return torch.tensor(bytes_, dtype=torch.uint8).view(torch.bool)


def test_a_bool_mask_holding_other_bytes_than_one_counts_them_once():
    # valid_counts added the raw bytes and the loss kernels' token count read only 1s,
    # so a mask byte of 2 doubled policy_loss against the reference backend.
    import vapo_kernels as vk

    g = torch.Generator().manual_seed(0)
    raw = [1, 2, 2, 0, 1, 255, 0, 1]
    odd, plain = _odd_bool_mask(raw), torch.tensor(raw) != 0
    cu = torch.tensor([0, 3, 8])
    lp = -torch.rand(8, generator=g)
    old, adv = lp + 0.1 * torch.randn(8, generator=g), torch.randn(8, generator=g)
    rewards, values = torch.randn(8, generator=g), torch.randn(8, generator=g)
    logits = torch.randn(8, 11, generator=g)
    targets = torch.randint(0, 11, (8,), generator=g)
    assert torch.equal(ext().valid_counts_cpu(odd, cu), ext().valid_counts_cpu(plain, cu))
    calls = {
        "policy_loss": lambda m: vk.policy_loss(lp, old, adv, m, cu, backend="cpp")[0],
        "vapo_loss": lambda m: vk.vapo_loss(lp, old, adv, m, cu, values=values,
                                            old_values=values, returns=rewards,
                                            backend="cpp")[0],
        "gae": lambda m: vk.gae(rewards, values, m, cu, gamma=1.0, lam=0.9, whiten=True,
                                backend="cpp")[0],
        "decoupled_gae": lambda m: vk.decoupled_gae(rewards, values, m, cu, alpha=0.05,
                                                    backend="cpp")[0],
        "masked_whiten": lambda m: vk.masked_whiten(rewards, m, backend="cpp"),
        "token_logprobs": lambda m: vk.token_logprobs(logits, targets, m, backend="cpp"),
        "policy_loss_from_logits": lambda m: vk.policy_loss_from_logits(
            logits, targets, old, adv, m, cu, backend="cpp")[0],
    }
    for name, call in calls.items():
        torch.testing.assert_close(call(odd), call(plain), rtol=0, atol=0, msg=name)


def test_empty_output_of_an_overflowing_size_is_refused():
    # The byte count wrapped around: a "contiguous" 2^62-element tensor on 8 MiB, which
    # the GAE kernel then read out of bounds.
    huge = torch.empty(1).expand(2**62 + 2**21)
    with pytest.raises(RuntimeError, match="overflow"):
        ext().empty_like_cpu(huge)


def test_whitening_with_no_valid_element_is_nan_like_the_reference():
    # With validation off the C++ kernel returned x / sqrt(eps), a finite ~1e4 * x.
    import vapo_kernels as vk

    x, none = torch.randn(10), torch.zeros(10, dtype=torch.bool)
    previous = vk.validation_enabled()
    vk.set_validation(False)
    try:
        assert vk.masked_whiten(x, none, backend="cpp").isnan().all()
        assert vk.masked_whiten(x, none, backend="reference").isnan().all()
    finally:
        vk.set_validation(previous)


@pytest.mark.parametrize("vocab", [100, 2048, 70_000])
def test_a_nan_logit_among_minus_infinities_reaches_the_outputs(vocab):
    # The max pass skips NaN; a block whose other logits were all -inf was skipped whole,
    # and the row's outputs came out finite (the NaN screen never fired).
    import vapo_kernels as vk

    z = torch.randn(2, vocab)
    z[0, : min(1024, vocab)] = float("-inf")
    z[0, 5] = float("nan")
    z[1] = float("nan")
    targets = torch.tensor([vocab - 1, 3])
    previous = vk.validation_enabled()
    vk.set_validation(False)
    try:
        logp, entropy = vk.token_logprobs(z, targets, return_entropy=True, backend="cpp")
    finally:
        vk.set_validation(previous)
    assert logp.isnan().all() and entropy.isnan().all()
    with pytest.raises(ValueError, match="NaN"):
        vk.token_logprobs(z, targets, backend="cpp")


def test_the_kernels_temperature_range_is_the_python_ops():
    from vapo_kernels.ops.token_logprobs import TEMPERATURE_RANGE

    z, y = torch.randn(2, 100), torch.tensor([1, 2])
    low, high = TEMPERATURE_RANGE
    for ok in (low, high):
        ext().token_logprobs_fwd_cpu(z, y, None, ok)
    for bad in (low / 2, high * 2, 1e300, 1e-45):  # 1 / t in float: inf or 0, then NaN
        with pytest.raises(RuntimeError, match="temperature must lie in"):
            ext().token_logprobs_fwd_cpu(z, y, None, bad)


def test_the_loss_node_takes_only_a_0d_loss():
    leaf = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="0-d"):
        ext().loss_from_gradients(torch.ones(3), [leaf], [torch.ones(3)], "x", False)
