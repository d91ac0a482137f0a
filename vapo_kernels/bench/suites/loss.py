"""Loss suite: PPO / VAPO losses, forward + backward, ours against the peers' loss functions.

Shapes are of three kinds (``kind:dims`` on the command line):

* ``tokens:BxT`` - padded (B, T) fp32 log-probs, a bool mask (ragged lengths, one masked
  gap per row). Tasks ``policy`` (Clip-Higher 0.2 / 0.28, dual clip 3, token-mean): ours
  (``policy_loss``, each backend) vs verl's ``compute_policy_loss_vanilla`` (eager and
  under ``torch.compile``) and OpenRLHF's ``PolicyLoss``; ``policy+value`` (plus the
  clipped value loss, clip 0.5, vf_coef 0.5): ours (``vapo_loss`` with values, one pass) vs
  verl's policy + ``compute_value_loss`` and OpenRLHF's ``PolicyLoss`` + ``ValueLoss``.
* ``logits:NxV`` - task ``logits``: from bf16 logits (B, T, V) to the policy loss and the
  logits' gradient, per-sequence advantages: ours (``policy_loss_from_logits``, also
  in-place, and ``token_logprobs`` + ``policy_loss``) vs ``log_softmax(logits.float())
  .gather()`` + verl's policy loss.
* ``hidden:NxVxH`` - task ``hidden``: from bf16 hidden states and the LM head: ours
  (``policy_loss_from_hidden``; matmul + our in-place from-logits loss) vs matmul + the
  PyTorch / verl path (bf16 matmul, and fp32 matmul on upcast copies, as ours computes: a
  CPU without bf16 units runs the bf16 one several times slower) and Liger's
  ``LigerFusedLinearGRPOLoss`` (no dual clip: checked against the reference without it).

Every row is timed forward + backward and checked first against our reference backend in
float64 (float32 on CUDA for the N x V parts): the loss within rtol 1e-4 + atol 1e-5; token
tasks every gradient element (times the valid-token count) within the same; logits /
hidden tasks each gradient within 1e-2 relative L2 error (3e-2 for rows that round the
logits to bf16 themselves, checked against the reference on those bf16 logits), and each
row of each gradient (token rows of the logits / hidden states, vocab rows of the weight)
within 0.05 of its own norm (0.25 on bf16 logits; see ``harness.row_rel_error``), so that
one wrong row fails at any N. Inputs
keep every log-ratio (value step, value-loss tie) off the points where the gradient jumps.
Floors: 17 B/token (policy), 33 B/token (policy + value), 2 V elt + 17 B/token (logits) at
the copy bandwidth; 6 N V H FLOP (hidden) at the fastest bare matmul's rate.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import vapo_kernels as vk

from ..harness import (
    Case,
    Check,
    Context,
    Floor,
    Impl,
    Peer,
    Suite,
    load_from_source,
    private_activation,
    row_rel_error,
    shape_label,
)

CLIP_LOW, CLIP_HIGH, DUAL_CLIP = 0.2, 0.28, 3.0
VALUE_CLIP, VF_COEF = 0.5, 0.5
POLICY_KW = {"clip_low": CLIP_LOW, "clip_high": CLIP_HIGH, "dual_clip": DUAL_CLIP}
TOKEN_BYTES = {"policy": 17, "policy+value": 33}
LOG_RATIO_KINKS = (math.log(1 - CLIP_LOW), math.log(1 + CLIP_HIGH), math.log(DUAL_CLIP))
TOKEN_MARGIN, LOGIT_MARGIN = 1e-4, 1e-3
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5  # on gradient x valid tokens (O(1) numbers)
BF16_GRAD_REL, BF16_LOGITS_GRAD_REL = 1e-2, 3e-2
# each gradient row's error over max(its norm, ROW_FLOOR x the RMS row norm), see
# harness.row_rel_error: a dropped or misplaced row scores ~1
ROW_GRAD_REL = {"exact": 0.05, "bf16_logits": 0.25}  # measured: every row <= 0.006 on CPU
ROW_FLOOR = 0.1
LOGIT_SEQLEN = 1024  # logits / hidden rows are B sequences of up to this many tokens
BOOST_MAX, P_PREFERRED = 12.0, 0.7
DTYPE = torch.bfloat16

SHAPES = {
    "cpu": [("tokens", 8, 128), ("tokens", 64, 4096), ("tokens", 256, 4096), ("tokens", 1024, 4096),
            ("logits", 1024, 32768), ("logits", 2048, 32768), ("hidden", 1024, 32768, 256)],
    "cuda": [("tokens", b, 4096) for b in (256, 512, 1024, 2048)]
    + [("logits", n, 151936) for n in (16384, 32768, 65536)]
    + [("hidden", n, 151936, 4096) for n in (16384, 32768, 65536)],
    "quick": [("tokens", 8, 128), ("tokens", 4, 512), ("logits", 128, 1024), ("hidden", 64, 512, 16)],
}
PER_CALL_SHAPES = [("tokens", 8, 128)]


# --------------------------------------------------------------------------------------
# Inputs


def off_kinks(x: Tensor, kinks, margin: float) -> Tensor:
    """``x`` with every element within ``margin`` of a kink moved to kink + 2 margin: at a
    kink the gradient jumps and two correct float32 answers may land on either side."""
    for k in kinks:
        x = torch.where((x - k).abs() < margin, torch.full_like(x, k + 2 * margin), x)
    return x


def ragged_mask(batch: int, seqlen: int, g: torch.Generator, min_frac: float) -> Tensor:
    """Lengths in [min_frac T, T] (row 0 full), right-padded, one masked gap of up to T/32."""
    lengths = torch.randint(max(1, int(seqlen * min_frac)), seqlen + 1, (batch,), generator=g)
    lengths[0] = seqlen
    pos = torch.arange(seqlen)
    mask = pos[None, :] < lengths[:, None]
    start = (torch.rand(batch, generator=g) * lengths).long()
    stop = start + torch.randint(1, max(2, seqlen // 32), (batch,), generator=g)
    mask &= ~((pos[None, :] >= start[:, None]) & (pos[None, :] < stop[:, None]))
    mask[:, 0] = True
    return mask


@dataclass
class TokenInputs:
    logp: Tensor  # (B, T) fp32 leaf
    old_logp: Tensor
    adv: Tensor
    mask: Tensor
    maskf: Tensor
    values: Tensor  # leaf
    old_values: Tensor
    returns: Tensor

    @property
    def valid(self) -> int:
        return int(self.mask.sum())


def make_token_inputs(batch: int, seqlen: int, device, seed: int) -> TokenInputs:
    """Old log-probs -Exp(1); log-ratios 0.25 randn with 1% anywhere in [-3, 3] (both clips
    and the dual clip fire); values within ~0.5 of the old values (the value clip fires)."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, seqlen)
    mask = ragged_mask(batch, seqlen, g, 0.25)
    old = -torch.empty(shape).exponential_(generator=g)
    d = 0.25 * torch.randn(shape, generator=g)
    jump = torch.rand(shape, generator=g) < 0.01
    d = torch.where(jump, 6 * torch.rand(shape, generator=g) - 3, d)
    adv = torch.randn(shape, generator=g)
    old_v = torch.randn(shape, generator=g)
    values = old_v + 0.5 * torch.randn(shape, generator=g)
    returns = old_v + torch.randn(shape, generator=g)
    d = off_kinks(d, LOG_RATIO_KINKS, TOKEN_MARGIN)
    step = off_kinks(values - old_v, (-VALUE_CLIP, VALUE_CLIP), TOKEN_MARGIN)
    values = old_v + step
    mid = (values + old_v + step.clamp(-VALUE_CLIP, VALUE_CLIP)) / 2
    returns = torch.where(
        step.abs() > VALUE_CLIP, mid + off_kinks(returns - mid, (0.0,), TOKEN_MARGIN), returns
    )
    return TokenInputs(
        (old + d).to(device).requires_grad_(), old.to(device), adv.to(device), mask.to(device),
        mask.float().to(device), values.to(device).requires_grad_(), old_v.to(device),
        returns.to(device),
    )


@dataclass
class LogitInputs:
    targets: Tensor  # (B, T) int64
    old_logp: Tensor  # (B, T) fp32
    adv: Tensor  # (B, T), constant along each sequence
    adv_seq: Tensor  # (B,) Liger's form
    mask: Tensor
    maskf: Tensor
    logits: Tensor | None = None  # (B, T, V) leaf
    hidden: Tensor | None = None  # (B, T, H) leaf
    weight: Tensor | None = None  # (V, H) leaf

    @property
    def valid(self) -> int:
        return int(self.mask.sum())


def make_logit_inputs(n, v, h, device, seed, weight=None) -> LogitInputs:
    """Logits (h None) or hidden states + LM head; old log-probs = the current ones (from
    the bf16 logits; from hidden, also from fp32 logits) + 0.25 randn, off the kinks."""
    batch = max(1, n // LOGIT_SEQLEN)
    seqlen = n // batch
    if batch * seqlen != n:
        raise ValueError(f"N = {n} is not a multiple of {LOGIT_SEQLEN}")
    gc_ = torch.Generator().manual_seed(seed)
    mask = ragged_mask(batch, seqlen, gc_, 0.5).to(device)
    adv_seq = torch.randn(batch, generator=gc_).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    preferred = torch.randint(0, v, (n,), generator=g, device=device)
    boost = torch.rand(n, generator=g, device=device) * BOOST_MAX
    uniform = torch.randint(0, v, (n,), generator=g, device=device)
    targets = torch.where(torch.rand(n, generator=g, device=device) < P_PREFERRED, preferred, uniform)
    chunk = max(1, (64 << 20) // (v * 4))
    logp = torch.empty(n, device=device)
    variants = [logp]
    logits = hidden = None
    if h is None:
        logits = torch.empty(n, v, dtype=DTYPE, device=device)
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            z = torch.randn(r1 - r0, v, generator=g, device=device)
            z[torch.arange(r1 - r0, device=device), preferred[r0:r1]] += boost[r0:r1]
            logits[r0:r1] = z
            zf = logits[r0:r1].float()
            logp[r0:r1] = zf.gather(1, targets[r0:r1, None]).squeeze(1) - zf.logsumexp(-1)
        logits = logits.view(batch, seqlen, v).requires_grad_()
    else:
        if weight is None:  # rows of norm ~1: z_v = h . W_v has the noise of h
            weight = (torch.randn(v, h, generator=g, device=device) / math.sqrt(h)).to(DTYPE)
            weight.requires_grad_()
        w = weight.detach()
        wp = w[preferred].float()
        hid = torch.randn(n, h, generator=g, device=device)
        hid += boost[:, None] * wp / (wp * wp).sum(-1, keepdim=True)
        hid = hid.to(DTYPE)
        exact = torch.empty_like(logp)
        variants.append(exact)
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            y = targets[r0:r1, None]
            for out, zf in ((logp, (hid[r0:r1] @ w.T).float()), (exact, hid[r0:r1].float() @ w.float().T)):
                out[r0:r1] = zf.gather(1, y).squeeze(1) - zf.logsumexp(-1)
        hidden = hid.view(batch, seqlen, h).requires_grad_()
    old = (logp + 0.25 * torch.randn(n, generator=g, device=device)).clamp(max=0)
    for _ in range(100):  # lowering old raises every variant's log-ratio: repeat until clear
        near = torch.zeros_like(old, dtype=torch.bool)
        for lp in variants:
            for k in LOG_RATIO_KINKS:
                near |= (lp - old - k).abs() < LOGIT_MARGIN
        if not bool(near.any()):
            break
        old = torch.where(near, old - 3 * LOGIT_MARGIN, old)
    return LogitInputs(
        targets.view(batch, seqlen), old.view(batch, seqlen),
        adv_seq[:, None].expand(batch, seqlen).contiguous(), adv_seq, mask, mask.float(),
        logits, hidden, weight,
    )


# --------------------------------------------------------------------------------------
# Peers


@dataclass(frozen=True)
class VerlActorConfig:
    """What ``compute_policy_loss_vanilla`` reads from verl's ``ActorConfig``, read the same
    way (verl's own class needs a whole trainer config)."""

    clip_ratio: float = CLIP_LOW
    clip_ratio_low: float = CLIP_LOW
    clip_ratio_high: float = CLIP_HIGH
    clip_ratio_c: float = DUAL_CLIP
    global_batch_info: dict = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


class _NotThisConfig:
    """Stands for verl's AlgoConfig (the function asserts its config is not one)."""


def load_verl():
    """verl's ``compute_policy_loss_vanilla`` and ``compute_value_loss`` compiled from the
    installed ``core_algos.py`` (``import verl`` pulls in ray and tensordict)."""
    from types import SimpleNamespace

    names = ("masked_sum", "masked_mean", "clip_by_value")
    functional = load_from_source("verl", "utils/torch_functional.py", list(names), {"torch": torch})
    ns = {
        "torch": torch, "verl_F": SimpleNamespace(**{k: functional[k] for k in names}),
        "Optional": Optional, "Any": Any, "ActorConfig": VerlActorConfig,
        "AlgoConfig": _NotThisConfig,
    }
    load_from_source(
        "verl", "trainer/ppo/core_algos.py",
        ["agg_loss", "compute_policy_loss_vanilla", "compute_value_loss"], ns,
    )
    return ns["compute_policy_loss_vanilla"], ns["compute_value_loss"]


def load_openrlhf():
    """OpenRLHF's ``PolicyLoss`` and ``ValueLoss`` compiled from the installed
    ``openrlhf/models/loss.py`` (``openrlhf.models`` imports deepspeed, peft, flash-attn)."""
    utils = load_from_source(
        "openrlhf", "models/utils.py", ["masked_mean"], {"torch": torch, "Optional": Optional}
    )
    ns = {
        "torch": torch, "nn": torch.nn, "F": F, "dist": torch.distributed,
        "Optional": Optional, "Tuple": Tuple, "masked_mean": utils["masked_mean"],
    }
    load_from_source("openrlhf", "models/loss.py", ["aggregate_loss", "PolicyLoss", "ValueLoss"], ns)
    return ns["PolicyLoss"], ns["ValueLoss"]


def load_liger():
    return importlib.import_module("liger_kernel.chunked_loss").LigerFusedLinearGRPOLoss


PEERS = {
    "verl": Peer("verl", load_verl),
    "openrlhf": Peer("openrlhf", load_openrlhf),
    "liger": Peer("liger-kernel", load_liger),
}

_COMPILED: dict[str, Any] = {}


def compiled(name: str, fn):
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn)
    return _COMPILED[name]


def torch_logp(z: Tensor, y: Tensor) -> Tensor:
    """PyTorch log-probs of the targets in fp32 (a bf16 log_softmax fails an fp32 check)."""
    return torch.log_softmax(z.float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def train_step(loss_fn, leaves_fn):
    """What a row times: the loss, then its gradients with respect to the leaves."""

    def run(x):
        with torch.enable_grad():
            loss = loss_fn(x)
            grads = torch.autograd.grad(loss, leaves_fn(x))
        return loss.detach(), grads

    return run


def restored_copies(sets: list[LogitInputs]):
    """For an in-place backward: private logits (a non-leaf, see ``private_activation``),
    restored (untimed) before each call."""
    copies = [replace(s, logits=private_activation(s.logits)) for s in sets]

    def inputs(i: int):
        k = i % len(sets)
        with torch.no_grad():
            copies[k].logits.copy_(sets[k].logits.detach())
        return copies[k]

    return inputs


# --------------------------------------------------------------------------------------
# The implementations


def token_impls(task: str, ctx: Context) -> list[Impl]:
    p, miss = ctx.peers, ctx.missing
    cfg = VerlActorConfig()
    verl_pg, verl_vf = p.get("verl", (None, None))
    orl_policy, orl_value = p.get("openrlhf", (None, None))
    version = ctx.peer_versions
    impls = []
    if task == "policy":
        leaves = lambda x: [x.logp]  # noqa: E731
        for b in ctx.backends["loss"]:
            impls.append(Impl(
                f"vapo.policy_loss[{b}]", task, "ours",
                train_step(lambda x, b=b: vk.policy_loss(
                    x.logp, x.old_logp, x.adv, x.mask, **POLICY_KW, backend=b)[0], leaves),
                "one pass: loss, metrics and the gradient"))

        def verl(x, fn=None):
            return (fn or verl_pg)(x.old_logp, x.logp, x.adv, x.maskf, "token-mean", cfg)[0]

        pl = orl_policy(clip_eps_low=CLIP_LOW, clip_eps_high=CLIP_HIGH, dual_clip=DUAL_CLIP) if orl_policy else None
        impls += [
            Impl("verl", task, "peer", train_step(verl, leaves),
                 f"verl {version.get('verl')} compute_policy_loss_vanilla (its metric .item() syncs included)",
                 miss("verl")),
            Impl("verl+torch.compile", task, "peer",
                 train_step(lambda x: verl(x, compiled("verl_pg", verl_pg)), leaves),
                 "the same under torch.compile (compile not timed)",
                 miss("verl") or ctx.compile_why, slow_first_call=True),
            Impl("openrlhf", task, "peer",
                 train_step(lambda x: pl(x.logp, x.old_logp, x.adv, action_mask=x.maskf)[0], leaves),
                 f"openrlhf {version.get('openrlhf')} PolicyLoss (token_level_loss)", miss("openrlhf")),
        ]
        return impls

    leaves = lambda x: [x.logp, x.values]  # noqa: E731
    for b in ctx.backends["loss"]:
        impls.append(Impl(
            f"vapo.vapo_loss[{b}]", task, "ours",
            train_step(lambda x, b=b: vk.vapo_loss(
                x.logp, x.old_logp, x.adv, x.mask, values=x.values, old_values=x.old_values,
                returns=x.returns, value_clip=VALUE_CLIP, vf_coef=VF_COEF, lm_coef=0.0,
                **POLICY_KW, backend=b)[0], leaves),
            "policy + value in one pass"))

    def verl_pv(old, logp, adv, maskf, values, returns, old_values):
        pg, _ = verl_pg(old, logp, adv, maskf, "token-mean", cfg)
        vf, _ = verl_vf(values, returns, old_values, maskf, VALUE_CLIP, "token-mean")
        return pg + VF_COEF * vf

    def verl_args(x):
        return (x.old_logp, x.logp, x.adv, x.maskf, x.values, x.returns, x.old_values)

    # built once, as a trainer does (building them in the timed call added their
    # constructors' cost to the peer's per-call time)
    pl = orl_policy(clip_eps_low=CLIP_LOW, clip_eps_high=CLIP_HIGH, dual_clip=DUAL_CLIP) if orl_policy else None
    vl = orl_value(clip_eps=VALUE_CLIP) if orl_value else None

    def openrlhf_pv(x):
        pg = pl(x.logp, x.old_logp, x.adv, action_mask=x.maskf)[0]
        return pg + VF_COEF * vl(x.values, x.old_values, x.returns, action_mask=x.maskf)

    impls += [
        Impl("verl", task, "peer", train_step(lambda x: verl_pv(*verl_args(x)), leaves),
             "compute_policy_loss_vanilla + compute_value_loss", miss("verl")),
        Impl("verl+torch.compile", task, "peer",
             train_step(lambda x: compiled("verl_pv", verl_pv)(*verl_args(x)), leaves),
             "the same two calls under one torch.compile",
             miss("verl") or ctx.compile_why, slow_first_call=True),
        Impl("openrlhf", task, "peer", train_step(openrlhf_pv, leaves),
             "PolicyLoss + ValueLoss", miss("openrlhf")),
    ]
    return impls


def logit_impls(task: str, ctx: Context) -> list[Impl]:
    p, miss = ctx.peers, ctx.missing
    cfg = VerlActorConfig()
    verl_pg = p.get("verl", (None, None))[0]

    def verl_on(logp, x):
        return verl_pg(x.old_logp, logp, x.adv, x.maskf, "token-mean", cfg)[0]

    impls = []
    if task == "logits":
        leaves = lambda x: [x.logits]  # noqa: E731
        for b in ctx.backends["loss"]:
            impls += [
                Impl(f"vapo.policy_loss_from_logits[{b}]", task, "ours",
                     train_step(lambda x, b=b: vk.policy_loss_from_logits(
                         x.logits, x.targets, x.old_logp, x.adv, x.mask, **POLICY_KW, backend=b)[0], leaves),
                     "gradient of the logits written in the forward"),
                Impl(f"vapo.policy_loss_from_logits(inplace)[{b}]", task, "ours",
                     train_step(lambda x, b=b: vk.policy_loss_from_logits(
                         x.logits.view_as(x.logits), x.targets, x.old_logp, x.adv, x.mask,
                         **POLICY_KW, inplace_backward=True, backend=b)[0], leaves),
                     "gradient written over the logits (restored, untimed, between calls)",
                     prepare=restored_copies),
                Impl(f"vapo.token_logprobs+policy_loss[{b}]", task, "ours",
                     train_step(lambda x, b=b: vk.policy_loss(
                         vk.token_logprobs(x.logits, x.targets, mask=x.mask, backend=b),
                         x.old_logp, x.adv, x.mask, **POLICY_KW, backend=b)[0], leaves),
                     "two ops in sequence, autograd between them"),
            ]
        impls.append(Impl(
            "torch log_softmax.gather + verl", task, "peer",
            train_step(lambda x: verl_on(torch_logp(x.logits, x.targets), x), leaves),
            "log_softmax(logits.float()).gather(); compute_policy_loss_vanilla", miss("verl")))
        return impls

    leaves = lambda x: [x.hidden, x.weight]  # noqa: E731
    for b in ctx.backends["loss"]:
        impls += [
            Impl(f"vapo.policy_loss_from_hidden[{b}]", task, "ours",
                 train_step(lambda x, b=b: vk.policy_loss_from_hidden(
                     x.hidden, x.weight, x.targets, x.old_logp, x.adv, x.mask, **POLICY_KW, backend=b)[0], leaves),
                 "fused LM head: no N x V tensor, forward or backward"),
            Impl(f"matmul + vapo.policy_loss_from_logits(inplace)[{b}]", task, "ours",
                 train_step(lambda x, b=b: vk.policy_loss_from_logits(
                     x.hidden @ x.weight.T, x.targets, x.old_logp, x.adv, x.mask, **POLICY_KW,
                     inplace_backward=True, backend=b)[0], leaves),
                 "bf16 logits from torch's matmul, their gradient in place", expect="bf16_logits"),
        ]
    impls.append(Impl(
        "matmul + torch log_softmax.gather + verl", task, "peer",
        train_step(lambda x: verl_on(torch_logp(x.hidden @ x.weight.T, x.targets), x), leaves),
        "bf16 logits; log_softmax(.float()).gather(); compute_policy_loss_vanilla",
        miss("verl"), expect="bf16_logits"))
    if DTYPE != torch.float32:
        # Ours upcasts each weight tile to fp32; a CPU without bf16 units runs torch's bf16
        # matmul several times slower than its fp32 one, so the bf16 peer alone would win
        # the comparison on a dtype handicap. This peer upcasts as ours does.
        impls.append(Impl(
            "matmul (fp32) + torch log_softmax.gather + verl", task, "peer",
            train_step(lambda x: verl_on(torch_logp(x.hidden.float() @ x.weight.float().T, x.targets), x),
                       leaves),
            "hidden.float() @ weight.float().T (fp32 logits); log_softmax.gather(); "
            "compute_policy_loss_vanilla", miss("verl")))
    liger_why, liger_loss = miss("liger"), None
    if liger_why is None:
        try:
            liger_loss = p["liger"](beta=0.0, use_ref_model=False, epsilon_low=CLIP_LOW,
                                    epsilon_high=CLIP_HIGH, loss_type="dapo", temperature=1.0)
        except Exception as e:  # noqa: BLE001 - its constructor changes between versions
            liger_why = f"LigerFusedLinearGRPOLoss(...) failed: {type(e).__name__}: {e}"

    def liger(x):
        out = liger_loss(x.hidden, x.weight, x.targets, x.maskf, x.adv_seq, old_per_token_logps=x.old_logp)
        return out[0] if isinstance(out, (tuple, list)) else out

    impls.append(Impl(
        "liger.fused_linear_grpo", task, "peer", train_step(liger, leaves),
        f"liger-kernel {ctx.peer_versions.get('liger')}, loss_type='dapo', beta 0; NO dual clip "
        "(checked against the reference without it)", liger_why, expect="bf16_logits,no_dual"))
    return impls


# --------------------------------------------------------------------------------------
# Checks


def _loss_ok(loss: float, want: float) -> bool:
    return math.isfinite(loss) and abs(loss - want) <= LOSS_ATOL + LOSS_RTOL * abs(want)


def token_check(x: TokenInputs, task: str):
    """The float64 reference loss and gradients of set 0; every gradient element checked."""
    d = lambda t: t.detach().double()  # noqa: E731
    lp = d(x.logp).requires_grad_()
    with torch.enable_grad():
        if task == "policy":
            loss, _ = vk.policy_loss(lp, d(x.old_logp), d(x.adv), x.mask, **POLICY_KW, backend="reference")
            want_grads = torch.autograd.grad(loss, [lp])
        else:
            v = d(x.values).requires_grad_()
            loss, _ = vk.vapo_loss(
                lp, d(x.old_logp), d(x.adv), x.mask, values=v, old_values=d(x.old_values),
                returns=d(x.returns), value_clip=VALUE_CLIP, vf_coef=VF_COEF, lm_coef=0.0,
                **POLICY_KW, backend="reference",
            )
            want_grads = torch.autograd.grad(loss, [lp, v])
    want_loss, scale = float(loss.detach()), float(x.valid)

    def check(impl: Impl, out) -> Check:
        got_loss, grads = out
        ok = _loss_ok(float(got_loss), want_loss) and len(grads) == len(want_grads)
        worst = 0.0
        for g, want in zip(grads, want_grads):
            got, want = g.double() * scale, want * scale
            err = (got - want).abs().nan_to_num(nan=math.inf)
            ok &= bool((err <= GRAD_ATOL + GRAD_RTOL * want.abs()).all())
            worst = max(worst, float(err.max()))
        detail = f"loss error {abs(float(got_loss) - want_loss):.3g}, gradient x tokens error {worst:.3g}"
        return Check(ok, max(worst, abs(float(got_loss) - want_loss)), "vapo reference, float64", detail)

    return check


class LogitCheck:
    """Logits / hidden tasks: the reference on set 0 in row chunks, per variant asked for
    (exact or bf16-rounded logits, dual clip or not)."""

    def __init__(self, x: LogitInputs, device: torch.device):
        self.x = x
        self.cd = torch.float64 if device.type == "cpu" else torch.float32
        self.chunk_bytes = (256 << 20) if device.type == "cpu" else (1 << 30)
        self.cache: dict[str, dict] = {}
        self.hidden = x.hidden is not None

    def _z(self, r0: int, r1: int, bf16_logits: bool) -> Tensor:
        x = self.x
        if not self.hidden:
            return x.logits.detach().flatten(0, 1)[r0:r1].to(self.cd)
        h, w = x.hidden.detach().flatten(0, 1)[r0:r1], x.weight.detach()
        return (h @ w.T).to(self.cd) if bf16_logits else h.to(self.cd) @ w.to(self.cd).T

    def _reference(self, expect: str) -> dict:
        if expect in self.cache:
            return self.cache[expect]
        x, bf16 = self.x, "bf16_logits" in expect
        y = x.targets.flatten()
        n = y.numel()
        v = x.weight.shape[0] if self.hidden else x.logits.shape[-1]
        step = max(1, self.chunk_bytes // (v * torch.finfo(self.cd).bits // 8))
        chunks = [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]
        lse = torch.empty(n, dtype=self.cd, device=y.device)
        logp = torch.empty_like(lse)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torch.no_grad():
                for r0, r1 in chunks:
                    z = self._z(r0, r1, bf16)
                    lse[r0:r1] = z.logsumexp(-1)
                    logp[r0:r1] = z.gather(1, y[r0:r1, None]).squeeze(1) - lse[r0:r1]
            lp = logp.view(x.targets.shape).double().requires_grad_()
            kw = dict(POLICY_KW, dual_clip=None if "no_dual" in expect else DUAL_CLIP)
            with torch.enable_grad():
                loss, _ = vk.policy_loss(lp, x.old_logp.double(), x.adv.double(), x.mask, **kw,
                                         backend="reference")
                (g,) = torch.autograd.grad(loss, [lp])
            ref = {"loss": float(loss.detach()), "g": g.flatten().to(self.cd), "lse": lse, "chunks": chunks}
            if self.hidden:
                w = x.weight.detach().to(self.cd)
                hid = x.hidden.detach().flatten(0, 1)
                gh = torch.empty(n, w.shape[1], dtype=self.cd, device=y.device)
                gw = torch.zeros_like(w)
                with torch.no_grad():
                    for r0, r1 in chunks:
                        dz = self._dz(r0, r1, ref, bf16)
                        gh[r0:r1] = dz @ w
                        gw.addmm_(dz.T, hid[r0:r1].to(self.cd))
                ref["grads"] = [gh, gw]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        self.cache[expect] = ref
        return ref

    def _dz(self, r0, r1, ref, bf16_logits) -> Tensor:
        """d loss / d logits on rows [r0, r1): g (onehot - softmax)."""
        y = self.x.targets.flatten()[r0:r1]
        g = ref["g"][r0:r1]
        z = self._z(r0, r1, bf16_logits)
        dz = torch.exp(z.sub_(ref["lse"][r0:r1, None])).mul_(-g[:, None])
        dz[torch.arange(r1 - r0, device=dz.device), y] += g
        return dz

    def __call__(self, impl: Impl, out) -> Check:
        loss, grads = out
        ref = self._reference(impl.expect)
        against = f"vapo reference, {str(self.cd).replace('torch.', '')}" + (
            " on bf16-rounded logits" if "bf16_logits" in impl.expect else "") + (
            ", dual clip off" if "no_dual" in impl.expect else "")
        loss_err = abs(float(loss) - ref["loss"])
        ok = _loss_ok(float(loss), ref["loss"])
        pairs = []  # per gradient: (per-row squared error, per-row squared norm)
        with torch.no_grad():
            if self.hidden:
                if len(grads) != 2:
                    return Check(False, math.inf, against, "a gradient is missing")
                for g, w in zip(grads, ref["grads"]):
                    d = g.reshape(w.shape).to(self.cd) - w
                    pairs.append((d.square().sum(-1), w.square().sum(-1)))
            else:
                flat = grads[0].reshape(-1, grads[0].shape[-1])
                num = torch.empty_like(ref["lse"])
                den = torch.empty_like(num)
                for r0, r1 in ref["chunks"]:
                    want = self._dz(r0, r1, ref, False)
                    num[r0:r1] = (flat[r0:r1].to(self.cd) - want).square().sum(-1)
                    den[r0:r1] = want.square().sum(-1)
                pairs.append((num, den))
        worst = 0.0
        for num, den in pairs:
            n, d = float(num.sum()), float(den.sum())
            # V = 1: the true gradient is all zeros, and a zero answer has no error
            worst = max(worst, math.sqrt(n / d) if d > 0 else (0.0 if n == 0 else math.inf))
        # one wrong row of 16k barely moves the whole tensor's norm: each row on its own too
        row = max(row_rel_error(num, den, ROW_FLOOR) for num, den in pairs)
        bf16 = "bf16_logits" in impl.expect
        tol = BF16_LOGITS_GRAD_REL if bf16 else BF16_GRAD_REL
        row_tol = ROW_GRAD_REL["bf16_logits" if bf16 else "exact"]
        ok &= math.isfinite(worst) and worst <= tol and row <= row_tol
        detail = (f"loss error {loss_err:.3g}, gradient relative L2 error {worst:.3g} (tolerance "
                  f"{tol:g}), worst row {row:.3g} (tolerance {row_tol:g})")
        return Check(ok, max(worst, row), against, detail)


# --------------------------------------------------------------------------------------
# One shape


def build_case(shape: tuple, ctx: Context) -> Case:
    kind, *dims = shape
    label = shape_label(shape)
    if kind == "tokens":
        batch, seqlen = dims
        sets = [make_token_inputs(batch, seqlen, ctx.device, ctx.seed + 1000 * i) for i in range(ctx.sets)]
        checks = {t: token_check(sets[0], t) for t in TOKEN_BYTES}
        impls = [i for t in TOKEN_BYTES for i in token_impls(t, ctx)]
        per_call = shape in PER_CALL_SHAPES
        if per_call:
            def round_trip(x):
                with torch.enable_grad():
                    return torch.autograd.grad((x.logp * x.adv).sum(), [x.logp])

            impls[:0] = [
                Impl("bare torch.add", "policy", "bare", lambda x: torch.add(x.old_logp, x.adv),
                     "one torch op: the fixed cost of any op call"),
                Impl("bare autograd mul+sum fwd+bwd", "policy", "bare", round_trip,
                     "one autograd round trip: the fixed cost of any differentiable call"),
            ]
        tokens = batch * seqlen
        floors = {t: Floor(f"{b} B/token at copy bandwidth", bytes=b * tokens) for t, b in TOKEN_BYTES.items()}
        return Case("loss", label, tokens, sets, impls, floors,
                    lambda impl, out: checks[impl.task](impl, out), per_call=per_call)
    if kind not in ("logits", "hidden") or len(dims) != (2 if kind == "logits" else 3):
        raise ValueError(f"loss shape {label!r}: expected tokens:BxT, logits:NxV or hidden:NxVxH")
    n, v = dims[:2]
    h = dims[2] if kind == "hidden" else None
    elt = torch.finfo(DTYPE).bits // 8
    nsets = 1 if n * (h or v) * elt >= (64 << 20) else ctx.sets
    sets = [make_logit_inputs(n, v, h, ctx.device, ctx.seed)]
    sets += [make_logit_inputs(n, v, h, ctx.device, ctx.seed + 1000 * i, sets[0].weight) for i in range(1, nsets)]
    if kind == "logits":
        b = 2 * v * elt + 17
        floor = Floor(f"2 V elt + 17 = {b} B/token at copy bandwidth", bytes=b * n)
    else:
        floor = Floor("6 N V H FLOP at the fastest bare matmul's rate (3 matmuls)", flops=6 * n * v * h,
                      matmul=(n, h, v), dtype=DTYPE)
    return Case("loss", label, n, sets, logit_impls(kind, ctx), {kind: floor}, LogitCheck(sets[0], ctx.device))


def shape_problem(shape: tuple) -> str | None:
    """Logits / hidden rows are N // LOGIT_SEQLEN sequences of equal length."""
    kind, n = shape[:2]
    batch = max(1, n // LOGIT_SEQLEN)
    if kind != "tokens" and n % batch:
        return f"N = {n} does not split into N // {LOGIT_SEQLEN} = {batch} equal sequences"
    return None


def set_bytes(shape: tuple) -> int:
    kind, n, v, *h = shape
    elt = torch.finfo(DTYPE).bits // 8
    if kind == "tokens":
        return TOKEN_BYTES["policy"] * n * v
    return elt * (n * v if kind == "logits" else (n + v) * h[0])


SUITE = Suite(
    name="loss",
    description="PPO / VAPO losses forward + backward: token log-probs, logits, LM head",
    shapes=SHAPES,
    per_call_shapes=PER_CALL_SHAPES,
    families=("loss", "logprobs"),
    peers=PEERS,
    build_case=build_case,
    shape_forms=("tokens:BxT", "logits:NxV", "hidden:NxVxH"),
    set_bytes=set_bytes,
    shape_problem=shape_problem,
)
