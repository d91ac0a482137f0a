"""``vapo-train``: parse the config, build task / models, run warm-up -> value pretraining -> RL."""

from __future__ import annotations

import copy
import json
import os
import random
import sys
import time

import torch

from .config import ConfigError, TrainConfig, parse_config, save_config
from .metrics import MetricsLogger, plot_run
from .models import (
    build_char_tokenizer,
    build_tiny_llama,
    load_policy,
    load_tokenizer,
    load_value_model,
    save_checkpoint,
    value_model_from_policy,
)
from .task import JsonlTask, ReasoningGymTask, RunningSumTask, Task
from .vapo import TrainState, evaluate, rl, setup_rl, supervised, value_pretrain


def say(message: str) -> None:
    print(f"[vapo-train] {message}", flush=True)


def build_task(config: TrainConfig) -> Task:
    t, seed = config.task, config.run.seed
    kind, _, arg = t.task.partition(":")
    if kind == "running_sum":
        return RunningSumTask(min_steps=t.min_steps, max_steps=t.max_steps, modulus=t.modulus,
                              slip_prob=config.warmup.demo_slip_prob,
                              demo_errors=config.warmup.demo_errors, heldout_size=t.eval_size,
                              seed=seed)
    if kind == "jsonl":
        return JsonlTask(arg, verifier=t.verifier, heldout_size=t.eval_size,
                         max_response_tokens=t.max_new_tokens or 256)
    return ReasoningGymTask(arg, heldout_size=t.eval_size,
                            max_response_tokens=t.max_new_tokens or 256, seed=seed)


def build_policy(config: TrainConfig, task: Task):
    """(policy, tokenizer): a local folder, or the built-in tiny Llama + character tokenizer."""
    m = config.model
    if m.model:
        tokenizer = load_tokenizer(m.model)
        if tokenizer.pad_token_id is None:
            raise ConfigError("model", f"the tokenizer in {m.model} has no pad token (set "
                              "pad_token in its tokenizer_config.json)")
        if tokenizer.eos_token_id is None:
            raise ConfigError("model", f"the tokenizer in {m.model} has no EOS token")
        return load_policy(m.model, m.attn_implementation), tokenizer
    if not task.alphabet:
        raise ConfigError("model", f"task {task.name} needs a model folder with its tokenizer")
    tokenizer = build_char_tokenizer(task.alphabet)
    prompt_tokens = max(len(p.prompt) for p in task.heldout())
    policy = build_tiny_llama(tokenizer, hidden_size=m.tiny_hidden_size, layers=m.tiny_layers,
                              heads=m.tiny_heads,
                              max_positions=prompt_tokens + task.max_response_tokens + 8,
                              attn_implementation=m.attn_implementation)
    return policy, tokenizer


def compile_kernels_once() -> None:
    """The first vapo_kernels call compiles the C++ extension (cached); say so, then do it."""
    import vapo_kernels as vk

    say("loading vapo_kernels' C++ kernels (the first run on a machine compiles them, ~1-2 min)")
    start = time.perf_counter()
    x = torch.zeros(2)
    vk.decoupled_gae(x, x, None, torch.tensor([0, 2], dtype=torch.int32), alpha=1.0)
    say(f"kernels ready ({time.perf_counter() - start:.1f} s)")


def _run_dir(config: TrainConfig) -> str:
    if config.run.output_dir:
        return config.run.output_dir
    name = config.task.task.replace(":", "-").replace("/", "_")[-40:]
    return os.path.join("runs", f"{name}-seed{config.run.seed}-{time.strftime('%Y%m%d-%H%M%S')}")


def train(config: TrainConfig) -> dict:
    """The whole run; returns the summary (also written to RUN/summary.json)."""
    run = config.run
    random.seed(run.seed)
    torch.manual_seed(run.seed)
    if run.threads:
        torch.set_num_threads(run.threads)
    device = torch.device("cuda" if run.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if run.device == "auto" else run.device))
    run_dir = _run_dir(config)
    os.makedirs(run_dir, exist_ok=True)
    save_config(config, os.path.join(run_dir, "config.yaml"))
    say(f"run folder: {run_dir} (resolved config: config.yaml)")

    task = build_task(config)
    policy, tokenizer = build_policy(config, task)
    policy.to(device).train()
    params = sum(p.numel() for p in policy.parameters())
    say(f"task {task.name}; policy {type(policy).__name__} with {params / 1e6:.2f}M parameters "
        f"on {device}; batch {config.prompts_per_step} prompts x {config.samples_per_prompt} "
        f"samples")
    compile_kernels_once()

    state = TrainState(policy=policy, tokenizer=tokenizer, task_rng=random.Random(run.seed))
    state.shuffle_generator.manual_seed(run.seed)
    log = MetricsLogger(run_dir, progress=run.progress, tensorboard=run.tensorboard)
    summary: dict = {"run_dir": run_dir, "seed": run.seed, "task": task.name,
                     "policy_parameters": params, "threads": torch.get_num_threads()}
    start = time.perf_counter()
    w = config.warmup
    if w.warmup_steps:
        say(f"supervised warm-up: up to {w.warmup_steps} steps, stopping at held-out "
            f"accuracy {w.warmup_target_accuracy:.0%}")
        post_warmup = supervised(state, task, config, log, phase="warmup",
                                 max_steps=w.warmup_steps, stop_accuracy=w.warmup_target_accuracy)
        summary["warmup_steps_done"] = state.step
    else:
        post_warmup = evaluate(state, task, config)
    summary["warmup_s"] = round(time.perf_counter() - start, 2)
    summary["post_warmup_accuracy"] = post_warmup["heldout_accuracy"]
    state.warmup_end_time = time.perf_counter()
    baseline_snapshot = copy.deepcopy(state.policy.state_dict()) if run.supervised_baseline else None

    value = load_value_model(config.model.value_model, config.model.attn_implementation) \
        if config.model.value_model else None
    state.value_model = value
    setup_rl(state, config, value_model_from_policy)
    a = config.algorithm
    if a.value_pretrain_steps:
        say(f"value pretraining: {a.value_pretrain_steps} steps on Monte-Carlo returns")
        value_pretrain(state, task, config, log)
    say(f"VAPO: {run.steps} RL steps")
    final = rl(state, task, config, log)
    rl_seconds = time.perf_counter() - state.warmup_end_time
    summary.update(value_pretrain_and_rl_s=round(rl_seconds, 2),
                   final_accuracy=final["heldout_accuracy"],
                   final_accuracy_short=final.get("heldout_accuracy_short"),
                   final_accuracy_long=final.get("heldout_accuracy_long"),
                   total_s=round(time.perf_counter() - start, 2))

    out = os.path.join(run_dir, "checkpoint")
    if run.save_checkpoint:
        save_checkpoint(os.path.join(out, "policy"), state.policy, tokenizer)
        save_checkpoint(os.path.join(out, "value"), state.value_model, tokenizer)
        summary["checkpoint"] = out

    if baseline_snapshot is not None:
        say(f"baseline: the post-warm-up policy continued supervised for {rl_seconds:.0f} s")
        state.policy.load_state_dict(baseline_snapshot)
        state.warmup_end_time = time.perf_counter()
        baseline = supervised(state, task, config, log, phase="supervised",
                              max_steps=10**9, stop_accuracy=None, max_seconds=rl_seconds)
        summary["baseline_accuracy"] = baseline["heldout_accuracy"]
        summary["baseline_steps"] = state.step
    log.close()
    with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    if run.plots:
        summary["plot"] = plot_run(log.path, os.path.join(run_dir, "curves.png"),
                                   title=f"vapo-train {task.name} seed {run.seed}")
    say(f"held-out accuracy: {summary['post_warmup_accuracy']:.1%} after warm-up -> "
        f"{summary['final_accuracy']:.1%} after RL"
        + (f" (supervised baseline: {summary['baseline_accuracy']:.1%})"
           if "baseline_accuracy" in summary else ""))
    say(f"outputs in {run_dir}: metrics.jsonl, summary.json, config.yaml"
        + (", curves.png" if run.plots else "") + (", checkpoint/{policy,value}" if run.save_checkpoint else "")
        + (f", TensorBoard in {log.tensorboard_dir}" if log.tensorboard_dir else ""))
    return summary


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's shard bar would clutter ours
    try:
        config = parse_config(argv)
        train(config)
    except ConfigError as error:
        print(f"vapo-train: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vapo-train: interrupted", file=sys.stderr)
        return 130
    return 0
