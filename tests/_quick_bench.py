"""Shared by the benchmark smoke tests: run a bench script's ``--quick`` mode and read its JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def run_quick(script: str, json_name: str, out: Path) -> tuple[dict, str]:
    """``python benchmarks/<script> --quick --out <out>`` in a subprocess, as a user runs
    it (without the tests' TRITON_INTERPRET); returns (the JSON it wrote, its stdout)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / json_name).read_text()), proc.stdout
