"""ablations: VAPO's ablation table (its Table 1) at toy scale.

Every row is a ``vapo-train --ablation NAME`` run. Per seed the supervised warm-up is run
once and every row continues from a copy of the same warmed-up policy (rows differ only
in what comes after the warm-up: value pretraining, GAE, clipping, loss, sampling). Value
pretraining is shared the same way: per seed it runs once per distinct setting of the
options it depends on (:func:`.common.value_pretrain_key`; full VAPO, w/o length-adaptive
GAE, w/o Clip-Higher and w/o the LM loss pretrain identically) and each row continues from
a copy of that state, with the same numbers as if it had pretrained itself (tested). Per
row: mean and standard deviation over seeds of the final held-out accuracy and of the RL
steps to a threshold; then the Spearman rank correlation of the rows' mean accuracy with
the paper's AIME24 scores. Each row is called hurt / same / helped against full VAPO at 2
standard errors of the difference of means (seed spread plus the held-out evaluation's
binomial noise of both means, :func:`compare_to_full`); the report states how many rows
are tested at once (the false calls expected by chance, and the rows surviving Bonferroni's
correction for that many tests). Full VAPO is always run: every row is compared with it.
"""

from __future__ import annotations

import os
import statistics
import time
from statistics import NormalDist

from scipy.stats import spearmanr
from tqdm.auto import tqdm

from ..train.config import ABLATIONS, ConfigError, validate
from ..train.metrics import read_rows
from ..train.vapo import evaluate
from .common import (continue_run, pct, pretrain_value, pyplot, rl_steps, save_figure,
                     start_run, trainer_config, value_pretrain_key, with_options, write_outputs)

# (row, --ablation name, AIME24 avg@32 in the VAPO paper's Table 1)
ROWS = [
    ("full VAPO", "none", 60),
    ("w/o value pretraining", "no_value_pretrain", 11),
    ("w/o decoupled GAE", "no_decoupled_gae", 33),
    ("w/o length-adaptive GAE", "no_length_adaptive", 45),
    ("w/o Clip-Higher", "no_clip_higher", 46),
    ("w/o token-level loss", "no_token_level", 53),
    ("w/o positive-example LM loss", "no_lm_loss", 54),
    ("w/o group sampling", "no_group_sampling", 55),
    ("vanilla PPO", "vanilla_ppo", 5),
]
PRESETS = {
    "tiny": {"seeds": 1, "rl_steps": 1},
    "quick": {"seeds": 2, "rl_steps": 8},
    "full": {"seeds": 3, "rl_steps": 30},
}
# Held-out evaluation every N RL steps (and before the first): the curve of 'steps to
# threshold'. At the quick preset one evaluation (128 greedy problems) costs ~0.2 s
# against ~1.4 s per RL step (one thread): 5 of them are ~8% of a row, not worth a
# coarser curve.
EVAL_EVERY = {"tiny": 1, "quick": 2, "full": 5}
# One torch thread, as the quick preset's wall estimate was measured (a row is ~12 s of
# small sequential steps there; the 2,573 s run used torch's default of two threads on a
# loaded 2-core machine, where the second thread waits more than it computes). A user's
# ``-- --threads N`` (or ``threads: N`` in a trainer --config file) wins.
TRAINER_DEFAULTS = ["--threads", "1"]
# Trainer options the study sets per row (cli refuses them after '--' and in a trainer
# --config file): a user's --ablation was applied under every row's own switches, full
# VAPO's included.
TRAINER_OWNED = {"ablation": "--rows"}


def steps_to(curve: list[tuple[int, float]], threshold: float) -> int | None:
    """First RL step whose held-out accuracy reaches ``threshold`` (None: never)."""
    return next((step for step, acc in curve if acc >= threshold), None)


def _spread(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def selected_rows(text: str) -> list[tuple]:
    """The ROWS named in ``--rows`` (comma-separated ablation names, spaces allowed; empty:
    all), in the table's order, full VAPO ("none") always among them and first: the rows
    are compared with it."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(ABLATIONS))
    if unknown:
        raise ConfigError("rows", f"unknown ablation(s) {unknown}; choose from {list(ABLATIONS)}")
    return [r for r in ROWS if not names or r[1] in names or r[1] == "none"]


def row_config(options, seed, ablation, extra, out_dir=None):
    """The trainer config of a row (``out_dir``: its run folder, by default runs/seedS/NAME)."""
    out_dir = out_dir or os.path.join(options["output_dir"], "runs", f"seed{seed}", ablation)
    config = trainer_config(options["preset"], seed, out_dir, extra, progress=options["progress"],
                            defaults=[*TRAINER_DEFAULTS, "--eval_every",
                                      str(EVAL_EVERY[options["preset"]])])
    # The row's switches win over the preset's and the user's options (on the trainer's
    # command line, an option given explicitly would win over --ablation).
    config = with_options(config, ablation=ablation, **ABLATIONS[ablation])
    validate(config)
    return config


def run_row(source, config, rl_step_count: int, *, value_pretrained: bool = False) -> dict:
    """One row: continued from the warm-up ``source`` (the row pretrains its critic itself
    when its config says so) or, ``value_pretrained``, from a shared value pretraining."""
    start = time.perf_counter()
    run = continue_run(source, config, value_pretrained=value_pretrained)
    if config.algorithm.value_pretrain_steps and not value_pretrained:
        pretrain_value(run)
    rl_steps(run, rl_step_count)
    run.log.close()
    curve = [(r["step"], r["heldout_accuracy"]) for r in read_rows(run.log.path)
             if r["phase"] == "rl" and "heldout_accuracy" in r]
    return {"curve": curve, "final_accuracy": curve[-1][1], "wall_s": time.perf_counter() - start}


def shared_value_pretraining(configs: dict) -> dict[str, list[str]]:
    """The rows (``configs``: name -> trainer config) grouped by the value pretraining they
    can share (the same :func:`value_pretrain_key`): ``{first row: [its group's rows]}``,
    in row order; rows without value pretraining are in no group."""
    groups: dict = {}
    for name, config in configs.items():
        key = value_pretrain_key(config)
        if key is not None:
            groups.setdefault(key, []).append(name)
    return {rows[0]: rows for rows in groups.values()}


def plot(results: dict, out_dir: str) -> list[str]:
    plt = pyplot()
    rows = results["rows"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    xs = range(len(rows))
    means = [r["final_accuracy_mean"] for r in rows]
    ax.bar(xs, means, color="tab:blue", alpha=0.7, label="ours: final held-out accuracy (mean)")
    for x, r in zip(xs, rows):
        ax.plot([x] * len(r["final_accuracy"]), r["final_accuracy"], "k.", markersize=5)
    ax.axhline(results["post_warmup_accuracy_mean"], color="gray", linestyle=":",
               label="after warm-up (mean)")
    twin = ax.twinx()
    twin.plot(xs, [r["paper_aime24"] for r in rows], "rs", label="paper AIME24")
    twin.set_ylabel("paper AIME24", color="tab:red")
    ax.set_xticks(list(xs), [r["row"] for r in rows], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"Spearman rho = {results['spearman']['rho']:.2f} "
                 f"(p = {results['spearman']['p_value']:.2f})" if results["spearman"]["rho"] is not None
                 else "Spearman rho undefined (constant accuracies or < 3 rows)", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    for r in rows:
        steps = sorted({s for curve in r["curves"] for s, _ in curve})
        mean_curve = [statistics.mean(dict(c).get(s, c[-1][1]) for c in r["curves"]) for s in steps]
        ax2.plot(steps, mean_curve, "o-", markersize=3, label=r["row"])
    ax2.set_xlabel("RL step")
    ax2.set_ylabel("held-out accuracy (mean over seeds)")
    ax2.legend(fontsize=6)
    return [save_figure(fig, out_dir, "ablations.png")]


def report(results: dict) -> list[str]:
    rows = results["rows"]
    full = rows[0]  # full VAPO: always run, first in the table's order (selected_rows)
    lines = [f"{len(results['seeds'])} seed(s) ({', '.join(map(str, results['seeds']))}), "
             f"{results['rl_steps']} RL steps per row after a shared warm-up per seed "
             f"(held-out accuracy after warm-up: {pct(results['post_warmup_accuracy_mean'])} "
             f"on average). Threshold for 'steps to': {results['threshold_rule']}."]
    if results.get("value_pretraining"):
        shared = [f"{', '.join(rows)}" for rows in results["value_pretraining"].values()]
        lines.append(f"Value pretraining ran once per seed per distinct setting "
                     f"({len(shared)} per seed) and each row continued from a copy of it: "
                     + "; ".join(f"[{s}]" for s in shared) + ".")
    table = ["| row | paper AIME24 | final held-out accuracy (mean ± sd) | per seed | steps to "
             "threshold (reached / seeds) | wall s (mean): value pretraining (shared) + RL |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        sd = r["final_accuracy_sd"]
        reached = [s for s in r["steps_to_threshold"] if s is not None]
        table.append(f"| {r['row']} | {r['paper_aime24']} | {pct(r['final_accuracy_mean'])}"
                     f"{'' if sd is None else f' ± {100 * sd:.1f}'} | "
                     f"{', '.join(pct(a) for a in r['final_accuracy'])} | "
                     f"{statistics.mean(reached) if reached else 'never'} ({len(reached)}/"
                     f"{len(r['steps_to_threshold'])}) | "
                     f"{r['value_pretrain_s_mean']:.0f} + {r['wall_s_mean']:.0f} |")
    lines.append("\n".join(table))
    sp = results["spearman"]
    if sp["rho"] is None:
        lines.append(f"The rank correlation is undefined: it needs at least 3 rows, got "
                     f"{len(rows)}." if len(rows) < 3 else "The rank correlation is undefined: "
                     "every row ended at the same accuracy.")
    else:
        strength = ("does not reproduce" if sp["rho"] < 0.3 or sp["p_value"] > 0.1 else
                    "partly reproduces" if sp["rho"] < 0.7 else "reproduces")
        lines.append(f"Spearman rank correlation between our rows' mean final accuracy and the "
                     f"paper's AIME24 scores: rho = {sp['rho']:.2f} (p = {sp['p_value']:.2f}, "
                     f"{len(rows)} rows): at this scale the toy task {strength} the paper's ordering.")
    verdict = compare_to_full(rows, eval_size(results))
    if not verdict:
        lines.append(f"Only full VAPO ran ({pct(full['final_accuracy_mean'])}): no row to "
                     "compare with it.")
        return lines
    strict_z = bonferroni_z(len(verdict))
    calls = lambda key: [f"{c['row']} ({100 * c['delta']:+.1f} ± {100 * c['se']:.1f} points)"  # noqa: E731
                         for c in verdict if c["call"] == key]
    hurt, same, helped = calls("hurt"), calls("same"), calls("helped")
    strict = [c for c in verdict if abs(c["delta"]) > strict_z * c["se"]]
    lines.append(f"Against full VAPO ({pct(full['final_accuracy_mean'])}), a row counts as hurt or "
                 f"helped when its mean differs by more than {VERDICT_Z:g} standard errors of the "
                 f"difference (se = sqrt(sd_row^2/n_row + sd_full^2/n_full + the held-out "
                 f"evaluation's binomial variance p(1-p)/{eval_size(results)} of both means), "
                 f"difference ± se given: removing a component hurt in "
                 f"{len(hurt)} row(s){': ' + ', '.join(hurt) if hurt else ''}; made no "
                 f"difference beyond {VERDICT_Z:g} se in {len(same)}"
                 f"{': ' + ', '.join(same) if same else ''}; helped in {len(helped)}"
                 f"{': ' + ', '.join(helped) if helped else ''}. {len(verdict)} rows are tested "
                 f"at once: at {VERDICT_Z:g} se a normal difference is called by chance "
                 f"{100 * NOMINAL_RATE:.1f}% of the time, so ~{len(verdict) * NOMINAL_RATE:.1f} "
                 f"false call(s) are expected if no row differed; with Bonferroni's correction "
                 f"for {len(verdict)} tests ({strict_z:.2f} se) the rows that survive: "
                 f"{len(strict)}{' (' + ', '.join(c['row'] for c in strict) + ')' if strict else ''}. "
                 f"With {len(full['final_accuracy'])} seed(s) per row the seed spread is itself "
                 "uncertain. In the paper every row hurts.")
    return lines


# hurt / same / helped: |difference of means| > VERDICT_Z standard errors of the difference;
# NOMINAL_RATE is the two-sided normal tail there (false calls per row if none differs).
VERDICT_Z = 2.0
NOMINAL_RATE = 2 * (1 - NormalDist().cdf(VERDICT_Z))
FAMILY_RATE = 0.05


def bonferroni_z(tests: int) -> float:
    """The two-sided normal threshold that keeps the family-wise false-call rate at
    FAMILY_RATE over ``tests`` comparisons (2.73 for 8)."""
    return NormalDist().inv_cdf(1 - FAMILY_RATE / (2 * tests))


def eval_size(results: dict) -> int:
    """Held-out problems per evaluation (older results store only eval_noise = 0.5/sqrt(n))."""
    return int(results.get("eval_size") or round((0.5 / results["eval_noise"]) ** 2))


def compare_to_full(rows: list[dict], eval_size: int) -> list[dict]:
    """Each row after the first (full VAPO) against it: difference of the seed means, its
    standard error sqrt(sd_a^2/n_a + sd_b^2/n_b + p_a(1-p_a)/(E n_a) + p_b(1-p_b)/(E n_b)) -
    the spread over seeds plus the held-out evaluation's binomial noise of each mean (on E
    problems; it also sets a floor where a handful of seeds happen to agree) - and the call
    at VERDICT_Z standard errors."""
    def variance_of_mean(r):
        n, p = len(r["final_accuracy"]), r["final_accuracy_mean"]
        sd = r["final_accuracy_sd"] or 0.0
        return (sd ** 2 + p * (1 - p) / eval_size) / n

    full, out = rows[0], []
    for r in rows[1:]:
        delta = r["final_accuracy_mean"] - full["final_accuracy_mean"]
        se = (variance_of_mean(r) + variance_of_mean(full)) ** 0.5
        call = "hurt" if delta < -VERDICT_Z * se else "helped" if delta > VERDICT_Z * se else "same"
        out.append({"row": r["row"], "delta": delta, "se": se, "z": delta / se if se else 0.0,
                    "call": call})
    return out


def run_study(options: dict, extra_trainer_args: list[str]) -> dict:
    start = time.perf_counter()
    preset, out_dir = options["preset"], options["output_dir"]
    sizes = dict(PRESETS[preset])
    if options.get("rl_steps"):
        sizes["rl_steps"] = options["rl_steps"]
    if options.get("seeds") and options.get("seed") is not None:
        raise ConfigError("seed", "not with --seeds, which gives every seed: choose one of them")
    first_seed = options.get("seed") or 0
    seeds = options.get("seeds") or list(range(first_seed, first_seed + sizes["seeds"]))
    threshold = options.get("threshold")
    if threshold is not None and not 0 < threshold <= 1:  # NaN included
        raise ConfigError("threshold", f"a held-out accuracy in (0, 1] (e.g. 0.5), got {threshold}")
    rows = selected_rows(options.get("rows") or "")
    missing = [r[1] for r in ROWS if r[1] not in ABLATIONS]
    if missing:  # the trainer lacks a switch for a row of the paper's table
        raise ConfigError("rows", f"the trainer has no --ablation for {missing}")
    os.makedirs(out_dir, exist_ok=True)
    per_row = {name: [] for _, name, _ in rows}
    post_warmup, thresholds = [], []
    # Every seed's warm-up and row configs (validated) before anything trains, and before the
    # progress bar: a refused option is one line, not one inside the bar's output.
    plans = {seed: (trainer_config(preset, seed, os.path.join(out_dir, "runs", f"seed{seed}",
                                                              "warmup"),
                                   extra_trainer_args, progress=options["progress"],
                                   defaults=TRAINER_DEFAULTS),
                    {name: row_config(options, seed, name, extra_trainer_args)
                     for _, name, _ in rows})
             for seed in seeds}
    bar = tqdm(total=len(seeds) * len(rows), desc="ablation runs", disable=not options["progress"])
    config = None
    sharing = {}
    for seed in seeds:
        config, configs = plans[seed]
        base = start_run(config)
        base.log.close()
        warm = evaluate(base.state, base.task, config)["heldout_accuracy"]
        post_warmup.append(warm)
        thresholds.append(warm + 0.1 if threshold is None else threshold)
        sharing = shared_value_pretraining(configs)
        source_of = {name: first for first, names in sharing.items() for name in names}
        pretrained: dict = {}  # first row of a group -> (its pretraining run, wall s)
        for _, name, _ in rows:
            first = source_of.get(name)
            if first is not None and first not in pretrained:
                pre_dir = os.path.join(out_dir, "runs", f"seed{seed}", f"value_pretrain_{first}")
                start_pre = time.perf_counter()
                pre = continue_run(base, with_options(configs[first], output_dir=pre_dir))
                pretrain_value(pre)
                pre.log.close()
                pretrained[first] = (pre, time.perf_counter() - start_pre)
            source, pre_s = pretrained[first] if first is not None else (base, 0.0)
            result = run_row(source, configs[name], sizes["rl_steps"],
                             value_pretrained=first is not None)
            result["value_pretrain_s"] = pre_s
            result["value_pretrain_run"] = None if first is None else f"value_pretrain_{first}"
            result["threshold"] = thresholds[-1]
            result["steps_to_threshold"] = steps_to(result["curve"], thresholds[-1])
            per_row[name].append(result)
            if first is not None and name == sharing[first][-1]:
                del pretrained[first]  # its last row has it: free the models
            bar.update()
    bar.close()
    out_rows = []
    for row, name, paper in rows:
        runs = per_row[name]
        finals = [r["final_accuracy"] for r in runs]
        out_rows.append({"row": row, "ablation": name, "paper_aime24": paper,
                         "final_accuracy": finals, "final_accuracy_mean": statistics.mean(finals),
                         "final_accuracy_sd": _spread(finals),
                         "steps_to_threshold": [r["steps_to_threshold"] for r in runs],
                         "curves": [r["curve"] for r in runs],
                         "value_pretrain_runs": [r["value_pretrain_run"] for r in runs],
                         "value_pretrain_s_mean": statistics.mean(r["value_pretrain_s"]
                                                                  for r in runs),
                         "wall_s_mean": statistics.mean(r["wall_s"] for r in runs)})
    ours = [r["final_accuracy_mean"] for r in out_rows]
    paper = [r["paper_aime24"] for r in out_rows]
    if len(set(ours)) > 1 and len(out_rows) > 2:
        test = spearmanr(ours, paper)
        spearman = {"rho": float(test.statistic), "p_value": float(test.pvalue)}
    else:
        spearman = {"rho": None, "p_value": None}
    eval_size = config.task.eval_size
    results = {"seeds": seeds, "rl_steps": sizes["rl_steps"], "rows": out_rows,
               "post_warmup_accuracy": post_warmup,
               "post_warmup_accuracy_mean": statistics.mean(post_warmup),
               "thresholds": thresholds,
               "threshold_rule": ("post-warm-up accuracy + 10 points, per seed"
                                  if options.get("threshold") is None
                                  else f"{options['threshold']:.2f}"),
               # one standard error of a held-out accuracy near 50% on eval_size problems
               "eval_noise": 0.5 / eval_size ** 0.5, "eval_size": eval_size,
               "spearman": spearman,
               # the rows sharing each value pretraining (the same grouping for every seed)
               "value_pretraining": {f"value_pretrain_{first}": names
                                     for first, names in sharing.items()}}
    # What ran: the seeds (the first recorded as the seed) and the rows, full VAPO included.
    used = {**options, **sizes, "seed": seeds[0], "seeds": seeds,
            "rows": ",".join(name for _, name, _ in rows)}
    write_outputs(out_dir, "ablations", "ablations: VAPO's Table 1 at toy scale", used, config,
                  results, start, report, plot)
    return results
