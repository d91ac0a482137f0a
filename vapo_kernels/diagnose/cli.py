"""``vapo-diagnose STUDY [options] [-- trainer options]``: one subcommand per study.

Every study trains with ``vapo-train``'s own code (options after ``--`` go to the trainer,
e.g. ``-- --tiny_hidden_size 64``) and writes results.json, PNG figures and report.md into
``--output-dir``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import os
import shutil
import sys
import time

from ..train.config import ConfigError

STUDIES = {
    "injected-errors": ("injected_errors", "credit of an error injected at step k, per lambda "
                        "and training stage"),
    "value-probe": ("value_probe", "V(s_t) against Monte-Carlo values of prefixes: error by "
                    "position, around cliffs, ranking of alternative steps"),
    "short-vs-long": ("short_vs_long", "accuracy per chain length and lambda_policy; "
                      "advantage bias/variance per step against Monte-Carlo truth"),
    "ablations": ("ablations", "VAPO's ablation table at toy scale, rank-correlated with the "
                  "paper's AIME24 scores"),
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _distinct(values: list, text: str) -> list:
    """A list option's values, each once: a repeated length or seed would run twice into the
    same run folder and count twice in the report."""
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{', '.join(map(str, repeated))} given twice in {text!r}")
    return values


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if values and min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return _distinct(values, text)


def _positive_int_list(text: str) -> list[int]:
    """RL stages: a stage at 0 RL steps is the value-pretrained one, always measured (a 0
    measured nothing and was dropped without a word)."""
    values = _int_list(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1 (the stages before RL are "
                                         f"always measured), got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    return _distinct(values, text)


# Trainer options each study sets itself: one given after '--' or in a trainer --config
# file would silently override it (the run's seed or folder) or be ignored (the study's RL
# steps; the study's own value wins over a file's), and results.json would record the
# study's own value. A study adds its own in its module's TRAINER_OWNED.
_STUDY_OWNED = {"seed": "--seed", "output_dir": "--output-dir", "steps": "the study's RL-step option",
                "resume": None, "save_every": None}


def _check_trainer_args(trainer_args: list[str], owned: dict) -> None:
    """Refuse a study-owned trainer option on the trainer's command line (after '--') or in
    its --config file (read by the trainer's own reader): one line naming the option, and
    the file with every owned option it sets."""
    from .common import trainer_option_sources

    sources = trainer_option_sources(trainer_args)
    for name, where in sources:
        if name not in owned:
            continue
        instead = owned[name]
        if where is None:
            place = "a trainer option after '--'"
        else:
            others = [n for n, w in sources if w == where and n in owned and n != name]
            place = (f"in the trainer --config file {where}: remove it"
                     + (f" (and {', '.join(others)})" if others else "") + " from the file")
        raise ConfigError(name.replace("_", "-"), f"set by the study itself, not {place}"
                          + (f"; use vapo-diagnose's {instead}" if instead else ""))


def _check_given_once(model: str, trainer_args: list[str]) -> None:
    """vapo-diagnose's --model beside the trainer's after '--': the later one won without a
    word (a --config file's model gives way to the command line's, as in vapo-train)."""
    from .common import trainer_option_sources

    if model and any(name == "model" and where is None
                     for name, where in trainer_option_sources(trainer_args)):
        raise ConfigError("model", "given twice, as vapo-diagnose's --model and as a trainer "
                          "option after '--': give one")


def _check_sizes(module, options: dict) -> None:
    """Sizes that mean nothing together, refused before anything runs: injected-errors'
    --mc-problems was ignored without a word under --mc-samples 0 and cut to --problems."""
    from .common import preset_sizes

    if options.get("mc_problems") is None:
        return
    if options.get("mc_samples") == 0:
        raise ConfigError("mc-problems", "sizes the Monte-Carlo row, which --mc-samples 0 "
                          "turns off: drop one of them")
    problems = preset_sizes(module.PRESETS, options)["problems"]
    if options["mc_problems"] > problems:
        raise ConfigError("mc-problems", f"the Monte-Carlo row runs on the first of the "
                          f"{problems} --problems chains per step, got {options['mc_problems']}")


def _check_output_dir(path: str) -> None:
    """A study writes a fresh folder: one that holds files (an earlier study's results and
    run folders) would mix two studies' rows in its metrics and its report."""
    from ..train.cli import check_folder_path

    check_folder_path(path)
    found = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if found:
        raise ConfigError("output-dir", f"{path} is not empty ({', '.join(found[:4])}"
                          f"{', ...' if len(found) > 4 else ''}): choose another --output-dir")
    try:  # made now: a parent that is a file, or a place no one can write, is said here
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ConfigError("output-dir", f"cannot make {path}: {error.strerror or error}") from None


def _first_missing(path: str) -> str | None:
    """The outermost folder of ``path`` that does not exist yet (None: ``path`` exists):
    what making ``path`` creates."""
    path = os.path.abspath(path)
    if os.path.lexists(path):
        return None
    while not os.path.lexists(os.path.dirname(path)):
        path = os.path.dirname(path)
    return path


def _remove_made(out_dir: str, made: str | None) -> None:
    """Undo a refused study's writes: the folders it made, or, in an output folder that
    was empty before it (checked), what it put there."""
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
    elif os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            path = os.path.join(out_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vapo-diagnose", description="Diagnostics of VAPO's credit assignment, built on "
        "vapo-train. Options after '--' are passed to the trainer (vapo-train --help).")
    sub = parser.add_subparsers(dest="study", required=True, metavar="STUDY")
    for name, (module_name, help_text) in STUDIES.items():
        module = importlib.import_module(f".{module_name}", __package__)
        # Each help line says its own default (argparse's "(default: None)" said nothing,
        # and "(default: True)" on --no-progress the opposite of what it does).
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=_trainer_options_epilog(module))
        p.add_argument("--output-dir", default="",
                       help="Folder for results.json, figures and report.md, new or empty "
                       "(default: diagnose_<study>_<date>-<time>).")
        if name == "ablations":  # None: not given (refused beside --seeds, which replaces it)
            p.add_argument("--seed", type=int, default=None, help="First seed (default 0): the "
                           "preset's seeds are SEED, SEED + 1, ...; or give --seeds.")
        else:
            p.add_argument("--seed", type=int, default=0, help="Seed of everything (default 0).")
        size = p.add_mutually_exclusive_group()
        size.add_argument("--quick", dest="preset", action="store_const", const="quick",
                          help="The CPU preset (minutes on 2 cores): the default.")
        size.add_argument("--preset", choices=["tiny", "quick", "full"],
                          help="tiny: seconds (tests); quick: CPU minutes (the default); full: "
                          "bigger, for a GPU. Each size option below gives its preset values.")
        # Both options write dest 'preset': argparse takes the first action's default (--quick
        # had None), so a study run without either crashed with KeyError: None.
        p.set_defaults(preset="quick")
        p.add_argument("--model", default="", help="Hugging Face causal-LM folder (passed to "
                       "the trainer as --model).")
        p.add_argument("--no-progress", dest="progress", action="store_false",
                       help="No progress bars (they are on by default).")
        if name in ("injected-errors", "value-probe"):
            p.add_argument("--rl-stages", dest="rl_stages", type=_positive_int_list,
                           default=None, help="RL steps after which to measure, cumulative, "
                           "comma-separated (the stages before RL are always measured).")
        if name == "short-vs-long":
            p.add_argument("--rl-steps", dest="rl_steps", type=_positive_int, default=None,
                           help="RL steps of each length's and setting's run.")
        if name == "injected-errors":
            p.add_argument("--length", type=_positive_int, default=None,
                           help="Steps per chain (<= the task's max_steps).")
            p.add_argument("--problems", type=_positive_int, default=None,
                           help="Chains per injected step.")
            p.add_argument("--mc-samples", dest="mc_samples", type=_non_negative_int,
                           default=None, help="K continuations per step boundary of the "
                           "Monte-Carlo (VinePPO) row; 0: no Monte-Carlo row.")
            p.add_argument("--mc-problems", dest="mc_problems", type=_positive_int, default=None,
                           help="Chains per injected step in the Monte-Carlo row (the first "
                           "of --problems; each costs (length + 1) * K generations).")
        if name in ("value-probe", "short-vs-long"):
            p.add_argument("--samples", type=_positive_int, default=None,
                           help="K continuations per prefix for the Monte-Carlo value (<= 256 "
                           "in VinePPO's analyzers).")
            p.add_argument("--problems", type=_positive_int, default=None,
                           help="Sampled responses whose step boundaries are probed.")
        if name == "value-probe":
            p.add_argument("--alternatives", type=_positive_int, default=None,
                           help="Candidate next steps ranked per boundary (1 correct + wrong ones).")
            p.add_argument("--model-sizes", dest="model_sizes", type=_int_list, default=None,
                           help="Hidden sizes of the built-in model, comma-separated (e.g. "
                           "32,64,128): the whole run once per size, the value error compared "
                           "across sizes; none with --model or a trainer --tiny_hidden_size N.")
        if name == "short-vs-long":
            p.add_argument("--lengths", type=_int_list, default=None,
                           help="Chain lengths (steps), comma-separated.")
            p.add_argument("--lambdas", type=_float_list, default=None,
                           help="Fixed lambda_policy values, comma-separated.")
            p.add_argument("--alphas", type=_float_list, default=None,
                           help="Length-adaptive alphas, comma-separated (0.05 is the paper's).")
            p.add_argument("--mc-samples", dest="mc_samples", type=_non_negative_int,
                           default=None, help="K continuations per step boundary of the "
                           "Monte-Carlo setting (vapo-train --advantage mc; VinePPO's best "
                           "was 9); 0: no Monte-Carlo setting.")
        if name == "ablations":
            p.add_argument("--seeds", type=_int_list, default=None,
                           help="Seeds per row, comma-separated (default: the preset's number "
                           "of seeds, from --seed on).")
            p.add_argument("--rl-steps", dest="rl_steps", type=_positive_int, default=None,
                           help="RL steps per row.")
            p.add_argument("--threshold", type=float, default=None,
                           help="Held-out accuracy in (0, 1] for 'steps to threshold' "
                           "(default: post-warm-up accuracy + 0.1 of each seed).")
            p.add_argument("--rows", default="", help="Comma-separated subset of the rows "
                           "(ablation names; default: all nine). Full VAPO (none) is always "
                           "run, added when not listed: every other row is compared with it.")
        for action in p._actions:
            action.help = (action.help or "") + _preset_values(module, action.dest)
    return parser


def _preset_values(module, key: str) -> str:
    """' Preset tiny / quick / full: a / b / c.' for a size the study's PRESETS give."""
    presets = getattr(module, "PRESETS", {})
    if not presets or any(key not in sizes for sizes in presets.values()):
        return ""
    shown = [",".join(map(str, v)) or "none" if isinstance(v, list) else str(v)
             for v in (presets[p][key] for p in presets)]
    return f" Preset {' / '.join(presets)}: {' / '.join(shown)}."


def _trainer_options_epilog(module) -> str:
    """What a study's help says of trainer options, from the one list the CLI refuses."""
    owned = {**_STUDY_OWNED, **getattr(module, "TRAINER_OWNED", {})}
    said = [f"--{name.replace('_', '-')}" + (f" (vapo-diagnose's {instead})" if instead else "")
            for name, instead in owned.items()]
    return ("Trainer options go after '--' (vapo-train --help lists them), a trainer --config "
            "FILE.yaml among them; they override the preset's. The study sets these itself and "
            "refuses them there and in the file: " + ", ".join(said) + ".")


def main(argv: list[str] | None = None) -> int:
    try:  # Ctrl-C while the study's modules import (seconds) gave a traceback
        return _main(argv)
    except KeyboardInterrupt:
        print("vapo-diagnose: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, trainer_args = argv[:cut], argv[cut + 1:]
    args = make_parser().parse_args(argv)
    options = vars(args)  # the namespace's own dict: read args before popping from it
    study = options.pop("study")
    model = options.pop("model")
    user_trainer_args = trainer_args
    if model:
        trainer_args = ["--model", model, *trainer_args]
    if not options["output_dir"]:
        options["output_dir"] = f"diagnose_{study.replace('-', '_')}_{time.strftime('%Y-%m-%d-%H%M%S')}"
    out_dir = options["output_dir"]
    if importlib.util.find_spec("matplotlib") is None:  # said now, not after the training
        print("vapo-diagnose: error: the studies draw their figures with matplotlib, which is "
              "not installed (pip install matplotlib)", file=sys.stderr)
        return 2
    module = importlib.import_module(f".{STUDIES[study][0]}", __package__)
    start = time.perf_counter()
    made, checked, interrupted = _first_missing(out_dir), False, False
    try:
        _check_trainer_args(trainer_args, {**_STUDY_OWNED, **getattr(module, "TRAINER_OWNED", {})})
        _check_given_once(model, user_trainer_args)
        _check_sizes(module, options)
        _check_output_dir(out_dir)
        checked = True
        module.run_study(options, trainer_args)
    except (ConfigError, SystemExit) as error:  # SystemExit: the trainer's argparse refused
        if made is not None or checked:
            _remove_made(out_dir, made)  # a refused study leaves no folder behind
        if isinstance(error, SystemExit):
            raise
        print(f"vapo-diagnose: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        interrupted = True
    if interrupted:
        # Said once the study's frames are gone: their progress bars close (and draw their
        # last line) as they go. What the study wrote stays (a run's metrics.jsonl).
        gc.collect()
        kept = os.path.isdir(out_dir) and os.listdir(out_dir)
        print("vapo-diagnose: interrupted" + (f"; the unfinished study's files are in {out_dir}"
                                              if kept else ""), file=sys.stderr)
        return 130
    print(f"[vapo-diagnose] {study}: results.json, report.md and figures in "
          f"{options['output_dir']} ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0
