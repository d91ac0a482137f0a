"""vLLM as the rollout engine (``--rollout_engine vllm``): one process, one GPU.

The engine lives in the trainer's process beside the models it trains ("colocated"), with
``vllm_gpu_memory`` of the GPU for its weights and KV cache, in ``vllm_dtype`` (bf16 by
default: the rollouts then differ from the fp32 policy by bf16 rounding, which the
rollout correction is for). It starts from the policy's config alone (``load_format=
"dummy"``, no weights read from disk, no tokenizer: prompts go in as token ids, responses
come back as token ids), and before every rollout whose policy changed, the policy's
current weights are pushed into it with the model's own ``load_weights`` - the path TRL's
colocated mode takes. ``logprobs_mode="processed_logprobs"`` makes the log-prob vLLM
reports for each sampled token the one of the distribution it sampled from,
``log_softmax(logits / temperature)`` (no top-k / top-p / penalties are set), which the
loss's rollout correction compares with the trainer's own.

Written against vLLM >= 0.10.2 (the first release whose processed log-probs include the
temperature) and its V1 engine; the engine must run in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here) for the weights to be reachable. Not
yet run on a GPU in this project's CI (no GPU there): tests/train/test_vllm_engine.py
checks this module against a stand-in with vLLM's call signatures and output types.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile

import torch
from packaging.version import Version
from transformers import GenerationConfig

from .checkpoint import process_rng_state, set_process_rng_state
from .rollout import RolloutBatch, build_batch

MIN_VERSION = Version("0.10.2")


def unavailable(device: str) -> str | None:
    """Why vLLM cannot be the rollout engine here (one line), or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return "not installed (pip install 'vapo-kernels[vllm]': vLLM with its CUDA torch)"
    if device == "cpu" or not torch.cuda.is_available():
        return "needs a CUDA GPU (--device is cpu or no GPU is visible)"
    return None


class VllmEngine:
    """A rollout engine called like :func:`.rollout.generate`."""

    def __init__(self, policy, tokenizer, *, gpu_memory: float, dtype: str, seed: int):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model in this process
        import vllm

        if Version(vllm.__version__) < MIN_VERSION:
            raise RuntimeError(f"vLLM {vllm.__version__} is too old for --rollout_engine vllm: "
                               f"need >= {MIN_VERSION} (its processed log-probs include the "
                               "temperature from then on)")
        self._vllm = vllm
        # The config only (weights are pushed). vLLM picks its model class by the config's
        # architectures, which a model built from a config (the built-in one) leaves
        # empty; and it adds a generation_config.json's EOS to the stop tokens, so the
        # folder's names the tokenizer's EOS (the one transformers generate stops at).
        self._folder = tempfile.TemporaryDirectory(prefix="vapo-vllm-")  # removed at exit
        config = copy.deepcopy(policy.config)
        config.architectures = config.architectures or [type(policy).__name__]
        config.save_pretrained(self._folder.name)
        GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id).save_pretrained(self._folder.name)
        # vLLM seeds the process's generators as its worker starts; the run's own seeded
        # streams (sampling, shuffling: checkpointed for exact resumes) must not move.
        saved = process_rng_state()
        try:
            self.llm = vllm.LLM(
                model=self._folder.name, load_format="dummy", skip_tokenizer_init=True,
                dtype=dtype, gpu_memory_utilization=gpu_memory,
                logprobs_mode="processed_logprobs", seed=seed,
            )
        finally:
            set_process_rng_state(saved)
        self._pushed: tuple[int, ...] | None = None

    def push_weights(self, policy) -> bool:
        """Copy the policy's weights into vLLM's model when they changed since the last push
        (an optimizer step bumps every parameter's version counter); True when copied."""
        versions = tuple(p._version for p in policy.parameters())
        if versions == self._pushed:
            return False
        model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        with torch.no_grad():
            model.load_weights((name, t.detach()) for name, t in policy.state_dict().items())
        self._pushed = versions
        return True

    def __call__(self, policy, tokenizer, problems, task, *, max_new_tokens: int,
                 temperature: float, greedy: bool = False,
                 response_prefixes: list[list[int]] | None = None,
                 record_logprobs: bool = False) -> RolloutBatch:
        # Prefix continuations (Monte-Carlo values: --advantage mc, the diagnostics) always
        # run on transformers generate (mc_advantage.prefix_values calls it directly).
        if response_prefixes:
            raise ValueError("the vllm engine does not continue response prefixes (Monte-"
                             "Carlo prefix values use transformers generate for that)")
        self.push_weights(policy)
        # Every call starts without cached prefixes (stale after a push; and a resumed run
        # starts without them too). Sampling is seeded, not bit-exact: vLLM's numbers also
        # depend on how it batches the requests.
        self.llm.reset_prefix_cache()
        prompts = [{"prompt_token_ids": tokenizer(p.prompt, add_special_tokens=False).input_ids}
                   for p in problems]
        # Per-request seeds drawn from the run's seeded stream (saved in checkpoints).
        base = 0 if greedy else int(torch.randint(0, 2**31 - len(problems), ()))
        params = [
            self._vllm.SamplingParams(
                n=1, temperature=0.0 if greedy else temperature, top_p=1.0,
                max_tokens=max_new_tokens, stop_token_ids=[tokenizer.eos_token_id],
                logprobs=0 if record_logprobs else None, seed=None if greedy else base + i,
                detokenize=False,
            )
            for i in range(len(problems))
        ]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        responses, logps = [], []
        for out in outputs:
            completion = out.outputs[0]
            ids = list(completion.token_ids)  # up to and including EOS when it stopped there
            responses.append(ids)
            if record_logprobs:  # logprobs=0: each position's dict holds the sampled token
                logps.append([completion.logprobs[j][t].logprob for j, t in enumerate(ids)])
        return build_batch(tokenizer, problems, responses, task,
                           logps if record_logprobs else None)
