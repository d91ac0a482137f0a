"""injected-errors: where does GAE put the blame for one wrong step?

Take correct running-sum chains of one length L, inject an error at step k (its partial
sum is off by one and later steps carry the wrong sum forward, so the answer is wrong and
the reward is 0), and compute the advantages of the whole response with ``vk.gae``
(no whitening, gamma = 1) from the value model's V(s_t), for several lambdas. The
**credit map** is the mean advantage per step index; the **mass at k** is the share of
the negative advantage mass (sum of max(-A, 0)) that lands on step k's tokens. A perfect
critic with lambda = 0 puts all of it there; lambda = 1 spreads it over every token up
to the error (A_t = R - V(s_t)); a critic blind to the error spreads it everywhere.

Beside the lambda rows, the row "Monte-Carlo (K continuations)" takes VinePPO's
advantages of the same chains (:func:`vapo_kernels.train.mc_advantage.mc_advantages`):
every token of step j gets V(after step j) - V(before step j), both values the mean
reward of K of the policy's own continuations, so no critic is involved; it is measured
with the same mass-at-k and credit-map metrics. It costs (L + 1) * K generations per chain,
so it runs on the first ``mc_problems`` chains of each k; the GAE rows are measured on those
same chains too (rows "... [first N chains]", beside the rows on all chains), and the
Monte-Carlo-vs-GAE verdict compares rows on the same chains. Every row's mean mass at k has
a 95% bootstrap interval over chains (resampled within each k, seeded), and the verdict is
that of the paired bootstrap interval of the difference (Monte-Carlo minus the best GAE
row on the same chains): sharper / less sharp when it excludes 0, else not told apart.
"""

from __future__ import annotations

import math
import os
import random
import time

import torch
from tqdm.auto import tqdm

import vapo_kernels as vk

from ..train.config import ConfigError
from ..train.mc_advantage import mc_advantages
from ..train.rollout import value_estimates
from ..train.vapo import max_new_tokens
from .common import (Run, heldout_accuracy, pct, preset_sizes, pyplot, require_running_sum,
                     response_batch, save_figure, step_spans, train_in_stages, trainer_config,
                     write_outputs)

# chains of `length` steps, `problems` chains per injected step, RL stages (cumulative
# steps), K continuations per step boundary of the Monte-Carlo row (mc_samples), measured
# on the first mc_problems chains of each k (each costs (length + 1) * K generations)
PRESETS = {
    "tiny": {"length": 3, "problems": 4, "rl_stages": [1], "mc_samples": 2, "mc_problems": 4},
    "quick": {"length": 8, "problems": 64, "rl_stages": [10, 20], "mc_samples": 8,
              "mc_problems": 16},
    "full": {"length": 8, "problems": 256, "rl_stages": [10, 20, 40], "mc_samples": 256,
             "mc_problems": 64},
}


def mc_label(samples: int) -> str:
    return f"Monte-Carlo (K={samples} continuations)"


def lambda_settings(alpha: float) -> dict[str, float | str]:
    """Label -> lambda (a float, or "adaptive" for VAPO's 1 - 1/(alpha l) per sequence)."""
    return {"lambda 0 (TD)": 0.0, "lambda 0.95": 0.95, "lambda 1.0": 1.0,
            f"length-adaptive (alpha {alpha:g})": "adaptive"}


def advantages(rewards, values, cu_seqlens, lam: float | str, alpha: float) -> torch.Tensor:
    """Raw (unwhitened) GAE advantages of packed sequences from ``vk.gae``, gamma = 1."""
    if lam == "adaptive":
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        lam = vk.length_adaptive_lambda(lengths, alpha)
    return vk.gae(rewards, values, None, cu_seqlens, gamma=1.0, lam=lam)[0]


def credit_of_sequence(adv: torch.Tensor, spans: list[tuple[int, int]], error_at: int
                       ) -> dict[str, float] | None:
    """Share of the negative advantage mass before, on and after step ``error_at`` (tokens
    after the last step, the answer and EOS, count as after), and the mean advantage per
    step. None when the sequence has no negative advantage."""
    negative = (-adv.double()).clamp(min=0)
    total = float(negative.sum())
    if total <= 0:
        return None
    start, end = spans[error_at]
    return {"at": float(negative[start:end].sum()) / total,
            "before": float(negative[:start].sum()) / total,
            "after": float(negative[end:].sum()) / total,
            "per_step": [float(adv[s:e].double().mean()) for s, e in spans]}


def error_chains(run: Run, length: int, count: int, error_at: int, rng: random.Random):
    """``count`` problems of ``length`` steps with the error injected at ``error_at``:
    (batch, token spans of each problem's steps)."""
    task = run.task
    problems = [task.problem(tuple(rng.randrange(task.modulus) for _ in range(length)))
                for _ in range(count)]
    responses = [task.response_prefix(p, p.steps, error_at=error_at) for p in problems]
    spans = [step_spans(run.state.tokenizer, task.steps(p, error_at=error_at)) for p in problems]
    return response_batch(run, problems, responses), spans


def mean_credit(adv: torch.Tensor, cu_seqlens: torch.Tensor, spans, k: int, length: int
                ) -> dict[str, float | list[float]]:
    """Mass at, before and after step k and the mean advantage per step (the credit-map
    row), averaged over the sequences that have negative advantage."""
    credits, per_chain = [], []  # per_chain: each chain's mass at k (None: no negative A)
    for i in range(len(spans)):
        lo, hi = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        credit = credit_of_sequence(adv[lo:hi], spans[i], k)
        per_chain.append(None if credit is None else credit["at"])
        if credit is not None:
            credits.append(credit)
    mean = lambda key: sum(c[key] for c in credits) / len(credits) if credits else float("nan")  # noqa: E731
    return {"at": mean("at"), "before": mean("before"), "after": mean("after"),
            "per_step": [sum(c["per_step"][j] for c in credits) / max(1, len(credits))
                         for j in range(length)],
            "at_per_chain": per_chain}


@torch.no_grad()
def measure_stage(run: Run, length: int, count: int, seed: int, progress: bool,
                  mc_samples: int = 0, mc_problems: int = 0, stage_index: int = 0) -> dict:
    """Mass at k and the credit map for every k and lambda, with this stage's critic, and
    (``mc_samples`` > 0) for Monte-Carlo advantages of the first ``mc_problems`` chains."""
    alpha = run.config.algorithm.alpha
    settings = lambda_settings(alpha)
    mc_count = min(mc_problems, count) if mc_samples else 0
    subset = mc_count < count if mc_samples else False  # GAE rows on the Monte-Carlo chains too
    labels = [*settings, *([mc_label(mc_samples)] if mc_samples else []),
              *([same_chains_label(label, mc_count) for label in settings] if subset else [])]
    rng = random.Random(f"injected-{seed}")  # the same chains at every stage
    out = {label: {"mass_at_k": [], "mass_before_k": [], "mass_after_k": [], "credit_map": [],
                   "mass_at_k_per_chain": []}
           for label in labels}
    uniform = []
    for k in tqdm(range(length), desc="  inject at k", leave=False, disable=not progress):
        batch, spans = error_chains(run, length, count, k, rng)
        if float(batch.scores.sum()) != 0.0:
            raise AssertionError("an injected error left a correct answer")
        values = value_estimates(run.state.value_model, batch, packed=False).cpu()
        lengths = batch.response_lengths.tolist()
        uniform.append(sum((s[k][1] - s[k][0]) / n for s, n in zip(spans, lengths)) / count)
        gae = {label: advantages(batch.rewards, values, batch.cu_seqlens, lam, alpha)
               for label, lam in settings.items()}
        credits = {label: mean_credit(adv, batch.cu_seqlens, spans, k, length)
                   for label, adv in gae.items()}
        if mc_samples:
            sub = batch.select(torch.arange(mc_count))
            credits[mc_label(mc_samples)] = mean_credit(
                mc_chain_advantages(run, sub, mc_samples, (seed, stage_index, k)),
                sub.cu_seqlens, spans[: sub.size], k, length)
            if subset:  # the same GAE advantages, on the Monte-Carlo row's chains only
                end = int(batch.cu_seqlens[mc_count])
                for label, adv in gae.items():
                    credits[same_chains_label(label, mc_count)] = mean_credit(
                        adv[:end], batch.cu_seqlens[: mc_count + 1], spans[:mc_count], k, length)
        for label, credit in credits.items():
            out[label]["mass_at_k_per_chain"].append(credit["at_per_chain"])
            out[label]["mass_at_k"].append(credit["at"])
            out[label]["mass_before_k"].append(credit["before"])
            out[label]["mass_after_k"].append(credit["after"])
            out[label]["credit_map"].append(credit["per_step"])
    stage = {"lambdas": out, "uniform_share_of_step_k": uniform}
    stage["bootstrap"] = bootstrap_stage(stage, mc_label(mc_samples) if mc_samples else None,
                                         mc_count, (seed, stage_index))
    return stage


def same_chains_label(label: str, chains: int) -> str:
    return f"{label} [first {chains} chains]"


def on_mc_chains(label: str) -> bool:
    """A GAE row measured on the Monte-Carlo row's chains only (:func:`same_chains_label`)."""
    return label.endswith(" chains]")


BOOTSTRAP_RESAMPLES = 2000


def _resample_means(per_chain: list[list], index: list[torch.Tensor]) -> torch.Tensor:
    """Mean over k of the mean over chains of the mass at k, for each bootstrap resample
    (``index[k]``: (R, chains) chain indices drawn with replacement within k)."""
    per_k = []
    for chains, idx in zip(per_chain, index):
        x = torch.tensor([float("nan") if c is None else c for c in chains], dtype=torch.float64)
        per_k.append(torch.nanmean(x[idx], dim=1))
    return torch.nanmean(torch.stack(per_k, 1), dim=1)


def mean_over_k(values: list) -> tuple[float, int]:
    """Mean over the k that have a value (NaN, or None in results.json: no chain of that k
    had negative advantage), as the bootstrap's nanmean; and how many k that is (0: NaN)."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return (sum(kept) / len(kept) if kept else float("nan")), len(kept)


def _of_k(count: int, length: int) -> str:
    """' (over 2 of 3 k)' when some k had no negative advantage."""
    return "" if count == length else f" (over {count} of {length} k)"


def _ci(samples: torch.Tensor) -> list[float] | None:
    samples = samples[~samples.isnan()]
    if len(samples) == 0:
        return None
    return [float(torch.quantile(samples, 0.025)), float(torch.quantile(samples, 0.975))]


def bootstrap_stage(stage: dict, mc: str | None, mc_count: int, key: tuple) -> dict:
    """95% bootstrap intervals (chains resampled within each k, seeded by ``key``) of each
    row's mean over k of the mass at k, and of the Monte-Carlo row minus each GAE row
    measured on the same chains (paired: the same resampled chains for both)."""
    rows = stage["lambdas"]
    gen = torch.Generator().manual_seed(hash_seed((*key, 99)))
    index_of = {}  # chain count -> per-k resample indices, shared by the rows on those chains
    for label, data in rows.items():
        n = len(data["mass_at_k_per_chain"][0]) if data["mass_at_k_per_chain"] else 0
        if n and n not in index_of:
            index_of[n] = [torch.randint(n, (BOOTSTRAP_RESAMPLES, n), generator=gen)
                           for _ in data["mass_at_k_per_chain"]]
    draws = {label: _resample_means(d["mass_at_k_per_chain"],
                                    index_of[len(d["mass_at_k_per_chain"][0])])
             for label, d in rows.items() if d["mass_at_k_per_chain"]}
    out = {"resamples": BOOTSTRAP_RESAMPLES, "level": 0.95,
           "mass_at_k_mean_ci": {label: _ci(d) for label, d in draws.items()},
           "mc_minus_gae_ci": {}}
    if mc is not None and mc in draws:
        for label in rows:
            if label == mc or len(rows[label]["mass_at_k_per_chain"][0]) != mc_count:
                continue
            out["mc_minus_gae_ci"][label] = _ci(draws[mc] - draws[label])
    return out


def mc_chain_advantages(run: Run, batch, samples: int, rng_key: tuple) -> torch.Tensor:
    """VinePPO's advantages of the chains, sampled under a seed of their own; the training
    run's random stream is restored afterwards, so measuring does not change later stages."""
    devices = [run.device] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(hash_seed(rng_key))
        adv, _ = mc_advantages(run.state.policy, run.state.tokenizer, run.task, batch,
                               samples=samples,
                               max_response_tokens=max_new_tokens(run.config, run.task),
                               temperature=run.config.rollout.temperature)
    return adv


def hash_seed(key: tuple) -> int:
    """A seed from a tuple of ints, the same in every process (``hash`` of a str is not)."""
    value = 0
    for part in key:
        value = (value * 1_000_003 + int(part)) % (2**63 - 1)
    return value


def plot(results: dict, out_dir: str) -> list[str]:
    plt = pyplot()
    stages = results["stages"]
    length = results["length"]
    ks = list(range(length))
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.8), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for label, data in stage["lambdas"].items():
            mc = label.startswith("Monte-Carlo")
            style = "s-" if mc else "x:" if on_mc_chains(label) else "o-"
            ax.plot(ks, data["mass_at_k"], style, markersize=4 if mc else 3,
                    linewidth=2 if mc else 1, color="black" if mc else None, label=label)
        ax.plot(ks, stage["uniform_share_of_step_k"], "k--", linewidth=1,
                label="step k's share of tokens")
        ax.set_title(f"{stage['name']}\nheld-out acc {pct(stage['heldout_accuracy'])}", fontsize=9)
        ax.set_xlabel("injected error at step k")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("share of negative advantage on step k")
    axes[0][-1].legend(fontsize=7)
    names = [save_figure(fig, out_dir, "mass_at_k.png")]

    last = stages[-1]
    shown = {k: v for k, v in last["lambdas"].items() if not on_mc_chains(k)}
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.4), squeeze=False)
    for ax, (label, data) in zip(axes[0], shown.items()):
        grid = torch.tensor(data["credit_map"])
        scale = float(grid.abs().max()) or 1.0
        image = ax.imshow(grid.numpy(), cmap="RdBu", vmin=-scale, vmax=scale)
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(length))
        ax.set_yticks(range(length))
        ax.set_xlabel("step of the token")
        ax.set_ylabel("injected error at step k")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"credit map: mean advantage per step ({last['name']})", fontsize=10)
    names.append(save_figure(fig, out_dir, "credit_map.png"))
    return names


def report(results: dict) -> list[str]:
    stages, length = results["stages"], results["length"]
    lines = [f"Chains of {length} steps, {results['problems']} per injected step k = 0..{length - 1}, "
             f"seed {results['seed']}; advantages from `vk.gae` (gamma 1, unwhitened) with the "
             "value model of each stage. 'Mass at k' is the share of the negative advantage "
             "on step k's tokens, averaged over chains; the dashed line in mass_at_k.png is "
             "step k's share of the tokens (blame spread evenly)."]
    if results.get("mc_samples"):
        lines.append(f"The row {mc_label(results['mc_samples'])} is VinePPO's estimator on the "
                     f"first {results['mc_problems']} chains of each k: "
                     "every token of step j gets V(after j) - V(before j), each value the mean "
                     f"reward of {results['mc_samples']} continuations sampled from the stage's "
                     "policy (no critic). The GAE rows '[first "
                     f"{results['mc_problems']} chains]' are the GAE rows on exactly those chains "
                     "(the comparison with Monte-Carlo uses them); the unlabelled GAE rows use all "
                     f"{results['problems']} chains per k.")
    lines.append("In brackets: 95% bootstrap intervals over chains (resampled within each k, "
                 f"{stages[0].get('bootstrap', {}).get('resamples', 0)} seeded resamples); "
                 "for the Monte-Carlo row they include its continuation noise, which differs "
                 "from chain to chain.")
    table = ["| stage | held-out acc | " + " | ".join(stages[0]["lambdas"]) + " | even spread |",
             "|---|---|" + "---|" * (len(stages[0]["lambdas"]) + 1)]
    for s in stages:
        cis = s.get("bootstrap", {}).get("mass_at_k_mean_ci", {})
        cells = []
        for label, d in s["lambdas"].items():
            ci = cis.get(label)
            mass, count = mean_over_k(d["mass_at_k"])
            cells.append(pct(mass) + ("" if ci is None else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]")
                         + ("" if count in (0, length) else f" ({count}/{length} k)"))
        even = sum(s["uniform_share_of_step_k"]) / length
        table.append(f"| {s['name']} | {pct(s['heldout_accuracy'])} | "
                     + " | ".join(cells) + f" | {pct(even)} |")
    lines.append("Mean over k of the mass at k, over the k where some chain has negative "
                 "advantage ('(2/3 k)': one k had none; n/a: no k had any):\n\n" + "\n".join(table))
    last = stages[-1]
    findings = []
    even = sum(last["uniform_share_of_step_k"]) / length
    for label, data in last["lambdas"].items():
        if on_mc_chains(label):
            continue
        mass, count = mean_over_k(data["mass_at_k"])
        if not count:  # no chain had negative advantage: every value is 0, as the reward
            why = ("every continuation failed: V = 0 = reward everywhere"
                   if label.startswith("Monte-Carlo") else "V = 0 = reward everywhere")
            findings.append(f"{label}: no negative advantage at all ({why})")
            continue
        before, _ = mean_over_k(data["mass_before_k"])  # the same k: all three or none
        after, _ = mean_over_k(data["mass_after_k"])
        findings.append(f"{label}: {pct(mass)} of the blame on the wrong step ({mass / even:.1f}x "
                        f"an even spread), {pct(before)} on the correct steps before it, "
                        f"{pct(after)} after it{_of_k(count, length)}")
    lines.append(f"At the last stage ({last['name']}): " + "; ".join(findings) + ".")
    gae = {k: d for k, d in last["lambdas"].items()
           if not k.startswith("Monte-Carlo") and not on_mc_chains(k)}
    first_k = [d["mass_at_k"][0] for d in gae.values() if d["mass_at_k"][0] == d["mass_at_k"][0]]
    last_k = [d["mass_at_k"][-1] for d in gae.values() if d["mass_at_k"][-1] == d["mass_at_k"][-1]]
    if first_k and last_k and length > 1:
        first, final = sum(first_k) / len(first_k), sum(last_k) / len(last_k)
        trend = "falls" if final < first else "rises"
        lines.append(f"Averaged over the lambdas, the mass at k {trend} from {pct(first)} "
                     f"(error at the first step) to {pct(final)} (error at the last step).")
    lines.append(mc_comparison(results))
    return lines


def mc_comparison(results: dict) -> str:
    """One sentence per run: the Monte-Carlo row's mean mass at k against the best GAE row
    on the same chains, per stage, with the paired bootstrap interval of the difference;
    the verdict is the interval's (above 0: sharper; below: less sharp; else not told apart)."""
    if not results.get("mc_samples"):
        return ""
    label, length = mc_label(results["mc_samples"]), results["length"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    parts = []
    for stage in results["stages"]:
        over_k = {k: mean_over_k(d["mass_at_k"]) for k, d in stage["lambdas"].items()}
        masses = {k: m for k, (m, count) in over_k.items() if count}
        if label not in masses:
            parts.append(f"{stage['name']}: no Monte-Carlo negative advantage to share out")
            continue
        diffs = stage.get("bootstrap", {}).get("mc_minus_gae_ci", {})
        gae = {k: m for k, m in masses.items() if k in diffs}
        even = mean(stage["uniform_share_of_step_k"])
        if not gae:
            parts.append(f"{stage['name']}: Monte-Carlo {pct(masses[label])}, no GAE row on the "
                         "same chains has negative advantage")
            continue
        best = max(gae, key=gae.get)
        ci = diffs[best]
        verdict = ("cannot be compared (no interval)" if ci is None else
                   "locates the error more sharply than" if ci[0] > 0 else
                   "locates the error less sharply than" if ci[1] < 0 else
                   "is not distinguishable from")
        interval = "" if ci is None else f", difference {100 * (masses[label] - gae[best]):+.1f} points, 95% CI [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
        parts.append(f"{stage['name']}: Monte-Carlo {pct(masses[label])}"
                     f"{_of_k(over_k[label][1], length)} "
                     f"({masses[label] / even:.1f}x an even spread) vs the best GAE row on the "
                     f"same chains, {best}, {pct(gae[best])}{_of_k(over_k[best][1], length)}"
                     f"{interval}: it {verdict} GAE")
    return (f"Monte-Carlo credit beside GAE (mean over k = 0..{length - 1} of the mass at k, "
            f"both on the first {results['mc_problems']} chains of each k; the verdict is the "
            "paired bootstrap interval's, not a fixed margin; the best GAE row is picked on the "
            "same data, which favours it slightly): " + "; ".join(parts) + ".")


def run_study(options: dict, extra_trainer_args: list[str]) -> dict:
    """Train in stages; at each stage measure the credit of injected errors; write outputs."""
    start = time.perf_counter()
    out_dir, preset, seed = options["output_dir"], options["preset"], options["seed"]
    sizes = preset_sizes(PRESETS, options)
    os.makedirs(out_dir, exist_ok=True)
    config = trainer_config(preset, seed, os.path.join(out_dir, "train"), extra_trainer_args,
                            progress=options["progress"])
    require_running_sum(config, "injected-errors")
    length = sizes["length"]
    if not 1 <= length <= config.task.max_steps:
        raise ConfigError("length", f"must be in [1, max_steps={config.task.max_steps}] (the "
                          f"task's longest chain; raise it with -- --max_steps N), got {length}")
    stages = []
    for index, (name, run) in enumerate(train_in_stages(config, sizes["rl_stages"])):
        stage = measure_stage(run, length, sizes["problems"], seed, options["progress"],
                              mc_samples=sizes["mc_samples"], mc_problems=sizes["mc_problems"],
                              stage_index=index)
        stage.update(name=name, heldout_accuracy=heldout_accuracy(run))
        stages.append(stage)
    results = {"seed": seed, "length": length, "problems": sizes["problems"],
               "rl_stages": sizes["rl_stages"], "mc_samples": sizes["mc_samples"],
               "mc_problems": min(sizes["mc_problems"], sizes["problems"]), "stages": stages}
    write_outputs(out_dir, "injected-errors", "injected-errors: where GAE and Monte-Carlo "
                  "credit put the blame for one wrong step", {**options, **sizes}, config,
                  results, start, report, plot)
    return results
