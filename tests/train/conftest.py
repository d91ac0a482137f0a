"""Shared helpers of the trainer tests: tiny configs, tiny model folders, metric rows."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vapo_kernels.train.config import parse_config

# A run of a few seconds: 1-layer models, chains of 2-3 steps, 4 prompts x 2 samples.
TINY = [
    "--tiny_hidden_size", "32", "--tiny_layers", "1", "--tiny_heads", "2",
    "--min_steps", "2", "--max_steps", "3", "--eval_size", "16",
    "--warmup_steps", "4", "--warmup_eval_every", "2", "--warmup_batch_size", "16",
    "--prompts_per_step", "4", "--group_size", "2", "--value_pretrain_steps", "1",
    "--steps", "2", "--eval_every", "1", "--no_progress", "--no_tensorboard", "--no_plots",
    "--save_every", "0",  # checkpoint tests turn it on
]


def tiny_argv(drop: tuple[str, ...] = ()) -> list[str]:
    """TINY without the options in ``drop`` (and their values)."""
    out, skip = [], False
    for i, arg in enumerate(TINY):
        if skip:
            skip = False
            continue
        if arg in drop:
            skip = i + 1 < len(TINY) and not TINY[i + 1].startswith("--")
            continue
        out.append(arg)
    return out


def tiny_config(tmp_path, *extra: str, drop: tuple[str, ...] = ()):
    return parse_config([*tiny_argv(drop), "--output_dir", str(tmp_path / "run"), *extra])


def tiny_policy(tmp_path, *extra: str):
    """(config, task, policy, tokenizer) of a tiny config, the policy built with seed 0."""
    import torch

    from vapo_kernels.train.cli import build_policy, build_task

    config = tiny_config(tmp_path, *extra)
    torch.manual_seed(0)
    task = build_task(config)
    policy, tokenizer = build_policy(config, task)
    return config, task, policy, tokenizer


def read_rows(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(autouse=True)
def _keep_threads():
    """Runs here set torch's thread count (--threads 1): give later tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet_hf():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
