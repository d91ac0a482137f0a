"""short-vs-long: does one lambda_policy suit short and long chains alike?

Per chain length L (the task with min_steps = max_steps = L): one warm-up and one value
pretraining, then from copies of those models an RL run per lambda_policy setting (fixed
lambdas, and VAPO's length-adaptive 1 - 1/(alpha l) for several alphas): held-out
accuracy against RL steps. Before RL, the advantages of each setting on the policy's own
samples are compared with Monte-Carlo ground truth per step.

**The quantity scored** (every setting, the same): the advantage of step j taken as one
action, A*_j = V*(after step j) - V*(before step j), whose truth is the difference of two
Monte-Carlo prefix values (K continuations each; after the last segment - the answer and
EOS - the value is the reward itself). A GAE setting's estimate of it is its lambda-return
of the step minus the critic's value before it:

    A_j = sum_{t in step j} delta_t + gamma * lambda * A^GAE(first token after step j)

(delta_t the critic's TD errors, A^GAE the setting's own ``vk.gae`` advantage, 0 after
the last token), i.e. the TD errors across the step, which telescope to V(after) -
V(before), plus lambda times the setting's advantage from the step's end on. With a
perfect critic its conditional mean given the step is A*_j for every lambda (E[A^GAE | state]
= 0 on the policy's own samples); its noise is lambda * A^GAE(after), the return's
spread, which is 0 at lambda = 0 and R - V(after) at lambda = 1. (gamma is 1 by default; the
truth is undiscounted.) The Monte-Carlo setting's estimate is its own per-token advantage,
V(after j) - V(before j) from ``mc_samples`` continuations drawn independently of the
truth's. (The previous version scored GAE on the *sum* of the step's per-token advantages,
which at lambda > 0 multiplies the return noise by up to the step's token count and is not
centred on A*_j for 0 < lambda < 1, against one token for Monte-Carlo.)

No GAE quantity is noise-free at lambda > 0, so every lambda setting has a **reference
row** "... [reference critic]": the same estimate with the critic replaced by the ground
truth's own Monte-Carlo values (V of a token = the truth's value of the boundary that opens
its step, so the value changes on a step's last token). Its error is 0 at lambda = 0 and
otherwise the estimator's own return noise (plus the truth's sampling noise): the learned
critic's row minus its reference row is what the learned critic adds.

Beside the GAE settings, the setting "Monte-Carlo K=..." trains with the trainer's
``--advantage mc`` (VinePPO: every token of step j gets V(after j) - V(before j), each
value the mean reward of ``mc_samples`` continuations); its step-advantage estimate is
that per-token advantage, from continuations drawn independently of the ground truth's.
Step segments are mapped onto the response ids as sampled (as in value-probe; a special
token drawn mid-response is in the ids, not in the text) and the truth's continuations
start from those ids, as ``train/mc_advantage.mc_advantages`` maps and continues its own;
the Monte-Carlo setting's estimate is read on each step's first token.
Accuracy is reported against RL steps and against training wall time (the trainer's
per-step phase times summed; evaluations excluded), since Monte-Carlo costs more
generation per step.
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
from ..train.mc_advantage import char_offsets_to_tokens, mc_advantages, prefix_values
from ..train.metrics import read_rows
from ..train.rollout import generate, value_estimates
from ..train.vapo import max_new_tokens, value_pretrain
from .common import (continue_run, pct, preset_sizes, pyplot, require_running_sum,
                     response_ids, rl_steps, save_figure, start_run, trainer_config, with_options,
                     write_outputs)
from .value_probe import boundaries

# samples: K of the Monte-Carlo ground truth; mc_samples: K of the Monte-Carlo setting's
# training (VinePPO's best was 9; 0 leaves the setting out)
PRESETS = {
    "tiny": {"lengths": [2, 3], "lambdas": [0.95, 1.0], "alphas": [0.05, 1.0], "rl_steps": 1,
             "problems": 3, "samples": 3, "mc_samples": 2},
    "quick": {"lengths": [3, 8], "lambdas": [0.9, 0.95, 0.99, 1.0], "alphas": [0.05, 0.2, 1.0],
              "rl_steps": 6, "problems": 24, "samples": 16, "mc_samples": 4},
    "full": {"lengths": [3, 6, 10], "lambdas": [0.9, 0.95, 0.99, 1.0],
             "alphas": [0.05, 0.1, 0.2, 0.5, 1.0], "rl_steps": 30, "problems": 128,
             "samples": 256, "mc_samples": 9},
}


# Trainer options each setting or length sets (cli refuses them after '--': they were
# silently overridden) and the vapo-diagnose option to use instead.
TRAINER_OWNED = {"min_steps": "--lengths", "max_steps": "--lengths",
                 "lam_policy": "--lambdas", "length_adaptive": "--lambdas or --alphas",
                 "alpha": "--alphas", "advantage": "--mc-samples", "mc_samples": "--mc-samples"}


def number(x: float) -> str:
    """A setting's number in its label: every digit it has (1.0 -> '1', 0.9999999 stays),
    so two settings never share a label (with :g both of these were 'lambda 1')."""
    return repr(float(x)).removesuffix(".0")


def settings(lambdas: list[float], alphas: list[float], mc_samples: int = 0) -> dict[str, dict]:
    """Label -> trainer options of each setting: the lambda_policy ones, then Monte-Carlo."""
    out = {f"lambda {number(lam)}": {"length_adaptive": False, "lam_policy": lam} for lam in lambdas}
    out.update({f"adaptive alpha {number(a)}": {"length_adaptive": True, "alpha": a} for a in alphas})
    if mc_samples:
        out[f"Monte-Carlo K={mc_samples}"] = {"advantage": "mc", "mc_samples": mc_samples}
    return out


def is_mc(options: dict) -> bool:
    return options.get("advantage") == "mc"


def policy_lambda(options: dict, lengths: torch.Tensor) -> float | torch.Tensor:
    if options["length_adaptive"]:
        return vk.length_adaptive_lambda(lengths, options["alpha"])
    return options["lam_policy"]


def step_estimates(rewards, values, cu_seqlens, segments, lam, gamma: float) -> list[float]:
    """A GAE setting's estimate of each step's advantage (the module docstring): the TD
    errors over the step's tokens plus gamma * lambda times the setting's GAE advantage of
    the first token after it, i.e. ``sum(delta[start:end - 1]) + A[end - 1]``.
    ``segments``: (sequence, step index, token start, token end) within each response."""
    adv = vk.gae(rewards, values, None, cu_seqlens, gamma=gamma,
                 lam=lam)[0]
    delta = vk.gae(rewards, values, None, cu_seqlens, gamma=gamma, lam=0.0)[0]
    out = []
    for i, _, start, end in segments:
        base = int(cu_seqlens[i])
        out.append(float(delta[base + start: base + end - 1].double().sum())
                   + float(adv[base + end - 1]))
    return out


def reference_values(num_tokens: int, cu_seqlens, segments, boundary_values) -> torch.Tensor:
    """The reference critic: each token's V is the ground truth's Monte-Carlo value of the
    boundary that opens its step (so V changes on a step's last token)."""
    values = torch.zeros(num_tokens, dtype=torch.float32)
    for (i, _, start, end), v in zip(segments, boundary_values):
        base = int(cu_seqlens[i])
        values[base + start: base + end] = float(v)
    return values


def reference_label(label: str) -> str:
    return f"{label} [reference critic]"


def response_segments(tokenizer, batch) -> tuple[list, list, list]:
    """Step segments of every response of ``batch``: (sequence, step index, token start,
    token end) between boundaries, the last running to the end (answer + EOS); with the
    prefix that opens each segment, as the response's token ids up to the segment's start
    (the state the Monte-Carlo truth continues from), and its problem."""
    segments, prefixes, owners = [], [], []
    for i, text in enumerate(batch.responses):
        length = int(batch.response_lengths[i])
        offsets = boundaries(text)
        # on the sampled ids: a special token drawn mid-response is not in the text
        ids = response_ids(batch, i)
        cuts = char_offsets_to_tokens(tokenizer, ids, offsets)
        cuts = [c for c in cuts if c < length]
        for j, start in enumerate(cuts):
            end = cuts[j + 1] if j + 1 < len(cuts) else length
            segments.append((i, j, start, end))
            prefixes.append(ids[:start])
            owners.append(batch.problems[i])
    return segments, prefixes, owners


@torch.no_grad()
def advantage_errors(run, problems, samples: int, setting_options: dict[str, dict]) -> dict:
    """Per setting and step: estimate - Monte-Carlo truth of each step's advantage (the
    module docstring defines both), and per lambda setting the same with the reference
    critic (the truth's own values)."""
    state, task, config = run.state, run.task, run.config
    limit = max_new_tokens(config, task)
    batch = generate(state.policy, state.tokenizer, problems, task, max_new_tokens=limit,
                     temperature=config.rollout.temperature)
    values = value_estimates(state.value_model, batch, packed=False).cpu()
    segments, prefixes, owners = response_segments(state.tokenizer, batch)
    mc = prefix_values(state.policy, state.tokenizer, task, owners, prefixes, samples=samples,
                       max_response_tokens=limit, temperature=config.rollout.temperature)
    truth = []
    for n, (i, j, start, end) in enumerate(segments):
        last = n + 1 == len(segments) or segments[n + 1][0] != i
        after = float(batch.scores[i]) if last else float(mc[n + 1])
        truth.append(after - float(mc[n]))
    reference = reference_values(batch.num_tokens, batch.cu_seqlens, segments, mc.tolist())
    out = {"position": [j for _, j, _, _ in segments], "truth": truth,
           "quantity": "step advantage: sum of TD errors over the step + gamma * lambda * "
                       "GAE advantage after it (GAE); V(after) - V(before) (Monte-Carlo)",
           "mc_noise_variance": float((mc * (1 - mc)).mean() / samples), "errors": {}}
    gamma = config.algorithm.gamma
    for label, options in setting_options.items():
        if is_mc(options):  # the trainer's estimate: one advantage per step, on every token
            adv, _ = mc_advantages(state.policy, state.tokenizer, task, batch,
                                   samples=options["mc_samples"], max_response_tokens=limit,
                                   temperature=config.rollout.temperature)
            out["errors"][label] = [float(adv[int(batch.cu_seqlens[i]) + s]) - t
                                    for (i, _, s, _), t in zip(segments, truth)]
            continue
        lam = policy_lambda(options, batch.response_lengths)
        for name, critic in ((label, values), (reference_label(label), reference)):
            estimate = step_estimates(batch.rewards, critic, batch.cu_seqlens, segments, lam, gamma)
            out["errors"][name] = [e - t for e, t in zip(estimate, truth)]
    return out


def curves(rows: list[dict]) -> tuple[list, list]:
    """Held-out accuracy against RL step and against training wall time: the trainer's
    phase times (``time_*_s``) summed over the steps so far, evaluations excluded."""
    by_step, by_time, seconds = [], [], 0.0
    for r in rows:
        if r["phase"] != "rl":
            continue
        seconds += sum(v for k, v in r.items() if k.startswith("time_") and k.endswith("_s"))
        if "heldout_accuracy" in r:
            by_step.append((r["step"], r["heldout_accuracy"]))
            by_time.append((round(seconds, 3), r["heldout_accuracy"]))
    return by_step, by_time


def time_to_reach(wall_curve: list, target: float) -> float | None:
    """Training seconds of the first evaluation at or above ``target`` (None: never)."""
    return next((t for t, acc in wall_curve if acc >= target - 1e-12), None)


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
    names = []
    for key, xlabel, name in (("curve", "RL step", "accuracy_vs_steps.png"),
                              ("wall_curve", "training wall time (s, evaluations excluded)",
                               "accuracy_vs_wall_time.png")):
        fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 3.8), squeeze=False)
        for ax, L in zip(axes[0], lengths):
            for label, run in results["per_length"][str(L)]["runs"].items():
                xs, acc = zip(*run[key])
                if label.startswith("Monte-Carlo"):
                    ax.plot(xs, acc, "D-", color="black", linewidth=2, markersize=4, label=label)
                else:
                    ax.plot(xs, acc, "o-" if label.startswith("adaptive") else "s--",
                            markersize=3, label=label)
            ax.set_title(f"chains of {L} steps", fontsize=10)
            ax.set_xlabel(xlabel)
        axes[0][0].set_ylabel("held-out accuracy")
        axes[0][-1].legend(fontsize=7)
        names.append(save_figure(fig, out_dir, name))

    fig, axes = plt.subplots(2, len(lengths), figsize=(5 * len(lengths), 6.5), squeeze=False)
    for col, L in enumerate(lengths):
        stats = results["per_length"][str(L)]["advantage_stats"]
        for label, rows in stats.items():
            xs = sorted(rows, key=int)
            style = ":" if label.endswith("[reference critic]") else "o-"
            axes[0][col].plot([int(x) for x in xs], [rows[x]["bias"] for x in xs], style,
                              markersize=3, label=label)
            axes[1][col].plot([int(x) for x in xs], [rows[x]["variance"] for x in xs], style,
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
             "boundary, measured on the value-pretrained critic before RL. Every setting is "
             "scored on the same quantity, the advantage of a step taken as one action, against the same "
             "truth V(after step) - V(before step): for a GAE setting its TD errors over the "
             "step plus gamma * lambda times its GAE advantage after the step (centred on the "
             "truth for a perfect critic at every lambda, noise-free only at lambda 0), for "
             "Monte-Carlo its own V(after) - V(before) from independent continuations. Rows "
             "'[reference critic]' use the truth's own values as the critic: their MSE is the "
             "estimator's own noise at that lambda (0 at lambda 0), so the learned critic's "
             "row minus its reference row is what the learned critic adds."]
    head = "| setting | " + " | ".join(f"L={L}: final acc | L={L}: step-advantage MSE" for L in lengths) + " |"
    table = [head, "|---|" + "---|---|" * len(lengths)]
    for label in labels + [k for k in results["per_length"][str(lengths[0])]["advantage_mse"]
                           if k not in labels]:
        cells = []
        for L in lengths:
            data = results["per_length"][str(L)]
            run = data["runs"].get(label)
            cells.append("-" if run is None else pct(run["final_accuracy"]))
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
        mses = {k: v for k, v in data["advantage_mse"].items() if not k.endswith("[reference critic]")}
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
        excess = [f"{k} {mses[k] - data['advantage_mse'][reference_label(k)]:+.3f}"
                  for k in mses if reference_label(k) in data["advantage_mse"]]
        if excess:
            lines.append(f"Chains of {L} steps, step-advantage MSE of the learned critic minus "
                         f"that of the reference critic (what the learned critic adds to the "
                         f"estimator's own noise, cross terms included; the learned rows also "
                         f"carry the truth's noise, ~{2 * data['mc_noise_variance']:.3f} per step, "
                         f"which the reference rows share only at lambda > 0): "
                         + ", ".join(excess) + ".")
    lines += [mc_sentence(results, L) for L in lengths]
    lines.append("Note: alpha = 0.05 gives alpha * l <= 1, i.e. lambda clamped to 0 (pure TD), "
                 "for every response of at most 20 tokens; chains here are 4L + 3 tokens.")
    return lines


def mc_sentence(results: dict, L: int) -> str:
    """Monte-Carlo against the GAE settings at one length: cost per step, accuracy, and
    training time to the best GAE setting's final accuracy (VinePPO's claim)."""
    runs = results["per_length"][str(L)]["runs"]
    mc = [k for k in runs if k.startswith("Monte-Carlo")]
    gae = {k: v for k, v in runs.items() if not k.startswith("Monte-Carlo")}
    if not mc or not gae:
        return ""
    label, run = mc[0], runs[mc[0]]
    gae_step = sum(v["seconds_per_step"] for v in gae.values()) / len(gae)
    best = max(gae, key=lambda k: gae[k]["final_accuracy"])
    target = gae[best]["final_accuracy"]
    gae_time, mc_time = time_to_reach(gae[best]["wall_curve"], target), time_to_reach(run["wall_curve"], target)
    noise = 0.5 / results["eval_size"] ** 0.5
    gap = run["final_accuracy"] - target
    compare = ("within the held-out noise" if abs(gap) <= 2 * noise else
               f"{abs(100 * gap):.1f} points {'above' if gap > 0 else 'below'}")
    start = gae[best]["curve"][0][1]
    if mc_time is None:
        reach = (f"it did not reach the best GAE setting's final accuracy ({best}, "
                 f"{pct(target)}, in {secs(gae_time)}) within {results['rl_steps']} steps "
                 f"({secs(run['wall_curve'][-1][0])})")
    elif target <= start:
        reach = (f"no GAE setting ended above the accuracy before RL ({pct(start)}), so the "
                 "time to the best GAE accuracy says nothing here")
    else:
        ratio = mc_time / gae_time
        reach = (f"it reached the best GAE setting's final accuracy ({best}, {pct(target)}) "
                 f"after {secs(mc_time)} of training against {secs(gae_time)} for {best} "
                 f"({ratio:.2f}x the time: {'faster' if ratio < 1 else 'not faster'} than "
                 "GAE; VinePPO reports up to 3x less wall time on MATH)")
    return (f"{label} at chains of {L} steps: {secs(run['seconds_per_step'])} of training per "
            f"RL step against {secs(gae_step)} for the GAE settings on average "
            f"({run['seconds_per_step'] / max(gae_step, 1e-9):.1f}x); final accuracy "
            f"{pct(run['final_accuracy'])} against {pct(target)} for the best GAE setting "
            f"({compare}, ±{100 * noise:.1f} points per evaluation); {reach}.")


def secs(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.0f} s"


def run_study(options: dict, extra_trainer_args: list[str]) -> dict:
    start = time.perf_counter()
    out_dir, preset, seed = options["output_dir"], options["preset"], options["seed"]
    sizes = preset_sizes(PRESETS, options)
    if any(not 0 <= lam <= 1 for lam in sizes["lambdas"]):
        raise ConfigError("lambdas", f"each must be in [0, 1], got {sizes['lambdas']}")
    if any(not 0 < a < float("inf") for a in sizes["alphas"]):  # NaN included
        raise ConfigError("alphas", f"each must be a finite number > 0, got {sizes['alphas']}")
    if any(L < 1 for L in sizes["lengths"]):
        raise ConfigError("lengths", f"each must be >= 1, got {sizes['lengths']}")
    os.makedirs(out_dir, exist_ok=True)
    setting_options = settings(sizes["lambdas"], sizes["alphas"], sizes["mc_samples"])
    # Every length's and setting's trainer config, validated before anything trains.
    configs = {}
    for L in sizes["lengths"]:
        folder = os.path.join(out_dir, "runs", f"L{L}")
        config = trainer_config(preset, seed, os.path.join(folder, "base"),
                                [*extra_trainer_args, "--min_steps", str(L), "--max_steps", str(L)],
                                progress=options["progress"])
        require_running_sum(config, "short-vs-long")
        configs[L] = (config, {label: with_options(config, **changes, output_dir=os.path.join(
            folder, label.replace(" ", "_"))) for label, changes in setting_options.items()})
        for cfg in configs[L][1].values():
            validate(cfg)
    per_length = {}
    bar = tqdm(total=len(sizes["lengths"]) * len(setting_options), desc="short-vs-long runs",
               disable=not options["progress"])
    for L in sizes["lengths"]:
        config, setting_configs = configs[L]
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
        for label, cfg in setting_configs.items():
            run = continue_run(base, cfg)
            rl_steps(run, sizes["rl_steps"])
            run.log.close()
            curve, wall_curve = curves(read_rows(run.log.path))
            runs[label] = {"curve": curve, "wall_curve": wall_curve,
                           "final_accuracy": curve[-1][1],
                           "seconds_per_step": wall_curve[-1][0] / max(1, curve[-1][0])}
            bar.update()
        per_length[str(L)] = {"runs": runs, "advantage_errors": errors, "advantage_stats": stats,
                              "advantage_mse": mse, "mc_noise_variance": errors["mc_noise_variance"],
                              "post_warmup_accuracy": next(iter(runs.values()))["curve"][0][1]}
    bar.close()
    results = {"seed": seed, **sizes, "value_pretrain_steps": config.algorithm.value_pretrain_steps,
               "eval_size": config.task.eval_size, "settings": setting_options,
               "per_length": per_length}
    write_outputs(out_dir, "short-vs-long", "short-vs-long: lambda_policy on short and long "
                  "chains", {**options, **sizes}, config, results, start, report, plot)
    return results
