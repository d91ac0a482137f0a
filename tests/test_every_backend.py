"""Every public function and every compat adapter under every backend of its family.

Issue 12, item 1: a backend that a family has must work for every public function of
that family. A backend named by a user is a request for the whole family: each helper
op (whitening, counting, the LM-head kernels under a loss, ...) resolves the name in the
registry to its best available kernel, or the reference.

For each family, each backend ``vk.available_backends(family, "cpu")`` reports and each
case below (a public function or an adapter, on a small ragged float32 batch with gaps
in its mask, padded or packed), the test runs the case under that backend and under
``"reference"`` and compares every output, metric and gradient (rtol 1e-5, atol 1e-6).
It also records every kernel selection made during the call (``_backends.select``): the
named backend must reach each of them (nothing falls back to the automatic choice), the
op must run that backend's own kernel when it has one, and a case that computes through
kernels must select at least one.
"""

from __future__ import annotations


import pytest
import torch

import vapo_kernels as vk
from vapo_kernels import _backends, compat
from vapo_kernels.compat import nemo as c_nemo
from vapo_kernels.compat import openrlhf as c_orlhf
from vapo_kernels.compat import torchrl as c_torchrl
from vapo_kernels.compat import trl as c_trl
from vapo_kernels.compat import verl as c_verl

RTOL, ATOL = 1e-5, 1e-6
FAMILIES = ("gae", "logprobs", "loss")

# --------------------------------------------------------------------------------------
# A small ragged batch. Padded: (B, T) with gaps inside rows and padding at their ends.
# Packed: 4 sequences of lengths 5, 1, 7, 3 (N = 16) with gaps.

B, T, V, H = 3, 6, 11, 8
MASK = torch.tensor(
    [[1, 1, 0, 1, 1, 1],
     [1, 1, 1, 1, 0, 0],
     [0, 1, 1, 0, 1, 0]], dtype=torch.bool,
)
CU = torch.tensor([0, 5, 6, 13, 16], dtype=torch.int32)
N = int(CU[-1])
PMASK = torch.tensor([1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
SEQ_LENGTHS = torch.tensor([5, 3, 4])  # TRL: index of each row's last response token


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_g(seed)) * scale


def targets(*shape, seed: int, ignore: bool = True) -> torch.Tensor:
    t = torch.randint(0, V, shape, generator=_g(seed))
    if ignore:
        t.view(-1)[2] = -100  # one ignored row on top of the masked ones
    return t


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.clone().requires_grad_(True)


def weights_like(x: torch.Tensor, seed: int = 99) -> torch.Tensor:
    return torch.rand(x.shape, generator=_g(seed), dtype=x.dtype) + 0.5


def backprop(outputs, **leaves) -> dict[str, torch.Tensor]:
    """Gradients of ``sum_i <w_i, outputs_i>`` (fixed random weights) w.r.t. ``leaves``."""
    total = sum((o * weights_like(o, 99 + i)).sum() for i, o in enumerate(outputs))
    grads = torch.autograd.grad(total, list(leaves.values()))
    return {f"grad_{name}": g for name, g in zip(leaves, grads)}


def metrics_out(prefix: str, metrics: dict) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": torch.as_tensor(v) for k, v in metrics.items()}


def policy_inputs(seed: int, shape):
    """(logp leaf, old_logp, advantages) with ratios well outside the clip range."""
    old = -torch.rand(shape, generator=_g(seed)) * 3
    logp = leaf(old + randn(*shape, seed=seed + 1, scale=0.4))
    adv = randn(*shape, seed=seed + 2)
    return logp, old, adv


def value_inputs(seed: int, shape):
    values = leaf(randn(*shape, seed=seed))
    old = values.detach() + randn(*shape, seed=seed + 1, scale=0.3)
    returns = randn(*shape, seed=seed + 2)
    return values, old, returns


# --------------------------------------------------------------------------------------
# Cases: ``case(backend) -> {name: tensor}``. Public functions take ``backend=``; the
# adapters read ``compat.set_backend`` (the ``compat_backend`` fixture restores it).
# ``NO_KERNEL``: adapters that compute in plain torch and select no kernel.

GAE_CASES, LOGPROBS_CASES, LOSS_CASES = {}, {}, {}
NO_KERNEL = set()


def case(table: dict, name: str, *, kernel: bool = True):
    def deco(fn):
        table[name] = fn
        if not kernel:
            NO_KERNEL.add(name)
        return fn

    return deco


def gae_inputs(seed: int, packed: bool):
    shape = (N,) if packed else (B, T)
    return randn(*shape, seed=seed), randn(*shape, seed=seed + 1)


# --- gae family: public functions


@case(GAE_CASES, "gae-padded-skip")
def _(backend):
    r, v = gae_inputs(1, False)
    adv, ret = vk.gae(r, v, MASK, gamma=0.99, lam=0.9, backend=backend)
    return {"adv": adv, "ret": ret}


@case(GAE_CASES, "gae-padded-zero-whiten")
def _(backend):
    r, v = gae_inputs(2, False)
    adv, ret = vk.gae(r, v, MASK.float(), gamma=0.97, lam=0.95, mask_mode="zero", whiten=True,
                      backend=backend)
    return {"adv": adv, "ret": ret}


@case(GAE_CASES, "gae-packed")
def _(backend):
    r, v = gae_inputs(3, True)
    adv, ret = vk.gae(r, v, PMASK, CU, gamma=1.0, lam=torch.tensor([0.9, 0.5, 1.0, 0.7]),
                      backend=backend)
    return {"adv": adv, "ret": ret}


@case(GAE_CASES, "decoupled_gae-padded-alpha")
def _(backend):
    r, v = gae_inputs(4, False)
    adv, tgt = vk.decoupled_gae(r, v, MASK, gamma=0.99, lam_critic=1.0, alpha=0.5,
                                backend=backend)
    return {"adv": adv, "targets": tgt}


@case(GAE_CASES, "decoupled_gae-packed-alpha-whiten")
def _(backend):
    r, v = gae_inputs(5, True)
    adv, tgt = vk.decoupled_gae(r, v, PMASK, CU, gamma=1.0, lam_critic=0.98, alpha=0.4,
                                whiten=True, backend=backend)
    return {"adv": adv, "targets": tgt}


@case(GAE_CASES, "decoupled_gae-padded-whiten")
def _(backend):
    r, v = gae_inputs(6, False)
    adv, tgt = vk.decoupled_gae(r, v, MASK, gamma=0.95, lam_critic=1.0, lam_policy=0.8,
                                whiten=True, backend=backend)
    return {"adv": adv, "targets": tgt}


@case(GAE_CASES, "masked_whiten-padded")
def _(backend):
    x = randn(B, T, seed=7, scale=3.0) + 1.5
    return {"white": vk.masked_whiten(x, MASK, backend=backend)}


@case(GAE_CASES, "masked_whiten-packed-biased-keep-mean")
def _(backend):
    x = randn(N, seed=8, scale=2.0) - 0.5
    return {"white": vk.masked_whiten(x, PMASK, CU, unbiased=False, shift_mean=False,
                                      eps=1e-6, backend=backend)}


# --- gae family: adapters


@case(GAE_CASES, "verl.compute_gae_advantage_return")
def _(backend):
    compat.set_backend(backend)
    r, v = gae_inputs(9, False)
    adv, ret = c_verl.compute_gae_advantage_return(r, v, MASK.float(), gamma=0.99, lam=0.95)
    return {"adv": adv, "ret": ret}


@case(GAE_CASES, "openrlhf.get_advantages_and_returns")
def _(backend):
    compat.set_backend(backend)
    r, v = gae_inputs(10, False)
    adv, ret = c_orlhf.get_advantages_and_returns(v, r, MASK.long(), gamma=0.99, lambd=0.95)
    return {"adv": adv, "ret": ret}


@case(GAE_CASES, "openrlhf.normalize_advantages", kernel=False)
def _(backend):
    compat.set_backend(backend)
    advs = [randn(B, T, seed=11), randn(2, 4, seed=12, scale=2.0)]
    masks = [MASK, torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)]
    out = c_orlhf.normalize_advantages(advs, masks)
    single = c_orlhf.normalize_advantages(advs[0], masks[0], no_std_norm=True)
    return {"out0": out[0], "out1": out[1], "single": single}


@case(GAE_CASES, "torchrl.generalized_advantage_estimate")
def _(backend):
    compat.set_backend(backend)
    shape = (B, T, 1)
    value, next_value, reward = (randn(*shape, seed=s) for s in (13, 14, 15))
    done = torch.zeros(shape, dtype=torch.bool)
    done[0, 2], done[1, 4], done[2, 0], done[:, -1] = True, True, True, True
    terminated = done.clone()
    terminated[1, 4] = False  # truncated, not terminated: bootstraps from next_value
    adv, target = c_torchrl.generalized_advantage_estimate(
        0.99, 0.95, value, next_value, reward, done, terminated
    )
    return {"adv": adv, "target": target}


@case(GAE_CASES, "trl.compute_advantages_and_returns")
def _(backend):
    compat.set_backend(backend)
    r, v = gae_inputs(16, False)
    adv, ret = c_trl.compute_advantages_and_returns(v, r, SEQ_LENGTHS, gamma=1.0, lam=0.95,
                                                    whiten_rewards=True)
    return {"adv": adv, "ret": ret}


@case(GAE_CASES, "nemo.compute_gae")
def _(backend):
    compat.set_backend(backend)
    r, v = gae_inputs(17, False)
    adv, ret = c_nemo.compute_gae(r, v, MASK.float(), gae_lambda=0.95, gae_gamma=0.99,
                                  gae_lambda_value=1.0, length_adaptive_alpha=0.5)
    return {"adv": adv, "ret": ret}


# --- logprobs family: public functions


@case(LOGPROBS_CASES, "token_logprobs-padded-entropy")
def _(backend):
    logits = leaf(randn(B, T, V, seed=20, scale=2.0))
    tg = targets(B, T, seed=21)
    logp, ent = vk.token_logprobs(logits, tg, temperature=0.7, return_entropy=True, mask=MASK,
                                  backend=backend)
    return {"logp": logp, "entropy": ent, **backprop([logp, ent], logits=logits)}


@case(LOGPROBS_CASES, "token_logprobs-packed-inplace-backward")
def _(backend):
    base = leaf(randn(N, V, seed=22, scale=2.0))
    logits = base * 1.0  # not a leaf: the in-place backward overwrites it
    tg = targets(N, seed=23)
    logp, ent = vk.token_logprobs(logits, tg, return_entropy=True, mask=PMASK,
                                  inplace_backward=True, backend=backend)
    return {"logp": logp, "entropy": ent, **backprop([logp, ent], logits=base)}


@case(LOGPROBS_CASES, "token_logprobs-logp-only")
def _(backend):
    logits = leaf(randn(N, V, seed=24, scale=2.0))
    tg = targets(N, seed=25)
    logp = vk.token_logprobs(logits, tg, temperature=1.3, backend=backend)
    return {"logp": logp, **backprop([logp], logits=logits)}


@case(LOGPROBS_CASES, "linear_logprobs-padded-bias-entropy")
def _(backend):
    hidden = leaf(randn(B, T, H, seed=26))
    weight = leaf(randn(V, H, seed=27, scale=0.5))
    bias = leaf(randn(V, seed=28, scale=0.3))
    tg = targets(B, T, seed=29)
    logp, ent = vk.linear_logprobs(hidden, weight, tg, bias=bias, temperature=0.8,
                                   return_entropy=True, mask=MASK, backend=backend)
    return {"logp": logp, "entropy": ent,
            **backprop([logp, ent], hidden=hidden, weight=weight, bias=bias)}


@case(LOGPROBS_CASES, "linear_logprobs-packed")
def _(backend):
    hidden = leaf(randn(N, H, seed=30))
    weight = leaf(randn(V, H, seed=31, scale=0.5))
    tg = targets(N, seed=32)
    logp = vk.linear_logprobs(hidden, weight, tg, mask=PMASK, backend=backend)
    return {"logp": logp, **backprop([logp], hidden=hidden, weight=weight)}


# --- logprobs family: adapters


@case(LOGPROBS_CASES, "verl.logprobs_from_logits")
def _(backend):
    compat.set_backend(backend)
    base = leaf(randn(B, T, V, seed=33, scale=2.0))
    logits = base * 1.0  # non-leaf: verl's in-place backward is used
    logp = c_verl.logprobs_from_logits(logits, targets(B, T, seed=34, ignore=False))
    return {"logp": logp, **backprop([logp], logits=base)}


@case(LOGPROBS_CASES, "verl.entropy_from_logits")
def _(backend):
    compat.set_backend(backend)
    logits = leaf(randn(B, T, V, seed=35, scale=2.0))
    ent = c_verl.entropy_from_logits(logits)
    return {"entropy": ent, **backprop([ent], logits=logits)}


@case(LOGPROBS_CASES, "verl.entropy_from_logits_with_chunking")
def _(backend):
    compat.set_backend(backend)
    logits = leaf(randn(N, V, seed=36, scale=2.0))
    ent = c_verl.entropy_from_logits_with_chunking(logits, chunk_size=4)
    return {"entropy": ent, **backprop([ent], logits=logits)}


@case(LOGPROBS_CASES, "verl.linear_cross_entropy")
def _(backend):
    compat.set_backend(backend)
    hidden = leaf(randn(B, T, H, seed=37))
    weight = leaf(randn(V, H, seed=38, scale=0.5))
    logp, ent = c_verl.linear_cross_entropy(hidden, weight, targets(B, T, seed=39, ignore=False),
                                            temperature=0.9)
    return {"logp": logp, "entropy": ent,
            **backprop([logp, ent], hidden=hidden, weight=weight)}


@case(LOGPROBS_CASES, "openrlhf.log_probs_from_logits")
def _(backend):
    compat.set_backend(backend)
    logits = leaf(randn(B, T, V, seed=40, scale=2.0))
    logp = c_orlhf.log_probs_from_logits(logits, targets(B, T, seed=41, ignore=False),
                                         temperature=0.8)
    return {"logp": logp, **backprop([logp], logits=logits)}


@case(LOGPROBS_CASES, "openrlhf.compute_entropy")
def _(backend):
    compat.set_backend(backend)
    logits = leaf(randn(B, T, V, seed=42, scale=2.0))
    ent = c_orlhf.compute_entropy(logits)
    return {"entropy": ent, **backprop([ent], logits=logits)}


@case(LOGPROBS_CASES, "trl.selective_log_softmax")
def _(backend):
    compat.set_backend(backend)
    logits = leaf(randn(B, T, V, seed=43, scale=2.0))
    one = c_trl.selective_log_softmax(logits, targets(B, T, seed=44, ignore=False))
    topk = c_trl.selective_log_softmax(logits, torch.randint(0, V, (B, T, 3), generator=_g(45)))
    return {"logp": one, "logp_topk": topk, **backprop([one, topk], logits=logits)}


@case(LOGPROBS_CASES, "trl.entropy_from_logits")
def _(backend):
    compat.set_backend(backend)
    logits = leaf(randn(B, T, V, seed=46, scale=2.0))
    ent = c_trl.entropy_from_logits(logits)
    return {"entropy": ent, **backprop([ent], logits=logits)}


# --- loss family: public functions


@case(LOSS_CASES, "vapo_loss-padded-all-terms")
def _(backend):
    logp, old, adv = policy_inputs(50, (B, T))
    values, old_values, returns = value_inputs(53, (B, T))
    entropy = leaf(torch.rand(B, T, generator=_g(56)) * 2)
    ref = old + randn(B, T, seed=57, scale=0.2)
    is_w = torch.rand(B, T, generator=_g(58)) + 0.5
    loss, m = vk.vapo_loss(
        logp, old, adv, MASK, values=values, old_values=old_values, returns=returns,
        ref_logp=ref, entropy=entropy, positive=torch.tensor([True, False, True]),
        is_weights=is_w, dual_clip=3.0, value_clip=0.2, vf_coef=0.5, kl_kind="k3",
        kl_coef=0.1, entropy_coef=0.01, lm_coef=0.1, agg="seq-mean-token-mean",
        backend=backend,
    )
    return {"loss": loss, **metrics_out("m", m),
            **backprop([loss], logp=logp, values=values, entropy=entropy)}


@case(LOSS_CASES, "vapo_loss-packed-all-terms")
def _(backend):
    logp, old, adv = policy_inputs(60, (N,))
    values, old_values, returns = value_inputs(63, (N,))
    entropy = leaf(torch.rand(N, generator=_g(66)) * 2)
    ref = old + randn(N, seed=67, scale=0.2)
    loss, m = vk.vapo_loss(
        logp, old, adv, PMASK, CU, values=values, old_values=old_values, returns=returns,
        ref_logp=ref, entropy=entropy, positive=torch.tensor([1, 0, 1, 1]),
        value_clip=0.1, value_clip_form="openrlhf", kl_kind="k2", kl_coef=0.05,
        entropy_coef=0.02, agg="seq-mean-token-sum-norm", loss_scale_factor=8, backend=backend,
    )
    return {"loss": loss, **metrics_out("m", m),
            **backprop([loss], logp=logp, values=values, entropy=entropy)}


@case(LOSS_CASES, "policy_loss-padded-dual-clip")
def _(backend):
    logp, old, adv = policy_inputs(70, (B, T))
    loss, m = vk.policy_loss(logp, old, adv, MASK, dual_clip=3.0, backend=backend)
    return {"loss": loss, **metrics_out("m", m), **backprop([loss], logp=logp)}


@case(LOSS_CASES, "policy_loss-packed-global")
def _(backend):
    logp, old, adv = policy_inputs(73, (N,))
    is_w = torch.rand(N, generator=_g(76)) + 0.5
    loss, m = vk.policy_loss(logp, old, adv, PMASK, CU, clip_low=0.1, clip_high=0.3,
                             is_weights=is_w, agg="seq-mean-token-sum", global_seqs=6.0,
                             dp_size=2, backend=backend)
    return {"loss": loss, **metrics_out("m", m), **backprop([loss], logp=logp)}


@case(LOSS_CASES, "value_loss-padded-verl")
def _(backend):
    values, old, returns = value_inputs(80, (B, T))
    loss, m = vk.value_loss(values, old, returns, MASK, value_clip=0.2, backend=backend)
    return {"loss": loss, **metrics_out("m", m), **backprop([loss], values=values)}


@case(LOSS_CASES, "value_loss-packed-openrlhf")
def _(backend):
    values, old, returns = value_inputs(83, (N,))
    loss, m = vk.value_loss(values, old, returns, PMASK, CU, value_clip=0.1,
                            value_clip_form="openrlhf", agg="token-sum", backend=backend)
    return {"loss": loss, **metrics_out("m", m), **backprop([loss], values=values)}


@case(LOSS_CASES, "value_loss-unclipped")
def _(backend):
    values, _, returns = value_inputs(86, (B, T))
    loss, m = vk.value_loss(values, None, returns, MASK, value_clip=None,
                            agg="seq-mean-token-mean", backend=backend)
    return {"loss": loss, **metrics_out("m", m), **backprop([loss], values=values)}


@case(LOSS_CASES, "kl_loss-padded-k3")
def _(backend):
    logp, ref, _ = policy_inputs(90, (B, T))
    loss, m = vk.kl_loss(logp, ref, MASK, kl_kind="k3", backend=backend)
    return {"loss": loss, **metrics_out("m", m), **backprop([loss], logp=logp)}


@case(LOSS_CASES, "kl_loss-packed-k2-straight")
def _(backend):
    logp, ref, _ = policy_inputs(93, (N,))
    loss, m = vk.kl_loss(logp, ref, PMASK, CU, kl_kind="low_var_kl+", agg="seq-mean-token-mean",
                         backend=backend)
    return {"loss": loss, **metrics_out("m", m), **backprop([loss], logp=logp)}


@case(LOSS_CASES, "agg_loss-padded-seq-norm")
def _(backend):
    mat = leaf(randn(B, T, seed=96))
    loss, m = vk.agg_loss(mat, MASK, agg="seq-mean-token-sum-norm", loss_scale_factor=4,
                          backend=backend)
    return {"loss": loss, **metrics_out("m", m), **backprop([loss], mat=mat)}


@case(LOSS_CASES, "agg_loss-packed-global-tokens")
def _(backend):
    mat = leaf(randn(N, seed=97))
    loss, m = vk.agg_loss(mat, PMASK, CU, agg="token-mean", global_tokens=20.0, dp_size=2,
                          backend=backend)
    return {"loss": loss, **metrics_out("m", m), **backprop([loss], mat=mat)}


@case(LOSS_CASES, "positive_lm_loss-padded")
def _(backend):
    logp, _, _ = policy_inputs(100, (B, T))
    loss, m = vk.positive_lm_loss(logp, torch.tensor([True, False, True]), MASK, backend=backend)
    return {"loss": loss, **metrics_out("m", m), **backprop([loss], logp=logp)}


@case(LOSS_CASES, "positive_lm_loss-packed-global")
def _(backend):
    logp, _, _ = policy_inputs(103, (N,))
    loss, m = vk.positive_lm_loss(logp, torch.tensor([0, 1, 1, 0]), PMASK, CU,
                                  global_positive_tokens=9.0, backend=backend)
    return {"loss": loss, **metrics_out("m", m), **backprop([loss], logp=logp)}


def logits_loss_inputs(seed: int, rows):
    logits = randn(*rows, V, seed=seed, scale=2.0)
    tg = targets(*rows, seed=seed + 1)
    old = -torch.rand(rows, generator=_g(seed + 2)) * 3 - 1
    adv = randn(*rows, seed=seed + 3)
    ref = old + randn(*rows, seed=seed + 4, scale=0.2)
    return logits, tg, old, adv, ref


@case(LOSS_CASES, "policy_loss_from_logits-padded")
def _(backend):
    logits, tg, old, adv, ref = logits_loss_inputs(110, (B, T))
    logits = leaf(logits)
    loss, m = vk.policy_loss_from_logits(
        logits, tg, old, adv, MASK, temperature=0.9, dual_clip=3.0, ref_logp=ref, kl_coef=0.1,
        entropy_coef=0.01, positive=torch.tensor([True, True, False]), lm_coef=0.1,
        agg="seq-mean-token-mean", backend=backend,
    )
    return {"loss": loss, **metrics_out("m", m), **backprop([loss], logits=logits)}


@case(LOSS_CASES, "policy_loss_from_logits-packed-inplace")
def _(backend):
    logits, tg, old, adv, ref = logits_loss_inputs(120, (N,))
    base = leaf(logits)
    loss, m = vk.policy_loss_from_logits(
        base * 1.0, tg, old, adv, PMASK, CU, inplace_backward=True, entropy_coef=0.02,
        agg="token-mean", backend=backend,
    )
    return {"loss": loss, **metrics_out("m", m), **backprop([loss], logits=base)}


@case(LOSS_CASES, "policy_loss_from_logits-no-grad")
def _(backend):
    logits, tg, old, adv, ref = logits_loss_inputs(125, (N,))
    loss, m = vk.policy_loss_from_logits(logits, tg, old, adv, PMASK, CU, ref_logp=ref,
                                         kl_coef=0.1, agg="seq-mean-token-sum", backend=backend)
    return {"loss": loss, **metrics_out("m", m)}


@case(LOSS_CASES, "policy_loss_from_hidden-padded-bias")
def _(backend):
    _, tg, old, adv, ref = logits_loss_inputs(130, (B, T))
    hidden = leaf(randn(B, T, H, seed=135))
    weight = leaf(randn(V, H, seed=136, scale=0.5))
    bias = leaf(randn(V, seed=137, scale=0.3))
    loss, m = vk.policy_loss_from_hidden(
        hidden, weight, tg, old, adv, MASK, bias=bias, temperature=0.9, dual_clip=3.0,
        ref_logp=ref, kl_coef=0.1, entropy_coef=0.01, agg="seq-mean-token-mean",
        backend=backend,
    )
    return {"loss": loss, **metrics_out("m", m),
            **backprop([loss], hidden=hidden, weight=weight, bias=bias)}


@case(LOSS_CASES, "policy_loss_from_hidden-packed")
def _(backend):
    _, tg, old, adv, _ = logits_loss_inputs(140, (N,))
    hidden = leaf(randn(N, H, seed=145))
    weight = leaf(randn(V, H, seed=146, scale=0.5))
    loss, m = vk.policy_loss_from_hidden(hidden, weight, tg, old, adv, PMASK, CU,
                                         positive=torch.tensor([1, 0, 0, 1]), backend=backend)
    return {"loss": loss, **metrics_out("m", m),
            **backprop([loss], hidden=hidden, weight=weight)}


# --- loss family: adapters


class _VerlActorConfig(dict):
    """The fields of verl's ActorConfig that compute_policy_loss_vanilla reads."""

    def __init__(self):
        super().__init__(clip_ratio_c=3.0)
        self.clip_ratio, self.clip_ratio_low, self.clip_ratio_high = 0.2, 0.2, 0.28
        self.global_batch_info = {}


@case(LOSS_CASES, "verl.compute_policy_loss_vanilla")
def _(backend):
    compat.set_backend(backend)
    logp, old, adv = policy_inputs(150, (B, T))
    is_w = torch.rand(B, T, generator=_g(153)) + 0.5
    loss, m = c_verl.compute_policy_loss_vanilla(
        old, logp, adv, MASK.float(), "seq-mean-token-sum", _VerlActorConfig(),
        rollout_is_weights=is_w,
    )
    return {"loss": loss, **metrics_out("m", m), **backprop([loss], logp=logp)}


@case(LOSS_CASES, "verl.agg_loss")
def _(backend):
    compat.set_backend(backend)
    mat = leaf(randn(B, T, seed=155))
    loss = c_verl.agg_loss(mat, MASK.float(), "seq-mean-token-mean")
    return {"loss": loss, **backprop([loss], mat=mat)}


@case(LOSS_CASES, "verl.compute_value_loss")
def _(backend):
    compat.set_backend(backend)
    vpreds, old, returns = value_inputs(157, (B, T))
    loss, clipfrac = c_verl.compute_value_loss(vpreds, returns, old, MASK.float(), 0.2,
                                               loss_agg_mode="token-mean")
    return {"loss": loss, "clipfrac": clipfrac, **backprop([loss], vpreds=vpreds)}


@case(LOSS_CASES, "verl.kl_penalty", kernel=False)
def _(backend):
    compat.set_backend(backend)
    logp, ref, _ = policy_inputs(160, (B, T))
    out = {}
    for kind in ("low_var_kl", "mse", "k1+"):
        out[kind] = c_verl.kl_penalty(logp, ref, kind)
    return {**out, **backprop(list(out.values()), logp=logp)}


@case(LOSS_CASES, "openrlhf.PolicyLoss")
def _(backend):
    compat.set_backend(backend)
    logp, old, adv = policy_inputs(165, (B, T))
    loss, clip_ratio, ppo_kl, vllm_kl, filt = c_orlhf.PolicyLoss(
        clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0
    )(logp, old, adv, action_mask=MASK)
    assert vllm_kl is None and filt is None
    return {"loss": loss, "clip_ratio": clip_ratio, "ppo_kl": ppo_kl,
            **backprop([loss], logp=logp)}


@case(LOSS_CASES, "openrlhf.ValueLoss")
def _(backend):
    compat.set_backend(backend)
    values, old, returns = value_inputs(170, (B, T))
    loss = c_orlhf.ValueLoss(clip_eps=0.2, token_level_loss=False)(values, old, returns,
                                                                  action_mask=MASK)
    return {"loss": loss, **backprop([loss], values=values)}


@case(LOSS_CASES, "openrlhf.aggregate_loss")
def _(backend):
    compat.set_backend(backend)
    mat = leaf(randn(B, T, seed=175))
    tok = c_orlhf.aggregate_loss(mat, MASK, token_level_loss=True)
    seq = c_orlhf.aggregate_loss(mat, MASK, token_level_loss=False)
    return {"token": tok, "sample": seq, **backprop([tok, seq], mat=mat)}


@case(LOSS_CASES, "trl.ppo_loss")
def _(backend):
    compat.set_backend(backend)
    logp, old, adv = policy_inputs(180, (B, T))
    vpred, old_v, returns = value_inputs(183, (B, T))
    pos = torch.arange(T)
    padding_mask = pos > SEQ_LENGTHS[:, None]
    padding_mask_p1 = pos > SEQ_LENGTHS[:, None] + 1
    loss, pg, vf, pg_cf, vf_cf = c_trl.ppo_loss(logp, old, adv, vpred, old_v, returns,
                                               padding_mask, padding_mask_p1, cliprange=0.2,
                                               cliprange_value=0.2, vf_coef=0.1)
    return {"loss": loss, "pg_loss": pg, "vf_loss": vf, "pg_clipfrac": pg_cf,
            "vf_clipfrac": vf_cf, **backprop([loss], logp=logp, vpred=vpred)}


CASES = {"gae": GAE_CASES, "logprobs": LOGPROBS_CASES, "loss": LOSS_CASES}

# --------------------------------------------------------------------------------------
# The parametrisation: what available_backends reports for each family, here and now.

AVAILABLE = {family: vk.available_backends(family, "cpu") for family in FAMILIES}

PARAMS = [
    pytest.param(family, backend, name, id=f"{family}-{backend}-{name}")
    for family in FAMILIES
    for backend in AVAILABLE[family]
    for name in CASES[family]
]


@pytest.fixture(autouse=True)
def compat_backend(monkeypatch):
    """No VAPO_BACKEND from the environment; the adapters' backend restored after."""
    monkeypatch.delenv("VAPO_BACKEND", raising=False)
    saved = compat.get_backend()
    yield
    compat.set_backend(saved)


@pytest.fixture
def selections(monkeypatch):
    """Every ``_backends.select`` call: (op, backend asked for, backend chosen)."""
    log: list[tuple[str, str | None, str]] = []
    real = _backends.select

    def spy(op, device, backend=None):
        name, kernel = real(op, device, backend)
        log.append((op, backend or None, name))
        return name, kernel

    monkeypatch.setattr(_backends, "select", spy)
    return log


_REFERENCE: dict[str, dict[str, torch.Tensor]] = {}


def reference_result(family: str, name: str, poisoned) -> dict[str, torch.Tensor]:
    if name not in _REFERENCE:
        with poisoned():
            _REFERENCE[name] = CASES[family][name]("reference")
        compat.set_backend(None)
    return _REFERENCE[name]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_reports_its_backends(family):
    """Every family has at least the reference backend (else its functions go untested
    here: they are parametrised over what it reports), its ops are registered, and it
    reports only known backend names."""
    got = AVAILABLE[family]
    unregistered = [
        op for op in _backends.FAMILIES[family] if (op, "reference") not in _backends._kernels
    ]
    assert not unregistered, (
        f"_backends.FAMILIES[{family!r}] names ops with no registered kernel: {unregistered}; "
        f"registered ops: {sorted({op for op, _ in _backends._kernels})}"
    )
    assert "reference" in got, (
        f"available_backends({family!r}, 'cpu') = {got}: no backend reported for the "
        f"family (its primary op is {_backends.FAMILIES[family][0]!r})"
    )
    assert set(got) <= set(_backends.BACKENDS)


@pytest.mark.parametrize("family, backend, name", PARAMS)
def test_every_backend(family, backend, name, selections, poisoned):
    ref = reference_result(family, name, poisoned)
    selections.clear()
    with poisoned():
        got = CASES[family][name](backend)

    # The function ran under the named backend: every kernel it selected was asked for
    # by that name, and each op ran that backend's kernel whenever it has one.
    if name not in NO_KERNEL:
        assert selections, f"{name} selected no kernel under backend={backend!r}"
    for op, asked, chosen in selections:
        assert asked == backend, (
            f"{name}: op {op!r} was asked for backend {asked!r}, not {backend!r}"
        )
        if (op, backend) in _backends._kernels:
            assert chosen == backend, f"{name}: op {op!r} ran {chosen!r}, not {backend!r}"

    # Same outputs, metrics and gradients as the reference.
    assert set(got) == set(ref)
    assert any(bool((t != 0).any()) for t in got.values()), f"{name}: every output is 0"
    for key in ref:
        assert got[key] is not None, f"{name}: {key} is None"
        torch.testing.assert_close(
            got[key], ref[key], rtol=RTOL, atol=ATOL,
            msg=lambda m, key=key: f"{name}[{key}] under backend={backend!r}: {m}",
        )
