"""What every study shares: presets, the trainer run in stages, step spans, outputs.

A study never re-implements training: :func:`train_in_stages` composes the trainer's own
phases (:mod:`vapo_kernels.train.vapo`) and hands the live :class:`TrainState` to the
study after warm-up, after value pretraining and after chosen numbers of RL steps.
Outputs of every study: ``results.json`` (seed, options, trainer config, versions, wall
time, numbers), PNG figures and ``report.md`` whose sentences are computed from the numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..train.cli import build_policy, build_task, seed_and_device
from ..train.config import ConfigError, TrainConfig, parse_config
from ..train.metrics import MetricsLogger
from ..train.models import dropout_off, value_model_from_policy
from ..train.rollout import RolloutBatch, build_batch
from ..train.task import Problem
from ..train.vapo import TrainState, evaluate, rl, setup_rl, supervised, value_pretrain

# Trainer options of each preset (the study's own sizes live in each study's PRESETS).
# tiny: seconds, for tests (one torch thread: on models this small a second thread costs
# more in synchronisation than it computes, 2-3x the CPU time on a 2-core machine).
# quick: a 2-core CPU in minutes. full: the trainer's defaults (the CPU recipe at full
# length; with --model and a GPU, scale up from there).
TRAINER_PRESETS: dict[str, list[str]] = {
    "tiny": ["--tiny_hidden_size", "32", "--tiny_layers", "1", "--tiny_heads", "2",
             "--min_steps", "2", "--max_steps", "3", "--eval_size", "16",
             "--warmup_steps", "4", "--warmup_eval_every", "2", "--warmup_batch_size", "16",
             "--prompts_per_step", "4", "--group_size", "2", "--value_pretrain_steps", "1",
             "--eval_every", "1", "--threads", "1"],
    "quick": ["--eval_size", "128", "--warmup_steps", "400", "--prompts_per_step", "16",
              "--group_size", "8", "--value_pretrain_steps", "10", "--eval_every", "5"],
    "full": [],
}
# A study's runs are short and rerun from the seed: no checkpoints.
COMMON_TRAINER_FLAGS = ["--no_tensorboard", "--no_plots", "--no_save_checkpoint", "--save_every", "0"]


def preset_sizes(presets: dict[str, dict], options: dict) -> dict:
    """A study's sizes: its preset's, with each one the user gave on the command line."""
    sizes = presets[options["preset"]]
    return {**sizes, **{k: v for k, v in options.items() if k in sizes and v is not None}}


def trainer_config(preset: str, seed: int, run_dir: str, extra: Sequence[str] = (),
                   progress: bool = True, defaults: Sequence[str] = ()) -> TrainConfig:
    """The trainer config of a preset; bad options raise the trainer's ConfigError naming them.

    Layers, later wins: the trainer's defaults; the preset's options with the study's
    ``defaults``; then ``extra`` (the user's ``-- --option value`` tail, and options a study
    sets after it) as the trainer reads it: its ``--config`` file, its ``--ablation``, its
    command line. The preset and ``defaults`` are the trainer's command line too, where they
    would win over the file and the ablation: an option either sets is dropped from them."""
    from ..train.config import ABLATIONS

    _, from_file = trainer_config_file(extra)
    ablation = from_file.get("ablation", "none")
    if "ablation" in _command_line_names(extra):  # the command line wins over the file
        ablation = _command_line(extra).run.ablation
    # An unknown name (or a file's non-string) is the trainer's to refuse.
    above = {*from_file, *(ABLATIONS.get(ablation, {}) if isinstance(ablation, str) else {})}
    under = _without_options([*TRAINER_PRESETS[preset], *COMMON_TRAINER_FLAGS, *defaults], above)
    argv = [*under, "--seed", str(seed), "--output_dir", run_dir,
            *([] if progress else ["--no_progress"]), *extra]
    return parse_config(argv, prog="vapo-diagnose")


def _trainer_parser(prog: str = "vapo-train"):
    from ..train.config import make_parser

    return make_parser(prog)


def _command_line(trainer_args: Sequence[str]) -> TrainConfig:
    """``trainer_args`` as the trainer's parser reads them (its first pass: no file, no
    ablation, no checks; unknown options are left to the trainer to refuse)."""
    *groups, _ = _trainer_parser("vapo-diagnose").parse_args_into_dataclasses(
        args=list(trainer_args), return_remaining_strings=True)
    return TrainConfig(*groups)


def _without_options(argv: Sequence[str], names: set[str]) -> list[str]:
    """``argv`` (exact option spellings, each followed by its values) less the options
    whose dest is in ``names``, with their values."""
    actions = _trainer_parser()._option_string_actions
    out, keep = [], True
    for token in argv:
        if token.startswith("--"):
            keep = actions[token.split("=", 1)[0]].dest not in names
        if keep:
            out.append(token)
    return out


def _command_line_names(trainer_args: Sequence[str]) -> list[str]:
    """The trainer options (their dest names, in order) given on ``trainer_args``'s command
    line, as the trainer's parser reads them: abbreviations (``--see`` is ``--seed``) and
    dashed spellings included; an unknown or ambiguous one is left to the parser to refuse."""
    actions = _trainer_parser()._option_string_actions
    names = []
    for arg in trainer_args:
        if not arg.startswith("--"):
            continue
        given = arg.split("=", 1)[0]
        matches = {actions[o].dest for o in actions if o == given} or {
            actions[o].dest for o in actions if o.startswith(given)}
        if len(matches) == 1:
            names.append(matches.pop())
    return names


def trainer_config_file(trainer_args: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """The trainer's ``--config FILE`` in ``trainer_args`` ("" when none), found by the
    trainer's own parser (the last one given, an abbreviation, ``--config=FILE``), and the
    options the file sets, read by the trainer's own reader (flat or grouped; a missing
    file, a folder, an unreadable file or one that is not YAML is its ConfigError naming
    the file)."""
    from ..train.config import _flatten_yaml

    path = _command_line(trainer_args).run.config
    return (path, _flatten_yaml(path)) if path else ("", {})


def trainer_option_sources(trainer_args: Sequence[str]) -> list[tuple[str, str | None]]:
    """``(name, where)`` of each trainer option ``trainer_args`` sets: on its command line
    (``where`` None, in order) or in its ``--config`` file (``where``: the file)."""
    path, from_file = trainer_config_file(trainer_args)
    return ([(name, None) for name in _command_line_names(trainer_args)]
            + [(name, path) for name in from_file])


def trainer_option_names(trainer_args: Sequence[str]) -> list[str]:
    """The trainer options (their dest names) that ``trainer_args`` sets, on the command
    line as the trainer's parser reads it or in its ``--config`` file
    (:func:`trainer_option_sources`)."""
    return [name for name, _ in trainer_option_sources(trainer_args)]


def with_options(config: TrainConfig, **changes: Any) -> TrainConfig:
    """A copy of ``config`` with options changed by name, whatever group they are in."""
    groups = {name: dataclasses.replace(getattr(config, name)) for name in config.to_dict()}
    for key, value in changes.items():
        owner = [g for g in groups.values() if key in {f.name for f in dataclasses.fields(g)}]
        if not owner:
            raise KeyError(f"no trainer option {key!r}")
        setattr(owner[0], key, value)
    copy = TrainConfig(**groups)
    copy.file_options = config.file_options - set(changes)
    return copy


def _drop(config: TrainConfig, name: str) -> str:
    """How the user takes back trainer option ``name`` of ``config``: from the trainer
    --config file that set it, or from the trainer options after '--'."""
    if name in config.file_options:
        return (f"set in the trainer --config file {config.run.config}: remove {name} from "
                "the file")
    return f"drop -- --{name}"


def require_running_sum(config: TrainConfig, study: str) -> None:
    """Refuse, before anything trains, a task other than running_sum for a study that reads
    its steps, partial sums and cliffs."""
    if config.task.task != "running_sum":
        raise ConfigError("task", f"{study} needs the running_sum task (it reads its steps and "
                          f"partial sums), got {config.task.task!r}: {_drop(config, 'task')}")


# -- the trainer, in stages ---------------------------------------------------------------
@dataclass
class Run:
    """A trainer run the study can pause: its config, task, state and logger."""

    config: TrainConfig
    task: Any
    state: TrainState
    log: MetricsLogger
    device: torch.device
    # The global torch (and CUDA) random states where :func:`pretrain_value` stopped, so a
    # run continued from here draws what this one would have drawn next.
    rng_state: Any = None


def start_run(config: TrainConfig) -> Run:
    """Seed, build task and models, supervised warm-up, then the value model and optimizers
    (as ``vapo-train`` does, with the same seeding, so the same seed gives the same run)."""
    run = config.run
    if config.rollout.rollout_engine != "hf":
        raise ConfigError("rollout-engine", "the diagnostics sample with transformers "
                          "generate (prefix continuations), got "
                          f"{config.rollout.rollout_engine!r}: {_drop(config, 'rollout_engine')}")
    device = seed_and_device(run)
    os.makedirs(run.output_dir, exist_ok=True)
    task = build_task(config)
    policy, tokenizer = build_policy(config, task)
    policy = dropout_off(policy.to(device))  # eval mode, as vapo-train runs it
    state = TrainState(policy=policy, tokenizer=tokenizer, task_rng=random.Random(run.seed))
    state.shuffle_generator.manual_seed(run.seed)
    log = MetricsLogger(run.output_dir, progress=run.progress, tensorboard=False)
    w = config.warmup
    if w.warmup_steps:
        supervised(state, task, config, log, phase="warmup", max_steps=w.warmup_steps,
                   stop_accuracy=w.warmup_target_accuracy)
    state.warmup_end_time = time.perf_counter()
    setup_rl(state, config, value_model_from_policy)
    return Run(config, task, state, log, device)


def continue_run(run: Run, config: TrainConfig, *, value_pretrained: bool = False) -> Run:
    """The same models under another config (an ablation row, a lambda setting): deep
    copies of the policy and the value model (untrained or pretrained, as ``run`` has it),
    fresh optimizers and a fresh logger in ``config.run.output_dir``.

    ``value_pretrained``: ``run`` is a :func:`pretrain_value` run and the new one carries
    on exactly where that value pretraining stopped, as if it had run it itself: besides
    the models, the critic's optimizer state (AdamW moments) and scheduler, the task's and
    the mini-batch shuffle's random streams and the global torch random state are those
    ``run`` had after pretraining (only valid when :func:`value_pretrain_key` of both
    configs is the same; the RL options may differ)."""
    import copy

    os.makedirs(config.run.output_dir, exist_ok=True)
    state = TrainState(policy=copy.deepcopy(run.state.policy), tokenizer=run.state.tokenizer,
                       value_model=copy.deepcopy(run.state.value_model),
                       task_rng=random.Random(config.run.seed))
    state.shuffle_generator.manual_seed(config.run.seed)
    state.warmup_end_time = time.perf_counter()
    setup_rl(state, config, value_model_from_policy)
    torch.manual_seed(config.run.seed)
    if value_pretrained:
        if run.rng_state is None or value_pretrain_key(run.config) != value_pretrain_key(config):
            raise ValueError("continue_run(value_pretrained=True) needs a pretrain_value run "
                             "with the same value-pretraining options")
        before = run.state
        # Deep copies: the optimizer's load_state_dict would share the moment tensors.
        state.critic_optimizer.load_state_dict(copy.deepcopy(before.critic_optimizer.state_dict()))
        state.critic_scheduler.load_state_dict(copy.deepcopy(before.critic_scheduler.state_dict()))
        state.task_rng.setstate(before.task_rng.getstate())
        state.shuffle_generator.set_state(before.shuffle_generator.get_state())
        state.bad_steps = before.bad_steps
        _set_rng_state(run.rng_state)
    log = MetricsLogger(config.run.output_dir, progress=config.run.progress, tensorboard=False)
    return Run(config, run.task, state, log, run.device)


# Trainer options that value pretraining (vapo.value_pretrain, after setup_rl) never reads,
# or reads without effect on what it leaves behind (the critic, its optimizer, the random
# streams): the policy's loss terms and optimizer, RL-only and bookkeeping options. Every
# other option, including any added later, keeps two configs' value pretraining apart.
_NOT_IN_VALUE_PRETRAINING = {
    "ablation", "output_dir", "progress", "plots", "tensorboard", "save_checkpoint",
    "save_every", "keep", "profile", "steps", "eval_every", "supervised_baseline",
    # policy terms: value pretraining's loss is the value term alone, with vf_coef 1
    "clip_low", "clip_high", "dual_clip", "lm_coef", "entropy_coef", "kl_coef", "kl_kind",
    "vf_coef", "actor_lr", "ppo_epochs", "micro_batch_size", "max_tokens_per_microbatch",
    # the policy's advantages are computed but unused (targets are never whitened; the
    # Monte-Carlo advantages are not computed there)
    "whiten_advantages", "advantage", "mc_samples",
    # the rollout correction reweights the policy term only
    "rollout_is", "rollout_is_mode", "rollout_is_threshold",
}
# lambda_policy's options reach the critic's targets only when GAE is not decoupled.
_POLICY_LAMBDA = {"length_adaptive", "alpha", "lam_policy"}


def value_pretrain_key(config: TrainConfig) -> tuple | None:
    """What value pretraining under ``config`` depends on (None: no value pretraining).
    Configs with the same key leave, from the same warmed-up run and seed, the same
    critic, critic optimizer and random states: one pretraining can serve them all."""
    if not config.algorithm.value_pretrain_steps:
        return None
    skip = _NOT_IN_VALUE_PRETRAINING | (_POLICY_LAMBDA if config.algorithm.decoupled_gae else set())
    return tuple(sorted((f"{group}.{name}", repr(value))
                        for group, options in config.to_dict().items()
                        for name, value in options.items() if name not in skip))


def pretrain_value(run: Run) -> Run:
    """``run``'s value pretraining (as vapo-train runs it), remembering the random state
    where it stopped for :func:`continue_run` with ``value_pretrained=True``."""
    value_pretrain(run.state, run.task, run.config, run.log)
    run.rng_state = _rng_state()
    return run


def _rng_state() -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(saved: dict) -> None:
    torch.set_rng_state(saved["cpu"])
    if saved["cuda"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda"])


def rl_steps(run: Run, steps: int) -> dict[str, float]:
    """``steps`` more RL steps (evaluations as configured); returns the last evaluation."""
    return rl(run.state, run.task, with_options(run.config, steps=steps), run.log)


def train_in_stages(config: TrainConfig, rl_stages: list[int]) -> Iterator[tuple[str, Run]]:
    """Yield ``(stage name, run)`` after warm-up (critic untrained: a zero head), after
    value pretraining (when configured) and after each cumulative number of RL steps in
    ``rl_stages``; the study measures between yields."""
    run = start_run(config)
    yield "warm-up (critic untrained)", run
    if config.algorithm.value_pretrain_steps:
        value_pretrain(run.state, run.task, config, run.log)
        yield f"value-pretrained ({config.algorithm.value_pretrain_steps} steps)", run
    done = 0
    for target in sorted(set(rl_stages)):
        if target > done:
            rl_steps(run, target - done)
            done = target
            yield f"RL step {done}", run
    run.log.close()


def heldout_accuracy(run: Run) -> float:
    return evaluate(run.state, run.task, run.config)["heldout_accuracy"]


# -- chains as token spans ------------------------------------------------------------------
def response_batch(run: Run, problems: list[Problem], responses: list[str]) -> RolloutBatch:
    """Given responses (text; EOS appended) laid out and scored as the trainer does."""
    tok = run.state.tokenizer
    ids = [tok(r, add_special_tokens=False).input_ids + [tok.eos_token_id] for r in responses]
    return build_batch(tok, problems, ids, run.task)


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids) if text else 0


def response_ids(batch: RolloutBatch, i: int) -> list[int]:
    """The token ids of response ``i`` of ``batch`` as sampled (special tokens included)."""
    start = int(batch.prompt_lengths[i])
    return batch.input_ids[i, start: start + int(batch.response_lengths[i])].tolist()


def step_spans(tokenizer, step_texts: list[str]) -> list[tuple[int, int]]:
    """Token ``[start, end)`` of each step within the response, from the token counts of
    growing prefixes (exact for the character tokenizer; at a merge across a step
    boundary a subword tokenizer's span is off by that token)."""
    ends = [token_count(tokenizer, "".join(step_texts[: j + 1])) for j in range(len(step_texts))]
    return list(zip([0, *ends[:-1]], ends))


# -- outputs --------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("vapo-kernels", "torch", "transformers", "tokenizers", "numpy", "scipy",
                    "matplotlib"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = "not installed"
    out["torch_threads"] = str(torch.get_num_threads())
    out["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_results(out_dir: str, study: str, options: dict, config: TrainConfig,
                  results: dict, wall_s: float) -> str:
    path = os.path.join(out_dir, "results.json")
    payload = {"study": study, "seed": options.get("seed"), "options": options,
               "trainer_config": config.to_dict(), "versions": versions(),
               "wall_s": round(wall_s, 1), "results": results}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_plain(payload), f, indent=1)
    return path


def write_report(out_dir: str, title: str, paragraphs: list[str]) -> str:
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# {title}\n\n" + "\n\n".join(p.strip() for p in paragraphs if p) + "\n")
    return path


def write_outputs(out_dir: str, study: str, title: str, options: dict, config: TrainConfig,
                  results: dict, start: float, report, plot) -> None:
    """results.json and report.md (``report(results)``: its paragraphs), then the figures
    (``plot(results, out_dir)``: their file names), then both files again naming them: a
    figure that fails to draw never costs the numbers."""
    wall_s = time.perf_counter() - start

    def write() -> None:
        figures = results.get("figures")
        write_results(out_dir, study, options, config, results, wall_s)
        write_report(out_dir, title, report(results)
                     + ([f"Figures: {', '.join(figures)}."] if figures else []))

    write()
    results["figures"] = plot(results, out_dir)
    write()


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)
    return name


def pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"
