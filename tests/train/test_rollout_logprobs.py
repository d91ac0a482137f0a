"""The rollout engine's own log-probs: recorded as generate samples, they are the policy's
log-probs of the sampled tokens (the distribution sampled from is exactly the one the loss
assumes, whatever a model folder's generation_config says), and the trainer passes them to
vapo_loss's rollout correction."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

import vapo_kernels as vk
from vapo_kernels.train.config import ConfigError
from vapo_kernels.train.models import value_model_from_policy
from vapo_kernels.train.rollout import generate, policy_logprobs
from vapo_kernels.train.vapo import (
    GlobalCounts,
    OldOutputs,
    TrainState,
    compute_advantages,
    micro_batch_loss,
    rollout,
    setup_rl,
)

from .conftest import tiny_config, tiny_policy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_logprobs_are_the_policys(tmp_path, temperature):
    _, task, policy, tokenizer = tiny_policy(tmp_path)
    problems = task.sample(random.Random(0), 6)
    batch = generate(policy, tokenizer, problems, task, max_new_tokens=12,
                     temperature=temperature, record_logprobs=True)
    assert batch.rollout_logp is not None and batch.rollout_logp.shape == (batch.num_tokens,)
    with torch.no_grad():
        logp, _ = policy_logprobs(policy, batch, temperature=temperature,
                                  logprobs_from="logits", packed=False)
    # generate's KV-cache forward against one full forward: the same numbers up to rounding
    torch.testing.assert_close(batch.rollout_logp, logp, rtol=0, atol=1e-5)
    sub = batch.select(torch.tensor([4, 1]))
    torch.testing.assert_close(sub.rollout_logp, logp[batch.token_index(torch.tensor([4, 1]))])


def test_a_folders_generation_config_does_not_change_the_sampling(tmp_path):
    """Qwen-style generation_config.json (repetition penalty, top-k, top-p) in the model
    folder: the rollouts still come from log_softmax(logits / temperature)."""
    _, task, policy, tokenizer = tiny_policy(tmp_path)
    policy.generation_config.do_sample = True
    policy.generation_config.repetition_penalty = 3.0
    policy.generation_config.top_k = 2
    policy.generation_config.top_p = 0.5
    policy.generation_config.temperature = 0.3
    folder = tmp_path / "model"
    policy.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.generation_config.repetition_penalty == 3.0
    problems = task.sample(random.Random(1), 6)
    batch = generate(loaded, tokenizer, problems, task, max_new_tokens=12, temperature=1.0,
                     record_logprobs=True)
    with torch.no_grad():
        logp, _ = policy_logprobs(loaded, batch, temperature=1.0, logprobs_from="logits",
                                  packed=False)
    torch.testing.assert_close(batch.rollout_logp, logp, rtol=0, atol=1e-5)


def test_record_logprobs_refuses_prefixes(tmp_path):
    _, task, policy, tokenizer = tiny_policy(tmp_path)
    problems = task.sample(random.Random(0), 2)
    with pytest.raises(ValueError, match="response_prefixes"):
        generate(policy, tokenizer, problems, task, max_new_tokens=4, temperature=1.0,
                 response_prefixes=[tokenizer(t, add_special_tokens=False).input_ids
                                    for t in ("1", "2")], record_logprobs=True)


@pytest.mark.parametrize("level, mode", [("token", "truncate"), ("sequence", "mask"),
                                         ("geometric", "truncate")])
def test_trainer_loss_is_vapo_loss_with_the_rollout_correction(tmp_path, level, mode):
    config, task, policy, tokenizer = tiny_policy(
        tmp_path, "--rollout_is", level, "--rollout_is_mode", mode,
        "--rollout_is_threshold", "1.5")
    state = TrainState(policy=policy, tokenizer=tokenizer, task_rng=random.Random(0))
    setup_rl(state, config, value_model_from_policy)
    batch = rollout(state, task, config)
    assert batch.rollout_logp is not None
    # an engine whose log-probs are off (vLLM in bf16, say), so the weights matter
    gen = torch.Generator().manual_seed(3)
    batch.rollout_logp = batch.rollout_logp + 0.3 * torch.randn(batch.num_tokens, generator=gen)
    with torch.no_grad():
        logp, _ = policy_logprobs(policy, batch, temperature=1.0, logprobs_from="logits",
                                  packed=False)
    values = 0.1 * torch.randn(batch.num_tokens, generator=gen)
    adv, targets, _ = compute_advantages(batch, values, config)
    old = OldOutputs(logp, values, adv, targets, None)
    loss, metrics = micro_batch_loss(state, batch, old, GlobalCounts.of(batch), config)

    new_logp, entropy = policy_logprobs(policy, batch, temperature=1.0, logprobs_from="logits",
                                        packed=False)
    from vapo_kernels.train.rollout import value_estimates
    new_values = value_estimates(state.value_model, batch, packed=False)
    a = config.algorithm
    want, want_metrics = vk.vapo_loss(
        new_logp, logp, adv, None, batch.cu_seqlens, values=new_values, old_values=values,
        returns=targets, entropy=entropy.detach(), positive=batch.scores > 0,
        clip_low=a.clip_low, clip_high=a.clip_high, value_clip=a.value_clip, lm_coef=a.lm_coef,
        rollout_logp=batch.rollout_logp, rollout_is=level, rollout_is_mode=mode,
        rollout_is_threshold=1.5)
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    assert metrics.keys() == want_metrics.keys()
    assert "rollout_is_mean" in metrics and "rollout_kl" in metrics
    for key in metrics:
        torch.testing.assert_close(metrics[key], want_metrics[key], rtol=0, atol=0)


def test_without_rollout_is_no_logprobs_are_recorded(tmp_path):
    config, task, policy, tokenizer = tiny_policy(tmp_path)
    state = TrainState(policy=policy, tokenizer=tokenizer, task_rng=random.Random(0))
    setup_rl(state, config, value_model_from_policy)
    assert rollout(state, task, config).rollout_logp is None


@pytest.mark.parametrize("argv, option", [
    (("--rollout_is_threshold", "0"), "rollout-is-threshold"),
    (("--rollout_is", "token", "--rollout_is_threshold", "inf"), "rollout-is-threshold"),
    (("--rollout_engine", "vllm"), "rollout-engine"),
    (("--rollout_is", "token", "--rollout_is_mode", "mask", "--rollout_is_threshold", "0.5"),
     "rollout-is-threshold"),
])
def test_rollout_option_errors(tmp_path, argv, option):
    with pytest.raises(ConfigError) as error:
        tiny_config(tmp_path, *argv)
    assert error.value.option == option


def test_rollout_weight_ranges_accumulate_as_extremes():
    from vapo_kernels.train.vapo import MetricAccumulator

    acc = MetricAccumulator()
    for low, high in ((0.5, 1.5), (0.8, 3.0)):
        acc.add({"tokens": torch.tensor(10.0), "rollout_is_min": torch.tensor(low),
                 "rollout_is_max": torch.tensor(high), "rollout_kl": torch.tensor(low)})
    row = acc.row()
    assert row["rollout_is_min"] == 0.5 and row["rollout_is_max"] == 3.0
    assert row["rollout_kl"] == pytest.approx(0.65)
