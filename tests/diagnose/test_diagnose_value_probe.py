"""value-probe's model-size sweep (--model-sizes): one whole run per hidden size of the
built-in model, compared in the JSON, the report and value_error_by_size.png."""

from __future__ import annotations

import json

from vapo_kernels.diagnose import value_probe
from vapo_kernels.diagnose.cli import main

ARGS = ["--preset", "tiny", "--no-progress", "--rl-stages", "1", "--samples", "2"]


def _run(tmp_path, name, *args):
    out = tmp_path / name
    assert main(["value-probe", *ARGS, "--output-dir", str(out), *args]) == 0
    return json.loads((out / "results.json").read_text())["results"], (out / "report.md").read_text()


def test_model_sizes_sweep(tmp_path):
    sweep, report = _run(tmp_path, "sweep", "--model-sizes", "16,32")
    assert sweep["model_sizes"] == [16, 32]
    assert [(m["label"], m["hidden_size"]) for m in sweep["models"]] == [("hidden 16", 16),
                                                                           ("hidden 32", 32)]
    assert sweep["models"][0]["parameters"] < sweep["models"][1]["parameters"]
    stages = {m["label"]: [s for s in sweep["stages"] if s["model"] == m["label"]]
              for m in sweep["models"]}
    assert [len(s) for s in stages.values()] == [3, 3]  # warm-up, value-pretrained, RL step 1
    assert "value_error_by_size.png" in sweep["figures"]
    assert (tmp_path / "sweep" / "value_error_by_size.png").stat().st_size > 1000
    assert {"value_error_h16.png", "value_error_h32.png"} <= set(sweep["figures"])
    assert "By model size" in report and "| model | stage |" in report
    # Each size is the same run as without the sweep: the tiny preset's model is hidden 32.
    alone, alone_report = _run(tmp_path, "alone")
    assert alone["model_sizes"] == [] and [m["label"] for m in alone["models"]] == ["hidden 32"]
    assert stages["hidden 32"] == alone["stages"]
    assert "--model-sizes" in alone_report  # says how to vary the size


def test_preset_sizes_give_way_to_the_users_model(tmp_path, monkeypatch):
    monkeypatch.setitem(value_probe.PRESETS, "tiny", {**value_probe.PRESETS["tiny"],
                                                      "model_sizes": [16, 32]})
    # As the trainer reads it: an abbreviation (argparse's prefix) sets the size as well.
    results, _ = _run(tmp_path, "mine", "--", "--tiny_hidden", "16")
    assert [m["label"] for m in results["models"]] == ["hidden 16"]


def test_bad_model_sizes_name_the_option(tmp_path, capsys):
    # The tiny preset's model has 2 heads: a hidden size must be a multiple of it.
    code = main(["value-probe", *ARGS, "--output-dir", str(tmp_path / "x"), "--model-sizes", "16,33"])
    assert code == 2
    assert "--model-sizes" in capsys.readouterr().err


def test_every_model_size_is_checked_before_any_trains(tmp_path, capsys, monkeypatch):
    def trained(*_, **__):
        raise AssertionError("a size trained before every size was checked")

    monkeypatch.setattr(value_probe, "probe_stages", trained)
    # 30 / 2 heads = 15 dims per head: odd, refused by the trainer (rotary embeddings), after
    # hidden 16 had run.
    code = main(["value-probe", *ARGS, "--output-dir", str(tmp_path / "x"), "--model-sizes", "16,30"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model-sizes: hidden size 30" in err[0], err
    assert not (tmp_path / "x").exists()


def _record_trainer_configs(monkeypatch) -> list:
    """The trainer configs value-probe builds, in order (it still builds them)."""
    seen, build = [], value_probe.trainer_config

    def recorded(*args, **kwargs):
        seen.append(build(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(value_probe, "trainer_config", recorded)
    return seen


def test_a_config_files_threads_reach_every_run(tmp_path, monkeypatch):
    # The study's --threads 1 sat on the trainer's command line, where it won over a trainer
    # --config file's threads without a word (the file's other options did reach the runs).
    seen = _record_trainer_configs(monkeypatch)
    path = tmp_path / "trainer.yaml"
    path.write_text("run: {threads: 2}\ntask: {eval_size: 8}\n")
    out = tmp_path / "out"
    assert main(["value-probe", *ARGS, "--output-dir", str(out), "--model-sizes", "16",
                 "--", "--config", str(path)]) == 0
    config = json.loads((out / "results.json").read_text())["trainer_config"]
    assert (config["run"]["threads"], config["task"]["eval_size"]) == (2, 8)
    # the base config and the size's
    assert [(c.run.threads, c.model.tiny_hidden_size) for c in seen] == [(2, 32), (2, 16)]
    # Without the file (or the trainer's --threads) the study's one thread stays (stopped
    # before training: Ctrl-C).
    seen.clear()
    monkeypatch.setattr(value_probe, "probe_stages", _interrupted)
    assert main(["value-probe", *ARGS, "--output-dir", str(tmp_path / "b")]) == 130
    assert [c.run.threads for c in seen] == [1]


def _interrupted(*_, **__):
    raise KeyboardInterrupt


def test_model_sizes_beside_the_users_hidden_size_are_refused(tmp_path, capsys):
    # The sweep's --tiny_hidden_size, last on the trainer's command line, replaced the user's
    # (after '--' or in a trainer --config file) without a word.
    path = tmp_path / "trainer.yaml"
    path.write_text("model: {tiny_hidden_size: 48}\n")
    for tail, names in ((["--tiny_hidden_size", "48"], ["-- --tiny_hidden_size"]),
                        (["--tiny-hidden", "48"], ["-- --tiny_hidden_size"]),
                        (["--config", str(path)], ["tiny_hidden_size", str(path)])):
        out = tmp_path / "x"
        code = main(["value-probe", *ARGS, "--output-dir", str(out), "--model-sizes", "16,32",
                     "--", *tail])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith("vapo-diagnose: error: --model-sizes: ") and \
            all(name in err[0] for name in names), err
        assert not out.exists()


def test_the_preset_sweep_gives_way_to_a_config_files_hidden_size(tmp_path, monkeypatch):
    seen = _record_trainer_configs(monkeypatch)
    monkeypatch.setattr(value_probe, "probe_stages", _interrupted)  # stop before training
    monkeypatch.setitem(value_probe.PRESETS, "tiny", {**value_probe.PRESETS["tiny"],
                                                      "model_sizes": [16, 32]})
    path = tmp_path / "trainer.yaml"
    path.write_text("tiny_hidden_size: 48\n")
    assert main(["value-probe", *ARGS, "--output-dir", str(tmp_path / "a"), "--",
                 "--config", str(path)]) == 130
    assert [c.model.tiny_hidden_size for c in seen] == [48]  # no sweep
    seen.clear()
    assert main(["value-probe", *ARGS, "--output-dir", str(tmp_path / "b")]) == 130
    assert [c.model.tiny_hidden_size for c in seen] == [32, 16, 32]  # base, then each size
