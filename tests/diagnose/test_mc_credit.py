"""Monte-Carlo credit beside GAE: the injected-errors Monte-Carlo row with scripted,
deterministic policies whose continuations are known, so the credit is known exactly."""

from __future__ import annotations

import pytest
import torch

from vapo_kernels.diagnose.common import start_run, trainer_config
from vapo_kernels.diagnose.injected_errors import mc_label, measure_stage
from vapo_kernels.train.task import DIGITS


class ScriptedPolicy(torch.nn.Module):
    """A deterministic running-sum "policy" with ``generate``: it finishes the chain of a
    prompt + partial response. ``carry``: each new step adds to the last written partial
    sum (an earlier error is carried to a wrong answer); otherwise it writes the true
    partial sums whatever the prefix says (it recovers from any error)."""

    def __init__(self, tokenizer, modulus: int, carry: bool):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device for rollout.generate
        self.tokenizer, self.modulus, self.carry = tokenizer, modulus, carry

    def finish(self, text: str) -> str:
        prompt, written = text.split(":", 1)
        digits = [DIGITS.index(c) for c in prompt if c != "_"]
        steps = written.split()
        partial = sum(digits[: len(steps)]) % self.modulus
        if self.carry and steps:
            partial = DIGITS.index(steps[-1][-1])
        out = ""
        for d in digits[len(steps):]:
            partial = (partial + d) % self.modulus
            out += f"{DIGITS[d]}>{DIGITS[partial]} "
        return out + "=" + DIGITS[partial]

    generation_config = None  # rollout.generate swaps in a blank one while sampling

    def generate(self, input_ids, attention_mask, generation_config, **_):
        max_new_tokens = generation_config.max_new_tokens
        pad_token_id, eos_token_id = generation_config.pad_token_id, generation_config.eos_token_id
        tok = self.tokenizer
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            text = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True)
            new = tok(self.finish(text), add_special_tokens=False).input_ids + [eos_token_id]
            rows.append(ids + new[:max_new_tokens])
        width = max(map(len, rows))
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny warmed-up run (chains of 3 steps) shared by the tests of this module."""
    threads = torch.get_num_threads()
    config = trainer_config("tiny", 0, str(tmp_path_factory.mktemp("run")),
                            ["--min_steps", "3", "--max_steps", "3"], progress=False)
    run = start_run(config)
    run.log.close()
    torch.set_num_threads(threads)
    return run


def _mc_row(run, carry: bool) -> dict:
    run.state.policy = ScriptedPolicy(run.state.tokenizer, run.task.modulus, carry)
    stage = measure_stage(run, 3, 4, 0, False, mc_samples=2, mc_problems=3)
    return stage["lambdas"][mc_label(2)]


def test_scripted_policy_finishes_chains(tiny_run):
    task = tiny_run.task
    problem = task.problem((3, 5, 7))
    carry = ScriptedPolicy(tiny_run.state.tokenizer, task.modulus, carry=True)
    recover = ScriptedPolicy(tiny_run.state.tokenizer, task.modulus, carry=False)
    wrong_prefix = task.response_prefix(problem, 2, error_at=1)        # "3>3 5>9 "
    assert problem.prompt + carry.finish(problem.prompt) == problem.prompt + task.response_prefix(problem, 3)
    assert task.score(problem, wrong_prefix + carry.finish(problem.prompt + wrong_prefix)) == 0.0
    assert task.score(problem, wrong_prefix + recover.finish(problem.prompt + wrong_prefix)) == 1.0


def test_mc_puts_all_blame_on_the_error_when_the_policy_cannot_recover(tiny_run):
    row = _mc_row(tiny_run, carry=True)
    # V = 1 on every correct prefix, 0 from the wrong step on: only step k has A = -1.
    assert row["mass_at_k"] == [1.0, 1.0, 1.0]
    assert row["mass_before_k"] == row["mass_after_k"] == [0.0, 0.0, 0.0]
    assert row["credit_map"] == [[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]]


def test_mc_blames_the_answer_when_the_policy_always_recovers(tiny_run):
    row = _mc_row(tiny_run, carry=False)
    # Every prefix is worth 1 under a policy that recovers; the written wrong answer (the
    # last segment, after every step) takes all the blame.
    assert row["mass_at_k"] == [0.0, 0.0, 0.0]
    assert row["mass_after_k"] == [1.0, 1.0, 1.0]
    assert all(v == 0.0 for r in row["credit_map"] for v in r)


def test_short_vs_long_scores_every_setting_on_the_step_advantage(tiny_run):
    """A policy that always writes the right chain: every prefix is worth 1, so every true
    step advantage is 0; Monte-Carlo estimates it exactly. GAE on the untrained critic
    (V = 0) with lambda 1 estimates a step's advantage as its lambda-return minus V before
    it, R - 0 = 1 per step (the same quantity as Monte-Carlo's, not the sum of the step's
    per-token advantages, which was the token count 4); the reference critic (the truth's
    own values, 1 everywhere) scores 0."""
    from vapo_kernels.diagnose.short_vs_long import advantage_errors, settings

    run = tiny_run
    run.state.policy = ScriptedPolicy(run.state.tokenizer, run.task.modulus, carry=True)
    problems = [run.task.problem((3, 5, 7)), run.task.problem((9, 9, 1))]
    options = settings([1.0], [], mc_samples=2)
    assert list(options) == ["lambda 1", "Monte-Carlo K=2"]
    errors = advantage_errors(run, problems, 2, options)
    assert errors["position"] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert errors["truth"] == [0.0] * 8
    assert errors["errors"]["Monte-Carlo K=2"] == [0.0] * 8
    assert errors["errors"]["lambda 1"] == pytest.approx([1.0] * 8, abs=1e-6)
    assert errors["errors"]["lambda 1 [reference critic]"] == pytest.approx([0.0] * 8, abs=1e-6)
