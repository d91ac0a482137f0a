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
* ``meta.json`` (phase, step, world size, parameter shapes, the run's resolved config, the
  size of every other file) and last the ``COMPLETE`` marker.

Everything is written into a hidden ``.tmp-`` folder, fsynced, marked ``COMPLETE`` and only
then renamed into place (the checkpoints folder fsynced after the rename), so a process
killed (or a machine losing power) while saving leaves the previous checkpoint the latest.
At resume every file is checked against the sizes in ``meta.json`` (a size check, no
hashing: cheap for multi-GB checkpoints, and it catches the truncation a crash or a full
disk leaves); ``--resume auto`` falls back to the previous complete checkpoint when the
latest is damaged.

A run resumed from a checkpoint that is not the folder's latest moves the later ones (the
abandoned continuation) into ``checkpoints-set-aside-<time>/``: they are never picked by a
later ``--resume auto`` nor pruned, and never deleted. ``--keep`` prunes by the run's own
history (the checkpoints before the resume point, then its own saves).

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
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
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
SET_ASIDE = "checkpoints-set-aside-"  # + time: later checkpoints of an abandoned continuation


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions): the message names the
    file, the reason and the last good checkpoint; the CLI prints it as one line (exit 3).

    ``on_every_process``: every process of the group raised this same message (a failure
    carried by :func:`_on_every_process` or gathered by DCP), so under torchrun one of them
    (rank 0) says it; False: this process's own, said where it was raised."""

    def __init__(self, message: str, on_every_process: bool = False):
        super().__init__(message)
        self.on_every_process = on_every_process


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
    config: dict | None = None  # the run's resolved config (None: written before it was kept)
    files: dict[str, int] | None = None  # relative path -> size (None: likewise)

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


def _damaged(path: str, what: str) -> ConfigError:
    return ConfigError("resume", f"checkpoint {path} is damaged: {what}")


def read_info(path: str) -> CheckpointInfo:
    if not is_complete(path):
        raise ConfigError("resume", f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        return CheckpointInfo(path, meta["phase"], int(meta["step"]), int(meta["world_size"]),
                              meta["shapes"], meta["optimizers"], meta.get("models"),
                              meta.get("config"), meta.get("files"))
    except FileNotFoundError:
        raise _damaged(path, "meta.json is missing") from None
    except OSError as error:
        raise _damaged(path, f"meta.json cannot be read ({error.strerror or error})") from None
    except (ValueError, KeyError, TypeError) as error:  # truncated JSON, a missing field
        raise _damaged(path, f"meta.json is truncated or invalid ({type(error).__name__}: "
                       f"{error})") from None


def verify(info: CheckpointInfo) -> None:
    """Every file the checkpoint needs is there, with the size it was written with (the
    sizes in meta.json; a checkpoint written before they were kept: present and not empty).
    Cheap: no file is read."""
    expected = info.files
    if expected is None:
        expected = {os.path.join("dcp", ".metadata"): -1, "metrics.jsonl": -1,
                    **{f"rank{r}.pt": -1 for r in range(info.world_size)}}
    for rel, size in expected.items():
        full = os.path.join(info.path, rel)
        try:
            actual = os.path.getsize(full)
        except OSError:
            raise _damaged(info.path, f"{rel} is missing") from None
        if size >= 0 and actual != size:
            raise _damaged(info.path, f"{rel} has {actual} bytes, {size} were written "
                           "(truncated or overwritten)")
        if size < 0 and actual == 0 and rel != "metrics.jsonl":
            raise _damaged(info.path, f"{rel} is empty")


def checkpoints_folder(run_dir: str) -> str:
    """RUN/checkpoints, which must be a folder when it exists."""
    root = os.path.join(run_dir, SUBDIR)
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError("output-dir", f"{root} is a file, not the run's checkpoints folder: "
                          "move it away or choose another --output_dir")
    return root


def find_resume(run_dir: str, resume: str, warn=None) -> CheckpointInfo | None:
    """The checkpoint ``--resume`` names: 'auto' -> the latest complete one in the run folder
    (None when there is none; a damaged one is skipped for the one before it, said through
    ``warn``), else the given folder (which must be complete and intact)."""
    if not resume:
        return None
    if resume != "auto":
        info = read_info(resume)
        verify(info)
        return info
    found = complete_checkpoints(run_dir)
    first_error = None
    for path in reversed(found):
        try:
            info = read_info(path)
            verify(info)
        except ConfigError as error:
            first_error = first_error or error
            if warn is not None:
                warn(f"{error.message}; falling back to the checkpoint before it")
            continue
        return info
    if first_error is not None:
        raise ConfigError("resume", f"no intact checkpoint in {os.path.join(run_dir, SUBDIR)} "
                          f"(the latest: {first_error.message})")
    return None


def set_aside_later(run_dir: str, info: CheckpointInfo) -> tuple[str | None, list[str]]:
    """Move what would be newer than the resume point out of RUN/checkpoints: the later
    checkpoints of the run being resumed (an abandoned continuation), or all of them when
    the resumed checkpoint is another folder's. Returns (where they went, their names)."""
    root = os.path.join(run_dir, SUBDIR)
    if not os.path.isdir(root):
        return None, []
    inside = os.path.realpath(os.path.dirname(info.path)) == os.path.realpath(root)
    own = os.path.basename(info.path)
    later = [n for n in sorted(os.listdir(root))
             if not n.startswith(".") and not (inside and n <= own)]
    if not later:
        return None, []
    aside = os.path.join(run_dir, SET_ASIDE + time.strftime("%Y%m%d-%H%M%S"))
    base, n = aside, 1
    while os.path.exists(aside):
        n += 1
        aside = f"{base}-{n}"
    os.makedirs(aside)
    for name in later:
        os.rename(os.path.join(root, name), os.path.join(aside, name))
    _fsync(aside)
    _fsync(root)
    _fsync(run_dir)
    return aside, later


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


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole (unsharded) state dict on rank 0, empty on the others; every
    process calls this (a collective under FSDP2)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def save_pretrained(folder: str, model: torch.nn.Module, weights: dict, tokenizer) -> None:
    """``save_pretrained`` of the model with ``weights`` (:func:`full_weights`) and of its
    tokenizer (rank 0)."""
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, state_dict=weights)
    tokenizer.save_pretrained(folder)


def export_pretrained(folder: str, model: torch.nn.Module, tokenizer, dp) -> None:
    """``save_pretrained`` of the full (unsharded) model with its tokenizer, by rank 0."""
    weights = full_weights(model)
    if dp.is_main:
        save_pretrained(folder, model, weights, tokenizer)


def _fsync(path: str) -> None:
    """fsync a file or a folder (a folder's: its entries, so a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(top: str) -> None:
    """fsync every file under ``top``, then every folder (deepest first)."""
    for folder, _, files in os.walk(top, topdown=False):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder)


def _file_sizes(top: str) -> dict[str, int]:
    return {os.path.relpath(os.path.join(folder, name), top):
            os.path.getsize(os.path.join(folder, name))
            for folder, _, files in os.walk(top) for name in files}


def _unwrapped(error: BaseException) -> BaseException:
    """The exception DCP wrapped in a CheckpointException (an OSError, ...; else ``error``
    itself); a KeyboardInterrupt it wrapped (Ctrl-C mid-write) is raised as one."""
    inner = error
    if isinstance(error, CheckpointException):
        for failure in error.failures.values():
            candidate = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(candidate, BaseException):
                inner = candidate
                break
    if isinstance(inner, KeyboardInterrupt):
        raise KeyboardInterrupt from None
    return inner


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError):
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror or error}{where}"
    return f"{type(error).__name__}: {error}".splitlines()[0]


class _WriteFailed(Exception):
    """A part of a save failed on some process; the message is that process's reason."""


@contextlib.contextmanager
def _on_every_process(dp, what: str):
    """Around a part of a save that only writes files (no collective inside), then a
    barrier that carries failures: an error in it on any process raises the same
    :class:`_WriteFailed` (the failing process's reason) on every process. A process
    failing alone left the others waiting for it in the save's next collective (a barrier,
    FSDP's gather of the full weights) until it exited, or until the collective's timeout.
    ``what``: the file(s) the part writes, named in the reason when the error names no file
    (torch.save reports a full disk as a RuntimeError).

    An error other than an OSError or a RuntimeError (what a failed write raises) is a bug
    in the code writing (a TypeError from json.dump, an AttributeError): the failing process
    prints its traceback first, then stops with the others as for a failed write (it still
    meets them here, so none waits)."""
    failure = None
    try:
        yield
    except Exception as error:  # only file writes inside: whatever they raise, the write failed
        failure = _reason(error)
        if not getattr(error, "filename", None):
            failure = f"{what}: {failure}"
        if not isinstance(error, (OSError, RuntimeError)):
            where = f"rank {dp.rank}: " if dp.distributed else ""
            print(f"vapo-train: {where}unexpected error while writing {what} (a bug, not a "
                  "failed write: please report it with this traceback):", file=sys.stderr)
            traceback.print_exception(error, file=sys.stderr)
            sys.stderr.flush()
    failure = dp.first_failure(failure)
    if failure is not None:
        raise _WriteFailed(failure)


def publish(tmp: str, final: str) -> None:
    """Rename the complete ``tmp`` to ``final``. An existing ``final`` (an earlier save at the
    same point) is renamed aside to ``.old-<name>`` first and deleted only after: a crash in
    between leaves it there, whole, and :func:`recover` puts it back."""
    root = os.path.dirname(final)
    old = None
    if os.path.lexists(final):
        old = os.path.join(root, f".old-{os.path.basename(final)}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover(root: str) -> None:
    """Put back a ``.old-<name>`` checkpoint whose replacement never arrived (a crash between
    the two renames of :func:`publish`)."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith(".old-"):
            final = os.path.join(root, name[len(".old-"):])
            if not os.path.lexists(final) and is_complete(os.path.join(root, name)):
                os.replace(os.path.join(root, name), final)


class Checkpointer:
    """Saves a run's checkpoints (every process calls :meth:`save`; rank 0 does the renames).

    ``history``: the run's complete checkpoints before this process's first save (a resumed
    run: those up to the resume point); :meth:`_prune` keeps the last ``keep`` of the history
    and this process's saves, in that order, and deletes nothing else."""

    def __init__(self, run_dir: str, *, save_every: int, keep: int, metrics_path: str, dp,
                 config: dict | None = None):
        self.root = os.path.join(run_dir, SUBDIR)
        self.save_every, self.keep = save_every, keep
        self.metrics_path, self.dp = metrics_path, dp
        self.config = config
        self.history: list[str] = []  # a resumed run's: set by the trainer (continue_run)
        self.last_saved: str | None = None

    @property
    def enabled(self) -> bool:
        return self.save_every > 0

    def due(self, step: int) -> bool:
        return self.enabled and (step == 0 or step % self.save_every == 0)

    def last_good(self) -> str:
        good = self.last_saved or (self.history[-1] if self.history else None)
        return good or "none"

    def save(self, state) -> str:
        dp = self.dp
        name = folder_name(state.phase, state.step)
        final = os.path.join(self.root, name)
        tmp = os.path.join(self.root, f".tmp-{name}")
        try:
            self._write(state, tmp, final)
        except KeyboardInterrupt:
            self._discard(tmp)
            raise
        # A write failed on some process, raised on every process (_WriteFailed; DCP's
        # CheckpointException wraps its writers' errors); OSError: disk full, no
        # permission, a file where a folder goes.
        except (_WriteFailed, CheckpointException, OSError) as error:
            self._discard(tmp)
            reason = str(error) if isinstance(error, _WriteFailed) else _reason(_unwrapped(error))
            # The same on every process: the failing one's reason, the run folder and the
            # last good checkpoint (every process sets last_saved and the history alike).
            raise CheckpointWriteError(
                f"could not write checkpoint {final}: {reason}; last good checkpoint: "
                f"{self.last_good()}", on_every_process=dp.distributed and isinstance(
                    error, (_WriteFailed, CheckpointException))) from None
        if dp.is_main:  # the others go on: they have passed the save's last barrier
            if final in self.history:
                self.history.remove(final)
            self.history.append(final)
            self._prune()
        self.last_saved = final
        return final

    def _discard(self, tmp: str) -> None:
        if self.dp.is_main:
            shutil.rmtree(tmp, ignore_errors=True)

    def _write(self, state, tmp: str, final: str) -> None:
        """Every process writes its part into ``tmp``, then rank 0 completes it and renames
        it to ``final``. Each part that writes files ends in a barrier that carries failures
        (:func:`_on_every_process`), so no process goes on into a collective while another
        has failed."""
        dp = self.dp
        with _on_every_process(dp, tmp):
            if dp.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
        with_optimizer = optimizers_with_state(state)
        with _quiet_single_process():
            # DCP gathers its writers' results: a failure on one process raises on all.
            # no_dist on one process: vLLM in this process makes a process group of its own
            dcp.save(_sharded_state(state, with_optimizer), checkpoint_id=os.path.join(tmp, "dcp"),
                     process_group=dp.group, no_dist=not dp.distributed)
        private = _private_state(state)
        with _on_every_process(dp, f"rank{dp.rank}.pt"):
            torch.save(private, os.path.join(tmp, f"rank{dp.rank}.pt"))
        for sub, model in (("policy", state.policy), ("value", state.value_model)):
            if model is not None:
                weights = full_weights(model)  # a collective: outside the parts that write
                with _on_every_process(dp, f"hf/{sub}"):
                    if dp.is_main:
                        save_pretrained(os.path.join(tmp, "hf", sub), model, weights,
                                        state.tokenizer)
        with _on_every_process(dp, "meta.json, COMPLETE"):
            if dp.is_main:
                self._complete(state, tmp, final, with_optimizer)

    def _complete(self, state, tmp: str, final: str, with_optimizer: list[str]) -> None:
        """Rank 0, once every process has written its part: the metric rows, meta.json, the
        COMPLETE marker, then the rename into place."""
        dp = self.dp
        shutil.copyfile(self.metrics_path, os.path.join(tmp, "metrics.jsonl"))
        meta = {"phase": state.phase, "step": state.step, "world_size": dp.world_size,
                "optimizers": with_optimizer,
                "models": [name for name, _, _ in _models_and_optimizers(state)],
                "shapes": {"policy": parameter_shapes(state.policy),
                           "value": parameter_shapes(state.value_model)},
                "config": self.config, "files": _file_sizes(tmp)}
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
        # Durable before it is marked complete: every file and folder, then the marker, then
        # the rename, then the folder holding the rename.
        _fsync_tree(tmp)
        marker = os.path.join(tmp, COMPLETE)
        with open(marker, "w", encoding="utf-8") as f:
            f.write("complete\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        publish(tmp, final)

    def _prune(self) -> None:
        recover(self.root)
        for name in os.listdir(self.root):
            if name.startswith((".tmp-", ".old-")):  # left by a process killed while saving
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        if self.keep:
            for old in self.history[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            self.history = self.history[-self.keep:]


def load(info: CheckpointInfo, state, dp) -> None:
    """Restore ``state`` in place from ``info`` (its models and optimizers must exist already,
    built as the run builds them at that point). A file that cannot be read is one error
    naming the checkpoint and the file."""
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
    try:
        with _quiet_single_process():
            dcp.load(target, checkpoint_id=os.path.join(info.path, "dcp"),
                     process_group=dp.group, no_dist=not dp.distributed)
    except CheckpointException as error:
        raise _damaged(info.path, f"dcp/ cannot be read ({_reason(_unwrapped(error))})") from None
    except KeyboardInterrupt:
        raise
    except Exception as error:  # an emptied .metadata: EOFError / UnpicklingError, ...
        raise _damaged(info.path, f"dcp/ cannot be read ({_reason(error)})") from None
    if rebuild_reference:  # no RL update yet: the policy still is the post-warm-up one
        target["reference_model"] = target["policy_model"]
    for name, model, optimizer in _models_and_optimizers(state):
        if name in info.optimizers:
            set_state_dict(model, [optimizer], model_state_dict=target[f"{name}_model"],
                           optim_state_dict=target[f"{name}_optim"])
        else:
            set_model_state_dict(model, target[f"{name}_model"])
    private = f"rank{dp.rank}.pt"
    try:
        saved = torch.load(os.path.join(info.path, private), weights_only=False)
    except KeyboardInterrupt:
        raise
    except Exception as error:
        raise _damaged(info.path, f"{private} cannot be read ({_reason(error)})") from None
    _restore_private(state, saved)


def restore_metrics(info: CheckpointInfo, metrics_path: str, dp) -> list[dict]:
    """Replace the run's metrics file with the checkpoint's rows (atomically: a temporary file
    renamed over it); returns the rows."""
    saved = os.path.join(info.path, "metrics.jsonl")
    try:
        with open(saved, encoding="utf-8") as f:
            text = f.read()
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError) as error:
        raise _damaged(info.path, f"metrics.jsonl cannot be read ({_reason(error)})") from None
    if dp.is_main:
        tmp = f"{metrics_path}.tmp-resume"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, metrics_path)
        _fsync(os.path.dirname(os.path.abspath(metrics_path)))
    dp.barrier()
    return rows
