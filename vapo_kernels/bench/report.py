"""The report folder of a ``vapo-bench`` run: ``results.json``, ``report.md`` and PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .harness import Row, best_peer_ratios


def row_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    """The rows as JSON-ready dicts, each with its floor and its ratio to the best peer
    of its shape and task (> 1: faster than that peer) and, at a per-call shape, its
    median over the bare torch op timed beside it."""
    ratios = best_peer_ratios(rows)
    bare = {(r.suite, r.shape): r.median_s for r in rows if r.kind == "bare" and r.median_s}
    out = []
    for i, r in enumerate(rows):
        best, ratio = ratios[i]
        med = r.median_s
        b = bare.get((r.suite, r.shape)) if r.per_call else None
        out.append({
            "suite": r.suite,
            "shape": r.shape,
            "task": r.task,
            "impl": r.impl,
            "kind": r.kind,
            "status": r.status,
            "tokens": r.tokens,
            "per_call": r.per_call,
            "median_s": med,
            "q1_s": r.stats.q1_s if r.stats else None,
            "q3_s": r.stats.q3_s if r.stats else None,
            "spread": r.stats.spread if r.stats else None,
            "reps": r.stats.reps if r.stats else 0,
            "attempts": r.attempts,
            "attempt_spreads": r.spreads,
            "kept_attempt": r.attempt if r.stats else None,
            "rounds": r.rounds,
            "interleaved": r.interleaved,
            "noisy": r.noisy,
            "estimated": r.estimated,
            "load_avg": r.load_avg,
            "under_load": r.under_load,
            "tokens_per_s": r.tokens / med if med else None,
            "floor_s": r.floor_s,
            "floor_formula": r.floor_formula,
            "fraction_of_floor": r.floor_s / med if (r.floor_s and med) else None,
            "achieved": r.achieved,
            "achieved_unit": r.achieved_unit,
            "best_peer": best,
            "vs_best_peer": ratio,
            "over_bare_op": med / b if (b and med and r.kind != "bare") else None,
            "check": None if r.check is None else ("ok" if r.check.ok else "FAIL"),
            "check_error": r.check.error if r.check else None,
            "checked_against": r.check.against if r.check else None,
            "first_call_s": r.first_call_s,
            "note": r.note,
        })
    return out


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _clean(x):
    """inf / nan as null: JSON has neither."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    data = _clean({"meta": meta, "rows": rows})
    path.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def _num(x: float | None, spec: str = ".3g", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _rounds_text(timing: dict[str, Any]) -> str:
    """How the rows of a shape were timed, for the report's preamble."""
    turn = timing.get("turn_s")
    if turn is None or not math.isfinite(turn):  # null in results.json: inf
        return "Each row was timed in one block, one row after another."
    return (f"The rows of a shape were timed together, interleaved: each row's calls in turns "
            f"of about {turn * 1e3:g} ms (at least 20 turns where it had the calls), spread over "
            "the same rounds in an order shuffled per round, so a slow period of the host "
            "slowed them alike.")


def _flags(r: dict[str, Any]) -> list[str]:
    """Why a row's time is less sure: wide spread, too few calls, a busy host."""
    return [f for f, key in (("noisy", "noisy"), ("estimate", "estimated"), ("under load", "under_load"))
            if r.get(key)]


def _status(r: dict[str, Any]) -> str:
    if r["status"] == "ok":
        flags = _flags(r)
        return "ok" + (f" ({', '.join(flags)})" if flags else "")
    return {"FAIL": "**FAIL**"}.get(r["status"], r["status"])


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """One table per suite and shape: every row's median, spread, floor, %floor, what it
    achieved, its ratio to the best peer and its check."""
    env = meta["environment"]
    lines = ["# vapo-bench report", ""]
    if not meta.get("complete", True):
        progress = meta.get("progress", "")
        if "interrupted" not in progress:
            progress += " (the run was still going, or was cut short)"
        lines += [f"**Incomplete run**: {progress}; the tables hold only those shapes.", ""]
    lines += [
        f"{env['device_name']} ({env['device']}, {env['threads']} torch threads, "
        f"{env['cpu_count']} cores), torch {env['torch']}, triton {env['triton']}, "
        f"python {env['python']}, {env['date']}. Command: `{meta['command']}`.",
        "",
        f"Copy bandwidth measured in this run: {_num(meta.get('copy_GB_s'), '.1f')} GB/s "
        "(read + write). *floor*: the time the task's bytes (or FLOP) take at that bandwidth "
        "(or at the fastest rate of a bare matmul of the same dims, in the task's dtype or "
        "float32); *%floor*: floor / median; *vs best peer*: the fastest peer's median over "
        "the row's (> 1: faster). *spread*: IQR / median. "
        f"{_rounds_text(meta['timing'])} "
        f"A row wider than {meta['timing']['max_spread']:g} was measured again (up to "
        f"{meta['timing']['remeasure']} more times, among the wide rows: `kept_attempt` > 0 "
        "in results.json when a later attempt was kept) and is flagged *noisy* if it stayed wide; "
        f"a row of fewer than {meta['timing']['min_reps']} timed calls is an *estimate*; a row "
        "whose 1-minute load average, less its own threads, was above half the cores at its "
        "start or end was measured *under load* (load averages in results.json).",
    ]
    san = meta.get("sanitizer")
    if san and san.get("ran"):
        verdict = "no error" if san["exit"] == 0 else f"ERRORS (exit {san['exit']})"
        lines.append(f"- compute-sanitizer {san['tool']}: {verdict}, log `{san['log']}`")
    elif san:
        asked = " although --sanitize was given" if san.get("asked") else ""
        lines.append(f"- compute-sanitizer not run{asked}: {san['why']}")
    missing = meta.get("peers_missing") or {}
    for suite, why in missing.items():
        for peer, reason in why.items():
            lines.append(f"- {suite}: peer **{peer}** not run: {reason}")
    lines += ["", *summary(rows)]
    headers = ["task", "impl", "median", "spread", "floor", "%floor", "achieved",
               "vs best peer", "/ bare op", "check", "status", "note"]
    by_case: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by_case.setdefault((r["suite"], r["shape"]), []).append(r)
    for (suite, shape), rs in by_case.items():
        per_call = " (per call: its time is the call's fixed cost)" if rs[0]["per_call"] else ""
        formulas = sorted({r["floor_formula"] for r in rs if r["floor_formula"]})
        lines += ["", f"## {suite} {shape}{per_call}", ""]
        lines += [f"Floor: {f}." for f in formulas]
        lines += ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for r in rs:
            name = f"**{r['impl']}**" if r["kind"] == "ours" else r["impl"]
            achieved = _num(r["achieved"], ".3g", f" {r['achieved_unit']}") if r["achieved"] else "-"
            note = r["note"] if (r["status"] != "ok" or r["kind"] != "ours") else ""
            cells = [
                r["task"], name, fmt_time(r["median_s"]), _num(r["spread"], ".0%"),
                fmt_time(r["floor_s"]),
                _num(r["fraction_of_floor"] and 100 * r["fraction_of_floor"], ".3g", "%"),
                achieved, _num(r["vs_best_peer"], ".3g", "x"), _num(r["over_bare_op"], ".3g", "x"),
                r["check"] or "-", _status(r), note.replace("|", "/")[:140],
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """The headline table: per suite, shape and task, our fastest checked row beside the
    fastest checked peer and the floor (what the README quotes)."""
    best: dict[tuple[str, str, str], dict[str, dict]] = {}
    for r in rows:
        if r["status"] != "ok" or r["check"] != "ok" or not r["median_s"]:
            continue
        if r["kind"] not in ("ours", "peer"):
            continue
        slot = best.setdefault((r["suite"], r["shape"], r["task"]), {})
        if r["kind"] not in slot or r["median_s"] < slot[r["kind"]]["median_s"]:
            slot[r["kind"]] = r
    lines = [
        "## Summary",
        "",
        "Per shape and task: our fastest implementation and the fastest peer, both checked "
        "against float64 first. A time flagged *noisy*, *estimate* or *under load* (ours or "
        "the peer's) makes its ratio uncertain, and the ratio says so.",
        "",
        "| suite | shape | task | floor | ours (fastest) | %floor | best peer | peer | ours × peer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (suite, shape, task), slot in best.items():
        ours, peer = slot.get("ours"), slot.get("peer")
        if ours is None:
            continue
        ours_flags, peer_flags = _flags(ours), _flags(peer) if peer else []
        uncertain = [f"{who} {', '.join(fl)}" for who, fl in (("ours", ours_flags), ("peer", peer_flags)) if fl]
        ratio = "-"
        if peer:
            ratio = f"{peer['median_s'] / ours['median_s']:.3g}×"
            ratio += f" (uncertain: {'; '.join(uncertain)})" if uncertain else ""
        lines.append("| " + " | ".join([
            suite, shape, task, fmt_time(ours["floor_s"]),
            f"{fmt_time(ours['median_s'])}{_flag_text(ours_flags)} `{ours['impl']}`",
            _num(ours["fraction_of_floor"] and 100 * ours["fraction_of_floor"], ".3g", "%"),
            f"{fmt_time(peer['median_s'])}{_flag_text(peer_flags)}" if peer else "-",
            f"`{peer['impl']}`" if peer else "no peer",
            ratio,
        ]) + " |")
    return lines


def _flag_text(flags: list[str]) -> str:
    return f" ({', '.join(flags)})" if flags else ""


def plot_suite(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Tokens/s per implementation per shape, log scale, one panel per task (False, and
    nothing written, without matplotlib or timed rows)."""
    rows = [r for r in rows if r["tokens_per_s"] and r["kind"] in ("ours", "peer")]
    if not rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rs = [r for r in rows if r["task"] == task]
        shapes = list(dict.fromkeys(r["shape"] for r in rs))
        for impl in dict.fromkeys(r["impl"] for r in rs):
            pts = [(shapes.index(r["shape"]), r["tokens_per_s"]) for r in rs if r["impl"] == impl]
            ours = any(r["kind"] == "ours" for r in rs if r["impl"] == impl)
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if ours else "s", linestyle="-" if ours else "--",
                    linewidth=2 if ours else 1, label=impl)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)), shapes, rotation=20, fontsize=8)
        ax.set_xlabel("shape")
        ax.set_ylabel("tokens (rows) / s")
        ax.set_title(task)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out: Path, meta: dict[str, Any], rows: list[Row], plots: bool = True) -> list[Path]:
    """Write results.json, report.md and (with ``plots``) one PNG per suite into ``out``;
    the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    dicts = row_dicts(rows)
    written = [out / "results.json", out / "report.md"]
    write_json(written[0], meta, dicts)
    written[1].write_text(markdown(meta, dicts))
    if not plots:
        return written
    env = meta["environment"]
    for suite in dict.fromkeys(r["suite"] for r in dicts):
        png = out / f"{suite}.png"
        title = f"{suite}: {env['device_name']}, torch {env['torch']}, {env['date']}"
        if plot_suite([r for r in dicts if r["suite"] == suite], png, title):
            written.append(png)
    return written
