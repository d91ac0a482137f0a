"""Each ``vapo-diagnose`` subcommand end to end on the tiny preset (seconds), its outputs,
its determinism, and errors that name the user's argument."""

from __future__ import annotations

import json

import pytest

from vapo_kernels.diagnose.cli import main
from vapo_kernels.diagnose.value_probe import _num


def _run(tmp_path, study, *args, name="out"):
    out = tmp_path / name
    code = main([study, "--preset", "tiny", "--no-progress", "--output-dir", str(out), *args])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    for figure in results["results"]["figures"]:
        assert (out / figure).stat().st_size > 1000, figure
    report = (out / "report.md").read_text()
    assert report.startswith("# ") and f"Figures: {', '.join(results['results']['figures'])}." in report
    for key in ("seed", "options", "trainer_config", "versions", "wall_s"):
        assert key in results, key
    assert results["versions"]["torch"]
    return results, report


# Trainer options under which the tiny preset's policy solves some chains (the preset
# alone solves none: every reward and so every value is 0, and no advantage is negative).
SOLVING = ["--min_steps", "1", "--warmup_steps", "40", "--warmup_lr", "1e-2",
           "--value_pretrain_steps", "2"]


def test_injected_errors_tiny_run(tmp_path):
    results, report = _run(tmp_path, "injected-errors", "--rl-stages", "1", "--", *SOLVING)
    r = results["results"]
    assert [s["name"] for s in r["stages"]] == [
        "warm-up (critic untrained)", "value-pretrained (2 steps)", "RL step 1"]
    partitions = 0
    for stage in r["stages"]:
        assert len(stage["uniform_share_of_step_k"]) == r["length"] == 3
        for data in stage["lambdas"].values():
            assert len(data["mass_at_k"]) == 3 and len(data["credit_map"]) == 3
            assert all(len(row) == 3 for row in data["credit_map"])
            # The shares are a partition of the negative mass wherever there is some.
            for at, before, after in zip(data["mass_at_k"], data["mass_before_k"],
                                         data["mass_after_k"]):
                if at is not None:
                    assert 0 <= at <= 1 and at + before + after == pytest.approx(1.0)
                    partitions += 1
    # The trained critic gives every GAE row negative advantage at every k (the untrained
    # one, V = 0 = reward, none): the checks above ran on them.
    last = r["stages"][-1]["lambdas"]
    assert all(None not in d["mass_at_k"] for d in last.values()) and partitions >= 2 * 3 * len(last)
    row = next(line for line in report.splitlines() if line.startswith("| RL step 1 |"))
    assert "n/a" not in row and "no negative advantage" not in report.split("At the last stage")[1]
    # The Monte-Carlo row (K = 2 continuations on the tiny preset) is measured beside the
    # lambda rows on the same chains, and its sampling leaves the training run alone: the
    # same run without it has the same lambda rows at every stage.
    mc = "Monte-Carlo (K=2 continuations)"
    assert all(mc in stage["lambdas"] for stage in r["stages"])
    assert mc in report and "Monte-Carlo credit beside GAE" in report
    without, _ = _run(tmp_path, "injected-errors", "--rl-stages", "1", "--mc-samples", "0",
                      "--", *SOLVING, name="no_mc")
    for a, b in zip(r["stages"], without["results"]["stages"]):
        assert {k: v for k, v in a["lambdas"].items() if k != mc} == b["lambdas"]
        assert a["heldout_accuracy"] == b["heldout_accuracy"]


def test_value_probe_tiny_run_is_reproducible(tmp_path):
    args = ["value-probe", "--rl-stages", "1", "--samples", "3", "--", *SOLVING]
    first, report = _run(tmp_path, *args, name="a")
    stages = first["results"]["stages"]
    assert len(stages) == 3
    for stage in stages:
        probe = stage["probe"]
        assert len(probe["value"]) == len(probe["mc_value"]) == len(probe["position"]) > 0
        # A mean of 3 rewards in {0, 1}: a multiple of 1/3 in [0, 1].
        assert all(abs(3 * v - round(3 * v)) < 1e-9 and 0 <= v <= 1 for v in probe["mc_value"])
        assert len(stage["ranking"]["mc_value"]) == 4 and len(stage["ranking"]["mc_value"][0]) == 3
    # The critic is untrained (zero head) before value pretraining: V = 0 everywhere;
    # trained, it varies, and the true values vary: the runs compare numbers, not zeros.
    assert all(v == 0.0 for v in stages[0]["probe"]["value"])
    for stage in stages[1:]:
        assert len(set(stage["probe"]["value"])) > 2 and len(set(stage["probe"]["mc_value"])) > 1
        assert stage["summary"]["r_squared"] is not None
        assert f"| {_num(stage['summary']['r_squared'])} |" in report
    assert "R^2 (1 - MSE/Var)" in report and "explained variance" not in report
    second, _ = _run(tmp_path, *args, name="b")
    assert second["results"]["stages"] == stages


def test_bad_arguments_name_the_option(tmp_path, capsys):
    code = main(["injected-errors", "--preset", "tiny", "--no-progress", "--length", "9",
                 "--output-dir", str(tmp_path / "x")])
    assert code == 2
    assert "--length" in capsys.readouterr().err
    code = main(["value-probe", "--preset", "tiny", "--no-progress", "--output-dir",
                 str(tmp_path / "y"), "--", "--no_such_option", "1"])
    assert code == 2
    assert "no_such_option" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["value-probe", "--samples", "0"])
    assert "--samples" in capsys.readouterr().err


def _one_error_line(capsys, argv, option):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vapo-diagnose: error:") and option in err[0], err


def test_bad_runs_are_refused_before_they_write(tmp_path, capsys):
    # Each found by an adversarial review of the CLI.
    study = ["injected-errors", "--preset", "tiny", "--no-progress"]
    # --model crashed every study with an AttributeError (args.model read after popping it).
    _one_error_line(capsys, [*study, "--output-dir", str(tmp_path / "m"), "--model",
                             str(tmp_path / "nonexistent")], "--model")
    # A second study into a folder holding one appended to its metrics.jsonl and reported
    # doubled curves; the default folder (one per day) made that the default.
    used = tmp_path / "used"
    used.mkdir()
    (used / "results.json").write_text("{}")
    _one_error_line(capsys, [*study, "--output-dir", str(used)], "--output-dir")
    (tmp_path / "a_file").write_text("")
    _one_error_line(capsys, [*study, "--output-dir", str(tmp_path / "a_file")], "--output-dir")
    # Trainer options the study sets itself were silently overridden or ignored after '--'.
    for tail, option in ((["--seed", "7"], "--seed"), (["--steps", "5"], "--steps"),
                         (["--output_dir=elsewhere"], "--output-dir"),
                         (["--see", "7"], "--seed")):  # argparse's abbreviation of --seed
        _one_error_line(capsys, [*study, "--output-dir", str(tmp_path / "t"), "--", *tail], option)
    # A refused study leaves no folder behind.
    _one_error_line(capsys, [*study, "--length", "9", "--output-dir", str(tmp_path / "x")],
                    "--length")
    assert not (tmp_path / "x").exists() and not (tmp_path / "t").exists()
    with pytest.raises(SystemExit):  # refused by the trainer's own parser: no folder either
        main([*study, "--output-dir", str(tmp_path / "p"), "--", "--lr", "-1"])
    assert not (tmp_path / "p").exists() and "--lr" in capsys.readouterr().err
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    _one_error_line(capsys, [*study, "--output-dir", str(tmp_path / "dangling")], "--output-dir")
    # A repeated seed or length ran twice into one folder and counted twice; an empty list
    # ran nothing and crashed after training.
    for argv, option in ((["ablations", "--seeds", "1,1"], "--seeds"),
                         (["short-vs-long", "--lengths", "2,2"], "--lengths"),
                         (["short-vs-long", "--lambdas", ","], "--lambdas")):
        with pytest.raises(SystemExit):
            main(argv)
        assert option in capsys.readouterr().err


def test_ablations_tiny_run(tmp_path):
    # --rows without full VAPO ("none"), with a space after the comma: full VAPO is added,
    # first (every row is compared with it), and the names are read without their spaces.
    results, report = _run(tmp_path, "ablations", "--rows", "no_value_pretrain, vanilla_ppo",
                           "--seeds", "3")
    r = results["results"]
    assert [row["ablation"] for row in r["rows"]] == ["none", "no_value_pretrain", "vanilla_ppo"]
    assert [row["paper_aime24"] for row in r["rows"]] == [60, 11, 5]
    # What ran is recorded: the seeds given (--seed's default did not run), the rows.
    assert results["seed"] == 3 and results["options"]["seeds"] == r["seeds"] == [3]
    assert results["options"]["rows"] == "none,no_value_pretrain,vanilla_ppo"
    for row in r["rows"]:
        assert len(row["final_accuracy"]) == 1 and 0 <= row["final_accuracy"][0] <= 1
        assert row["curves"][0][0][0] == 0  # evaluated before the first RL update
    sp = r["spearman"]
    assert (f"rho = {sp['rho']:.2f} (p = {sp['p_value']:.2f}, 3 rows)" if sp["rho"] is not None
            else "every row ended at the same accuracy") in report
    assert "Bonferroni's correction for 2 tests (2.24 se)" in report
    # Rows without value pretraining never enter that phase; full VAPO's ran once for the
    # seed, in its own folder, and the row continued from it.
    runs = tmp_path / "out" / "runs" / "seed3"
    assert '"value_pretrain"' not in (runs / "vanilla_ppo" / "metrics.jsonl").read_text()
    assert '"value_pretrain"' in (runs / "value_pretrain_none" / "metrics.jsonl").read_text()
    assert [row["value_pretrain_runs"] for row in r["rows"]] == [["value_pretrain_none"], [None], [None]]
    assert r["value_pretraining"] == {"value_pretrain_none": ["none"]}


def test_ablation_rows_cover_the_paper_table():
    from vapo_kernels.diagnose.ablations import ROWS
    from vapo_kernels.train.config import ABLATIONS

    assert [score for *_, score in ROWS] == [60, 11, 33, 45, 46, 53, 54, 55, 5]
    assert all(name in ABLATIONS for _, name, _ in ROWS)


def test_short_vs_long_tiny_run(tmp_path):
    results, report = _run(tmp_path, "short-vs-long", "--lengths", "2,3", "--lambdas", "1.0",
                           "--alphas", "1.0")
    r = results["results"]
    assert set(r["per_length"]) == {"2", "3"}
    for L, data in r["per_length"].items():
        assert set(data["runs"]) == {"lambda 1", "adaptive alpha 1", "Monte-Carlo K=2"}
        errors = data["advantage_errors"]
        n = len(errors["truth"])
        assert n >= 3 and len(errors["position"]) == n
        # A step's true advantage is a difference of two values in [0, 1].
        assert all(-1 <= t <= 1 for t in errors["truth"])
        assert all(len(e) == n for e in errors["errors"].values())
        assert max(errors["position"]) <= int(L)  # steps 0..L-1, then the answer
        for run in data["runs"].values():
            assert run["curve"][0][0] == 0 and run["curve"][-1][0] == 1
            # Wall time: 0 before the first update, growing, one point per evaluation.
            times = [t for t, _ in run["wall_curve"]]
            assert times[0] == 0 and times[-1] > 0 and times == sorted(times)
            assert [a for _, a in run["wall_curve"]] == [a for _, a in run["curve"]]
        # The Monte-Carlo setting trained with --advantage mc (its metrics time the Monte-
        # Carlo advantages), the GAE settings did not.
        rows = (tmp_path / "out" / "runs" / f"L{L}" / "Monte-Carlo_K=2" / "metrics.jsonl").read_text()
        assert "time_mc_advantage_s" in rows
        assert "time_mc_advantage_s" not in (
            tmp_path / "out" / "runs" / f"L{L}" / "lambda_1" / "metrics.jsonl").read_text()
    assert "alpha = 0.05" in report
    assert "Monte-Carlo K=2 at chains of 2 steps" in report


def test_without_matplotlib_a_study_is_refused_at_once(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    _one_error_line(capsys, ["ablations", "--preset", "tiny", "--no-progress", "--rows", "none",
                             "--output-dir", str(tmp_path / "out")], "pip install matplotlib")
    assert not (tmp_path / "out").exists()


def test_results_and_report_are_written_before_the_figures(tmp_path, monkeypatch):
    from vapo_kernels.diagnose import ablations

    def broken(results, out_dir):
        raise RuntimeError("a figure failed")

    monkeypatch.setattr(ablations, "plot", broken)
    with pytest.raises(RuntimeError, match="a figure failed"):
        main(["ablations", "--preset", "tiny", "--no-progress", "--rows", "none",
              "--output-dir", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [row["ablation"] for row in results["results"]["rows"]] == ["none"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.startswith("# ablations") and "Figures:" not in report


def test_an_output_dir_that_cannot_be_made_is_named(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    for path in (tmp_path / "a_file" / "sub", "/proc/no_such_folder"):  # a traceback before
        _one_error_line(capsys, ["ablations", "--preset", "tiny", "--output-dir", str(path)],
                        "--output-dir")


def test_a_refusal_inside_the_run_leaves_nothing_behind(tmp_path, capsys):
    """The trainer refuses the task file after making the run's folder (out/runs/...):
    what the study made goes; a folder the user made stays, empty as it was."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    argv = ["ablations", "--preset", "tiny", "--no-progress", "--rows", "none"]
    _one_error_line(capsys, [*argv, "--output-dir", str(tmp_path / "new" / "out"), "--", "--task",
                             f"jsonl:{empty}"], "--eval-size")
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    _one_error_line(capsys, [*argv, "--output-dir", str(tmp_path / "mine"), "--", "--task",
                             f"jsonl:{empty}"], "--eval-size")
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def _refused(capsys, tmp_path, argv, option):
    """``argv`` (study, its options, maybe '--' and trainer options) on the tiny preset is
    refused with one line naming ``option``, and leaves no output folder."""
    out = tmp_path / "out"
    study, rest = argv[0], argv[1:]
    cut = rest.index("--") if "--" in rest else len(rest)
    _one_error_line(capsys, [study, "--preset", "tiny", "--no-progress", *rest[:cut],
                             "--output-dir", str(out), *rest[cut:]], option)
    assert not out.exists(), argv


def test_running_sum_studies_check_the_task_before_training(tmp_path, capsys):
    # injected-errors and value-probe checked it after warm-up (a traceback), short-vs-long
    # never did.
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"prompt": "1+1=", "answer": "2"}\n' * 40)
    for study in ("injected-errors", "value-probe", "short-vs-long"):
        _refused(capsys, tmp_path, [study, "--", "--task", f"jsonl:{tasks}"], "--task")


def test_trainer_options_a_study_sets_are_refused_after_the_dashes(tmp_path, capsys):
    # ablations applied a user's --ablation under every row's own switches, full VAPO's
    # included; short-vs-long set these per length and setting, over the user's value.
    for argv, option in ((["ablations", "--", "--ablation", "vanilla_ppo"], "--ablation"),
                         (["ablations", "--", "--abl=none"], "--ablation"),
                         (["short-vs-long", "--", "--max_steps", "5"], "--max-steps"),
                         (["short-vs-long", "--", "--min_st", "1"], "--min-steps"),
                         (["short-vs-long", "--", "--lam_policy", "0.9"], "--lam-policy"),
                         (["short-vs-long", "--", "--alpha", "1"], "--alpha"),
                         (["short-vs-long", "--", "--no_length_adaptive"], "--length-adaptive"),
                         (["short-vs-long", "--", "--advantage", "mc"], "--advantage"),
                         (["short-vs-long", "--", "--mc_samples", "3"], "--mc-samples")):
        _refused(capsys, tmp_path, argv, option)


def test_ablations_values_that_mean_nothing_are_refused(tmp_path, capsys):
    for argv, option in ((["ablations", "--rows", "none", "--threshold", "60"], "--threshold"),
                         (["ablations", "--rows", "none", "--threshold", "nan"], "--threshold"),
                         # --seeds replaced --seed without a word
                         (["ablations", "--rows", "none", "--seeds", "1,2", "--seed", "5"], "--seed")):
        _refused(capsys, tmp_path, argv, option)


def test_values_that_mean_nothing_are_refused(tmp_path, capsys):
    _refused(capsys, tmp_path, ["short-vs-long", "--alphas", "nan"], "--alphas")
    # A stage at 0 RL steps measured nothing and was dropped without a word.
    with pytest.raises(SystemExit):
        main(["injected-errors", "--preset", "tiny", "--rl-stages", "0,1",
              "--output-dir", str(tmp_path / "out")])
    assert "--rl-stages" in capsys.readouterr().err and not (tmp_path / "out").exists()
