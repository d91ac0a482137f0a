"""Refusals at startup, before anything is built: one line each (ConfigError), never a
hang, a traceback or a late error after the warm-up."""

from __future__ import annotations

import pytest
import torch

from vapo_kernels.train.cli import _train
from vapo_kernels.train.config import ConfigError
from vapo_kernels.train.distributed import DataParallel

from .conftest import tiny_config


def two_processes() -> DataParallel:
    """Rank 0 of 2 with no real process group: the checks run before any collective."""
    return DataParallel(rank=0, world_size=2, group=object())


def test_mc_advantage_is_refused_with_several_processes(tmp_path):
    # Each process ran a different number of per-length generate loops: FSDP deadlocked.
    with pytest.raises(ConfigError, match="--advantage: mc not supported with several"):
        _train(tiny_config(tmp_path, "--advantage", "mc"), two_processes())
    assert not (tmp_path / "run").exists()


def _jsonl(path, rows: int, response: bool) -> str:
    import json

    with open(path, "w") as f:
        for i in range(rows):
            row = {"prompt": f"{i}+1=", "answer": str(i + 1)}
            if response:
                row["response"] = str(i + 1)
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_a_task_without_demonstrations_refuses_a_warm_up(tmp_path, capsys):
    # The warm-up drew rows until it had a batch of demonstrations: forever, with none.
    from vapo_kernels.train.cli import main

    from .conftest import tiny_argv

    task = _jsonl(tmp_path / "t.jsonl", 40, response=False)
    argv = [*tiny_argv(), "--task", f"jsonl:{task}", "--output_dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vapo-train: error: --warmup-steps: task jsonl:{task} has no demonstrations "
                   "to warm up on (no row of its training split has a 'response'): pass "
                   "--warmup_steps 0"], err
    assert not (tmp_path / "run").exists()
    assert main([*argv, "--warmup_steps", "0", "--supervised_baseline"]) == 2
    assert "--supervised-baseline: task" in capsys.readouterr().err


def test_prompts_that_do_not_split_over_the_processes_are_refused_at_startup(tmp_path):
    # Refused only when the first rollout sharded them: after the whole warm-up.
    with pytest.raises(ConfigError, match="--prompts-per-step: 3 prompts do not split evenly "
                                          "over 2 processes"):
        _train(tiny_config(tmp_path, "--prompts_per_step", "3", "--group_size", "2",
                           "--mini_batches", "1"), two_processes())
    assert not (tmp_path / "run").exists()


def test_a_share_that_does_not_split_into_the_mini_batches_is_refused(tmp_path):
    # 12 sequences over 2 processes: each cut its 6 into torch.chunk's 3 pieces, not the 4
    # mini-batches asked for (fewer optimizer steps, silently; value pretraining too).
    config = tiny_config(tmp_path, "--prompts_per_step", "6", "--group_size", "2",
                         "--mini_batches", "4")  # fine on one process: 4 x 3 sequences
    with pytest.raises(ConfigError, match="--mini-batches: each of the 2 processes trains on "
                                          "6 of the 12 sequences of a step, which do not "
                                          "divide into 4 mini-batches"):
        _train(config, two_processes())
    assert not (tmp_path / "run").exists()


def test_micro_batches_keep_their_bound_on_a_share_it_does_not_divide(tmp_path):
    # A process's 6-sequence share with --micro_batch_size 4 went through whole (6 // 4 = 1
    # piece): above the documented memory bound. The old log-prob forwards of a whole
    # share (mini-batches x a share smaller than the bound) did the same.
    import random

    from vapo_kernels.train.cli import build_policy, build_task
    from vapo_kernels.train.rollout import demonstration_batch
    from vapo_kernels.train.vapo import micro_batches

    config = tiny_config(tmp_path, "--micro_batch_size", "4")
    task = build_task(config)
    _, tokenizer = build_policy(config, task)
    for size, pieces in ((6, [3, 3]), (8, [4, 4]), (3, [3]), (9, [3, 3, 3])):
        batch = demonstration_batch(tokenizer, task, random.Random(0), size)
        plan = micro_batches(batch, config, DataParallel())
        assert sorted(torch.cat(plan).tolist()) == list(range(size))
        assert [len(p) for p in plan] == pieces, size


def test_a_warm_up_batch_that_does_not_split_over_the_processes_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--warmup-batch-size: 15 demonstrations do not "
                                          "split evenly over 2 processes"):
        _train(tiny_config(tmp_path, "--warmup_batch_size", "15"), two_processes())


class _TwoProcessesAlone(DataParallel):
    """Rank 0 of 2 whose collectives see only itself: enough to run one warm-up step."""

    @property
    def distributed(self) -> bool:
        return True

    def all_reduce(self, values, op="sum"):
        return [float(v) for v in values]

    def barrier(self) -> None:
        pass

    def reduce_row(self, row, weights=None, combined=()):
        return row

    def from_main(self, value):
        return value


def test_the_warm_up_batch_is_global_and_split_over_the_processes(tmp_path, monkeypatch):
    # Each process drew warmup_batch_size x world size demonstrations and kept its share:
    # the global warm-up batch grew with the process count.
    import random

    from vapo_kernels.train import vapo
    from vapo_kernels.train.cli import build_policy, build_task
    from vapo_kernels.train.metrics import MetricsLogger

    config = tiny_config(tmp_path, "--warmup_batch_size", "16", "--eval_size", "4")
    task = build_task(config)
    policy, tokenizer = build_policy(config, task)
    drawn, trained = [], []
    draw, loss = vapo.demonstration_batch, vapo.supervised_loss
    monkeypatch.setattr(vapo, "demonstration_batch",
                        lambda *a: drawn.append(a[-1]) or draw(*a))
    monkeypatch.setattr(vapo, "supervised_loss",
                        lambda policy, batch, *a: trained.append(batch.size) or loss(policy, batch, *a))
    state = vapo.TrainState(policy=policy, tokenizer=tokenizer, task_rng=random.Random(0),
                            dp=_TwoProcessesAlone(rank=0, world_size=2))
    log = MetricsLogger(str(tmp_path), progress=False, tensorboard=False)
    vapo.supervised(state, task, config, log, phase="warmup", max_steps=1, stop_accuracy=None)
    log.close()
    assert drawn == [16] and trained == [8]


@pytest.mark.parametrize("rows, option, says", [
    ('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n', "task",
     "t.jsonl:2: each row needs 'prompt' and 'answer'"),
    ('{"prompt": "a", "answer": "1"}\n{"prompt": "b", \n', "task",
     "t.jsonl:2: not a JSON object"),
    ('[1, 2]\n', "task", "t.jsonl:1: each row needs 'prompt' and 'answer'"),
    ('{"prompt": "a", "answer": "1"}\n' * 3, "eval-size",
     "t.jsonl has 3 rows, not more than eval_size=16"),
])
def test_a_bad_jsonl_task_is_one_error_line(tmp_path, capsys, rows, option, says):
    from vapo_kernels.train.cli import main

    from .conftest import tiny_argv

    (tmp_path / "t.jsonl").write_text(rows)
    assert main([*tiny_argv(), "--task", f"jsonl:{tmp_path / 't.jsonl'}",
                 "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"vapo-train: error: --{option}: ") \
        and says in err[0], err


def test_a_prompt_and_response_past_the_model_s_positions_is_refused_at_startup(tmp_path,
                                                                                capsys):
    # GPT-2's position table ended in an IndexError in the middle of the run.
    from vapo_kernels.train.cli import build_task, main

    from .conftest import tiny_argv
    from .test_eval_mode import gpt2_with_dropout

    folder = gpt2_with_dropout(tmp_path / "gpt2", build_task(tiny_config(tmp_path)).alphabet)
    argv = [*tiny_argv(), "--model", folder, "--output_dir", str(tmp_path / "run")]
    assert main([*argv, "--max_new_tokens", "61"]) == 2  # prompt: 3 digit slots + ":"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vapo-train: error: --max-new-tokens: the longest prompt of running_sum "
                   f"(4 tokens) + 61 new tokens = 65 exceed the 64 positions of {folder}: "
                   "lower --max_new_tokens (or shorten the prompts)"], err
    assert not (tmp_path / "run").exists()
