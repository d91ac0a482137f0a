"""value-probe: the value model's V(s_t) against the true value of each prefix.

At every step boundary of the policy's own sampled responses, the true conditional value
of the prefix under the current policy is estimated as the mean final reward of K
continuations sampled from it (:func:`vapo_kernels.train.mc_advantage.prefix_values`,
VinePPO's protocol). Measured per training stage: error of V by boundary position and
around the **cliff** (the first step whose partial sum is wrong: from there the chain
cannot be right), how much of the variance of the true value V explains, and how well V
ranks alternative next steps (one correct, the others off by 1, 2, ... in the partial sum)
compared with their Monte-Carlo values.
"""

from __future__ import annotations

import os
import random
import time

import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from ..train.config import ConfigError
from ..train.mc_advantage import prefix_values
from ..train.rollout import generate, value_estimates
from ..train.task import DIGITS
from ..train.vapo import max_new_tokens
from .common import (Run, heldout_accuracy, pct, preset_sizes, pyplot, response_batch,
                     save_figure, token_count, train_in_stages, trainer_config, write_report,
                     write_results)

PRESETS = {
    "tiny": {"problems": 4, "samples": 4, "alternatives": 3, "rl_stages": [1]},
    "quick": {"problems": 48, "samples": 32, "alternatives": 4, "rl_stages": [10, 20]},
    "full": {"problems": 256, "samples": 256, "alternatives": 6, "rl_stages": [10, 20, 40]},
}
CLIFF_WINDOW = 3  # boundaries shown on each side of the cliff


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
        for j, offset in enumerate(boundaries(text)):
            tokens = token_count(state.tokenizer, text[:offset])
            if tokens >= int(batch.response_lengths[i]):
                break
            v = float(values[int(batch.cu_seqlens[i]) + tokens])
            rows.append((i, j, None if cliff is None else j - (cliff + 1), v))
            prefixes.append(text[:offset])
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
    owners, prefixes = [], []
    for problem in problems:
        j = rng.randrange(problem.steps)
        correct = task.steps(problem)
        for shift in range(alternatives):
            steps = correct if shift == 0 else task.steps(problem, error_at=j, error_shift=shift)
            owners.append(problem)
            prefixes.append("".join(steps[: j + 1]))
    batch = response_batch(run, owners, prefixes)
    values = value_estimates(state.value_model, batch, packed=False).cpu().double()
    # V of the state right after the prefix: the critic's output at the appended EOS.
    v = values[batch.cu_seqlens[1:].long() - 1].view(len(problems), alternatives)
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
    """Errors by position and by cliff offset; explained variance; pooled rank correlation."""
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
            "explained_variance": 1 - float((err ** 2).mean()) / variance if variance > 0 else None,
            "spearman": None if rank is None else float(rank), "boundaries": len(v)}


def plot(results: dict, out_dir: str) -> list[str]:
    plt = pyplot()
    stages = results["stages"]
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
    names = [save_figure(fig, out_dir, "value_error.png")]

    fig, axes = plt.subplots(1, len(stages), figsize=(3.4 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        ax.scatter(stage["probe"]["mc_value"], stage["probe"]["value"], s=6, alpha=0.5)
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ev = stage["summary"]["explained_variance"]
        ax.set_title(f"{stage['name']}\nexplained var {ev if ev is None else round(ev, 2)}",
                     fontsize=8)
        ax.set_xlabel("Monte-Carlo value")
    axes[0][0].set_ylabel("V(s)")
    names.append(save_figure(fig, out_dir, "value_scatter.png"))
    return names


def _num(x, digits=2):
    return "n/a" if x is None else f"{x:.{digits}f}"


def report(results: dict) -> list[str]:
    stages = results["stages"]
    lines = [f"{results['problems']} sampled responses per stage, the value of every step "
             f"boundary estimated from K = {results['samples']} continuations (seed "
             f"{results['seed']}); ranking: {results['alternatives']} candidate next steps at a "
             "random boundary of each correct chain."]
    table = ["| stage | held-out acc | boundaries | mean abs error | explained variance of the "
             "true value | Spearman(V, MC) | MC noise variance | ranking: Spearman | "
             "ranking: V picks the best step | random pick |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in stages:
        sm, rk = s["summary"], s["ranking"]
        abs_err = sum(d["abs_error"] * d["count"] for d in sm["by_position"].values()) / max(1, sm["boundaries"])
        table.append(f"| {s['name']} | {pct(s['heldout_accuracy'])} | {sm['boundaries']} | "
                     f"{abs_err:.3f} | {_num(sm['explained_variance'])} | {_num(sm['spearman'])} | "
                     f"{sm['mc_noise_variance']:.4f} | {_num(rk['spearman_mean'])} "
                     f"({rk['groups_ranked']} groups) | {pct(rk['top1_agreement'])} "
                     f"({rk['groups_with_unique_best']}) | {pct(rk['random_top1'])} |")
    lines.append("\n".join(table))
    first, last = stages[0]["summary"], stages[-1]["summary"]
    if last["explained_variance"] is not None:
        verdict = ("explains part of" if last["explained_variance"] > 0.1 else
                   "explains almost none of" if last["explained_variance"] > -0.1 else
                   "is worse than a constant at predicting")
        lines.append(f"At the last stage ({stages[-1]['name']}) V {verdict} the variance of the "
                     f"true prefix value (explained variance {last['explained_variance']:.2f}; "
                     f"at {stages[0]['name']}: {_num(first['explained_variance'])}).")
    cliff = last["by_cliff_offset"]
    before = [d for k, d in cliff.items() if int(k) < 0]
    after = [d for k, d in cliff.items() if int(k) >= 0]
    if before and after:
        mean = lambda ds, key: sum(d[key] * d["count"] for d in ds) / sum(d["count"] for d in ds)  # noqa: E731
        lines.append(f"Around the cliff (last stage): before the wrong step the true value is "
                     f"{mean(before, 'mc_value'):.2f} and V is off by {mean(before, 'bias'):+.2f} on "
                     f"average; after it the true value is {mean(after, 'mc_value'):.2f} and V is off "
                     f"by {mean(after, 'bias'):+.2f}.")
    rk = stages[-1]["ranking"]
    if rk["top1_agreement"] is not None:
        better = rk["top1_agreement"] > rk["random_top1"]
        lines.append(f"Ranking next steps (last stage): V picks the step with the highest true "
                     f"value in {pct(rk['top1_agreement'])} of {rk['groups_with_unique_best']} "
                     f"boundaries, {'above' if better else 'not above'} the "
                     f"{pct(rk['random_top1'])} of a random pick.")
    lines.append("Model size is not varied by the presets: rerun with `-- --tiny_hidden_size N "
                 "--tiny_layers L` or `--model FOLDER` and compare the reports.")
    return lines


def run_study(options: dict, extra_trainer_args: list[str]) -> dict:
    start = time.perf_counter()
    out_dir, preset, seed = options["output_dir"], options["preset"], options["seed"]
    sizes = preset_sizes(PRESETS, options)
    os.makedirs(out_dir, exist_ok=True)
    config = trainer_config(preset, seed, os.path.join(out_dir, "train"), extra_trainer_args,
                            progress=options["progress"])
    if sizes["alternatives"] < 2:
        raise ConfigError("alternatives", f"need >= 2 candidate steps to rank, got {sizes['alternatives']}")
    if sizes["alternatives"] > config.task.modulus:
        raise ConfigError("alternatives", f"at most modulus={config.task.modulus} distinct "
                          f"partial sums, got {sizes['alternatives']}")
    stages = []
    progress = tqdm(desc="value-probe stages", disable=not options["progress"])
    for name, run in train_in_stages(config, sizes["rl_stages"]):
        if run.task.name != "running_sum":
            raise ConfigError("task", "value-probe needs the running_sum task (its steps and cliffs)")
        # The study's own sampling must not shift the trainer's random stream.
        with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
            torch.manual_seed(seed)
            rng = random.Random(f"value-probe-{seed}")
            problems = run.task.sample(rng, sizes["problems"])  # the same problems at every stage
            probe = probe_boundaries(run, problems, sizes["samples"])
            ranking = rank_alternatives(run, problems, sizes["samples"], sizes["alternatives"], rng)
        stages.append({"name": name, "heldout_accuracy": heldout_accuracy(run), "probe": probe,
                       "summary": summarize(probe, sizes["samples"]), "ranking": ranking})
        progress.update()
    progress.close()
    results = {"seed": seed, **sizes, "stages": stages}
    results["figures"] = plot(results, out_dir)
    write_results(out_dir, "value-probe", {**options, **sizes}, config, results,
                  time.perf_counter() - start)
    write_report(out_dir, "value-probe: V(s_t) against the true value of prefixes",
                 report(results) + [f"Figures: {', '.join(results['figures'])}."])
    return results
