"""Kill-safe checkpoints of a run (``--save_every``, ``--keep``, ``--resume``).

A checkpoint is a folder ``RUN/checkpoints/<order>-<phase>-<step>`` holding

* ``dcp/``: policy, value model, their optimizers and the frozen KL reference (the
  post-warm-up policy, with ``--kl_coef``), written with
  ``torch.distributed.checkpoint`` (each process writes its own FSDP shards; a single
  process writes the whole tensors, no process group needed);
* ``rank<r>.pt``: what is private to each process: every random generator in use (the
  task's ``random.Random``, the mini-batch shuffle generator, the global torch / CUDA /
  Python / NumPy generators), the learning-rate schedulers, the phase and step counter,
  the last evaluation;
* ``metrics.jsonl``: the metric rows logged up to this point (resuming rewrites the run's
  metrics file with them, so rows continue with no step duplicated or missing);
* ``hf/policy`` and ``hf/value``: ``save_pretrained`` exports with the tokenizer;
* ``meta.json`` (phase, step, world size, parameter shapes) and last the ``COMPLETE`` marker.

Everything is written into a hidden ``.tmp-`` folder that is renamed into place only when
complete, so a process killed while saving leaves the previous checkpoint the latest.

Checkpoints are taken at the start of each phase after its setup (``<phase>-0``), every
``save_every`` steps of a phase, and after the last RL step; a resumed run continues after
the checkpoint's step, or with the phase's first step when it is the phase's start.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .config import ConfigError

PHASES = ("warmup", "value_pretrain", "rl")
COMPLETE = "COMPLETE"
SUBDIR = "checkpoints"
SCHEDULERS = ("actor_scheduler", "critic_scheduler")


@dataclass
class CheckpointInfo:
    """What ``meta.json`` says about a complete checkpoint."""

    path: str
    phase: str
    step: int
    world_size: int
    shapes: dict[str, dict[str, list[int]]]
    optimizers: list[str]
    models: list[str] | None = None  # the models in dcp/ (None: written before this was kept)

    @property
    def order(self) -> tuple[int, int]:
        return PHASES.index(self.phase), self.step


def folder_name(phase: str, step: int) -> str:
    """Sorts by (phase order, step): the lexicographically last complete folder is the latest."""
    return f"{PHASES.index(phase)}-{phase}-{step:08d}"


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def complete_checkpoints(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, SUBDIR)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if not n.startswith("."))
    return [os.path.join(root, n) for n in names if is_complete(os.path.join(root, n))]


def read_info(path: str) -> CheckpointInfo:
    if not is_complete(path):
        raise ConfigError("resume", f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    return CheckpointInfo(path, meta["phase"], meta["step"], meta["world_size"], meta["shapes"],
                          meta["optimizers"], meta.get("models"))


def find_resume(run_dir: str, resume: str) -> CheckpointInfo | None:
    """The checkpoint ``--resume`` names: 'auto' -> the latest complete one in the run folder
    (None when there is none), else the given folder (which must be complete)."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return read_info(found[-1]) if found else None
    return read_info(resume)


def parameter_shapes(model: torch.nn.Module | None) -> dict[str, list[int]]:
    # DTensor (FSDP2) parameters report their global shape, so the shapes do not depend
    # on the world size.
    return {} if model is None else {n: list(p.shape) for n, p in model.named_parameters()}


def check_compatible(info: CheckpointInfo, state, world_size: int) -> None:
    """One clear error (ConfigError -> one line) when the checkpoint cannot fit this run."""
    if info.world_size != world_size:
        raise ConfigError("resume", f"{info.path} was written by {info.world_size} process(es), "
                          f"this run has {world_size}: resume with the same --nproc-per-node "
                          "(the per-process random generators and data shards do not reshard)")
    for name, model in (("policy", state.policy), ("value", state.value_model)):
        saved = info.shapes.get(name, {})
        if model is None or not saved:
            continue
        ours = parameter_shapes(model)
        if saved != ours:
            diff = sorted(set(saved) ^ set(ours)) or [
                k for k in sorted(saved) if saved[k] != ours[k]]
            key = diff[0]
            raise ConfigError("resume", f"{info.path} holds a {name} of another shape than this "
                              f"run's ({key}: checkpoint {saved.get(key)}, this run "
                              f"{ours.get(key)}); resume with the run's own config.yaml")


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group that it assumes one process: we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _models_and_optimizers(state, reference: bool = True) -> list[tuple[str, torch.nn.Module, Any]]:
    """(name, model, its optimizer or None) of the models that exist at this point; the
    frozen KL reference too (``reference``): after RL updates it can no longer be rebuilt
    from the policy, so it is saved with the rest."""
    pairs = [("policy", state.policy, state.actor_optimizer or state.warmup_optimizer)]
    if state.value_model is not None:
        pairs.append(("value", state.value_model, state.critic_optimizer))
    if reference and getattr(state, "reference", None) is not None:
        pairs.append(("reference", state.reference, None))
    return pairs


def optimizers_with_state(state) -> list[str]:
    """Models whose optimizer has stepped. A fresh optimizer is not saved: reading its state
    dict would initialise it with a zero-gradient step (step count 1), and a run that saves
    must compute exactly what a run that does not save computes."""
    return [name for name, _, optimizer in _models_and_optimizers(state)
            if optimizer is not None and optimizer.state]


def _sharded_state(state, with_optimizer: list[str], reference: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, model, optimizer in _models_and_optimizers(state, reference):
        if name in with_optimizer:
            model_sd, optim_sd = get_state_dict(model, [optimizer])
            out[f"{name}_optim"] = optim_sd
        else:
            model_sd = get_model_state_dict(model)
        out[f"{name}_model"] = model_sd
    return out


def process_rng_state() -> dict[str, Any]:
    """The process-wide random generators: Python's, NumPy's, torch's CPU and CUDA ones."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_process_rng_state(saved: dict[str, Any]) -> None:
    """Put back what :func:`process_rng_state` returned."""
    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def _private_state(state) -> dict[str, Any]:
    return {
        **process_rng_state(),
        "task_rng": state.task_rng.getstate(),
        "shuffle_generator": state.shuffle_generator.get_state(),
        "phase": state.phase,
        "step": state.step,
        "last_eval": state.last_eval,
        "post_warmup_eval": state.post_warmup_eval,
        "bad_steps": state.bad_steps,
        "schedulers": {name: getattr(state, name).state_dict() for name in SCHEDULERS
                       if getattr(state, name) is not None},
    }


def _restore_private(state, saved: dict[str, Any]) -> None:
    set_process_rng_state(saved)
    state.task_rng.setstate(saved["task_rng"])
    state.shuffle_generator.set_state(saved["shuffle_generator"])
    state.phase, state.step = saved["phase"], saved["step"]
    state.last_eval, state.post_warmup_eval = saved["last_eval"], saved["post_warmup_eval"]
    state.bad_steps = saved["bad_steps"]
    for name, scheduler_state in saved["schedulers"].items():
        getattr(state, name).load_state_dict(scheduler_state)


def export_pretrained(folder: str, model: torch.nn.Module, tokenizer, dp) -> None:
    """``save_pretrained`` of the full (unsharded) model with its tokenizer, by rank 0."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    if dp.is_main:
        os.makedirs(folder, exist_ok=True)
        model.save_pretrained(folder, state_dict=full)
        tokenizer.save_pretrained(folder)


class Checkpointer:
    """Saves a run's checkpoints (every process calls :meth:`save`; rank 0 does the renames)."""

    def __init__(self, run_dir: str, *, save_every: int, keep: int, metrics_path: str, dp):
        self.root = os.path.join(run_dir, SUBDIR)
        self.save_every, self.keep = save_every, keep
        self.metrics_path, self.dp = metrics_path, dp
        self.last_saved: str | None = None

    @property
    def enabled(self) -> bool:
        return self.save_every > 0

    def due(self, step: int) -> bool:
        return self.enabled and (step == 0 or step % self.save_every == 0)

    def save(self, state) -> str:
        dp = self.dp
        name = folder_name(state.phase, state.step)
        final = os.path.join(self.root, name)
        tmp = os.path.join(self.root, f".tmp-{name}")
        if dp.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dp.barrier()
        with_optimizer = optimizers_with_state(state)
        with _quiet_single_process():
            # no_dist on one process: vLLM in this process makes a process group of its own
            dcp.save(_sharded_state(state, with_optimizer), checkpoint_id=os.path.join(tmp, "dcp"),
                     process_group=dp.group, no_dist=not dp.distributed)
        torch.save(_private_state(state), os.path.join(tmp, f"rank{dp.rank}.pt"))
        for sub, model in (("policy", state.policy), ("value", state.value_model)):
            if model is not None:
                export_pretrained(os.path.join(tmp, "hf", sub), model, state.tokenizer, dp)
        dp.barrier()
        if dp.is_main:
            shutil.copyfile(self.metrics_path, os.path.join(tmp, "metrics.jsonl"))
            meta = {"phase": state.phase, "step": state.step, "world_size": dp.world_size,
                    "optimizers": with_optimizer,
                    "models": [name for name, _, _ in _models_and_optimizers(state)],
                    "shapes": {"policy": parameter_shapes(state.policy),
                               "value": parameter_shapes(state.value_model)}}
            with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                json.dump(meta, f)
            with open(os.path.join(tmp, COMPLETE), "w", encoding="utf-8") as f:
                f.write("complete\n")
            if os.path.isdir(final):  # an older run's checkpoint at the same point (--resume PATH)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        dp.barrier()
        self.last_saved = final
        return final

    def _prune(self) -> None:
        for name in os.listdir(self.root):
            if name.startswith(".tmp-"):  # left by a process killed while saving
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        if self.keep:
            for old in complete_checkpoints(os.path.dirname(self.root))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)


def load(info: CheckpointInfo, state, dp) -> None:
    """Restore ``state`` in place from ``info`` (its models and optimizers must exist already,
    built as the run builds them at that point)."""
    check_compatible(info, state, dp.world_size)
    saved_reference = "reference" in (info.models or ())
    rebuild_reference = getattr(state, "reference", None) is not None and not saved_reference
    if rebuild_reference and not (info.phase == "value_pretrain"
                                  or (info.phase == "rl" and info.step == 0)):
        raise ConfigError("resume", f"{info.path} holds no KL reference model (it was written "
                          "with --kl_coef 0 or by an older vapo-train), and after RL updates "
                          "the post-warm-up policy cannot be rebuilt from the policy: resume "
                          "from the run's value_pretrain or rl step-0 checkpoint, or with "
                          "--kl_coef 0")
    target = _sharded_state(state, info.optimizers, reference=saved_reference)
    with _quiet_single_process():
        dcp.load(target, checkpoint_id=os.path.join(info.path, "dcp"), process_group=dp.group,
                 no_dist=not dp.distributed)
    if rebuild_reference:  # no RL update yet: the policy still is the post-warm-up one
        target["reference_model"] = target["policy_model"]
    for name, model, optimizer in _models_and_optimizers(state):
        if name in info.optimizers:
            set_state_dict(model, [optimizer], model_state_dict=target[f"{name}_model"],
                           optim_state_dict=target[f"{name}_optim"])
        else:
            set_model_state_dict(model, target[f"{name}_model"])
    private = os.path.join(info.path, f"rank{dp.rank}.pt")
    _restore_private(state, torch.load(private, weights_only=False))


def restore_metrics(info: CheckpointInfo, metrics_path: str, dp) -> int:
    """Rewrite the run's metrics file with the checkpoint's rows; returns their count."""
    saved = os.path.join(info.path, "metrics.jsonl")
    if dp.is_main:
        shutil.copyfile(saved, metrics_path)
    dp.barrier()
    with open(saved, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())
