"""``vapo-bench``: check and time every implementation of every suite, write one report.

    vapo-bench                          # every suite, default shapes for the device
    vapo-bench --quick                  # one-minute smoke run: tiny shapes, few reps
    vapo-bench --suite gae,loss         # some suites
    vapo-bench --suite gae --shapes 8x1024,1x131072
    vapo-bench --device cuda            # on a GPU: also compute-sanitizer, where installed

Writes ``<out>/results.json``, ``<out>/report.md`` and ``<out>/<suite>.png``. Exit status
1 if any implementation of ours gave a wrong answer or failed to run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import vapo_kernels as vk

from . import harness as H
from . import suites
from .report import write_report

SANITIZE_DRIVER = Path(__file__).resolve().parents[2] / "benchmarks" / "sanitize_driver.py"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="vapo-bench",
        description="Check every implementation against float64, then time it: ours under "
        "each backend and every installed peer, each row beside its byte or FLOP floor.",
    )
    p.add_argument(
        "--suite",
        default=",".join(suites.NAMES),
        help=f"comma-separated suites to run (default all: {', '.join(suites.NAMES)})",
    )
    p.add_argument("--quick", action="store_true", help="one-minute smoke run: tiny shapes, few reps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda if there is one)")
    p.add_argument("--out", type=Path,
                   help="report folder (default vapo-bench-out/<device>_<UTC date and time>)")
    p.add_argument("--shapes", help="shapes for the one suite named, e.g. 8x1024,1x4096")
    p.add_argument("--backends", help="our backends, comma-separated (default: every one "
                   "the registry reports for the device; Triton on CPU only if named)")
    p.add_argument("--sets", type=int, help="input sets rotated between calls (default 3, quick 2)")
    p.add_argument("--reps", type=int, help="most timed calls per row (default 50, quick 5)")
    p.add_argument("--budget", type=float, help="seconds of timed calls per row (default 5, quick 0.2)")
    p.add_argument("--max-call-s", type=float, default=30.0,
                   help="a row whose first call takes longer is not timed (default 30)")
    p.add_argument("--max-spread", type=float, default=0.2,
                   help="IQR / median above which a row is measured again (default 0.2)")
    p.add_argument("--remeasure", type=int,
                   help="extra measurements of a wide row before it is flagged noisy "
                   "(default 2, quick 1)")
    p.add_argument("--flush", action=argparse.BooleanOptionalAction, default=None,
                   help="overwrite a cache-sized buffer before each timed call "
                   "(default: on for CUDA, off for CPU)")
    p.add_argument("--per-call-threads", type=int, default=1,
                   help="torch threads at the per-call (tiny) shapes (default 1)")
    p.add_argument("--per-call-reps", type=int,
                   help="timed calls per row at a per-call shape (default 500, quick 30)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--no-validate", action="store_true",
                   help="switch off vapo_kernels' input checks (VAPO_VALIDATE=0)")
    p.add_argument("--sanitize", action=argparse.BooleanOptionalAction, default=None,
                   help="run compute-sanitizer over benchmarks/sanitize_driver.py "
                   "(default: on CUDA where compute-sanitizer is installed)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    names = [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = [s for s in names if s not in suites.NAMES]
    if unknown or not names:
        given = ", ".join(map(repr, unknown)) or repr(args.suite)
        p.error(f"--suite: unknown suite {given} (known: {', '.join(suites.NAMES)})")
    args.suites = names
    if args.shapes:
        if len(names) != 1:
            p.error("--shapes needs exactly one --suite (shapes differ between suites)")
        try:
            args.shapes = H.parse_shapes(args.shapes)
        except ValueError as e:
            p.error(str(e))
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device: expected cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    for name in ("sets", "reps", "per_call_reps", "remeasure"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "remeasure" else 1):
            p.error(f"--{name.replace('_', '-')}: must be positive, got {v}")
    return args


def backends_for(family: str, device: torch.device, named: list[str] | None) -> list[str]:
    available = vk.available_backends(family, device)
    if named is not None:
        return [b for b in named if b in available]
    if device.type == "cpu" and "triton" in available:
        available.remove("triton")  # the interpreter's time means nothing
    return available


def sanitize(out: Path) -> dict[str, object]:
    """compute-sanitizer memcheck over the driver that calls every CUDA / Triton kernel."""
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        return {"ran": False, "why": "compute-sanitizer is not installed"}
    if not SANITIZE_DRIVER.exists():
        return {"ran": False, "why": f"{SANITIZE_DRIVER} not found (not a source checkout)"}
    log = out / "sanitizer_memcheck.log"
    with log.open("w") as f:
        rc = subprocess.call(
            [exe, "--tool", "memcheck", "--error-exitcode", "1", sys.executable, str(SANITIZE_DRIVER)],
            stdout=f, stderr=subprocess.STDOUT,
        )
    return {"ran": True, "tool": "memcheck", "exit": rc, "log": log.name}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    q = args.quick
    if args.no_validate:
        vk.set_validation(False)
    if q:
        H.set_quick_bandwidth_size()
    timing = H.Timing(
        reps=args.reps or (5 if q else (100 if gpu else 50)),
        budget_s=args.budget or (0.2 if q else 5.0),
        warmup=1 if q else 2,
        min_reps=3 if q else 5,
        max_call_s=args.max_call_s,
        max_spread=args.max_spread,
        remeasure=args.remeasure if args.remeasure is not None else (1 if q else 2),
        flush=gpu if args.flush is None else args.flush,
        per_call_threads=args.per_call_threads,
        per_call_reps=args.per_call_reps or (30 if q else 500),
        per_call_warmup=5 if q else 20,
        per_call_budget_s=0.2 if q else 5.0,
    )
    env = H.environment(device)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d_%H%M%S")
    out = args.out or Path("vapo-bench-out") / f"{device.type}_{stamp}"
    named = args.backends.split(",") if args.backends else None
    compile_why = "--no-compile" if args.no_compile else ("off in --quick" if q else None)

    rows: list[H.Row] = []
    meta: dict = {
        "environment": env,
        "command": "vapo-bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "suites": args.suites,
        "timing": dict(vars(timing)),
        "validation": vk._ragged.validation_enabled(),
        "backends": {},
        "peer_versions": {},
        "peers_missing": {},
    }
    t_all = time.perf_counter()
    plan = []
    for name in args.suites:
        suite = suites.get(name)
        ctx = H.Context(
            device=device,
            backends={f: backends_for(f, device, named) for f in suite.families},
            quick=q,
            seed=args.seed,
            sets=args.sets or (2 if q else 3),
            compile_why=compile_why,
        )
        suite.load_peers(ctx)
        meta["backends"][name] = ctx.backends
        meta["peer_versions"][name] = ctx.peer_versions
        meta["peers_missing"][name] = ctx.peer_missing
        key = "quick" if q else device.type
        shapes = args.shapes or suite.shapes[key]
        plan += [(suite, ctx, shape) for shape in shapes]

    meta["copy_GB_s"] = H.copy_bandwidth(device, H._bandwidth_bytes(device)) / 1e9
    bar = tqdm(plan, desc="vapo-bench", unit="shape", dynamic_ncols=True)
    for suite, ctx, shape in bar:
        case = suite.build_case(shape, ctx)
        rows += H.run_case(case, device, timing, progress=lambda s: bar.set_postfix_str(s[:70]))
        del case
        # the tables so far, so that a run cut short (a device time limit) leaves them
        meta["wall_s"] = time.perf_counter() - t_all
        write_report(out, meta, rows, plots=False)
    bar.close()
    if args.sanitize or (args.sanitize is None and gpu):
        out.mkdir(parents=True, exist_ok=True)
        meta["sanitizer"] = sanitize(out)
    meta["wall_s"] = time.perf_counter() - t_all
    written = write_report(out, meta, rows)
    print(f"wrote {', '.join(str(p) for p in written)} in {meta['wall_s']:.0f} s")

    bad = [r for r in rows if r.kind == "ours" and r.status in ("FAIL", "error", "oom")]
    for r in rows:
        if r.status in ("FAIL", "error") or r.noisy:
            what = "noisy" if r.status == "ok" else r.status
            print(f"  {what}: {r.suite} {r.shape} {r.task} {r.impl}: {r.note}", file=sys.stderr)
    san = meta.get("sanitizer", {})
    return 1 if bad or (san.get("ran") and san.get("exit")) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
