"""--rollout_engine vllm against a stand-in for vLLM (no GPU or vLLM in CI): the stand-in
has vLLM's call signatures and output types (LLM(...).generate -> RequestOutput with
outputs[0].token_ids and .logprobs, a list of {token_id: Logprob}; the model behind
llm_engine.model_executor.driver_worker.model_runner.model with load_weights) and samples
from its own copy of the model. It checks our side: the engine is built as documented, the
policy's weights reach it before each rollout (its copy starts from random weights), its
outputs become the same batch layout as transformers generate's, and the trainer runs on
it end to end. Whether a real vLLM behaves as the stand-in does is checked on a GPU."""

from __future__ import annotations

import random
import sys
import types
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from vapo_kernels.train import config as config_module
from vapo_kernels.train import vllm_engine
from vapo_kernels.train.cli import train
from vapo_kernels.train.rollout import policy_logprobs

from .conftest import read_rows, tiny_config, tiny_policy


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class SamplingParams:
    def __init__(self, n=1, temperature=1.0, top_p=1.0, max_tokens=16, stop_token_ids=None,
                 logprobs=None, seed=None, detokenize=True):
        assert n == 1 and top_p == 1.0 and not detokenize
        self.temperature, self.max_tokens = temperature, max_tokens
        self.stop_token_ids, self.logprobs, self.seed = stop_token_ids or [], logprobs, seed


class _Runner:
    def __init__(self, model):
        self.model = model


class _LoadableModel:
    """vLLM's model object: load_weights takes (name, tensor) pairs in HF's naming."""

    def __init__(self, hf_model):
        self.hf = hf_model
        self.loads = 0

    def load_weights(self, weights):
        self.hf.load_state_dict(dict(weights))
        self.loads += 1


class LLM:
    made: ClassVar[list[LLM]] = []

    def __init__(self, model, **kwargs):
        self.kwargs = kwargs
        torch.manual_seed(kwargs["seed"])  # as vLLM's worker does at start
        self.config = AutoConfig.from_pretrained(model)
        self.generation_config = GenerationConfig.from_pretrained(model)
        hf = AutoModelForCausalLM.from_config(self.config).eval()
        self.model = _LoadableModel(hf)  # load_format="dummy": random weights
        worker = types.SimpleNamespace(model_runner=_Runner(self.model))
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(driver_worker=worker))
        self.prefix_resets = 0
        LLM.made.append(self)

    def reset_prefix_cache(self):
        self.prefix_resets += 1

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm=True):
        outs = []
        for prompt, sp in zip(prompts, sampling_params):
            gen = torch.Generator().manual_seed(sp.seed or 0)
            ids, tokens, logps = list(prompt["prompt_token_ids"]), [], []
            for _ in range(sp.max_tokens):
                logits = self.model.hf(torch.tensor([ids])).logits[0, -1].float()
                if sp.temperature == 0:
                    token = int(logits.argmax())
                    logp = torch.log_softmax(logits, -1)
                else:
                    logp = torch.log_softmax(logits / sp.temperature, -1)
                    token = int(torch.multinomial(logp.exp(), 1, generator=gen))
                ids.append(token)
                tokens.append(token)
                logps.append({token: Logprob(float(logp[token]), 1)})
                if token in sp.stop_token_ids:
                    break
            completion = types.SimpleNamespace(
                token_ids=tokens, logprobs=logps if sp.logprobs is not None else None)
            outs.append(types.SimpleNamespace(outputs=[completion]))
        return outs


@pytest.fixture
def stand_in(monkeypatch):
    module = types.ModuleType("vllm")
    module.__version__ = "0.11.0"
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(vllm_engine, "unavailable", lambda device: None)
    LLM.made.clear()
    return module


def test_engine_samples_from_the_pushedtiny_policy(tmp_path, stand_in):
    _, task, policy, tokenizer = tiny_policy(tmp_path)
    before = torch.get_rng_state()
    engine = vllm_engine.VllmEngine(policy, tokenizer, gpu_memory=0.25, dtype="float32", seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # vLLM's seeding left the run's alone
    llm = LLM.made[-1]
    assert llm.kwargs == {"load_format": "dummy", "skip_tokenizer_init": True,
                          "dtype": "float32", "gpu_memory_utilization": 0.25,
                          "logprobs_mode": "processed_logprobs", "seed": 7}
    # the folder vLLM starts from names the model class (the built-in model's config
    # leaves it empty) and the tokenizer's EOS, which vLLM adds to the stop tokens
    assert policy.config.architectures is None
    assert llm.config.architectures == [type(policy).__name__]
    assert llm.generation_config.eos_token_id == tokenizer.eos_token_id
    problems = task.sample(random.Random(0), 5)
    batch = engine(policy, tokenizer, problems, task, max_new_tokens=10, temperature=0.8,
                   record_logprobs=True)
    assert llm.model.loads == 1 and llm.prefix_resets == 1
    with torch.no_grad():
        logp, _ = policy_logprobs(policy, batch, temperature=0.8, logprobs_from="logits",
                                  packed=False)
    torch.testing.assert_close(batch.rollout_logp, logp, rtol=0, atol=1e-5)

    engine(policy, tokenizer, problems, task, max_new_tokens=10, temperature=0.8)
    assert llm.model.loads == 1  # unchanged weights are not pushed again
    assert llm.prefix_resets == 2  # but every call starts without cached prefixes
    with torch.no_grad():  # what an optimizer step does: in-place updates
        for p in policy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = engine(policy, tokenizer, problems, task, max_new_tokens=10, temperature=0.8,
                   record_logprobs=True)
    assert llm.model.loads == 2
    with torch.no_grad():
        logp, _ = policy_logprobs(policy, batch, temperature=0.8, logprobs_from="logits",
                                  packed=False)
    torch.testing.assert_close(batch.rollout_logp, logp, rtol=0, atol=1e-5)
    greedy = engine(policy, tokenizer, problems, task, max_new_tokens=10, temperature=0.8,
                    greedy=True)
    assert greedy.rollout_logp is None and greedy.size == 5


def test_engine_refuses_old_vllm_and_prefixes(tmp_path, stand_in):
    _, task, policy, tokenizer = tiny_policy(tmp_path)
    stand_in.__version__ = "0.10.1.1"
    with pytest.raises(RuntimeError, match=r"need >= 0\.10\.2"):
        vllm_engine.VllmEngine(policy, tokenizer, gpu_memory=0.3, dtype="bfloat16", seed=0)
    stand_in.__version__ = "0.10.2"
    engine = vllm_engine.VllmEngine(policy, tokenizer, gpu_memory=0.3, dtype="bfloat16", seed=0)
    with pytest.raises(ValueError, match="prefixes"):
        engine(policy, tokenizer, task.sample(random.Random(0), 1), task, max_new_tokens=4,
               temperature=1.0,
               response_prefixes=[tokenizer("1", add_special_tokens=False).input_ids])


def test_trainer_runs_on_the_engine_with_the_rollout_correction(tmp_path, stand_in):
    config = tiny_config(tmp_path, "--rollout_engine", "vllm", "--rollout_is", "token",
                         "--vllm_dtype", "float32")
    summary = train(config)
    rows = read_rows(summary["run_dir"])
    rl = [r for r in rows if r["phase"] == "rl" and r["step"] > 0]
    assert rl and all("rollout_is_mean" in r and "rollout_kl" in r for r in rl)
    # the engine's log-probs are the trained policy's: weights ~1, no mismatch to speak of
    assert all(abs(r["rollout_kl"]) < 1e-4 for r in rl)
    assert LLM.made[-1].model.loads >= 3  # after the warm-up, then after updates


def test_vllm_is_refused_in_one_line_without_it(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(config_module.ConfigError, match="not installed"):
        tiny_config(tmp_path, "--rollout_engine", "vllm")


def test_vllm_is_refused_with_several_processes(tmp_path, stand_in, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(config_module.ConfigError, match="one process"):
        tiny_config(tmp_path, "--rollout_engine", "vllm")


def test_diagnostics_refuse_another_engine(tmp_path, stand_in):
    from vapo_kernels.diagnose.common import start_run

    with pytest.raises(config_module.ConfigError, match="generate"):
        start_run(tiny_config(tmp_path, "--rollout_engine", "vllm"))
