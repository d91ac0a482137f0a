"""``vapo-diagnose`` as a new user meets it: defaults, help, trainer options in a
``--config`` file, refusals in one line, Ctrl-C."""

from __future__ import annotations

import pytest

from vapo_kernels.diagnose.cli import STUDIES, make_parser


@pytest.mark.parametrize("study", list(STUDIES))
def test_the_default_preset_is_quick(study):
    # --quick and --preset share a dest and argparse took --quick's default (None): every
    # study run without --preset crashed with KeyError: None after making its folder.
    parser = make_parser()
    assert parser.parse_args([study]).preset == "quick"
    assert parser.parse_args([study, "--quick"]).preset == "quick"
    assert parser.parse_args([study, "--preset", "tiny"]).preset == "tiny"


def _one_error_line(capsys, argv, *names):
    from vapo_kernels.diagnose.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vapo-diagnose: error:"), err
    for name in names:
        assert name in err[0], (name, err)
    return err[0]


def _tiny(study, out, *rest):
    return [study, "--preset", "tiny", "--no-progress", "--output-dir", str(out), *rest]


# An option each study sets itself, as a trainer --config file spells it (flat or grouped).
OWNED_IN_FILES = [
    ("injected-errors", "seed: 3\n", "--seed"),
    ("value-probe", "run:\n  steps: 4\n", "--steps"),
    ("short-vs-long", "lam_policy: 0.9\n", "--lam-policy"),
    ("short-vs-long", "task: {max_steps: 5}\n", "--max-steps"),
    ("short-vs-long", "advantage: mc\n", "--advantage"),
    ("ablations", "ablation: vanilla_ppo\n", "--ablation"),
    ("ablations", "output_dir: elsewhere\n", "--output-dir"),
]


@pytest.mark.parametrize("study, text, option", OWNED_IN_FILES)
def test_study_owned_options_in_a_config_file_are_refused(tmp_path, capsys, study, text, option):
    # The '--' check refused these on the command line, but a trainer --config file setting
    # them was silently overridden by the study (or, for --ablation, changed every row).
    path = tmp_path / "trainer.yaml"
    path.write_text(text)
    for spelling in (["--config", str(path)], [f"--config={path}"], ["--conf", str(path)]):
        out = tmp_path / "out"
        line = _one_error_line(capsys, _tiny(study, out, "--", *spelling), option, str(path))
        assert "set by the study itself" in line
        assert not out.exists()


def test_a_config_file_names_every_owned_option_it_sets(tmp_path, capsys):
    # A run's saved config.yaml sets every option: one line lists what to remove.
    path = tmp_path / "trainer.yaml"
    path.write_text("seed: 1\nclip_high: 0.3\nsteps: 2\nmin_steps: 2\n")
    line = _one_error_line(capsys, _tiny("short-vs-long", tmp_path / "o", "--", "--config",
                                         str(path)), "--seed", str(path), "steps", "min_steps")
    assert "clip_high" not in line


@pytest.mark.parametrize("make", ["missing", "folder", "not_yaml", "binary", "a_list",
                                  "unknown_option"])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, capsys, make):
    path = tmp_path / "trainer.yaml"
    if make == "folder":
        path.mkdir()
    elif make == "not_yaml":
        path.write_text("steps: [1\n")
    elif make == "binary":
        path.write_bytes(b"\xff\xfe\x00")
    elif make == "a_list":
        path.write_text("- 1\n- 2\n")
    elif make == "unknown_option":
        path.write_text("no_such_option: 1\n")
    out = tmp_path / "out"
    option = "--no-such-option" if make == "unknown_option" else "--config"
    for study in STUDIES:
        _one_error_line(capsys, _tiny(study, out, "--", "--config", str(path)), option, str(path))
        assert not out.exists()


def test_a_config_file_option_the_study_does_not_own_is_passed_through(tmp_path):
    import json

    from vapo_kernels.diagnose.cli import main

    path = tmp_path / "trainer.yaml"
    # eval_size and eval_every are the tiny preset's too (on the trainer's command line, where
    # they won over the file's values without a word).
    path.write_text("algorithm:\n  clip_high: 0.3\ntask: {eval_size: 8}\neval_every: 3\n")
    out = tmp_path / "out"
    assert main(_tiny("ablations", out, "--rows", "none", "--", "--config", str(path))) == 0
    results = json.loads((out / "results.json").read_text())
    config = results["trainer_config"]
    assert config["algorithm"]["clip_high"] == 0.3 and config["run"]["config"] == str(path)
    assert config["task"]["eval_size"] == 8 and results["results"]["eval_size"] == 8


def test_a_file_or_an_ablation_wins_over_the_preset(tmp_path):
    """The preset's options are defaults under the user's: a --config file's value and an
    --ablation's switches win over them (they sat on the trainer's command line, which wins
    over both), the user's command line still wins over the file."""
    from vapo_kernels.diagnose.ablations import row_config
    from vapo_kernels.diagnose.common import trainer_config

    path = tmp_path / "trainer.yaml"
    path.write_text("eval_size: 40\nthreads: 2\neval_every: 3\n")
    run = str(tmp_path / "run")
    config = trainer_config("tiny", 0, run, ["--config", str(path)])
    assert (config.task.eval_size, config.run.threads, config.run.eval_every) == (40, 2, 3)
    config = trainer_config("tiny", 0, run, ["--config", str(path), "--eval_size", "24"])
    assert config.task.eval_size == 24
    assert trainer_config("tiny", 0, run, ["--eval_size", "24"]).task.eval_size == 24
    # The tiny preset's --value_pretrain_steps 1 replaced the ablation's 0.
    for extra in (["--ablation", "no_value_pretrain"], ["--abl=vanilla_ppo"]):
        assert trainer_config("tiny", 0, run, extra).algorithm.value_pretrain_steps == 0
    path.write_text("ablation: no_value_pretrain\n")
    assert trainer_config("tiny", 0, run, ["--config", str(path)]).algorithm.value_pretrain_steps == 0
    # The command line's ablation (an explicit none too) wins over the file's, as in vapo-train.
    config = trainer_config("tiny", 0, run, ["--config", str(path), "--ablation", "none"])
    assert config.algorithm.value_pretrain_steps == 1
    assert trainer_config("tiny", 0, run).algorithm.value_pretrain_steps == 1
    # An ablations row: the study's defaults (--threads 1, --eval_every) give way to the file.
    path.write_text("threads: 2\neval_every: 3\nlm_coef: 0.5\n")
    options = {"preset": "tiny", "output_dir": str(tmp_path / "out"), "progress": False}
    config = row_config(options, 0, "none", ["--config", str(path)])
    assert (config.run.threads, config.run.eval_every, config.algorithm.lm_coef) == (2, 3, 0.5)
    assert row_config(options, 0, "no_lm_loss", ["--config", str(path)]).algorithm.lm_coef == 0
    config = row_config(options, 0, "none", [])
    assert (config.run.threads, config.run.eval_every) == (1, 1)


def test_option_names_include_the_config_file(tmp_path):
    # value-probe's --model-sizes sweep gives way to a hidden size the user chose: one set in
    # a --config file was not seen and the sweep replaced it.
    from vapo_kernels.diagnose.common import trainer_option_names, trainer_option_sources

    path = tmp_path / "trainer.yaml"
    path.write_text("model: {tiny_hidden_size: 48}\n")
    assert "tiny_hidden_size" in trainer_option_names(["--threads", "1", "--config", str(path)])
    assert trainer_option_sources(["--see", "1", f"--config={path}"]) == [
        ("seed", None), ("config", None), ("tiny_hidden_size", str(path))]
    assert trainer_option_names(["--threads", "1"]) == ["threads"]


def test_ablations_refuse_before_the_progress_bar(tmp_path, capsys):
    # The bar was drawn before the rows' configs were checked: the error line sat between
    # two bar lines on stderr.
    for tail, option in ((["--threads", "-1"], "--threads"), (["--eval_every", "0"], "--eval-every")):
        out = tmp_path / "out"
        _one_error_line(capsys, ["ablations", "--preset", "tiny", "--rows", "none", "--seeds",
                                 "0,1", "--output-dir", str(out), "--", *tail], option)
        assert not out.exists()


def test_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
    from vapo_kernels.diagnose import ablations, cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # While the study's module imports (seconds on a loaded machine): a traceback before.
    monkeypatch.setattr(cli.importlib, "import_module", interrupted)  # importlib's own
    assert cli.main(_tiny("ablations", tmp_path / "a")) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["vapo-diagnose: interrupted"]
    monkeypatch.undo()

    def interrupted_run(options, trainer_args):
        (tmp_path / "b" / "runs").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(ablations, "run_study", interrupted_run)
    assert cli.main(_tiny("ablations", tmp_path / "b")) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vapo-diagnose: interrupted; ") and \
        str(tmp_path / "b") in err[0], err


@pytest.mark.parametrize("study", list(STUDIES))
def test_help_says_each_default_and_the_owned_trainer_options(study, capsys):
    import importlib

    from vapo_kernels.diagnose import cli

    with pytest.raises(SystemExit) as stop:
        cli.main([study, "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    # argparse's defaults: "(default: None)" on every size, "(default: True)" on --no-progress
    assert "(default: None)" not in text and "(default: True)" not in text
    module = importlib.import_module(f"vapo_kernels.diagnose.{cli.STUDIES[study][0]}")
    sizes = {k for k in module.PRESETS["quick"] if f"--{k.replace('_', '-')}" in text}
    assert sizes and text.count("Preset tiny / quick / full:") == len(sizes)  # each lists them
    owned = {**cli._STUDY_OWNED, **getattr(module, "TRAINER_OWNED", {})}
    said = text.split("refuses them there and in the file:")[1]
    for name in owned:
        assert f"--{name.replace('_', '-')}".replace("-", "") in said.replace("-", ""), name
    if study == "short-vs-long":  # its --rl-steps is one number, not stages
        assert "comma-separated for the stage studies" not in text


def test_options_that_were_ignored_without_a_word_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    for argv, option, said in (
            # the trainer's --model after '--' replaced vapo-diagnose's --model
            (["value-probe", "--model", "a", "--", "--model", "b"], "--model", "given twice"),
            # no Monte-Carlo row to size
            (["injected-errors", "--mc-samples", "0", "--mc-problems", "2"], "--mc-problems",
             "turns off"),
            # cut to the tiny preset's 4 problems, and to --problems
            (["injected-errors", "--mc-problems", "5"], "--mc-problems", "4 --problems"),
            (["injected-errors", "--problems", "2", "--mc-problems", "3"], "--mc-problems",
             "2 --problems")):
        assert said in _one_error_line(capsys, _tiny(argv[0], out, *argv[1:]), option)
        assert not out.exists()
    from vapo_kernels.diagnose import injected_errors
    from vapo_kernels.diagnose.cli import _check_sizes

    _check_sizes(injected_errors, {"preset": "tiny", "mc_problems": 4, "mc_samples": None,
                                   "problems": None})


@pytest.mark.parametrize("study", list(STUDIES))
def test_a_file_value_of_the_wrong_type_is_one_line_naming_the_file(tmp_path, capsys, study):
    # The trainer's argparse read the file's string: "argument --clip_high/--clip-high:
    # invalid float value: 'abc'" (a SystemExit), the file not named.
    path = tmp_path / "trainer.yaml"
    out = tmp_path / "out"
    for text, option, said in (("clip_high: abc\n", "--clip-high", "invalid float value"),
                               ("kl_kind: k9\n", "--kl-kind", "invalid choice: 'k9'")):
        path.write_text(text)
        line = _one_error_line(capsys, _tiny(study, out, "--", "--config", str(path)),
                               f"error: {option}: {said}")
        assert line.endswith(f"(set in the --config file {path})"), line
        assert not out.exists()


@pytest.mark.parametrize("in_file", [False, True])
def test_a_refused_task_or_engine_names_where_it_was_set(tmp_path, capsys, monkeypatch,
                                                         in_file):
    # "drop -- --task" / "drop --rollout_engine" sent the user to a command line that did not
    # have it when the value came from the trainer --config file.
    from vapo_kernels.train import vllm_engine

    path, tasks = tmp_path / "trainer.yaml", tmp_path / "tasks.jsonl"
    tasks.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    out = tmp_path / "out"

    def tail(option, value):
        if in_file:
            path.write_text(f"{option}: {value}\n")
            return ["--", "--config", str(path)]
        return ["--", f"--{option}", value]
    said = (f"set in the trainer --config file {path}: remove {{}} from the file" if in_file
            else "drop -- --{}")
    line = _one_error_line(capsys, _tiny("injected-errors", out, *tail("task", f"jsonl:{tasks}")),
                           "--task", "needs the running_sum task")
    assert line.endswith(f"got 'jsonl:{tasks}': " + said.format("task")), line
    assert not out.exists()
    monkeypatch.setattr(vllm_engine, "unavailable", lambda device: None)  # as on a GPU
    line = _one_error_line(capsys, _tiny("ablations", out, "--rows", "none",
                                         *tail("rollout_engine", "vllm")), "--rollout-engine")
    assert line.endswith("got 'vllm': " + said.format("rollout_engine")), line
    assert not out.exists()


def test_with_options_keeps_where_the_file_s_options_were_set(tmp_path):
    from vapo_kernels.diagnose.common import with_options
    from vapo_kernels.train.config import parse_config

    path = tmp_path / "trainer.yaml"
    path.write_text("task: running_sum\nlam_policy: 0.9\n")
    config = parse_config(["--config", str(path)])
    assert with_options(config, steps=2).file_options == {"task", "lam_policy"}
    assert with_options(config, lam_policy=0.5).file_options == {"task"}  # the study's now
