"""Dropout is off in every phase (eval mode, as verl): with one PPO epoch and one
mini-batch the policy ratio of a GPT-2 with dropout 0.1 is exactly 1."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from vapo_kernels.train import distributed
from vapo_kernels.train.cli import _value_model_maker, build_task, train
from vapo_kernels.train.distributed import DataParallel
from vapo_kernels.train.models import build_char_tokenizer, dropout_off
from vapo_kernels.train.rollout import demonstration_batch, value_estimates
from vapo_kernels.train.vapo import TrainState, setup_rl

from .conftest import read_rows, tiny_config


def gpt2_with_dropout(folder, alphabet: str, dropout: float = 0.1) -> str:
    """A tiny GPT-2 folder (dropout on, as GPT-2's default config has it) with a character
    tokenizer for ``alphabet``."""
    tokenizer = build_char_tokenizer(alphabet)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1,
                        n_head=2, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_first_ppo_ratio_is_exactly_one_with_dropout_in_the_model(tmp_path):
    task = build_task(tiny_config(tmp_path / "t"))
    model = gpt2_with_dropout(tmp_path / "gpt2", task.alphabet)
    threads = torch.get_num_threads()
    try:
        train(tiny_config(tmp_path, "--model", model, "--warmup_steps", "0",
                          "--value_pretrain_steps", "0", "--steps", "1", "--ppo_epochs", "1",
                          "--mini_batches", "1", "--threads", "1", "--no_save_checkpoint"))
    finally:
        torch.set_num_threads(threads)
    row = [r for r in read_rows(tmp_path / "run") if r["phase"] == "rl" and r["step"] == 1][0]
    assert row["ratio_min"] == 1.0 and row["ratio_max"] == 1.0, row
    assert row["vf_clipfrac"] == 0.0 and row["approx_kl"] == 0.0, row


def test_value_model_runs_in_eval_mode_and_checkpointed_layers_still_recompute(tmp_path):
    config = tiny_config(tmp_path, "--activation_checkpointing")
    task = build_task(config)
    folder = gpt2_with_dropout(tmp_path / "gpt2", task.alphabet)
    from vapo_kernels.train.models import load_policy, load_tokenizer

    policy = dropout_off(distributed.prepare_model(load_policy(folder, "sdpa"), config,
                                                   DataParallel()))
    state = TrainState(policy=policy, tokenizer=load_tokenizer(folder))
    setup_rl(state, config, _value_model_maker(config, DataParallel()))
    value = state.value_model
    dropouts = [m for m in value.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and not any(m.training for m in dropouts)
    import random

    batch = demonstration_batch(state.tokenizer, task, random.Random(0), 4)
    with torch.no_grad():
        head = value.get_submodule("classifier")
        torch.nn.init.normal_(head.weight)  # a non-zero head: values depend on the backbone
        first = value_estimates(value, batch, packed=False)
    # the loss forward (with gradient) gives the very values the no-grad forward gave
    calls = []
    # a sub-module of the layer: its hook fires in the forward and again in the recompute
    policy.transformer.h[0].attn.register_forward_hook(lambda *a: calls.append(1))
    again = value_estimates(value, batch, packed=False)
    assert torch.equal(first, again.detach())
    again.sum().backward()
    from vapo_kernels.train.rollout import policy_logprobs

    logp, _ = policy_logprobs(policy, batch, temperature=1.0, logprobs_from="logits",
                              packed=False)
    logp.sum().backward()
    assert len(calls) == 2  # forward + the recompute in backward: checkpointing still on
    assert not any(m.training for m in policy.modules() if isinstance(m, torch.nn.Dropout))
