"""``--advantage mc``: VinePPO's Monte-Carlo step advantages, on a hand-checked batch and in
a tiny run."""

from __future__ import annotations

import pytest
import torch

from vapo_kernels.train.cli import train
from vapo_kernels.train.mc_advantage import mc_advantages, step_boundaries
from vapo_kernels.train.models import build_char_tokenizer, build_tiny_llama
from vapo_kernels.train.rollout import build_batch
from vapo_kernels.train.task import RunningSumTask

from .conftest import read_rows, tiny_config


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread (as ``--threads 1``): on models this small a second thread costs
    2-3x the CPU time on a loaded 2-core machine; restored for the tests after these."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_step_boundaries_split_steps():
    assert step_boundaries("3>3 5>8 =8") == [0, 4, 8]
    assert step_boundaries("a\nb c\n") == [0, 2]


def test_mc_advantages_are_value_differences_per_step():
    task = RunningSumTask(min_steps=3, max_steps=3, modulus=10, heldout_size=4, seed=0)
    tokenizer = build_char_tokenizer(task.alphabet)
    torch.manual_seed(0)
    policy = build_tiny_llama(tokenizer, hidden_size=16, layers=1, heads=2, max_positions=32,
                              attn_implementation="sdpa")
    problems = [task.problem((3, 5, 7)), task.problem((1, 1, 1))]
    texts = [task.response_prefix(problems[0], 3), task.response_prefix(problems[1], 3, error_at=1)]
    ids = [tokenizer(t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for t in texts]
    batch = build_batch(tokenizer, problems, ids, task)
    adv, values = mc_advantages(policy, tokenizer, task, batch, samples=8,
                                max_response_tokens=task.max_response_tokens, temperature=1.0)
    assert adv.shape == values.shape == (batch.num_tokens,)
    for i in range(2):
        lo = int(batch.cu_seqlens[i])
        a, v = adv[lo: int(batch.cu_seqlens[i + 1])], values[lo: int(batch.cu_seqlens[i + 1])]
        # steps of 4 tokens, then "=x" + EOS: constant within a step
        for start, end in ((0, 4), (4, 8), (8, 12), (12, 15)):
            assert torch.all(a[start:end] == a[start]) and torch.all(v[start:end] == v[start])
        # consecutive steps chain: A_j = V_{j+1} - V_j, the last step ends at the score
        steps = [0, 4, 8, 12]
        for j in range(3):
            assert float(a[steps[j]]) == pytest.approx(float(v[steps[j + 1]] - v[steps[j]]))
        assert float(a[12]) == pytest.approx(float(batch.scores[i]) - float(v[12]))
        # telescoping: the step advantages add up to score - V(prompt)
        assert sum(float(a[s]) for s in steps) == pytest.approx(float(batch.scores[i]) - float(v[0]))
    assert batch.scores.tolist() == [1.0, 0.0]


def test_tiny_run_with_mc_advantages(tmp_path):
    summary = train(tiny_config(tmp_path, "--advantage", "mc", "--mc_samples", "2",
                                "--no_save_checkpoint", "--threads", "1"))
    rl_rows = [r for r in read_rows(summary["run_dir"]) if r["phase"] == "rl" and r["step"] > 0]
    assert rl_rows and all("time_mc_advantage_s" in r for r in rl_rows)
    with pytest.raises(Exception, match="mc.samples"):
        tiny_config(tmp_path, "--mc_samples", "0")
