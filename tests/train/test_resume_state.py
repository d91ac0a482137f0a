"""What a resume restores besides the policy and value model: the frozen KL reference (the
post-warm-up policy, saved in the checkpoint) and options changed on the command line
(learning rates, weight decay) that the loaded optimizers and schedulers must not undo."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from vapo_kernels.train import vapo
from vapo_kernels.train.cli import main, train
from vapo_kernels.train.config import parse_config

from .conftest import read_rows
from .test_checkpoint import RUN, comparable

KL = ["--kl_coef", "0.5"]


@pytest.fixture(scope="module")
def full_kl_run(tmp_path_factory):
    """A run with a KL reference and a checkpoint at every step, none pruned."""
    run_dir = tmp_path_factory.mktemp("full_kl") / "run"
    threads = torch.get_num_threads()
    try:
        train(parse_config([*RUN, *KL, "--output_dir", str(run_dir), "--save_every", "1",
                            "--keep", "0"]))
    finally:
        torch.set_num_threads(threads)
    return run_dir


def resume_copy(full, name: str, dest) -> str:
    """A run folder holding only checkpoint ``name`` and the run's config and metrics."""
    os.makedirs(dest / "checkpoints")
    shutil.copytree(full / "checkpoints" / name, dest / "checkpoints" / name)
    for f in ("metrics.jsonl", "config.yaml"):
        shutil.copyfile(full / f, dest / f)
    return str(dest)


def resume_argv(run_dir, *extra):
    return [*RUN, *KL, "--output_dir", str(run_dir), "--save_every", "1", "--keep", "0",
            "--resume", "auto", *extra]


@pytest.mark.parametrize("name", ["2-rl-00000000", "2-rl-00000002", "1-value_pretrain-00000001"])
def test_resume_with_a_kl_reference_continues_exactly(tmp_path, full_kl_run, name):
    # The reference was deep-copied from the freshly built policy before the checkpoint
    # loaded: a resumed run's KL pulled towards the random initialisation.
    run_dir = resume_copy(full_kl_run, name, tmp_path / "res")
    train(parse_config(resume_argv(run_dir)))
    assert comparable(read_rows(run_dir)) == comparable(read_rows(full_kl_run))


def _as_old_checkpoint(path) -> None:
    """meta.json as vapo-train wrote it before the reference was saved."""
    meta_path = os.path.join(path, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["models"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)


def test_an_old_checkpoint_without_reference(tmp_path, full_kl_run, capsys):
    # Before any RL update the policy still is the post-warm-up one: rebuilt from it, exact.
    run_dir = resume_copy(full_kl_run, "2-rl-00000000", tmp_path / "early")
    _as_old_checkpoint(os.path.join(run_dir, "checkpoints", "2-rl-00000000"))
    train(parse_config(resume_argv(run_dir)))
    assert comparable(read_rows(run_dir)) == comparable(read_rows(full_kl_run))
    # After RL updates it cannot be: one error line, never a silently wrong reference.
    run_dir = resume_copy(full_kl_run, "2-rl-00000002", tmp_path / "late")
    _as_old_checkpoint(os.path.join(run_dir, "checkpoints", "2-rl-00000002"))
    capsys.readouterr()
    assert main(resume_argv(run_dir)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no KL reference" in err[0], err


def test_changed_learning_rates_and_weight_decay_hold_on_resume(tmp_path, full_kl_run,
                                                                 monkeypatch, capsys):
    # Announced as "resuming with a changed option", recorded in config.yaml, but the
    # loaded param_groups and the schedulers' base_lrs put the old values back.
    seen = []
    update = vapo.ppo_update

    def spy(state, *args, **kwargs):
        for name in ("actor", "critic"):
            optimizer = getattr(state, f"{name}_optimizer")
            scheduler = getattr(state, f"{name}_scheduler")
            seen.append((name, state.step, scheduler.last_epoch, list(scheduler.base_lrs),
                         [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]))
        return update(state, *args, **kwargs)

    monkeypatch.setattr(vapo, "ppo_update", spy)
    run_dir = resume_copy(full_kl_run, "2-rl-00000002", tmp_path / "res")
    train(parse_config(resume_argv(run_dir, "--actor_lr", "0.01", "--critic_lr", "0.005",
                                   "--weight_decay", "0.1")))
    assert "resuming with a changed option: actor_lr" in capsys.readouterr().out
    assert [s[:2] for s in seen] == [("actor", 3), ("critic", 3), ("actor", 4), ("critic", 4)]
    for name, _, epoch, base_lrs, groups in seen:
        base = 0.01 if name == "actor" else 0.005
        assert base_lrs == [base]
        # the schedule continues (linear warm-up over 3 optimizer steps) from the new base
        assert groups == [(base * min(1.0, (epoch + 1) / 4), 0.1)]
    assert seen[0][2] > 0  # resumed mid-schedule, not restarted


def test_a_changed_lr_warmup_holds_from_the_first_resumed_step(tmp_path, full_kl_run,
                                                               monkeypatch):
    # Only the schedule changes: the loaded rate was the old schedule's for one step.
    seen = []
    update = vapo.ppo_update

    def spy(state, *args, **kwargs):
        scheduler = state.actor_scheduler
        seen.append((scheduler.last_epoch, scheduler.base_lrs[0],
                     state.actor_optimizer.param_groups[0]["lr"]))
        return update(state, *args, **kwargs)

    monkeypatch.setattr(vapo, "ppo_update", spy)
    run_dir = resume_copy(full_kl_run, "2-rl-00000002", tmp_path / "res")
    train(parse_config(resume_argv(run_dir, "--lr_warmup_steps", "10")))
    epoch, base, lr = seen[0]
    assert epoch > 0 and lr == base * min(1.0, (epoch + 1) / 11)
