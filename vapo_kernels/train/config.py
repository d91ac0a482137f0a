"""The trainer's configuration: one dataclass per option group, one tree (:class:`TrainConfig`).

Parsed by ``transformers.HfArgumentParser`` (each field's ``help`` is its documentation and
``vapo-train --help`` prints it with the default). Sources, later wins: the defaults below
(the CPU preset), ``--config FILE.yaml`` (flat ``option: value`` or grouped
``group: {option: value}``), ``--ablation NAME``, then the command line. A bad value that
came from the file is refused naming the file too.

The defaults are a CPU-sized VAPO: every component of the paper is on; sizes and learning
rates are scaled to a 0.3M-parameter model (the paper's values are in each help line).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml
from transformers import HfArgumentParser

from ..ops.token_logprobs import TEMPERATURE_RANGE


class ConfigError(ValueError):
    """A bad option: the CLI prints ``vapo-train: error: <message>`` and exits 2."""

    def __init__(self, option: str, message: str):
        super().__init__(f"--{option}: {message}")
        self.option, self.message = option, message


def _opt(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelArgs:
    _argument_group_name = "model"
    model: str = _opt("", "Local Hugging Face causal-LM folder (with its tokenizer). Empty: build "
                      "a tiny Llama from a config (random init) and a character tokenizer. "
                      "Policy, value and reference models run in eval mode in every phase "
                      "(dropout off, as verl; gradients still flow).")
    value_model: str = _opt("", "Folder of a token-classification value model (num_labels=1). "
                            "Empty: initialise it from the policy after warm-up.")
    tiny_hidden_size: int = _opt(128, "Built-in model: hidden size.")
    tiny_layers: int = _opt(2, "Built-in model: decoder layers.")
    tiny_heads: int = _opt(4, "Built-in model: attention heads.")
    attn_implementation: str = _opt("sdpa", "transformers attention: sdpa, eager, or "
                                    "flash_attention_2 (GPU; the forward is then packed).",
                                    choices=["sdpa", "eager", "flash_attention_2"])
    logprobs_from: str = _opt("logits", "Log-probs via vk.token_logprobs on the logits, or from "
                              "hidden states through the fused LM head (vk.linear_logprobs, no "
                              "N x V logits).", choices=["logits", "hidden"])


@dataclass
class TaskArgs:
    _argument_group_name = "task"
    task: str = _opt("running_sum", "running_sum (built-in) | jsonl:PATH | reasoning_gym:NAME.")
    min_steps: int = _opt(3, "running_sum: shortest chain (digits to add).")
    max_steps: int = _opt(8, "running_sum: longest chain; a batch mixes lengths in "
                          "[min_steps, max_steps].")
    modulus: int = _opt(10, "running_sum: difficulty, the sum is taken modulo this (2..36).")
    verifier: str = _opt("exact", "jsonl: answer check, one of exact, last_number, after_equals, "
                         "contains.", choices=["exact", "last_number", "after_equals", "contains"])
    max_new_tokens: int = _opt(0, "Longest response; 0: the task's own bound.")
    eval_size: int = _opt(256, "Held-out problems for the accuracy (greedy decoding).")


@dataclass
class WarmupArgs:
    _argument_group_name = "supervised warm-up"
    warmup_steps: int = _opt(2500, "Most supervised steps on the task's demonstrations before "
                             "RL (0: none).")
    warmup_target_accuracy: float = _opt(0.35, "Stop the warm-up once held-out accuracy reaches "
                                         "this (leaves room for RL; 1.0: never stop early).")
    warmup_eval_every: int = _opt(10, "Held-out evaluation interval during warm-up.")
    warmup_lr: float = _opt(3e-3, "AdamW learning rate of the warm-up.")
    warmup_batch_size: int = _opt(64, "Demonstrations per warm-up step, over all processes "
                                  "under torchrun (each trains on its share, as with "
                                  "prompts_per_step).")
    demo_errors: str = _opt("systematic", "running_sum demonstrator: systematic (a blind spot: "
                            "adds the largest digit as one less, with demo_slip_prob, so imitation "
                            "learns the mistake) or random (one slip at a random step in "
                            "demo_slip_prob of the demonstrations).",
                            choices=["systematic", "random"])
    demo_slip_prob: float = _opt(0.7, "running_sum: probability of the demonstrator's error "
                                 "(see demo_errors).")


@dataclass
class RolloutArgs:
    _argument_group_name = "rollout (group sampling)"
    prompts_per_step: int = _opt(64, "Prompts per RL step (paper: 512). 16 was too few: the tiny "
                                  "policy overfit each step's prompts and held-out accuracy fell.")
    group_size: int = _opt(8, "Samples per prompt (paper: 16). Must be >= 2 with group sampling.")
    group_sampling: bool = _opt(True, "Sample group_size responses per prompt. Off: one sample per "
                                "prompt and prompts_per_step * group_size prompts (same batch).")
    temperature: float = _opt(1.0, "Sampling temperature (log-probs use the same).")
    rollout_engine: str = _opt("hf", "hf: transformers generate with its KV cache. vllm: vLLM "
                               "on the GPU (extra: pip install 'vapo-kernels[vllm]'; one "
                               "process), the policy's weights pushed into it before each "
                               "rollout.", choices=["hf", "vllm"])
    rollout_is: str = _opt("none", "Rollout correction: reweight the policy loss by the ratio of "
                           "the old policy to the rollout engine's own log-probs of the sampled "
                           "tokens, per token, per sequence or geometric (verl's rollout_is); "
                           "none: off.", choices=["none", "token", "sequence", "geometric"])
    rollout_is_mode: str = _opt("truncate", "Rollout correction: truncate caps each weight at "
                                "rollout_is_threshold; mask drops the tokens (token level) or "
                                "sequences outside [1/threshold, threshold].",
                                choices=["truncate", "mask"])
    rollout_is_threshold: float = _opt(2.0, "Rollout correction: upper bound C of the weights "
                                       "(mask mode keeps [1/C, C], so C >= 1 there).")
    vllm_gpu_memory: float = _opt(0.3, "vllm: share of the GPU's memory vLLM may take (weights, "
                                  "KV cache); the rest stays for training.")
    vllm_dtype: str = _opt("bfloat16", "vllm: the engine's weights and compute (the policy's "
                           "weights are cast as they are pushed).",
                           choices=["bfloat16", "float16", "float32"])


@dataclass
class AlgorithmArgs:
    _argument_group_name = "VAPO algorithm"
    gamma: float = _opt(1.0, "Discount (paper: 1.0).")
    lam_critic: float = _opt(1.0, "GAE lambda of the value targets (paper: 1.0, Monte-Carlo).")
    decoupled_gae: bool = _opt(True, "Decoupled GAE: critic uses lam_critic, policy its own "
                               "lambda. Off: the critic uses the policy's lambda too.")
    length_adaptive: bool = _opt(True, "lambda_policy = 1 - 1/(alpha * l) per sequence. Off: "
                                 "fixed lam_policy.")
    alpha: float = _opt(1.0, "Length-adaptive alpha. Paper: 0.05 for responses of thousands of "
                        "tokens; our chains are 14-35 tokens, where 0.05 gives lambda = 0 up to 20 "
                        "tokens (alpha * l <= 1) and 0.43 at 35, so the CPU preset uses 1.0 "
                        "(lambda 0.93-0.97).")
    lam_policy: float = _opt(0.95, "Fixed lambda_policy when length_adaptive is off.")
    whiten_advantages: bool = _opt(True, "Whiten advantages over the batch's valid tokens.")
    clip_low: float = _opt(0.2, "PPO epsilon_low (paper: 0.2).")
    clip_high: float = _opt(0.28, "Clip-Higher epsilon_high (paper: 0.28; = clip_low: off).")
    dual_clip: float = _opt(0.0, "Dual-clip constant c > 1 for negative advantages (0: off).")
    value_clip: float = _opt(0.5, "Value-loss clip around the old values (0: unclipped).")
    vf_coef: float = _opt(1.0, "Weight of the value loss in the joint loss.")
    lm_coef: float = _opt(0.1, "Positive-example LM loss weight mu (paper: 0.1; 0: off).")
    kl_coef: float = _opt(0.0, "KL to a frozen reference policy (0: off, no reference model).")
    kl_kind: str = _opt("k3", "KL estimator.", choices=["k1", "k2", "k3", "abs", "mse", "low_var_kl"])
    entropy_coef: float = _opt(0.0, "Entropy bonus weight.")
    loss_agg: str = _opt("token-mean", "Loss aggregation (paper: token-level = token-mean).",
                         choices=["token-mean", "token-sum", "seq-mean-token-sum",
                                  "seq-mean-token-mean", "seq-mean-token-sum-norm"])
    value_pretrain_steps: int = _opt(10, "Value pretraining steps on Monte-Carlo returns of the "
                                     "warmed-up policy before RL (paper: 50; 0: off).")
    advantage: str = _opt("gae", "Policy advantages: gae (VAPO's decoupled GAE on the value "
                          "model) or mc (VinePPO: a step's advantage is the change of the "
                          "Monte-Carlo value, mc_samples continuations per step boundary; the "
                          "critic still trains, for its metrics; one process only).", choices=["gae", "mc"])
    mc_samples: int = _opt(4, "--advantage mc: continuations per step boundary (VinePPO: 9).")


@dataclass
class OptimArgs:
    _argument_group_name = "optimisation"
    actor_lr: float = _opt(2e-4, "Policy AdamW learning rate (paper: 1e-6 at 32B; on the tiny "
                           "model 2e-4 beat 5e-4, and 2e-3 collapsed it).")
    critic_lr: float = _opt(1e-3, "Value AdamW learning rate, above the actor's (paper: 2e-6).")
    lr_warmup_steps: int = _opt(3, "Linear learning-rate warm-up (optimizer steps), then constant.")
    ppo_epochs: int = _opt(2, "Passes over each RL batch.")
    mini_batches: int = _opt(2, "Optimizer steps per epoch; the batch must divide into them.")
    micro_batch_size: int = _opt(0, "Sequences per forward/backward (gradient accumulation); "
                                 "also bounds the no-grad old log-prob / value / reference "
                                 "forwards and value pretraining's; 0: the whole mini-batch. "
                                 "Under torchrun a bound on each process's forwards (its "
                                 "share is cut into as few micro-batches as stay within it).")
    grad_clip: float = _opt(1.0, "Gradient-norm clip per model (0: off).")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    max_tokens_per_microbatch: int = _opt(0, "Token budget of a micro-batch (prompt + response "
                                          "tokens of its padded rows): sequences are packed "
                                          "greedily into micro-batches under it, so long chains "
                                          "fit (every forward: the loss's, the no-grad "
                                          "old log-prob / value / reference ones, value "
                                          "pretraining's); 0: by micro_batch_size.")
    max_bad_steps: int = _opt(3, "A NaN/inf loss or gradient skips the update; this many in a "
                              "row stop the run (the last good checkpoint is kept).")


@dataclass
class RunArgs:
    _argument_group_name = "run"
    steps: int = _opt(20, "RL steps.")
    output_dir: str = _opt("", "Run folder; empty: runs/<task>-seed<seed>-<time>.")
    seed: int = _opt(0, "Seed of everything (same seed, same numbers).")
    eval_every: int = _opt(5, "Held-out evaluation interval in RL steps (also before the first).")
    device: str = _opt("auto", "cpu, cuda, or auto.")
    threads: int = _opt(0, "torch CPU threads (0: torch's default).")
    config: str = _opt("", "YAML file of options (flat or grouped); the command line overrides it.")
    ablation: str = _opt("none", "A VAPO ablation of the paper's table (see ABLATIONS).",
                         choices=["none", "no_value_pretrain", "no_decoupled_gae",
                                  "no_length_adaptive", "no_clip_higher", "no_token_level",
                                  "no_lm_loss", "no_group_sampling", "vanilla_ppo"])
    supervised_baseline: bool = _opt(False, "After RL, rewind to the post-warm-up policy's weights "
                                     "and continue supervised, with a fresh AdamW at warmup_lr "
                                     "(not the warm-up's optimizer state), for the same wall "
                                     "time as value pretraining + RL: the honest baseline.")
    save_checkpoint: bool = _opt(True, "save_pretrained policy, value model and tokenizer at the end.")
    plots: bool = _opt(True, "Write PNG plots at the end.")
    tensorboard: bool = _opt(True, "Also log to TensorBoard when it is installed.")
    progress: bool = _opt(True, "tqdm progress bar with a live metrics line.")
    # On by default: a killed run must never cost the user more than a few steps.
    save_every: int = _opt(10, "Checkpoint every N steps of each phase, at each phase start and "
                           "at the end, into RUN/checkpoints (0: off).")
    keep: int = _opt(2, "Complete checkpoints kept (older ones are pruned; 0: keep all).")
    resume: str = _opt("", "Continue a run: 'auto' (or the bare flag) takes the latest complete "
                       "checkpoint in --output_dir (none: start fresh, only in a folder "
                       "holding no run), or a checkpoint folder (later checkpoints of the run "
                       "move to checkpoints-set-aside-<time>/).",
                       nargs="?", const="auto")
    profile: str = _opt("", "RL steps to profile with torch.profiler, e.g. '3' or '3-4': a "
                        "Chrome trace in RUN/profile and the share of step time in our ops.")


@dataclass
class DistributedArgs:
    _argument_group_name = "data parallelism (torchrun)"
    dist_backend: str = _opt("auto", "Process-group backend under torchrun: auto (nccl on GPU, "
                             "gloo on CPU), gloo or nccl.", choices=["auto", "gloo", "nccl"])
    mixed_precision: str = _opt("none", "FSDP2 mixed precision: bf16 parameters in forward/"
                                "backward, fp32 gradient reduction (GPU).",
                                choices=["none", "bf16"])
    activation_checkpointing: bool = _opt(False, "Recompute each decoder layer's activations in "
                                          "the backward (memory for compute). The recomputed "
                                          "layers keep their training flag (transformers "
                                          "recomputes only those); their dropout modules stay "
                                          "off, but a family applying dropout in the layer's own "
                                          "code (OPT) would keep it.")


GROUPS = {
    "model": ModelArgs,
    "task": TaskArgs,
    "warmup": WarmupArgs,
    "rollout": RolloutArgs,
    "algorithm": AlgorithmArgs,
    "optim": OptimArgs,
    "run": RunArgs,
    "distributed": DistributedArgs,
}

# Each of the VAPO paper's ablations (its Table 1) as option overrides.
ABLATIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "no_value_pretrain": {"value_pretrain_steps": 0},
    "no_decoupled_gae": {"decoupled_gae": False},
    "no_length_adaptive": {"length_adaptive": False},
    "no_clip_higher": {"clip_high": 0.2},
    "no_token_level": {"loss_agg": "seq-mean-token-mean"},
    "no_lm_loss": {"lm_coef": 0.0},
    "no_group_sampling": {"group_sampling": False},
}
ABLATIONS["vanilla_ppo"] = {k: v for name, o in ABLATIONS.items() for k, v in o.items()}


@dataclass
class TrainConfig:
    """The whole configuration: one field per option group."""

    model: ModelArgs = field(default_factory=ModelArgs)
    task: TaskArgs = field(default_factory=TaskArgs)
    warmup: WarmupArgs = field(default_factory=WarmupArgs)
    rollout: RolloutArgs = field(default_factory=RolloutArgs)
    algorithm: AlgorithmArgs = field(default_factory=AlgorithmArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    run: RunArgs = field(default_factory=RunArgs)
    distributed: DistributedArgs = field(default_factory=DistributedArgs)
    # The options whose value is run.config's file's (the file sets them, neither the command
    # line nor the ablation): set by parse_config on the config it returns, so a later
    # refusal of one (vapo-diagnose's) can say where it was set. Not a field: not saved.
    file_options: typing.ClassVar[frozenset[str]] = frozenset()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in GROUPS}

    # Derived sizes, in one place so the loop and the checks agree.
    @property
    def samples_per_prompt(self) -> int:
        return self.rollout.group_size if self.rollout.group_sampling else 1

    @property
    def prompts_per_step(self) -> int:
        r = self.rollout
        return r.prompts_per_step if r.group_sampling else r.prompts_per_step * r.group_size

    @property
    def batch_size(self) -> int:
        return self.rollout.prompts_per_step * self.rollout.group_size


class _OneLineErrorParser(HfArgumentParser):
    """argparse prints usage + error; a user needs only the error naming the option."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def make_parser(prog: str = "vapo-train") -> HfArgumentParser:
    return _OneLineErrorParser(
        list(GROUPS.values()),
        prog=prog,
        description="VAPO (arXiv 2504.05118) on vapo_kernels' fused ops: supervised warm-up, "
        "value pretraining, then RL. Defaults: the CPU preset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


def _option_names() -> dict[str, str]:
    return {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}


def _read_yaml(path: str) -> Any:
    """The YAML document in ``path``; a file that cannot be read (missing, a folder, no
    permission, not UTF-8) or is not YAML is a ConfigError naming the file, one line."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError("config", f"no such file: {path}") from None
    except IsADirectoryError:
        raise ConfigError("config", f"{path} is a folder, not a YAML file of trainer "
                          "options") from None
    except UnicodeDecodeError as error:
        raise ConfigError("config", f"{path} is not UTF-8 text (byte {error.start}: "
                          f"{error.reason})") from None
    except yaml.reader.ReaderError as error:  # a control character, e.g. a NUL byte
        raise ConfigError("config", f"{path} is not YAML text (character "
                          f"#x{error.character:04x} at position {error.position}: "
                          f"{error.reason})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None)
        raise ConfigError("config", f"{path} is not valid YAML" + (
            f" (line {mark.line + 1}: {problem})" if mark and problem else "")) from None
    except OSError as error:
        raise ConfigError("config", f"cannot read {path}: {error.strerror or error}") from None


def _flatten_yaml(path: str) -> dict[str, Any]:
    """The options a ``--config`` file sets, flat (its groups opened), each checked to be a
    trainer option (of the group it sits in); errors are ConfigErrors naming the file."""
    data = _read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of options")
    flat: dict[str, Any] = {}
    names = _option_names()
    for key, value in data.items():
        if key in GROUPS and isinstance(value, dict):
            for option in value:
                if names.get(option, key) != key:  # e.g. model: {steps: 1}
                    raise ConfigError(str(option).replace("_", "-"), f"belongs to the "
                                      f"{names[option]} group, not {key}, in {path}")
            flat.update(value)
        else:
            flat[key] = value
    for key in flat:
        if key not in names:
            raise ConfigError(str(key).replace("_", "-"), f"unknown option in {path}")
    return flat


def parse_config(argv: list[str] | None = None, prog: str = "vapo-train") -> TrainConfig:
    """Defaults < YAML file < ablation < command line; then :func:`validate`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(prog)
    # First pass: only to find --config and --ablation and to reject unknown options.
    *groups, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise ConfigError(unknown[0].lstrip("-"), "unknown option (vapo-train --help lists them)")
    first = TrainConfig(*groups)
    given = _command_line_options(argv, prog)
    from_file = _flatten_yaml(first.run.config) if first.run.config else {}
    overrides: dict[str, Any] = dict(from_file)
    # The command line wins, an explicit "none" too (in any spelling argparse accepts).
    ablation = first.run.ablation if "ablation" in given else overrides.get("ablation", "none")
    # Options whose value is the file's: an error in one says so (the file is not on the
    # command line the user is looking at).
    switched = ABLATIONS.get(ablation, {}) if isinstance(ablation, str) else {}
    file_values = set(from_file) - given - set(switched)
    try:
        if not isinstance(ablation, str) or ablation not in ABLATIONS:  # a file's [1] too
            raise ConfigError("ablation", f"unknown ablation {ablation!r}")
        # The file's values as the command line's would be read (argparse converts a
        # string default with the option's type, outside this try, and never checks a
        # default's choices): a wrong type or an unknown choice is one line naming the file.
        overrides.update(_as_parsed(parser, {name: from_file[name] for name in file_values}))
        overrides.update(ABLATIONS[ablation])
        # Re-parse with the file's and the ablation's values as defaults, so the command
        # line still wins over both.
        parser.set_defaults(**overrides)
        config = TrainConfig(*parser.parse_args_into_dataclasses(args=argv))
        validate(config)
    except ConfigError as error:
        if error.option.replace("-", "_") not in file_values:
            raise
        raise ConfigError(error.option, f"{error.message} (set in the --config file "
                          f"{first.run.config})") from None
    config.file_options = frozenset(file_values)
    return config


def _as_parsed(parser: argparse.ArgumentParser, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (option dest: a --config file's value) as ``parser`` reads them on the
    command line: a string through the option's ``type`` (int, float, the bools' yes/no
    reader), then each string checked against the option's ``choices``; a value it refuses
    is a ConfigError naming the option. Values of another type (``steps: 1.5``, a list)
    are left to validate's type check."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        actions.setdefault(action.dest, action)  # --X, not the store_false --no_X
    out = {}
    for name, value in values.items():
        action, option = actions[name], name.replace("_", "-")
        if isinstance(value, str) and callable(action.type):
            try:
                value = action.type(value)
            except argparse.ArgumentTypeError as error:
                raise ConfigError(option, str(error).rstrip(".")) from None
            except (TypeError, ValueError):
                kind = getattr(action.type, "__name__", repr(action.type))
                raise ConfigError(option, f"invalid {kind} value: {value!r}") from None
        if isinstance(value, str) and action.choices and value not in action.choices:
            raise ConfigError(option, f"invalid choice: {value!r} (choose from "
                              f"{', '.join(map(str, action.choices))})")
        out[name] = value
    return out


def _command_line_options(argv: list[str], prog: str = "vapo-train") -> set[str]:
    """The options (dest names) ``argv`` gives, as the trainer's parser reads it:
    abbreviations, dashed spellings and ``--no_X`` included (a value equal to the default
    too)."""
    parser = make_parser(prog)
    unset = object()
    parser.set_defaults(**{name: unset for name in _option_names()})
    namespace, _ = parser.parse_known_args(argv)
    return {name for name, value in vars(namespace).items() if value is not unset}


def validate(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first bad option (before anything is built)."""
    m, t, w, r, a, o, run = (config.model, config.task, config.warmup, config.rollout,
                             config.algorithm, config.optim, config.run)

    def need(ok: bool, option: str, message: str) -> None:
        if not ok:
            raise ConfigError(option.replace("_", "-"), message)

    _check_types(config)

    if m.model:
        need(os.path.isdir(m.model), "model", f"no such model folder: {m.model}")
        need(os.path.isfile(os.path.join(m.model, "config.json")), "model",
             f"{m.model} has no config.json (not a save_pretrained folder)")
    if m.value_model:
        need(os.path.isdir(m.value_model), "value_model", f"no such folder: {m.value_model}")
        need(os.path.isfile(os.path.join(m.value_model, "config.json")), "value_model",
             f"{m.value_model} has no config.json (not a save_pretrained folder)")
    if m.attn_implementation == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise ConfigError("attn-implementation", "flash_attention_2 needs the flash-attn "
                              "package and a GPU; use sdpa") from None
    for name in ("tiny_hidden_size", "tiny_layers", "tiny_heads"):
        need(getattr(m, name) >= 1, name, "must be >= 1")
    need(m.tiny_hidden_size % m.tiny_heads == 0, "tiny_heads", "must divide tiny_hidden_size")
    need((m.tiny_hidden_size // m.tiny_heads) % 2 == 0, "tiny_heads",
         f"each head of tiny_hidden_size / tiny_heads = {m.tiny_hidden_size // m.tiny_heads} "
         "dims must be even (rotary position embeddings pair them)")
    kind = t.task.split(":", 1)[0]
    need(kind in ("running_sum", "jsonl", "reasoning_gym"), "task",
         f"unknown task {t.task!r}: running_sum, jsonl:PATH or reasoning_gym:NAME")
    need(kind != "running_sum" or t.task == "running_sum", "task",
         f"running_sum takes no argument (its options are --modulus, --min_steps, ...), "
         f"got {t.task!r}")
    need(kind == "jsonl" or t.verifier == "exact", "verifier",
         f"applies to jsonl tasks only ({kind} checks its own answers), got {t.verifier!r}")
    if kind == "jsonl":
        path = t.task.split(":", 1)[1] if ":" in t.task else ""
        need(os.path.isfile(path), "task", f"no such jsonl file: {path!r}")
    if kind == "reasoning_gym":
        try:
            import reasoning_gym  # noqa: F401
        except ImportError:
            raise ConfigError("task", "reasoning-gym is not installed "
                              "(pip install 'vapo-kernels[reasoning-gym]')") from None
    need(1 <= t.min_steps <= t.max_steps, "min_steps", "need 1 <= min_steps <= max_steps")
    need(2 <= t.modulus <= 36, "modulus", "must be in [2, 36]")
    need(t.max_new_tokens >= 0, "max_new_tokens", "must be >= 0")
    need(t.eval_size >= 1, "eval_size", "must be >= 1")
    need(w.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    need(0.0 <= w.warmup_target_accuracy <= 1.0, "warmup_target_accuracy", "must be in [0, 1]")
    need(w.warmup_eval_every >= 1, "warmup_eval_every", "must be >= 1")
    need(w.warmup_lr > 0, "warmup_lr", "must be > 0")
    need(w.warmup_batch_size >= 1, "warmup_batch_size", "must be >= 1")
    need(0.0 <= w.demo_slip_prob <= 1.0, "demo_slip_prob", "must be in [0, 1]")
    need(r.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
    need(r.group_size >= 1, "group_size", "must be >= 1")
    if r.group_sampling:
        need(r.group_size >= 2, "group_size",
             f"group sampling needs >= 2 samples per prompt, got {r.group_size} "
             "(--no-group-sampling for one sample per prompt)")
    low, high = TEMPERATURE_RANGE
    need(low <= r.temperature <= high, "temperature", f"must be in [{low:g}, {high:g}]")
    need(r.rollout_is_threshold > 0 and math.isfinite(r.rollout_is_threshold),
         "rollout_is_threshold", "must be a finite float > 0")
    if r.rollout_is_mode == "mask":
        need(r.rollout_is_threshold >= 1, "rollout_is_threshold",
             f"mask mode keeps weights in [1/C, C], empty for C = {r.rollout_is_threshold} < 1")
    need(0 < r.vllm_gpu_memory <= 1, "vllm_gpu_memory", "must be in (0, 1]")
    if r.rollout_engine == "vllm":
        from . import vllm_engine

        problem = vllm_engine.unavailable(run.device)
        need(problem is None, "rollout_engine", f"vllm: {problem}")
        need(int(os.environ.get("WORLD_SIZE", "1")) == 1, "rollout_engine",
             "vllm runs in one process for now; use hf with several processes")
    need(0.0 <= a.gamma <= 1.0, "gamma", "must be in [0, 1]")
    need(0.0 <= a.lam_critic <= 1.0, "lam_critic", "must be in [0, 1]")
    need(0.0 <= a.lam_policy <= 1.0, "lam_policy", "must be in [0, 1]")
    need(a.alpha > 0, "alpha", "must be > 0")
    need(a.clip_low >= 0, "clip_low", "must be >= 0")
    need(a.clip_high >= 0, "clip_high", "must be >= 0")
    need(a.dual_clip == 0 or a.dual_clip > 1, "dual_clip", "must be 0 (off) or > 1")
    need(a.value_clip >= 0, "value_clip", "must be >= 0")
    for name in ("vf_coef", "lm_coef", "kl_coef", "entropy_coef"):
        need(getattr(a, name) >= 0, name, "must be >= 0")
    need(a.value_pretrain_steps >= 0, "value_pretrain_steps", "must be >= 0")
    need(a.mc_samples >= 1, "mc_samples", "must be >= 1")
    need(o.actor_lr > 0, "actor_lr", "must be > 0")
    need(o.critic_lr > 0, "critic_lr", "must be > 0")
    need(o.lr_warmup_steps >= 0, "lr_warmup_steps", "must be >= 0")
    need(o.ppo_epochs >= 1, "ppo_epochs", "must be >= 1")
    need(o.mini_batches >= 1, "mini_batches", "must be >= 1")
    need(config.batch_size % o.mini_batches == 0, "mini_batches",
         f"the batch of {config.batch_size} sequences (prompts_per_step x group_size) does not "
         f"divide into {o.mini_batches} mini-batches")
    mini = config.batch_size // o.mini_batches
    need(o.micro_batch_size >= 0, "micro_batch_size", "must be >= 0")
    if o.micro_batch_size:
        need(mini % o.micro_batch_size == 0, "micro_batch_size",
             f"a mini-batch of {mini} sequences does not divide into micro-batches of "
             f"{o.micro_batch_size}")
    need(o.grad_clip >= 0, "grad_clip", "must be >= 0")
    need(o.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(0 <= run.seed < 2**63, "seed", "must be in [0, 2^63)")
    need(run.steps >= 0, "steps", "must be >= 0")
    need(run.eval_every >= 1, "eval_every", "must be >= 1")
    need(run.device in ("auto", "cpu", "cuda")
         or (run.device.startswith("cuda:") and run.device[5:].isdigit()), "device",
         "cpu, cuda[:N] or auto")
    if run.device.startswith("cuda"):
        import torch

        need(torch.cuda.is_available(), "device", f"{run.device}: no CUDA device here")
        index = int(run.device[5:]) if run.device[5:] else 0
        need(index < torch.cuda.device_count(), "device",
             f"{run.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    need(run.threads >= 0, "threads", "must be >= 0")
    need(o.max_tokens_per_microbatch >= 0, "max_tokens_per_microbatch", "must be >= 0")
    need(o.max_bad_steps >= 1, "max_bad_steps", "must be >= 1")
    need(run.save_every >= 0, "save_every", "must be >= 0")
    need(run.keep >= 0, "keep", "must be >= 0")
    # Checked now (found, not imported: that costs ~0.3 s here): a missing matplotlib used to
    # end a finished run in a traceback.
    need(not run.plots or importlib.util.find_spec("matplotlib") is not None, "plots",
         "curves.png needs matplotlib (pip install matplotlib), or pass --no_plots")
    if run.resume == "auto":
        need(bool(run.output_dir), "resume", "--resume auto needs --output_dir (the run folder "
             "holding checkpoints/)")
    elif run.resume:
        need(os.path.isdir(run.resume), "resume", f"no such checkpoint folder: {run.resume}")
    if run.profile:
        span = parse_profile_steps(run.profile)
        need(span is not None, "profile",
             f"expected STEP or FIRST-LAST (RL steps >= 1), got {run.profile!r}")
        need(span[1] <= run.steps, "profile",
             f"steps {run.profile} lie past the run's last RL step, --steps {run.steps}")


def _check_types(config: TrainConfig) -> None:
    """Every option holds a value of its declared type (a YAML file can hold anything:
    ``steps: 1.5``, ``steps: null``, a list) and floats are finite: one line naming it."""
    for group in dataclasses.fields(config):
        args = getattr(config, group.name)
        hints = typing.get_type_hints(type(args))
        for f in dataclasses.fields(args):
            value, kind = getattr(args, f.name), hints[f.name]
            option = f.name.replace("_", "-")
            if kind is bool:
                ok = isinstance(value, bool)
            elif kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind is float:
                ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                      and math.isfinite(value))
            elif kind is str:
                ok = isinstance(value, str)
            else:
                continue
            if not ok:
                raise ConfigError(option, f"must be a {'finite ' if kind is float else ''}"
                                  f"{kind.__name__}, got {value!r}")


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """'3' -> (3, 3), '3-5' -> (3, 5); None when malformed."""
    first, _, last = text.partition("-")
    try:
        span = (int(first), int(last or first))
    except ValueError:
        return None
    return span if 1 <= span[0] <= span[1] else None


def save_config(config: TrainConfig, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
