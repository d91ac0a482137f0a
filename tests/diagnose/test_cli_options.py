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
    path.write_text("algorithm:\n  clip_high: 0.3\n")
    out = tmp_path / "out"
    assert main(_tiny("ablations", out, "--rows", "none", "--", "--config", str(path))) == 0
    config = json.loads((out / "results.json").read_text())["trainer_config"]
    assert config["algorithm"]["clip_high"] == 0.3 and config["run"]["config"] == str(path)


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
