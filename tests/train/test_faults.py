"""Faults and limits: non-finite losses / gradients skip the update (and stop the run after
max_bad_steps in a row, keeping the last good checkpoint), a raising verifier scores 0 and is
counted, micro-batches by a token budget give the same update."""

from __future__ import annotations

import copy
import json
import os
import random

import pytest
import torch

from vapo_kernels.train import checkpoint
from vapo_kernels.train import vapo as vapo_module
from vapo_kernels.train.cli import build_policy, build_task, main, train
from vapo_kernels.train.metrics import PhaseTimer
from vapo_kernels.train.models import value_model_from_policy
from vapo_kernels.train.rollout import score_responses
from vapo_kernels.train.task import RunningSumTask
from vapo_kernels.train.vapo import (
    TrainingStopped,
    TrainState,
    micro_batches,
    old_outputs,
    ppo_update,
    rollout,
    setup_rl,
)
from vapo_kernels.train.distributed import DataParallel

from .conftest import read_rows, tiny_argv, tiny_config

RUN = [*tiny_argv(drop=("--steps",)), "--steps", "3", "--no_save_checkpoint", "--threads", "1"]


def poison_rl_steps(monkeypatch, steps: set[int] | None, snapshots: dict):
    """micro_batch_loss returns a NaN loss on RL ``steps`` (None: every step) and records the
    policy's weights and both schedulers' step counts when each RL step first computes a loss."""
    real = vapo_module.micro_batch_loss

    def poisoned(state, *args, **kwargs):
        if state.phase == "rl" and state.step not in snapshots:
            snapshots[state.step] = (copy.deepcopy(state.policy.state_dict()),
                                     state.actor_scheduler.last_epoch,
                                     state.critic_scheduler.last_epoch)
        loss, metrics = real(state, *args, **kwargs)
        if state.phase == "rl" and (steps is None or state.step in steps):
            loss = loss * float("nan")
        return loss, metrics

    monkeypatch.setattr(vapo_module, "micro_batch_loss", poisoned)


def test_a_nan_loss_skips_that_update_with_a_warning(tmp_path, monkeypatch, capsys):
    snapshots: dict = {}
    poison_rl_steps(monkeypatch, {2}, snapshots)
    summary = train(tiny_config(tmp_path, "--threads", "1", "--steps", "3", "--no_save_checkpoint"))
    out = capsys.readouterr().out
    assert "warning: rl step 2: non-finite loss (nan); update skipped (1 in a row" in out
    rows = {r["step"]: r for r in read_rows(summary["run_dir"]) if r["phase"] == "rl"}
    assert rows[2]["skipped_updates"] == 4 and rows[1]["skipped_updates"] == 0  # 2 epochs x 2
    weights = {step: snap[0] for step, snap in snapshots.items()}
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])  # none moved
    # Optimizer steps (scheduler counts) of both models: 4 in step 1, none in step 2.
    assert [snapshots[s][1:] for s in (1, 2, 3)] == [(0, 0), (4, 4), (4, 4)]


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_non_finite_model_output_skips_the_update_instead_of_raising(
        tmp_path, monkeypatch, capsys, poison):
    # A diverging policy's log-probs reach vk.vapo_loss as NaN / inf inputs; with vk's data
    # checks on, the loss raised (naming logp) and the run died with a traceback instead of
    # taking the guard's path (review): the trainer calls vk with its screens off.
    real = vapo_module.policy_logprobs
    state_of = {}

    def diverging(policy, batch, **kwargs):
        logp, entropy = real(policy, batch, **kwargs)
        if torch.is_grad_enabled() and state_of.get("step") == 2:  # the loss's forward
            logp = logp + poison
        return logp, entropy

    real_loss = vapo_module.micro_batch_loss

    def tracking(state, *args, **kwargs):
        state_of["step"] = state.step if state.phase == "rl" else None
        return real_loss(state, *args, **kwargs)

    monkeypatch.setattr(vapo_module, "policy_logprobs", diverging)
    monkeypatch.setattr(vapo_module, "micro_batch_loss", tracking)
    summary = train(tiny_config(tmp_path, "--threads", "1", "--steps", "3", "--no_save_checkpoint"))
    out = capsys.readouterr().out
    assert "warning: rl step 2: non-finite loss" in out and "update skipped" in out
    rows = {r["step"]: r for r in read_rows(summary["run_dir"]) if r["phase"] == "rl"}
    assert rows[2]["skipped_updates"] == 4 and rows[3]["skipped_updates"] == 0
    assert vapo_module.vk.validation_enabled()  # given back after each call


def test_an_infinite_gradient_is_named(tmp_path, monkeypatch, capsys):
    real = vapo_module.setup_rl

    def setup_with_inf_gradient(state, config, make_value):
        real(state, config, make_value)
        weight = next(state.policy.parameters())
        weight.register_hook(lambda grad: grad * float("inf"))

    monkeypatch.setattr(vapo_module, "setup_rl", setup_with_inf_gradient)
    import vapo_kernels.train.cli as cli_module

    monkeypatch.setattr(cli_module, "setup_rl", setup_with_inf_gradient)
    with pytest.raises(TrainingStopped, match="actor_grad_norm"):
        train(tiny_config(tmp_path, "--threads", "1", "--steps", "3", "--value_pretrain_steps", "0",
                          "--warmup_steps", "0",
                          "--no_save_checkpoint"))
    assert "rl step 1: non-finite actor_grad_norm" in capsys.readouterr().out


def test_k_bad_steps_in_a_row_stop_the_run_keeping_the_last_good_checkpoint(
        tmp_path, monkeypatch, capsys):
    poison_rl_steps(monkeypatch, None, {})
    run_dir = tmp_path / "run"
    code = main([*RUN, "--output_dir", str(run_dir), "--save_every", "1", "--max_bad_steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert err[-1].startswith("vapo-train: stopped at rl step 2: 2 steps in a row had a "
                              "non-finite loss or gradient (last: loss (nan)); last good "
                              "checkpoint: "), err
    assert err[-1].endswith(os.path.join("checkpoints", "2-rl-00000000"))
    names = [os.path.basename(p) for p in checkpoint.complete_checkpoints(run_dir)]
    assert names[-1] == "2-rl-00000000"  # no bad step was saved


class FlakyVerifierTask(RunningSumTask):
    """A verifier that raises on responses of odd length."""

    def score(self, problem, response):
        if len(response) % 2:
            raise ValueError("cannot parse")
        return super().score(problem, response)


def test_a_raising_verifier_scores_zero_and_is_counted():
    task = FlakyVerifierTask(min_steps=2, max_steps=2, heldout_size=1)
    problem = task.sample(random.Random(0), 1)[0]
    right = task.response_prefix(problem, problem.steps)
    responses = [right, right + "x", "xx", "x"]
    with pytest.warns(RuntimeWarning, match="raised ValueError: cannot parse"):
        scores, errors = score_responses(task, [problem] * 4, responses)
    assert errors == sum(len(r) % 2 for r in responses)
    want = [0.0 if len(r) % 2 else task.score(problem, r) for r in responses]
    assert scores.tolist() == want


def test_verifier_errors_reach_the_metrics(tmp_path, monkeypatch):
    import vapo_kernels.train.cli as cli_module

    monkeypatch.setattr(cli_module, "RunningSumTask", FlakyVerifierTask)
    summary = train(tiny_config(tmp_path, "--threads", "1", "--warmup_steps", "0",
                                "--value_pretrain_steps", "0",
                                "--no_save_checkpoint"))
    rl_rows = [r for r in read_rows(summary["run_dir"]) if r["phase"] == "rl" and r["step"] > 0]
    assert all("verifier_errors" in r for r in rl_rows)
    assert sum(r["verifier_errors"] for r in rl_rows) > 0


# -- micro-batches by a token budget -----------------------------------------------------------
def _prepared(tmp_path, *extra):
    config = tiny_config(tmp_path, "--threads", "1", "--mini_batches", "1", "--ppo_epochs", "1",
                         *extra)
    torch.manual_seed(0)
    task = build_task(config)
    policy, tokenizer = build_policy(config, task)
    state = TrainState(policy=policy, tokenizer=tokenizer, task_rng=random.Random(0))
    setup_rl(state, config, value_model_from_policy)
    batch = rollout(state, task, config)
    batch.scores[:2] = 1.0
    old, _ = old_outputs(state, batch, config, PhaseTimer())
    return config, state, batch, old


def test_token_budget_plan_covers_each_sequence_once_within_budget(tmp_path):
    config, state, batch, _ = _prepared(tmp_path, "--max_tokens_per_microbatch", "40")
    plan = micro_batches(batch, config, DataParallel())
    widths = (batch.prompt_lengths + batch.response_lengths).tolist()
    assert sorted(torch.cat(plan).tolist()) == list(range(batch.size))
    for group in plan:
        cost = len(group) * max(widths[i] for i in group.tolist())
        assert cost <= 40 or len(group) == 1
    assert len(plan) > 1


def test_token_budget_micro_batches_give_the_same_update(tmp_path):
    """Gradient accumulation with global counts: however the mini-batch is cut, the same step."""
    results = []
    for extra in ((), ("--max_tokens_per_microbatch", "40")):
        config, state, batch, old = _prepared(tmp_path / str(len(extra)), *extra)
        row, _ = ppo_update(state, batch, old, config, PhaseTimer())
        results.append((row, {k: v.clone() for k, v in state.policy.state_dict().items()}))
    (row_a, params_a), (row_b, params_b) = results
    for key in params_a:
        torch.testing.assert_close(params_a[key], params_b[key], rtol=1e-5, atol=1e-6)
    for key in ("pg_loss", "vf_loss", "lm_loss"):
        assert row_a[key] == pytest.approx(row_b[key], rel=1e-5, abs=1e-7)


# -- peak memory and profiling ----------------------------------------------------------------
def test_peak_memory_per_step_and_a_profile_of_chosen_steps(tmp_path, capsys):
    summary = train(tiny_config(tmp_path, "--threads", "1", "--warmup_steps", "0",
                                "--value_pretrain_steps", "0", "--steps", "2", "--profile", "2",
                                "--no_save_checkpoint"))
    rows = [r for r in read_rows(summary["run_dir"]) if r["phase"] == "rl" and r["step"] > 0]
    assert all(r["peak_rss_mb"] > 10 for r in rows)
    profile = summary["profile"]
    with open(profile["trace"]) as f:
        trace = json.load(f)
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"vapo_train.rl_step", "vapo_kernels.vapo_loss", "vapo_kernels.decoupled_gae",
            "vapo_kernels.token_logprobs"} <= names
    assert 0 < profile["ours"] < 1 and 0 < profile["generation"] < 1 and 0 < profile["model"] < 1
    assert profile["ours"] + profile["generation"] + profile["model"] + profile["optimizer"] <= 1
    assert "vapo_kernels ops" in capsys.readouterr().out
