"""Checkpoint / resume: a run killed with SIGKILL and resumed computes exactly what an
uninterrupted run computes (CPU, fixed seed), across every phase boundary; bad checkpoints
give one error line."""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

from vapo_kernels.train import checkpoint
from vapo_kernels.train.cli import main, train
from vapo_kernels.train.config import parse_config

from .conftest import read_rows, tiny_argv

# Long enough to be killed in the middle: 4 warm-up, 2 value-pretraining, 4 RL steps.
# One thread: the same float reductions in the test process and in the subprocesses.
RUN = [*tiny_argv(drop=("--steps", "--value_pretrain_steps")), "--steps", "4",
       "--value_pretrain_steps", "2", "--threads", "1", "--no_save_checkpoint"]
NOT_COMPARED = ("elapsed_s", "since_warmup_s", "peak_rss_mb", "peak_cuda_memory_mb")


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in NOT_COMPARED and not k.startswith("time_")}
            for r in rows]


def command(run_dir, *extra):
    return [sys.executable, "-m", "vapo_kernels.train", *RUN, "--output_dir", str(run_dir), *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: one run with a checkpoint at every step, none pruned (in this process:
    the killed run is a subprocess, its resumption again here)."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    threads = torch.get_num_threads()
    try:
        train(parse_config([*RUN, "--output_dir", str(run_dir), "--save_every", "1",
                            "--keep", "0"]))
    finally:
        torch.set_num_threads(threads)
    return run_dir


def test_checkpoints_at_phase_starts_every_step_and_the_end(uninterrupted):
    names = [os.path.basename(p) for p in checkpoint.complete_checkpoints(uninterrupted)]
    assert names == (["0-warmup-00000000"] + [f"0-warmup-{s:08d}" for s in (1, 2, 3)]
                     + [f"1-value_pretrain-{s:08d}" for s in (0, 1, 2)]
                     + [f"2-rl-{s:08d}" for s in range(5)])
    last = os.path.join(uninterrupted, "checkpoints", names[-1])
    # The Hugging Face export of each checkpoint loads on its own (tokenizer beside it).
    AutoModelForCausalLM.from_pretrained(os.path.join(last, "hf", "policy"))
    AutoModelForTokenClassification.from_pretrained(os.path.join(last, "hf", "value"))
    # Its metric rows are the run's rows up to it (the end: all of them).
    with open(os.path.join(last, "metrics.jsonl")) as f:
        assert [json.loads(line) for line in f] == read_rows(uninterrupted)


def test_sigkill_at_a_random_moment_then_resume_equals_uninterrupted(tmp_path, uninterrupted,
                                                                     capsys):
    run_dir = tmp_path / "run"
    delay = random.Random().uniform(0.0, 1.5)
    proc = subprocess.Popen(command(run_dir, "--save_every", "1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not checkpoint.complete_checkpoints(run_dir) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = [os.path.basename(p) for p in checkpoint.complete_checkpoints(run_dir)]
    train(parse_config([*RUN, "--output_dir", str(run_dir), "--save_every", "1",
                        "--resume", "auto"]))
    assert "resuming from" in capsys.readouterr().out, (delay, killed_at)
    assert comparable(read_rows(run_dir)) == comparable(read_rows(uninterrupted)), (
        delay, killed_at)
    with_step = [(r["phase"], r["step"]) for r in read_rows(run_dir)]
    assert len(with_step) == len(set(with_step))  # no step twice


@pytest.mark.parametrize("boundary", ["1-value_pretrain-00000000", "2-rl-00000000",
                                      "0-warmup-00000002"])
def test_resume_exactly_at_a_phase_boundary(tmp_path, uninterrupted, boundary):
    """Killed right after the checkpoint at the start of value pretraining / RL (and mid
    warm-up): the resumed run runs the whole next phase, nothing skipped or repeated. The
    run folder still has the killed run's later rows: they are replaced."""
    run_dir = tmp_path / "run"
    os.makedirs(run_dir / "checkpoints")
    shutil.copytree(uninterrupted / "checkpoints" / boundary, run_dir / "checkpoints" / boundary)
    shutil.copy(uninterrupted / "metrics.jsonl", run_dir / "metrics.jsonl")
    # A later checkpoint the killed process was writing when it died: never the latest.
    os.makedirs(run_dir / "checkpoints" / ".tmp-2-rl-00000003" / "dcp")
    train(parse_config([*RUN, "--output_dir", str(run_dir), "--save_every", "1",
                        "--resume", "auto"]))
    assert comparable(read_rows(run_dir)) == comparable(read_rows(uninterrupted))
    assert not os.path.exists(run_dir / "checkpoints" / ".tmp-2-rl-00000003")


def test_keep_prunes_and_a_half_written_checkpoint_is_ignored(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoints", run_dir / "checkpoints")
    incomplete = run_dir / "checkpoints" / "3-zzz-00000000"  # sorts last, but no marker
    os.makedirs(incomplete)
    assert checkpoint.find_resume(str(run_dir), "auto").path.endswith("2-rl-00000004")
    with pytest.raises(Exception, match="not a complete checkpoint"):
        checkpoint.find_resume(str(run_dir), str(incomplete))
    fresh = tmp_path / "fresh"
    train(parse_config([*RUN, "--output_dir", str(fresh), "--save_every", "2", "--keep", "2",
                        "--steps", "2"]))
    names = [os.path.basename(p) for p in checkpoint.complete_checkpoints(fresh)]
    assert names == ["2-rl-00000000", "2-rl-00000002"]


def _files(folder) -> dict:
    """Every file's bytes, but the lock file (which says who holds the folder, and since when)."""
    return {p: p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != ".vapo-train.lock"}


def _one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vapo-train: error: --resume:"), err
    return err[0]


def test_a_checkpoint_of_another_model_is_one_error_line(tmp_path, uninterrupted, capsys):
    path = str(uninterrupted / "checkpoints" / "2-rl-00000002")
    line = _one_error_line(capsys, [*RUN, "--output_dir", str(tmp_path / "a"),
                                    "--tiny_hidden_size", "64", "--resume", path])
    assert "another shape" in line and "policy" in line


def test_a_checkpoint_of_another_world_size_is_one_error_line(tmp_path, uninterrupted, capsys):
    copy = tmp_path / "ckpt"
    shutil.copytree(uninterrupted / "checkpoints" / "2-rl-00000002", copy)
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "world_size": 2}))
    line = _one_error_line(capsys, [*RUN, "--output_dir", str(tmp_path / "a"),
                                    "--resume", str(copy)])
    assert "2 process(es)" in line and "this run has 1" in line


def test_resume_auto_without_a_checkpoint_starts_fresh_only_in_an_empty_folder(tmp_path, capsys):
    run_dir = tmp_path / "run"
    os.makedirs(run_dir)
    argv = [*RUN, "--output_dir", str(run_dir), "--steps", "1", "--resume",  # bare flag: auto
            "--value_pretrain_steps", "0", "--warmup_steps", "1"]
    # Stale rows of a run without a checkpoint: --resume used to wipe them ("starting fresh").
    (run_dir / "metrics.jsonl").write_text('{"phase": "warmup", "step": 99}\n')
    line = _one_error_line(capsys, argv)
    assert "holds a run (metrics.jsonl) but no complete checkpoint" in line
    assert (run_dir / "metrics.jsonl").read_text() == '{"phase": "warmup", "step": 99}\n'
    os.remove(run_dir / "metrics.jsonl")
    train(parse_config(argv))
    assert "starting fresh" in capsys.readouterr().out
    assert [(r["phase"], r["step"]) for r in read_rows(run_dir)] == [
        ("warmup", 0), ("warmup", 1), ("rl", 0), ("rl", 1)]


def test_resume_auto_never_wipes_a_finished_run_without_checkpoints(tmp_path, uninterrupted,
                                                                    capsys):
    copy = tmp_path / "run"
    shutil.copytree(uninterrupted, copy)
    shutil.rmtree(copy / "checkpoints")
    before = _files(copy)
    line = _one_error_line(capsys, [*RUN, "--output_dir", str(copy), "--resume"])
    assert "holds a run (config.yaml, metrics.jsonl, summary.json) but no complete" in line
    assert _files(copy) == before
    # checkpoints/ a file: one line (was a NotADirectoryError traceback at the first save)
    (copy / "checkpoints").write_text("")
    for extra in (["--resume"], ["--resume", str(uninterrupted / "checkpoints" / "2-rl-00000004")]):
        assert main([*RUN, "--output_dir", str(copy), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "checkpoints is a file" in err[0], err
        assert err[0].startswith("vapo-train: error: --output-dir:")


def test_resume_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, uninterrupted,
                                                                     capsys):
    """Resuming from a checkpoint that is not the latest (trying a change from an earlier
    point): the abandoned later ones used to count as newest, so --keep pruned the resumed
    run's own saves as soon as written and the next --resume auto went back to them."""
    copy = tmp_path / "run"
    shutil.copytree(uninterrupted, copy)
    abandoned = {n: (copy / "checkpoints" / n / "meta.json").read_bytes()
                 for n in ("2-rl-00000002", "2-rl-00000003", "2-rl-00000004")}
    train(parse_config([*RUN, "--output_dir", str(copy), "--save_every", "1", "--keep", "2",
                        "--steps", "2", "--resume", str(copy / "checkpoints" / "2-rl-00000001")]))
    out = capsys.readouterr().out
    assert "moved the 3 later one(s) (2-rl-00000002, 2-rl-00000003, 2-rl-00000004)" in out
    names = [os.path.basename(p) for p in checkpoint.complete_checkpoints(copy)]
    assert names == ["2-rl-00000001", "2-rl-00000002"]  # the run's own, newest last
    assert checkpoint.find_resume(str(copy), "auto").path.endswith("2-rl-00000002")
    aside = [d for d in os.listdir(copy) if d.startswith("checkpoints-set-aside-")]
    assert len(aside) == 1  # kept, whole, where --resume auto does not look
    assert {n: (copy / aside[0] / n / "meta.json").read_bytes() for n in abandoned} == abandoned
    rows = comparable(read_rows(uninterrupted))
    assert comparable(read_rows(copy)) == rows[:len(rows) - 2]  # up to rl step 2


def _damage(path, how):
    path = str(path)
    if how == "meta.json missing":
        os.remove(os.path.join(path, "meta.json"))
    elif how == "meta.json truncated":
        with open(os.path.join(path, "meta.json"), "r+") as f:
            f.truncate(40)
    elif how == "rank0.pt truncated":
        with open(os.path.join(path, "rank0.pt"), "r+") as f:
            f.truncate(100)
    elif how == ".distcp truncated":
        name = next(n for n in os.listdir(os.path.join(path, "dcp")) if n.endswith(".distcp"))
        with open(os.path.join(path, "dcp", name), "r+") as f:
            f.truncate(100)
    elif how == "dcp/.metadata emptied":
        open(os.path.join(path, "dcp", ".metadata"), "w").close()
    elif how == "metrics.jsonl missing":
        os.remove(os.path.join(path, "metrics.jsonl"))
    elif how == "dcp/ truncated, no sizes kept":  # as written before meta.json kept sizes
        meta = json.loads(open(os.path.join(path, "meta.json")).read())
        del meta["files"]
        with open(os.path.join(path, "meta.json"), "w") as f:
            json.dump(meta, f)
        _damage(path, ".distcp truncated")
    elif how == "rank0.pt garbled":  # same size: only the load can tell
        size = os.path.getsize(os.path.join(path, "rank0.pt"))
        with open(os.path.join(path, "rank0.pt"), "wb") as f:
            f.write(b"\0" * size)


@pytest.mark.parametrize("how", ["meta.json missing", "meta.json truncated", "rank0.pt truncated",
                                 ".distcp truncated", "dcp/.metadata emptied",
                                 "metrics.jsonl missing", "rank0.pt garbled",
                                 "dcp/ truncated, no sizes kept"])
def test_a_damaged_checkpoint_is_one_error_line_naming_it(tmp_path, uninterrupted, capsys, how):
    damaged = tmp_path / "ckpt"
    shutil.copytree(uninterrupted / "checkpoints" / "2-rl-00000002", damaged)
    _damage(damaged, how)
    line = _one_error_line(capsys, [*RUN, "--output_dir", str(tmp_path / "a"),
                                    "--resume", str(damaged)])
    said = {".distcp truncated": "dcp/__0_0.distcp has 100 bytes",
            "rank0.pt garbled": "rank0.pt cannot be read",
            "dcp/ truncated, no sizes kept": "dcp/ cannot be read"}.get(how, how.split()[0])
    assert f"checkpoint {damaged} is damaged: {said}" in line, line
    assert not os.path.exists(tmp_path / "a" / "metrics.jsonl")


def test_resume_auto_falls_back_from_a_damaged_latest_checkpoint(tmp_path, uninterrupted, capsys):
    copy = tmp_path / "run"
    shutil.copytree(uninterrupted, copy)
    _damage(copy / "checkpoints" / "2-rl-00000004", ".distcp truncated")
    train(parse_config([*RUN, "--output_dir", str(copy), "--save_every", "1", "--keep", "0",
                        "--resume"]))
    out = capsys.readouterr().out
    assert "2-rl-00000004 is damaged: dcp/" in out and "falling back" in out
    assert f"resuming from {copy / 'checkpoints' / '2-rl-00000003'}" in out
    assert comparable(read_rows(copy)) == comparable(read_rows(uninterrupted))
    # the damaged one went aside with the abandoned continuation; rl-4 is the new run's own
    assert checkpoint.find_resume(str(copy), "auto").path.endswith("2-rl-00000004")
    # every checkpoint damaged: one line, not a fresh start
    for path in checkpoint.complete_checkpoints(copy):
        _damage(path, "metrics.jsonl missing")
    line = _one_error_line(capsys, [*RUN, "--output_dir", str(copy), "--resume"])
    assert "no intact checkpoint" in line


def test_a_new_run_never_starts_in_another_run_s_folder(tmp_path, uninterrupted, capsys):
    # Without --resume a run into a folder holding a run would overwrite its metrics,
    # config and checkpoints (found by an adversarial review): refused, naming the option.
    copy = tmp_path / "run"
    shutil.copytree(uninterrupted, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert main([*RUN, "--output_dir", str(copy), "--seed", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vapo-train: error: --output-dir:"), err
    assert "pass --resume" in err[0]
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_a_second_trainer_is_locked_out_of_a_running_run_s_folder(tmp_path, capsys):
    # Two trainers in one folder appended to one metrics.jsonl and pruned each other's
    # checkpoints; the torn rows then broke --resume (found when a timed-out helper left an
    # orphan run). The running trainer holds an OS lock, released when it dies.
    run_dir = tmp_path / "run"
    # A warm-up of minutes: still running when the second trainer starts, however slow CI is.
    proc = subprocess.Popen(command(run_dir, "--save_every", "1", "--warmup_steps", "100000",
                                    "--warmup_target_accuracy", "1.0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.complete_checkpoints(run_dir) and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the test could try a second one"
        assert main([*RUN, "--output_dir", str(run_dir), "--resume", "auto"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vapo-train: error: --output-dir:"), err
        assert f"in use by a running vapo-train (pid {proc.pid} " in err[0]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The lock went with the killed process.
    with open(run_dir / ".vapo-train.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_refused_resume_leaves_the_run_s_config_and_a_changed_option_is_said(
        tmp_path, uninterrupted, capsys):
    copy = tmp_path / "run"
    shutil.copytree(uninterrupted, copy)
    config = (copy / "config.yaml").read_text()
    before = _files(copy)
    assert main([*RUN, "--output_dir", str(copy), "--tiny_hidden_size", "64",
                 "--resume", "auto"]) == 2
    assert "another shape" in capsys.readouterr().err
    assert (copy / "config.yaml").read_text() == config  # its advice still works
    # Refused from an earlier checkpoint: metrics.jsonl used to be rewritten with its rows.
    assert main([*RUN, "--output_dir", str(copy), "--tiny_hidden_size", "64",
                 "--resume", str(copy / "checkpoints" / "2-rl-00000002")]) == 2
    assert "another shape" in capsys.readouterr().err
    assert _files(copy) == before
    assert main([*RUN, "--output_dir", str(copy), "--clip_high", "0.3", "--resume", "auto"]) == 0
    assert "resuming with a changed option: clip_high: 0.28 -> 0.3" in capsys.readouterr().out
    assert "clip_high: 0.3" in (copy / "config.yaml").read_text()


def test_a_changed_option_is_said_resuming_into_another_folder(tmp_path, uninterrupted, capsys):
    # The comparison used to be with the new folder's config.yaml: none, so nothing was said.
    path = str(uninterrupted / "checkpoints" / "2-rl-00000004")
    assert main([*RUN, "--output_dir", str(tmp_path / "b"), "--clip_high", "0.3",
                 "--resume", path]) == 0
    assert "resuming with a changed option: clip_high: 0.28 -> 0.3" in capsys.readouterr().out


@pytest.mark.parametrize("option", [("--seed", "5"), ("--modulus", "7"), ("--eval_size", "8")])
def test_the_seed_and_the_task_cannot_change_on_resume(tmp_path, uninterrupted, capsys, option):
    copy = tmp_path / "run"
    shutil.copytree(uninterrupted, copy)
    before = _files(copy)
    name = option[0][2:].replace("_", "-")
    for target, resume in ((copy, ["--resume"]),
                           (tmp_path / "b", ["--resume", str(copy / "checkpoints" / "2-rl-00000002")])):
        assert main([*RUN, "--output_dir", str(target), *option, *resume]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"vapo-train: error: --{name}:"), err
        assert "cannot change on resume" in err[0]
    assert _files(copy) == before


def test_an_old_checkpoint_without_its_config_is_compared_with_config_yaml(tmp_path, uninterrupted):
    from vapo_kernels.train.cli import _config_changes

    info = checkpoint.read_info(str(uninterrupted / "checkpoints" / "2-rl-00000002"))
    assert info.config is not None and info.config["run"]["seed"] == 0
    info.config = None  # as written before the config was kept
    config = parse_config([*RUN, "--output_dir", str(tmp_path), "--clip_high", "0.3"])
    changes = _config_changes(str(uninterrupted / "config.yaml"), config, info)
    assert [c for c in changes if c[1] == "clip_high"] == [("algorithm", "clip_high", 0.28, 0.3)]
    assert _config_changes(str(tmp_path / "none.yaml"), config, info) == []


def test_resuming_in_the_folder_the_run_chose_is_no_changed_option(tmp_path, monkeypatch, capsys):
    # A run without --output_dir picks runs/<task>-seed<seed>-<time>; resuming it with that
    # folder named said "resuming with a changed option: output_dir: '' -> 'runs/...'".
    monkeypatch.chdir(tmp_path)
    short = [*RUN[:RUN.index("--steps")], "--steps", "2", *RUN[RUN.index("--steps") + 2:]]
    assert main([*short, "--save_every", "1"]) == 0
    (folder,) = (tmp_path / "runs").iterdir()
    capsys.readouterr()
    assert main([*RUN, "--output_dir", str(folder), "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "resuming with a changed option: steps: 2 -> 4" in out  # a real change is said
    assert "output_dir" not in out
