"""GAE suite: our ``gae`` / ``decoupled_gae`` under each backend against the peers.

Padded (B, T) fp32 batches, ragged lengths in [T/2, T], three masked gaps per row
(tool tokens in a multi-turn response), garbage in every masked slot.

* ``gae`` (gamma 1, lambda 0.95): ours vs OpenRLHF's ``get_advantages_and_returns`` (loop;
  the mask zeroes r and V), TorchRL's ``vec_generalized_advantage_estimate`` (conv1d, done
  flags only) and slime's chunked method (a transcription: slime is not on PyPI).
* ``gae+whiten``: the same plus masked whitening of the advantages: ours (``whiten=True``)
  vs verl's ``compute_gae_advantage_return`` (loop + ``masked_whiten``).
* ``decoupled`` (VAPO: lambda_critic 1, length-adaptive lambda_policy, alpha 0.05): ours vs
  NeMo-RL's two-pass method without its whitening (a transcription: not installable) and
  TorchRL called twice.
* ``decoupled+whiten``: ours (``whiten=True``) vs NeMo-RL's two-pass method with its
  whitening.

Whitening is a task of its own so that a row which whitens is only ranked against rows
that whiten: the summary once paired our un-whitened decoupled GAE with NeMo's whitening
two-pass method.

Each row is checked against our reference in float64 on the same inputs, for the variant
the implementation computes (a peer without gap skipping against our "zero" mode, a peer
without a mask against the unmasked problem), on the valid tokens, rtol = atol = 1e-4.
Floor: 17 B/token (r, V fp32 + a 1-byte mask in; A, R fp32 out).
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import vapo_kernels as vk

from ..harness import Case, Check, Context, Floor, Impl, Peer, Suite, load_from_source

GAMMA, LAM = 1.0, 0.95
LAM_CRITIC, ALPHA = 1.0, 0.05
BYTES_PER_TOKEN = 17
RTOL = ATOL = 1e-4
MAX_MEM_BYTES = 4 << 30  # TorchRL's per-sequence lambda builds B x T x T tables
REFERENCE_MAX_TOKENS = 65536  # our PyTorch-loop reference is timed up to this size

SHAPES = {
    "cpu": [(8, 128), (8, 1024), (64, 4096), (512, 16384), (1, 131072)],
    "cuda": [(8, 128), (8, 1024), (64, 4096), (512, 16384), (1, 131072)],
    "quick": [(8, 128), (2, 256)],
}
PER_CALL_SHAPES = [(8, 128)]


@dataclass
class Inputs:
    rewards: torch.Tensor  # (B, T) fp32: small per-token terms + a terminal reward
    values: torch.Tensor
    mask: torch.Tensor  # (B, T) bool
    maskf: torch.Tensor  # the same as float32, as the peers take it
    lam_policy: torch.Tensor  # (B,) the length-adaptive lambda
    next_values: torch.Tensor  # values shifted left (TorchRL's API)
    done: torch.Tensor  # (B, T, 1) True at each row's end (TorchRL)


def make_inputs(batch: int, seqlen: int, device: torch.device, seed: int) -> Inputs:
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
    # a gap never takes a row's first two tokens (at T = 1 it always emptied the row), so
    # whitening, which needs two valid tokens, has them whenever B x T >= 2
    mask[:, :2] = True
    rewards = 0.01 * torch.randn(batch, seqlen, generator=g)  # KL-penalty-like terms
    last = seqlen - 1 - mask.flip(1).to(torch.int8).argmax(1)
    rewards[torch.arange(batch), last] += torch.randn(batch, generator=g)
    values = torch.randn(batch, seqlen, generator=g)
    lam_policy = vk.length_adaptive_lambda(mask.sum(1), ALPHA).to(torch.float32)
    next_values = torch.cat([values[:, 1:], torch.zeros(batch, 1)], dim=1)
    done = torch.zeros(batch, seqlen, 1, dtype=torch.bool)
    done[:, -1] = True
    x = Inputs(rewards, values, mask, mask.float(), lam_policy, next_values, done)
    return Inputs(**{k: v.to(device) for k, v in vars(x).items()})


# --------------------------------------------------------------------------------------
# Peers


def load_verl():
    """verl's ``compute_gae_advantage_return`` and the ``masked_whiten`` it calls, compiled
    from the installed source (``import verl`` pulls in ray and tensordict)."""
    from types import SimpleNamespace

    functional = load_from_source(
        "verl",
        "utils/torch_functional.py",
        ["masked_sum", "masked_mean", "masked_var", "masked_whiten"],
        {"torch": torch},
    )
    verl_f = SimpleNamespace(**{k: v for k, v in functional.items() if k.startswith("masked")})
    core = load_from_source(
        "verl",
        "trainer/ppo/core_algos.py",
        ["compute_gae_advantage_return"],
        {"torch": torch, "verl_F": verl_f},
    )
    return core["compute_gae_advantage_return"]


def load_openrlhf():
    """OpenRLHF's ``get_advantages_and_returns`` (a method that never reads ``self``),
    compiled from the installed source (its module imports ray, peft and deepspeed)."""
    ns = load_from_source(
        "openrlhf",
        "trainer/ppo_utils/experience_maker.py",
        ["get_advantages_and_returns"],
        {"torch": torch, "Tuple": tuple, "List": list},
    )
    return functools.partial(ns["get_advantages_and_returns"], None)


def load_torchrl():
    return importlib.import_module(
        "torchrl.objectives.value.functional"
    ).vec_generalized_advantage_estimate


PEERS = {
    "verl": Peer("verl", load_verl),
    "openrlhf": Peer("openrlhf", load_openrlhf),
    "torchrl": Peer("torchrl", load_torchrl),
}


def slime_chunked_gae_transcription(rewards, values, gamma: float, lambd: float, chunk: int = 128):
    """TRANSCRIPTION (not slime's code) of slime's ``chunked_gae`` method.

    Source read: THUDM/slime ``slime/utils/ppo_utils.py::chunked_gae`` (commit 501dae9),
    slime's default GAE. Same steps, so the same cost: deltas with V_T = 0; reverse time;
    pad T to a multiple of C; within each chunk a (C x C) upper-triangular matrix of powers
    of w = gamma*lambda turns the scan into one matmul; a Python loop over the chunks adds
    the carried state times w^(t+1). No mask: it does not skip masked gaps.
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
    advantages = torch.flip(out_rev[:, :length], dims=[1])
    return advantages, advantages + values


def _nemo_gae_pass(rewards, values, mask, gamma: float, lam):
    """One pass of NeMo-RL's ``GeneralizedAdvantageEstimator._compute_gae`` (transcribed)."""
    length = rewards.shape[-1]
    if gamma == 1.0 and not isinstance(lam, torch.Tensor) and lam == 1.0:
        # NeMo's fast path for gamma = lambda = 1: reward-to-go minus the next valid value
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


def nemo_decoupled_gae_transcription(rewards, values, mask, gamma, lam_value, alpha, whiten=True):
    """TRANSCRIPTION (not NeMo's code) of NeMo-RL's VAPO GAE, the two-pass method.

    Source read: NVIDIA-NeMo/RL ``nemo_rl/algorithms/advantage_estimator.py`` (commit
    00925dd): lambda_policy = clamp(1 - 1/clamp(alpha len, min=1), 0, 1); one pass for the
    returns with lambda_value, a second (masked loop) for the advantages; whitening with
    the masked mean of squares (biased variance, +1e-8); masked positions zero-filled.
    ``whiten=False``: the two passes alone (the advantages' normalization left out, as
    NeMo's ``normalize_advantages`` off leaves them).
    """
    resp_lens = mask.sum(dim=1).float()
    lam_policy = (1.0 - 1.0 / (alpha * resp_lens).clamp(min=1.0)).clamp(min=0.0, max=1.0)
    _, returns = _nemo_gae_pass(rewards, values, mask, gamma, lam_value)
    adv, _ = _nemo_gae_pass(rewards, values, mask, gamma, lam_policy)
    if not whiten:
        return torch.masked_fill(adv, ~(mask.bool()), 0), returns
    count = mask.sum() + 1e-8
    mean = (adv * mask).sum() / count
    var = ((adv - mean) ** 2 * mask).sum() / count
    adv = (adv - mean) * torch.rsqrt(var + 1e-8)
    return torch.masked_fill(adv, ~(mask.bool()), 0), returns


def torchrl_filter_taps(gamma_lambda: float, seqlen: int) -> int:
    """Length of TorchRL's geometric filter (it drops powers below 1e-7)."""
    if gamma_lambda >= 1.0:
        return seqlen
    return min(seqlen, int(math.log(1e-7) / math.log(gamma_lambda)))


# --------------------------------------------------------------------------------------
# float64 references, one per variant an implementation computes


def reference64(x: Inputs, expect: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = {k: getattr(x, k).double() for k in ("rewards", "values", "lam_policy")}
    r, v = d["rewards"], d["values"]
    ref = functools.partial(vk.gae, gamma=GAMMA, backend="reference")
    whiten = expect.endswith("+whiten")
    task = expect.removesuffix("+whiten")
    if task == "gae":
        return ref(r, v, x.mask, lam=LAM, whiten=whiten)
    if task == "gae:mask-zeroes":  # the mask zeroes r and V, the scan runs through gaps
        return ref(r, v, x.mask, lam=LAM, mask_mode="zero")
    if task == "gae:no-mask":
        return ref(r, v, None, lam=LAM)
    if task == "decoupled":
        return vk.decoupled_gae(
            r, v, x.mask, gamma=GAMMA, lam_critic=LAM_CRITIC, alpha=ALPHA,
            whiten=whiten, backend="reference",
        )
    if task == "decoupled:biased-whiten":  # NeMo whitens with the biased variance
        adv, ret = vk.decoupled_gae(
            r, v, x.mask, gamma=GAMMA, lam_critic=LAM_CRITIC, alpha=ALPHA, backend="reference"
        )
        adv = vk.masked_whiten(adv, x.mask, unbiased=False, backend="reference")
        return adv, ret
    if task == "decoupled:no-mask":
        adv, _ = ref(r, v, None, lam=d["lam_policy"])
        _, ret = ref(r, v, None, lam=LAM_CRITIC)
        return adv, ret
    raise KeyError(f"no reference for {expect!r}")


def make_check(x: Inputs):
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def check(impl: Impl, out) -> Check:
        if impl.expect not in cache:
            cache[impl.expect] = reference64(x, impl.expect)
        against = f"vapo reference, float64 ({impl.expect})"
        ok, worst = True, 0.0
        for got, want in zip(out, cache[impl.expect]):
            got = got.reshape(want.shape)[x.mask].double()
            want = want[x.mask]
            err = (got - want).abs().nan_to_num(nan=math.inf)
            ok &= bool((err <= ATOL + RTOL * want.abs()).all())
            worst = max(worst, float(err.max()) if err.numel() else 0.0)
        return Check(ok and len(out) == 2, worst, against, f"rtol=atol={RTOL:g}")

    return check


# --------------------------------------------------------------------------------------
# The implementations of one shape


def impls(batch: int, seqlen: int, ctx: Context, sets: list | None = None) -> list[Impl]:
    out: list[Impl] = []
    backends = list(ctx.backends["gae"])
    if batch * seqlen > REFERENCE_MAX_TOKENS and "reference" in backends and len(backends) > 1:
        backends.remove("reference")  # a PyTorch loop over T: the spec, not a contender
    for b in backends:
        for whiten in (False, True):
            w = "+whiten" if whiten else ""
            out.append(Impl(
                f"vapo.gae{w}[{b}]", f"gae{w}", "ours",
                lambda x, b=b, whiten=whiten: vk.gae(
                    x.rewards, x.values, x.mask, gamma=GAMMA, lam=LAM, whiten=whiten, backend=b
                ),
                "one fused scan" + (" + masked whitening (what verl's call returns)" if w else ""),
                expect=f"gae{w}",
            ))
            out.append(Impl(
                f"vapo.decoupled_gae{w}[{b}]", f"decoupled{w}", "ours",
                lambda x, b=b, whiten=whiten: vk.decoupled_gae(
                    x.rewards, x.values, x.mask, gamma=GAMMA, lam_critic=LAM_CRITIC,
                    alpha=ALPHA, whiten=whiten, backend=b,
                ),
                "one fused scan, both lambdas" + (" + masked whitening" if w else ""),
                expect=f"decoupled{w}",
            ))
    p = ctx.peers
    out.append(Impl(
        "verl", "gae+whiten", "peer",
        lambda x: p["verl"](x.rewards, x.values, x.maskf, GAMMA, LAM),
        "compute_gae_advantage_return: Python loop over T + masked_whiten",
        unavailable=ctx.missing("verl"), expect="gae+whiten",
    ))
    out.append(Impl(
        "openrlhf", "gae", "peer",
        lambda x: p["openrlhf"](x.values, x.rewards, x.maskf, GAMMA, LAM),
        "get_advantages_and_returns: Python loop; the mask zeroes r, V (no gap skip)",
        unavailable=ctx.missing("openrlhf"), expect="gae:mask-zeroes",
    ))
    taps = torchrl_filter_taps(GAMMA * LAM, seqlen)

    def torchrl(x, lam):
        return p["torchrl"](
            GAMMA, lam, x.values[..., None], x.next_values[..., None],
            x.rewards[..., None], x.done, x.done,
        )

    out.append(Impl(
        "torchrl.vec_gae", "gae", "peer", lambda x: torchrl(x, LAM),
        f"conv1d, {taps}-tap filter; done flags only, no mask",
        unavailable=ctx.missing("torchrl"), expect="gae:no-mask",
    ))
    out.append(Impl(
        "slime.chunked_gae (transcription)", "gae", "peer",
        lambda x: slime_chunked_gae_transcription(x.rewards, x.values, GAMMA, LAM),
        "TRANSCRIBED slime method (not on PyPI): CxC matmul per chunk; no mask",
        expect="gae:no-mask",
    ))
    out.append(Impl(
        "nemo.two_pass (transcription)", "decoupled", "peer",
        lambda x: nemo_decoupled_gae_transcription(
            x.rewards, x.values, x.maskf, GAMMA, LAM_CRITIC, ALPHA, whiten=False
        ),
        "TRANSCRIBED NeMo-RL method (not installable): cumsum pass + masked loop",
        expect="decoupled",  # checked on valid tokens only: its zero-filled slots are not read
    ))
    out.append(Impl(
        "nemo.two_pass+whiten (transcription)", "decoupled+whiten", "peer",
        lambda x: nemo_decoupled_gae_transcription(
            x.rewards, x.values, x.maskf, GAMMA, LAM_CRITIC, ALPHA
        ),
        "TRANSCRIBED NeMo-RL method (not installable): cumsum pass + masked loop, whiten",
        expect="decoupled:biased-whiten",
    ))

    def torchrl_twice(x):
        # a per-sequence lambda must broadcast against (B, T, 1); B = 1 takes the scalar path
        lam = x.lam_policy[:, None, None] if x.lam_policy.numel() > 1 else x.lam_policy
        adv, _ = torchrl(x, lam)
        _, ret = torchrl(x, LAM_CRITIC)
        return adv, ret

    # a lambda tensor builds (B, T, T+1) decay tables; ~4 such fp32 buffers live at once
    need = 16 * batch * seqlen * (seqlen + 1) if batch > 1 else 0

    def torchrl_skip():
        if need > MAX_MEM_BYTES:
            return f"would need ~{need / 2**30:,.0f} GiB (> {MAX_MEM_BYTES / 2**30:g} GiB)"
        # One sequence takes TorchRL's scalar-lambda path, whose filter has no taps at
        # lambda = 0 (alpha * length <= 1): an IndexError inside TorchRL.
        if batch == 1 and any(float(x.lam_policy.min()) == 0 for x in sets or ()):
            return "TorchRL's vec_gae fails at lambda = 0 (alpha * length <= 1)"
        return None

    out.append(Impl(
        "torchrl.vec_gae x2", "decoupled", "peer", torchrl_twice,
        "per-seq lambda tensor (O(B T^2) memory) + lambda=1 (T-tap conv1d)",
        unavailable=ctx.missing("torchrl"), expect="decoupled:no-mask",
        skip_if=torchrl_skip,
    ))
    return out


def build_case(shape: tuple[int, ...], ctx: Context) -> Case:
    batch, seqlen = shape
    sets = [make_inputs(batch, seqlen, ctx.device, ctx.seed + 1000 * i) for i in range(ctx.sets)]
    tokens = batch * seqlen
    per_call = shape in PER_CALL_SHAPES
    rows = impls(batch, seqlen, ctx, sets)
    if per_call:
        rows.insert(0, Impl(
            "bare torch.add", "gae", "bare", lambda x: torch.add(x.rewards, x.values),
            "one torch op on rewards and values: the fixed cost of any op call",
        ))
    floor = Floor(
        f"{BYTES_PER_TOKEN} B/token (r, V fp32 + mask in; A, R fp32 out) at copy bandwidth",
        bytes=BYTES_PER_TOKEN * tokens,
    )
    return Case(
        "gae", f"{batch}x{seqlen}", tokens, sets, rows,
        {t: floor for t in ("gae", "gae+whiten", "decoupled", "decoupled+whiten")},
        make_check(sets[0]), per_call=per_call,
    )


SUITE = Suite(
    name="gae",
    description="GAE and VAPO's decoupled GAE on padded (B, T) fp32 batches",
    shapes=SHAPES,
    per_call_shapes=PER_CALL_SHAPES,
    families=("gae",),
    peers=PEERS,
    build_case=build_case,
    shape_forms=("BxT",),
    shape_problem=lambda s: "whitening needs two tokens: B x T >= 2" if s[0] * s[1] < 2 else None,
    set_bytes=lambda shape: BYTES_PER_TOKEN * shape[0] * shape[1],
)
