"""How checkpoints reach the disk: fsynced before they are marked complete, renamed into
place without a moment where the checkpoint is gone, Ctrl-C and a full disk while writing
give one line; the TensorBoard step axis continues across a resume."""

from __future__ import annotations

import errno
import os
import random

import numpy as np
import pytest
import torch.distributed.checkpoint.filesystem as dcp_filesystem

from vapo_kernels.train import checkpoint
from vapo_kernels.train.cli import main, seed_and_device
from vapo_kernels.train.config import parse_config
from vapo_kernels.train.metrics import MetricsLogger

from .conftest import tiny_argv

# The shortest run that checkpoints: warm-up 0-1, RL 0-1 (a second or two).
SHORT = [*tiny_argv(drop=("--steps", "--value_pretrain_steps", "--warmup_steps")),
         "--steps", "1", "--value_pretrain_steps", "0", "--warmup_steps", "1", "--threads", "1",
         "--no_save_checkpoint", "--save_every", "1", "--keep", "0"]


def test_every_file_is_fsynced_before_complete_and_the_folder_after_the_rename(
        tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (
        events.append(("replace", os.path.realpath(a), os.path.realpath(b))),
        real_replace(a, b)))
    run_dir = tmp_path / "run"
    assert main([*SHORT, "--output_dir", str(run_dir)]) == 0
    root = os.path.realpath(run_dir / "checkpoints")
    for final in checkpoint.complete_checkpoints(run_dir):
        final = os.path.realpath(final)
        tmp = os.path.join(root, ".tmp-" + os.path.basename(final))
        at = events.index(("replace", tmp, final))
        synced = {e[1] for e in events[:at] if e[0] == "fsync"}
        files = [os.path.relpath(os.path.join(d, n), final)
                 for d, _, names in os.walk(final) for n in names]
        assert "COMPLETE" in files and "meta.json" in files and len(files) > 8
        assert all(os.path.join(tmp, f) in synced for f in files), files
        assert tmp in synced  # its folder, after COMPLETE
        complete_synced = events.index(("fsync", os.path.join(tmp, "COMPLETE")))
        assert all(events.index(("fsync", os.path.join(tmp, f))) < complete_synced
                   for f in files if f != "COMPLETE")  # the marker last
        assert ("fsync", root) in events[at + 1:]  # the rename made durable


def test_replacing_a_checkpoint_never_leaves_the_point_without_one(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    final, tmp = root / "2-rl-00000003", root / ".tmp-2-rl-00000003"
    for folder, text in ((final, "old"), (tmp, "new")):
        os.makedirs(folder)
        (folder / "data").write_text(text)
        (folder / checkpoint.COMPLETE).write_text("complete\n")
    real_replace, calls = os.replace, []

    def crash_on_the_second(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between the two renames
        real_replace(a, b)
    monkeypatch.setattr(os, "replace", crash_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.publish(str(tmp), str(final))
    monkeypatch.setattr(os, "replace", real_replace)
    checkpoint.recover(str(root))  # a --resume (rank 0, on taking the folder) and the next save do this
    assert (final / "data").read_text() == "old"  # the earlier save, whole
    checkpoint.publish(str(tmp), str(final))
    assert (final / "data").read_text() == "new"
    assert sorted(os.listdir(root)) == ["2-rl-00000003"]


def _fail_dcp_writes_from_the_third_checkpoint(monkeypatch, error):
    saves = []
    real_save, real_write = checkpoint.Checkpointer.save, dcp_filesystem._write_item

    def save(self, state):
        saves.append(state.step)
        return real_save(self, state)

    def write_item(*args, **kwargs):
        if len(saves) >= 3:
            raise error
        return real_write(*args, **kwargs)
    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    monkeypatch.setattr(dcp_filesystem, "_write_item", write_item)


def test_ctrl_c_while_a_checkpoint_is_written_is_an_interrupt(tmp_path, monkeypatch, capsys):
    # DCP wrapped the KeyboardInterrupt in a CheckpointException: a traceback, exit 1.
    _fail_dcp_writes_from_the_third_checkpoint(monkeypatch, KeyboardInterrupt())
    run_dir = tmp_path / "run"
    assert main([*SHORT, "--output_dir", str(run_dir)]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["vapo-train: interrupted"]
    assert [n for n in os.listdir(run_dir / "checkpoints") if n.startswith(".")] == []


def test_a_full_disk_while_a_checkpoint_is_written_is_one_line(tmp_path, monkeypatch, capsys):
    _fail_dcp_writes_from_the_third_checkpoint(
        monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "x.distcp"))
    run_dir = tmp_path / "run"
    assert main([*SHORT, "--output_dir", str(run_dir)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    kept = checkpoint.complete_checkpoints(run_dir)
    assert len(kept) == 2 and len(err) == 1, err  # the third save failed
    assert err[0].startswith(f"vapo-train: could not write checkpoint {run_dir / 'checkpoints'}")
    assert err[0].endswith(f": No space left on device (x.distcp); last good checkpoint: "
                           f"{kept[-1]}"), err
    assert [n for n in os.listdir(run_dir / "checkpoints") if n.startswith(".")] == []


def test_a_full_disk_under_torch_save_is_one_line_too(tmp_path, monkeypatch, capsys):
    # torch.save reports a full disk as a RuntimeError (its zip writer), not an OSError:
    # rank0.pt's write ended the run in a traceback.
    import torch

    saves, real_save, real_torch_save = [], checkpoint.Checkpointer.save, torch.save

    def save(self, state):
        saves.append(state.step)
        return real_save(self, state)

    def torch_save(obj, f, *args, **kwargs):
        if len(saves) >= 3 and str(f).endswith("rank0.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                               "704 vs 598")  # what torch.save to /dev/full raises
        return real_torch_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    monkeypatch.setattr(torch, "save", torch_save)
    run_dir = tmp_path / "run"
    assert main([*SHORT, "--output_dir", str(run_dir)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    kept = checkpoint.complete_checkpoints(run_dir)
    assert len(kept) == 2 and len(err) == 1, err
    assert err[0].endswith(": rank0.pt: RuntimeError: [enforce fail at inline_container.cc:672] "
                           f". unexpected pos 704 vs 598; last good checkpoint: {kept[-1]}"), err
    assert [n for n in os.listdir(run_dir / "checkpoints") if n.startswith(".")] == []


def test_the_tensorboard_step_continues_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(str(tmp_path), progress=False, tensorboard=True, truncate=True)
    for step in range(5):  # killed after 5 rows; the checkpoint holds 3
        log.log("rl", step, reward=float(step))
    log.close()
    log = MetricsLogger(str(tmp_path), progress=False, tensorboard=True, rows_before=3)
    for step in range(3, 6):
        log.log("rl", step, reward=10.0 + step)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    # One point per row, at the row's place: the killed run's rows 4 and 5 are dropped.
    assert [(e.step, e.value) for e in events.Scalars("rl/reward")] == [
        (1, 0.0), (2, 1.0), (3, 2.0), (4, 13.0), (5, 14.0), (6, 15.0)]


def test_numpy_s_global_generator_is_seeded_from_the_run_seed():
    # It is saved in and restored from every checkpoint; it was never seeded.
    run = parse_config(["--seed", "7", "--threads", "1"]).run
    np.random.seed(12345)
    seed_and_device(run)
    first = np.random.random(3)
    np.random.seed(999)
    random.seed(0)
    seed_and_device(run)
    assert np.array_equal(np.random.random(3), first)
    run = parse_config(["--seed", str(2**40 + 7), "--threads", "1"]).run
    seed_and_device(run)  # a seed over 32 bits is fine
    assert not np.array_equal(np.random.random(3), first)


@pytest.mark.parametrize("bug", [True, False])
def test_a_bug_in_a_checkpoint_write_shows_its_traceback(tmp_path, monkeypatch, capsys, bug):
    # Any Exception in a part of a save became the one-line write error (exit 3): a
    # TypeError from json.dump lost its traceback. A full disk stays one line.
    import json

    saves, real_save, real_dump = [], checkpoint.Checkpointer.save, json.dump

    def save(self, state):
        saves.append(state.step)
        return real_save(self, state)

    def dump(obj, f, *args, **kwargs):
        if len(saves) >= 3 and str(getattr(f, "name", "")).endswith("meta.json"):
            if bug:
                raise TypeError("Object of type Tensor is not JSON serializable")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_dump(obj, f, *args, **kwargs)
    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    monkeypatch.setattr(checkpoint.json, "dump", dump)
    run_dir = tmp_path / "run"
    assert main([*SHORT, "--output_dir", str(run_dir)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    kept = checkpoint.complete_checkpoints(run_dir)
    assert len(kept) == 2, err
    reason = ("TypeError: Object of type Tensor is not JSON serializable" if bug
              else "No space left on device")
    assert err[-1].startswith(f"vapo-train: could not write checkpoint {run_dir / 'checkpoints'}")
    assert err[-1].endswith(f": meta.json, COMPLETE: {reason}; last good checkpoint: "
                            f"{kept[-1]}"), err
    if bug:  # the traceback first: the error and the frame that raised it
        text = "\n".join(err)
        assert err[0].startswith("vapo-train: unexpected error while writing meta.json"), err
        assert "Traceback (most recent call last)" in text, text
        assert "in _complete" in text and "json.dump(meta, f)" in text, text
        assert f"\n{reason}\n" in text, text
    else:
        assert len(err) == 1 and "Traceback" not in err[0], err
    assert [n for n in os.listdir(run_dir / "checkpoints") if n.startswith(".")] == []


@pytest.mark.parametrize("rank, on_every_process, said", [
    ("0", True, True), ("1", True, False), ("1", False, True), ("0", False, True)])
def test_a_write_error_every_process_raised_is_said_by_rank_0_only(
        tmp_path, monkeypatch, capsys, rank, on_every_process, said):
    # Under torchrun every process printed the same line (8 processes: 8 lines); one only
    # this process raised (not carried to the others) is still said where it was raised.
    from vapo_kernels.train import cli

    def train(config):
        raise checkpoint.CheckpointWriteError("could not write checkpoint X: reason; last "
                                              "good checkpoint: Y", on_every_process)
    monkeypatch.setattr(cli, "train", train)
    monkeypatch.setenv("RANK", rank)
    assert main([*SHORT, "--output_dir", str(tmp_path / "run")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vapo-train: could not write checkpoint X: reason; last good checkpoint: "
                   "Y"][:said], err
