"""--micro_batch_size / --max_tokens_per_microbatch bound every forward, not only the RL
loss's: the no-grad old log-prob / value / reference forwards and value pretraining's
forward run in the same micro-batch pieces, with the same numbers up to float rounding."""

from __future__ import annotations

import random
import time

import pytest
import torch

from vapo_kernels.train import vapo
from vapo_kernels.train.cli import _value_model_maker, build_policy, build_task
from vapo_kernels.train.distributed import DataParallel
from vapo_kernels.train.metrics import MetricsLogger, PhaseTimer

from .conftest import tiny_config

ARGS = ("--prompts_per_step", "8", "--group_size", "2", "--mini_batches", "1",
        "--kl_coef", "0.1", "--threads", "1")


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _state(tmp_path, *extra):
    config = tiny_config(tmp_path, *ARGS, *extra)
    task = build_task(config)
    torch.manual_seed(0)
    policy, tokenizer = build_policy(config, task)
    state = vapo.TrainState(policy=policy, tokenizer=tokenizer, task_rng=random.Random(0))
    state.shuffle_generator.manual_seed(0)
    vapo.setup_rl(state, config, _value_model_maker(config, DataParallel()))
    state.warmup_end_time = time.perf_counter()
    return config, task, state


def _spy(monkeypatch):
    sizes = []
    for name in ("policy_logprobs", "value_estimates"):
        fn = getattr(vapo, name)

        def spy(model, batch, _fn=fn, **kw):
            sizes.append((torch.is_grad_enabled(), batch.size, int(batch.input_ids.numel())))
            return _fn(model, batch, **kw)
        monkeypatch.setattr(vapo, name, spy)
    return sizes


def test_no_grad_forwards_keep_the_token_budget_with_the_same_numbers(tmp_path, monkeypatch):
    config, task, state = _state(tmp_path / "a")
    torch.manual_seed(1)
    batch = vapo.rollout(state, task, config)
    whole, _ = vapo.old_outputs(state, batch, config, PhaseTimer())
    config, _, state = _state(tmp_path / "b", "--max_tokens_per_microbatch", "40")
    sizes = _spy(monkeypatch)
    pieces, _ = vapo.old_outputs(state, batch, config, PhaseTimer())
    assert len(sizes) > 3 and all(n <= 40 or rows == 1 for _, rows, n in sizes), sizes
    for field in ("logp", "values", "advantages", "targets", "ref_logp"):
        torch.testing.assert_close(getattr(pieces, field), getattr(whole, field),
                                   rtol=1e-5, atol=1e-6)


def test_value_pretraining_forward_keeps_the_micro_batch_size(tmp_path, monkeypatch):
    results = []
    for name, extra in (("whole", ()), ("micro", ("--micro_batch_size", "4"))):
        config, task, state = _state(tmp_path / name, "--value_pretrain_steps", "1", *extra)
        sizes = _spy(monkeypatch)
        (tmp_path / name).mkdir(exist_ok=True)
        log = MetricsLogger(str(tmp_path / name), progress=False, tensorboard=False)
        torch.manual_seed(1)
        vapo.value_pretrain(state, task, config, log)
        log.close()
        results.append(({k: v.detach().clone() for k, v in state.value_model.state_dict().items()},
                         [s for s in sizes if s[0]]))
    (whole, whole_sizes), (micro, micro_sizes) = results
    assert [rows for _, rows, _ in whole_sizes] == [16]
    assert [rows for _, rows, _ in micro_sizes] == [4, 4, 4, 4]
    for key, want in whole.items():
        torch.testing.assert_close(micro[key], want, rtol=1e-4, atol=1e-6)
