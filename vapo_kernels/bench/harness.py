"""One benchmark harness for every suite: check each implementation, then time it.

A suite (``vapo_kernels/bench/suites/*.py``) is data: for each shape it builds a
:class:`Case` holding the input sets, the implementations (:class:`Impl`: ours under each
backend, each peer's real code path, bare ops), the floor of each task (:class:`Floor`: the
bytes or FLOP that task cannot avoid) and a ``check`` that compares an implementation's
outputs with a float64 reference. :func:`run_case` does the rest, the same way for every
suite:

1. an implementation that cannot run here (peer not installed, CUDA-only kernel) becomes a
   ``skipped`` row with the reason;
2. its first call runs untimed and its outputs are checked; a wrong answer is a ``FAIL``
   row and is never timed; a first call slower than ``max_call_s`` is not timed either;
3. the rows that passed are timed together, interleaved (:func:`time_interleaved`):
   warm-up, then rounds in which each row makes a short turn of calls (about ``turn_s``
   seconds) in an order shuffled per round, each row up to ``reps`` calls or ``budget_s``
   seconds spread over all the rounds, rotating the input sets (CUDA events and an L2
   flush on a GPU); a slow period of the host hits every row alike, so the ratios between
   rows of the same run are fair; each row keeps the median and quartiles of its calls;
4. a row whose spread (IQR / median) is above ``max_spread`` is measured again, up to
   ``remeasure`` more times, interleaved with the other wide rows; the quietest attempt
   is kept and, if it is still wide, the row is flagged ``noisy``.

Method (see /work/.library/device/METHOD.md): median of repetitions after warm-up, several
input sets so the cache does not flatter, and every time beside its floor at the copy
bandwidth (or matmul rate) measured on the same device in the same run.
"""

from __future__ import annotations

import ast
import datetime as _dt
import gc
import importlib.metadata
import importlib.util
import math
import os
import platform
import random
import statistics
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# --------------------------------------------------------------------------------------
# What a suite declares


@dataclass(frozen=True)
class Floor:
    """What a task must do at least: ``bytes`` moved (read + written) or ``flops``.

    Byte floors are set against the copy bandwidth measured in the run; FLOP floors
    against the fastest rate of a bare ``matmul`` of dims ``(m, k, n)`` timed in the run,
    in ``dtype`` or in float32, whichever is faster here (a CPU without bf16 units runs a
    float32 matmul several times faster: the floor is what the FLOP could take at best).
    ``formula`` says how the amount was counted, for the report.
    """

    formula: str
    bytes: float = 0.0
    flops: float = 0.0
    matmul: tuple[int, int, int] | None = None
    dtype: torch.dtype = torch.bfloat16


@dataclass
class Impl:
    """One implementation of one task: ``run(inputs)`` returns what ``Case.check`` reads.

    ``kind``: "ours" and "peer" rows are checked before they are timed; "bare" rows (a
    bare torch op, the fixed cost of any call) and "floor" rows (the bare matmul a FLOP
    floor is measured with) are timed only. ``unavailable`` says why it cannot run here
    (a peer that is not installed, a CUDA-only kernel). ``prepare`` makes the inputs a
    call gets from an input set, untimed (an in-place backward gets a private copy, restored
    before each call). ``expect`` names the reference it is checked against, for suites
    whose peers compute a variant of the task.
    """

    name: str
    task: str
    kind: str
    run: Callable[[Any], Any]
    note: str = ""
    unavailable: str | None = None
    expect: str = "exact"
    prepare: Callable[[list[Any]], Callable[[int], Any]] | None = None
    skip_if: Callable[[], str | None] | None = None  # e.g. memory it would need
    slow_first_call: bool = False  # torch.compile: the first call compiles


@dataclass
class Check:
    ok: bool
    error: float  # the largest error found, in the check's own unit
    against: str  # what it was compared with
    detail: str = ""


@dataclass
class Case:
    """One shape of one suite: its inputs, implementations, floors and check."""

    suite: str
    shape: str
    tokens: int  # tokens (or rows) the shape holds: throughput is per token
    sets: list[Any]  # input sets, rotated between timed calls
    impls: list[Impl]
    floors: dict[str, Floor]  # task -> floor
    check: Callable[[Impl, Any], Check]  # (impl, outputs on sets[0]) -> Check
    per_call: bool = False  # a tiny shape: its time is a call's fixed cost
    note: str = ""


@dataclass(frozen=True)
class Timing:
    """How rows are timed. ``per_call`` rows (tiny shapes) use ``per_call_*`` settings."""

    reps: int = 50
    budget_s: float = 5.0
    warmup: int = 2
    min_reps: int = 5  # fewer timed calls are flagged as an estimate
    max_call_s: float = 30.0
    max_spread: float = 0.2  # IQR / median above this is wide
    remeasure: int = 2  # more attempts at a wide row before it is flagged noisy
    flush: bool = False
    per_call_threads: int = 1
    per_call_reps: int = 500
    per_call_warmup: int = 20
    per_call_budget_s: float = 5.0
    # the rows of one shape are timed in rounds, each row making about turn_s seconds of
    # calls in its turn (inf: one round, each row in one block); seed: the turn order
    turn_s: float = 0.02
    seed: int = 0

    def for_case(self, case: Case) -> Timing:
        if not case.per_call:
            return self
        return Timing(
            **{
                **self.__dict__,
                "reps": self.per_call_reps,
                "budget_s": self.per_call_budget_s,
                "warmup": self.per_call_warmup,
            }
        )


@dataclass
class Peer:
    """A peer's code path: ``load()`` returns what the suite calls (a function, a module);
    if it raises, the peer's rows are reported as not runnable with the reason."""

    dist: str  # the distribution whose version the report names
    load: Callable[[], Any]


@dataclass
class Context:
    """What a suite builds its cases from: the device, our backends per family, the
    loaded peers (and why the others did not load) and the run's settings."""

    device: torch.device
    backends: dict[str, list[str]]
    peers: dict[str, Any] = field(default_factory=dict)
    peer_missing: dict[str, str] = field(default_factory=dict)
    peer_versions: dict[str, str | None] = field(default_factory=dict)
    quick: bool = False
    seed: int = 0
    sets: int = 3
    compile_why: str | None = None  # why torch.compile rows do not run (None: they do)

    def missing(self, *names: str) -> str | None:
        """Why any of the named peers cannot run here (None: all loaded)."""
        for n in names:
            if n in self.peer_missing:
                return self.peer_missing[n]
        return None


@dataclass
class Suite:
    """A benchmark suite as data: shapes per device, per-call shapes, peers, and how one
    shape's :class:`Case` is built from a :class:`Context`."""

    name: str
    description: str
    shapes: dict[str, list[tuple[int, ...]]]  # "cpu", "cuda", "quick"
    per_call_shapes: list[tuple[int, ...]]
    families: tuple[str, ...]  # our backend families it runs
    peers: dict[str, Peer]
    build_case: Callable[[tuple[int, ...], Context], Case]
    # the shapes --shapes may name, e.g. ("NxV", "NxVxH") or ("tokens:BxT", "logits:NxV")
    shape_forms: tuple[str, ...] = ()
    # bytes one input set of a shape holds at least, to refuse a shape too large up front
    set_bytes: Callable[[tuple], int] | None = None
    # what is wrong with a shape of a right form (None: nothing), beyond positive dims
    shape_problem: Callable[[tuple], str | None] | None = None

    def shape_error(self, shape: tuple) -> str | None:
        """Why this suite cannot run ``shape`` (None: it can)."""
        kind = shape[0] if shape and isinstance(shape[0], str) else ""
        dims = shape[1:] if kind else shape
        forms = [f.rpartition(":") for f in self.shape_forms]
        if not any(k == kind and len(d.split("x")) == len(dims) for k, _, d in forms):
            return f"the {self.name} suite takes {' or '.join(self.shape_forms)}"
        if any(d < 1 for d in dims):
            return "every size must be a positive integer"
        return self.shape_problem(shape) if self.shape_problem else None

    def load_peers(self, ctx: Context) -> None:
        for name, peer in self.peers.items():
            ctx.peer_versions[name] = package_version(peer.dist)
            try:
                ctx.peers[name] = peer.load()
            except Exception as e:  # noqa: BLE001 - a peer that cannot load loses its rows
                if ctx.peer_versions[name] is None:
                    why = f"{peer.dist} not installed"
                else:
                    why = f"{peer.dist} {ctx.peer_versions[name]} not loadable"
                ctx.peer_missing[name] = f"{why} ({type(e).__name__}: {e})"[:300]


def private_activation(leaf: torch.Tensor) -> torch.Tensor:
    """A private copy of ``leaf`` for an in-place backward to overwrite: the output of an
    op on the leaf (as a trainer's logits are the output of its LM head), not a leaf, since
    our in-place ops refuse to overwrite memory the caller owns. Restore it, untimed, with
    ``copy_`` under no_grad; the gradient taken with respect to it is the logits' gradient."""
    with torch.enable_grad():
        return leaf.clone()


def row_rel_error(num: torch.Tensor, den: torch.Tensor, floor: float) -> float:
    """The largest per-row error of a gradient, ||got_r - want_r|| / max(||want_r||,
    ``floor`` x the RMS row norm), from per-row squared errors ``num`` and squared norms
    ``den``. A check by the whole tensor's relative norm lets one wrong row through at
    large N; this one does not: a dropped or misplaced row of typical size scores ~1. The
    floor: a row whose true gradient is near zero (a peaked row, 1 - p ~ u) comes out of
    a bf16 computation with an error of order u times a typical row, several times its
    own norm; that is rounding, not a wrong row."""
    if not num.numel():
        return 0.0
    lo = floor * float(den.mean()) ** 0.5
    if not lo > 0:  # the true gradient is all zeros (or not finite): exact, or wrong
        return 0.0 if float(num.sum()) == 0 else math.inf
    return float((num.sqrt() / den.sqrt().clamp(min=lo)).nan_to_num(nan=math.inf).max())


def parse_shapes(spec: str) -> list[tuple]:
    """``"8x1024,1x4096"`` -> [(8, 1024), (1, 4096)]; a ``kind:`` prefix, for suites with
    several kinds of shape, stays first: ``"logits:1024x32768"`` -> ("logits", 1024, 32768)."""
    shapes = []
    for item in spec.split(","):
        kind, _, dims = item.strip().rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
            if not dims.replace("x", "").replace("X", "").isdigit():  # no "-8", "+8", "1_0"
                raise ValueError(dims)
        except ValueError:
            raise ValueError(
                f"--shapes {item.strip()!r}: expected shapes like 8x1024,1x4096 (positive integers)"
            ) from None
        shapes.append((kind, *shape) if kind else shape)
    return shapes


def shape_label(shape: tuple) -> str:
    """(8, 1024) -> "8x1024"; ("logits", 1024, 32768) -> "logits:1024x32768"."""
    if shape and isinstance(shape[0], str):
        return f"{shape[0]}:" + "x".join(map(str, shape[1:]))
    return "x".join(map(str, shape))


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
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what a run was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device.type,
        "device_name": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


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
    deepspeed) that the function never touches: the function's own code runs unchanged,
    compiled from the installed file (its name and line numbers show in tracebacks) into
    ``namespace``, which must provide the globals it uses. Decorators are dropped unless
    their text contains one of ``keep_decorators`` (registries only record a name).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    tree = ast.parse(path.read_text(), filename=str(path))
    found: dict[str, ast.AST] = {}
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


class CacheFlusher:
    """Overwrites a buffer larger than the last-level cache (between timed calls, untimed)."""

    def __init__(self, device: torch.device, nbytes: int | None = None):
        nbytes = nbytes or ((256 if device.type == "cuda" else 64) << 20)
        self.buf = torch.empty(nbytes // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self.buf.fill_(1.0)


# --------------------------------------------------------------------------------------
# Timing


@dataclass
class Runner:
    """One implementation in the timing rounds: its call i is ``fn(inputs(i))``, after
    ``warmup`` untimed calls. ``estimate_s``: a call's time known beforehand (its checked
    first call; None if unknown or not telling, as a first call that compiles)."""

    fn: Callable[[Any], Any]
    inputs: Callable[[int], Any]
    warmup: int = 0
    estimate_s: float | None = None


@dataclass
class Timed:
    """What one measurement got of one runner: seconds per timed call, in how many rounds
    it made calls, and the exception that stopped it (None: it ran to its end)."""

    times: list[float] = field(default_factory=list)
    rounds: int = 0
    error: BaseException | None = None


def time_interleaved(
    runners: Sequence[Runner],
    device: torch.device,
    *,
    reps: int,
    budget_s: float | None = None,
    turn_s: float | None = None,
    min_turns: int = 20,
    rewarm: float = 0.05,
    seed: int = 0,
    before_each: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    progress: Callable[[int, int], None] | None = None,
) -> list[Timed]:
    """Time several implementations of one shape in interleaved rounds, so that a slow
    period of the host (steal, a noisy neighbour) hits each of them alike.

    1. Warm-up: each runner's ``warmup`` calls, back to back; they are not in the result,
       but the fastest of them (or its ``estimate_s``) is its estimated call time ``e``.
    2. Plan: runner k gets ``n = min(reps, ceil(budget_s / e))`` timed calls (``reps``
       without a budget or an estimate; at least one), in turns of ``c`` calls: about
       ``turn_s`` of them (``turn_s / e``, at least one), but few enough that its calls
       take at least ``min_turns`` turns where it has that many (a row of microseconds
       makes 500 calls in 20 turns of 25, not in two of 20 ms). The runner with the most
       turns sets the number of rounds R; each runner's turns are spread evenly over the
       R rounds. ``turn_s`` None or inf: one round, each runner's calls in one block
       (the design before the rounds).
    3. Rounds: in each, the runners due a turn make their calls in an order shuffled per
       round (``random.Random(seed)``). A turn that follows another runner's starts with
       untimed calls lasting about ``rewarm`` x ``turn_s`` (1 ms; none for a call longer
       than that; the whole ``warmup`` in block mode): the other runners' calls left the
       caches cold, and the next calls of a row of microseconds are slow for about a
       millisecond (measured after the other per-call GAE rows: vk.gae 140, 34, 26, 22,
       21, 20 ... 19.0 us at the 20th call, 18.8 at the 70th, against 18.6 in a loop). A
       runner stops early once its timed calls add up to ``budget_s`` (as a row timed
       alone did), and leaves the rounds if a call raises (``Timed.error``; the others
       go on). A timed call faster than the estimate (or the first, where there was
       none) plans that runner's number of calls again.

    Each timed call: ``inputs(i)`` and ``before_each`` (a cache flush) untimed, then
    ``fn`` alone, by ``clock`` (CPU) or CUDA events. ``progress(j, R)`` is called at most
    once a second, between rounds.
    """
    cuda = device.type == "cuda"
    if cuda:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
    out = [Timed() for _ in runners]
    live = list(range(len(runners)))

    def drop(k: int, e: BaseException) -> None:
        out[k].error = e
        live.remove(k)
        _free(device)

    def timed_call(r: Runner, i: int) -> float:
        x = r.inputs(i)
        if before_each is not None:
            before_each()
        sync(device)
        if cuda:
            start.record()
            r.fn(x)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = clock()
        r.fn(x)
        return clock() - t0

    est: list[float | None] = []
    for k, r in enumerate(runners):
        best = r.estimate_s
        try:
            for i in range(r.warmup):
                x = r.inputs(i)
                sync(device)
                t0 = clock()
                r.fn(x)
                sync(device)
                t = clock() - t0
                best = t if best is None else min(best, t)
        except Exception as e:  # noqa: BLE001 - one broken runner must not stop the others
            drop(k, e)
        est.append(best if best is None or best > 0 else None)

    def calls(e: float | None) -> int:
        if budget_s is None or e is None:
            return reps
        return max(1, min(reps, math.ceil(budget_s / e)))

    n = {k: calls(est[k]) for k in live}
    block = turn_s is None or not math.isfinite(turn_s)
    per_turn = {k: n[k] if block else max(1, min(n[k] // min_turns,
                                                  int(turn_s / est[k]) if est[k] else 1))
                for k in live}
    turns = {k: math.ceil(n[k] / per_turn[k]) for k in live}
    rounds = max(turns.values(), default=0)
    rewarm_calls = {k: runners[k].warmup if block else int(rewarm * turn_s / est[k]) if est[k] else 0
                    for k in live}

    def target(k: int, j: int) -> int:
        """Runner k's timed calls after round j: its turns spread evenly over the rounds."""
        done = (2 * turns[k] * j + rounds) // (2 * rounds)
        return (2 * n[k] * done + turns[k]) // (2 * turns[k])

    rng = random.Random(seed)
    spent = [0.0] * len(runners)
    last = live[-1] if live else None  # the last one warmed up
    shown = time.monotonic()
    for j in range(1, rounds + 1):
        if progress is not None and time.monotonic() - shown >= 1.0:
            progress(j, rounds)
            shown = time.monotonic()
        order = list(live)
        rng.shuffle(order)
        for k in order:
            r, t = runners[k], out[k]
            if k not in live or len(t.times) >= target(k, j):
                continue
            if k != last:  # another runner's calls left the caches cold
                try:
                    for i in range(rewarm_calls[k]):  # every input set, as the warm-up
                        r.fn(r.inputs(i))
                except Exception as e:  # noqa: BLE001 - see above
                    drop(k, e)
                    continue
                last = k
            ran = False
            while k in live and len(t.times) < target(k, j):
                try:
                    dt = timed_call(r, len(t.times))
                except Exception as e:  # noqa: BLE001 - see above
                    drop(k, e)
                    break
                t.times.append(dt)
                ran = True
                spent[k] += dt
                if dt > 0 and (est[k] is None or dt < est[k]):  # faster than planned for
                    est[k] = dt
                    n[k] = calls(dt)
                if budget_s is not None and spent[k] >= budget_s:
                    live.remove(k)
            t.rounds += ran
        if not live:
            break
    return out


def time_calls(
    fn: Callable[[Any], Any],
    inputs: Callable[[int], Any],
    device: torch.device,
    *,
    warmup: int,
    reps: int,
    budget_s: float | None = None,
    before_each: Callable[[], None] | None = None,
) -> list[float]:
    """Seconds per call of ``fn(inputs(i))`` timed on its own (the copy bandwidth, the
    matmul rate): :func:`time_interleaved` with one runner, in one block."""
    (timed,) = time_interleaved([Runner(fn, inputs, warmup)], device, reps=reps,
                                budget_s=budget_s, before_each=before_each)
    if timed.error is not None:
        raise timed.error
    return timed.times


@dataclass
class Stats:
    median_s: float
    q1_s: float
    q3_s: float
    reps: int

    @property
    def iqr_s(self) -> float:
        return self.q3_s - self.q1_s

    @property
    def spread(self) -> float:
        """IQR / median: how far apart the middle half of the calls were."""
        return self.iqr_s / self.median_s if self.median_s > 0 else 0.0


def summarize(times: Sequence[float]) -> Stats:
    ts = sorted(times)
    if len(ts) == 1:
        return Stats(ts[0], ts[0], ts[0], 1)
    q1, med, q3 = statistics.quantiles(ts, n=4, method="inclusive")
    return Stats(med, q1, q3, len(ts))


@dataclass
class Measured:
    """One runner's result over the attempts of :func:`measure_stable`: the quietest
    attempt's stats, its index (``attempt``), its rounds and how many runners made calls
    in those rounds (``beside``, itself included), every attempt's spread, whether even the
    quietest was wide (``noisy``), and the error that stopped it, if one did."""

    stats: Stats | None = None
    attempt: int = 0
    rounds: int = 0
    beside: int = 0
    spreads: list[float] = field(default_factory=list)
    noisy: bool = False
    error: BaseException | None = None


def measure_stable(
    timer: Callable[[list[int], int], list[Timed]],
    keys: Sequence[int],
    max_spread: float,
    remeasure: int,
) -> dict[int, Measured]:
    """Time the runners ``keys`` together with ``timer(keys, attempt)``, then again those
    whose spread was above ``max_spread`` (interleaved among themselves), at most
    ``1 + remeasure`` attempts in all. Each keeps its quietest attempt and is ``noisy`` if
    even that was wide; a runner that raised is dropped from later attempts and keeps
    only its error."""
    res = {k: Measured() for k in keys}
    pending = list(keys)
    for attempt in range(1 + remeasure):
        if not pending:
            break
        wide = []
        timed = timer(pending, attempt)
        beside = sum(1 for t in timed if t.times)  # the runners the rounds had calls of
        for k, t in zip(pending, timed):
            m = res[k]
            if t.error is not None or not t.times:
                m.error = t.error or RuntimeError("no timed call")
                m.stats = None
                continue
            st = summarize(t.times)
            m.spreads.append(st.spread)
            if m.stats is None or st.spread < m.stats.spread:
                m.stats, m.attempt, m.rounds, m.beside = st, attempt, t.rounds, beside
            if st.spread > max_spread:
                wide.append(k)
        pending = wide
    for k in pending:
        res[k].noisy = True
    return res


_BANDWIDTH: dict[tuple[str, int], float] = {}
_MATMUL: dict[tuple, float] = {}


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Bytes/s of a large tensor copy, read + written: the practical ceiling of a
    memory-bound kernel on this machine (measured once per run and size)."""
    key = (str(device), nbytes)
    if key not in _BANDWIDTH:
        src = torch.rand(nbytes // 4, device=device)
        dst = torch.empty_like(src)
        times = time_calls(lambda _: dst.copy_(src), lambda i: None, device, warmup=2, reps=10)
        _BANDWIDTH[key] = 2 * src.numel() * 4 / statistics.median(times)
        del src, dst
    return _BANDWIDTH[key]


def matmul_rate(device: torch.device, m: int, k: int, n: int, dtype: torch.dtype) -> float:
    """FLOP/s of a bare (m, k) @ (k, n) matmul in ``dtype`` on this device, this run."""
    key = (str(device), m, k, n, dtype)
    if key not in _MATMUL:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        times = time_calls(lambda _: a @ b, lambda i: None, device, warmup=1, reps=5, budget_s=2)
        _MATMUL[key] = 2 * m * k * n / statistics.median(times)
    return _MATMUL[key]


# --------------------------------------------------------------------------------------
# Running a case


@dataclass
class Row:
    """One (suite, shape, task, impl) result. ``status``: ok / FAIL / skipped / error / oom."""

    suite: str
    shape: str
    task: str
    impl: str
    kind: str
    tokens: int
    per_call: bool
    status: str = "ok"
    note: str = ""
    stats: Stats | None = None
    attempts: int = 0
    spreads: list[float] = field(default_factory=list)
    noisy: bool = False
    estimated: bool = False
    # the kept attempt (0: the rounds every row of the shape shared; > 0: a re-measure of
    # the wide rows), the rounds it made calls in, and how many rows those rounds timed
    attempt: int = 0
    rounds: int = 0
    interleaved: int = 0
    # the host's 1-minute load average when the shape's rounds began and when the row's
    # last attempt ended, and whether, less the run's own threads, it was above half the
    # cores (another job shared the CPU)
    load_avg: tuple[float, float] | None = None
    under_load: bool = False
    check: Check | None = None
    first_call_s: float | None = None
    floor_s: float | None = None
    floor_formula: str = ""
    achieved: float | None = None  # GB/s (byte floor) or TFLOP/s (FLOP floor)
    achieved_unit: str = ""

    @property
    def median_s(self) -> float | None:
        return self.stats.median_s if self.stats else None


def load_average() -> float | None:
    """The host's 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def under_load(loads: tuple[float, float], device: torch.device) -> bool:
    """Other work shared the CPU while a row was timed: the load average, less the threads
    of this run (a CPU row's torch threads; one for a GPU row's host thread), above half
    the cores at the row's start or end. The rows of a shape share their rounds, so such
    load slows them alike, but it moves the run's times against another run's (and a row
    re-measured after the others was timed in another span), so the report flags it."""
    own = torch.get_num_threads() if device.type == "cpu" else 1
    return max(loads) - own > 0.5 * (os.cpu_count() or 1)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


TimerFactory = Callable[..., list[Timed]]


def run_case(
    case: Case,
    device: torch.device,
    timing: Timing,
    *,
    timer: TimerFactory = time_interleaved,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Check every implementation of ``case``, then time those that passed together in
    interleaved rounds (:func:`time_interleaved`); the rows in the case's order.

    Every row of one shape (each task's rows, its bare and floor rows) shares the rounds,
    so a slow period of the host hits them alike and the ratios between them stay fair;
    wide rows are then measured again among themselves (:func:`measure_stable`). ``timer``
    has :func:`time_interleaved`'s signature (tests inject a fake clock); ``progress`` is
    called with what is being checked or timed.
    """
    timing = timing.for_case(case)
    flush = CacheFlusher(device) if timing.flush else None
    rows = [Row(case.suite, case.shape, impl.task, impl.name, impl.kind, case.tokens,
                case.per_call, note=impl.note) for impl in case.impls]
    runners: dict[int, Runner] = {}
    prepared: dict[Any, Callable[[int], Any]] = {}
    with num_threads(timing.per_call_threads if case.per_call else None):
        for k, (impl, row) in enumerate(zip(case.impls, rows)):
            if progress:
                progress(f"{case.suite} {case.shape} {impl.task}: checking {impl.name}")
            try:
                runner = _check_impl(row, impl, case, device, timing, prepared)
            except Exception as e:  # noqa: BLE001 - one broken row must not lose the others
                _failed(row, e)
                runner = None
            if runner is not None:
                runners[k] = runner
            _free(device)
        load0 = load_average()
        load1: dict[int, float | None] = {}

        def one_attempt(keys: list[int], attempt: int) -> list[Timed]:
            what = (f"timing {len(keys)} rows interleaved" if attempt == 0 else
                    f"re-timing {len(keys)} wide: " + ", ".join(rows[k].impl for k in keys))
            label = f"{case.suite} {case.shape}: {what}"
            if progress:
                progress(label)
            seed = zlib.crc32(f"{timing.seed}:{case.suite}:{case.shape}:{attempt}".encode())
            timed = timer(
                [runners[k] for k in keys], device, reps=timing.reps, budget_s=timing.budget_s,
                turn_s=timing.turn_s, seed=seed, before_each=flush,
                progress=(lambda j, n: progress(f"{label} (round {j}/{n})")) if progress else None,
            )
            load = load_average()
            load1.update((k, load) for k in keys)
            return timed

        measured = measure_stable(one_attempt, list(runners), timing.max_spread, timing.remeasure)
        for k, m in measured.items():
            row = rows[k]
            if m.error is not None:
                _failed(row, m.error)
                continue
            row.stats, row.spreads, row.noisy = m.stats, m.spreads, m.noisy
            row.attempts, row.attempt = len(m.spreads), m.attempt
            row.rounds, row.interleaved = m.rounds, m.beside
            row.estimated = m.stats.reps < timing.min_reps
            if load0 is not None and load1.get(k) is not None:
                row.load_avg = (load0, load1[k])
                row.under_load = under_load(row.load_avg, device)  # inside: its threads
    runners.clear()
    prepared.clear()
    _free(device)
    add_floors(rows, case, device)
    return rows


def _failed(row: Row, e: BaseException) -> None:
    row.status = "oom" if _is_oom(e) else "error"
    row.note = f"{type(e).__name__}: {e}"[:300]
    row.stats = None


def _check_impl(row, impl, case, device, timing, prepared) -> Runner | None:
    """Check ``impl`` (its first call, untimed, against the float64 reference): the
    :class:`Runner` that times it, or None with the row saying why it is not timed.
    Implementations with the same ``prepare`` share its inputs (it restores them before
    every call), so an in-place row's private copy of the inputs exists once per shape."""
    if impl.unavailable:
        row.status, row.note = "skipped", impl.unavailable
        return None
    why = impl.skip_if() if impl.skip_if else None
    if why:
        row.status, row.note = "skipped", why
        return None
    if impl.prepare is None:
        def inputs(i: int) -> Any:
            return case.sets[i % len(case.sets)]
    else:
        if impl.prepare not in prepared:
            prepared[impl.prepare] = impl.prepare(case.sets)
        inputs = prepared[impl.prepare]
    if impl.kind in ("ours", "peer"):
        sync(device)
        t0 = time.perf_counter()
        out = impl.run(inputs(0))
        sync(device)
        row.first_call_s = time.perf_counter() - t0
        row.check = case.check(impl, out)
        del out
        if not row.check.ok:
            row.status = "FAIL"
            row.note = f"differs from {row.check.against} (error {row.check.error:.3g}"
            row.note += f", {row.check.detail})" if row.check.detail else ")"
            row.note += ": NOT TIMED"
            return None
        if row.first_call_s > timing.max_call_s and not impl.slow_first_call:
            row.status = "skipped"
            row.note = f"one call took {row.first_call_s:.1f} s > max_call_s {timing.max_call_s:g}: not timed"
            return None
    warm = timing.warmup
    if row.first_call_s is not None and row.first_call_s > 1.0 and not case.per_call:
        warm = 0  # a slow call has no first-call effect left that a warm-up would remove
    # the warm-up calls tell a call's time better than a first call (one-time costs); a
    # slow call has none, and its first call is the estimate, unless that call compiled
    estimate = row.first_call_s if warm == 0 and not impl.slow_first_call else None
    return Runner(impl.run, inputs, warm, estimate)


def add_floors(rows: list[Row], case: Case, device: torch.device) -> None:
    """Each row's floor time for its task, and what it achieved against that floor."""
    for row in rows:
        floor = case.floors.get(row.task)
        if floor is None:
            continue
        row.floor_formula = floor.formula
        if floor.bytes:
            row.floor_s = floor.bytes / copy_bandwidth(device, _bandwidth_bytes(device))
            if row.median_s:
                row.achieved, row.achieved_unit = floor.bytes / row.median_s / 1e9, "GB/s"
        elif floor.flops:
            rate = max(_floor_row_rate(rows, case, floor) or 0.0,
                       *(matmul_rate(device, *floor.matmul, d) for d in {floor.dtype, torch.float32}))
            row.floor_s = floor.flops / rate
            if row.median_s:
                row.achieved, row.achieved_unit = floor.flops / row.median_s / 1e12, "TFLOP/s"


def _floor_row_rate(rows: list[Row], case: Case, floor: Floor) -> float | None:
    """FLOP/s of the fastest "floor" row (the bare matmul timed as a row of this case)
    whose task counts the same matmul: the rate measured beside the rows themselves."""
    rates = []
    for r in rows:
        f = case.floors.get(r.task)
        if r.kind == "floor" and r.median_s and f is not None and f.matmul == floor.matmul:
            rates.append(f.flops / r.median_s)
    return max(rates, default=None)


_BANDWIDTH_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}


def _bandwidth_bytes(device: torch.device) -> int:
    return _BANDWIDTH_BYTES.get(device.type, 256 << 20)


def set_quick_bandwidth_size() -> None:
    """A smaller copy for the bandwidth in a smoke run (still well past the L2 cache)."""
    _BANDWIDTH_BYTES.update(cpu=64 << 20, cuda=256 << 20)


# --------------------------------------------------------------------------------------
# Ratios between rows


def best_peer_ratios(rows: list[Row]) -> dict[int, tuple[str | None, float | None]]:
    """For each row (by index): the fastest peer of its shape and task, and that peer's
    median over the row's (> 1: the row is faster than every peer timed)."""
    best: dict[tuple[str, str, str], Row] = {}
    for r in rows:
        if r.kind == "peer" and r.median_s:
            key = (r.suite, r.shape, r.task)
            if key not in best or r.median_s < best[key].median_s:
                best[key] = r
    out = {}
    for i, r in enumerate(rows):
        b = best.get((r.suite, r.shape, r.task))
        if b is None or r.kind in ("bare", "floor"):
            out[i] = (b.impl if b else None, None)
        else:
            out[i] = (b.impl, b.median_s / r.median_s if r.median_s else None)
    return out
