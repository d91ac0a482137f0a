"""Options: --help, YAML + overrides, ablations, and one clear error line for bad configs."""

import dataclasses
import os
import subprocess
import sys

import pytest
import yaml

from vapo_kernels.train.cli import main
from vapo_kernels.train.config import ABLATIONS, GROUPS, TrainConfig, parse_config, save_config
from vapo_kernels.train.models import build_char_tokenizer, build_tiny_llama

from .conftest import tiny_argv


def test_help_lists_every_option_with_default_and_help():
    out = subprocess.run([sys.executable, "-m", "vapo_kernels.train", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for cls in GROUPS.values():
        for f in dataclasses.fields(cls):
            assert f"--{f.name}" in out, f.name
            assert f.metadata["help"].split()[0] in out
    for required in ("--model", "--task", "--steps", "--output_dir", "--seed", "--config"):
        assert required in out
    assert "(default: running_sum)" in out and "(default: 0.28)" in out


def test_yaml_grouped_or_flat_then_command_line_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"algorithm": {"clip_high": 0.3, "lm_coef": 0.2}, "steps": 7}))
    config = parse_config(["--config", str(path), "--lm_coef", "0.05"])
    assert config.algorithm.clip_high == 0.3 and config.run.steps == 7
    assert config.algorithm.lm_coef == 0.05


def test_saved_config_reloads_to_the_same_config(tmp_path):
    config = parse_config(["--steps", "3", "--ablation", "no_lm_loss"])
    save_config(config, tmp_path / "resolved.yaml")
    again = parse_config(["--config", str(tmp_path / "resolved.yaml")])
    again.run.config = ""  # the only difference: where it was read from
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_each_ablation_sets_its_switch(name):
    config = parse_config(["--ablation", name])
    default = TrainConfig()
    flat = {k: v for group in config.to_dict().values() for k, v in group.items()}
    base = {k: v for group in default.to_dict().values() for k, v in group.items()}
    changed = {k for k in flat if flat[k] != base[k]} - {"ablation"}
    assert changed == set(ABLATIONS[name])
    if name == "no_group_sampling":  # same batch, one sample per prompt
        assert config.samples_per_prompt == 1 and config.prompts_per_step == default.batch_size
    if name == "vanilla_ppo":
        assert changed == {k for o in ABLATIONS.values() for k in o}


def _tokenizer_without_pad(folder):
    tokenizer = build_char_tokenizer("0123")
    model = build_tiny_llama(tokenizer, hidden_size=16, layers=1, heads=2, max_positions=16,
                             attn_implementation="sdpa")
    model.save_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--bogus_option", "1"], "--bogus_option"),
        (["--group_size", "1"], "--group-size"),
        (["--prompts_per_step", "3", "--group_size", "3", "--mini_batches", "2"], "--mini-batches"),
        (["--micro_batch_size", "5"], "--micro-batch-size"),
        (["--model", "/nonexistent/model"], "--model"),
        (["--clip_low", "-0.1"], "--clip-low"),
        (["--gamma", "1.5"], "--gamma"),
        (["--task", "nope"], "--task"),
        (["--task", "jsonl:/nonexistent.jsonl"], "--task"),
        (["--steps", "x"], "--steps"),
        (["--loss_agg", "mean"], "--loss_agg"),
        (["--config", "/nonexistent.yaml"], "--config"),
        ("no_pad", "--model"),
        # the held-out set would take all 2 problems: training draws would never end
        (["--modulus", "2", "--min_steps", "1", "--max_steps", "1", "--output_dir", "OUT"],
         "--eval-size"),
        # found by an adversarial review: each used to end in a traceback or a NaN run
        (["--actor_lr", "inf"], "--actor-lr"),
        (["--temperature", "1e-7"], "--temperature"),
        (["--weight_decay", "-1"], "--weight-decay"),
        (["--tiny_hidden_size", "6", "--tiny_heads", "2"], "--tiny-heads"),
        (["--seed", "99999999999999999999999"], "--seed"),
        (["--device", "cuda:abc"], "--device"),
        (["--profile", "5", "--steps", "1"], "--profile"),
        ("yaml_float_steps", "--steps"),
        ("yaml_wrong_group", "--steps"),
        (["--task", "running_sum:foo"], "--task"),
        (["--verifier", "contains"], "--verifier"),  # running_sum would ignore it
        ("empty_value_model", "--value-model"),
        ("output_dir_file", "--output-dir"),
    ],
)
def test_bad_config_is_one_line_naming_the_option(argv, option, tmp_path, capsys):
    if argv == "no_pad":
        argv = ["--model", str(_tokenizer_without_pad(tmp_path / "m")),
                "--output_dir", str(tmp_path / "run")]
    elif argv == "yaml_float_steps":
        (tmp_path / "c.yaml").write_text("run:\n  steps: 1.5\n")
        argv = ["--config", str(tmp_path / "c.yaml")]
    elif argv == "yaml_wrong_group":
        (tmp_path / "c.yaml").write_text("model:\n  steps: 1\n")
        argv = ["--config", str(tmp_path / "c.yaml")]
    elif argv == "empty_value_model":
        os.makedirs(tmp_path / "empty")
        argv = ["--value_model", str(tmp_path / "empty")]
    elif argv == "output_dir_file":
        (tmp_path / "a_file").write_text("not a folder")
        argv = [*tiny_argv(), "--output_dir", str(tmp_path / "a_file")]
    writes_run = "OUT" in argv
    argv = [str(tmp_path / "run") if a == "OUT" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors (type, choices)
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("vapo-train: error:") and option in err, err
    assert "Traceback" not in err
    if writes_run:  # a task refused before its run folder is made
        assert not (tmp_path / "run").exists()


def test_yaml_with_unknown_key_names_it(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("clip_hihg: 0.3\n")
    assert main(["--config", str(path)]) == 2
    assert "--clip-hihg" in capsys.readouterr().err


def test_an_explicit_ablation_none_wins_over_the_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ablation: no_lm_loss\n")
    assert parse_config(["--config", str(path)]).algorithm.lm_coef == 0.0
    config = parse_config(["--config", str(path), "--ablation", "none"])
    assert config.run.ablation == "none" and config.algorithm.lm_coef > 0


def test_supervised_baseline_help_says_a_fresh_optimizer_is_made():
    # The help said the baseline rewound to the post-warm-up policy "and its optimizer";
    # the code makes a fresh AdamW (published numbers depend on it: the text follows).
    from vapo_kernels.train.config import RunArgs

    text = next(f.metadata["help"] for f in dataclasses.fields(RunArgs)
                if f.name == "supervised_baseline")
    assert "fresh AdamW" in text and "and its optimizer" not in text


def test_plots_without_matplotlib_are_refused_at_startup(monkeypatch, capsys, tmp_path):
    """The GPU machines have no matplotlib: a run used to train to the end and then die in
    a traceback writing curves.png."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    assert main(["--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--plots" in err and "--no_plots" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def _one_error_line(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("vapo-train: error: "), err
    return err


@pytest.mark.parametrize("make", ["missing", "folder", "not_yaml", "not_utf8", "nul_byte",
                                  "unreadable", "a_list"])
def test_a_config_file_that_cannot_be_read_is_one_line_naming_it(make, tmp_path, capsys,
                                                                  monkeypatch):
    # A folder said "no such file"; a file that is not YAML or not UTF-8 (or that cannot be
    # read) ended in a traceback.
    path = tmp_path / "c.yaml"
    if make == "folder":
        path.mkdir()
    elif make == "not_yaml":
        path.write_text("steps: [1\n")
    elif make == "not_utf8":
        path.write_bytes(b"steps: 1\n# caf\xe9\n")
    elif make == "nul_byte":
        path.write_bytes(b"steps: 1\x00\n")
    elif make == "a_list":
        path.write_text("- 1\n- 2\n")
    elif make == "unreadable":  # chmod 000 does not stop root: the error open() gives then
        path.write_text("steps: 1\n")
        from vapo_kernels.train import config

        def refused(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(config, "open", refused, raising=False)
    err = _one_error_line(capsys, ["--config", str(path), "--output_dir", str(tmp_path / "run")])
    assert err.startswith("vapo-train: error: --config: ") and str(path) in err, err
    expected = {"missing": "no such file", "folder": "is a folder", "not_yaml": "line 2",
                "not_utf8": "not UTF-8", "nul_byte": "#x0000", "unreadable": "Permission denied",
                "a_list": "mapping"}[make]
    assert expected in err, err
    assert not (tmp_path / "run").exists()


def test_an_error_in_a_value_from_the_config_file_names_the_file(tmp_path, capsys):
    # "--model: no such model folder" sent the user looking at a command line that has no
    # --model: the value came from the file.
    path = tmp_path / "c.yaml"
    path.write_text("model: /nonexistent/model\nrun: {steps: 1.5}\n")
    err = _one_error_line(capsys, ["--config", str(path), "--steps", "2"])
    assert err.startswith("vapo-train: error: --model: no such model folder") and \
        err.endswith(f"(set in the --config file {path})"), err
    err = _one_error_line(capsys, ["--config", str(path), "--model", "/nonexistent/model"])
    assert err.startswith("vapo-train: error: --steps: ") and str(path) in err, err
    # The command line's value (in any spelling) wins: its error does not blame the file.
    for argv in (["--model", "/elsewhere"], ["--model=/elsewhere"]):
        err = _one_error_line(capsys, ["--config", str(path), "--steps", "2", *argv])
        assert "/elsewhere" in err and str(path) not in err, err
    path.write_text("steps: -1\n")
    for argv in (["--ste", "-1"], ["--steps=-1"], ["--steps", "-1"]):
        err = _one_error_line(capsys, ["--config", str(path), *argv])
        assert err.startswith("vapo-train: error: --steps: ") and str(path) not in err, err
    path.write_text("ablation: no_such_ablation\n")
    err = _one_error_line(capsys, ["--config", str(path)])
    assert err.startswith("vapo-train: error: --ablation: ") and str(path) in err, err


def test_an_abbreviated_ablation_none_wins_over_the_yaml_file(tmp_path):
    # Only the exact spellings --ablation / --ablation= counted as given on the command line.
    path = tmp_path / "c.yaml"
    path.write_text("ablation: no_lm_loss\n")
    config = parse_config(["--config", str(path), "--abl", "none"])
    assert config.run.ablation == "none" and config.algorithm.lm_coef > 0


@pytest.mark.parametrize("text, option, said", [
    ("clip_high: abc\n", "--clip-high", "invalid float value: 'abc'"),
    ("algorithm: {clip_high: abc}\n", "--clip-high", "invalid float value: 'abc'"),
    ("steps: '3.5'\n", "--steps", "invalid int value: '3.5'"),
    ("group_sampling: maybe\n", "--group-sampling", "Truthy value expected: got maybe"),
    ("kl_kind: k9\n", "--kl-kind", "invalid choice: 'k9' (choose from k1, k2, k3"),
    ("kl_kind: 3\n", "--kl-kind", "must be a str, got 3"),  # no option takes a list:
    ("rollout: {rollout_engine: [hf]}\n", "--rollout-engine", "must be a str, got ['hf']"),
])
def test_a_file_value_of_the_wrong_type_or_choice_is_one_line_naming_the_file(
        tmp_path, capsys, text, option, said):
    # argparse converted a file's string with the option's type outside parse_config's
    # check ("argument --clip_high/--clip-high: invalid float value: 'abc'", no file named)
    # and never checked a file value's choices (kl_kind: k9 ran).
    path = tmp_path / "c.yaml"
    path.write_text(text)
    err = _one_error_line(capsys, ["--config", str(path), "--output_dir", str(tmp_path / "run")])
    assert err.startswith(f"vapo-train: error: {option}: {said}"), err
    assert err.endswith(f" (set in the --config file {path})"), err
    assert not (tmp_path / "run").exists()


def test_file_values_are_read_as_the_command_line_reads_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: '3'\ngroup_sampling: 'no'\nwarmup_lr: '1e-3'\nkl_kind: k1\n"
                    "clip_high: abc\n")
    # The command line wins over the file's bad value (never read, as before).
    config = parse_config(["--config", str(path), "--clip-high", "0.3"])
    assert (config.run.steps, config.rollout.group_sampling, config.warmup.warmup_lr,
            config.algorithm.kl_kind, config.algorithm.clip_high) == (3, False, 1e-3, "k1", 0.3)


def test_the_config_says_which_options_hold_the_file_s_values(tmp_path):
    # vapo-diagnose's refusals name where a value was set: the file's, not the command line's
    # (in any spelling) nor the ablation's.
    path = tmp_path / "c.yaml"
    path.write_text("task: {eval_size: 8}\nsteps: 3\nablation: no_lm_loss\nlm_coef: 0.5\n")
    config = parse_config(["--config", str(path), "--ste", "4"])
    assert config.file_options == {"eval_size", "ablation"}
    assert parse_config([]).file_options == frozenset()
    assert "file_options" not in str(config.to_dict())  # not saved in config.yaml
