"""Shared helpers for the benchmark scripts: timing, machine ceilings, JSON rows, tables, plots.

Method (see /work/.library/device/METHOD.md): time after warm-up, take the median of
several repetitions and the inter-quartile range, rotate among several input sets so the
cache does not flatter, flush the cache between repetitions, and compare every time with
the byte floor at the copy bandwidth measured on the same device in the same run.

* CPU: ``time.perf_counter`` around each call.
* CUDA: CUDA events around each call (device work is asynchronous), a 256 MiB buffer
  overwritten between repetitions so L2 starts cold.
* Per-call (tiny) shapes, where a call has almost no work and its time is its fixed
  cost: one torch thread (:func:`num_threads`), a median of hundreds of calls
  (:class:`PerCall`), beside a bare torch op (and an autograd round trip) timed the same
  way in the same run (:func:`bare_op_stats`).

Nothing here knows about a particular op; ``bench_<family>.py`` scripts build their rows
from :class:`Measurement` and these helpers.
"""

from __future__ import annotations

import ast
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# --------------------------------------------------------------------------------------
# The machine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:  # the model name is more telling than "x86_64"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)"


def environment(device: torch.device) -> dict[str, Any]:
    """What every JSON row carries: where and with what it was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


class CacheFlusher:
    """Overwrites a buffer larger than the last-level cache (between timed calls, untimed)."""

    def __init__(self, device: torch.device, nbytes: int | None = None):
        if nbytes is None:
            nbytes = (256 if device.type == "cuda" else 64) << 20
        self.buf = torch.empty(nbytes // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self.buf.fill_(1.0)


def measure_copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, reps: int = 10) -> float:
    """Bytes/s of a large device-to-device tensor copy, counting bytes read + written.

    This is the practical ceiling for a memory-bound kernel on this machine (METHOD.md:
    measure it, don't take the datasheet's).
    """
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    times = time_calls(lambda _: dst.copy_(src), [None], device, warmup=2, reps=reps, flush=None)
    return 2 * n * 4 / statistics.median(times)


# --------------------------------------------------------------------------------------
# Peers


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_from_source(
    package: str,
    relpath: str,
    names: Sequence[str],
    namespace: dict[str, Any],
    *,
    keep_decorators: Sequence[str] = ("no_grad",),
) -> dict[str, Any]:
    """Compile just the named functions (or classes) of an installed package's source file.

    For a peer whose package import drags in heavy or missing dependencies (ray, peft,
    deepspeed, tensordict) that the function never touches. The functions' own code runs
    unchanged, compiled from the installed file (its name and line numbers show in
    tracebacks) into ``namespace``, which must provide the globals they use. Functions
    may be top-level or methods (a method's ``self`` is then an ordinary argument).
    Decorators are dropped unless their text contains one of ``keep_decorators``
    (``torch.no_grad`` stays; registries like verl's ``@register_adv_est`` go: they
    only record the function under a name). Classes are taken whole, as written. The
    package itself is never imported.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    tree = ast.parse(path.read_text(), filename=str(path))
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name in names and node.name not in found:
            found[node.name] = node
        elif isinstance(node, ast.FunctionDef) and node.name in names and node.name not in found:
            node.decorator_list = [
                d for d in node.decorator_list if any(k in ast.unparse(d) for k in keep_decorators)
            ]
            found[node.name] = node
    missing = [n for n in names if n not in found]
    if missing:
        raise ImportError(f"{', '.join(missing)} not found in {path}")
    module = ast.Module(body=[found[n] for n in names], type_ignores=[])
    exec(compile(module, str(path), "exec"), namespace)  # noqa: S102 - the peer's own code
    return namespace


# --------------------------------------------------------------------------------------
# Timing


def time_calls(
    fn: Callable[[Any], Any],
    input_sets: Sequence[Any],
    device: torch.device,
    *,
    warmup: int,
    reps: int,
    flush: Callable[[], None] | None = None,
    budget_s: float | None = None,
) -> list[float]:
    """Seconds per call of ``fn(inputs)``; call i uses ``input_sets[i % len(input_sets)]``.

    At most ``reps`` timed calls; with ``budget_s``, stops once the timed calls add up to
    it (always at least one).
    """
    k = len(input_sets)
    for i in range(warmup):
        fn(input_sets[i % k])
    sync(device)
    times: list[float] = []
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
    for i in range(reps):
        inputs = input_sets[i % k]
        if flush is not None:
            flush()
        sync(device)
        if device.type == "cuda":
            start.record()
            fn(inputs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(inputs)
            times.append(time.perf_counter() - t0)
        if budget_s is not None and sum(times) >= budget_s:
            break
    return times


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call, synchronised (for predicting the cost of a full run)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def warmup_calls(predicted_s: float, warmup: int = 2) -> int:
    """Warm-up calls before timing: none for slow calls (> 1 s).

    A warm-up matters for first-call effects (allocation, compilation) that a
    multi-second Python loop does not notice, and the call that predicted its cost has
    already run the code path once.
    """
    return warmup if predicted_s < 1.0 else 0


# --------------------------------------------------------------------------------------
# Per-call cost (tiny shapes): what a call costs when there is almost no work in it


@dataclass(frozen=True)
class PerCall:
    """How the rows of a per-call (tiny) shape are timed: ``threads`` torch threads, a
    median of up to ``reps`` calls (or ``budget_s`` of timed calls) after ``warmup``."""

    threads: int = 1
    reps: int = 500
    warmup: int = 20
    budget_s: float = 5.0

    def describe(self) -> str:
        return (
            f"{self.threads} torch thread(s), median of up to {self.reps} calls "
            f"(or {self.budget_s:g} s) after {self.warmup} warm-up calls"
        )


def add_per_call_args(parser, shapes, default_reps: int) -> None:
    """The ``--per-call-threads`` / ``--per-call-reps`` options every benchmark script
    takes for its per-call (tiny) ``shapes``."""
    parser.add_argument(
        "--per-call-threads",
        type=int,
        default=1,
        help=f"torch threads for the per-call shapes {shapes} (default 1)",
    )
    parser.add_argument(
        "--per-call-reps",
        type=int,
        help=f"timed calls per row at a per-call shape (default {default_reps})",
    )


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bare_op_stats(
    a: torch.Tensor, b: torch.Tensor, device: torch.device, pc: PerCall, leaf=None
) -> dict[str, Stats]:
    """The same-run reference for a per-call row: one ``torch.add(a, b)`` (the cost of
    any op call), and with ``leaf`` one autograd round trip ``(leaf * b).sum()`` then
    ``torch.autograd.grad`` (the cost of any differentiable call), timed like the rows."""
    a, b = a.detach(), b.detach()
    kw = {"warmup": pc.warmup, "reps": pc.reps, "budget_s": pc.budget_s}
    out = {"torch.add": time_calls(lambda _: torch.add(a, b), [None], device, **kw)}
    if leaf is not None:

        def round_trip(_):
            with torch.enable_grad():
                return torch.autograd.grad((leaf * b).sum(), [leaf])

        out["autograd mul+sum fwd+bwd"] = time_calls(round_trip, [None], device, **kw)
    return {k: summarize(v) for k, v in out.items()}


def fmt_bare(bare: dict[str, Stats]) -> str:
    return ", ".join(
        f"bare {k} {fmt_time(s.median_s)} (IQR {fmt_time(s.iqr_s)})" for k, s in bare.items()
    )


@dataclass
class Stats:
    median_s: float
    q1_s: float
    q3_s: float
    reps: int

    @property
    def iqr_s(self) -> float:
        return self.q3_s - self.q1_s


def summarize(times: Sequence[float]) -> Stats:
    ts = sorted(times)
    if len(ts) == 1:
        return Stats(ts[0], ts[0], ts[0], 1)
    q1, med, q3 = statistics.quantiles(ts, n=4, method="inclusive")
    return Stats(med, q1, q3, len(ts))


# --------------------------------------------------------------------------------------
# Rows, tables, files


@dataclass
class Measurement:
    """One (shape, impl) result; ``status`` is ok / skipped / error / failed_verification."""

    impl: str
    task: str
    kind: str  # "ours" or "peer"
    shape: str
    batch: int
    seqlen: int
    tokens: int
    status: str = "ok"
    stats: Stats | None = None
    warmup: int = 0
    estimated: bool = False
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_s(self) -> float | None:
        return self.stats.median_s if self.stats else None


def throughput_fields(m: Measurement, bytes_per_token: float, copy_bps: float) -> dict[str, Any]:
    """GB/s at the byte floor's traffic, the floor's time and the fraction of it achieved."""
    floor_s = bytes_per_token * m.tokens / copy_bps
    if m.stats is None:
        return {"floor_s": floor_s, "tokens_per_s": None, "GB_s": None, "fraction_of_copy": None}
    med = m.stats.median_s
    return {
        "floor_s": floor_s,
        "tokens_per_s": m.tokens / med,
        "GB_s": bytes_per_token * m.tokens / med / 1e9,
        "fraction_of_copy": floor_s / med,
    }


def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=_jsonable) + "\n")


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_num(x: float | None, spec: str = ".3g", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width table (no dependency), first column left-aligned."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        out = [str(cells[0]).ljust(widths[0])]
        out += [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def plot_throughput(
    rows: list[dict[str, Any]], path: Path, *, title: str, panel_key: str = "task"
) -> bool:
    """Tokens/s per impl per shape, log scale, one panel per ``panel_key`` value.

    Returns False (and writes nothing) when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    panels = list(dict.fromkeys(r[panel_key] for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        impls = list(dict.fromkeys(r["impl"] for r in rows if r[panel_key] == panel))
        for impl in impls:
            pts = [
                (shapes.index(r["shape"]), r["tokens_per_s"])
                for r in rows
                if r[panel_key] == panel and r["impl"] == impl and r.get("tokens_per_s")
            ]
            if not pts:
                continue
            ours = any(r["kind"] == "ours" for r in rows if r["impl"] == impl)
            xs, ys = zip(*pts)
            ax.plot(
                xs,
                ys,
                marker="o" if ours else "s",
                linestyle="-" if ours else "--",
                linewidth=2 if ours else 1,
                label=impl,
            )
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_xlabel("batch x sequence length")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{panel}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
