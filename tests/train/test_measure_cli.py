"""The README's measurement command refuses, in one line and before any training, what
would overwrite committed results or collide with earlier runs (a new user re-running it
overwrote benchmarks/results/ after ~10 minutes, or got a traceback from the second
seed's folder)."""

from __future__ import annotations

import subprocess
import sys


def _measure(*args, cwd):
    return subprocess.run([sys.executable, "-m", "vapo_kernels.train.measure", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_existing_outputs_and_run_folders_are_refused_before_training(tmp_path):
    (tmp_path / "old_summary.json").write_text("{}")
    done = _measure("--seeds", "0", "--out", "old", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "measure: error: --out: old_summary.json exists already: pass another --out"
    (tmp_path / "runs" / "seed1").mkdir(parents=True)
    (tmp_path / "runs" / "seed1" / "metrics.jsonl").write_text("")
    done = _measure("--seeds", "0", "1", "--out", "new", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 2 and "runs/seed1 holds files already" in done.stderr
    assert done.stderr.count("\n") == 1  # one line, no traceback
    done = _measure("--seeds", "0", "--out", "new", "--", "--no_such_option", cwd=tmp_path)
    assert done.returncode == 2 and "--no_such_option: unknown option" in done.stderr
    assert not (tmp_path / "runs" / "seed0").exists()
