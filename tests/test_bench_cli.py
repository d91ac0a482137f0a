"""``vapo-bench``'s command line: bad input stops before any work with one line naming the
option (exit 2); an earlier report is not overwritten without --force; a run cut short
says so in its report; --sanitize where it cannot run says so."""

from __future__ import annotations

import json

import pytest
import torch

import vapo_kernels as vk
from vapo_kernels.bench import cli
from vapo_kernels.bench import harness as H


def refused(argv: list[str], capsys) -> str:
    """The one-line error of a refused command line."""
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vapo-bench: error: "), err
    return err


@pytest.mark.parametrize("suite, shapes, words", [
    ("gae", "8x128x4", "the gae suite takes BxT"),
    ("gae", "tokens:8x128", "the gae suite takes BxT"),
    ("gae", "8x0", "positive"),
    ("gae", "0x128", "positive"),
    ("gae", "-8x128", "positive"),
    ("gae", "", "expected shapes like"),  # --shapes= is not the default shapes
    ("gae", "99999999999x99999999999", "GiB, more than"),
    ("loss", "8x128", "tokens:BxT or logits:NxV or hidden:NxVxH"),
    ("loss", "foo:8x128", "tokens:BxT or logits:NxV or hidden:NxVxH"),
    ("loss", "tokens:8x128x3", "tokens:BxT or logits:NxV or hidden:NxVxH"),
    ("loss", "logits:2049x8", "equal sequences"),
    ("logprobs", "1024", "NxV or NxVxH"),
    ("logprobs", "4x8x0", "positive"),
])
def test_shapes_are_checked_per_suite_at_parse_time(suite, shapes, words, capsys):
    err = refused(["--suite", suite, f"--shapes={shapes}"], capsys)
    assert "--shapes" in err and words in err


@pytest.mark.parametrize("argv, words", [
    (["--budget", "0"], "--budget"),
    (["--budget", "-1"], "--budget"),
    (["--budget", "nan"], "--budget"),
    (["--max-call-s", "-1"], "--max-call-s"),
    (["--max-call-s", "inf"], "--max-call-s"),
    (["--max-spread", "-1"], "--max-spread"),
    (["--per-call-threads", "0"], "--per-call-threads"),
    (["--per-call-threads", "-3"], "--per-call-threads"),
    (["--turn-s", "0"], "--turn-s"),
    (["--turn-s", "-1"], "--turn-s"),
    (["--turn-s", "nan"], "--turn-s"),
    (["--backends", "nosuch"], "'nosuch' (known: reference, cpp, triton, cuda)"),
    (["--backends", ""], "--backends"),
])
def test_numbers_and_backends_are_checked_at_parse_time(argv, words, capsys):
    assert words in refused(argv, capsys)


def test_a_backend_that_cannot_run_here_is_refused(capsys):
    here = {b for f in ("gae", "logprobs", "loss") for b in vk.available_backends(f, "cpu")}
    absent = [b for b in vk._backends.BACKENDS if b not in here]
    if not absent:
        pytest.skip("every backend runs on this machine's CPU")
    err = refused(["--device", "cpu", "--backends", absent[0]], capsys)
    assert f"--backends: {absent[0]} cannot run here" in err


def test_duplicate_suites_and_backends_run_once(tmp_path):
    args = cli.parse_args(["--suite", "gae,gae", "--shapes", "2x16", "--device", "cpu",
                           "--backends", "reference,reference", "--out", str(tmp_path / "o")])
    assert args.suites == ["gae"] and args.backends == ["reference"]
    assert args.shapes == [(2, 16)]


def test_out_must_be_a_writable_folder_without_an_earlier_report(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert "--out" in refused(["--out", str(afile)], capsys)
    assert "--out" in refused(["--out", str(afile / "x")], capsys)
    old = tmp_path / "old"
    old.mkdir()
    for f in ("results.json", "report.md", "gae.png", "notes.txt"):
        (old / f).write_text("earlier")
    err = refused(["--out", str(old)], capsys)
    assert "--out" in err and "--force" in err and (old / "gae.png").exists()
    args = cli.parse_args(["--out", str(old), "--force"])
    assert args.out == old and sorted(p.name for p in old.iterdir()) == ["notes.txt"]
    new = tmp_path / "a" / "b"
    assert cli.parse_args(["--out", str(new)]).out == new and new.is_dir()


@pytest.fixture
def no_timing(monkeypatch):
    """run_case as a stub (no rows) and a fixed bandwidth: the CLI's own logic, fast."""
    calls = []

    def run_case(case, device, timing, **kw):
        calls.append(case.shape)
        return []

    monkeypatch.setattr(H, "run_case", run_case)
    monkeypatch.setattr(H, "copy_bandwidth", lambda device, nbytes: 1e10)
    return calls


def test_an_interrupted_run_says_so_and_exits_130(tmp_path, no_timing, monkeypatch, capsys):
    def stop_at_second_shape(case, device, timing, **kw):
        if no_timing:
            raise KeyboardInterrupt
        no_timing.append(case.shape)
        return []

    monkeypatch.setattr(H, "run_case", stop_at_second_shape)
    out = tmp_path / "o"
    rc = cli.main(["--suite", "gae", "--shapes", "2x16,2x32", "--quick", "--device", "cpu",
                   "--out", str(out)])
    assert rc == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"vapo-bench: interrupted; the partial report is in {out}"
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["complete"] is False
    assert meta["progress"] == "interrupted (Ctrl-C) with 1 of 2 shapes measured, the last gae 2x16"
    md = (out / "report.md").read_text().splitlines()
    assert md[2].startswith("**Incomplete run**: interrupted (Ctrl-C) with 1 of 2 shapes")


def test_a_finished_run_is_marked_complete(tmp_path, no_timing):
    out = tmp_path / "o"
    assert cli.main(["--suite", "gae", "--shapes", "2x16", "--quick", "--device", "cpu",
                     "--no-sanitize", "--out", str(out)]) == 0
    assert no_timing == ["2x16"]
    assert json.loads((out / "results.json").read_text())["meta"]["complete"] is True
    assert "Incomplete" not in (out / "report.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="compute-sanitizer may run on a GPU")
def test_sanitize_asked_for_where_it_cannot_run_says_so(tmp_path, no_timing, capsys):
    out = tmp_path / "o"
    assert cli.main(["--suite", "gae", "--shapes", "2x16", "--quick", "--device", "cpu",
                     "--sanitize", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "vapo-bench: --sanitize: not run: it checks CUDA kernels; this run is on cpu" in err
    assert "compute-sanitizer not run although --sanitize was given" in (out / "report.md").read_text()


def test_turn_s_and_seed_reach_the_timing_settings(tmp_path, monkeypatch):
    """--turn-s and --seed set how the rows of a shape are interleaved; inf (one block per
    row, the design before the rounds) is written as null in results.json."""
    seen = []

    def run_case(case, device, timing, **kw):
        seen.append(timing)
        return []

    monkeypatch.setattr(H, "run_case", run_case)
    monkeypatch.setattr(H, "copy_bandwidth", lambda device, nbytes: 1e10)
    for argv, turn in ((["--seed", "7"], 0.02), (["--seed", "7", "--turn-s", "inf"], None)):
        out = tmp_path / str(turn)
        assert cli.main(["--suite", "gae", "--shapes", "2x16", "--quick", "--device", "cpu",
                         "--no-sanitize", "--out", str(out), *argv]) == 0
        assert seen[-1].seed == 7
        timing = json.loads((out / "results.json").read_text())["meta"]["timing"]
        assert timing["turn_s"] == turn and timing["seed"] == 7
