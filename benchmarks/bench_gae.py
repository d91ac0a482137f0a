"""GAE side by side: our backends vs the peers' implementations, in one run.

Two tasks, each over padded (B, T) fp32 batches with multi-turn masks (masked gaps inside
each response) and right-padding to ragged lengths:

* ``gae``       - one lambda (gamma 1.0, lambda 0.95): ``vapo_kernels.gae`` vs verl's
  ``compute_gae_advantage_return`` (Python loop + masked whitening, as verl calls it),
  OpenRLHF's ``get_advantages_and_returns`` (Python loop), TorchRL's
  ``vec_generalized_advantage_estimate`` (conv1d with a truncated geometric filter) and
  slime's ``chunked_gae`` method (transcribed here: not on PyPI).
* ``decoupled`` - VAPO's decoupled GAE (lambda_critic 1.0, length-adaptive lambda_policy,
  alpha 0.05): ``vapo_kernels.decoupled_gae`` vs NeMo-RL's method (transcribed here: not
  installable) and TorchRL called twice (per-sequence lambda tensor + lambda 1.0).

Before anything of ours is timed, its outputs on the benchmarked inputs are checked
against verl's (allclose rtol = atol = 1e-4 on valid tokens); a row that fails is not
timed, is reported as FAILED and makes the script exit non-zero.

Every time is set against the byte floor: 17 B/token (rewards and values fp32 + a bool
mask in, advantages and returns fp32 out) at the copy bandwidth measured in this run on
this device. Results: a printed table per shape, ``<out>/gae_<device>.json`` (rows),
``<out>/gae_<device>.png`` (tokens/s, log scale) and ``<out>/gae_<device>.txt``.

    python benchmarks/bench_gae.py                  # CPU, full run (< ~8 min on 2 cores)
    python benchmarks/bench_gae.py --quick          # smoke run, small shapes, few reps
    python benchmarks/bench_gae.py --device cuda    # on a GPU
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _harness as H

import vapo_kernels as vk

GAMMA = 1.0
LAM = 0.95  # the one-lambda task
LAM_CRITIC = 1.0  # decoupled: Monte-Carlo value targets
ALPHA = 0.05  # decoupled: VAPO's length-adaptive lambda_policy = 1 - 1/(alpha * l)
BYTES_PER_TOKEN = 17  # r, V fp32 + mask (1 B) in; A, R fp32 out
RTOL = ATOL = 1e-4
PREFIX = 512  # columns timed once to predict a slow peer's full-size cost

# Per-call shapes: almost no work per call, so a row's time is the call's fixed cost
# (Python, validation, dispatch). Their rows run on --per-call-threads threads (1), each
# the median of hundreds of calls, beside a bare torch op timed in the same run.
PER_CALL_SHAPES = [(8, 128)]
DEFAULT_SHAPES = [*PER_CALL_SHAPES, (8, 1024), (64, 4096), (512, 16384), (1, 131072)]
QUICK_SHAPES = [*PER_CALL_SHAPES, (8, 1024), (1, 4096)]


# --------------------------------------------------------------------------------------
# Inputs


@dataclass
class Inputs:
    rewards: torch.Tensor  # (B, T) fp32: small per-token terms + a terminal reward
    values: torch.Tensor  # (B, T) fp32
    mask: torch.Tensor  # (B, T) bool: turns with gaps, then right-padding
    maskf: torch.Tensor  # the same as float32, as the peers take it
    lam_policy: torch.Tensor  # (B,) fp32 length-adaptive lambda, bit-equal to ours
    next_values: torch.Tensor  # (B, T) values shifted left, for TorchRL's API
    done: torch.Tensor  # (B, T, 1) bool, True at the end of each row, for TorchRL

    def prefix(self, t: int) -> Inputs:
        cut = {
            k: getattr(self, k)[:, :t].contiguous()
            for k in ("rewards", "values", "mask", "maskf", "next_values")
        }
        done = torch.zeros_like(self.done[:, :t])
        done[:, -1] = True
        return replace(self, **cut, done=done)


def make_inputs(batch: int, seqlen: int, device: torch.device, seed: int) -> Inputs:
    """Random data (never zeros): ragged lengths in [T/2, T] (row 0 full), three masked
    gaps of up to T/64 tokens per row (tool/observation tokens), random garbage in every
    masked or padded slot."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seqlen // 2, seqlen + 1, (batch,), generator=g)
    lengths[0] = seqlen
    pos = torch.arange(seqlen)
    mask = pos[None, :] < lengths[:, None]
    max_gap = max(1, seqlen // 64)
    for _ in range(3):
        start = (torch.rand(batch, generator=g) * lengths).long()
        stop = start + torch.randint(1, max_gap + 1, (batch,), generator=g)
        mask &= ~((pos[None, :] >= start[:, None]) & (pos[None, :] < stop[:, None]))
    rewards = 0.01 * torch.randn(batch, seqlen, generator=g)  # KL-penalty-like terms
    last = seqlen - 1 - mask.flip(1).to(torch.int8).argmax(1)
    rewards[torch.arange(batch), last] += torch.randn(batch, generator=g)
    values = torch.randn(batch, seqlen, generator=g)
    # gamma = 1, so fp32(lambda) is exactly the coefficient our op uses for gamma*lambda.
    lam_policy = vk.length_adaptive_lambda(mask.sum(1), ALPHA).to(torch.float32)
    next_values = torch.cat([values[:, 1:], torch.zeros(batch, 1)], dim=1)
    done = torch.zeros(batch, seqlen, 1, dtype=torch.bool)
    done[:, -1] = True
    x = Inputs(rewards, values, mask, mask.float(), lam_policy, next_values, done)
    return Inputs(**{k: v.to(device) for k, v in vars(x).items()})


# --------------------------------------------------------------------------------------
# Peers: the installed packages where they install, transcriptions where they don't.


@dataclass
class Peers:
    verl: Callable | None = None
    openrlhf: Callable | None = None
    torchrl: Callable | None = None
    why: dict[str, str] | None = None
    versions: dict[str, str] | None = None


def load_verl() -> Callable:
    """verl's ``compute_gae_advantage_return`` and the ``masked_whiten`` it calls.

    Compiled from the installed source files (``import verl`` pulls in ray, tensordict and
    a transformers stack, ~6 s here, and fails on a machine with only the verl wheel).
    """
    from types import SimpleNamespace

    functional = H.load_from_source(
        "verl",
        "utils/torch_functional.py",
        ["masked_sum", "masked_mean", "masked_var", "masked_whiten"],
        {"torch": torch},
    )
    verl_f = SimpleNamespace(**{k: v for k, v in functional.items() if k.startswith("masked")})
    core = H.load_from_source(
        "verl",
        "trainer/ppo/core_algos.py",
        ["compute_gae_advantage_return"],
        {"torch": torch, "verl_F": verl_f},
    )
    return core["compute_gae_advantage_return"]


def load_openrlhf() -> Callable:
    """OpenRLHF's ``get_advantages_and_returns``, compiled from the installed source.

    Importing ``openrlhf.trainer.ppo_utils.experience_maker`` pulls in ray, peft and
    deepspeed (peft is missing here); the method uses none of them, nor ``self``.
    """
    ns = H.load_from_source(
        "openrlhf",
        "trainer/ppo_utils/experience_maker.py",
        ["get_advantages_and_returns"],
        {"torch": torch, "Tuple": tuple, "List": list},
    )
    return functools.partial(ns["get_advantages_and_returns"], None)


def load_peers() -> Peers:
    peers = Peers(why={}, versions={})
    loaders = {
        "verl": load_verl,
        "openrlhf": load_openrlhf,
        "torchrl": lambda: (
            importlib.import_module(
                "torchrl.objectives.value.functional"
            ).vec_generalized_advantage_estimate
        ),
    }
    for name, load in loaders.items():
        peers.versions[name] = H.package_version(name)
        try:
            setattr(peers, name, load())
        except Exception as e:  # noqa: BLE001 - a peer that cannot load just loses its row
            peers.why[name] = f"{name} not loadable: {type(e).__name__}: {e}"
    return peers


def slime_chunked_gae_transcription(rewards, values, gamma: float, lambd: float, chunk: int = 128):
    """TRANSCRIPTION (not slime's code) of slime's ``chunked_gae`` method.

    Source read: THUDM/slime ``slime/utils/ppo_utils.py::chunked_gae`` (commit 501dae9),
    slime's default GAE (PR #850). Same steps and tensor ops, so the same cost: deltas
    with V_T = 0; reverse time; pad T to a multiple of C; within each chunk a (C x C)
    upper-triangular matrix of powers of w = gamma*lambda turns the scan into one matmul;
    a Python loop over the T/C chunks adds the carried state times w^(t+1). One scalar
    gamma*lambda, padded (B, T) only, no mask: it does not skip masked gaps.
    """
    batch, length = rewards.shape
    zero_col = torch.zeros(batch, 1, device=values.device, dtype=values.dtype)
    deltas = rewards + gamma * torch.cat([values[:, 1:], zero_col], dim=1) - values
    w = gamma * lambd
    rev = torch.flip(deltas, dims=[1])
    pad = (-length) % chunk
    if pad:
        rev = F.pad(rev, (0, pad))
    n_chunks = rev.shape[1] // chunk
    idx = torch.arange(chunk, device=rewards.device)
    diff = idx[None, :] - idx[:, None]
    upper = diff >= 0
    tri = torch.zeros(chunk, chunk, device=rewards.device, dtype=rewards.dtype)
    if w == 0.0:
        tri[upper & (diff == 0)] = 1.0
        powers = torch.zeros(chunk, device=rewards.device, dtype=rewards.dtype)
    else:
        tri[upper] = w ** diff[upper].to(rewards.dtype)
        powers = w ** torch.arange(1, chunk + 1, device=rewards.device, dtype=rewards.dtype)
    local = (rev.reshape(batch * n_chunks, chunk) @ tri).view(batch, n_chunks, chunk)
    sizes = [chunk] * n_chunks
    if pad:
        sizes[-1] = chunk - pad
    out_rev = rev.new_zeros(batch, rev.shape[1])
    carry = torch.zeros(batch, device=rewards.device, dtype=rewards.dtype)
    for c in range(n_chunks):
        size, start = sizes[c], c * chunk
        glob = local[:, c, :size] + carry.unsqueeze(1) * powers[:size]
        out_rev[:, start : start + size] = glob
        carry = glob[:, -1]
    if pad:
        out_rev = out_rev[:, :length]
    advantages = torch.flip(out_rev, dims=[1])
    return advantages, advantages + values


def _nemo_gae_pass(rewards, values, mask, gamma: float, lam):
    """One pass of NeMo-RL's ``GeneralizedAdvantageEstimator._compute_gae`` (transcribed)."""
    length = rewards.shape[-1]
    if (
        gamma == 1.0
        and not isinstance(lam, torch.Tensor)
        and lam == 1.0
        and bool(((mask == 0) | (mask == 1)).all())
    ):
        # NeMo's fast path for gamma = lambda = 1: the TD terms telescope to reward-to-go
        # minus the next valid token's value (their code also prints a line here).
        to_go = (rewards * mask).flip(-1).cumsum(-1).flip(-1)
        pos = torch.arange(length, device=values.device)
        next_valid = torch.where(mask.bool(), pos, length).flip(-1).cummin(-1).values.flip(-1)
        adv = to_go - F.pad(values, (0, 1)).gather(-1, next_valid)
        return adv, adv + values
    next_v = torch.zeros(values.shape[0], device=values.device, dtype=values.dtype)
    last = torch.zeros_like(next_v)
    out = []
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        new = delta + gamma * lam * last
        m = mask[:, t]
        next_v = values[:, t] * m + (1 - m) * next_v
        last = new * m + (1 - m) * last
        out.append(last)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + values


def nemo_decoupled_gae_transcription(rewards, values, mask, gamma, lam_value, alpha):
    """TRANSCRIPTION (not NeMo's code) of NeMo-RL's VAPO GAE, the two-pass method.

    Source read: NVIDIA-NeMo/RL ``nemo_rl/algorithms/advantage_estimator.py``
    ``GeneralizedAdvantageEstimator.compute_advantage`` (commit 00925dd), minus the
    reward construction (we pass token-level rewards): length-adaptive
    lambda_policy = clamp(1 - 1/clamp(alpha*len, min=1), 0, 1); one pass for the returns
    with lambda_value (gamma = lambda = 1 takes their cumsum fast path), a second pass
    (verl-style masked loop) for the advantages with the per-sequence lambda; masked
    whitening (masked_mean with +1e-8; variance taken as the masked mean of squares - the
    exact masked_var was not in the snapshot read; either way a few elementwise passes);
    then masked positions are zero-filled.
    """
    resp_lens = mask.sum(dim=1).float()
    lam_policy = (1.0 - 1.0 / (alpha * resp_lens).clamp(min=1.0)).clamp(min=0.0, max=1.0)
    _, returns = _nemo_gae_pass(rewards, values, mask, gamma, lam_value)
    adv, _ = _nemo_gae_pass(rewards, values, mask, gamma, lam_policy)
    count = mask.sum() + 1e-8
    mean = (adv * mask).sum() / count
    var = ((adv - mean) ** 2 * mask).sum() / count
    adv = (adv - mean) * torch.rsqrt(var + 1e-8)
    adv = torch.masked_fill(adv, ~(mask.bool()), 0)
    return adv, returns


# --------------------------------------------------------------------------------------
# What runs


@dataclass
class Impl:
    name: str
    task: str  # "gae" | "decoupled"
    kind: str  # "ours" | "peer"
    run: Callable[[Inputs], Any]
    note: str = ""
    scaling: float = 1.0  # cost ~ T**scaling at fixed B, for predicting from a prefix
    mem_bytes: Callable[[int, int], int] | None = None  # extra working memory, if large
    check: str | None = None  # ours: which reference its outputs must match
    unavailable: str | None = None


def torchrl_filter_taps(gamma_lambda: float, seqlen: int) -> int:
    """Length of TorchRL's geometric filter (it drops powers below 1e-7)."""
    if gamma_lambda >= 1.0:
        return seqlen
    return min(seqlen, int(math.log(1e-7) / math.log(gamma_lambda)))


def build_impls(backends: list[str], peers: Peers, seqlen: int, with_reference: bool) -> list:
    impls = []
    for b in backends:
        for whiten in (False, True):
            suffix = "+whiten" if whiten else ""

            def run_gae(x, b=b, whiten=whiten):
                return vk.gae(
                    x.rewards, x.values, x.mask, gamma=GAMMA, lam=LAM, whiten=whiten, backend=b
                )

            def run_dec(x, b=b, whiten=whiten):
                return vk.decoupled_gae(
                    x.rewards,
                    x.values,
                    x.mask,
                    gamma=GAMMA,
                    lam_critic=LAM_CRITIC,
                    alpha=ALPHA,
                    whiten=whiten,
                    backend=b,
                )

            note = "one fused scan" + (
                " + masked whitening (what verl's call returns)" if whiten else ""
            )
            impls.append(
                Impl(f"vapo.gae{suffix}[{b}]", "gae", "ours", run_gae, note, check=f"gae{suffix}")
            )
            impls.append(
                Impl(
                    f"vapo.decoupled_gae{suffix}[{b}]",
                    "decoupled",
                    "ours",
                    run_dec,
                    note.replace("scan", "scan, both lambdas").replace(
                        "what verl's call returns", "as NeMo's method"
                    ),
                    check=f"decoupled{suffix}",
                )
            )
    if with_reference:
        for task, fn in (("gae", vk.gae), ("decoupled", vk.decoupled_gae)):
            kw = {"lam": LAM} if task == "gae" else {"lam_critic": LAM_CRITIC, "alpha": ALPHA}

            def run_ref(x, fn=fn, kw=kw):
                return fn(x.rewards, x.values, x.mask, gamma=GAMMA, backend="reference", **kw)

            impls.append(
                Impl(
                    f"vapo.{fn.__name__}[reference]",
                    task,
                    "ours",
                    run_ref,
                    "the spec: PyTorch loop over T",
                    check=task,
                )
            )

    why = peers.why or {}
    impls.append(
        Impl(
            "verl",
            "gae",
            "peer",
            lambda x: peers.verl(x.rewards, x.values, x.maskf, GAMMA, LAM),
            "compute_gae_advantage_return: Python loop over T + masked_whiten",
            unavailable=why.get("verl"),
        )
    )
    impls.append(
        Impl(
            "openrlhf",
            "gae",
            "peer",
            lambda x: peers.openrlhf(x.values, x.rewards, x.maskf, GAMMA, LAM),
            "get_advantages_and_returns: Python loop; mask zeroes r, V (no gap skip); no whiten",
            unavailable=why.get("openrlhf"),
        )
    )
    taps = torchrl_filter_taps(GAMMA * LAM, seqlen)
    impls.append(
        Impl(
            "torchrl.vec_gae",
            "gae",
            "peer",
            lambda x: peers.torchrl(
                GAMMA,
                LAM,
                x.values[..., None],
                x.next_values[..., None],
                x.rewards[..., None],
                x.done,
                x.done,
            ),
            f"conv1d, {taps}-tap filter (B*T*{taps} MACs); done flags only, no mask gaps",
            unavailable=why.get("torchrl"),
        )
    )
    impls.append(
        Impl(
            "slime.chunked_gae (transcription)",
            "gae",
            "peer",
            lambda x: slime_chunked_gae_transcription(x.rewards, x.values, GAMMA, LAM),
            "TRANSCRIBED slime method: CxC matmul per chunk + loop over chunks; no mask",
        )
    )

    impls.append(
        Impl(
            "nemo.two_pass (transcription)",
            "decoupled",
            "peer",
            lambda x: nemo_decoupled_gae_transcription(
                x.rewards, x.values, x.maskf, GAMMA, LAM_CRITIC, ALPHA
            ),
            "TRANSCRIBED NeMo-RL method: lambda=1 cumsum pass + masked loop, whiten, zero-fill",
        )
    )

    def torchrl_twice(x):
        # per-sequence lambda must broadcast against (B, T, 1); B = 1 takes the scalar path
        lam = x.lam_policy[:, None, None] if x.lam_policy.numel() > 1 else x.lam_policy
        adv, _ = peers.torchrl(
            GAMMA,
            lam,
            x.values[..., None],
            x.next_values[..., None],
            x.rewards[..., None],
            x.done,
            x.done,
        )
        _, ret = peers.torchrl(
            GAMMA,
            LAM_CRITIC,
            x.values[..., None],
            x.next_values[..., None],
            x.rewards[..., None],
            x.done,
            x.done,
        )
        return adv, ret

    def torchrl_twice_mem(batch, seqlen):
        # a lambda tensor builds (B, T, T+1) decay tables and a (B, T, T) gathered copy
        # of the TD errors; ~4 such buffers are alive at once
        return 4 * 4 * batch * seqlen * (seqlen + 1) if batch > 1 else 0

    impls.append(
        Impl(
            "torchrl.vec_gae x2",
            "decoupled",
            "peer",
            torchrl_twice,
            "per-seq lambda tensor (O(B*T^2) memory) + lambda=1 (T-tap conv1d, O(B*T^2) MACs)",
            scaling=2.0,
            mem_bytes=torchrl_twice_mem,
            unavailable=why.get("torchrl"),
        )
    )
    return impls


# --------------------------------------------------------------------------------------
# Checking our outputs against verl's


class Expected:
    """Reference outputs on input set 0, computed lazily (each verl call is a full loop)."""

    def __init__(self, x: Inputs, peers: Peers, use_verl: bool, why_not: str):
        self.x, self.peers, self.use_verl, self.why_not = x, peers, use_verl, why_not
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def source(self) -> str:
        v = (self.peers.versions or {}).get("verl")
        return f"verl {v}" if self.use_verl else f"vapo reference backend ({self.why_not})"

    def _verl(self, lam) -> tuple[torch.Tensor, torch.Tensor]:
        key = "lam_p" if isinstance(lam, torch.Tensor) else f"lam={lam}"
        if key not in self._cache:
            x = self.x
            self._cache[key] = self.peers.verl(x.rewards, x.values, x.maskf, GAMMA, lam)
        return self._cache[key]

    def get(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x
        whiten = which.endswith("+whiten")
        if not self.use_verl:
            if which.startswith("gae"):
                return vk.gae(
                    x.rewards,
                    x.values,
                    x.mask,
                    gamma=GAMMA,
                    lam=LAM,
                    whiten=whiten,
                    backend="reference",
                )
            return vk.decoupled_gae(
                x.rewards,
                x.values,
                x.mask,
                gamma=GAMMA,
                lam_critic=LAM_CRITIC,
                alpha=ALPHA,
                whiten=whiten,
                backend="reference",
            )
        # verl returns (whitened advantages, returns = unwhitened advantages + V)
        if which.startswith("gae"):
            adv_w, ret = self._verl(LAM)
            return (adv_w if whiten else ret - x.values), ret
        adv_w, ret_p = self._verl(x.lam_policy)
        _, ret_c = self._verl(LAM_CRITIC)
        return (adv_w if whiten else ret_p - x.values), ret_c


def compare(out, ref, mask) -> tuple[bool, float]:
    ok, worst = True, 0.0
    for got, want in zip(out, ref):
        got, want = got[mask].double(), want[mask].double()
        ok &= bool(torch.allclose(got, want, rtol=RTOL, atol=ATOL))
        worst = max(worst, float((got - want).abs().max()) if got.numel() else 0.0)
    return ok, worst


# --------------------------------------------------------------------------------------
# The run


def run_shape(
    batch, seqlen, args, device, peers, backends, flush, pc: H.PerCall | None = None
) -> list[H.Measurement]:
    """One shape's rows; with ``pc`` (a per-call shape) every row, and a bare torch op
    first, is timed on ``pc.threads`` threads over ``pc.reps`` calls."""
    with H.num_threads(pc.threads if pc else None):
        return _run_shape(batch, seqlen, args, device, peers, backends, flush, pc)


def _run_shape(batch, seqlen, args, device, peers, backends, flush, pc) -> list[H.Measurement]:
    shape = f"{batch}x{seqlen}"
    tokens = batch * seqlen
    t0 = time.perf_counter()
    sets = [make_inputs(batch, seqlen, device, args.seed + 1000 * i) for i in range(args.sets)]
    valid = int(sets[0].mask.sum())
    print(
        f"\n== {shape}: {tokens:,} tokens ({valid:,} valid in set 0), {args.sets} input sets, "
        f"made in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    reps, budget = (pc.reps, pc.budget_s) if pc else (args.max_reps, args.budget)
    bare: dict[str, H.Stats] = {}
    if pc:
        bare = H.bare_op_stats(sets[0].rewards, sets[0].values, device, pc)
        print(f"  per call: {pc.describe()}; {H.fmt_bare(bare)}", flush=True)
    with_ref = args.reference and tokens <= 65536
    impls = build_impls(backends, peers, seqlen, with_ref)
    prefix = sets[0].prefix(min(seqlen, PREFIX))

    def predict(impl: Impl) -> float:
        # best of up to 3 prefix calls (also the first warm-up): one call can land on a
        # moment when other work holds the cores
        best = math.inf
        for _ in range(3):
            best = min(best, H.time_once(lambda: impl.run(prefix), device))
            if best > 0.5:
                break
        return best * (seqlen / prefix.rewards.shape[1]) ** impl.scaling

    # Reference outputs: verl's, if verl can run here within the time limit.
    verl_impl = next(i for i in impls if i.name == "verl")
    verl_pred = None
    if verl_impl.unavailable:
        why_not = verl_impl.unavailable
    else:
        verl_pred = predict(verl_impl)
        why_not = (
            f"verl predicted {verl_pred:.0f} s per call > --max-call-s"
            if verl_pred > args.max_call_s
            else ""
        )
    expected = Expected(sets[0], peers, use_verl=not why_not, why_not=why_not)

    results = []
    per_call = {"threads": pc.threads, "reps": pc.reps} if pc else None
    for name, st in bare.items():
        m = H.Measurement(
            f"bare {name} (reference)", "gae", "bare", shape, batch, seqlen, tokens, stats=st
        )
        m.note = "one torch op on rewards and values: the fixed cost of any op call"
        m.extra.update(valid_tokens=valid, per_call=per_call)
        results.append(m)
    for impl in impls:
        m = H.Measurement(
            impl.name, impl.task, impl.kind, shape, batch, seqlen, tokens, note=impl.note
        )
        m.extra.update(valid_tokens=valid, per_call=per_call)
        results.append(m)
        if impl.unavailable:
            m.status, m.note = "skipped", impl.unavailable
            print(f"  skip {impl.name}: {impl.unavailable}", flush=True)
            continue
        if impl.mem_bytes and impl.mem_bytes(batch, seqlen) > args.max_mem_gb * 2**30:
            need = impl.mem_bytes(batch, seqlen) / 2**30
            m.status = "skipped"
            m.note = f"would need ~{need:,.0f} GiB (> {args.max_mem_gb:g} GiB): {impl.note}"
            print(f"  skip {impl.name}: {m.note}", flush=True)
            continue
        try:
            if impl.kind == "ours":
                # the check is the first full-size call; its time is the prediction
                t_start = time.perf_counter()
                out = impl.run(sets[0])
                H.sync(device)
                predicted = time.perf_counter() - t_start
                ok, err = compare(out, expected.get(impl.check), sets[0].mask)
                m.extra.update(verified=ok, verified_against=expected.source, max_abs_err=err)
                if not ok:
                    m.status = "failed_verification"
                    m.note = (
                        f"outputs differ from {expected.source} (max abs err {err:.3g}, "
                        f"rtol=atol={RTOL:g}): NOT TIMED"
                    )
                    print(f"  FAILED {impl.name}: {m.note}", flush=True)
                    continue
            else:
                predicted = verl_pred if impl is verl_impl else predict(impl)
                if predicted > args.max_call_s:
                    m.status = "skipped"
                    m.note = (
                        f"predicted {predicted:.0f} s per call > {args.max_call_s:g} s "
                        f"(best of 3 calls on a {prefix.rewards.shape[1]}-token prefix, "
                        f"scaled as T^{impl.scaling:g})"
                    )
                    print(f"  skip {impl.name}: {m.note}", flush=True)
                    continue
            warm = pc.warmup if pc else H.warmup_calls(predicted)
            times = H.time_calls(
                impl.run, sets, device, warmup=warm, reps=reps, flush=flush, budget_s=budget
            )
            m.stats, m.warmup = H.summarize(times), warm
            m.estimated = len(times) < args.min_reps
            if m.estimated:
                m.note = f"ESTIMATE from {len(times)} rep(s); " + m.note
        except Exception as e:  # noqa: BLE001 - one broken row must not lose the others
            m.status = "error"
            m.note = f"{type(e).__name__}: {e}"[:300]
            print(f"  ERROR {impl.name}: {m.note}", flush=True)
    print(f"   ({time.perf_counter() - t0:.1f} s for this shape)", flush=True)
    return results


def to_rows(results: list[H.Measurement], env: dict, copy_bps: float) -> list[dict]:
    rows = []
    by_shape: dict[str, list[H.Measurement]] = {}
    for m in results:
        by_shape.setdefault(m.shape, []).append(m)
    for shape, ms in by_shape.items():
        verl = next((m.median_s for m in ms if m.impl == "verl" and m.median_s), None)
        bare = next((m.median_s for m in ms if m.kind == "bare" and m.median_s), None)
        best = {}
        for task in ("gae", "decoupled"):
            peers = [m for m in ms if m.kind == "peer" and m.task == task and m.median_s]
            best[task] = min(peers, key=lambda m: m.median_s) if peers else None
        for m in ms:
            med = m.median_s
            b = best[m.task] if m.kind != "bare" else None
            row = {
                **env,
                "shape": shape,
                "batch": m.batch,
                "seqlen": m.seqlen,
                "tokens": m.tokens,
                "task": m.task,
                "impl": m.impl,
                "kind": m.kind,
                "status": m.status,
                "median_s": med,
                "iqr_s": m.stats.iqr_s if m.stats else None,
                "q1_s": m.stats.q1_s if m.stats else None,
                "q3_s": m.stats.q3_s if m.stats else None,
                "reps": m.stats.reps if m.stats else 0,
                "warmup": m.warmup,
                "estimated": m.estimated,
                **H.throughput_fields(m, BYTES_PER_TOKEN, copy_bps),
                "bytes_per_token": BYTES_PER_TOKEN,
                "copy_GB_s": copy_bps / 1e9,
                "speedup_vs_verl": verl / med if (verl and med and m.kind != "bare") else None,
                "per_call": m.extra.get("per_call"),
                "bare_op_s": bare,
                "over_bare_op": med / bare if (bare and med) else None,
                "best_peer": b.impl if b else None,
                "speedup_vs_best_peer": b.median_s / med if (b and med) else None,
                "verified": m.extra.get("verified"),
                "verified_against": m.extra.get("verified_against"),
                "max_abs_err": m.extra.get("max_abs_err"),
                "valid_tokens": m.extra.get("valid_tokens"),
                "transcription": "transcription" in m.impl,
                "note": m.note,
            }
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    headers = [
        "impl",
        "task",
        "median",
        "IQR",
        "reps",
        "Mtok/s",
        "GB/s@17B",
        "%copy",
        "x verl",
        "x best peer",
        "/ bare op",
        "check",
        "note",
    ]
    out = []
    for r in rows:
        check = {True: "ok", False: "FAIL", None: "-"}[r["verified"]]
        note = r["note"] if r["status"] != "ok" or r["kind"] != "ours" or r["estimated"] else ""
        out.append(
            [
                r["impl"],
                r["task"],
                H.fmt_time(r["median_s"]),
                H.fmt_time(r["iqr_s"]),
                str(r["reps"]) if r["reps"] else "-",
                H.fmt_num(r["tokens_per_s"] and r["tokens_per_s"] / 1e6, ".3g"),
                H.fmt_num(r["GB_s"], ".3g"),
                H.fmt_num(r["fraction_of_copy"] and 100 * r["fraction_of_copy"], ".3g", "%"),
                H.fmt_num(r["speedup_vs_verl"], ".3g", "x"),
                H.fmt_num(r["speedup_vs_best_peer"], ".3g", "x"),
                H.fmt_num(r["over_bare_op"], ".3g", "x"),
                check,
                note[:110],
            ]
        )
    return H.format_table(headers, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="small shapes, few reps (smoke test)")
    p.add_argument("--out", type=Path, default=HERE / "out", help="folder for JSON/PNG/TXT")
    p.add_argument("--shapes", help="override shapes, e.g. 8x1024,1x131072")
    p.add_argument(
        "--backends",
        help="our backends, comma-separated (default: all available "
        "on the device but reference; triton on CPU only if asked)",
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="also time our reference backend (only at shapes <= 65,536 tokens)",
    )
    p.add_argument("--sets", type=int, help="input sets to rotate among (default 3; quick 2)")
    p.add_argument("--budget", type=float, help="seconds of timed calls per impl and shape")
    p.add_argument("--max-reps", type=int, help="most timed calls per impl and shape")
    p.add_argument(
        "--min-reps", type=int, default=5, help="fewer reps than this are flagged as an estimate"
    )
    p.add_argument(
        "--max-call-s",
        type=float,
        default=30.0,
        help="skip a peer predicted to take longer than this per call",
    )
    p.add_argument(
        "--max-mem-gb",
        type=float,
        default=4.0,
        help="skip a peer whose working memory would exceed this",
    )
    p.add_argument(
        "--flush",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="overwrite a buffer larger than the last-level cache before each timed "
        "call (default: on for CUDA, off for CPU, see README)",
    )
    p.add_argument(
        "--no-validate",
        action="store_true",
        help="switch off vapo_kernels' data checks (VAPO_VALIDATE=0)",
    )
    H.add_per_call_args(p, PER_CALL_SHAPES, 500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    gpu = device.type == "cuda"
    args.sets = args.sets or (2 if args.quick else 3)
    args.budget = args.budget or (1.0 if args.quick else (5.0 if gpu else 12.0))
    args.max_reps = args.max_reps or (5 if args.quick else (100 if gpu else 50))
    if args.quick:
        args.min_reps = min(args.min_reps, 3)
    pc = H.PerCall(
        threads=args.per_call_threads,
        reps=args.per_call_reps or (30 if args.quick else 500),
        warmup=5 if args.quick else 20,
        budget_s=1.0 if args.quick else 5.0,
    )
    shapes = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    if args.no_validate:
        vk.set_validation(False)

    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = [b for b in vk.available_backends("gae", device) if b != "reference"]
        if device.type == "cpu" and "triton" in backends:
            backends.remove("triton")  # the interpreter's time means nothing
    env = H.environment(device)
    peers = load_peers()
    print(
        f"bench_gae on {env['device_name']} | torch {env['torch']} | triton {env['triton']}"
        f" | our backends: {', '.join(backends) or 'none'} | peers: "
        + ", ".join(f"{k} {v}" for k, v in peers.versions.items()),
        flush=True,
    )
    for k, why in (peers.why or {}).items():
        print(f"  peer {k} unavailable: {why}", flush=True)
    print(
        "  slime chunked_gae and NeMo-RL's two-pass GAE are not installable: their rows "
        "are TRANSCRIPTIONS of the published methods written in this script, not their code."
    )

    copy_bps = H.measure_copy_bandwidth(device, (64 if args.quick else 1024 if gpu else 256) << 20)
    print(
        f"  copy bandwidth (read + write) measured here: {copy_bps / 1e9:.1f} GB/s -> byte "
        f"floor {BYTES_PER_TOKEN} B/token = {BYTES_PER_TOKEN / copy_bps * 1e9:.3f} ns/token",
        flush=True,
    )
    if args.flush is None:
        args.flush = gpu
    flush = H.CacheFlusher(device, (16 << 20) if args.quick else None) if args.flush else None
    print(
        f"  timing: median of up to {args.max_reps} calls or {args.budget:g} s per row, "
        f"rotating {args.sets} input sets, cache flush between calls: "
        f"{'on' if flush else 'off'}; per-call shapes {PER_CALL_SHAPES}: {pc.describe()}",
        flush=True,
    )
    meta = {
        **env,
        "script": "benchmarks/bench_gae.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "copy_GB_s": copy_bps / 1e9,
        "peer_versions": peers.versions,
        "backends": backends,
        "validation": vk._ragged.validation_enabled(),
        "threads": torch.get_num_threads(),
        "params": {
            "gamma": GAMMA,
            "lam": LAM,
            "lam_critic": LAM_CRITIC,
            "alpha": ALPHA,
            "rtol": RTOL,
            "atol": ATOL,
            "sets": args.sets,
            "budget_s": args.budget,
            "max_reps": args.max_reps,
            "max_call_s": args.max_call_s,
            "flush": bool(args.flush),
            "per_call_shapes": PER_CALL_SHAPES,
            "per_call": vars(pc),
        },
    }

    t_all = time.perf_counter()
    rows: list[dict] = []
    text = []
    for batch, seqlen in shapes:
        shape_pc = pc if (batch, seqlen) in PER_CALL_SHAPES else None
        res = run_shape(batch, seqlen, args, device, peers, backends, flush, shape_pc)
        shape_rows = to_rows(res, env, copy_bps)
        rows += shape_rows
        block = (
            f"\n{batch}x{seqlen} on {env['device_name']} (byte floor "
            f"{H.fmt_time(shape_rows[0]['floor_s'])} at {copy_bps / 1e9:.1f} GB/s copy)"
            + (f"; PER CALL: {shape_pc.describe()}" if shape_pc else "")
            + "\n"
            + table(shape_rows)
        )
        text.append(block)
        print(block, flush=True)
    meta["wall_s"] = time.perf_counter() - t_all

    tag = device.type
    args.out.mkdir(parents=True, exist_ok=True)
    H.write_json(args.out / f"gae_{tag}.json", meta, rows)
    (args.out / f"gae_{tag}.txt").write_text("\n".join(text) + "\n")
    plotted = H.plot_throughput(
        [r for r in rows if r["status"] == "ok" and r["kind"] != "bare"],
        args.out / f"gae_{tag}.png",
        title=f"GAE tokens/s, {env['device_name']}, torch {env['torch']}, {env['timestamp']}",
    )
    print(
        f"\nwrote {args.out / f'gae_{tag}.json'}"
        + (f", {args.out / f'gae_{tag}.png'}" if plotted else " (no matplotlib: no plot)")
        + f" in {meta['wall_s']:.0f} s",
        flush=True,
    )

    bad = [
        r for r in rows if r["kind"] == "ours" and r["status"] in ("failed_verification", "error")
    ]
    for r in bad:
        print(f"!! {r['shape']} {r['impl']}: {r['status']}: {r['note']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
