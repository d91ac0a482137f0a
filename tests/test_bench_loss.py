"""The PPO-loss benchmark runs, checks every row before timing it, and times real peers.

* a ``--quick`` run in a subprocess writes JSON with every expected row: ours verified
  against our float64 reference and timed, peers verified and timed or skipped with a
  reason, peak memory measured (CPU: in the script's second process);
* the checker that guards the timing rejects a wrong loss or a wrong gradient.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_loss  # noqa: E402
from _quick_bench import installed, run_quick  # noqa: E402


# peer rows per task -> the package they need (None: always there)
PEER_ROWS = {
    "policy": {
        "verl": "verl",
        "verl+torch.compile": "verl",
        "openrlhf": "openrlhf",
        "liger.fused_linear_grpo": "liger_kernel",
    },
    "policy+value": {"verl": "verl", "verl+torch.compile": "verl", "openrlhf": "openrlhf"},
    "logits": {"torch log_softmax.gather + verl": "verl"},
    "hidden": {
        "matmul + torch log_softmax.gather + verl": "verl",
        "liger.fused_linear_grpo": "liger_kernel",
    },
}
OURS_PREFIX = {
    "policy": ["vapo.policy_loss["],
    "policy+value": ["vapo.vapo_loss["],
    "logits": [
        "vapo.policy_loss_from_logits[",
        "vapo.policy_loss_from_logits(inplace)[",
        "vapo.token_logprobs+policy_loss[",
    ],
    "hidden": ["vapo.policy_loss_from_hidden[", "matmul + vapo.policy_loss_from_logits(inplace)["],
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_loss")
    return (out, *run_quick("bench_loss.py", "loss_cpu.json", out))


def test_quick_run_rows_checked_timed_and_measured(quick_run):
    out, data, stdout = quick_run
    rows, meta = data["rows"], data["meta"]
    assert {r["task"] for r in rows} == set(bench_loss.TASKS)
    for task, prefixes in OURS_PREFIX.items():
        ours = [r for r in rows if r["task"] == task and r["kind"] == "ours"]
        for prefix in prefixes:
            assert any(r["impl"].startswith(prefix) for r in ours), (task, prefix)
        for r in ours:
            assert r["status"] == "ok", r
            assert r["verified"] is True and r["verified_against"].startswith("vapo reference")
            assert r["median_s"] > 0 and r["fraction_of_floor"] > 0, r
            if not meta["memory_method"].startswith("not measured"):
                assert r["peak_bytes"] is not None, r  # from the second process
        impls = {r["impl"] for r in rows if r["task"] == task}
        assert set(PEER_ROWS[task]) <= impls, (task, sorted(impls))
        for r in (r for r in rows if r["task"] == task and r["kind"] == "peer"):
            package = PEER_ROWS[task][r["impl"]]
            if r["status"] == "ok":
                assert r["verified"] is True and r["median_s"] > 0, r
                assert all(x.get("speedup_vs", {}).get(r["impl"]) for x in ours), r
            else:  # not installed, or torch.compile (off in --quick): said why
                assert r["status"] == "skipped" and r["note"], r
                if package and installed(package) and "compile" not in r["impl"]:
                    assert "liger" in r["impl"] and task == "policy", r
    for key in ("device_name", "torch", "timestamp", "tokens", "floor_s", "iqr_s", "loss_err"):
        assert all(key in r for r in rows), key
    assert meta["backends"]["token"], "no backend of ours was benchmarked"
    assert (out / "loss_cpu.png").stat().st_size > 0
    assert (out / "loss_cpu.txt").read_text().count("ours x peer") >= 3
    assert "peak memory" in stdout and "FAILED" not in stdout


def test_checker_rejects_a_wrong_answer():
    x = bench_loss.make_token_inputs(3, 64, torch.device("cpu"), seed=5)
    checker = bench_loss.TokenChecker(x, "policy")
    impl = bench_loss.build_token_impls("policy", ["reference"], bench_loss.Peers(), "off")[0]
    loss, grads = bench_loss.run_impl(impl, x)
    assert checker(impl, loss, grads).ok
    assert not checker(impl, loss * 1.01, grads).ok
    wrong = grads[0].clone()
    wrong[~x.mask] = 1e-3  # masked slots must get no gradient
    assert not checker(impl, loss, (wrong,)).ok
