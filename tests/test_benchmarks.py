"""The GAE benchmark runs, checks our outputs before timing, and times real peer methods.

* a ``--quick`` run in a subprocess writes JSON with every expected row, our rows verified
  against verl and timed, peers either timed or skipped with a reason;
* the benchmark's peer loaders and transcriptions compute GAE: slime's chunked method
  equals verl's loop on unmasked rows, NeMo's two-pass method equals verl's loop run per
  lambda, and the OpenRLHF function compiled from its source equals our ``"zero"`` mode.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gae.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gae

import vapo_kernels as vk


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


PEER_ROWS = {
    "verl": "verl",
    "openrlhf": "openrlhf",
    "torchrl.vec_gae": "torchrl",
    "torchrl.vec_gae x2": "torchrl",
    "slime.chunked_gae (transcription)": None,  # always there: written in the script
    "nemo.two_pass (transcription)": None,
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, json.loads((out / "gae_cpu.json").read_text()), proc.stdout


def test_quick_run_has_every_row(quick_run):
    out, data, stdout = quick_run
    rows, meta = data["rows"], data["meta"]
    assert meta["backends"], "no backend of ours was benchmarked"
    ours = {
        f"vapo.{op}{w}[{b}]"
        for b in meta["backends"]
        for op in ("gae", "decoupled_gae")
        for w in ("", "+whiten")
    }
    shapes = {r["shape"] for r in rows}
    assert shapes == {f"{b}x{t}" for b, t in bench_gae.QUICK_SHAPES}
    for shape in shapes:
        impls = {r["impl"] for r in rows if r["shape"] == shape}
        assert ours | set(PEER_ROWS) <= impls, sorted(impls)
    for key in (
        "device_name",
        "torch",
        "triton",
        "timestamp",
        "shape",
        "impl",
        "median_s",
        "iqr_s",
        "tokens",
        "GB_s",
        "fraction_of_copy",
        "speedup_vs_verl",
        "speedup_vs_best_peer",
    ):
        assert all(key in r for r in rows), key
    assert (out / "gae_cpu.png").stat().st_size > 0
    assert "TRANSCRIPTION" in stdout


def test_quick_run_verified_ours_before_timing(quick_run):
    _, data, _ = quick_run
    for r in (r for r in data["rows"] if r["kind"] == "ours"):
        assert r["status"] == "ok", r
        assert r["verified"] is True and r["max_abs_err"] <= 1e-4, r
        if _installed("verl"):
            assert r["verified_against"].startswith("verl"), r
        assert r["median_s"] > 0 and r["fraction_of_copy"] > 0
        if _installed("verl"):
            assert r["speedup_vs_verl"] > 0


def test_quick_run_peers_timed_or_skipped_with_reason(quick_run):
    _, data, _ = quick_run
    for r in (r for r in data["rows"] if r["kind"] == "peer"):
        assert r["impl"] in PEER_ROWS
        package = PEER_ROWS[r["impl"]]
        if package is None or _installed(package):
            assert r["status"] == "ok", r  # quick shapes are small enough for every peer
            assert r["median_s"] > 0
        else:
            assert r["status"] == "skipped" and r["note"], r


def _inputs(batch=5, seqlen=300, seed=3):
    return bench_gae.make_inputs(batch, seqlen, torch.device("cpu"), seed)


@pytest.mark.skipif(not _installed("verl"), reason="verl is not installed")
def test_slime_transcription_equals_verl_on_unmasked_rows():
    x = _inputs()
    verl = bench_gae.load_verl()
    ones = torch.ones_like(x.maskf)
    _, ret = verl(x.rewards, x.values, ones, 0.99, 0.9)
    adv, ret_s = bench_gae.slime_chunked_gae_transcription(x.rewards, x.values, 0.99, 0.9, 64)
    torch.testing.assert_close(adv, ret - x.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret_s, ret, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not _installed("verl"), reason="verl is not installed")
def test_nemo_transcription_equals_verl_per_lambda():
    x = _inputs()
    verl = bench_gae.load_verl()
    lam_p = vk.length_adaptive_lambda(x.mask.sum(1), bench_gae.ALPHA).float()
    _, ret_p = verl(x.rewards, x.values, x.maskf, 1.0, lam_p)
    _, ret_c = verl(x.rewards, x.values, x.maskf, 1.0, 1.0)
    # each pass alone (the lambda = 1 one takes NeMo's cumsum fast path)
    adv_p, _ = bench_gae._nemo_gae_pass(x.rewards, x.values, x.maskf, 1.0, lam_p)
    _, ret_n = bench_gae._nemo_gae_pass(x.rewards, x.values, x.maskf, 1.0, 1.0)
    v = x.mask
    torch.testing.assert_close(adv_p[v], (ret_p - x.values)[v], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret_n[v], ret_c[v], rtol=1e-5, atol=1e-5)
    adv, ret = bench_gae.nemo_decoupled_gae_transcription(
        x.rewards, x.values, x.maskf, 1.0, 1.0, bench_gae.ALPHA
    )
    assert bool((adv[~v] == 0).all())  # zero-filled
    torch.testing.assert_close(ret[v], ret_c[v], rtol=1e-5, atol=1e-5)
    assert abs(float(adv[v].mean())) < 1e-5 and abs(float(adv[v].std()) - 1) < 1e-2


@pytest.mark.skipif(not _installed("openrlhf"), reason="openrlhf is not installed")
def test_openrlhf_from_source_equals_zero_mode():
    x = _inputs()
    adv, ret = bench_gae.load_openrlhf()(x.values, x.rewards, x.maskf, 0.99, 0.9)
    ours = vk.gae(x.rewards, x.values, x.mask, gamma=0.99, lam=0.9, mask_mode="zero")
    torch.testing.assert_close(adv, ours[0], rtol=1e-5, atol=1e-5)
    # OpenRLHF's returns add the masked (zeroed) values; ours add V itself
    torch.testing.assert_close(ret, ours[0] + x.values * x.maskf, rtol=1e-5, atol=1e-5)
