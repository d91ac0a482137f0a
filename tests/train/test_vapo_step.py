"""The trainer's advantages and loss are exactly vapo_kernels' ops on a recorded batch, and
each VAPO switch reaches the op argument it should."""

from __future__ import annotations

import random

import pytest
import torch

import vapo_kernels as vk
from vapo_kernels.train.cli import build_policy, build_task
from vapo_kernels.train.models import value_model_from_policy
from vapo_kernels.train.rollout import policy_logprobs, value_estimates
from vapo_kernels.train.vapo import (
    GlobalCounts,
    OldOutputs,
    TrainState,
    compute_advantages,
    micro_batch_loss,
    ppo_update,
    rollout,
    sample_problems,
    setup_rl,
)
from vapo_kernels.train.metrics import PhaseTimer

from .conftest import tiny_config


def recorded(tmp_path, *extra: str):
    """A config, the state after setup, one rollout batch and its no-grad outputs."""
    config = tiny_config(tmp_path, "--prompts_per_step", "4", "--group_size", "2",
                         "--mini_batches", "2", *extra)
    torch.manual_seed(0)
    task = build_task(config)
    policy, tokenizer = build_policy(config, task)
    state = TrainState(policy=policy, tokenizer=tokenizer, task_rng=random.Random(0))
    setup_rl(state, config, value_model_from_policy)
    with torch.no_grad():  # a critic that is not all zeros, so values matter
        for p in state.value_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = rollout(state, task, config)
    batch.scores[:2] = 1.0  # some positive sequences for the LM term, whatever the policy did
    batch.rewards[batch.cu_seqlens[1:3].long() - 1] = 1.0
    with torch.no_grad():
        logp, _ = policy_logprobs(policy, batch, temperature=1.0, logprobs_from="logits",
                                  packed=False)
        values = value_estimates(state.value_model, batch, packed=False)
    return config, state, batch, logp, values


def test_advantages_are_one_decoupled_gae_call(tmp_path):
    config, state, batch, logp, values = recorded(tmp_path)
    adv, targets, lam = compute_advantages(batch, values, config)
    want_adv, want_targets = vk.decoupled_gae(batch.rewards, values, None, batch.cu_seqlens,
                                              gamma=1.0, lam_critic=1.0, alpha=1.0, whiten=True)
    torch.testing.assert_close(adv, want_adv, rtol=0, atol=0)
    torch.testing.assert_close(targets, want_targets, rtol=0, atol=0)
    torch.testing.assert_close(lam, vk.length_adaptive_lambda(batch.response_lengths, 1.0))
    # lambda_critic = 1, gamma = 1: the value targets are the Monte-Carlo returns
    rtg = torch.repeat_interleave(batch.scores, batch.response_lengths)
    torch.testing.assert_close(targets, rtg, rtol=0, atol=1e-6)


def test_no_decoupled_gae_gives_the_critic_the_policy_lambda(tmp_path):
    config, state, batch, logp, values = recorded(tmp_path, "--ablation", "no_decoupled_gae")
    _, targets, lam = compute_advantages(batch, values, config)
    _, want = vk.decoupled_gae(batch.rewards, values, None, batch.cu_seqlens, lam_critic=lam,
                               lam_policy=lam)
    torch.testing.assert_close(targets, want, rtol=0, atol=0)
    _, mc = vk.decoupled_gae(batch.rewards, values, None, batch.cu_seqlens, lam_critic=1.0,
                             alpha=1.0)
    assert not torch.equal(targets, mc)


def test_no_length_adaptive_uses_the_fixed_lambda(tmp_path):
    config, state, batch, logp, values = recorded(tmp_path, "--no_length_adaptive",
                                                  "--lam_policy", "0.9", "--no_whiten_advantages")
    adv, _, lam = compute_advantages(batch, values, config)
    assert torch.all(lam == 0.9)
    want, _ = vk.decoupled_gae(batch.rewards, values, None, batch.cu_seqlens, lam_policy=0.9)
    torch.testing.assert_close(adv, want, rtol=0, atol=0)


# The op arguments each configuration must produce (written out, not read from the config).
PAPER = dict(clip_low=0.2, clip_high=0.28, value_clip=0.5, vf_coef=1.0, lm_coef=0.1,
             agg="token-mean", kl_coef=0.0, entropy_coef=0.0, dual_clip=None)
SWITCHES = [
    ((), {}),
    (("--ablation", "no_clip_higher"), {"clip_high": 0.2}),
    (("--ablation", "no_token_level"), {"agg": "seq-mean-token-mean"}),
    (("--ablation", "no_lm_loss"), {"lm_coef": 0.0}),
    (("--value_clip", "0"), {"value_clip": None}),
    (("--dual_clip", "3"), {"dual_clip": 3.0}),
    (("--kl_coef", "0.05"), {"kl_coef": 0.05}),
    (("--entropy_coef", "0.01"), {"entropy_coef": 0.01}),
]


@pytest.mark.parametrize("argv, changes", SWITCHES, ids=lambda x: "-".join(x) if isinstance(x, tuple) else None)
def test_loss_is_one_vapo_loss_call_with_the_switches(tmp_path, argv, changes):
    config, state, batch, logp, values = recorded(tmp_path, *argv)
    adv, targets, _ = compute_advantages(batch, values, config)
    # an off-policy batch so that clipping, ratios and value clipping all take effect
    gen = torch.Generator().manual_seed(1)
    old_logp = logp + 0.4 * torch.randn(logp.shape, generator=gen)
    old_values = values + 0.6 * torch.randn(values.shape, generator=gen)
    ref = logp - 0.3 * torch.rand(logp.shape, generator=gen) if state.reference is not None else None
    old = OldOutputs(old_logp, old_values, adv, targets, ref)
    counts = GlobalCounts.of(batch)

    loss, metrics = micro_batch_loss(state, batch, old, counts, config)
    loss.backward()
    got_grads = [p.grad.clone() for p in state.policy.parameters()]
    state.policy.zero_grad()

    kw = {**PAPER, **changes}
    new_logp, entropy = policy_logprobs(state.policy, batch, temperature=1.0,
                                        logprobs_from="logits", packed=False)
    new_values = value_estimates(state.value_model, batch, packed=False)
    want, want_metrics = vk.vapo_loss(
        new_logp, old_logp, adv, None, batch.cu_seqlens, values=new_values,
        old_values=old_values if kw["value_clip"] else None, returns=targets, ref_logp=ref,
        entropy=entropy if kw["entropy_coef"] else entropy.detach(),
        positive=batch.scores > 0 if kw["lm_coef"] else None, kl_kind="k3", **kw)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    assert metrics.keys() == want_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key], want_metrics[key], rtol=0, atol=0)
    for got, p in zip(got_grads, state.policy.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=0, atol=0)
    if "lm_coef" in changes:
        assert "lm_loss" not in metrics
    if "kl_coef" in changes:
        assert "kl_loss" in metrics


def test_micro_batches_accumulate_to_the_mini_batch_loss(tmp_path):
    """Global counts make micro-batch losses exact shares of one vapo_loss over the mini-batch."""
    config, state, batch, logp, values = recorded(tmp_path, "--micro_batch_size", "1")
    adv, targets, _ = compute_advantages(batch, values, config)
    old = OldOutputs(logp + 0.1, values, adv, targets, None)
    counts = GlobalCounts.of(batch)
    total = 0.0
    for i in range(batch.size):
        index = torch.tensor([i])
        micro = batch.select(index)
        loss, _ = micro_batch_loss(state, micro, old.select(batch.token_index(index)), counts, config)
        total = total + loss
    whole, _ = micro_batch_loss(state, batch, old, counts, config)
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-6)


def test_ppo_update_moves_both_models_and_reports_metrics(tmp_path):
    config, state, batch, logp, values = recorded(tmp_path)
    adv, targets, _ = compute_advantages(batch, values, config)
    before = [p.clone() for p in (*state.policy.parameters(), *state.value_model.parameters())]
    row, _ = ppo_update(state, batch, OldOutputs(logp, values, adv, targets, None), config,
                        PhaseTimer())
    after = list((*state.policy.parameters(), *state.value_model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    for key in ("pg_loss", "vf_loss", "clipfrac_low", "clipfrac_high", "approx_kl", "ratio_min",
                "ratio_max", "vf_clipfrac", "explained_var", "entropy", "lm_loss",
                "actor_grad_norm"):
        assert key in row, key


def test_group_sampling_repeats_prompts_and_its_ablation_does_not(tmp_path):
    for argv, distinct in (((), 4), (("--ablation", "no_group_sampling"), 8)):
        config = tiny_config(tmp_path, "--prompts_per_step", "4", "--group_size", "2", *argv)
        task = build_task(config)
        state = TrainState(policy=None, tokenizer=None, task_rng=random.Random(0))
        problems = sample_problems(state, task, config)
        assert len(problems) == 8
        assert len({(p.prompt, i // (8 // distinct)) for i, p in enumerate(problems)}) == distinct
