"""Data parallelism on CPU with gloo: 2 processes (FSDP2) compute the same whitening, loss,
gradient norm, metrics and updated parameters as 1 process on the same data; metric rows
combine over the processes as each metric means; every process acts on rank 0's
evaluation; a 2-process run resumes from a 2-process checkpoint; an error on one process
ends the job with its traceback instead of hanging."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vapo_kernels as vk
from vapo_kernels.train import checkpoint, distributed, vapo
from vapo_kernels.train.cli import _train, _value_model_maker, build_policy, build_task, main
from vapo_kernels.train.distributed import DataParallel
from vapo_kernels.train.metrics import MetricsLogger, PhaseTimer
from vapo_kernels.train.rollout import demonstration_batch
from vapo_kernels.train.vapo import TrainState, old_outputs, ppo_update, setup_rl

from .conftest import read_rows, tiny_argv, tiny_config

WORLD = 2


def _spawn(worker, tmp_path: Path, *args):
    """Run ``worker(rank, store, *args)`` in WORLD processes joined by a gloo group."""
    store = str(tmp_path / "store")
    mp.start_processes(worker, args=(store, *args), nprocs=WORLD, join=True, start_method="spawn")


def _join(rank: int, store: str) -> DataParallel:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    return DataParallel(rank=rank, world_size=WORLD, group=dist.group.WORLD)


AGGS = ("token-mean", "seq-mean-token-mean", "token-sum")


def _worker(rank, store, out_dir):
    """Everything the 2-process tests compare, in one spawn (starting processes is slow)."""
    dp = _join(rank, store)
    try:
        _whiten_share(rank, dp, out_dir)
        _reduce_rows(rank, dp, out_dir)
        _evaluate(rank, dp, out_dir)
        for agg in AGGS:
            result = ppo_update_result(Path(out_dir) / f"r{rank}-{agg}", agg, dp)
            torch.save(result, os.path.join(out_dir, f"update-{agg}-{rank}.pt"))
    finally:
        distributed.shutdown(dp)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dp")
    _spawn(_worker, out_dir, str(out_dir))
    return out_dir


# -- masked_whiten over a process group ---------------------------------------------------------
def _whiten_share(rank, dp, out_dir):
    torch.manual_seed(0)
    x = torch.randn(2, 37, dtype=torch.float32) * 3 + 1
    mask = torch.rand(2, 37) > 0.3
    x[~mask] = float("nan")  # garbage in masked slots must not reach the statistics
    mine = slice(0, 17) if rank == 0 else slice(17, 37)  # unequal shares
    for unbiased in (True, False):
        out = vk.masked_whiten(x[:, mine], mask[:, mine], unbiased=unbiased,
                               process_group=dp.group)
        torch.save(out, os.path.join(out_dir, f"whiten-{rank}-{unbiased}.pt"))


def test_masked_whiten_over_processes_equals_whole_batch(two_processes):
    tmp_path = two_processes
    torch.manual_seed(0)
    x = torch.randn(2, 37, dtype=torch.float32) * 3 + 1
    mask = torch.rand(2, 37) > 0.3
    x[~mask] = float("nan")
    for unbiased in (True, False):
        want = vk.masked_whiten(x, mask, unbiased=unbiased)
        got = torch.cat([torch.load(tmp_path / f"whiten-{r}-{unbiased}.pt") for r in range(WORLD)],
                        dim=1)
        torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-6)


# -- metric rows over the processes ------------------------------------------------------------
def _reduce_rows(rank, dp, out_dir):
    row = {"phase": "rl", "reward": [0.25, 0.75][rank], "response_length_max": [20, 28][rank],
           "lam_policy_min": [0.9, 0.95][rank], "ratio_max": [1.5, 1.2][rank],
           "peak_rss_mb": [300.0, 400.0][rank], "verifier_errors": [1, 2][rank],
           "approx_kl": [0.1, 0.4][rank], "actor_grad_norm": 2.0}
    out = dp.reduce_row(row, weights={"approx_kl": [10.0, 30.0][rank]},
                        combined=("actor_grad_norm",))
    torch.save(out, os.path.join(out_dir, f"row-{rank}.pt"))


def test_metric_rows_combine_over_processes_as_each_metric_means(two_processes):
    # A mean of everything logged a maximum length of 24 (of 20 and 28), a peak memory of
    # 350 MB, and a token-weighted rate as the plain mean of the processes' rates.
    for rank in range(WORLD):
        row = torch.load(two_processes / f"row-{rank}.pt")
        assert row == {"phase": "rl", "reward": 0.5, "response_length_max": 28,
                       "lam_policy_min": 0.9, "ratio_max": 1.5, "peak_rss_mb": 400.0,
                       "verifier_errors": 3,
                       "approx_kl": pytest.approx((0.1 * 10 + 0.4 * 30) / 40),
                       "actor_grad_norm": 2.0}, rank


# -- a whole run: one collective per step for its metrics row ----------------------------------
ROW_RUN = ("--threads", "1", "--warmup_steps", "2", "--value_pretrain_steps", "1", "--steps",
           "2", "--prompts_per_step", "4")


def _record_row_collectives(rank, store, out_dir):
    """A short run on both processes, recording in order every gather (reduce_row's
    collective), every row reduce_row was given (this process's numbers) and every row
    logged."""
    dp = _join(rank, store)
    events = []
    gather, reduce_row, log = DataParallel.gather, DataParallel.reduce_row, MetricsLogger.log

    def counted_gather(self, values):
        events.append(("gather",))
        return gather(self, values)

    def recorded_reduce_row(self, row, weights=None, combined=()):
        events.append(("reduce", dict(row), dict(weights or {}), tuple(combined)))
        return reduce_row(self, row, weights, combined)

    def recorded_log(self, phase, step, **metrics):
        events.append(("log", phase, step))
        return log(self, phase, step, **metrics)

    DataParallel.gather, DataParallel.reduce_row = counted_gather, recorded_reduce_row
    MetricsLogger.log = recorded_log
    try:
        _train(tiny_config(Path(out_dir), *ROW_RUN), dp)
    finally:
        distributed.shutdown(dp)
    torch.save(events, os.path.join(out_dir, f"events-{rank}.pt"))


def _combined_over_processes(rows: list[dict], weights: list[dict], combined) -> dict:
    """What a step's row over the processes must be, key by key, computed here from each
    process's own row: what the two collectives of a step (the update's row, then the rest)
    gave before they were one."""
    out = {}
    for key, value in rows[0].items():
        values = [row[key] for row in rows]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or key in combined:
            assert all(v == value for v in values), key  # global already: the same everywhere
            out[key] = value
        elif key == "verifier_errors":
            out[key] = sum(values)
        elif key.endswith("_min"):
            out[key] = min(values)
        elif key.endswith("_max") or key.startswith("peak_"):
            out[key] = max(values)
        elif key in weights[0]:  # a rate: over every process's tokens
            w = [weight[key] for weight in weights]
            out[key] = sum(v * t for v, t in zip(values, w)) / sum(w)
        else:
            out[key] = sum(values) / len(values)
    return out


def test_each_step_s_metrics_row_is_one_collective_and_combines_as_before(tmp_path):
    # The PPO update's row was reduced over the processes, then the step's row again with
    # the update's keys left out: two collectives a step where one does.
    _spawn(_record_row_collectives, tmp_path, str(tmp_path))
    events = [torch.load(tmp_path / f"events-{r}.pt") for r in range(WORLD)]
    logged = read_rows(tmp_path / "run")
    for rank in range(WORLD):
        gathers, seen = 0, []
        for event in events[rank]:
            if event[0] == "gather":
                gathers += 1
            elif event[0] == "log":
                seen.append((event[1], event[2], gathers))
                gathers = 0
        # every step's row one collective (the warm-up's too); a phase's step 0 (an
        # evaluation) none
        assert seen == [(r["phase"], r["step"], int(r["step"] > 0)) for r in logged], rank
    phases = set()
    reduced = [[e for e in events[r] if e[0] == "reduce"] for r in range(WORLD)]
    steps = [r for r in logged if r["step"] > 0]
    assert len(reduced[0]) == len(reduced[1]) == len(steps)
    weighted_differs = False
    for row, *calls in zip(steps, *reduced):
        rows, weights, combined = [c[1] for c in calls], [c[2] for c in calls], calls[0][3]
        want = _combined_over_processes(rows, weights, combined)
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=1e-12, abs=0), (row["phase"], key)
        weighted_differs |= any(
            want[k] != pytest.approx(sum(r[k] for r in rows) / WORLD, rel=1e-9)
            for k in weights[0])
        phases.add(row["phase"])
        if row["phase"] != "warmup":
            assert set(combined) >= {"skipped_updates"} and row["skipped_updates"] == 0
    assert phases == {"warmup", "value_pretrain", "rl"}
    assert weighted_differs  # the token weights changed a rate: not a plain mean


# -- the evaluation every process acts on -----------------------------------------------------
def _evaluate(rank, dp, out_dir):
    """Rank 1's held-out scores differ from rank 0's (as GPU non-determinism could make them)."""
    scores = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]][rank])
    task = SimpleNamespace(heldout=lambda: [SimpleNamespace(steps=s) for s in (2, 2, 3, 3)])
    real = vapo.sample
    vapo.sample = lambda *a, **k: SimpleNamespace(scores=scores, response_lengths=torch.ones(4))
    try:
        result = vapo.evaluate(SimpleNamespace(dp=dp), task, None)
    finally:
        vapo.sample = real
    torch.save(result, os.path.join(out_dir, f"eval-{rank}.pt"))


def test_every_process_acts_on_rank_0_s_evaluation(two_processes):
    # Each process decided from its own evaluation whether the warm-up reached its target
    # accuracy: one stopping alone would leave the other in a collective, forever.
    for rank in range(WORLD):
        result = torch.load(two_processes / f"eval-{rank}.pt")
        assert result["heldout_accuracy"] == 0.25, rank
        assert result["heldout_accuracy_long"] == 0.0, rank


# -- one PPO update: 2 processes == 1 process ------------------------------------------------
def _update_argv(agg: str) -> list[str]:
    return ["--mini_batches", "1", "--ppo_epochs", "2", "--loss_agg", agg, "--threads", "1",
            "--micro_batch_size", "2"]


def ppo_update_result(tmp_path, agg: str, dp: DataParallel, *extra: str) -> dict:
    """One ppo_update on a fixed batch of 8 demonstrations (4 rewarded), this process's share."""
    config = tiny_config(tmp_path, *_update_argv(agg), *extra)
    torch.manual_seed(0)
    task = build_task(config)
    policy, tokenizer = build_policy(config, task)
    policy = distributed.prepare_model(policy, config, dp)
    state = TrainState(policy=policy, tokenizer=tokenizer, task_rng=random.Random(0), dp=dp)
    setup_rl(state, config, _value_model_maker(config, dp))
    batch = demonstration_batch(tokenizer, task, random.Random(1), 8)
    batch.scores[::2] = 1.0
    batch.rewards[batch.cu_seqlens[1::2].long() - 1] = 1.0
    share = torch.tensor(dp.shard(list(range(batch.size))))
    batch = batch.select(share)
    old, _ = old_outputs(state, batch, config, PhaseTimer())
    row, weights = ppo_update(state, batch, old, config, PhaseTimer())
    row = dp.reduce_row(row, weights=weights, combined=vapo.GLOBAL_METRICS)  # over both processes
    params = {}
    for name, model in (("policy", state.policy), ("value", state.value_model)):
        for key, p in model.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            params[f"{name}.{key}"] = full.detach().clone()
    return {"row": row, "params": params, "advantages": old.advantages,
            "tokens": dp.all_reduce([batch.num_tokens])[0]}


@pytest.mark.parametrize("agg", AGGS)
def test_two_processes_make_the_same_update_as_one(tmp_path, two_processes, agg):
    threads = torch.get_num_threads()
    try:
        one = ppo_update_result(tmp_path / "one", agg, DataParallel())
    finally:
        torch.set_num_threads(threads)
    two = [torch.load(two_processes / f"update-{agg}-{r}.pt", weights_only=False)
           for r in range(WORLD)]
    # Whitened over both processes: the halves together are the whole batch's advantages.
    torch.testing.assert_close(torch.cat([t["advantages"] for t in two]), one["advantages"],
                               rtol=1e-5, atol=1e-6)
    # token-sum adds ~100 float32 terms that nearly cancel (whitened advantages): its error
    # is absolute, ~tokens x eps of each term, not relative.
    absolute = 1e-6 * one["tokens"] if agg == "token-sum" else 1e-7
    # Every metric, not only the loss terms: the rates (clip fractions, approx_kl, ratio
    # mean) are token-weighted over both processes, the ratio range is the range over both.
    # explained_var is not additive over tokens: each micro-batch's own, token-weighted,
    # so it depends on how the batch is cut (here into other micro-batches than on one).
    assert two[0]["row"].keys() == one["row"].keys()
    for key in one["row"]:
        if key == "explained_var":
            continue
        for r in range(WORLD):
            assert two[r]["row"][key] == pytest.approx(one["row"][key], rel=1e-5,
                                                       abs=absolute), (key, r)
    assert one["row"]["actor_grad_norm"] > 0 and one["row"]["ratio_max"] > 1
    for key, want in one["params"].items():
        torch.testing.assert_close(two[0]["params"][key], want, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_is_wired_and_changes_no_number(tmp_path):
    """CPU can only check the wiring: recomputed layers give the same update (the memory
    saving needs a GPU to see)."""
    threads = torch.get_num_threads()
    try:
        plain = ppo_update_result(tmp_path / "plain", "token-mean", DataParallel())
        recomputed = ppo_update_result(tmp_path / "ckpt", "token-mean", DataParallel(),
                                       "--activation_checkpointing")
    finally:
        torch.set_num_threads(threads)
    for key, want in plain["params"].items():
        torch.testing.assert_close(recomputed["params"][key], want, rtol=1e-6, atol=1e-7)
    config = tiny_config(tmp_path / "c", "--activation_checkpointing")
    policy, _ = build_policy(config, build_task(config))
    assert distributed.prepare_model(policy, config, DataParallel()).is_gradient_checkpointing


# -- torchrun: a 2-process run resumes from its own checkpoint -------------------------------
RUN = [*tiny_argv(drop=("--steps", "--prompts_per_step")), "--steps", "2",
       "--prompts_per_step", "4", "--threads", "1", "--no_save_checkpoint", "--save_every", "1"]
NOT_COMPARED = ("elapsed_s", "since_warmup_s", "peak_rss_mb", "peak_cuda_memory_mb")


def _torchrun(run_dir, *extra, returncode=0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
           "--standalone", "-m", "vapo_kernels.train", *RUN, "--output_dir", str(run_dir),
           *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == returncode, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


@pytest.mark.parametrize("case", ["holds a run already", "Not a directory"])
def test_a_refused_run_folder_stops_every_process_with_one_line(tmp_path, case):
    # Only rank 0 checked the folder: the other process trained on and died in a traceback;
    # then an OS error there (a file on the path) left both waiting for each other.
    run_dir = tmp_path / "run"
    if case == "holds a run already":
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text("")
    else:
        (tmp_path / "a_file").write_text("")
        run_dir = tmp_path / "a_file" / "run"
    err = _torchrun(run_dir, returncode=1).stderr  # torchrun: 1 when a process failed
    ours = [line for line in err.splitlines() if "vapo-train: error:" in line]
    assert len(ours) == 1 and "--output-dir:" in ours[0] and case in ours[0], err
    assert "[rank1]" not in err and "[rank0]" not in err, err  # no process's traceback


FAIL_ON_RANK_1 = """
import os, signal, sys
from vapo_kernels.train import vapo
from vapo_kernels.train.cli import main

signal.alarm(90)  # a regression fails the test rather than leaving hung processes behind
real = vapo.batch_metrics

def failing(*args):  # a rank-local error (an OOM, a full disk), mid-step
    if os.environ["RANK"] == "1":
        raise RuntimeError("injected failure on rank 1")
    return real(*args)

vapo.batch_metrics = failing
sys.exit(main())
"""


def test_an_error_on_one_process_ends_the_job_at_once_with_its_traceback(tmp_path):
    # The failing process waited in shutdown's barrier while the other waited in the step's
    # collective: nothing happened until gloo's 30-min timeout, and no traceback was printed.
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
           "--standalone", str(script), *RUN, "--warmup_steps", "0",
           "--output_dir", str(tmp_path / "run")]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers on SIGTERM
        _, err = proc.communicate()
    seconds = time.perf_counter() - start
    assert proc.returncode != 0, err[-4000:]
    assert "RuntimeError: injected failure on rank 1" in err, err[-4000:]
    assert seconds < 60, (seconds, err[-4000:])  # ~11 s on 2 cores; hung: the 90-s alarm


# -- a checkpoint write error on one process ------------------------------------------------
SAVE_RUN = [*tiny_argv(drop=("--steps", "--warmup_steps", "--value_pretrain_steps")),
            "--warmup_steps", "2", "--value_pretrain_steps", "0", "--steps", "1",
            "--threads", "1", "--no_save_checkpoint", "--save_every", "1", "--keep", "0"]


def _fail_writes(rank: int, failing_rank: int, name: str, bug: bool = False) -> dict:
    """From the third checkpoint on, process ``failing_rank`` cannot write ``name`` (a full
    disk; ``bug``: a TypeError, a bug in the code writing it): torch.save's rank<r>.pt or
    rank 0's copy of metrics.jsonl. Returns a dict that gets the time of the failure."""
    saves, failed = [], {}
    save, torch_save, copyfile = checkpoint.Checkpointer.save, torch.save, shutil.copyfile

    def fail(path):
        if rank == failing_rank and len(saves) >= 3 and str(path).endswith(name):
            failed["failed_at"] = time.time()
            if bug:
                raise TypeError("cannot pickle 'generator' object")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def counted_save(self, state):
        saves.append(state.step)
        return save(self, state)

    def failing_torch_save(obj, f, *args, **kwargs):
        fail(f)
        return torch_save(obj, f, *args, **kwargs)

    def failing_copyfile(src, dst, *args, **kwargs):
        fail(dst)
        return copyfile(src, dst, *args, **kwargs)

    checkpoint.Checkpointer.save = counted_save
    torch.save, shutil.copyfile = failing_torch_save, failing_copyfile
    return failed


def _main(rank, store, out_dir, argv, fault):
    """vapo-train's main() as this process of torchrun's group would run it; its exit code,
    what it printed and when it ended go to out_dir. ``fault``: (rank, file) or None."""
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    signal.alarm(90)  # a hang kills this process (the test fails) rather than the session
    _join(rank, store)  # the trainer finds the group joined
    result = _fail_writes(rank, *fault) if fault else {}
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result["code"] = main(argv)
    result.update(out=out.getvalue(), err=err.getvalue(), ended_at=time.time())
    with open(os.path.join(out_dir, f"main-{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)


def _main_on_both(folder: Path, argv, fault=None) -> list[dict]:
    folder.mkdir(exist_ok=True)
    _spawn(_main, folder, str(folder), argv, fault)
    return [json.loads((folder / f"main-{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("rank, name, then_resume", [(1, "rank1.pt", True),
                                                     (0, "metrics.jsonl", False)])
def test_a_checkpoint_write_error_on_one_process_stops_every_process_with_one_line(
        tmp_path, rank, name, then_resume):
    # The failing process stopped with the error; the other went on into the save's next
    # collective (FSDP's gather of the weights, a barrier) and waited there for it: with
    # gloo it died of the closed connection with a traceback, with NCCL it waited.
    run_dir = tmp_path / "run"
    argv = [*SAVE_RUN, "--output_dir", str(run_dir)]
    results = _main_on_both(tmp_path / "failing", argv, (rank, name))
    kept = checkpoint.complete_checkpoints(run_dir)
    assert [os.path.basename(k) for k in kept] == ["0-warmup-00000000", "0-warmup-00000001"]
    third = run_dir / "checkpoints" / "2-rl-00000000"  # the warm-up's last step is not saved
    line = (f"vapo-train: could not write checkpoint {third}: No space left on device "
            f"({third.parent / ('.tmp-' + third.name) / name}); last good checkpoint: "
            f"{kept[-1]}")
    # Every process exits 3; the line, the same on each, is said once (rank 0's).
    for r, result in enumerate(results):
        assert result["code"] == 3 and result["err"].splitlines() == [line][:r == 0], \
            (r, result["err"])
    assert max(r["ended_at"] for r in results) - results[rank]["failed_at"] < 10  # at once
    assert [n for n in os.listdir(run_dir / "checkpoints") if n.startswith(".")] == []
    if then_resume:  # a bug in the write on that process: its traceback there, and none waits
        shutil.rmtree(run_dir)
        results = _main_on_both(tmp_path / "bug", argv, (rank, name, True))
        line = (f"vapo-train: could not write checkpoint {third}: {name}: TypeError: cannot "
                f"pickle 'generator' object; last good checkpoint: {kept[-1]}")
        for r, result in enumerate(results):
            err = result["err"].splitlines()
            assert result["code"] == 3 and (err[-1] == line) == (r == 0), (r, result["err"])
            if r == rank:
                assert err[0].startswith(f"vapo-train: rank {rank}: unexpected error while "
                                         f"writing {name}") and "Traceback" in err[1], err
                assert err[-1] == "TypeError: cannot pickle 'generator' object", err
            else:
                assert err == [line], err
        assert max(r["ended_at"] for r in results) - results[rank]["failed_at"] < 10
    if not then_resume:  # the same checkpoints are left whichever process failed
        return
    # The last good checkpoint is whole: the run continues from it.
    results = _main_on_both(tmp_path / "resumed", [*argv, "--resume", "auto"])
    assert [r["code"] for r in results] == [0, 0], results[0]["err"][-2000:]
    assert f"resuming from {kept[-1]}" in results[0]["out"]
    assert [(r["phase"], r["step"]) for r in read_rows(run_dir)] == [
        ("warmup", 0), ("warmup", 1), ("warmup", 2), ("rl", 0), ("rl", 1)]


def _comparable(rows):
    return [{k: v for k, v in r.items() if k not in NOT_COMPARED and not k.startswith("time_")}
            for r in rows]


@pytest.mark.slow
def test_two_process_run_resumes_from_its_checkpoint(tmp_path):
    full = tmp_path / "full"
    out = _torchrun(full, "--keep", "0").stdout
    assert "2 data-parallel processes" in out
    resumed = tmp_path / "resumed"
    os.makedirs(resumed / "checkpoints")
    name = "2-rl-00000001"
    shutil.copytree(full / "checkpoints" / name, resumed / "checkpoints" / name)
    out = _torchrun(resumed, "--resume", "auto").stdout
    assert "resuming from" in out
    assert _comparable(read_rows(resumed)) == _comparable(read_rows(full))
