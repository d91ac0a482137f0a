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


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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
