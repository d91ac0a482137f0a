"""``vapo-bench``: check and time every implementation of every suite, write one report.

    vapo-bench                          # every suite, default shapes for the device
    vapo-bench --quick                  # one-minute smoke run: tiny shapes, few reps
    vapo-bench --suite gae,loss         # some suites
    vapo-bench --suite gae --shapes 8x1024,1x131072
    vapo-bench --device cuda            # on a GPU: also compute-sanitizer, where installed

Writes ``<out>/results.json``, ``<out>/report.md`` and ``<out>/<suite>.png``. Exit status
1 if any implementation of ours gave a wrong answer or failed to run; 2 for bad options,
each checked (shapes per suite, numbers, backends, the report folder) before any work; 130
if interrupted. Until the last write the report is marked incomplete (``"complete":
false`` in results.json, a line at the top of report.md). A folder holding an earlier
report is refused unless ``--force`` (which removes that report's files first).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
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
    p.add_argument("--shapes", help="shapes for the one suite named, e.g. 8x1024,1x4096: gae "
                   "BxT; logprobs NxV or NxVxH; loss tokens:BxT, logits:NxV or hidden:NxVxH")
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
    p.add_argument("--turn-s", type=float, default=0.02,
                   help="the rows of a shape are timed together in rounds, each row making "
                   "about this many seconds of calls in its turn (in at least 20 turns), in an "
                   "order shuffled per round (--seed), so that a slow period of the host hits "
                   "every row alike (default 0.02; inf: each row in one block, one after another)")
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
    p.add_argument("--force", action="store_true",
                   help="write into an --out folder that holds an earlier report (its report "
                   "files are removed first)")
    args = p.parse_args(argv)

    # a duplicate suite would run twice and rank a peer against its own copy
    names = list(dict.fromkeys(s.strip() for s in args.suite.split(",") if s.strip()))
    unknown = [s for s in names if s not in suites.NAMES]
    if unknown or not names:
        given = ", ".join(map(repr, unknown)) or repr(args.suite)
        p.error(f"--suite: unknown suite {given} (known: {', '.join(suites.NAMES)})")
    args.suites = names
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device: expected cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    if args.shapes is not None:  # --shapes= (empty) is an error, not the default shapes
        if len(names) != 1:
            p.error("--shapes needs exactly one --suite (shapes differ between suites)")
        try:
            args.shapes = H.parse_shapes(args.shapes)
        except ValueError as e:
            p.error(str(e))
        suite = suites.get(names[0])
        for shape in args.shapes:
            why = suite.shape_error(shape)
            if why is None and suite.set_bytes is not None:
                need, have = suite.set_bytes(shape), memory_bytes(device)
                if need > have:
                    why = (f"one input set needs at least {need / 2**30:,.3g} GiB, more than "
                           f"the {have / 2**30:,.3g} GiB of this {device.type}")
            if why:
                p.error(f"--shapes {H.shape_label(shape)!r}: {why}")
    for name in ("sets", "reps", "per_call_reps", "remeasure"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "remeasure" else 1):
            p.error(f"--{name.replace('_', '-')}: must be positive, got {v}")
    if args.per_call_threads < 1:
        p.error(f"--per-call-threads: must be at least 1, got {args.per_call_threads}")
    for name, low in (("budget", "> 0"), ("max_call_s", "> 0"), ("max_spread", ">= 0")):
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and (v > 0 if low == "> 0" else v >= 0)):
            p.error(f"--{name.replace('_', '-')}: must be a finite number {low}, got {v:g}")
    if not args.turn_s > 0:  # inf is allowed: one block per row
        p.error(f"--turn-s: must be a number > 0 (or inf), got {args.turn_s:g}")
    if args.backends is not None:
        args.backends = parse_backends(p, args.backends, args.suites, device)
    args.out = prepare_out(p, args.out, device, args.force)
    return args


def memory_bytes(device: torch.device) -> int:
    """The memory of the device (a CPU's: the machine's RAM)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_backends(p: argparse.ArgumentParser, spec: str, names: list[str], device) -> list[str]:
    """--backends as a list without duplicates (a duplicate runs each row twice), each one
    known and able to run at least one family of the suites named here."""
    named = list(dict.fromkeys(b.strip() for b in spec.split(",") if b.strip()))
    known = vk._backends.BACKENDS
    unknown = [b for b in named if b not in known]
    if unknown or not named:
        given = ", ".join(map(repr, unknown)) or repr(spec)
        p.error(f"--backends: unknown backend {given} (known: {', '.join(known)})")
    families = {f for n in names for f in suites.get(n).families}
    here = {b for f in families for b in vk.available_backends(f, device)}
    idle = [b for b in named if b not in here]
    if idle:
        p.error(f"--backends: {', '.join(idle)} cannot run here on {device.type} "
                f"(available: {', '.join(b for b in known if b in here)})")
    return named


REPORT_FILES = ("results.json", "report.md", "sanitizer_memcheck.log",
                *(f"{n}.png" for n in suites.NAMES))


def prepare_out(p: argparse.ArgumentParser, out: Path | None, device, force: bool) -> Path:
    """The report folder, created and writable; an earlier report in it is refused (its
    tables would be overwritten and its other files left beside the new ones) unless
    ``force``, which removes that report's files."""
    if out is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d_%H%M%S")
        out = Path("vapo-bench-out") / f"{device.type}_{stamp}"
    if out.exists() and not out.is_dir():
        p.error(f"--out {str(out)!r}: exists and is not a folder")
    old = [f for f in REPORT_FILES if (out / f).exists()]
    if old and not force:
        p.error(f"--out {str(out)!r}: holds an earlier report ({', '.join(old)}); "
                "name another folder or pass --force to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for f in old:
            (out / f).unlink()
        probe = out / ".vapo-bench-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        p.error(f"--out {str(out)!r}: cannot write there ({e.strerror or e})")
    return out


def backends_for(family: str, device: torch.device, named: list[str] | None) -> list[str]:
    available = vk.available_backends(family, device)
    if named is not None:
        return [b for b in named if b in available]
    if device.type == "cpu" and "triton" in available:
        available.remove("triton")  # the interpreter's time means nothing
    return available


def sanitizer_missing(device: torch.device) -> str | None:
    """Why compute-sanitizer cannot run here (None: it can)."""
    if device.type != "cuda":
        return f"it checks CUDA kernels; this run is on {device.type}"
    if shutil.which("compute-sanitizer") is None:
        return "compute-sanitizer is not installed"
    if not SANITIZE_DRIVER.exists():
        return f"{SANITIZE_DRIVER} not found (not a source checkout)"
    return None


def sanitize(out: Path) -> dict[str, object]:
    """compute-sanitizer memcheck over the driver that calls every CUDA / Triton kernel."""
    log = out / "sanitizer_memcheck.log"
    with log.open("w") as f:
        rc = subprocess.call(
            [shutil.which("compute-sanitizer"), "--tool", "memcheck", "--error-exitcode", "1",
             sys.executable, str(SANITIZE_DRIVER)],
            stdout=f, stderr=subprocess.STDOUT,
        )
    return {"ran": True, "tool": "memcheck", "exit": rc, "log": log.name}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args, argv)
    except KeyboardInterrupt:
        # the report folder says how far the run got (run() marks it incomplete)
        print(f"vapo-bench: interrupted; the partial report is in {args.out}", file=sys.stderr)
        return 130


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    q = args.quick
    if args.no_validate:
        vk.set_validation(False)
    if q:
        H.set_quick_bandwidth_size()

    def pick(given, quick, default):
        return given if given is not None else (quick if q else default)

    timing = H.Timing(
        reps=pick(args.reps, 5, 100 if gpu else 50),
        budget_s=pick(args.budget, 0.2, 5.0),
        warmup=1 if q else 2,
        min_reps=3 if q else 5,
        max_call_s=args.max_call_s,
        max_spread=args.max_spread,
        remeasure=pick(args.remeasure, 1, 2),
        flush=gpu if args.flush is None else args.flush,
        per_call_threads=args.per_call_threads,
        per_call_reps=pick(args.per_call_reps, 30, 500),
        per_call_warmup=5 if q else 20,
        per_call_budget_s=0.2 if q else 5.0,
        turn_s=args.turn_s,
        seed=args.seed,
    )
    env = H.environment(device)
    out = args.out
    compile_why = "--no-compile" if args.no_compile else ("off in --quick" if q else None)
    want_sanitizer = gpu if args.sanitize is None else args.sanitize
    sanitize_why = sanitizer_missing(device) if want_sanitizer else None
    if args.sanitize and sanitize_why:  # asked for by name: say it will not run
        print(f"vapo-bench: --sanitize: not run: {sanitize_why}", file=sys.stderr)

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
        "complete": False,  # until the last write: a report cut short says so
        "progress": "no shape measured",
    }
    if sanitize_why:
        meta["sanitizer"] = {"ran": False, "asked": bool(args.sanitize), "why": sanitize_why}
    t_all = time.perf_counter()
    plan = []
    try:
        for name in args.suites:
            suite = suites.get(name)
            ctx = H.Context(
                device=device,
                backends={f: backends_for(f, device, args.backends) for f in suite.families},
                quick=q,
                seed=args.seed,
                sets=pick(args.sets, 2, 3),
                compile_why=compile_why,
            )
            suite.load_peers(ctx)
            meta["backends"][name] = ctx.backends
            meta["peer_versions"][name] = ctx.peer_versions
            meta["peers_missing"][name] = ctx.peer_missing
            key = "quick" if q else device.type
            shapes = args.shapes or suite.shapes[key]
            plan += [(suite, ctx, shape) for shape in shapes]

        meta["progress"] = f"0 of {len(plan)} shapes measured"
        meta["copy_GB_s"] = H.copy_bandwidth(device, H._bandwidth_bytes(device)) / 1e9
        bar = tqdm(plan, desc="vapo-bench", unit="shape", dynamic_ncols=True)
        for done, (suite, ctx, shape) in enumerate(bar, 1):
            case = suite.build_case(shape, ctx)
            rows += H.run_case(case, device, timing, progress=lambda s: bar.set_postfix_str(s[:70]))
            del case
            # the tables so far, so that a run cut short (a device time limit) leaves them
            last = f"{suite.name} {H.shape_label(shape)}"
            meta["progress"] = f"{done} of {len(plan)} shapes measured, the last {last}"
            meta["wall_s"] = time.perf_counter() - t_all
            write_report(out, meta, rows, plots=False)
        bar.close()
        if want_sanitizer and not sanitize_why:
            meta["sanitizer"] = sanitize(out)
    except KeyboardInterrupt:
        meta["progress"] = f"interrupted (Ctrl-C) with {meta['progress']}"
        meta["wall_s"] = time.perf_counter() - t_all
        write_report(out, meta, rows, plots=False)
        raise
    meta["complete"] = True
    del meta["progress"]
    meta["wall_s"] = time.perf_counter() - t_all
    written = write_report(out, meta, rows)
    print(f"wrote {', '.join(str(p) for p in written)} in {meta['wall_s']:.0f} s")

    bad = [r for r in rows if r.kind == "ours" and r.status in ("FAIL", "error", "oom")]
    for r in rows:
        if r.status in ("FAIL", "error") or r.noisy or r.under_load:
            what = ("noisy" if r.noisy else "under load") if r.status == "ok" else r.status
            print(f"  {what}: {r.suite} {r.shape} {r.task} {r.impl}: {r.note}", file=sys.stderr)
    san = meta.get("sanitizer", {})
    return 1 if bad or (san.get("ran") and san.get("exit")) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
