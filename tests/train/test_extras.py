"""The trainer's optional integrations, installed in CI (the test extra): TensorBoard
logging and reasoning-gym tasks."""

from __future__ import annotations

import string

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from vapo_kernels.train.cli import train
from vapo_kernels.train.models import build_char_tokenizer

from .conftest import read_rows, tiny_config


def test_tensorboard_gets_the_same_scalars_as_the_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = train(tiny_config(tmp_path, "--tensorboard", drop=("--no_tensorboard",)))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    rl_rows = [r for r in read_rows(summary["run_dir"]) if r["phase"] == "rl"]
    loss_tags = [t for t in tags if t.startswith("rl/") and t.endswith("loss")]
    assert loss_tags, f"no rl/*loss scalar among {tags}"
    # Each RL loss of the JSONL is a TensorBoard scalar, one point per row that has it, in
    # order, on the run's global step axis (increasing across phases).
    for tag in loss_tags:
        key = tag.split("/", 1)[1]
        points = events.Scalars(tag)
        rows = [r for r in rl_rows if key in r]
        assert len(points) == len(rows) >= 1
        steps = [p.step for p in points]
        assert steps == sorted(set(steps))
        for point, row in zip(points, rows):
            assert abs(point.value - row[key]) <= 1e-6 * max(1.0, abs(row[key]))


def _printable_model_folder(folder):
    """A tiny Llama whose character tokenizer covers printable ASCII (reasoning-gym's
    questions are free text)."""
    tokenizer = build_char_tokenizer(string.printable)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_reasoning_gym_task_trains_through_a_model_folder(tmp_path):
    folder = _printable_model_folder(tmp_path / "model")
    summary = train(tiny_config(
        tmp_path, "--model", str(folder), "--task", "reasoning_gym:basic_arithmetic",
        "--warmup_steps", "0", "--max_new_tokens", "8", "--eval_size", "4",
    ))
    rows = read_rows(summary["run_dir"])
    assert {r["phase"] for r in rows} == {"value_pretrain", "rl"}  # no demonstrations
    rl_rows = [r for r in rows if r["phase"] == "rl" and "reward" in r]
    assert [r["step"] for r in rl_rows] == [1, 2]
    # reasoning-gym's own verifier scored every sample: rewards are real scores in [0, 1].
    for row in rl_rows:
        assert 0.0 <= row["reward"] <= 1.0 and row["verifier_errors"] == 0
