"""Metrics: one JSONL row per logged step, a live tqdm line, TensorBoard when installed, PNGs.

Every row carries ``phase`` (``warmup``, ``value_pretrain``, ``rl`` or ``supervised`` for
the baseline) and ``step`` (counted within its phase), plus ``elapsed_s`` since the run
started. Rows with ``heldout_accuracy`` are evaluations (the first RL one is taken before
any RL update).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch

import vapo_kernels as vk

LIVE_KEYS = ("reward", "heldout_accuracy", "vf_loss", "explained_var", "entropy", "clipfrac",
             "response_length")


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class PhaseTimer:
    """Wall time per named part of a step (rollout, old log-probs, GAE, ...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            # A profiler range too (about a microsecond when no profiler runs).
            with torch.profiler.record_function(f"vapo_train.{name}"):
                yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def rows(self) -> dict[str, float]:
        return {f"time_{k}_s": round(v, 4) for k, v in self.seconds.items()}


def peak_memory_mb() -> dict[str, float]:
    """Peak memory so far: CUDA max allocated since the last call (per step), else the
    process's peak resident set size (a high-water mark of the whole run)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        return {"peak_cuda_memory_mb": round(peak, 1)}
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 1)}


MEMORY_KEYS = ("peak_rss_mb", "peak_cuda_memory_mb")


class MetricsLogger:
    """Appends the rows to RUN/metrics.jsonl (``truncate``: empties it first, a fresh run).

    ``main=False`` (data-parallel processes other than rank 0): nothing is written or shown.
    ``elapsed_offset`` continues ``elapsed_s`` of a resumed run; ``rows_before`` (a resumed
    run: the number of rows restored) continues the TensorBoard step axis (one step per row)
    and drops the events the killed run logged after it (``purge_step``)."""

    def __init__(self, run_dir: str, *, progress: bool, tensorboard: bool, truncate: bool = False,
                 main: bool = True, elapsed_offset: float = 0.0,
                 rows_before: int | None = None) -> None:
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.main = main
        self._file = open(self.path, "w" if truncate else "a", encoding="utf-8") if main else None
        self._start = time.perf_counter() - elapsed_offset
        self._bar = None
        self._progress = progress and main
        self._last: dict[str, Any] = {}
        self._tb = None
        self._tb_step = rows_before or 0
        if tensorboard and main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=(
                    None if rows_before is None else rows_before + 1))
            except ImportError:  # tensorboard is optional
                self._tb = None

    @property
    def tensorboard_dir(self) -> str | None:
        return None if self._tb is None else self._tb.log_dir

    def start_phase(self, phase: str, total: int) -> None:
        """A fresh progress bar for a phase (``total`` steps)."""
        self.close_bar()
        if self._progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=phase, dynamic_ncols=True, leave=True)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def log(self, phase: str, step: int, **metrics: Any) -> dict[str, Any]:
        row = {"phase": phase, "step": step,
               "elapsed_s": round(time.perf_counter() - self._start, 3)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        if self._file is None:
            return row
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self._last.update({k: v for k, v in row.items() if k in LIVE_KEYS and v is not None})
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in self._last.items()}, refresh=False)
        if self._tb is not None:
            self._tb_step += 1
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("step",):
                    self._tb.add_scalar(f"{phase}/{key}", value, self._tb_step)
        return row

    def write(self, message: str) -> None:
        """Print without breaking the progress bar."""
        if not self.main:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_bar()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_rows(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


PLOTS = (
    ("accuracy and reward", ("heldout_accuracy", "reward")),
    ("value loss and explained variance", ("vf_loss", "explained_var")),
    ("entropy", ("entropy",)),
    ("response length (tokens)", ("response_length",)),
    ("clip fractions", ("clipfrac_low", "clipfrac_high", "vf_clipfrac")),
)


def plot_run(metrics_path: str, out_path: str, title: str = "") -> str:
    """One PNG with a panel per metric family and the phase-time breakdown, x = wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(metrics_path)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    colors = {"warmup": "tab:gray", "value_pretrain": "tab:orange", "rl": "tab:blue",
              "supervised": "tab:green"}
    for ax, (name, keys) in zip(axes.flat, PLOTS):
        for key in keys:
            for phase, color in colors.items():
                points = [(r["elapsed_s"], r[key]) for r in rows
                          if r["phase"] == phase and r.get(key) is not None]
                if points:
                    xs, ys = zip(*points)
                    # colour = phase, line style = metric: a panel's metrics (up to 3)
                    # stay apart (with shades of one colour the 2nd and 3rd looked alike)
                    ax.plot(xs, ys, ("-", "--", ":")[keys.index(key)], color=color,
                            marker="o" if key == "heldout_accuracy" else None, markersize=3,
                            label=f"{key} ({phase})")
        ax.set_title(name)
        ax.set_xlabel("wall time (s)")
        if ax.lines:
            ax.legend(fontsize=7)
    # Phase-time breakdown of the RL steps: mean seconds per step of each part.
    ax = axes.flat[5]
    rl = [r for r in rows if r["phase"] == "rl" and "time_rollout_s" in r]
    if rl:
        parts = sorted({k for r in rl for k in r if k.startswith("time_")})
        means = [sum(r.get(k, 0.0) for r in rl) / len(rl) for k in parts]
        ax.barh([p[5:-2] for p in parts], means, color="tab:blue")
        ax.set_xlabel("seconds per RL step (mean)")
    ax.set_title("where an RL step's time goes")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


@contextmanager
def our_op(name: str) -> Iterator[None]:
    """Around each vapo_kernels call of the trainer: a profiler range (its backward shows
    up on its own as ``<op>_functionBackward``), so a profile can tell our ops from the
    model's; and vk's data checks off for the call. The trainer makes the masks and offsets
    itself, and a NaN or infinity from a diverging model must reach the guard (the update
    skipped, the run stopped after ``--max_bad_steps``) instead of raising out of the op -
    with the checks on, vk names a non-finite input and raises. (Also no host sync per
    call on a GPU.)"""
    was = vk.validation_enabled()
    vk.set_validation(False)
    try:
        with torch.profiler.record_function(f"vapo_kernels.{name}"):
            yield
    finally:
        vk.set_validation(was)


class StepProfiler:
    """``torch.profiler`` over RL steps ``first..last``: a Chrome trace (Perfetto,
    chrome://tracing) in ``out_dir/trace.json`` and the share of step time per part."""

    def __init__(self, first: int, last: int, out_dir: str) -> None:
        self.first, self.last, self.out_dir = first, last, out_dir
        self._profile = None
        self._step_range = None
        self.trace_path: str | None = None
        self.shares: dict[str, float] | None = None

    def step_start(self, step: int) -> None:
        if step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profile = torch.profiler.profile(activities=activities)
            self._profile.__enter__()
        if self._profile is not None:
            self._step_range = torch.profiler.record_function("vapo_train.rl_step")
            self._step_range.__enter__()

    def step_end(self, step: int) -> None:
        if self._profile is None:
            return
        self._step_range.__exit__(None, None, None)
        if step == self.last:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self._profile.__exit__(None, None, None)
            os.makedirs(self.out_dir, exist_ok=True)
            self.trace_path = os.path.join(self.out_dir, "trace.json")
            self._profile.export_chrome_trace(self.trace_path)
            self.shares = step_time_shares(
                {e.key: e.cpu_time_total for e in self._profile.key_averages()})
            self._profile = None

    def summary_line(self) -> str:
        s = self.shares or {}
        return (f"profile of RL steps {self.first}-{self.last} ({self.trace_path}): vapo_kernels "
                f"ops {s.get('ours', 0):.1%} of step time (forward {s.get('ours_forward', 0):.1%},"
                f" backward {s.get('ours_backward', 0):.1%}); model forward/backward "
                f"{s.get('model', 0):.1%}; generation {s.get('generation', 0):.1%}; optimizer "
                f"{s.get('optimizer', 0):.1%}")


def step_time_shares(times: dict[str, float]) -> dict[str, float]:
    """Shares of the profiled RL steps' time (host time of each range, summed over steps).

    Ours: the ``vapo_kernels.*`` ranges (forward calls) plus the autograd nodes of our ops
    (``*_functionBackward``); the model: the forward / backward parts of the step
    (old log-probs, loss forward, loss backward) less our ops in them; generation: the
    rollout (sampling and verifier)."""
    total = times.get("vapo_train.rl_step", 0.0)
    if total <= 0:
        return {}
    forward = sum(v for k, v in times.items() if k.startswith("vapo_kernels."))
    backward = sum(v for k, v in times.items()
                   if k.startswith("autograd::engine::evaluate_function: ")
                   and k.endswith("_functionBackward"))
    model_parts = sum(times.get(f"vapo_train.{k}", 0.0)
                      for k in ("old_logprobs", "gae", "loss_forward", "loss_backward"))
    return {"ours": (forward + backward) / total, "ours_forward": forward / total,
            "ours_backward": backward / total,
            "model": max(model_parts - forward - backward, 0.0) / total,
            "generation": times.get("vapo_train.rollout", 0.0) / total,
            "optimizer": times.get("vapo_train.optimizer", 0.0) / total}
