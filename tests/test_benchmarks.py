"""The GAE benchmark runs, checks our outputs before timing, and times real peer methods.

* a ``--quick`` run in a subprocess writes JSON with every expected row, our rows verified
  against verl and timed, peers either timed or skipped with a reason;
* the benchmark's peer loaders and transcriptions compute GAE: slime's chunked method
  equals verl's loop on unmasked rows, NeMo's two-pass method equals verl's loop run per
  lambda, and the OpenRLHF function compiled from its source equals our ``"zero"`` mode.

The log-prob benchmark (``bench_logprobs.py``): a ``--quick`` run has every row, ours
verified against float64 and timed with a floor and a peak memory, peers checked or skipped
with a reason; its checks refuse wrong answers (a shifted target, a flipped sign, a missing
gradient) so that they are never timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gae

import vapo_kernels as vk
from _quick_bench import installed, run_quick


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
    return (out, *run_quick("bench_gae.py", "gae_cpu.json", out))


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
        if installed("verl"):
            assert r["verified_against"].startswith("verl"), r
        assert r["median_s"] > 0 and r["fraction_of_copy"] > 0
        if installed("verl"):
            assert r["speedup_vs_verl"] > 0


def test_quick_run_peers_timed_or_skipped_with_reason(quick_run):
    _, data, _ = quick_run
    for r in (r for r in data["rows"] if r["kind"] == "peer"):
        assert r["impl"] in PEER_ROWS
        package = PEER_ROWS[r["impl"]]
        if package is None or installed(package):
            assert r["status"] == "ok", r  # quick shapes are small enough for every peer
            assert r["median_s"] > 0
        else:
            assert r["status"] == "skipped" and r["note"], r


def _inputs(batch=5, seqlen=300, seed=3):
    return bench_gae.make_inputs(batch, seqlen, torch.device("cpu"), seed)


@pytest.mark.skipif(not installed("verl"), reason="verl is not installed")
def test_slime_transcription_equals_verl_on_unmasked_rows():
    x = _inputs()
    verl = bench_gae.load_verl()
    ones = torch.ones_like(x.maskf)
    _, ret = verl(x.rewards, x.values, ones, 0.99, 0.9)
    adv, ret_s = bench_gae.slime_chunked_gae_transcription(x.rewards, x.values, 0.99, 0.9, 64)
    torch.testing.assert_close(adv, ret - x.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret_s, ret, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not installed("verl"), reason="verl is not installed")
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


@pytest.mark.skipif(not installed("openrlhf"), reason="openrlhf is not installed")
def test_openrlhf_from_source_equals_zero_mode():
    x = _inputs()
    adv, ret = bench_gae.load_openrlhf()(x.values, x.rewards, x.maskf, 0.99, 0.9)
    ours = vk.gae(x.rewards, x.values, x.mask, gamma=0.99, lam=0.9, mask_mode="zero")
    torch.testing.assert_close(adv, ours[0], rtol=1e-5, atol=1e-5)
    # OpenRLHF's returns add the masked (zeroed) values; ours add V itself
    torch.testing.assert_close(ret, ours[0] + x.values * x.maskf, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# bench_logprobs.py

import bench_logprobs  # noqa: E402


# every peer row of a CPU run, with the package it needs (None: plain torch)
LOGPROBS_PEERS = {
    ("logp", "verl.logprobs_from_logits_v2"): "verl",
    ("logp", "verl.logprobs_from_logits_naive"): "verl",
    ("logp", "verl.logprobs_from_logits_flash_attn"): "flash_attn",
    ("logp", "trl.selective_log_softmax"): "trl",
    ("logp", "torch eager"): None,
    ("logp", "torch.compile"): None,
    ("logp+ent", "verl.logprobs_from_logits+entropy_from_logits"): "verl",
    ("logp+ent", "verl.logprobs_from_logits+entropy_with_chunking"): "verl",
    ("logp+ent", "trl.selective_log_softmax+entropy_from_logits"): "trl",
    ("logp+ent", "trl.selective_log_softmax_and_entropy"): "trl",
    ("logp+ent", "torch eager"): None,
    ("logp+ent", "torch.compile"): None,
    ("linear", "liger.fused_linear_cross_entropy"): "liger_kernel",
    ("linear", "cce.linear_cross_entropy"): "cut_cross_entropy",
    ("linear", "trl.ChunkedLogProbFunction"): "trl",
    ("linear", "torch eager"): None,
    ("linear", "torch.compile"): None,
    ("linear+ent", "verl.linear_cross_entropy"): "verl",
    ("linear+ent", "trl.ChunkedLogProbFunction"): "trl",
    ("linear+ent", "torch eager"): None,
    ("linear+ent", "torch.compile"): None,
}


@pytest.fixture(scope="module")
def logprobs_quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_logprobs")
    return out, run_quick("bench_logprobs.py", "logprobs_cpu.json", out)[0]


def test_logprobs_quick_run_has_every_row(logprobs_quick_run):
    out, data = logprobs_quick_run
    rows, meta = data["rows"], data["meta"]
    assert meta["backends"]["logits"] and meta["backends"]["linear"]
    labels = {
        bench_logprobs.Shape(*s).label: bench_logprobs.Shape(*s)
        for s in bench_logprobs.QUICK_SHAPES
    }
    assert {r["shape"] for r in rows} == set(labels)
    for label, shape in labels.items():
        family = "linear" if shape.linear else "logits"
        ours_name = "vapo.linear_logprobs" if shape.linear else "vapo.token_logprobs"
        want = {(t, f"{ours_name}[{b}]") for t in shape.tasks for b in meta["backends"][family]}
        want |= {k for k in LOGPROBS_PEERS if k[0] in shape.tasks}
        if shape.linear:
            want.add(("linear", "torch.matmul (floor)"))
        got = {(r["task"], r["impl"]) for r in rows if r["shape"] == label}
        assert want <= got, sorted(want - got)
        for key in got:  # one row per mode
            modes = [
                r["mode"] for r in rows if r["shape"] == label and (r["task"], r["impl"]) == key
            ]
            assert sorted(modes) == ["fwd", "fwd+bwd"], (key, modes)
    for key in (
        "device_name",
        "torch",
        "median_s",
        "iqr_s",
        "floor_s",
        "fraction_of_floor",
        "peak_mem_bytes",
        "speedup_vs_best_peer",
        "verified",
        "note",
    ):
        assert all(key in r for r in rows), key
    assert (out / "logprobs_cpu_logits.png").stat().st_size > 0
    assert (out / "logprobs_cpu_linear.png").stat().st_size > 0
    assert "floor fwd" in (out / "logprobs_cpu.txt").read_text()


def test_logprobs_quick_run_verified_ours_before_timing(logprobs_quick_run):
    _, data = logprobs_quick_run
    ours = [r for r in data["rows"] if r["kind"] == "ours"]
    assert ours
    for r in ours:
        assert r["status"] == "ok", r
        assert r["verified"] is True and r["verified_against"].startswith("float64"), r
        assert r["err_over_tol"] <= 1, r
        assert r["median_s"] > 0 and r["floor_s"] > 0 and r["fraction_of_floor"] > 0, r
        assert r["peak_mem_bytes"] is not None and r["peak_mem_bytes"] >= 0, r
        if r["mode"] == "fwd+bwd":
            assert r["grad_rel_err"] is not None and r["grad_rel_err"] < 0.02, r
    floor = [r for r in data["rows"] if r["kind"] == "floor"]
    assert floor and all(r["status"] == "ok" and r["median_s"] > 0 for r in floor)


def test_logprobs_quick_run_peers_checked_or_skipped_with_reason(logprobs_quick_run):
    _, data = logprobs_quick_run
    for r in (r for r in data["rows"] if r["kind"] == "peer"):
        key = (r["task"], r["impl"])
        assert key in LOGPROBS_PEERS, key
        if r["status"] == "ok":
            assert r["verified"] is True and r["median_s"] > 0, r
            assert r["verified_against"].startswith("vapo."), r  # ours ran first and passed
        else:
            assert r["status"] == "skipped" and r["note"], r
            package = LOGPROBS_PEERS[key]
            if package is not None and installed(package) and "CUDA" not in r["note"]:
                # installed and not CUDA-only: only a version too old, or a dependency the
                # peer's --no-deps install (.ci/install_peers.sh) left out, may skip it
                too_old = "needs trl >= 1.16" in r["note"]
                missing_dep = "not loadable: ModuleNotFoundError" in r["note"]
                assert too_old or missing_dep, r
    by_key = {(r["task"], r["impl"], r["mode"]): r for r in data["rows"] if r["kind"] == "peer"}
    for mode in ("fwd", "fwd+bwd"):  # plain torch always runs on CPU
        assert by_key[("logp", "torch eager", mode)]["status"] == "ok"
        assert by_key[("linear", "torch eager", mode)]["status"] == "ok"


def _logprobs_state(shape):
    args = argparse.Namespace(
        dtype=torch.bfloat16,
        sets=1,
        seed=0,
        max_call_s=60.0,
        warmup=0,
        max_reps=1,
        budget=0.01,
        min_reps=1,
    )
    return args, bench_logprobs.prepare_shape(shape, args, torch.device("cpu"))


def _run(impl, mode, st, args):
    r = bench_logprobs.Result(impl, mode)
    bench_logprobs.run_mode(r, st, st.sets, args, torch.device("cpu"), None)
    return r


def test_logprobs_checks_refuse_wrong_answers():
    bl = bench_logprobs
    args, st = _logprobs_state(bl.Shape(64, 700))

    def peer(name, fn, task="logp"):
        return bl.Impl(name, task, "peer", fn)

    # no row of ours has run: peers are held to the float64 rows
    right = peer("torch eager", lambda x: bl.torch_logp_ent(bl._z(x), x.targets), "logp+ent")
    shifted = peer("shifted", lambda x: (bl.torch_logp(bl._z(x), x.targets.roll(1)), None))
    flipped = peer("flipped", lambda x: (-bl.torch_logp(bl._z(x), x.targets), None))
    low_ent = peer(
        "entropy of the wrong rows",
        lambda x: (
            bl.torch_logp(bl._z(x), x.targets),
            bl.torch_logp_ent(bl._z(x), x.targets)[1].roll(1),
        ),
        "logp+ent",
    )
    # right values, no gradient through the softmax
    no_grad = peer(
        "no softmax gradient",
        lambda x: (
            bl._z(x).gather(-1, x.targets[:, None]).squeeze(-1)
            - bl._z(x).detach().float().logsumexp(-1),
            None,
        ),
    )
    for mode in bl.MODES:
        assert _run(right, mode, st, args).status == "ok"
    for impl in (shifted, flipped, low_ent):
        r = _run(impl, "fwd", st, args)
        assert r.status == "failed_verification" and r.stats is None, (impl.name, r)
    assert _run(no_grad, "fwd", st, args).status == "ok"
    r = _run(no_grad, "fwd+bwd", st, args)
    assert r.status == "failed_verification" and r.grad_rel_err > 0.5 and r.stats is None, r

    # ours first: then the peers are compared with ours at full size
    ours = bl.Impl("vapo", "logp", "ours", lambda x: (vk.token_logprobs(bl._z(x), x.targets), None))
    for mode in bl.MODES:
        r = _run(ours, mode, st, args)
        assert r.status == "ok" and r.verified_against.startswith("float64"), r
    assert st.expected["logp"].source == "vapo" and st.expected["logp"].grads is not None
    r = _run(
        peer("torch eager", lambda x: (bl.torch_logp(bl._z(x), x.targets), None)),
        "fwd+bwd",
        st,
        args,
    )
    assert r.status == "ok" and r.verified_against == "vapo", r
    # a wrong row outside the float64 rows is caught at full size
    bad_row = int(torch.arange(st.shape.n)[~torch.isin(torch.arange(st.shape.n), st.check_rows)][0])

    def one_wrong(x):
        lp = bl.torch_logp(bl._z(x), x.targets).clone()
        lp[bad_row] -= 1.0
        return lp, None

    assert _run(peer("one wrong row", one_wrong), "fwd", st, args).status == "failed_verification"


def test_logprobs_linear_checks():
    bl = bench_logprobs
    args, st = _logprobs_state(bl.Shape(48, 600, 64))
    ours = bl.Impl(
        "vapo",
        "linear+ent",
        "ours",
        lambda x: bl._pair(vk.linear_logprobs(x.hidden, x.weight, x.targets, return_entropy=True)),
    )
    for mode in bl.MODES:
        r = _run(ours, mode, st, args)
        assert r.status == "ok", r
        assert mode == "fwd" or r.grad_rel_err < 1e-2, r
    eager = bl.Impl(
        "torch eager",
        "linear+ent",
        "peer",
        lambda x: bl.torch_linear_logp_ent(x.hidden, x.weight, x.targets),
    )
    assert _run(eager, "fwd+bwd", st, args).status == "ok"
    # a wrong weight gradient (hidden's is right) is caught
    wrong_dw = bl.Impl(
        "detached head",
        "linear+ent",
        "peer",
        lambda x: bl.torch_linear_logp_ent(x.hidden, x.weight.detach() + 0 * x.weight, x.targets),
    )
    r = _run(wrong_dw, "fwd+bwd", st, args)
    assert r.status == "failed_verification", r
