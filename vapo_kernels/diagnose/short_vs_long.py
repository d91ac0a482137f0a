"""short-vs-long: does one lambda_policy suit short and long chains alike?

Per chain length L (the task with min_steps = max_steps = L): one warm-up and one value
pretraining, then from copies of those models an RL run per lambda_policy setting (fixed
lambdas, and VAPO's length-adaptive 1 - 1/(alpha l) for several alphas): held-out
accuracy against RL steps. Before RL, the advantages of each setting on the policy's own
samples are compared with Monte-Carlo ground truth per step: the true advantage of step j
is V*(after step j) - V*(before step j), both prefix values from K continuations; the
estimate is the sum of the setting's GAE advantages (``vk.gae``, unwhitened) over the
step's tokens, which with a perfect critic has exactly that conditional mean for every
lambda. Bias and variance of (estimate - truth) are reported per step position.
"""

from __future__ import annotations

import os
import random
import statistics
import time

import torch
from tqdm.auto import tqdm

import vapo_kernels as vk

from ..train.config import ConfigError, validate
from ..train.mc_advantage import prefix_values
from ..train.metrics import read_rows
from ..train.rollout import generate, value_estimates
from ..train.vapo import max_new_tokens, value_pretrain
from .common import (continue_run, pct, pyplot, rl_steps, save_figure, start_run, token_count,
                     trainer_config, with_options, write_report, write_results)
from .value_probe import boundaries

PRESETS = {
    "tiny": {"lengths": [2, 3], "lambdas": [0.95, 1.0], "alphas": [0.05, 1.0], "rl_steps": 1,
             "problems": 3, "samples": 3},
    "quick": {"lengths": [3, 8], "lambdas": [0.9, 0.95, 0.99, 1.0], "alphas": [0.05, 0.2, 1.0],
              "rl_steps": 6, "problems": 24, "samples": 16},
    "full": {"lengths": [3, 6, 10], "lambdas": [0.9, 0.95, 0.99, 1.0],
             "alphas": [0.05, 0.1, 0.2, 0.5, 1.0], "rl_steps": 30, "problems": 128, "samples": 64},
}


def settings(lambdas: list[float], alphas: list[float]) -> dict[str, dict]:
    """Label -> trainer options of each lambda_policy setting."""
    out = {f"lambda {lam:g}": {"length_adaptive": False, "lam_policy": lam} for lam in lambdas}
    out.update({f"adaptive alpha {a:g}": {"length_adaptive": True, "alpha": a} for a in alphas})
    return out


def policy_lambda(options: dict, lengths: torch.Tensor) -> float | torch.Tensor:
    if options["length_adaptive"]:
        return vk.length_adaptive_lambda(lengths, options["alpha"])
    return options["lam_policy"]


@torch.no_grad()
def advantage_errors(run, problems, samples: int, setting_options: dict[str, dict]) -> dict:
    """Per setting and step position: estimate - Monte-Carlo truth of each step's advantage."""
    state, task, config = run.state, run.task, run.config
    limit = max_new_tokens(config, task)
    batch = generate(state.policy, state.tokenizer, problems, task, max_new_tokens=limit,
                     temperature=config.rollout.temperature)
    values = value_estimates(state.value_model, batch, packed=False).cpu()
    # Step segments of every response: [token start, token end) between boundaries; the
    # last segment runs to the end (answer + EOS), where the truth is the reward itself.
    segments, prefixes, owners = [], [], []
    for i, text in enumerate(batch.responses):
        length = int(batch.response_lengths[i])
        cuts = [token_count(state.tokenizer, text[:b]) for b in boundaries(text)]
        cuts = [c for c in cuts if c < length]
        for j, start in enumerate(cuts):
            end = cuts[j + 1] if j + 1 < len(cuts) else length
            segments.append((i, j, start, end))
            prefixes.append(text[: boundaries(text)[j]])
            owners.append(batch.problems[i])
    mc = prefix_values(state.policy, state.tokenizer, task, owners, prefixes, samples=samples,
                       max_response_tokens=limit, temperature=config.rollout.temperature)
    truth = []
    for n, (i, j, start, end) in enumerate(segments):
        last = n + 1 == len(segments) or segments[n + 1][0] != i
        after = float(batch.scores[i]) if last else float(mc[n + 1])
        truth.append(after - float(mc[n]))
    out = {"position": [j for _, j, _, _ in segments], "truth": truth,
           "mc_noise_variance": float((mc * (1 - mc)).mean() / samples), "errors": {}}
    for label, options in setting_options.items():
        lam = policy_lambda(options, batch.response_lengths)
        adv = vk.gae(batch.rewards, values, None, batch.cu_seqlens, gamma=config.algorithm.gamma,
                     lam=lam)[0]
        estimate = [float(adv[int(batch.cu_seqlens[i]) + s: int(batch.cu_seqlens[i]) + e].sum())
                    for i, _, s, e in segments]
        out["errors"][label] = [e - t for e, t in zip(estimate, truth)]
    return out


def by_position(positions: list[int], errors: list[float]) -> dict[int, dict]:
    out = {}
    for j in sorted(set(positions)):
        es = [e for p, e in zip(positions, errors) if p == j]
        out[j] = {"bias": statistics.mean(es),
                  "variance": statistics.pvariance(es) if len(es) > 1 else 0.0, "count": len(es)}
    return out


def plot(results: dict, out_dir: str) -> list[str]:
    plt = pyplot()
    lengths = results["lengths"]
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 3.8), squeeze=False)
    for ax, L in zip(axes[0], lengths):
        for label, run in results["per_length"][str(L)]["runs"].items():
            steps, acc = zip(*run["curve"])
            ax.plot(steps, acc, "o-" if label.startswith("adaptive") else "s--", markersize=3,
                    label=label)
        ax.set_title(f"chains of {L} steps", fontsize=10)
        ax.set_xlabel("RL step")
    axes[0][0].set_ylabel("held-out accuracy")
    axes[0][-1].legend(fontsize=7)
    names = [save_figure(fig, out_dir, "accuracy_vs_steps.png")]

    fig, axes = plt.subplots(2, len(lengths), figsize=(5 * len(lengths), 6.5), squeeze=False)
    for col, L in enumerate(lengths):
        stats = results["per_length"][str(L)]["advantage_stats"]
        for label, rows in stats.items():
            xs = sorted(rows, key=int)
            axes[0][col].plot([int(x) for x in xs], [rows[x]["bias"] for x in xs], "o-",
                              markersize=3, label=label)
            axes[1][col].plot([int(x) for x in xs], [rows[x]["variance"] for x in xs], "o-",
                              markersize=3, label=label)
        axes[0][col].axhline(0, color="gray", linewidth=0.5)
        axes[0][col].set_title(f"chains of {L} steps: bias of the step advantage", fontsize=9)
        axes[1][col].set_title("variance of (estimate - Monte-Carlo truth)", fontsize=9)
        axes[1][col].set_xlabel("step position (last: the answer)")
    axes[0][-1].legend(fontsize=6)
    names.append(save_figure(fig, out_dir, "advantage_bias_variance.png"))
    return names


def report(results: dict) -> list[str]:
    lengths = results["lengths"]
    labels = list(results["per_length"][str(lengths[0])]["runs"])
    lines = [f"Seed {results['seed']}; per length one warm-up and {results['value_pretrain_steps']} "
             f"value-pretraining steps shared by all settings, then {results['rl_steps']} RL "
             f"steps per setting. Advantage errors: {results['problems']} sampled responses per "
             f"length, Monte-Carlo values from K = {results['samples']} continuations per step "
             "boundary, measured on the value-pretrained critic before RL."]
    head = "| setting | " + " | ".join(f"L={L}: final acc | L={L}: step-advantage MSE" for L in lengths) + " |"
    table = [head, "|---|" + "---|---|" * len(lengths)]
    for label in labels:
        cells = []
        for L in lengths:
            data = results["per_length"][str(L)]
            cells.append(pct(data["runs"][label]["final_accuracy"]))
            cells.append(f"{data['advantage_mse'][label]:.3f}")
        table.append(f"| {label} | " + " | ".join(cells) + " |")
    start = " | ".join(f"L={L}: {pct(results['per_length'][str(L)]['post_warmup_accuracy'])}"
                       for L in lengths)
    lines.append("\n".join(table) + f"\n\nHeld-out accuracy before RL: {start}.")
    for L in lengths:
        data = results["per_length"][str(L)]
        finals = {k: v["final_accuracy"] for k, v in data["runs"].items()}
        best = max(finals, key=finals.get)
        spread = max(finals.values()) - min(finals.values())
        mses = data["advantage_mse"]
        mse_best = ("all settings alike" if max(mses.values()) - min(mses.values()) < 1e-9
                    else min(mses, key=mses.get))
        noise = 0.5 / results["eval_size"] ** 0.5
        verdict = ("within the held-out noise, so no setting is distinguishable"
                   if spread <= 2 * noise else f"best: {best}")
        lines.append(f"Chains of {L} steps: final accuracies span {pct(min(finals.values()))}-"
                     f"{pct(max(finals.values()))} ({verdict}; ±{100 * noise:.1f} points per "
                     f"evaluation). The most accurate step advantages (lowest MSE against "
                     f"Monte-Carlo truth, which has its own noise variance "
                     f"{data['mc_noise_variance']:.4f} per value): {mse_best}.")
    lines.append("Note: alpha = 0.05 gives alpha * l <= 1, i.e. lambda clamped to 0 (pure TD), "
                 "for every response of at most 20 tokens; chains here are 4L + 3 tokens.")
    return lines


def run_study(options: dict, extra_trainer_args: list[str]) -> dict:
    start = time.perf_counter()
    out_dir, preset, seed = options["output_dir"], options["preset"], options["seed"]
    sizes = {**PRESETS[preset], **{k: v for k, v in options.items()
                                   if k in PRESETS[preset] and v is not None}}
    if any(not 0 <= lam <= 1 for lam in sizes["lambdas"]):
        raise ConfigError("lambdas", f"each must be in [0, 1], got {sizes['lambdas']}")
    if any(a <= 0 for a in sizes["alphas"]):
        raise ConfigError("alphas", f"each must be > 0, got {sizes['alphas']}")
    if any(L < 1 for L in sizes["lengths"]):
        raise ConfigError("lengths", f"each must be >= 1, got {sizes['lengths']}")
    os.makedirs(out_dir, exist_ok=True)
    setting_options = settings(sizes["lambdas"], sizes["alphas"])
    per_length, config = {}, None
    bar = tqdm(total=len(sizes["lengths"]) * len(setting_options), desc="short-vs-long runs",
               disable=not options["progress"])
    for L in sizes["lengths"]:
        folder = os.path.join(out_dir, "runs", f"L{L}")
        config = trainer_config(preset, seed, os.path.join(folder, "base"),
                                [*extra_trainer_args, "--min_steps", str(L), "--max_steps", str(L)],
                                progress=options["progress"])
        base = start_run(config)
        if config.algorithm.value_pretrain_steps:
            value_pretrain(base.state, base.task, config, base.log)
        base.log.close()
        with torch.random.fork_rng(devices=[base.device] if base.device.type == "cuda" else []):
            torch.manual_seed(seed)
            problems = base.task.sample(random.Random(f"short-vs-long-{seed}"), sizes["problems"])
            errors = advantage_errors(base, problems, sizes["samples"], setting_options)
        stats = {label: by_position(errors["position"], e) for label, e in errors["errors"].items()}
        mse = {label: statistics.mean(x * x for x in e) for label, e in errors["errors"].items()}
        runs = {}
        for label, changes in setting_options.items():
            cfg = with_options(config, **changes,
                               output_dir=os.path.join(folder, label.replace(" ", "_")))
            validate(cfg)
            run = continue_run(base, cfg)
            rl_steps(run, sizes["rl_steps"])
            run.log.close()
            curve = [(r["step"], r["heldout_accuracy"]) for r in read_rows(run.log.path)
                     if r["phase"] == "rl" and "heldout_accuracy" in r]
            runs[label] = {"curve": curve, "final_accuracy": curve[-1][1]}
            bar.update()
        per_length[str(L)] = {"runs": runs, "advantage_errors": errors, "advantage_stats": stats,
                              "advantage_mse": mse, "mc_noise_variance": errors["mc_noise_variance"],
                              "post_warmup_accuracy": next(iter(runs.values()))["curve"][0][1]}
    bar.close()
    results = {"seed": seed, **sizes, "value_pretrain_steps": config.algorithm.value_pretrain_steps,
               "eval_size": config.task.eval_size, "settings": setting_options,
               "per_length": per_length}
    results["figures"] = plot(results, out_dir)
    write_results(out_dir, "short-vs-long", {**options, **sizes}, config, results,
                  time.perf_counter() - start)
    write_report(out_dir, "short-vs-long: lambda_policy on short and long chains",
                 report(results) + [f"Figures: {', '.join(results['figures'])}."])
    return results
