"""The log-prob and loss suites' checks refuse wrong answers (so they are never timed), and
each suite builds a case whose rows all pass on a tiny shape with the reference backend."""

from __future__ import annotations

import torch

import vapo_kernels as vk
from vapo_kernels.bench import harness as H
from vapo_kernels.bench.suites import logprobs, loss

CPU = torch.device("cpu")


def ctx(**backends) -> H.Context:
    return H.Context(CPU, backends, sets=1, compile_why="not in this test")


def test_token_loss_check_refuses_wrong_gradients_and_losses():
    x = loss.make_token_inputs(3, 64, CPU, seed=5)
    for task in ("policy", "policy+value"):
        check = loss.token_check(x, task)
        impl = loss.token_impls(task, ctx(loss=["reference"]))[0]
        value, grads = impl.run(x)
        assert check(impl, (value, grads)).ok
        assert not check(impl, (value * 1.001, grads)).ok
        bad = (grads[0] * (1 + 1e-3),) + tuple(grads[1:])
        assert not check(impl, (value, bad)).ok
        assert not check(impl, (value, grads[:1] if len(grads) > 1 else ())).ok


def test_logit_loss_check_refuses_a_wrong_gradient():
    x = loss.make_logit_inputs(64, 256, None, CPU, seed=1)
    check = loss.LogitCheck(x, CPU)
    impl = loss.logit_impls("logits", ctx(loss=["reference"]))[0]
    value, grads = impl.run(x)
    assert check(impl, (value, grads)).ok
    assert not check(impl, (value, (grads[0].flip(-1),))).ok


def test_logprobs_check_refuses_shifted_targets_and_a_missing_gradient():
    case = logprobs.build_case((64, 300), ctx(logprobs=["reference"]))
    impl = next(i for i in case.impls if i.name == "vapo.token_logprobs[reference]"
                and i.task == "logp fwd+bwd")
    outs, grads = impl.run(case.sets[0])
    assert case.check(impl, (outs, grads)).ok
    assert not case.check(impl, ([outs[0].roll(1)], grads)).ok
    assert not case.check(impl, (outs, (grads[0] * 1.1,))).ok


def test_tiny_cases_pass_every_check():
    """Every row of ours and of the peers installed here is right at a tiny shape."""
    timing = H.Timing(reps=1, budget_s=0.01, warmup=0, remeasure=0, per_call_reps=1,
                      per_call_warmup=0)
    for suite, shape, backends in (
        (loss.SUITE, ("tokens", 2, 64), {"loss": ["reference"], "logprobs": ["reference"]}),
        (loss.SUITE, ("hidden", 32, 128, 8), {"loss": ["reference"], "logprobs": ["reference"]}),
        (logprobs.SUITE, (32, 128, 8), {"logprobs": ["reference"]}),
    ):
        c = H.Context(CPU, backends, sets=1, compile_why="not in this test")
        suite.load_peers(c)
        rows = H.run_case(suite.build_case(shape, c), CPU, timing)
        assert rows
        for r in rows:
            assert r.status in ("ok", "skipped"), (r.impl, r.task, r.status, r.note)
            assert r.status == "ok" or r.note


def test_in_place_rows_run_and_pass_their_checks():
    """The rows whose backward overwrites the logits get a private non-leaf copy (our ops
    refuse to overwrite a caller's leaf). The tiny cases above use the reference backend at
    token / hidden / linear shapes, which have no such row: here every backend of ours at
    the logits shapes, in-place rows only."""
    timing = H.Timing(reps=2, budget_s=10, warmup=1, remeasure=0)
    backends = {f: [b for b in vk.available_backends(f, CPU) if b != "triton"]  # slow here
                for f in ("loss", "logprobs")}
    for suite, shape in ((loss.SUITE, ("logits", 16, 64)), (logprobs.SUITE, (16, 64))):
        c = H.Context(CPU, backends, sets=2, compile_why="not in this test")
        case = suite.build_case(shape, c)
        case.impls = [i for i in case.impls if i.prepare is not None and i.kind == "ours"]
        assert len(case.impls) >= 2, f"no in-place row of ours in {suite.name} {shape}"
        for r in H.run_case(case, CPU, timing):
            assert r.status == "ok" and r.check.ok and r.stats.reps == 2, (r.impl, r.task, r.note)


def test_logit_loss_check_takes_a_zero_gradient_when_the_true_one_is_zero():
    """V = 1: every log-prob is 0 and so is the logits' gradient; 0 error, not 0 / 0."""
    x = loss.make_logit_inputs(4, 1, None, CPU, seed=1)
    check = loss.LogitCheck(x, CPU)
    impl = loss.logit_impls("logits", ctx(loss=["reference"]))[0]
    value, grads = impl.run(x)
    assert not grads[0].any()
    assert check(impl, (value, grads)).ok
    assert not check(impl, (value, (grads[0] + 1e-3,))).ok


def _zero_biggest_row(g: torch.Tensor) -> torch.Tensor:
    """The gradient with its largest row (last dim) set to zero: one dropped row."""
    flat = g.detach().clone().reshape(-1, g.shape[-1])
    flat[flat.float().norm(dim=-1).argmax()] = 0
    return flat.reshape(g.shape)


def test_one_dropped_row_fails_the_loss_checks_at_thousands_of_rows():
    """The whole gradient's relative L2 norm moves by ~1/sqrt(N) when one row is lost; the
    per-row check fails it at any N (logits rows, hidden rows and the weight's vocab rows)."""
    x = loss.make_logit_inputs(4096, 64, None, CPU, seed=2)
    check = loss.LogitCheck(x, CPU)
    impl = loss.logit_impls("logits", ctx(loss=["reference"]))[0]
    value, grads = impl.run(x)
    assert check(impl, (value, grads)).ok
    bad = check(impl, (value, (_zero_biggest_row(grads[0]),)))
    assert not bad.ok and "worst row 1" in bad.detail, bad.detail

    x = loss.make_logit_inputs(4096, 64, 8, CPU, seed=2)
    check = loss.LogitCheck(x, CPU)
    impl = loss.logit_impls("hidden", ctx(loss=["reference"]))[0]
    value, (gh, gw) = impl.run(x)
    assert check(impl, (value, (gh, gw))).ok
    for grads in ((_zero_biggest_row(gh), gw), (gh, _zero_biggest_row(gw))):
        bad = check(impl, (value, grads))
        assert not bad.ok and "worst row 1" in bad.detail, bad.detail


def test_one_dropped_row_fails_the_logprobs_checks_at_thousands_of_rows():
    """Every row of the timed call is checked (it was 32 rows, and the fused rows' weight
    gradient came from a second call on those rows)."""
    for shape in ((4096, 64), (4096, 64, 8)):
        case = logprobs.build_case(shape, ctx(logprobs=["reference"]))
        task = "linear fwd+bwd" if len(shape) == 3 else "logp fwd+bwd"
        impl = next(i for i in case.impls if i.kind == "ours" and i.task == task)
        outs, grads = impl.run(case.sets[0])
        assert case.check(impl, (outs, grads)).ok
        for k in range(len(grads)):
            bad = list(grads)
            bad[k] = _zero_biggest_row(grads[k])
            res = case.check(impl, (outs, tuple(bad)))
            assert not res.ok and "worst row 1" in res.detail, (shape, k, res.detail)
        wrong = outs[0].clone()
        wrong[1234] -= 1.0
        assert not case.check(impl, ([wrong], grads)).ok  # a value off in one row of 4096


def test_fused_lm_head_tasks_have_an_fp32_matmul_peer():
    """Ours upcasts the bf16 weight to fp32; torch's bf16 matmul on a CPU without bf16
    units is several times slower than its fp32 one, so each fused task has a peer that
    upcasts too, checked like every other peer."""
    c = ctx(loss=["reference"], logprobs=["reference"])
    loss.SUITE.load_peers(c)
    names = {i.name for i in loss.logit_impls("hidden", c) if i.kind == "peer"}
    assert "matmul (fp32) + torch log_softmax.gather + verl" in names
    case = logprobs.build_case((32, 128, 8), c)
    for task in ("linear", "linear+ent"):
        for mode in logprobs.MODES:
            assert any(i.name == "torch eager (fp32 matmul)" and i.task == f"{task} {mode}"
                       for i in case.impls)
