"""Log-prob suite: token log-probs (and entropy) from logits or from an LM head.

Tasks: ``logp`` (log-prob of each row's target from (N, V) logits), ``logp+ent`` (plus the
row's entropy), ``linear`` and ``linear+ent`` (the same from hidden (N, H) and an LM head
(V, H); the fused implementations never hold the N x V logits). Shapes ``NxV`` run the
first two, ``NxVxH`` the last two; each task in two modes, ``fwd`` (under no_grad) and
``fwd+bwd`` (autograd, gradients taken with ``torch.autograd.grad`` and random upstream
gradients per token).

Rows: ours (``token_logprobs`` / ``linear_logprobs`` under each backend, the in-place
backward variant), verl (``logprobs_from_logits_v2``, ``_naive``, ``_flash_attn``,
``entropy_from_logits`` and its chunked variant, ``linear_cross_entropy``), TRL
(``selective_log_softmax``, ``entropy_from_logits``, ``selective_log_softmax_and_entropy``,
``ChunkedLogProbFunction``), Liger's fused linear cross-entropy, Cut Cross-Entropy
(``filter_eps=None``: exact), plain PyTorch eager and under ``torch.compile`` (for the LM
head also on fp32 copies, ``(fp32 matmul)``, as ours upcasts: a CPU without bf16 units
runs a bf16 matmul several times slower), and the bare ``hidden @ weight.T`` (the "floor"
row the FLOP floor is set against).

Inputs: bf16 logits = randn + a boost in [0, 12) on one preferred token per row, which is
the target 70% of the time (rows from flat to peaked). Every row of the checked call is
compared with float64 (float32 on CUDA), computed in row chunks: values to 1e-4 (1 + M)
(M = max|z| + log V of the row; a bf16 peer may add 8 u M; fused-linear peers
x (1 + max|z|)), gradients by relative norm (ours 4u, peers 16u, at least 1e-3) and row
by row (each row's error over its own norm, at most 0.05 for ours and 0.5 for peers, whose
bf16 log_softmax reaches 0.25; see ``harness.row_rel_error``), the fused rows' weight
gradient by vocab row, all from that one call. Floors: from logits N V elt bytes forward, 3 N V elt with the
backward, at the copy bandwidth; fused linear 2 N V H FLOP forward, 6 N V H with the
backward, at the fastest bare matmul's rate.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, replace
from typing import Any

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
)

DTYPE = torch.bfloat16
U = 2.0**-8  # bf16 unit roundoff
BOOST_MAX, P_PREFERRED = 12.0, 0.7
TRL_SEQLEN = 1024  # TRL takes padded (B, T, V) logits: B = N / T rows of T tokens
# per-row gradient error (see harness.row_rel_error): a dropped or misplaced row scores ~1; ours
# measured <= 0.004, bf16 peers up to 0.25 (a bf16 log_softmax's entropy rows)
ROW_GRAD_REL = {"ours": 0.05, "peer": 0.5}
ROW_FLOOR = 0.1
OURS_TOL = 1e-4
REFERENCE_MAX_ELEMENTS = 1 << 25  # our from-logits reference is timed up to N x V this big

SHAPES = {
    "cpu": [(1024, 1024), (1024, 32768), (4096, 32768), (1024, 151936), (1024, 32768, 512)],
    "cuda": [(n, v) for n in (4096, 16384, 65536) for v in (32768, 151936)]
    + [(n, v, h) for n in (4096, 16384, 65536) for v in (32768, 151936) for h in (2048, 4096)],
    "quick": [(256, 3000), (64, 2000, 64)],
}
PER_CALL_SHAPES = [(1024, 1024)]
MODES = ("fwd", "fwd+bwd")


@dataclass
class Inputs:
    targets: Tensor  # (N,) int64
    w: Tensor  # (N,) fp32 upstream gradient of the log-probs
    c: Tensor  # (N,) fp32 upstream gradient of the entropy
    logits: Tensor | None = None  # (N, V) leaf
    hidden: Tensor | None = None  # (N, H) leaf
    weight: Tensor | None = None  # (V, H) leaf, shared by the sets

    @property
    def leaves(self) -> list[Tensor]:
        return [self.logits] if self.logits is not None else [self.hidden, self.weight]


def make_inputs(shape: tuple[int, ...], device, seed: int, weight: Tensor | None = None) -> Inputs:
    """Random inputs drawn on the device in row chunks (small fp32 temporaries)."""
    n, v = shape[:2]
    h = shape[2] if len(shape) == 3 else None
    g = torch.Generator(device=device).manual_seed(seed)
    preferred = torch.randint(0, v, (n,), generator=g, device=device)
    boost = torch.rand(n, generator=g, device=device) * BOOST_MAX
    uniform = torch.randint(0, v, (n,), generator=g, device=device)
    targets = torch.where(torch.rand(n, generator=g, device=device) < P_PREFERRED, preferred, uniform)
    w = torch.randn(n, generator=g, device=device)
    c = torch.randn(n, generator=g, device=device)
    if h is None:
        logits = torch.empty(n, v, dtype=DTYPE, device=device)
        chunk = max(1, (64 << 20) // (4 * v))
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            z = torch.randn(r1 - r0, v, generator=g, device=device)
            z[torch.arange(r1 - r0, device=device), preferred[r0:r1]] += boost[r0:r1]
            logits[r0:r1] = z
        return Inputs(targets, w, c, logits=logits.requires_grad_())
    if weight is None:  # rows of norm ~1: z_v = h . W_v has the noise of h
        weight = (torch.randn(v, h, generator=g, device=device) / math.sqrt(h)).to(DTYPE)
        weight.requires_grad_()
    wp = weight.detach()[preferred].float()  # h = noise + b W_p / |W_p|^2 adds b to that logit
    hidden = torch.randn(n, h, generator=g, device=device)
    hidden += boost[:, None] * wp / (wp * wp).sum(-1, keepdim=True)
    return Inputs(targets, w, c, hidden=hidden.to(DTYPE).requires_grad_(), weight=weight)


# --------------------------------------------------------------------------------------
# Peers

_VERL_FUNCS = [
    "gather_from_labels", "logprobs_from_logits", "logprobs_from_logits_flash_attn",
    "logprobs_from_logits_naive", "logprobs_from_logits_v2", "entropy_from_logits",
    "entropy_from_logits_with_chunking",
]


def load_verl():
    """verl's ``torch_functional`` module; where its import fails (it pulls in tensordict
    and transformers), its functions compiled from the installed source, with the flags
    the module would have set."""
    try:
        return importlib.import_module("verl.utils.torch_functional")
    except ImportError:
        pass
    from types import SimpleNamespace

    ns: dict[str, Any] = {"torch": torch, "F": F, "os": os}
    ns["NPU_CROSS_ENTROPY_LOSS_AVAILABLE"] = False
    ns["FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE"] = False  # sic: verl's spelling
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

        ns["cross_entropy_loss"] = cross_entropy_loss
        ns["FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE"] = True
    except ImportError:
        pass
    load_from_source("verl", "utils/torch_functional.py", _VERL_FUNCS, ns)
    return SimpleNamespace(**ns)


def _import(module: str, attr: str | None = None):
    def load():
        mod = importlib.import_module(module)
        return getattr(mod, attr) if attr else mod

    return load


PEERS = {
    "verl": Peer("verl", load_verl),
    "verl.linear": Peer("verl", _import("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy")),
    "trl": Peer("trl", _import("trl.trainer.utils")),
    "trl.chunked": Peer("trl", _import("trl.kernels", "ChunkedLogProbFunction")),
    "liger": Peer("liger-kernel", _import("liger_kernel.transformers.functional",
                                          "liger_fused_linear_cross_entropy")),
    "cce": Peer("cut-cross-entropy", _import("cut_cross_entropy", "linear_cross_entropy")),
}


# --------------------------------------------------------------------------------------
# Plain PyTorch


def torch_logp(z: Tensor, y: Tensor) -> Tensor:
    return z.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)


def torch_logp_ent(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    lsm = z.log_softmax(-1)
    return lsm.gather(-1, y[:, None]).squeeze(-1), -(lsm.exp() * lsm).sum(-1)


def torch_linear_logp(h: Tensor, w: Tensor, y: Tensor) -> Tensor:
    return torch_logp(h @ w.T, y)


def torch_linear_logp_ent(h: Tensor, w: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return torch_logp_ent(h @ w.T, y)


# The same on fp32 copies: ours upcasts each weight tile to fp32, and a CPU without bf16
# units runs torch's bf16 matmul several times slower than its fp32 one, so against the
# bf16 peers alone ours would win on a dtype handicap.
def torch_linear_logp_fp32(h: Tensor, w: Tensor, y: Tensor) -> Tensor:
    return torch_logp(h.float() @ w.float().T, y)


def torch_linear_logp_ent_fp32(h: Tensor, w: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return torch_logp_ent(h.float() @ w.float().T, y)


_COMPILED: dict[str, Any] = {}


def compiled(fn):
    """One torch.compile wrapper per function for the whole run: later shapes take torch's
    dynamic-shape recompile, as a training loop would."""
    if fn.__name__ not in _COMPILED:
        _COMPILED[fn.__name__] = torch.compile(fn)
    return _COMPILED[fn.__name__]


# --------------------------------------------------------------------------------------
# Running one implementation in one mode


def _outs(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out.reshape(-1)]
    return [o.reshape(-1) for o in out if o is not None]


def fwd(fn):
    def run(x):
        with torch.no_grad():
            return _outs(fn(x)), None

    return run


def fwd_bwd(fn, floor: bool = False):
    def run(x):
        with torch.enable_grad():
            out = fn(x)
            outs = [out] if floor else _outs(out)
            up = [torch.ones_like(outs[0])] if floor else [g.to(o.dtype) for g, o in zip((x.w, x.c), outs)]
            grads = torch.autograd.grad(outs, x.leaves, up)
        return [o.detach() for o in outs], grads

    return run


def private_copies(sets: list[Inputs]):
    """For an in-place backward, which overwrites the logits it is given: a private copy
    of each set (a non-leaf, see ``private_activation``), restored (untimed) before each call."""
    copies = [replace(s, logits=private_activation(s.logits)) for s in sets]

    def inputs(i: int) -> Inputs:
        k = i % len(sets)
        with torch.no_grad():
            copies[k].logits.copy_(sets[k].logits.detach())
        return copies[k]

    return inputs


# --------------------------------------------------------------------------------------
# The implementations of one shape


@dataclass
class Spec:
    """One implementation before it is split into its two modes."""

    name: str
    task: str
    kind: str
    fn: Any
    note: str = ""
    unavailable: str | None = None
    inplace: bool = False
    compiled: bool = False


def _trl_view(x: Inputs) -> tuple[Tensor, Tensor]:
    n, v = x.logits.shape
    t = TRL_SEQLEN if n % TRL_SEQLEN == 0 else n
    return x.logits.view(n // t, t, v), x.targets.view(n // t, t)


def _z(x: Inputs) -> Tensor:
    # a view of the logits (an in-place row's private non-leaf copy: its backward writes
    # through the view)
    return x.logits.view(x.logits.shape)


def logits_specs(ctx: Context, n: int, v: int) -> list[Spec]:
    cuda = ctx.device.type == "cuda"
    specs = []
    backends = list(ctx.backends["logprobs"])
    if n * v > REFERENCE_MAX_ELEMENTS and "reference" in backends and len(backends) > 1:
        backends.remove("reference")
    for b in backends:
        specs.append(Spec(f"vapo.token_logprobs[{b}]", "logp", "ours",
                          lambda x, b=b: vk.token_logprobs(_z(x), x.targets, backend=b),
                          "one pass forward, one backward"))
        if b != "reference":
            specs.append(Spec(
                f"vapo.token_logprobs+inplace[{b}]", "logp", "ours",
                lambda x, b=b: vk.token_logprobs(_z(x), x.targets, inplace_backward=True, backend=b),
                "inplace_backward=True: the gradient overwrites the logits", inplace=True))
        specs.append(Spec(
            f"vapo.token_logprobs[{b}]", "logp+ent", "ours",
            lambda x, b=b: vk.token_logprobs(_z(x), x.targets, return_entropy=True, backend=b),
            "return_entropy=True: one pass for both"))
    p, miss = ctx.peers, ctx.missing
    verl = p.get("verl")
    flash = bool(getattr(verl, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False))
    no_flash = miss("verl") or (
        "flash-attn is not installed" if not flash else None) or (
        None if cuda else "flash-attn's cross-entropy is a Triton kernel: CUDA only")
    specs += [
        Spec("verl.logprobs_from_logits_v2", "logp", "peer",
             lambda x: verl.logprobs_from_logits_v2(_z(x), x.targets),
             "per-row loop (packed N x V, as with remove-padding)", miss("verl")),
        Spec("verl.logprobs_from_logits_naive", "logp", "peer",
             lambda x: verl.logprobs_from_logits_naive(_z(x), x.targets),
             "log_softmax + gather", miss("verl")),
        Spec("verl.logprobs_from_logits_flash_attn", "logp", "peer",
             lambda x: verl.logprobs_from_logits_flash_attn(_z(x), x.targets),
             "flash-attn Triton cross-entropy, in-place backward", no_flash, inplace=True),
        Spec("verl.logprobs_from_logits+entropy_from_logits", "logp+ent", "peer",
             lambda x: (verl.logprobs_from_logits(_z(x), x.targets, inplace_backward=False),
                        verl.entropy_from_logits(_z(x))),
             "two functions", miss("verl")),
        Spec("verl.logprobs_from_logits+entropy_with_chunking", "logp+ent", "peer",
             lambda x: (verl.logprobs_from_logits(_z(x), x.targets, inplace_backward=False),
                        verl.entropy_from_logits_with_chunking(_z(x))),
             "entropy in fp32 chunks of 2048 rows", miss("verl")),
    ]
    trl = p.get("trl")
    fused = hasattr(trl, "selective_log_softmax_and_entropy")
    trl_version = ctx.peer_versions.get("trl")
    specs += [
        Spec("trl.selective_log_softmax", "logp", "peer",
             lambda x: trl.selective_log_softmax(*_trl_view(x)),
             f"trl {trl_version}: loop over B of (B, T={TRL_SEQLEN}, V)", miss("trl")),
        Spec("trl.selective_log_softmax+entropy_from_logits", "logp+ent", "peer",
             lambda x: (trl.selective_log_softmax(*_trl_view(x)),
                        trl.entropy_from_logits(_trl_view(x)[0])),
             f"trl {trl_version}: two functions", miss("trl")),
        Spec("trl.selective_log_softmax_and_entropy", "logp+ent", "peer",
             lambda x: trl.selective_log_softmax_and_entropy(*_trl_view(x)),
             "one Triton pass (online logsumexp)",
             miss("trl") or (None if fused else f"needs trl >= 1.16; trl {trl_version} here")
             or (None if cuda else "TRL's one-pass Triton kernel: CUDA only")),
        Spec("torch eager", "logp", "peer", lambda x: torch_logp(_z(x), x.targets),
             "log_softmax(-1).gather() in the input dtype"),
        Spec("torch eager", "logp+ent", "peer", lambda x: torch_logp_ent(_z(x), x.targets),
             "log_softmax once; gather; -(p * logp).sum()"),
        Spec("torch.compile", "logp", "peer",
             lambda x: compiled(torch_logp)(_z(x), x.targets),
             "the eager function compiled (compile time not timed)", ctx.compile_why, compiled=True),
        Spec("torch.compile", "logp+ent", "peer",
             lambda x: compiled(torch_logp_ent)(_z(x), x.targets),
             "the eager function compiled (compile time not timed)", ctx.compile_why, compiled=True),
    ]
    return specs


def linear_specs(ctx: Context) -> list[Spec]:
    cuda = ctx.device.type == "cuda"
    p, miss = ctx.peers, ctx.missing
    cuda_only = None if cuda else "a Triton kernel: CUDA only"
    specs = [Spec("torch.matmul (floor)", "linear", "floor", lambda x: x.hidden @ x.weight.T,
                  "hidden @ weight.T alone (backward: the two gradient matmuls)")]
    for b in ctx.backends["logprobs"]:
        for task, ent in (("linear", False), ("linear+ent", True)):
            specs.append(Spec(
                f"vapo.linear_logprobs[{b}]", task, "ours",
                lambda x, b=b, ent=ent: vk.linear_logprobs(
                    x.hidden, x.weight, x.targets, return_entropy=ent, backend=b),
                "fused LM head: logits tiles recomputed, never N x V"))

    def liger(x):
        out = p["liger"](x.hidden, x.weight, x.targets, reduction="none")
        loss = out if isinstance(out, Tensor) else out[0]
        return -loss

    trl_chunk = getattr(p.get("trl"), "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    specs += [
        Spec("liger.fused_linear_cross_entropy", "linear", "peer", liger,
             f"liger-kernel {ctx.peer_versions.get('liger')}, reduction='none'",
             miss("liger") or cuda_only),
        Spec("cce.linear_cross_entropy", "linear", "peer",
             lambda x: -p["cce"](x.hidden, x.weight, x.targets, reduction="none", filter_eps=None),
             "cut-cross-entropy, filter_eps=None (exact)", miss("cce") or cuda_only),
        Spec("verl.linear_cross_entropy", "linear+ent", "peer",
             lambda x: tuple(p["verl.linear"](x.hidden, x.weight, x.targets, 1.0, "none")),
             "verl.utils.kernel: fused Triton log-prob + entropy", miss("verl.linear") or cuda_only),
    ]
    for task, outputs in (("linear", ()), ("linear+ent", ("entropy",))):
        specs.append(Spec(
            "trl.ChunkedLogProbFunction", task, "peer",
            lambda x, outputs=outputs: p["trl.chunked"].apply(
                x.hidden, x.weight, None, x.targets, 1.0, trl_chunk, None, 1.0, outputs)[:2],
            f"trl: matmul tiles of 4096 x {trl_chunk}", miss("trl.chunked")))
    specs += [
        Spec("torch eager", "linear", "peer",
             lambda x: torch_linear_logp(x.hidden, x.weight, x.targets),
             "matmul + log_softmax + gather, N x V logits in the input dtype"),
        Spec("torch eager", "linear+ent", "peer",
             lambda x: torch_linear_logp_ent(x.hidden, x.weight, x.targets),
             "matmul + log_softmax; gather; -(p * logp).sum()"),
        Spec("torch.compile", "linear", "peer",
             lambda x: compiled(torch_linear_logp)(x.hidden, x.weight, x.targets),
             "the eager function compiled (compile time not timed)", ctx.compile_why, compiled=True),
        Spec("torch.compile", "linear+ent", "peer",
             lambda x: compiled(torch_linear_logp_ent)(x.hidden, x.weight, x.targets),
             "the eager function compiled (compile time not timed)", ctx.compile_why, compiled=True),
    ]
    if DTYPE != torch.float32:  # the fair peers for our fp32-upcasting fused rows
        for task, fn in (("linear", torch_linear_logp_fp32), ("linear+ent", torch_linear_logp_ent_fp32)):
            specs += [
                Spec("torch eager (fp32 matmul)", task, "peer",
                     lambda x, fn=fn: fn(x.hidden, x.weight, x.targets),
                     "hidden.float() @ weight.float().T, then the eager function in fp32"),
                Spec("torch.compile (fp32 matmul)", task, "peer",
                     lambda x, fn=fn: compiled(fn)(x.hidden, x.weight, x.targets),
                     "the fp32 eager function compiled (compile time not timed)",
                     ctx.compile_why, compiled=True),
            ]
    return specs


# --------------------------------------------------------------------------------------
# The check: every row of the timed call's outputs against float64, in row chunks


def _global_rel(num: Tensor, den: Tensor) -> float:
    """Relative L2 error of a whole gradient from its per-row squared norms."""
    n, d = float(num.sum()), float(den.sum())
    if not math.isfinite(n):
        return math.inf
    return (n / d) ** 0.5 if d > 0 else n**0.5


def _sq_rows(got: Tensor, want: Tensor) -> tuple[Tensor, Tensor]:
    got = got.reshape(want.shape).to(want.dtype)
    return (got - want).square().sum(-1), want.square().sum(-1)


class LogprobCheck:
    """Every row of set 0: values against float64 (float32 on CUDA, TF32 off) with a per-row
    tolerance; gradients by relative L2 norm over all rows (ours 4u, peers 16u, at least
    1e-3) and, so that one wrong row fails at any N, by each row's own relative error
    (ROW_GRAD_REL, see ``row_rel_error``): the logits' or hidden states' rows and, for the fused
    rows, the weight gradient's vocab rows, all from the timed call itself (it used to be
    32 rows, and the weight gradient from a second call on those rows alone)."""

    def __init__(self, x: Inputs, linear: bool, device: torch.device):
        self.x, self.linear = x, linear
        self.cd = torch.float64 if device.type == "cpu" else torch.float32
        n = x.targets.shape[0]
        lead = x.leaves[0].detach()
        self.h = lead if linear else None
        self.w = x.weight.detach().to(self.cd) if linear else None
        self.vocab = x.weight.shape[0] if linear else lead.shape[1]
        chunk_bytes = (256 << 20) if device.type == "cpu" else (1 << 30)
        step = max(1, chunk_bytes // (self.vocab * torch.finfo(self.cd).bits // 8))
        self.chunks = [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]
        self.lse = torch.empty(n, dtype=self.cd, device=lead.device)
        self.logp, self.ent, self.max_abs = torch.empty_like(self.lse), torch.empty_like(self.lse), torch.empty_like(self.lse)
        with _no_tf32(), torch.no_grad():
            for r0, r1 in self.chunks:
                z = self._z(r0, r1)
                lse = z.logsumexp(-1)
                lsm = z - lse[:, None]
                self.lse[r0:r1], self.max_abs[r0:r1] = lse, z.abs().amax(-1)
                self.logp[r0:r1] = lsm.gather(1, x.targets[r0:r1, None]).squeeze(1)
                self.ent[r0:r1] = -(lsm.exp() * lsm).sum(-1)
        self.scale = self.max_abs + math.log(self.vocab)
        self.linear_grads: dict[bool, tuple[Tensor, Tensor]] = {}

    def _z(self, r0: int, r1: int) -> Tensor:
        if self.linear:
            return self.h[r0:r1].to(self.cd) @ self.w.T
        return self.x.logits.detach()[r0:r1].to(self.cd)

    def _dz(self, r0: int, r1: int, with_ent: bool) -> Tensor:
        """d (w . logp + c . entropy) / d logits on rows [r0, r1)."""
        x = self.x
        lsm = self._z(r0, r1).sub_(self.lse[r0:r1, None])
        p = lsm.exp()
        dz = p * -x.w[r0:r1, None].to(self.cd)
        dz[torch.arange(r1 - r0, device=dz.device), x.targets[r0:r1]] += x.w[r0:r1].to(self.cd)
        if with_ent:  # d entropy / d z_j = -p_j (log p_j + entropy)
            dz -= x.c[r0:r1, None].to(self.cd) * p * (lsm + self.ent[r0:r1, None])
        return dz

    def _linear_grads(self, with_ent: bool) -> tuple[Tensor, Tensor]:
        if with_ent not in self.linear_grads:
            gh = torch.empty(self.h.shape, dtype=self.cd, device=self.h.device)
            gw = torch.zeros_like(self.w)
            with _no_tf32(), torch.no_grad():
                for r0, r1 in self.chunks:
                    dz = self._dz(r0, r1, with_ent)
                    gh[r0:r1] = dz @ self.w
                    gw.addmm_(dz.T, self.h[r0:r1].to(self.cd))
            self.linear_grads[with_ent] = (gh, gw)
        return self.linear_grads[with_ent]

    def __call__(self, impl: Impl, out) -> Check:
        outs, grads = out
        with_ent = "+ent" in impl.task
        scale = self.scale
        tol = OURS_TOL * (1 + scale)
        if impl.kind == "ours" and self.linear:
            tol = tol * 10  # tf32 products on a GPU
        if impl.kind == "peer":
            tol = tol + 8 * U * scale  # a bf16 peer rounds a few O(M) intermediates
            if self.linear:
                tol = tol * (1 + self.max_abs)  # and may round each logit
        want = [self.logp, self.ent][: 1 + with_ent]
        against = f"{str(self.cd).replace('torch.', '')}, all {self.logp.numel()} rows"
        if len(outs) < len(want):
            return Check(False, math.inf, against, "an output is missing")
        worst = ratio = 0.0
        with torch.no_grad():
            for got, w in zip(outs, want):
                err = (got.detach().reshape(-1).to(self.cd) - w).abs().nan_to_num(nan=math.inf)
                worst, ratio = max(worst, float(err.max())), max(ratio, float((err / tol).max()))
        detail = f"{ratio:.2g} x the value tolerance"
        ok = ratio <= 1
        if grads is None:
            return Check(ok, worst, against, detail)
        grad_tol = max((4 if impl.kind == "ours" else 16) * U, 1e-3)
        pairs = []  # (per-row squared error, per-row squared norm) per gradient
        with torch.no_grad():
            if self.linear:
                if len(grads) < 2:
                    return Check(False, math.inf, against, "a gradient is missing")
                gh, gw = self._linear_grads(with_ent)
                pairs = [_sq_rows(grads[0], gh), _sq_rows(grads[1], gw)]
            else:
                got = grads[0].detach()
                num = torch.empty_like(self.lse)
                den = torch.empty_like(self.lse)
                for r0, r1 in self.chunks:
                    num[r0:r1], den[r0:r1] = _sq_rows(got[r0:r1], self._dz(r0, r1, with_ent))
                pairs = [(num, den)]
        rel = max(_global_rel(*p) for p in pairs)
        row = max(row_rel_error(*p, ROW_FLOOR) for p in pairs)
        row_tol = ROW_GRAD_REL[impl.kind]
        ok &= rel <= grad_tol and row <= row_tol
        detail += (f", gradient relative error {rel:.2g} (tolerance {grad_tol:.2g}), worst row "
                   f"{row:.2g} (tolerance {row_tol:g})")
        return Check(ok, worst, against, detail)


class _no_tf32:
    """The reference's CUDA matmuls in true float32."""

    def __enter__(self):
        self.before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.before


# --------------------------------------------------------------------------------------
# One shape


def build_case(shape: tuple[int, ...], ctx: Context) -> Case:
    n, v = shape[:2]
    linear = len(shape) == 3
    elt = torch.finfo(DTYPE).bits // 8
    set_bytes = n * (shape[2] if linear else v) * elt
    nsets = 1 if set_bytes >= (256 << 20) else ctx.sets  # past that, far larger than any cache
    sets = [make_inputs(shape, ctx.device, ctx.seed)]
    sets += [make_inputs(shape, ctx.device, ctx.seed + 1000 * i, sets[0].weight) for i in range(1, nsets)]
    specs = linear_specs(ctx) if linear else logits_specs(ctx, n, v)
    per_call = shape in PER_CALL_SHAPES
    impls = []
    if per_call:
        first = "linear" if linear else "logp"
        impls += [Impl("bare torch.add", f"{first} {m}", "bare", lambda x: torch.add(x.w, x.c),
                       "one torch op on two (N,) fp32 tensors: the fixed cost of any op call")
                  for m in MODES]
    for s in specs:
        for mode in MODES:
            run = fwd(s.fn) if mode == "fwd" else fwd_bwd(s.fn, floor=s.kind == "floor")
            impls.append(Impl(
                s.name, f"{s.task} {mode}", s.kind, run, s.note, unavailable=s.unavailable,
                prepare=private_copies if s.inplace else None, slow_first_call=s.compiled,
            ))
    floors = {}
    for task in (("linear", "linear+ent") if linear else ("logp", "logp+ent")):
        if linear:
            flop = 2 * n * v * shape[2]
            mm = (n, shape[2], v)
            floors[f"{task} fwd"] = Floor("2 N V H FLOP at the fastest bare matmul's rate", flops=flop, matmul=mm)
            floors[f"{task} fwd+bwd"] = Floor("6 N V H FLOP at the fastest bare matmul's rate", flops=3 * flop, matmul=mm)
        else:
            floors[f"{task} fwd"] = Floor("N V elt bytes read at copy bandwidth", bytes=n * v * elt)
            floors[f"{task} fwd+bwd"] = Floor("3 N V elt bytes (read twice, gradient written) at copy bandwidth", bytes=3 * n * v * elt)
    label = "x".join(map(str, shape))
    return Case("logprobs", label, n, sets, impls, floors, LogprobCheck(sets[0], linear, ctx.device), per_call=per_call)


SUITE = Suite(
    name="logprobs",
    description="token log-probs (+ entropy) from bf16 logits or a fused LM head",
    shapes=SHAPES,
    per_call_shapes=PER_CALL_SHAPES,
    families=("logprobs",),
    peers=PEERS,
    build_case=build_case,
    shape_forms=("NxV", "NxVxH"),
    # the logits, or the hidden states and the LM head
    set_bytes=lambda s: 2 * (s[0] * s[1] if len(s) == 2 else (s[0] + s[1]) * s[2]),
)
