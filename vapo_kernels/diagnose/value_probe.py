"""value-probe: the value model's V(s_t) against the true value of each prefix.

At every step boundary of the policy's own sampled responses, the true conditional value
of the prefix under the current policy is estimated as the mean final reward of K
continuations sampled from it (:func:`vapo_kernels.train.mc_advantage.prefix_values`,
VinePPO's protocol). Measured per training stage: error of V by boundary position and
around the **cliff** (the first step whose partial sum is wrong: from there the chain
cannot be right), R^2 = 1 - MSE/Var of V against the true value (how much of the true
value's variance V explains; not the trainer's explained_var, 1 - Var(error)/Var, which
ignores a constant offset), and how well V
ranks alternative next steps (one correct, the others off by 1, 2, ... in the partial sum)
compared with their Monte-Carlo values. Step boundaries are found in the response text and
mapped onto the response's token ids as sampled (:func:`.common.char_offsets_to_tokens`): a
PAD/BOS the policy drew mid-response stays in the ids but not in the text, and
re-tokenising the text would read V one token early after it. The Monte-Carlo
continuations start from those same ids (the prompt's + the response's up to the
boundary), so V and the Monte-Carlo value are read for the same state.

``--model-sizes 32,64,...`` repeats the whole run (warm-up, value pretraining, RL stages;
same seed, task, probed problems and trainer options) for each hidden size of the built-in
model and compares the error by position across sizes (``value_error_by_size.png``). It
is refused beside a model the user chose (``--model``, or ``tiny_hidden_size`` after
``--`` or in a trainer ``--config`` file), which the preset's sweep gives way to.
"""

from __future__ import annotations

import os
import random
import time

import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from ..train.config import ConfigError
from ..train.mc_advantage import char_offsets_to_tokens, prefix_values
from ..train.rollout import generate, value_estimates
from ..train.task import DIGITS
from ..train.vapo import max_new_tokens
from .common import (Run, heldout_accuracy, pct, preset_sizes, pyplot, require_running_sum,
                     response_batch, response_ids, save_figure, train_in_stages, trainer_config,
                     trainer_option_sources, write_outputs)

# model_sizes: hidden sizes of the built-in model, one whole run each ([]: the trainer
# config's model alone). A preset's sizes give way to the model the user chose (--model, or
# tiny_hidden_size after '--' or in a trainer --config file); an explicit --model-sizes
# beside either is refused. Quick: 76 s + 83 s + 148 s for 32, 64 and 128 (one thread).
PRESETS = {
    "tiny": {"problems": 4, "samples": 4, "alternatives": 3, "rl_stages": [1], "model_sizes": []},
    "quick": {"problems": 48, "samples": 32, "alternatives": 4, "rl_stages": [10, 20],
              "model_sizes": [32, 64, 128]},
    "full": {"problems": 256, "samples": 256, "alternatives": 6, "rl_stages": [10, 20, 40],
             "model_sizes": [64, 128, 256]},
}
CLIFF_WINDOW = 3  # boundaries shown on each side of the cliff
# One torch thread, as the quick preset's wall was measured (small sequential steps; on a
# 2-core machine the second thread waits more than it computes). ``-- --threads N`` (or
# ``threads: N`` in a trainer --config file) wins: passed as trainer_config's defaults.
TRAINER_DEFAULTS = ["--threads", "1"]


def boundaries(response: str) -> list[int]:
    """Character offsets of the step boundaries of a response: 0 and after each step's
    trailing space, up to the answer ("=")."""
    body = response.split("=", 1)[0]
    return [0] + [i + 1 for i, ch in enumerate(body) if ch == " "]


def cliff_step(problem, response: str, modulus: int) -> int | None:
    """Index of the first step that is wrong or malformed (its digit is not the problem's,
    or its partial sum is not the true one); None if every step the response writes is right."""
    written = response.split("=", 1)[0].split()
    partial = 0
    for j, step in enumerate(written):
        if j >= len(problem.data):
            return j
        partial = (partial + problem.data[j]) % modulus
        if step != f"{DIGITS[problem.data[j]]}>{DIGITS[partial]}":
            return j
    return None if len(written) == len(problem.data) else len(written)


@torch.no_grad()
def probe_boundaries(run: Run, problems, samples: int) -> dict:
    """V and the Monte-Carlo value at every step boundary of one sampled response per problem."""
    state, task, config = run.state, run.task, run.config
    limit = max_new_tokens(config, task)
    batch = generate(state.policy, state.tokenizer, problems, task, max_new_tokens=limit,
                     temperature=config.rollout.temperature)
    values = value_estimates(state.value_model, batch, packed=False).cpu().double()
    rows = []  # (problem index, boundary position j, offset from the cliff or None, V)
    prefixes, owners = [], []
    for i, (problem, text) in enumerate(zip(batch.problems, batch.responses)):
        cliff = cliff_step(problem, text, task.modulus)
        offsets = boundaries(text)
        # on the sampled ids: a special token drawn mid-response is not in the text
        ids = response_ids(batch, i)
        cuts = char_offsets_to_tokens(state.tokenizer, ids, offsets)
        for j, tokens in enumerate(cuts):
            if tokens >= int(batch.response_lengths[i]):
                break
            v = float(values[int(batch.cu_seqlens[i]) + tokens])
            rows.append((i, j, None if cliff is None else j - (cliff + 1), v))
            prefixes.append(ids[:tokens])  # continued from the ids V was read on
            owners.append(problem)
    mc = prefix_values(state.policy, state.tokenizer, task, owners, prefixes, samples=samples,
                       max_response_tokens=limit, temperature=config.rollout.temperature)
    return {"position": [r[1] for r in rows], "cliff_offset": [r[2] for r in rows],
            "value": [r[3] for r in rows], "mc_value": mc.tolist(),
            "sampled_accuracy": float(batch.scores.mean())}


def top1_credit(v: torch.Tensor, mc: torch.Tensor) -> float | None:
    """How often V, breaking its ties at random, picks the step with the highest
    Monte-Carlo value: 1/m when the best step is one of m steps tied at V's maximum, 0 when
    it is not among them; None when no step is uniquely best by Monte-Carlo. (A plain
    argmax would credit an untrained critic, whose values tie, with the first candidate -
    the correct step.)"""
    best = mc == mc.max()
    if int(best.sum()) != 1:
        return None
    top = v == v.max()
    return float(top[best].any()) / int(top.sum())


@torch.no_grad()
def rank_alternatives(run: Run, problems, samples: int, alternatives: int, rng: random.Random
                      ) -> dict:
    """At a random boundary of each problem's correct chain, V and the Monte-Carlo value of
    ``alternatives`` next steps (the correct one first, then partial sums off by 1, 2, ...)."""
    state, task, config = run.state, run.task, run.config
    owners, texts = [], []
    for problem in problems:
        j = rng.randrange(problem.steps)
        correct = task.steps(problem)
        for shift in range(alternatives):
            steps = correct if shift == 0 else task.steps(problem, error_at=j, error_shift=shift)
            owners.append(problem)
            texts.append("".join(steps[: j + 1]))
    batch = response_batch(run, owners, texts)
    values = value_estimates(state.value_model, batch, packed=False).cpu().double()
    # V of the state right after the prefix: the critic's output at the appended EOS.
    v = values[batch.cu_seqlens[1:].long() - 1].view(len(problems), alternatives)
    # continued from the ids V was read on (the batch's, EOS left off)
    prefixes = [response_ids(batch, i)[:-1] for i in range(batch.size)]
    mc = prefix_values(state.policy, state.tokenizer, task, owners, prefixes, samples=samples,
                       max_response_tokens=max_new_tokens(config, task),
                       temperature=config.rollout.temperature).view(len(problems), alternatives)
    correlations, picks = [], []
    for vs, ms in zip(v, mc):
        if float(ms.max()) > float(ms.min()) and float(vs.max()) > float(vs.min()):
            correlations.append(float(spearmanr(vs.numpy(), ms.numpy()).statistic))
        pick = top1_credit(vs, ms)
        if pick is not None:
            picks.append(pick)
    return {"value": v.tolist(), "mc_value": mc.tolist(),
            "spearman_mean": sum(correlations) / len(correlations) if correlations else None,
            "groups_ranked": len(correlations),
            "top1_agreement": sum(picks) / len(picks) if picks else None,
            "groups_with_unique_best": len(picks), "random_top1": 1 / alternatives}


def summarize(probe: dict, samples: int) -> dict:
    """Errors by position and by cliff offset; R^2 = 1 - MSE/Var; pooled rank correlation."""
    v, mc = torch.tensor(probe["value"]), torch.tensor(probe["mc_value"])
    err = v - mc

    def grouped(keys):
        out = {}
        for key in sorted({k for k in keys if k is not None}):
            pick = torch.tensor([k == key for k in keys])
            out[key] = {"bias": float(err[pick].mean()), "abs_error": float(err[pick].abs().mean()),
                        "mc_value": float(mc[pick].mean()), "count": int(pick.sum())}
        return out

    variance = float(mc.var(unbiased=False)) if len(mc) > 1 else 0.0
    # The Monte-Carlo estimate itself has variance p(1-p)/K: part of any error measured here.
    mc_noise = float((mc * (1 - mc)).mean() / samples)
    rank = spearmanr(v.numpy(), mc.numpy()).statistic if len(v) > 2 and v.std() > 0 and mc.std() > 0 else None
    return {"by_position": grouped(probe["position"]),
            "by_cliff_offset": grouped([o if o is not None and abs(o) <= CLIFF_WINDOW else None
                                        for o in probe["cliff_offset"]]),
            "mse": float((err ** 2).mean()), "mc_variance": variance, "mc_noise_variance": mc_noise,
            "r_squared": 1 - float((err ** 2).mean()) / variance if variance > 0 else None,
            "spearman": None if rank is None else float(rank), "boundaries": len(v)}


def plot(results: dict, out_dir: str) -> list[str]:
    """value_error.png and value_scatter.png per model (suffixed _hN in a size sweep), and
    value_error_by_size.png comparing the sizes."""
    models = results["models"]
    if len(models) == 1:
        return plot_stages(results["stages"], out_dir)
    names = []
    for m in models:
        names += plot_stages(model_stages(results, m["label"]), out_dir, f"_h{m['hidden_size']}")
    return names + [plot_sizes(results, out_dir)]


def model_stages(results: dict, label: str) -> list[dict]:
    return [s for s in results["stages"] if s["model"] == label]


def plot_sizes(results: dict, out_dir: str) -> str:
    """Per training stage (a column), the error of V by boundary position for each size."""
    plt = pyplot()
    models = results["models"]
    stage_names = [s["name"] for s in model_stages(results, models[0]["label"])]
    fig, axes = plt.subplots(1, len(stage_names), figsize=(3.6 * len(stage_names), 3.6),
                             squeeze=False, sharey=True)
    colors = plt.cm.plasma(torch.linspace(0, 0.85, len(models)).tolist())
    for ax, stage_name in zip(axes[0], stage_names):
        for color, m in zip(colors, models):
            stage = next(s for s in model_stages(results, m["label"]) if s["name"] == stage_name)
            data = stage["summary"]["by_position"]
            xs = sorted(data, key=float)
            ax.plot([float(x) for x in xs], [data[x]["abs_error"] for x in xs], "o-",
                    color=color, markersize=3, label=f"|V - MC| {m['label']}")
            ax.plot([float(x) for x in xs], [data[x]["bias"] for x in xs], "--", color=color,
                    linewidth=1, label=f"V - MC {m['label']}")
        ax.axhline(0, color="gray", linewidth=0.5)
        ax.set_title(stage_name, fontsize=9)
        ax.set_xlabel("boundary (steps written)")
    axes[0][0].set_ylabel("value error")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle("value error by position, per model size", fontsize=10)
    return save_figure(fig, out_dir, "value_error_by_size.png")


def plot_stages(stages: list[dict], out_dir: str, suffix: str = "") -> list[str]:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax, title, xlabel in (
            ("by_position", axes[0], "by step boundary", "boundary (steps written)"),
            ("by_cliff_offset", axes[1], "around the cliff (first wrong step)",
             "boundaries after the cliff (0: right after the wrong step)")):
        for color, stage in zip(plt.cm.viridis(torch.linspace(0, 0.9, len(stages)).tolist()), stages):
            data = stage["summary"][key]
            xs = sorted(data, key=float)
            ax.plot([float(x) for x in xs], [data[x]["abs_error"] for x in xs], "o-", color=color,
                    markersize=3, label=f"|V - MC| {stage['name']}")
            ax.plot([float(x) for x in xs], [data[x]["bias"] for x in xs], "--", color=color,
                    linewidth=1, label=f"V - MC {stage['name']}")
        last = stages[-1]["summary"][key]
        xs = sorted(last, key=float)
        ax.plot([float(x) for x in xs], [last[x]["mc_value"] for x in xs], "k:",
                label="true value (MC), last stage")
        ax.axhline(0, color="gray", linewidth=0.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel("value error")
    axes[1].legend(fontsize=6)
    names = [save_figure(fig, out_dir, f"value_error{suffix}.png")]

    fig, axes = plt.subplots(1, len(stages), figsize=(3.4 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        ax.scatter(stage["probe"]["mc_value"], stage["probe"]["value"], s=6, alpha=0.5)
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        r2 = stage["summary"]["r_squared"]
        ax.set_title(f"{stage['name']}\nR^2 (1 - MSE/Var) {r2 if r2 is None else round(r2, 2)}",
                     fontsize=8)
        ax.set_xlabel("Monte-Carlo value")
    axes[0][0].set_ylabel("V(s)")
    names.append(save_figure(fig, out_dir, f"value_scatter{suffix}.png"))
    return names


def _num(x, digits=2):
    return "n/a" if x is None else f"{x:.{digits}f}"


def mean_abs_error(summary: dict) -> float:
    return (sum(d["abs_error"] * d["count"] for d in summary["by_position"].values())
            / max(1, summary["boundaries"]))


def report(results: dict) -> list[str]:
    models = results["models"]
    lines = [f"{results['problems']} sampled responses per stage, the value of every step "
             f"boundary estimated from K = {results['samples']} continuations (seed "
             f"{results['seed']}); ranking: {results['alternatives']} candidate next steps at a "
             "random boundary of each correct chain."]
    if len(models) > 1:
        lines.append("Model sizes (the built-in model; each a whole run with the same seed, "
                     "trainer options and probed problems): " + ", ".join(
                         f"{m['label']} ({m['parameters']:,} parameters, {m['wall_s']:.0f} s)"
                         for m in models) + ".")
    sweep = len(models) > 1
    table = [f"| {'model | ' if sweep else ''}stage | held-out acc | boundaries | mean abs error | "
             "R^2 (1 - MSE/Var) against the true value | Spearman(V, MC) | MC noise variance | "
             "ranking: Spearman | ranking: V picks the best step | random pick |",
             "|---" * (10 + sweep) + "|"]
    for s in results["stages"]:
        sm, rk = s["summary"], s["ranking"]
        abs_err = mean_abs_error(sm)
        table.append(f"| {s['model'] + ' | ' if sweep else ''}{s['name']} | "
                     f"{pct(s['heldout_accuracy'])} | {sm['boundaries']} | "
                     f"{abs_err:.3f} | {_num(sm['r_squared'])} | {_num(sm['spearman'])} | "
                     f"{sm['mc_noise_variance']:.4f} | {_num(rk['spearman_mean'])} "
                     f"({rk['groups_ranked']} groups) | {pct(rk['top1_agreement'])} "
                     f"({rk['groups_with_unique_best']}) | {pct(rk['random_top1'])} |")
    lines.append("\n".join(table))
    if sweep:
        lines += size_comparison(results)
    for m in models:
        lines += stage_findings(model_stages(results, m["label"]), m["label"] if sweep else "")
    if not sweep:
        lines.append("Model size is not varied: `--model-sizes 32,64,128` repeats the run for "
                     "each hidden size of the built-in model and compares them.")
    return lines


def size_comparison(results: dict) -> list[str]:
    """How the value error changes with model size, at each training stage. Each size's
    critic is scored against its own policy, whose accuracy (and so the spread of the true
    values) differs by size: R^2 and rank correlation are the comparable
    numbers, the absolute error is put beside the true values' spread."""
    models = results["models"]
    per_stage: dict[str, list] = {}
    for m in models:
        for s in model_stages(results, m["label"]):
            per_stage.setdefault(s["name"], []).append((m, s))
    lines = []
    for name, entries in per_stage.items():
        cells = [f"{m['label']}: R^2 {_num(s['summary']['r_squared'])}, "
                 f"Spearman {_num(s['summary']['spearman'])}, mean |V - MC| "
                 f"{mean_abs_error(s['summary']):.3f} (true values' sd "
                 f"{s['summary']['mc_variance'] ** 0.5:.2f}, held-out accuracy "
                 f"{pct(s['heldout_accuracy'])})" for m, s in entries]
        lines.append(f"{name}: " + "; ".join(cells) + ".")
    last = [(m, s["summary"]["r_squared"]) for m, s in list(per_stage.values())[-1]]
    by_size = [ev for _, ev in sorted(last, key=lambda e: e[0]["parameters"])]
    if None not in by_size and len(by_size) > 1:
        pairs = list(zip(by_size, by_size[1:]))
        trend = ("rises with model size" if all(b > a for a, b in pairs) else
                 "falls with model size" if all(b < a for a, b in pairs) else
                 "is not monotone in model size")
        lines.append(f"At the last stage R^2 (1 - MSE/Var) {trend} ("
                     + ", ".join(f"{m['label']} {_num(ev)}" for m, ev in
                                 sorted(last, key=lambda e: e[0]["parameters"])) + ").")
    return ["By model size (value_error_by_size.png: error by position per size and stage; "
            "each critic against its own policy's true values):\n\n"
            + "\n".join(f"* {line}" for line in lines)]


def stage_findings(stages: list[dict], label: str) -> list[str]:
    """The sentences on one model's stages (``label``: the model's, in a size sweep)."""
    lines = []
    of = f", {label}" if label else ""
    first, last = stages[0]["summary"], stages[-1]["summary"]
    if last["r_squared"] is not None:
        verdict = ("explains part of" if last["r_squared"] > 0.1 else
                   "explains almost none of" if last["r_squared"] > -0.1 else
                   "is worse than a constant at predicting")
        lines.append(f"At the last stage ({stages[-1]['name']}{of}) V {verdict} the variance of the "
                     f"true prefix value (R^2 = 1 - MSE/Var {last['r_squared']:.2f}; "
                     f"at {stages[0]['name']}: {_num(first['r_squared'])}).")
    cliff = last["by_cliff_offset"]
    before = [d for k, d in cliff.items() if int(k) < 0]
    after = [d for k, d in cliff.items() if int(k) >= 0]
    if before and after:
        mean = lambda ds, key: sum(d[key] * d["count"] for d in ds) / sum(d["count"] for d in ds)  # noqa: E731
        lines.append(f"Around the cliff (last stage{of}): before the wrong step the true value is "
                     f"{mean(before, 'mc_value'):.2f} and V is off by {mean(before, 'bias'):+.2f} on "
                     f"average; after it the true value is {mean(after, 'mc_value'):.2f} and V is off "
                     f"by {mean(after, 'bias'):+.2f}.")
    rk = stages[-1]["ranking"]
    if rk["top1_agreement"] is not None:
        better = rk["top1_agreement"] > rk["random_top1"]
        lines.append(f"Ranking next steps (last stage{of}): V picks the step with the highest true "
                     f"value in {pct(rk['top1_agreement'])} of {rk['groups_with_unique_best']} "
                     f"boundaries, {'above' if better else 'not above'} the "
                     f"{pct(rk['random_top1'])} of a random pick.")
    return lines


def probe_stages(config, sizes: dict, seed: int, label: str, progress: bool) -> tuple[list, int]:
    """Train ``config`` in stages and probe its critic after each; returns the stages and
    the policy's parameter count."""
    stages, parameters = [], 0
    bar = tqdm(desc=f"value-probe stages ({label})", disable=not progress)
    for name, run in train_in_stages(config, sizes["rl_stages"]):
        parameters = sum(p.numel() for p in run.state.policy.parameters())
        # The study's own sampling must not shift the trainer's random stream.
        with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
            torch.manual_seed(seed)
            rng = random.Random(f"value-probe-{seed}")
            problems = run.task.sample(rng, sizes["problems"])  # the same problems at every stage
            probe = probe_boundaries(run, problems, sizes["samples"])
            ranking = rank_alternatives(run, problems, sizes["samples"], sizes["alternatives"], rng)
        stages.append({"name": name, "model": label, "heldout_accuracy": heldout_accuracy(run),
                       "probe": probe, "summary": summarize(probe, sizes["samples"]),
                       "ranking": ranking})
        bar.update()
    bar.close()
    return stages, parameters


def run_study(options: dict, extra_trainer_args: list[str]) -> dict:
    start = time.perf_counter()
    out_dir, preset, seed = options["output_dir"], options["preset"], options["seed"]
    sizes = preset_sizes(PRESETS, options)
    os.makedirs(out_dir, exist_ok=True)
    config = trainer_config(preset, seed, os.path.join(out_dir, "train"), extra_trainer_args,
                            progress=options["progress"], defaults=TRAINER_DEFAULTS)
    require_running_sum(config, "value-probe")
    if sizes["alternatives"] < 2:
        raise ConfigError("alternatives", f"need >= 2 candidate steps to rank, got {sizes['alternatives']}")
    if sizes["alternatives"] > config.task.modulus:
        raise ConfigError("alternatives", f"at most modulus={config.task.modulus} distinct "
                          f"partial sums, got {sizes['alternatives']}")
    m = config.model
    hidden_sizes = list(dict.fromkeys(sizes["model_sizes"]))  # in order, once each
    # Where the user set the built-in model's hidden size: after '--' (None) or in a file.
    hidden_given = [where for name, where in trainer_option_sources(extra_trainer_args)
                    if name == "tiny_hidden_size"]
    if options.get("model_sizes"):
        if m.model:
            raise ConfigError("model-sizes", "sizes the built-in model; not with --model FOLDER")
        if hidden_given:  # the sweep's size would replace it without a word
            place = ("-- --tiny_hidden_size" if None in hidden_given else
                     f"tiny_hidden_size in the trainer --config file {hidden_given[0]}")
            raise ConfigError("model-sizes", f"sets the built-in model's hidden size, which "
                              f"{place} sets too: give one")
    elif m.model or hidden_given:
        hidden_sizes = []  # the preset's sweep gives way to the model the user chose
    sizes["model_sizes"] = hidden_sizes
    # Every size's trainer config, validated before any size trains (the user set no hidden
    # size: the sweep's is the only one).
    run_configs = {}
    for n in hidden_sizes:
        try:
            run_configs[n] = trainer_config(preset, seed, os.path.join(out_dir, f"train_h{n}"),
                                            [*extra_trainer_args, "--tiny_hidden_size", str(n)],
                                            progress=options["progress"],
                                            defaults=TRAINER_DEFAULTS)
        except ConfigError as error:
            raise ConfigError("model-sizes", f"hidden size {n} is refused by the trainer "
                              f"({error}; tiny_heads={m.tiny_heads}, set with -- --tiny_heads H)"
                              ) from None
    models, stages = [], []
    for n in hidden_sizes or [None]:
        model_start = time.perf_counter()
        if n is None:  # the trainer config's own model
            run_config = config
            label = (os.path.basename(m.model.rstrip("/")) if m.model
                     else f"hidden {m.tiny_hidden_size}")
        else:
            run_config = run_configs[n]
            label = f"hidden {n}"
        probed, parameters = probe_stages(run_config, sizes, seed, label, options["progress"])
        stages += probed
        built_in = not m.model
        models.append({"label": label,
                       "hidden_size": run_config.model.tiny_hidden_size if built_in else None,
                       "layers": m.tiny_layers if built_in else None, "parameters": parameters,
                       "wall_s": time.perf_counter() - model_start})
    results = {"seed": seed, **sizes, "models": models, "stages": stages}
    write_outputs(out_dir, "value-probe", "value-probe: V(s_t) against the true value of prefixes",
                  {**options, **sizes}, config, results, start, report, plot)
    return results
