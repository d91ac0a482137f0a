"""``vapo-train``: parse the config, build task / models, run warm-up -> value pretraining -> RL."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import socket
import sys
import time

import numpy as np
import torch
import yaml

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

from . import checkpoint, distributed
from .config import ConfigError, TrainConfig, parse_config, parse_profile_steps, save_config
from .distributed import DataParallel
from .metrics import MetricsLogger, StepProfiler, plot_run
from .models import (
    build_char_tokenizer,
    build_tiny_llama,
    dropout_off,
    load_policy,
    load_tokenizer,
    load_value_model,
    value_model_from_policy,
)
from .task import JsonlTask, ReasoningGymTask, RunningSumTask, Task
from .vapo import (
    TrainingStopped,
    TrainState,
    apply_optimizer_options,
    evaluate,
    rl,
    setup_rl,
    supervised,
    value_pretrain,
    warmup_optimizer,
)


def say(message: str) -> None:
    print(f"[vapo-train] {message}", flush=True)


def build_task(config: TrainConfig) -> Task:
    t, seed = config.task, config.run.seed
    kind, _, arg = t.task.partition(":")
    if kind == "running_sum":
        try:
            return RunningSumTask(min_steps=t.min_steps, max_steps=t.max_steps,
                                  modulus=t.modulus, slip_prob=config.warmup.demo_slip_prob,
                                  demo_errors=config.warmup.demo_errors,
                                  heldout_size=t.eval_size, seed=seed)
        except ValueError as error:  # a task too small for its held-out set
            raise ConfigError("eval-size", str(error)) from None
    if kind == "jsonl":
        try:  # a bad file (rows, JSON, too few rows for the held-out set): one line
            return JsonlTask(arg, verifier=t.verifier, heldout_size=t.eval_size,
                             max_response_tokens=t.max_new_tokens or 256)
        except (ValueError, OSError) as error:
            option = "eval-size" if "eval_size" in str(error) else "task"
            raise ConfigError(option, str(error)) from None
    return ReasoningGymTask(arg, heldout_size=t.eval_size,
                            max_response_tokens=t.max_new_tokens or 256, seed=seed)


def checked_tokenizer(folder: str):
    """The model folder's tokenizer, which must have a pad and an EOS token."""
    tokenizer = load_tokenizer(folder)
    if tokenizer.pad_token_id is None:
        raise ConfigError("model", f"the tokenizer in {folder} has no pad token (set "
                          "pad_token in its tokenizer_config.json)")
    if tokenizer.eos_token_id is None:
        raise ConfigError("model", f"the tokenizer in {folder} has no EOS token")
    return tokenizer


def build_policy(config: TrainConfig, task: Task, tokenizer=None):
    """(policy, tokenizer): a local folder, or the built-in tiny Llama + character tokenizer.
    ``tokenizer``: the folder's, when the caller has loaded it already (the trainer loads
    it once, for its startup checks)."""
    m = config.model
    if m.model:
        if tokenizer is None:
            tokenizer = checked_tokenizer(m.model)
        return load_policy(m.model, m.attn_implementation), tokenizer
    if not task.alphabet:
        raise ConfigError("model", f"task {task.name} needs a model folder with its tokenizer")
    tokenizer = build_char_tokenizer(task.alphabet)
    prompt_tokens = max(len(p.prompt) for p in task.heldout())
    policy = build_tiny_llama(tokenizer, hidden_size=m.tiny_hidden_size, layers=m.tiny_layers,
                              heads=m.tiny_heads,
                              max_positions=prompt_tokens + 8 + max(
                                  task.max_response_tokens, config.task.max_new_tokens),
                              attn_implementation=m.attn_implementation)
    return policy, tokenizer


def compile_kernels_once() -> None:
    """The first vapo_kernels call compiles the C++ extension (cached); say so, then do it."""
    import vapo_kernels as vk

    say("loading vapo_kernels' C++ kernels (the first run of a version compiles them: "
        "~35-50 s on 2 idle cores, with per-file progress)")
    start = time.perf_counter()
    x = torch.zeros(2)
    vk.decoupled_gae(x, x, None, torch.tensor([0, 2], dtype=torch.int32), alpha=1.0)
    say(f"kernels ready ({time.perf_counter() - start:.1f} s)")


def _run_dir(config: TrainConfig, dp: DataParallel) -> str:
    if config.run.output_dir:
        return config.run.output_dir
    name = config.task.task.replace(":", "-").replace("/", "_")[-40:]
    stamp = time.strftime('%Y%m%d-%H%M%S')
    folder = [os.path.join("runs", f"{name}-seed{config.run.seed}-{stamp}")]
    if dp.distributed:  # the processes may start in different seconds: rank 0 names it
        torch.distributed.broadcast_object_list(folder, src=0, group=dp.group)
    return folder[0]


# What a run leaves in its folder: a new run there without --resume would overwrite it.
_RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "checkpoint")
_LOCK_FILE = ".vapo-train.lock"  # held by the running trainer (see _own_run_folder)


@contextlib.contextmanager
def _own_run_folder(run_dir: str, resume: str, dp: DataParallel):
    """The run folder, made and held for this run: a new run (no --resume) never starts in
    another run's folder, and a second vapo-train never writes into a folder while one runs
    there (two trainers appending to one metrics.jsonl and pruning each other's checkpoints
    corrupt both runs). Rank 0 writes the folder, so it checks and holds it; a refusal
    reaches every process (the others would otherwise run on and fail with tracebacks)."""
    with contextlib.ExitStack() as held:
        refusal = None
        if dp.is_main:
            try:
                held.enter_context(_locked_run_folder(run_dir, resume))
            except ConfigError as error:
                refusal = error
            except OSError as error:  # a file on the path, no permission: said, and broadcast
                refusal = ConfigError("output-dir", f"{run_dir}: {error.strerror or error}")
        if dp.distributed:
            shared = [None if refusal is None else (refusal.option, refusal.message)]
            torch.distributed.broadcast_object_list(shared, src=0, group=dp.group)
            refusal = None if shared[0] is None else ConfigError(*shared[0])
        if refusal is not None:
            raise refusal
        yield


def check_folder_path(path: str) -> None:
    """``path`` can be made a folder (--output-dir of the trainer and the diagnostics)."""
    if os.path.islink(path) and not os.path.exists(path):
        raise ConfigError("output-dir", f"{path} is a link to {os.readlink(path)}, "
                          "which does not exist")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError("output-dir", f"{path} is a file, not a folder")


def _run_files_in(run_dir: str) -> list[str]:
    """The files of a run that ``run_dir`` holds (none: a new run may start there)."""
    return [f for f in _RUN_FILES if os.path.exists(os.path.join(run_dir, f))]


@contextlib.contextmanager
def _locked_run_folder(run_dir: str, resume: str):
    check_folder_path(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, _LOCK_FILE), "a+", encoding="utf-8") as lock:
        if fcntl is not None:  # POSIX; elsewhere the folder is not locked
            try:  # an OS lock: it goes with the process, so a killed run leaves none behind
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                raise ConfigError("output-dir", f"{run_dir} is in use by a running vapo-train "
                                  f"({holder}): wait for it to end, or choose another "
                                  "--output_dir") from None
        if not resume:
            found = _run_files_in(run_dir)
            if found:
                raise ConfigError("output-dir", f"{run_dir} holds a run already "
                                  f"({', '.join(found)}): pass --resume to continue it, or "
                                  "choose another --output_dir")
        else:  # here, by rank 0 alone while the others wait: renames must not race
            checkpoint.recover(checkpoint.checkpoints_folder(run_dir))
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.flush()
        yield  # closing the file releases the lock


def _resumed_config(path: str, info: checkpoint.CheckpointInfo | None) -> dict:
    """The config the checkpoint was written with (kept in its meta.json), else (a checkpoint
    written before it was kept) the run folder's config.yaml; {} when neither exists."""
    if info is not None and isinstance(info.config, dict):
        return info.config
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def _config_changes(path: str, config: TrainConfig,
                    info: checkpoint.CheckpointInfo | None = None) -> list[tuple[str, str, object, object]]:
    """(group, option, old, new) for each option that differs from the resumed config."""
    old = _resumed_config(path, info)
    changes = []
    for group, options in config.to_dict().items():
        before = old.get(group, {}) if isinstance(old.get(group), dict) else {}
        for key, value in options.items():
            if key in before and before[key] != value and key not in ("resume", "config"):
                if key == "output_dir" and not before[key]:
                    continue  # the run chose its folder itself: resuming in it changes nothing
                changes.append((group, key, before[key], value))
    return changes


# Options a resumed run cannot change: the task (its held-out set, its demonstrator) is
# rebuilt from them while the generators continue from the checkpoint, so a change would
# only half take effect.
_FIXED_ON_RESUME = {("run", "seed"), ("task", "task"), ("task", "min_steps"),
                    ("task", "max_steps"), ("task", "modulus"), ("task", "verifier"),
                    ("task", "eval_size"), ("warmup", "demo_errors"),
                    ("warmup", "demo_slip_prob")}


def _check_resume(config: TrainConfig, info: checkpoint.CheckpointInfo,
                  config_path: str = "") -> None:
    """A checkpoint whose phase this config would not run cannot be continued, nor one
    written with another seed or task."""
    for group, key, old, new in _config_changes(config_path, config, info):
        if (group, key) in _FIXED_ON_RESUME:
            raise ConfigError(key.replace("_", "-"), f"{info.path} was written with --{key} "
                              f"{old!r}, this run has {new!r}: the seed and the task options "
                              "cannot change on resume (the task and its held-out set would "
                              f"change, the generators not); pass --{key} {old} or start a "
                              "new run")
    runs_phase = {"warmup": config.warmup.warmup_steps > 0,
                  "value_pretrain": config.algorithm.value_pretrain_steps > 0, "rl": True}
    if not runs_phase[info.phase]:
        raise ConfigError("resume", f"{info.path} is in the {info.phase} phase, which this "
                          "config skips; resume with the run's own config.yaml")
    if config.run.supervised_baseline and info.phase != "warmup":
        raise ConfigError("resume", "--supervised_baseline cannot resume after the warm-up "
                          "(its post-warm-up snapshot is not checkpointed)")


def _value_model_maker(config: TrainConfig, dp: DataParallel):
    """The value model from the warmed-up policy (gathered whole when FSDP shards it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    def make(policy):
        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True)) \
            if dp.distributed else None
        return distributed.prepare_model(value_model_from_policy(policy, full), config, dp)
    return make


def train(config: TrainConfig) -> dict:
    """The whole run; returns the summary (also written to RUN/summary.json). Under torchrun
    every process runs this and joins the process group first."""
    dp = distributed.from_environment(config)
    summary = _train(config, dp)
    # Only after a normal end: an error leaves the group as it is and propagates, so this
    # process exits with its traceback at once (shutdown's barrier would wait for the
    # others, which may sit in a collective this process never joins: a silent hang).
    distributed.shutdown(dp)
    return summary


def seed_and_device(run) -> torch.device:
    """The run's seeding, thread count and device, as every entry point into the trainer
    (this one, the diagnostics) must set them for the same seed to give the same run."""
    random.seed(run.seed)
    np.random.seed([run.seed & 0xFFFFFFFF, run.seed >> 32])  # NumPy takes 32-bit words
    torch.manual_seed(run.seed)
    if run.threads:
        torch.set_num_threads(run.threads)
    if run.device != "auto":
        return torch.device(run.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_processes(config: TrainConfig, dp: DataParallel) -> None:
    """What several data-parallel processes cannot run (yet): one line, before anything is
    built. --advantage mc would deadlock (each process generates a different number of
    per-length continuation batches, and FSDP's collectives in generate must pair up)."""
    unsupported = [("logprobs-from", config.model.logprobs_from == "hidden"),
                   ("supervised-baseline", config.run.supervised_baseline),
                   ("kl-coef", config.algorithm.kl_coef > 0),
                   ("advantage", config.algorithm.advantage == "mc")]
    for option, used in unsupported:
        if used:
            raise ConfigError(option, ("mc " if option == "advantage" else "")
                              + "not supported with several processes yet")
    n, world = config.prompts_per_step, dp.world_size  # each process samples its share
    if n % world:
        what = (f"{n} prompts" if config.rollout.group_sampling else
                f"{n} prompts (prompts_per_step x group_size without group sampling)")
        raise ConfigError("prompts-per-step", f"{what} do not split evenly over {world} "
                          "processes")
    # Each process cuts its own share into the mini-batches: a share that does not divide
    # gave torch.chunk fewer pieces, so fewer optimizer steps than --mini_batches, silently.
    # (--micro_batch_size needs no check: micro_batches() keeps each forward within it.)
    share, minis = config.batch_size // world, config.optim.mini_batches
    if share % minis:
        raise ConfigError("mini-batches", f"each of the {world} processes trains on {share} of "
                          f"the {config.batch_size} sequences of a step, which do not divide "
                          f"into {minis} mini-batches: the batch (prompts_per_step x "
                          f"group_size) must divide by {minis} x {world} processes")
    w = config.warmup
    if (w.warmup_steps or config.run.supervised_baseline) and w.warmup_batch_size % world:
        raise ConfigError("warmup-batch-size", f"{w.warmup_batch_size} demonstrations do not "
                          f"split evenly over {world} processes")


def _check_demonstrations(config: TrainConfig, task: Task) -> None:
    """The supervised phases draw demonstrations until a batch is full: a task without any
    would loop forever."""
    if getattr(task, "has_demonstrations", True):
        return
    what = ("no row of its training split has a 'response'" if task.name.startswith("jsonl:")
            else "it has no reference responses")
    if config.warmup.warmup_steps > 0:
        raise ConfigError("warmup-steps", f"task {task.name} has no demonstrations to warm up "
                          f"on ({what}): pass --warmup_steps 0")
    if config.run.supervised_baseline:
        raise ConfigError("supervised-baseline", f"task {task.name} has no demonstrations "
                          f"({what}) for the supervised baseline")


def _check_positions(config: TrainConfig, task: Task, tokenizer) -> None:
    """A model folder's positions hold the longest prompt + --max_new_tokens (and, with a
    warm-up, the longest demonstration): past them GPT-2's position table ends in an
    IndexError mid-run. The built-in model is sized to fit. ``tokenizer``: the folder's."""
    if not config.model.model:
        return
    from transformers import AutoConfig

    positions = getattr(AutoConfig.from_pretrained(config.model.model),
                        "max_position_embeddings", None)
    if not positions:
        return
    problems = list(task.heldout()) + list(getattr(task, "train_problems", list)())
    lengths = [len(ids) for ids in tokenizer([p.prompt for p in problems],
                                             add_special_tokens=False).input_ids]
    longest, new = max(lengths), config.task.max_new_tokens or task.max_response_tokens
    if longest + new > positions:
        raise ConfigError("max-new-tokens", f"the longest prompt of {task.name} ({longest} "
                          f"tokens) + {new} new tokens = {longest + new} exceed the {positions} "
                          f"positions of {config.model.model}: lower --max_new_tokens (or "
                          "shorten the prompts)")
    if config.warmup.warmup_steps or config.run.supervised_baseline:
        demos = [(p, p.demonstration) for p in problems if p.demonstration is not None]
        if demos:
            prompts = tokenizer([p.prompt for p, _ in demos], add_special_tokens=False).input_ids
            answers = tokenizer([d for _, d in demos], add_special_tokens=False).input_ids
            worst = max(len(a) + len(b) + 1 for a, b in zip(prompts, answers))  # + EOS
            if worst > positions:
                raise ConfigError("task", f"a demonstration of {task.name} with its prompt "
                                  f"({worst} tokens with EOS) exceeds the {positions} positions "
                                  f"of {config.model.model}: shorten it, or --warmup_steps 0")


def _train(config: TrainConfig, dp: DataParallel) -> dict:
    run = config.run
    device = seed_and_device(run)
    if dp.distributed and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if dp.distributed:
        _check_processes(config, dp)
    task = build_task(config)  # before the run folder: a bad task leaves no folder behind
    _check_demonstrations(config, task)
    # A model folder's tokenizer: loaded once, checked here, then the policy's.
    tokenizer = checked_tokenizer(config.model.model) if config.model.model else None
    _check_positions(config, task, tokenizer)
    run_dir = _run_dir(config, dp)
    with _own_run_folder(run_dir, run.resume, dp):
        return _train_in(config, dp, device, task, run_dir, tokenizer)


def _train_in(config: TrainConfig, dp: DataParallel, device: torch.device, task: Task,
              run_dir: str, tokenizer=None) -> dict:
    run = config.run
    info = checkpoint.find_resume(run_dir, run.resume, warn=say if dp.is_main else None)
    config_path = os.path.join(run_dir, "config.yaml")
    if info is not None:
        _check_resume(config, info, config_path)
    elif run.resume:  # auto, and no complete checkpoint: only an empty folder starts afresh
        found = _run_files_in(run_dir)
        if found:
            raise ConfigError("resume", f"{run_dir} holds a run ({', '.join(found)}) but no "
                              "complete checkpoint to continue it from; nothing was changed: "
                              "choose another --output_dir (or move those files away to "
                              "start afresh there)")

    def save_run_config() -> None:
        if dp.is_main:
            save_config(config, config_path)

    if dp.is_main:
        if info is None:
            save_run_config()
        else:  # written once the checkpoint has loaded: a refused resume leaves the run's own
            for _, key, old, new in _config_changes(config_path, config, info):
                say(f"resuming with a changed option: {key}: {old!r} -> {new!r}")
        cut = config.task.max_new_tokens
        if cut and cut < task.max_response_tokens:  # legal (a length study), rarely meant
            say(f"--max_new_tokens {cut} cuts responses shorter than {task.name}'s longest "
                f"demonstration ({task.max_response_tokens} tokens): long answers get reward 0")
        say(f"run folder: {run_dir} (resolved config: config.yaml)"
            + (f"; {dp.world_size} data-parallel processes" if dp.distributed else ""))
        if run.resume and info is None:
            say(f"--resume auto: no complete checkpoint in {run_dir}; starting fresh")
    dp.barrier()

    policy, tokenizer = build_policy(config, task, tokenizer)
    policy.to(device)
    params = sum(p.numel() for p in policy.parameters())
    policy = dropout_off(distributed.prepare_model(policy, config, dp))  # every phase: eval mode
    if dp.distributed:  # same initial weights everywhere (above); own sampling noise from here
        torch.manual_seed(run.seed * 1_000_003 + dp.rank)
    if dp.is_main:
        say(f"task {task.name}; policy {type(policy).__name__} with {params / 1e6:.2f}M "
            f"parameters on {device}; batch {config.prompts_per_step} prompts x "
            f"{config.samples_per_prompt} samples")
        compile_kernels_once()

    state = TrainState(policy=policy, tokenizer=tokenizer, task_rng=random.Random(run.seed), dp=dp)
    if config.rollout.rollout_engine == "vllm":  # one process: validate() made sure
        from .vllm_engine import VllmEngine

        r = config.rollout
        say(f"starting vLLM as the rollout engine ({r.vllm_gpu_memory:.0%} of the GPU's "
            f"memory, {r.vllm_dtype})")
        state.engine = VllmEngine(policy, tokenizer, gpu_memory=r.vllm_gpu_memory,
                                  dtype=r.vllm_dtype, seed=run.seed)
    state.shuffle_generator.manual_seed(run.seed)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    state.checkpointer = checkpoint.Checkpointer(run_dir, save_every=run.save_every, keep=run.keep,
                                                 metrics_path=metrics_path, dp=dp,
                                                 config=config.to_dict())

    def open_log(rows: list[dict] | None = None) -> MetricsLogger:
        return MetricsLogger(run_dir, progress=run.progress, tensorboard=run.tensorboard,
                             truncate=rows is None, main=dp.is_main,
                             elapsed_offset=_last_elapsed(rows or []),
                             rows_before=None if rows is None else len(rows))

    def continue_run() -> MetricsLogger:
        """The checkpoint has loaded (every check passed): only now the run folder changes.
        Later checkpoints (an abandoned continuation) move aside, the metric rows are the
        checkpoint's, config.yaml this run's."""
        if dp.is_main:
            aside, moved = checkpoint.set_aside_later(run_dir, info)
            if moved:
                say(f"{info.path} is not the latest checkpoint: moved the {len(moved)} later "
                    f"one(s) ({', '.join(moved)}) to {aside}; they are kept there, never "
                    "resumed from or pruned")
        dp.barrier()
        rows = checkpoint.restore_metrics(info, metrics_path, dp)
        state.checkpointer.history = checkpoint.complete_checkpoints(run_dir)
        save_run_config()
        return open_log(rows)

    log = None
    if info is None:
        log = open_log()
    elif dp.is_main:
        say(f"resuming from {info.path} ({info.phase} step {info.step})")
    resumed = info.phase if info is not None else None
    summary: dict = {"run_dir": run_dir, "seed": run.seed, "task": task.name,
                     "policy_parameters": params, "threads": torch.get_num_threads(),
                     "processes": dp.world_size}
    start = time.perf_counter()
    w = config.warmup
    if resumed in (None, "warmup"):
        if w.warmup_steps:
            if dp.is_main:
                say(f"supervised warm-up: up to {w.warmup_steps} steps, stopping at held-out "
                    f"accuracy {w.warmup_target_accuracy:.0%}")
            if resumed == "warmup":
                state.warmup_optimizer = warmup_optimizer(state, config)
                checkpoint.load(info, state, dp)
                apply_optimizer_options(state, config)  # a changed lr / weight decay holds
                log = continue_run()
            post_warmup = supervised(state, task, config, log, phase="warmup",
                                     max_steps=w.warmup_steps,
                                     stop_accuracy=w.warmup_target_accuracy,
                                     resume=resumed == "warmup")
            summary["warmup_steps_done"] = state.step
        else:
            post_warmup = evaluate(state, task, config)
        state.post_warmup_eval = post_warmup
    summary["warmup_s"] = round(time.perf_counter() - start, 2)
    state.warmup_end_time = time.perf_counter()
    baseline_snapshot = copy.deepcopy(state.policy.state_dict()) if run.supervised_baseline else None

    value = load_value_model(config.model.value_model, config.model.attn_implementation) \
        if config.model.value_model else None
    state.value_model = None if value is None else distributed.prepare_model(
        value.to(device), config, dp)
    setup_rl(state, config, _value_model_maker(config, dp))
    if resumed in ("value_pretrain", "rl"):
        checkpoint.load(info, state, dp)
        apply_optimizer_options(state, config)  # a changed lr / weight decay holds
        log = continue_run()
    post_warmup = state.post_warmup_eval
    summary["post_warmup_accuracy"] = post_warmup["heldout_accuracy"]
    a = config.algorithm
    if a.value_pretrain_steps and resumed != "rl":
        if dp.is_main:
            say(f"value pretraining: {a.value_pretrain_steps} steps on Monte-Carlo returns")
        value_pretrain(state, task, config, log, resume=resumed == "value_pretrain")
    if dp.is_main:
        say(f"VAPO: {run.steps} RL step{'s' if run.steps != 1 else ''}")
    profiler = None
    if run.profile and dp.is_main:
        first, last = parse_profile_steps(run.profile)
        if last > run.steps:
            raise ConfigError("profile", f"RL steps {run.profile} go past --steps {run.steps}")
        profiler = StepProfiler(first, last, os.path.join(run_dir, "profile"))
    final = rl(state, task, config, log, resume=resumed == "rl", profiler=profiler)
    if profiler is not None and profiler.shares is not None:
        say(profiler.summary_line())
        summary["profile"] = {"trace": profiler.trace_path,
                              **{k: round(v, 4) for k, v in profiler.shares.items()}}
    rl_seconds = time.perf_counter() - state.warmup_end_time
    summary.update(value_pretrain_and_rl_s=round(rl_seconds, 2),
                   final_accuracy=final["heldout_accuracy"],
                   final_accuracy_short=final.get("heldout_accuracy_short"),
                   final_accuracy_long=final.get("heldout_accuracy_long"),
                   total_s=round(time.perf_counter() - start, 2))

    out = os.path.join(run_dir, "checkpoint")
    if run.save_checkpoint:
        for sub, model in (("policy", state.policy), ("value", state.value_model)):
            checkpoint.export_pretrained(os.path.join(out, sub), model, tokenizer, dp)
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
    if not dp.is_main:
        return summary
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
        + (", checkpoints/ (resume with --resume)" if run.save_every else "")
        + (f", TensorBoard in {log.tensorboard_dir}" if log.tensorboard_dir else ""))
    return summary


def _last_elapsed(rows: list[dict]) -> float:
    """``elapsed_s`` of the last row (a resumed run's clock continues from it)."""
    return float(rows[-1].get("elapsed_s") or 0.0) if rows else 0.0


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's shard bar would clutter ours
    try:
        config = parse_config(argv)
        train(config)
    except ConfigError as error:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process refuses: one says so
            print(f"vapo-train: error: {error}", file=sys.stderr)
        return 2
    except (TrainingStopped, checkpoint.CheckpointWriteError) as stop:
        # A write error every process raised alike is said once (8 processes: 8 lines);
        # one only this process raised is said here.
        if (os.environ.get("RANK", "0") == "0"
                or not getattr(stop, "on_every_process", False)):
            print(f"vapo-train: {stop}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("vapo-train: interrupted", file=sys.stderr)
        return 130
    return 0
