"""The benchmark harness and ``vapo-bench``.

* the harness on a tiny suite: a right answer is checked then timed, a wrong one is FAIL
  and never timed, a peer that is not installed is a skipped row saying so;
* the noisy-row logic, with a fake timer: a wide row is measured again, kept if a retry
  is quiet, flagged ``noisy`` if none is;
* ``vapo-bench --quick --suite gae`` end to end: results.json, report.md and a PNG, every
  implementation checked against float64 (peers included) and timed beside its floor;
* bad arguments (an unknown suite) stop with a message naming the argument.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vapo_kernels.bench import cli, harness as H
from vapo_kernels.bench.report import markdown, row_dicts
from vapo_kernels.bench.suites import gae as gae_suite

CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------
# The harness on a tiny suite


class FakeTimer:
    """Stands for ``time_interleaved``: gives each runner it is asked to time the next
    prepared list of times (the last one again once they run out), and records which
    functions it was asked to time."""

    def __init__(self, *measurements: list[float]):
        self.measurements = list(measurements)
        self.timed: list = []

    def __call__(self, runners, device, **kw):
        out = []
        for r in runners:
            self.timed.append(r.fn)
            times = self.measurements.pop(0) if len(self.measurements) > 1 else self.measurements[0]
            out.append(H.Timed(list(times), rounds=1))
        return out


def double(x):
    return x * 2


def tiny_case(impls: list[H.Impl], per_call: bool = False) -> H.Case:
    sets = [torch.arange(8.0) + i for i in range(2)]

    def check(impl, out):
        err = float((out.double() - 2 * sets[0].double()).abs().max())
        return H.Check(err <= 1e-6, err, "2 x in float64")

    floor = H.Floor("8 B/element", bytes=8 * 8)
    return H.Case("tiny", "1x8", 8, sets, impls, {"double": floor}, check, per_call=per_call)


def test_right_answer_is_checked_then_timed_and_wrong_one_is_fail_not_timed():
    wrong = lambda x: x * 2 + 1  # noqa: E731
    impls = [
        H.Impl("ours", "double", "ours", double),
        H.Impl("wrong peer", "double", "peer", wrong),
        H.Impl("bare", "double", "bare", torch.neg),
    ]
    timer = FakeTimer([1e-3, 1e-3, 1e-3, 1e-3])
    rows = H.run_case(tiny_case(impls), CPU, H.Timing(), timer=timer)
    ours, bad, bare = rows
    assert ours.status == "ok" and ours.check.ok and ours.median_s == pytest.approx(1e-3)
    assert bad.status == "FAIL" and not bad.check.ok and bad.stats is None
    assert "NOT TIMED" in bad.note and bad.check.error == pytest.approx(1.0)
    assert wrong not in timer.timed and double in timer.timed and torch.neg in timer.timed
    assert bare.check is None and bare.status == "ok"  # a bare op is timed, not checked
    assert ours.floor_s > 0 and ours.achieved == pytest.approx(64 / 1e-3 / 1e9)
    md = markdown(
        {"environment": H.environment(CPU), "command": "test", "copy_GB_s": 1.0,
         "timing": vars(H.Timing())},
        row_dicts(rows),
    )
    assert "**FAIL**" in md and "NOT TIMED" in md


def test_real_timer_and_ratio_to_best_peer():
    slow = lambda x: [double(x) for _ in range(200)][-1]  # noqa: E731
    impls = [H.Impl("ours", "double", "ours", double), H.Impl("slow peer", "double", "peer", slow)]
    rows = H.run_case(tiny_case(impls), CPU, H.Timing(reps=20, budget_s=0.5, max_spread=10))
    assert all(r.status == "ok" and r.stats.reps >= 5 for r in rows)
    d = row_dicts(rows)
    assert d[0]["best_peer"] == "slow peer" and d[0]["vs_best_peer"] > 1
    assert d[1]["vs_best_peer"] == pytest.approx(1.0)


def test_unavailable_and_crashing_rows_are_reported_not_raised():
    def boom(x):
        raise RuntimeError("kaput")

    impls = [
        H.Impl("peer", "double", "peer", double, unavailable="somepeer not installed"),
        H.Impl("crash", "double", "ours", boom),
    ]
    rows = H.run_case(tiny_case(impls), CPU, H.Timing(), timer=FakeTimer([1.0]))
    assert (rows[0].status, rows[0].note) == ("skipped", "somepeer not installed")
    assert rows[1].status == "error" and "kaput" in rows[1].note


def test_a_peer_that_is_not_installed_is_named_so():
    def load():
        import vapo_no_such_peer_package  # noqa: F401

    suite = H.Suite("s", "", {}, [], (), {"ghost": H.Peer("vapo-no-such-peer", load)}, None)
    ctx = H.Context(CPU, {})
    suite.load_peers(ctx)
    assert ctx.missing("ghost").startswith("vapo-no-such-peer not installed")
    assert ctx.peer_versions["ghost"] is None and "ghost" not in ctx.peers


# --------------------------------------------------------------------------------------
# Noisy rows


WIDE = [1.0, 1.0, 2.0, 3.0, 3.0]  # IQR / median = 1
NARROW = [1.0, 1.0, 1.01, 1.02, 1.02]


def test_a_wide_row_is_remeasured_and_kept_quiet_if_a_retry_is():
    timer = FakeTimer(WIDE, NARROW)
    row = H.run_case(
        tiny_case([H.Impl("ours", "double", "ours", double)]), CPU,
        H.Timing(max_spread=0.2, remeasure=2), timer=timer,
    )[0]
    assert row.attempts == 2 and not row.noisy
    assert row.spreads[0] == pytest.approx(1.0) and row.stats.spread < 0.05
    assert row.median_s == pytest.approx(1.01)


def test_a_row_wide_every_time_is_flagged_noisy_after_the_retries(monkeypatch):
    monkeypatch.setattr(H, "load_average", lambda: 0.0)  # a busy test machine: not "under load"
    timer = FakeTimer(WIDE)
    rows = H.run_case(
        tiny_case([H.Impl("ours", "double", "ours", double)]), CPU,
        H.Timing(max_spread=0.2, remeasure=3), timer=timer,
    )
    assert rows[0].attempts == 4 and rows[0].noisy and len(timer.timed) == 4
    d = row_dicts(rows)[0]
    assert d["noisy"] and d["attempt_spreads"] == pytest.approx([1.0] * 4)
    md = markdown(
        {"environment": H.environment(CPU), "command": "t", "copy_GB_s": 1.0,
         "timing": vars(H.Timing())}, [d],
    )
    assert "ok (noisy)" in md


def test_measure_stable_keeps_the_quietest_attempt():
    attempts = iter([WIDE, [1.0, 1.0, 1.5, 2.0, 2.0], WIDE])
    m = H.measure_stable(lambda keys, a: [H.Timed(next(attempts))], [0], 0.1, 2)[0]
    assert m.noisy and len(m.spreads) == 3 and m.stats.spread == min(m.spreads)
    assert m.attempt == 1 and m.beside == 1


def test_measure_stable_times_only_the_wide_rows_again_together():
    asked = []

    def timer(keys, attempt):
        asked.append(list(keys))
        return [H.Timed(WIDE if k in (1, 2) and attempt == 0 else NARROW) for k in keys]

    res = H.measure_stable(timer, [0, 1, 2, 3], 0.2, 2)
    assert asked == [[0, 1, 2, 3], [1, 2]]
    assert all(not m.noisy and m.stats.spread < 0.05 for m in res.values())
    assert (res[0].attempt, res[0].beside) == (0, 4) and (res[1].attempt, res[1].beside) == (1, 2)


# --------------------------------------------------------------------------------------
# Interleaved timing, on a fake clock


class FakeClock:
    """A clock that only the fake implementations move: a call of cost c takes c seconds,
    ``slow_factor`` times longer if it is one of the calls numbered in ``slow`` (every
    call counts, checks and warm-ups included: a slow period of the host). ``log`` holds
    the name of each call, in order."""

    def __init__(self, slow: range = range(0), slow_factor: float = 3.0):
        self.now = 0.0
        self.log: list[str] = []
        self.slow, self.slow_factor = slow, slow_factor

    def __call__(self) -> float:
        return self.now

    def impl(self, name: str, cost: float, kind: str = "peer", fail_at: int | None = None,
             task: str = "double") -> H.Impl:
        """A right implementation (it doubles its input) whose call costs ``cost`` s and
        that raises at its ``fail_at``-th call (counting from 0)."""

        def run(x):
            if fail_at is not None and self.log.count(name) == fail_at:
                raise RuntimeError(f"{name} broke")
            factor = self.slow_factor if len(self.log) in self.slow else 1.0
            self.log.append(name)
            self.now += cost * factor
            return x * 2

        return H.Impl(name, task, kind, run)

    def timed_calls(self, skip: int) -> list[str]:
        return self.log[skip:]


def clocked(clock: FakeClock, rewarm: float = 0.0):
    """``time_interleaved`` on the fake clock, as run_case's timer (by default without
    untimed calls at the start of a turn, so that the log holds the timed calls only)."""
    return functools.partial(H.time_interleaved, clock=clock, rewarm=rewarm)


FAKE_TIMING = H.Timing(reps=30, budget_s=100.0, warmup=1, remeasure=0, max_spread=10.0)


def test_rows_of_a_shape_are_timed_in_interleaved_rounds(monkeypatch):
    """Every implementation makes its calls in short turns, spread over all the rounds, in
    an order that changes from round to round; turn_s = inf is the old block design."""
    monkeypatch.setattr(H, "load_average", lambda: None)
    clock = FakeClock()
    impls = [clock.impl("a", 1e-3, "ours"), clock.impl("b", 2e-3), clock.impl("c", 4e-3)]
    timing = H.Timing(**{**vars(FAKE_TIMING), "turn_s": 4e-3})
    rows = H.run_case(tiny_case(impls), CPU, timing, timer=clocked(clock))
    assert clock.log[:6] == ["a", "b", "c", "a", "b", "c"]  # checks, then warm-ups
    timed = clock.timed_calls(6)
    assert sorted(set(timed)) == ["a", "b", "c"] and all(timed.count(n) == 30 for n in "abc")
    # c (4 ms) makes one call a turn, so 30 rounds; a and b spread theirs over all of them
    assert all(r.rounds == 30 and r.interleaved == 3 and r.stats.reps == 30 for r in rows)
    turns = [n for i, n in enumerate(timed) if i == 0 or timed[i - 1] != n]
    assert len(turns) >= 60  # never one block per implementation
    for name in "abc":
        first, last = timed.index(name), len(timed) - 1 - timed[::-1].index(name)
        assert first < 8 and last > len(timed) - 9, name  # from the first round to the last
    rounds = [tuple(dict.fromkeys(timed[i:i + 10])) for i in range(0, len(timed), 30)]
    assert len(set(rounds)) > 1  # the order of the turns is shuffled per round
    assert [r.median_s for r in rows] == pytest.approx([1e-3, 2e-3, 4e-3])

    clock = FakeClock()
    impls = [clock.impl("a", 1e-3, "ours"), clock.impl("b", 2e-3), clock.impl("c", 4e-3)]
    block = H.Timing(**{**vars(FAKE_TIMING), "turn_s": math.inf})
    rows = H.run_case(tiny_case(impls), CPU, block, timer=clocked(clock))
    timed = clock.timed_calls(6)
    assert len([n for i, n in enumerate(timed) if i == 0 or timed[i - 1] != n]) == 3
    assert all(r.rounds == 1 for r in rows)


def test_turns_last_turn_s_in_at_least_min_turns_and_start_with_untimed_calls():
    """A row's turn is about turn_s of calls, but its calls take at least min_turns turns;
    a turn after another row's starts with untimed calls lasting rewarm x turn_s (none
    for a call longer than that, none right after its own turn)."""

    def run(clock, **kw):
        runners = [H.Runner(clock.impl(n, c).run, lambda i: torch.ones(1), warmup=w)
                   for n, c, w in (("fast", 1e-3, 3), ("faster", 0.5e-3, 30), ("slow", 10e-3, 3))]
        return H.time_interleaved(runners, CPU, reps=40, budget_s=0.0395, turn_s=10e-3,
                                  rewarm=0.25, seed=0, clock=clock, **kw)

    clock = FakeClock()
    fast, faster, slow = run(clock, min_turns=4)
    assert [len(t.times) for t in (fast, faster, slow)] == [40, 40, 4]  # budget: 4 slow calls
    assert fast.rounds == faster.rounds == slow.rounds == 4  # 10 ms turns: 10, 20 -> 10, 1
    assert fast.times == pytest.approx([1e-3] * 40)  # the untimed calls are not among them
    assert clock.log[:36] == ["fast"] * 3 + ["faster"] * 30 + ["slow"] * 3  # warm-ups
    runs = [(name, len(list(g))) for name, g in itertools.groupby(clock.log[36:])]
    # untimed: fast 2 (2.5 ms), faster 5, slow none (one call is longer than 2.5 ms)
    sizes = {name: {n for m, n in runs if m == name} for name in ("fast", "faster", "slow")}
    assert sizes["fast"] <= {12, 22} and sizes["faster"] <= {15, 25} and sizes["slow"] <= {1, 2}
    turns = {name: sum(1 for m, _ in runs if m == name) for name in ("fast", "faster")}
    assert clock.log.count("fast") == 3 + 40 + 2 * turns["fast"]  # none after its own turn
    assert clock.log.count("faster") == 30 + 40 + 5 * turns["faster"]

    clock = FakeClock()
    fast, faster, slow = run(clock)  # min_turns 20: 20 turns of 2 calls for fast and faster
    assert (fast.rounds, faster.rounds, slow.rounds) == (20, 20, 4)
    assert [len(t.times) for t in (fast, faster, slow)] == [40, 40, 4]

    clock = FakeClock()
    run(clock, min_turns=4)
    n = len(clock.log)
    H.time_interleaved([H.Runner(clock.impl(n, c).run, lambda i: torch.ones(1), warmup=3)
                        for n, c in (("a", 1e-3), ("b", 1e-3))], CPU, reps=40, turn_s=10e-3,
                       rewarm=0, clock=clock)
    assert len(clock.log) - n == 2 * (3 + 40)  # rewarm=0: warm-ups and timed calls only
    n = len(clock.log)
    H.time_interleaved([H.Runner(clock.impl(n, c).run, lambda i: torch.ones(1), warmup=3)
                        for n, c in (("a", 1e-3), ("b", 1e-3))], CPU, reps=40, turn_s=math.inf,
                       clock=clock)
    # one block each after both warm-ups: a block not right after its own warm-up starts
    # with the whole warm-up again, as a row timed on its own had it just before ("b",
    # warmed up last, skips it if it goes first)
    assert len(clock.log) - n in (2 * (3 + 40) + 3, 2 * (3 + 40) + 6)


def test_the_turn_order_follows_the_seed():
    def order(seed):
        clock = FakeClock()
        runners = [H.Runner(clock.impl(n, 1e-3).run, lambda i: torch.ones(1)) for n in "abcd"]
        H.time_interleaved(runners, CPU, reps=20, turn_s=1e-3, seed=seed, clock=clock)
        return clock.log

    assert order(1) == order(1) and order(1) != order(2)


@pytest.mark.parametrize("slow", [range(36, 66), range(20, 75)])
def test_a_slow_period_slows_every_row_alike(slow, monkeypatch):
    """A slow period (3x) over a span of calls: interleaved, every row gets its share of
    slow calls and the medians keep their true ratios (1 : 2 : 4); in one block per row
    (the old design) the period hits the row timed then, and the ratio is off."""
    monkeypatch.setattr(H, "load_average", lambda: None)

    def medians(turn_s):
        clock = FakeClock(slow=slow)
        impls = [clock.impl("a", 1e-3, "ours"), clock.impl("b", 2e-3), clock.impl("c", 4e-3)]
        timing = H.Timing(**{**vars(FAKE_TIMING), "turn_s": turn_s})
        rows = H.run_case(tiny_case(impls), CPU, timing, timer=clocked(clock))
        return [r.median_s for r in rows]

    a, b, c = medians(4e-3)
    assert (b / a, c / a) == pytest.approx((2.0, 4.0))
    a, b, c = medians(math.inf)
    assert (b / a, c / a) != pytest.approx((2.0, 4.0), rel=0.2)  # the old design's bias


def test_a_failing_or_skipped_row_leaves_the_others_timed(monkeypatch):
    """A peer that raises in the middle of the rounds (or in its warm-up) is an error row
    with its message, one that fails its check is FAIL and never called again, one not
    installed is skipped; the rounds go on and the others get every call they planned."""
    monkeypatch.setattr(H, "load_average", lambda: None)
    clock = FakeClock()
    wrong = clock.impl("wrong", 1e-3)
    wrong.run = lambda x, run=wrong.run: run(x) + 1
    impls = [
        clock.impl("a", 1e-3, "ours"),
        clock.impl("breaks", 1e-3, fail_at=10),  # check 0, warm-up 1, timed calls 0-7
        clock.impl("warm-up breaks", 1e-3, fail_at=1),
        wrong,
        H.Impl("absent", "double", "peer", double, unavailable="absent not installed"),
        clock.impl("b", 2e-3),
        clock.impl("bare", 1e-3, "bare"),
    ]
    timing = H.Timing(**{**vars(FAKE_TIMING), "turn_s": 2e-3})
    rows = {r.impl: r for r in H.run_case(tiny_case(impls), CPU, timing, timer=clocked(clock))}
    assert rows["breaks"].status == "error" and "breaks broke" in rows["breaks"].note
    assert rows["breaks"].stats is None and clock.log.count("breaks") == 10
    assert rows["warm-up breaks"].status == "error" and "warm-up breaks broke" in rows["warm-up breaks"].note
    assert rows["wrong"].status == "FAIL" and clock.log.count("wrong") == 1
    assert rows["absent"].status == "skipped" and rows["absent"].note == "absent not installed"
    for name, cost in (("a", 1e-3), ("b", 2e-3), ("bare", 1e-3)):
        r = rows[name]
        assert r.status == "ok" and r.stats.reps == 30 and r.median_s == pytest.approx(cost)
        assert r.interleaved == 4 and r.rounds == 30  # b: 1 call a turn; a, bare: 2 every other
    timed = clock.timed_calls(clock.log.index("bare") + 1)  # past the last warm-up
    assert "breaks" in timed[timed.index("b"):]  # it broke after the rounds began


def test_a_large_shape_keeps_its_time_budget(monkeypatch):
    """Calls of seconds: each row makes about budget_s of calls (at least one), as when
    timed alone, planned from its warm-up (or its first call when it has none) and
    re-planned when a call comes in faster than that estimate."""
    monkeypatch.setattr(H, "load_average", lambda: None)
    clock = FakeClock()
    timing = H.Timing(reps=50, budget_s=5.0, warmup=1, remeasure=0, max_spread=10.0)
    impls = [clock.impl("a", 2.0, "ours"), clock.impl("b", 0.7), clock.impl("c", 9.0)]
    t0 = clock.now
    rows = H.run_case(tiny_case(impls), CPU, timing, timer=clocked(clock))
    assert [r.stats.reps for r in rows] == [3, 8, 1]  # ceil(5 / t), at least one
    timed = clock.now - t0 - 2 * (2.0 + 0.7 + 9.0)  # less the checks and the warm-ups
    assert timed == pytest.approx(3 * 2.0 + 8 * 0.7 + 9.0)  # no more than each alone

    # no estimate (no warm-up): its first timed call plans the rest; a faster call re-plans
    costs = iter([4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    clock = FakeClock()

    def varying(x):
        clock.now += next(costs)

    (t,) = H.time_interleaved([H.Runner(varying, lambda i: None)], CPU, reps=50, budget_s=5.0,
                              turn_s=1e-3, clock=clock)
    assert t.times == [4.0, 1.0] and t.error is None  # 5 s: the budget is spent


def test_results_json_keeps_its_keys_and_adds_the_rounds(tmp_path, monkeypatch):
    """Every key a results.json row had before interleaving is still there; the new ones
    (kept_attempt, rounds, interleaved) are added, and the timing settings name turn_s
    and seed."""
    monkeypatch.setattr(H, "load_average", lambda: 0.25)
    monkeypatch.setattr(H, "copy_bandwidth", lambda device, nbytes: 1e10)
    from vapo_kernels.bench.report import write_report

    clock = FakeClock()
    ms = 2.0 ** -10  # about a millisecond, exact in binary: the fake clock adds it up exactly
    impls = [clock.impl("a", ms, "ours"), clock.impl("b", 2 * ms), clock.impl("bare", ms, "bare")]
    rows = H.run_case(tiny_case(impls, per_call=True), CPU, FAKE_TIMING, timer=clocked(clock))
    meta = {"environment": H.environment(CPU), "command": "t", "copy_GB_s": 10.0,
            "timing": dict(vars(FAKE_TIMING)), "complete": True}
    write_report(tmp_path, meta, rows, plots=False)
    data = json.loads((tmp_path / "results.json").read_text())
    before = {
        "suite", "shape", "task", "impl", "kind", "status", "tokens", "per_call", "median_s",
        "q1_s", "q3_s", "spread", "reps", "attempts", "attempt_spreads", "noisy", "estimated",
        "load_avg", "under_load", "tokens_per_s", "floor_s", "floor_formula",
        "fraction_of_floor", "achieved", "achieved_unit", "best_peer", "vs_best_peer",
        "over_bare_op", "check", "check_error", "checked_against", "first_call_s", "note",
    }
    for r in data["rows"]:
        assert before <= set(r), before - set(r)
        # 20 ms turns of 20 calls (a, bare) or 10 (b), 500 calls: 25 or 50 turns
        assert (r["kept_attempt"], r["rounds"], r["interleaved"]) == (0, 50 if r["impl"] == "b" else 25, 3)
        assert r["load_avg"] == [0.25, 0.25]
    assert {"turn_s", "seed", "reps", "budget_s", "per_call_reps"} <= set(data["meta"]["timing"])
    a = data["rows"][0]
    assert a["vs_best_peer"] == pytest.approx(2.0) and a["over_bare_op"] == pytest.approx(1.0)
    assert "interleaved" in (tmp_path / "report.md").read_text()


def test_progress_says_what_is_checked_then_timed(monkeypatch):
    monkeypatch.setattr(H, "load_average", lambda: None)
    clock = FakeClock()
    said: list[str] = []
    impls = [clock.impl("a", 1e-3, "ours"), clock.impl("b", 2e-3)]
    H.run_case(tiny_case(impls), CPU, FAKE_TIMING, timer=clocked(clock), progress=said.append)
    assert said == ["tiny 1x8 double: checking a", "tiny 1x8 double: checking b",
                    "tiny 1x8: timing 2 rows interleaved"]


# --------------------------------------------------------------------------------------
# The GAE suite's checks


def test_gae_check_refuses_a_wrong_answer():
    ctx = H.Context(CPU, {"gae": ["reference"]}, sets=1)
    x = gae_suite.make_inputs(3, 64, CPU, seed=1)
    check = gae_suite.make_check(x)
    impl = next(i for i in gae_suite.impls(3, 64, ctx) if i.name == "vapo.gae[reference]")
    adv, ret = impl.run(x)
    assert check(impl, (adv, ret)).ok
    assert not check(impl, (adv.roll(1, dims=1), ret)).ok  # off by one token
    assert not check(impl, (adv, ret * (1 + 1e-3))).ok


def test_torchrl_twice_is_skipped_where_its_lambda_is_zero():
    """One sequence of <= 1 / alpha tokens has lambda_policy = 0, where TorchRL's
    scalar-lambda path raises an IndexError: a skipped row that says so, not an error."""
    ctx = H.Context(CPU, {"gae": ["reference"]}, sets=1)
    for shape, skipped in (((1, 16), True), ((1, 64), False), ((4, 16), False)):
        sets = [gae_suite.make_inputs(*shape, CPU, seed=1)]
        row = next(i for i in gae_suite.impls(*shape, ctx, sets) if i.name == "torchrl.vec_gae x2")
        assert ("lambda = 0" in (row.skip_if() or "")) == skipped, shape


def test_gae_rows_that_whiten_are_only_ranked_against_rows_that_whiten():
    """The summary ranks rows within a task: a row that whitens its advantages (ours with
    whiten=True, verl, NeMo's two-pass method with whitening) has a "+whiten" task, every
    other row not, so our un-whitened decoupled GAE is never set against NeMo's whitening."""
    ctx = H.Context(CPU, {"gae": ["reference"]}, sets=1)
    impls = gae_suite.impls(2, 64, ctx)
    for impl in impls:
        assert impl.task.endswith("+whiten") == ("whiten" in impl.expect), (impl.name, impl.task)
    peers = {i.task: [] for i in impls}
    for i in impls:
        if i.kind == "peer":
            peers[i.task].append(i.name)
    assert peers["decoupled"] and peers["decoupled+whiten"] and peers["gae"] and peers["gae+whiten"]
    assert "nemo.two_pass (transcription)" in peers["decoupled"]


def test_gae_inputs_never_mask_a_whole_row():
    """Every shape --shapes accepts runs: at T = 1 a masked gap used to hide the only token,
    and whitening then had nothing to whiten."""
    for seed in range(3):
        assert gae_suite.make_inputs(2, 1, CPU, seed=seed).mask.all()
        assert gae_suite.make_inputs(1, 2, CPU, seed=seed).mask.all()
    assert "B x T >= 2" in gae_suite.SUITE.shape_error((1, 1))


# --------------------------------------------------------------------------------------
# vapo-bench end to end


@pytest.fixture(scope="module")
def quick_gae(tmp_path_factory):
    out = tmp_path_factory.mktemp("vapo_bench")
    exe = shutil.which("vapo-bench")
    cmd = [exe] if exe else [sys.executable, "-m", "vapo_kernels.bench.cli"]
    proc = subprocess.run(
        [*cmd, "--quick", "--suite", "gae", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc


def test_quick_gae_writes_json_markdown_and_png(quick_gae):
    out, data, proc = quick_gae
    assert (out / "report.md").read_text().count("| gae |") >= 2
    assert (out / "gae.png").stat().st_size > 1000
    assert data["meta"]["complete"] is True and "progress" not in data["meta"]
    env = data["meta"]["environment"]
    assert {"device", "date", "torch", "triton", "threads"} <= set(env)
    rows = data["rows"]
    assert {r["shape"] for r in rows} == {f"{b}x{t}" for b, t in gae_suite.SHAPES["quick"]}
    backends = data["meta"]["backends"]["gae"]["gae"]
    ours = {r["impl"] for r in rows if r["kind"] == "ours"}
    assert {f"vapo.gae[{b}]" for b in backends} <= ours
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        assert r["floor_s"] and r["floor_formula"].startswith("17 B/token")
        if r["status"] == "skipped":
            assert r["note"]
        elif r["kind"] != "bare":
            assert r["check"] == "ok" and "float64" in r["checked_against"]
            assert r["median_s"] > 0 and r["spread"] is not None and r["best_peer"]
    peers = {r["impl"] for r in rows if r["kind"] == "peer"}
    assert {"slime.chunked_gae (transcription)", "nemo.two_pass (transcription)"} <= peers
    per_call = [r for r in rows if r["per_call"] and r["kind"] == "ours" and r["median_s"]]
    assert per_call and all(r["over_bare_op"] for r in per_call)


def test_unknown_suite_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--suite", "gae,nosuch"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--suite" in err and "'nosuch'" in err and "gae, logprobs, loss" in err


def test_shapes_need_one_suite_and_a_valid_spec(capsys):
    for argv, words in (
        (["--suite", "gae,loss", "--shapes", "8x128"], "exactly one --suite"),
        (["--suite", "gae", "--shapes", "8xabc"], "--shapes '8xabc'"),
        (["--reps", "0"], "--reps"),
    ):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert words in capsys.readouterr().err


def test_summary_picks_our_fastest_checked_row_and_the_fastest_checked_peer():
    from vapo_kernels.bench.report import summary

    def row(impl, kind, median, status="ok", check="ok"):
        return {"suite": "gae", "shape": "8x128", "task": "gae", "impl": impl, "kind": kind,
                "status": status, "check": check, "median_s": median, "noisy": False,
                "estimated": False, "under_load": False,
                "floor_s": 1e-6, "fraction_of_floor": 1e-6 / median}

    rows = [
        row("ours-slow", "ours", 4e-4), row("ours-fast", "ours", 1e-4),
        row("ours-wrong", "ours", 1e-5, status="FAIL", check="FAIL"),  # never the headline
        row("peer-a", "peer", 8e-4), row("peer-b", "peer", 3e-4),
        row("bare", "bare", 1e-6),
    ]
    table = [line for line in summary(rows) if line.startswith("| gae")]
    assert len(table) == 1
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert "ours-fast" in cells[4] and cells[7] == "`peer-b`" and cells[8] == "3×"


def test_summary_flags_an_uncertain_peer_time_and_its_ratio():
    """A peer timed once (47 s a call: an estimate), a noisy peer or one measured under load
    is flagged in the summary like ours, and the ratio says it is uncertain."""
    from vapo_kernels.bench.report import summary

    def row(impl, kind, median, **flags):
        return {"suite": "logprobs", "shape": "1x1", "task": "t", "impl": impl, "kind": kind,
                "status": "ok", "check": "ok", "median_s": median, "noisy": False,
                "estimated": False, "under_load": False, "floor_s": None,
                "fraction_of_floor": None, **flags}

    for flags, word in (({"estimated": True}, "estimate"), ({"noisy": True}, "noisy"),
                        ({"under_load": True}, "under load")):
        table = [line for line in summary([row("ours", "ours", 1.0), row("peer", "peer", 47.0, **flags)])
                 if line.startswith("| logprobs")]
        cells = [c.strip() for c in table[0].strip("|").split("|")]
        assert cells[6] == f"47.00 s ({word})" and cells[8] == f"47× (uncertain: peer {word})"
    table = [line for line in summary([row("ours", "ours", 1.0, noisy=True, estimated=True),
                                       row("peer", "peer", 2.0)]) if line.startswith("| logprobs")]
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert "(noisy, estimate)" in cells[4] and cells[8] == "2× (uncertain: ours noisy, estimate)"


def test_under_load_discounts_the_rows_own_threads(monkeypatch):
    """Load above half the cores, beyond the run's own torch threads, flags a CPU row."""
    monkeypatch.setattr(H.os, "cpu_count", lambda: 4)
    own = torch.get_num_threads()
    assert not H.under_load((own + 1.9, own), CPU)
    assert H.under_load((own, own + 2.1), CPU)


def test_each_row_records_the_load_average(monkeypatch):
    loads = iter([0.5, 9.0])
    monkeypatch.setattr(H, "load_average", lambda: next(loads))
    monkeypatch.setattr(H.os, "cpu_count", lambda: 2)
    row = H.run_case(tiny_case([H.Impl("ours", "double", "ours", double)]), CPU, H.Timing(),
                     timer=FakeTimer([1.0]))[0]
    assert row.load_avg == (0.5, 9.0) and row.under_load
    d = row_dicts([row])[0]
    assert d["load_avg"] == (0.5, 9.0) and d["under_load"]


def test_flop_floor_takes_the_fastest_matmul_dtype(monkeypatch):
    """A FLOP floor is the time at the best matmul rate of the device: on a CPU without
    bf16 units the float32 matmul is faster, so a bf16 task's floor uses its rate."""
    rates = {torch.bfloat16: 1e9, torch.float32: 4e9}
    monkeypatch.setattr(H, "matmul_rate", lambda device, m, k, n, dtype: rates[dtype])
    floor = H.Floor("2 m k n FLOP", flops=8e9, matmul=(1, 1, 1), dtype=torch.bfloat16)
    row = H.Row("s", "1x1", "mm", "ours", "ours", tokens=1, per_call=False)
    case = H.Case("s", "1x1", 1, [None], [], {"mm": floor}, None)
    H.add_floors([row], case, torch.device("cpu"))
    assert row.floor_s == pytest.approx(2.0)  # 8e9 FLOP at the float32 rate, not bf16's 8 s
