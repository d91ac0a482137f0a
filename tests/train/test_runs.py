"""Whole runs of a few steps: outputs, phases, checkpoints, determinism, --model folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

from vapo_kernels.train.cli import train
from vapo_kernels.train.models import build_char_tokenizer
from vapo_kernels.train.task import RunningSumTask

from .conftest import read_rows, tiny_argv, tiny_config

TIMING = ("elapsed_s", "since_warmup_s", "peak_rss_mb", "peak_cuda_memory_mb")


def _without_timings(rows):
    return [{k: v for k, v in r.items() if k not in TIMING and not k.startswith("time_")}
            for r in rows]


def test_console_run_writes_every_output(tmp_path):
    """The command as a user runs it: progress, messages, JSONL, plots, checkpoint."""
    run_dir = tmp_path / "run"
    argv = tiny_argv(drop=("--no_progress", "--no_plots"))
    proc = subprocess.run(
        [sys.executable, "-m", "vapo_kernels.train", *argv, "--output_dir", str(run_dir)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    for said in ("run folder:", "C++ kernels", "supervised warm-up", "value pretraining",
                 "RL steps", "held-out accuracy", f"outputs in {run_dir}", "rl: 100%"):
        assert said in out, said
    for name in ("metrics.jsonl", "summary.json", "config.yaml", "curves.png"):
        assert (run_dir / name).is_file(), name
    rows = read_rows(run_dir)
    assert {r["phase"] for r in rows} == {"warmup", "value_pretrain", "rl"}
    assert all(isinstance(r["step"], int) for r in rows)
    first_rl = next(r for r in rows if r["phase"] == "rl")
    assert first_rl["step"] == 0 and "heldout_accuracy" in first_rl  # before any RL update
    last = rows[-1]
    for key in ("reward", "heldout_accuracy", "response_length", "entropy", "clipfrac_low",
                "clipfrac_high", "approx_kl", "ratio_max", "vf_clipfrac", "vf_loss",
                "lam_policy_min", "lam_policy_max", "time_rollout_s", "time_old_logprobs_s",
                "time_gae_s", "time_loss_forward_s", "time_loss_backward_s", "time_optimizer_s"):
        assert key in last, key
    for sub in ("policy", "value"):
        folder = run_dir / "checkpoint" / sub
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.pad_token is not None
    AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint" / "policy")
    AutoModelForTokenClassification.from_pretrained(run_dir / "checkpoint" / "value")


def test_same_seed_same_numbers(tmp_path):
    first = train(tiny_config(tmp_path / "a", "--no_save_checkpoint"))
    second = train(tiny_config(tmp_path / "b", "--no_save_checkpoint"))
    assert _without_timings(read_rows(first["run_dir"])) == _without_timings(
        read_rows(second["run_dir"]))
    other = train(tiny_config(tmp_path / "c", "--no_save_checkpoint", "--seed", "1"))
    assert _without_timings(read_rows(other["run_dir"])) != _without_timings(
        read_rows(first["run_dir"]))


def test_ablation_runs_skip_value_pretraining(tmp_path):
    summary = train(tiny_config(tmp_path, "--ablation", "vanilla_ppo", "--no_save_checkpoint",
                                drop=("--value_pretrain_steps", "--group_size")))
    phases = {r["phase"] for r in read_rows(summary["run_dir"])}
    assert phases == {"warmup", "rl"}


def test_supervised_baseline_runs_for_the_rl_wall_time(tmp_path):
    summary = train(tiny_config(tmp_path, "--supervised_baseline", "--no_save_checkpoint"))
    rows = read_rows(summary["run_dir"])
    baseline = [r for r in rows if r["phase"] == "supervised"]
    assert baseline and "baseline_accuracy" in summary
    assert baseline[-1]["since_warmup_s"] >= summary["value_pretrain_and_rl_s"] * 0.9


def _save_family(folder, family: str):
    """A tiny Llama or Qwen2 with the task's character tokenizer, via save_pretrained."""
    from transformers import LlamaConfig, Qwen2Config

    tokenizer = build_char_tokenizer(RunningSumTask(heldout_size=1).alphabet)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    config = (LlamaConfig if family == "llama" else Qwen2Config)(**common)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_trains_a_local_model_folder(tmp_path, family):
    folder = _save_family(tmp_path / family, family)
    summary = train(tiny_config(tmp_path, "--model", str(folder), "--warmup_steps", "0",
                                "--logprobs_from", "hidden"))
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(summary["checkpoint"], "policy"))
    assert policy.config.model_type == family
    value = AutoModelForTokenClassification.from_pretrained(
        os.path.join(summary["checkpoint"], "value"))
    assert value.config.model_type == family and value.config.num_labels == 1
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        assert json.load(f)["final_accuracy"] >= 0.0


def test_a_model_folder_s_tokenizer_is_loaded_once(tmp_path, monkeypatch):
    # The startup check of the prompt lengths loaded it, then the policy's build again.
    folder = str(_save_family(tmp_path / "llama", "llama"))
    loads, load = [], AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        lambda *args, **kwargs: loads.append(args[0]) or load(*args, **kwargs))
    train(tiny_config(tmp_path, "--model", folder, "--warmup_steps", "0",
                      "--value_pretrain_steps", "0", "--steps", "1", "--no_save_checkpoint"))
    assert loads == [folder]


def test_jsonl_task_through_a_model_folder(tmp_path):
    folder = _save_family(tmp_path / "m", "llama")
    path = tmp_path / "task.jsonl"
    task = RunningSumTask(min_steps=2, max_steps=3, heldout_size=1)
    import random

    with open(path, "w") as f:
        for p in task.sample(random.Random(0), 40):
            f.write(json.dumps({"prompt": p.prompt, "answer": p.answer,
                                "response": task.response_prefix(p, p.steps)}) + "\n")
    summary = train(tiny_config(tmp_path, "--model", str(folder), "--task", f"jsonl:{path}",
                                "--verifier", "after_equals", "--max_new_tokens", "14",
                                "--eval_size", "8"))
    phases = {r["phase"] for r in read_rows(summary["run_dir"])}
    assert phases == {"warmup", "value_pretrain", "rl"}


def test_a_response_bound_below_the_task_s_answers_is_said(tmp_path, capsys):
    # --max_new_tokens 1 trained at reward 0 without a word (adversarial review).
    train(tiny_config(tmp_path, "--max_new_tokens", "4", "--warmup_steps", "0",
                      "--value_pretrain_steps", "0", "--steps", "0"))
    out = capsys.readouterr().out
    assert "--max_new_tokens 4 cuts responses shorter than running_sum's longest" in out
