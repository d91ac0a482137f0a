"""The README's measurement: the default ``vapo-train`` over several seeds, each beside its
supervised baseline (the post-warm-up policy continued supervised for the same wall time).

    python -m vapo_kernels.train.measure --seeds 0 1 2 --out runs/measure/train_cpu

writes ``OUT_summary.json`` (per seed: accuracy after warm-up, after RL, of the baseline,
wall times; machine load before and after; the CPU's instruction set, torch's and
transformers' versions, which decide the exact numbers) and ``OUT_curves.png`` (held-out accuracy
against wall time since the end of warm-up, RL and baseline, every seed). Extra options
after ``--`` go to every run. Output files or run folders that exist already are refused
before anything trains.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from .cli import train
from .config import ConfigError, parse_config
from .metrics import read_rows


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def plot_seeds(runs: list[dict], out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(runs):
        color = f"C{i}"
        rows = read_rows(os.path.join(run["run_dir"], "metrics.jsonl"))
        for phase, style, label in (("rl", "o-", "VAPO"), ("supervised", "s--", "supervised")):
            pts = [(r["since_warmup_s"], r["heldout_accuracy"]) for r in rows
                   if r["phase"] == phase and "heldout_accuracy" in r and "since_warmup_s" in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, color=color, markersize=3,
                        label=f"seed {run['seed']}: {label}")
        ax.axhline(run["post_warmup_accuracy"], color=color, lw=0.5, ls=":")
    ax.set_xlabel("wall time since the end of warm-up (s)")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title("vapo-train default (running sum, CPU): VAPO vs the same time supervised")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", required=True, help="path prefix of the JSON and PNG")
    parser.add_argument("--runs-dir", default="runs/measure")
    parser.add_argument("--combine", nargs="+", metavar="SUMMARY_JSON", default=[],
                        help="no runs: combine the runs of earlier OUT_summary.json files "
                        "(seeds measured in parallel processes)")
    parser.add_argument("extra", nargs="*", help="options for every run (after --)")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # as vapo-train's main: save_pretrained's shard bars
    try:
        result = _measure(args)
    except ConfigError as error:
        print(f"measure: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("measure: interrupted", file=sys.stderr)
        sys.exit(130)
    for r in result["runs"]:
        print(f"seed {r['seed']}: warm-up {r['post_warmup_accuracy']:.3f} -> RL "
              f"{r['final_accuracy']:.3f} (baseline {r['baseline_accuracy']:.3f}); total "
              f"{r['total_s']:.0f} s, RL part {r['value_pretrain_and_rl_s']:.0f} s")


def _measure(args) -> dict:
    # Everything that could be refused, before ~3 minutes per seed of training.
    for path in (f"{args.out}_summary.json", f"{args.out}_curves.png"):
        if os.path.exists(path):
            raise ConfigError("out", f"{path} exists already: pass another --out")
    configs = [parse_config([
        "--seed", str(seed), "--supervised_baseline", "--no_progress",
        "--output_dir", os.path.join(args.runs_dir, f"seed{seed}"), *args.extra])
        for seed in (args.seeds if not args.combine else [])]
    for config in configs:
        if os.path.exists(config.run.output_dir) and os.listdir(config.run.output_dir):
            raise ConfigError("runs-dir", f"{config.run.output_dir} holds files already: "
                              "pass another --runs-dir")
    runs = []
    for path in args.combine:
        with open(path, encoding="utf-8") as f:
            earlier = json.load(f)
        runs += earlier["runs"]
        args.extra = earlier["extra_options"]
    for config in configs:
        load_before = _load()
        summary = train(config)
        summary["load_before"], summary["load_after"] = load_before, _load()
        runs.append(summary)
    gains = [r["final_accuracy"] - r["post_warmup_accuracy"] for r in runs]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "extra_options": args.extra,
        "runs": runs,
        "mean_gain_points": round(100 * sum(gains) / len(gains), 1),
        "mean_gain_over_baseline_points": round(100 * sum(
            r["final_accuracy"] - r["baseline_accuracy"] for r in runs) / len(runs), 1),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(f"{args.out}_summary.json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    plot_seeds(runs, f"{args.out}_curves.png")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return result


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
