"""The diagnostics' building blocks on cases with known answers: the Monte-Carlo prefix
value, error injection and its token spans, the credit map of a hand-made critic."""

from __future__ import annotations

import math

import pytest
import torch

from vapo_kernels.diagnose.common import step_spans
from vapo_kernels.diagnose.injected_errors import advantages, credit_of_sequence
from vapo_kernels.diagnose.value_probe import top1_credit
from vapo_kernels.train.mc_advantage import prefix_values
from vapo_kernels.train.models import build_char_tokenizer, build_tiny_llama
from vapo_kernels.train.task import RunningSumTask


@pytest.fixture(scope="module")
def uniform_policy():
    """A policy whose next-token distribution is exactly uniform over the vocabulary
    (zero LM head: all logits 0), so the value of a prefix is computable by hand."""
    task = RunningSumTask(min_steps=3, max_steps=3, modulus=10, heldout_size=4, seed=0)
    tokenizer = build_char_tokenizer(task.alphabet)
    policy = build_tiny_llama(tokenizer, hidden_size=16, layers=1, heads=2, max_positions=32,
                              attn_implementation="sdpa")
    with torch.no_grad():
        policy.get_output_embeddings().weight.zero_()
    return task, tokenizer, policy


def test_prefix_value_matches_the_exact_value_of_a_uniform_policy(uniform_policy):
    task, tokenizer, policy = uniform_policy
    problem = task.problem((3, 5, 7))
    answered = task.response_prefix(problem, 3)              # "3>3 5>8 7>5 =5"
    up_to_equals = answered[:-1]                              # "... =": one token decides

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    torch.manual_seed(0)
    samples = 2000
    # The bound leaves room for exactly one token after the prefix.
    values = prefix_values(policy, tokenizer, task, [problem, problem], [ids(up_to_equals)] * 2,
                           samples=samples, max_response_tokens=len(up_to_equals) + 1,
                           temperature=1.0, chunk_size=700)
    # One uniform token over the vocabulary: reward 1 only if it is the answer digit "5"
    # (special tokens decode to nothing, leaving no answer).
    exact = 1 / len(tokenizer)
    sigma = math.sqrt(exact * (1 - exact) / samples)
    for value in values.tolist():
        assert abs(value - exact) < 4 * sigma, (value, exact)
    assert float(values[0]) != float(values[1])  # two prefixes, independent samples
    # After a wrong answer one more token cannot make it right ("4x", or "" after "=").
    wrong = up_to_equals + "4"
    zero = prefix_values(policy, tokenizer, task, [problem], [ids(wrong)], samples=200,
                         max_response_tokens=len(wrong) + 1, temperature=1.0)
    assert float(zero[0]) == 0.0
    with pytest.raises(ValueError, match="no room"):
        prefix_values(policy, tokenizer, task, [problem], [ids(wrong)], samples=1,
                      max_response_tokens=len(wrong), temperature=1.0)


def test_prefix_value_rejects_mismatched_inputs(uniform_policy):
    task, tokenizer, policy = uniform_policy
    with pytest.raises(ValueError, match="samples"):
        prefix_values(policy, tokenizer, task, [task.problem((1,))], [[]], samples=0,
                      max_response_tokens=4, temperature=1.0)
    with pytest.raises(ValueError, match="differ in length"):
        prefix_values(policy, tokenizer, task, [task.problem((1,))], [], samples=1,
                      max_response_tokens=4, temperature=1.0)


def test_injected_error_spans_cover_the_wrong_partial_sum():
    task = RunningSumTask(min_steps=4, max_steps=4, modulus=10, heldout_size=4, seed=0)
    tokenizer = build_char_tokenizer(task.alphabet)
    problem = task.problem((3, 5, 7, 1))
    correct, wrong = task.steps(problem), task.steps(problem, error_at=2)
    spans = step_spans(tokenizer, wrong)
    assert spans == [(0, 4), (4, 8), (8, 12), (12, 16)]
    response = task.response_prefix(problem, 4, error_at=2)
    assert correct[:2] == wrong[:2] and correct[2] != wrong[2]
    start, end = spans[2]
    assert response[start:end] == wrong[2] == "7>6 "          # 3+5+7 = 15 -> 5, off by one
    assert task.score(problem, response) == 0.0
    assert task.score(problem, task.response_prefix(problem, 4)) == 1.0


def _perfect_critic_chain(length: int, error_at: int):
    """A chain of ``length`` 4-token steps + answer + EOS, reward 0, with a perfect critic:
    V = 1 on every state before the wrong partial-sum token, 0 from then on."""
    tokens = 4 * length + 3
    error_token = 4 * error_at + 2
    values = torch.zeros(tokens)
    values[: error_token + 1] = 1.0
    spans = [(4 * j, 4 * j + 4) for j in range(length)]
    cu = torch.tensor([0, tokens], dtype=torch.int32)
    return torch.zeros(tokens), values, cu, spans, error_token


@pytest.mark.parametrize("error_at", [0, 3, 5])
def test_credit_map_of_a_perfect_critic(error_at):
    rewards, values, cu, spans, error_token = _perfect_critic_chain(6, error_at)
    td = credit_of_sequence(advantages(rewards, values, cu, 0.0, 1.0), spans, error_at)
    assert td["at"] == pytest.approx(1.0)                     # TD: all blame on the wrong token
    mc = credit_of_sequence(advantages(rewards, values, cu, 1.0, 1.0), spans, error_at)
    # lambda = 1: A_t = R - V(s_t) = -1 on every token up to the error: blame spread evenly
    # over the correct steps before it, none after.
    assert mc["at"] == pytest.approx(3 / (error_token + 1))
    assert mc["before"] == pytest.approx(4 * error_at / (error_token + 1))
    assert mc["after"] == pytest.approx(0.0)
    mid = credit_of_sequence(advantages(rewards, values, cu, 0.95, 1.0), spans, error_at)
    assert mc["at"] <= mid["at"] <= td["at"]
    assert mid["per_step"][error_at] < 0


def test_credit_of_a_critic_that_predicts_the_reward_is_none():
    rewards, _, cu, spans, _ = _perfect_critic_chain(3, 1)
    adv = advantages(rewards, torch.zeros_like(rewards), cu, 1.0, 1.0)
    assert credit_of_sequence(adv, spans, 1) is None


def test_length_adaptive_lambda_uses_each_sequence_length():
    rewards, values, cu, spans, _ = _perfect_critic_chain(4, 2)
    alpha = 0.05  # alpha * l <= 1 for this short chain: lambda clamps to 0, i.e. TD
    adaptive = advantages(rewards, values, cu, "adaptive", alpha)
    assert torch.allclose(adaptive, advantages(rewards, values, cu, 0.0, alpha))


@pytest.mark.parametrize(
    "v, mc, expected",
    [
        ([0.0, 0.0, 0.0, 0.0], [0.9, 0.1, 0.0, 0.2], 0.25),  # untrained critic: a random pick
        ([0.5, 0.5, 0.1, 0.1], [0.9, 0.1, 0.0, 0.2], 0.5),  # best among two tied at the top
        ([0.1, 0.7, 0.1, 0.1], [0.9, 0.1, 0.0, 0.2], 0.0),  # V prefers a wrong step
        ([0.1, 0.7, 0.1, 0.1], [0.2, 0.8, 0.0, 0.2], 1.0),  # V's unique top is the best step
        ([0.1, 0.7, 0.1, 0.1], [0.8, 0.8, 0.0, 0.2], None),  # no unique best by Monte-Carlo
    ],
)
def test_top1_credit_breaks_ties_at_random(v, mc, expected):
    got = top1_credit(torch.tensor(v), torch.tensor(mc))
    assert got == expected


def test_mass_at_k_averages_over_the_k_with_negative_advantage():
    """One k without negative advantage (NaN) made the row's point estimate NaN ("n/a")
    while its bootstrap averaged over the other k, and the report said "no negative
    advantage at all"; that sentence is for a row without any."""
    from vapo_kernels.diagnose.injected_errors import mc_label, mc_comparison, report

    nan = float("nan")

    def row(at):
        return {"mass_at_k": at, "mass_before_k": [0.0 if a == a else nan for a in at],
                "mass_after_k": [1 - a if a == a else nan for a in at]}

    stage = {"name": "RL step 1", "heldout_accuracy": 0.5, "uniform_share_of_step_k": [0.2] * 3,
             "lambdas": {"lambda 0 (TD)": row([0.5, nan, 0.3]), "lambda 1.0": row([nan] * 3),
                         mc_label(2): row([0.9, 0.6, nan])},
             "bootstrap": {"resamples": 10, "mass_at_k_mean_ci": {},
                           "mc_minus_gae_ci": {"lambda 0 (TD)": [0.1, 0.5]}}}
    results = {"length": 3, "problems": 4, "seed": 0, "mc_samples": 2, "mc_problems": 4,
               "stages": [stage]}
    text = "\n".join(report(results))
    table_row = next(line for line in text.splitlines() if line.startswith("| RL step 1 |"))
    assert table_row.split(" | ")[2:5] == ["40.0% (2/3 k)", "n/a", "75.0% (2/3 k)"]
    assert "lambda 0 (TD): 40.0% of the blame on the wrong step (2.0x an even spread)" in text
    assert "lambda 1.0: no negative advantage at all" in text
    assert "lambda 0 (TD): no negative advantage" not in text
    assert "no Monte-Carlo negative advantage" not in mc_comparison(results)
    assert "Monte-Carlo 75.0% (over 2 of 3 k)" in mc_comparison(results)


def test_short_vs_long_labels_keep_every_setting_apart():
    from vapo_kernels.diagnose.short_vs_long import settings

    labels = settings([1.0, 0.9999999, 0.95], [0.05, 1.0])
    assert list(labels) == ["lambda 1", "lambda 0.9999999", "lambda 0.95",
                            "adaptive alpha 0.05", "adaptive alpha 1"]
