"""``vapo::logits_loss``: log-probs, the PPO/VAPO loss and d loss / d logits in one kernel.

The reference (``reference_logits_kernel``) is by definition the log-prob forward, the
token-loss kernel and the log-prob backward in sequence; ``tests/test_loss.py`` checks the
public wrapper against an independent composition. Here: the C++ kernel against the
reference run in float64 on the same inputs, on random ragged batches (empty and length-1
sequences, masked rows, ignored targets, row blocks of one and of many rows), garbage in
masked slots, in-place vs out-of-place, thread counts, the op's checks, opcheck and
torch.compile.

Exact decisions: the C++ kernel computes in float32 for non-fp64 logits while the spec
runs in float64, so a token whose ratio lies within 1e-3 of a clip bound (or of the dual
clip constant) is moved to ratio 1 (old_logp := its float64 log-prob); every clip decision
is then the same in both and what is left is rounding.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vapo_kernels import _backends
from vapo_kernels.ops import token_logprobs as LP
import vapo_kernels as vk
from vapo_kernels import _loss_layout as layout
from vapo_kernels.ops import loss_spec
from vapo_kernels.ops.logits_loss import reference_logits_kernel

import _dominant as dominant
from strategies import backend_params

F64 = torch.float64
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _cpp_or_skip():
    err = _backends.extension_error()
    if err is not None:
        pytest.fail(f"the C++ extension must build: {err}")
    return _backends.extension()


def acc_of(dtype):
    return F64 if dtype == F64 else torch.float32


@st.composite
def batches(draw):
    lengths = draw(st.lists(st.integers(0, 7), min_size=1, max_size=6))
    n = sum(lengths)
    vocab = draw(st.sampled_from([1, 5, 37, 1500, 70_000]))
    if vocab >= 1500:  # keep the test fast: few rows for big rows
        lengths = lengths[:2]
        lengths = [min(x, 3) for x in lengths]
        n = sum(lengths)
    return dict(
        lengths=lengths,
        n=n,
        vocab=vocab,
        dtype=draw(st.sampled_from(DTYPES)),
        p_mask=draw(st.sampled_from([0.0, 0.3, 1.0])),
        p_ignore=draw(st.sampled_from([0.0, 0.2])),
        temperature=draw(st.sampled_from([1.0, 0.7])),
        dual=draw(st.sampled_from([0.0, 3.0])),
        isw=draw(st.booleans()),
        kl_kind=draw(st.sampled_from([0, 1, 2, 3, 4])),
        kl_straight=draw(st.booleans()),
        entropy_coef=draw(st.sampled_from([0.0, 0.01])),
        lm=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def make(case, garbage=None):
    """Kernel arguments (logits in case['dtype'], the rest in the accumulation dtype)."""
    g = torch.Generator().manual_seed(case["seed"])
    n, vocab, dtype = case["n"], case["vocab"], case["dtype"]
    acc = acc_of(dtype)
    logits = (torch.randn(n, vocab, generator=g, dtype=F64) * 2).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    ignore = torch.rand(n, generator=g) < case["p_ignore"]
    targets[ignore] = -100
    valid = (torch.rand(n, generator=g) >= case["p_mask"]) & ~ignore
    lp64, _, _ = LP.reference_forward(logits.to(F64), targets, valid, case["temperature"])
    old = lp64 + 0.3 * torch.randn(n, generator=g, dtype=F64)
    params = loss_spec.loss_params(
        dual_clip=case["dual"] or None,
        kl_kind=({1: "k1", 2: "abs", 3: "k2", 4: "k3"}[case["kl_kind"]]
                 + ("+" if case["kl_straight"] else "")) if case["kl_kind"] else None,
        kl_coef=0.1,
        entropy_coef=case["entropy_coef"],
        lm_coef=0.1,
    )
    ratio = torch.exp(lp64 - old)
    bounds = [1 - params[layout.P_CLIP_LOW], 1 + params[layout.P_CLIP_HIGH]]
    if case["dual"]:
        bounds.append(case["dual"])
    near = torch.zeros(n, dtype=torch.bool)
    for b in bounds:
        near |= (ratio - b).abs() < 1e-3
    old = torch.where(near, lp64, old)
    adv = torch.randn(n, generator=g, dtype=F64)
    ref = lp64 + 0.2 * torch.randn(n, generator=g, dtype=F64) if case["kl_kind"] else None
    isw = torch.rand(n, generator=g, dtype=F64) + 0.5 if case["isw"] else None
    offsets = torch.tensor([0, *torch.tensor(case["lengths"]).cumsum(0).tolist()], dtype=torch.int64)
    counts = torch.stack([valid[a:b].sum() for a, b in zip(offsets[:-1], offsets[1:])]) if len(
        case["lengths"]) else torch.zeros(0, dtype=torch.int64)
    seq_w = loss_spec.sequence_weights(counts, "seq-mean-token-mean", horizon=None).to(acc)
    lm_w = None
    if case["lm"]:
        pos = (torch.arange(len(case["lengths"])) % 2 == 0).to(F64)
        tokens = float((pos * counts).sum())
        lm_w = (pos / tokens if tokens else pos * 0).to(acc)
    if garbage is not None:
        logits[~valid] = torch.tensor(garbage).to(dtype)
        old = old.clone()
        adv = adv.clone()
        old[~valid] = garbage
        adv[~valid] = garbage
    vec = lambda t: None if t is None else t.to(acc).contiguous()  # noqa: E731
    return dict(
        logits=logits, targets=targets, old=vec(old), adv=vec(adv), ref=vec(ref), isw=vec(isw),
        valid=valid, offsets=offsets, seq_w=seq_w, lm_w=lm_w, params=params,
        temperature=case["temperature"],
    )


def run(kernel, a, out="new", logits=None):
    logits = a["logits"] if logits is None else logits
    if out == "new":
        out = torch.empty_like(logits)
    elif out == "inplace":
        out = logits
    sums = kernel(
        logits, a["targets"], a["old"], a["adv"], a["ref"], a["isw"], a["valid"], a["offsets"],
        a["seq_w"], a["lm_w"], a["params"], a["temperature"], out,
    )
    return sums, out


def spec(a):
    """The reference in float64 on the same (upcast) inputs."""
    up = {k: (v.to(F64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
          for k, v in a.items()}
    return run(reference_logits_kernel, up, logits=a["logits"].to(F64))


def assert_close_sums(got, want, rtol):
    got, want = got.to(F64), want.to(F64)
    for i in range(layout.NUM_SUMS):
        if i in (layout.S_TOKENS, layout.S_CLIP_LOW, layout.S_CLIP_HIGH, layout.S_DUAL_CLIP):
            assert got[i] == want[i], (i, got[i], want[i])
        elif i in (layout.S_RATIO_MIN, layout.S_RATIO_MAX) and torch.isinf(want[i]):
            assert got[i] == want[i], (i, got[i], want[i])
        else:
            torch.testing.assert_close(got[i], want[i], rtol=rtol, atol=rtol)


@settings(max_examples=60, deadline=None)
@given(case=batches())
def test_cpp_matches_float64_spec(case, poisoned):
    ext = _cpp_or_skip()
    a = make(case)
    with poisoned():
        sums, grad = run(ext.logits_loss_cpu, a)
    want_sums, want_grad = spec(a)
    rtol = 1e-12 if case["dtype"] == F64 else 2e-5
    assert sums.dtype == acc_of(case["dtype"]) and grad.dtype == case["dtype"]
    assert_close_sums(sums, want_sums, rtol)
    # The gradient is rounded once to the logits' dtype; compare at that precision.
    gtol = {F64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
    tol = gtol[case["dtype"]]
    torch.testing.assert_close(grad.to(F64), want_grad, rtol=tol, atol=tol * 1e-2)
    assert not grad[~a["valid"]].any()


@settings(max_examples=25, deadline=None)
@given(case=batches(), garbage=st.sampled_from([float("nan"), 1e30, -float("inf")]))
def test_garbage_in_masked_rows_changes_nothing(case, garbage):
    ext = _cpp_or_skip()
    clean = make(case)
    dirty = make(case, garbage=garbage)
    s1, g1 = run(ext.logits_loss_cpu, clean)
    s2, g2 = run(ext.logits_loss_cpu, dirty)
    assert torch.equal(s1, s2)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@pytest.mark.parametrize("vocab", [37, 70_000])
def test_inplace_no_grad_and_threads_give_the_same_bits(dtype, vocab):
    ext = _cpp_or_skip()
    case = dict(lengths=[3, 0, 1, 9, 4], n=17, vocab=vocab, dtype=dtype, p_mask=0.2,
                p_ignore=0.1, temperature=0.9, dual=3.0, isw=True, kl_kind=4,
                kl_straight=False, entropy_coef=0.01, lm=True, seed=5)
    a = make(case)
    sums, grad = run(ext.logits_loss_cpu, a)
    logits = a["logits"].clone()
    sums_inplace, _ = run(ext.logits_loss_cpu, a, out="inplace", logits=logits)
    assert torch.equal(sums, sums_inplace) and torch.equal(grad, logits)
    sums_only, _ = run(ext.logits_loss_cpu, a, out=None)
    assert torch.equal(sums, sums_only)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(ext.logits_loss_cpu, a)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], sums) and torch.equal(one[1], grad)


def test_one_long_sequence_of_many_row_blocks(poisoned):
    ext = _cpp_or_skip()
    case = dict(lengths=[3000], n=3000, vocab=64, dtype=torch.float32, p_mask=0.1, p_ignore=0.0,
                temperature=1.0, dual=0.0, isw=False, kl_kind=0, kl_straight=False,
                entropy_coef=0.0, lm=False, seed=9)
    a = make(case)
    with poisoned():
        sums, grad = run(ext.logits_loss_cpu, a)
    want_sums, want_grad = spec(a)
    assert_close_sums(sums, want_sums, 2e-5)
    torch.testing.assert_close(grad.to(F64), want_grad, rtol=1e-5, atol=1e-7)


def test_binding_rejects_bad_arguments():
    ext = _cpp_or_skip()
    case = dict(lengths=[2, 3], n=5, vocab=7, dtype=torch.float32, p_mask=0.0, p_ignore=0.0,
                temperature=1.0, dual=0.0, isw=False, kl_kind=0, kl_straight=False,
                entropy_coef=0.0, lm=False, seed=1)
    a = make(case)
    bad = [
        (dict(old=a["old"].double()), "old_logp"),
        (dict(adv=a["adv"][:4]), "advantages"),
        (dict(valid=a["valid"].int()), "valid"),
        (dict(offsets=torch.tensor([0, 3, 2, 5])), "non-decreasing"),
        (dict(offsets=torch.tensor([0, 5, 6])), "end at N"),
        (dict(seq_w=a["seq_w"][:1]), "seq_weight"),
        (dict(targets=torch.tensor([0, 1, 7, 2, 3])), "targets"),
        (dict(params=a["params"][:5]), "params"),
        (dict(temperature=0.0), "temperature"),
    ]
    for change, words in bad:
        with pytest.raises(RuntimeError, match=words):
            run(ext.logits_loss_cpu, {**a, **change})
    with pytest.raises(RuntimeError, match="out"):
        run(ext.logits_loss_cpu, a, out=torch.empty(5, 7, dtype=torch.float64))


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
    bad = logits.clone()
    bad[0, 0, 3] = float("nan")
    m = mask.clone()
    m[0, 0] = True
    targets = targets.clone()
    targets[0, 0] = 1
    for backend in ("reference", "cpp"):
        with pytest.raises(ValueError, match="logits"):
            f(bad, targets, old, adv, m, backend=backend)
        x = bad.clone().requires_grad_()
        with pytest.raises(ValueError, match="logits"):
            f(x * 1.0, targets, old, adv, m, inplace_backward=True, backend=backend)
        nan_old = old.clone()
        nan_old[0, 0] = float("nan")
        with pytest.raises(ValueError, match="old_logp"):
            f(logits, targets, nan_old, adv, m, backend=backend)


def test_opcheck():
    logits, targets, old, adv, mask = _op_batch(3, F64)
    args = _op_args(logits, targets, old.double(), adv.double(), mask)
    for backend in ("reference", "cpp"):
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
