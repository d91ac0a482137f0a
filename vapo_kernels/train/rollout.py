"""Rollouts and the token layout our ops see.

**Layout.** Each sampled sequence is ``prompt + response`` (response up to and including
EOS). The model forward runs on a right-padded ``(B, T)`` batch with an attention mask
(on CPU, and for any attention implementation without varlen support); the
``flash_attention_2`` path instead runs one packed row with per-sequence ``position_ids``,
which transformers turns into flash-attn varlen calls. Either way only the **response
tokens** are gathered out of the forward: the logits (or hidden state) at the position
*before* each response token, packed into ``(N,)`` with ``cu_seqlens`` (one segment per
sequence). Every vapo_kernels op — log-probs, ``decoupled_gae``, ``vapo_loss`` — sees only
those N real tokens; nothing is computed on padding or prompts.
"""

from __future__ import annotations

import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

import vapo_kernels as vk

from .metrics import our_op
from .task import Problem, Task


@dataclass
class RolloutBatch:
    """Sequences of one step in both layouts (padded for the model, packed for our ops)."""

    input_ids: Tensor  # (B, T) prompt + response, right-padded
    attention_mask: Tensor  # (B, T)
    prompt_lengths: Tensor  # (B,)
    response_lengths: Tensor  # (B,) incl. EOS when generated
    cu_seqlens: Tensor  # (B + 1,) int32 offsets of the packed response tokens
    rewards: Tensor  # (N,) sparse: the sequence's score on its last token
    scores: Tensor  # (B,) verifier score per sequence
    problems: list[Problem]
    responses: list[str]
    verifier_errors: int = 0  # responses whose verifier raised (scored 0)
    # (N,) the rollout engine's log-prob of each response token, as it sampled it; only
    # when asked for (the loss's rollout correction needs it)
    rollout_logp: Tensor | None = None

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    def token_positions(self) -> tuple[Tensor, Tensor]:
        """(row, column) in the padded layout of the position that *predicts* each packed
        response token: the model's output there gives the token's log-prob and, for the
        critic, the value of the state before the token."""
        rows = torch.repeat_interleave(torch.arange(self.size), self.response_lengths)
        starts = self.cu_seqlens[:-1].long()
        offset_in_response = torch.arange(self.num_tokens) - torch.repeat_interleave(
            starts, self.response_lengths
        )
        cols = self.prompt_lengths[rows] + offset_in_response - 1
        return rows, cols

    def targets(self) -> Tensor:
        """The packed response tokens (N,)."""
        rows, cols = self.token_positions()
        return self.input_ids[rows, cols + 1]

    def select(self, index: Tensor) -> RolloutBatch:
        """The sub-batch of sequences ``index`` (a micro- or mini-batch), columns trimmed."""
        index = index.long()
        lengths = self.response_lengths[index]
        width = int((self.prompt_lengths[index] + lengths).max())
        return RolloutBatch(
            input_ids=self.input_ids[index, :width],
            attention_mask=self.attention_mask[index, :width],
            prompt_lengths=self.prompt_lengths[index],
            response_lengths=lengths,
            cu_seqlens=_offsets(lengths),
            rewards=self.rewards[self.token_index(index)],
            scores=self.scores[index],
            problems=[self.problems[i] for i in index.tolist()],
            responses=[self.responses[i] for i in index.tolist()],
            verifier_errors=self.verifier_errors,
            rollout_logp=None if self.rollout_logp is None
            else self.rollout_logp[self.token_index(index)],
        )

    def token_index(self, index: Tensor) -> Tensor:
        """Positions in the packed (N,) tensors of the tokens of sequences ``index``."""
        starts = self.cu_seqlens[:-1].long()[index]
        lengths = self.response_lengths[index]
        within = torch.arange(int(lengths.sum())) - torch.repeat_interleave(
            lengths.cumsum(0) - lengths, lengths)
        return torch.repeat_interleave(starts, lengths) + within


def _offsets(lengths: Tensor) -> Tensor:
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)


def build_batch(
    tokenizer, problems: list[Problem], responses_ids: list[list[int]], task: Task,
    rollout_logp: list[list[float]] | None = None,
) -> RolloutBatch:
    """Lay out prompts + responses (token ids, EOS included when present) and score them;
    ``rollout_logp``: the engine's log-prob of each response token, per response."""
    prompts = [tokenizer(p.prompt, add_special_tokens=False).input_ids for p in problems]
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses_ids)]
    width = max(lengths)
    input_ids = torch.full((len(problems), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(problems), width), dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompts, responses_ids)):
        input_ids[row, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[row, : len(p) + len(r)] = 1
    responses = [tokenizer.decode(r, skip_special_tokens=True) for r in responses_ids]
    scores, errors = score_responses(task, problems, responses)
    response_lengths = torch.tensor([len(r) for r in responses_ids], dtype=torch.long)
    cu_seqlens = _offsets(response_lengths)
    rewards = torch.zeros(int(cu_seqlens[-1]))
    has_tokens = response_lengths > 0
    rewards[cu_seqlens[1:].long()[has_tokens] - 1] = scores[has_tokens]
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long),
        response_lengths=response_lengths,
        cu_seqlens=cu_seqlens,
        rewards=rewards,
        scores=scores,
        problems=problems,
        responses=responses,
        verifier_errors=errors,
        rollout_logp=None if rollout_logp is None else torch.tensor(
            [x for row in rollout_logp for x in row], dtype=torch.float32),
    )


def score_responses(task: Task, problems: list[Problem], responses: list[str]
                    ) -> tuple[Tensor, int]:
    """The verifier's score of each response; one that raises scores 0 and is counted (a
    broken checker on one odd response must not end a long run), with a warning naming
    the first such error."""
    scores, errors = [], 0
    for problem, text in zip(problems, responses):
        try:
            scores.append(float(task.score(problem, text)))
        except Exception as error:  # noqa: BLE001 - any verifier failure scores 0
            if not errors:
                warnings.warn(f"verifier of task {task.name} raised {type(error).__name__}: "
                              f"{error} on response {text[:60]!r}; scored 0 (counted in "
                              "verifier_errors)", RuntimeWarning, stacklevel=2)
            errors += 1
            scores.append(0.0)
    return torch.tensor(scores), errors


class SampledLogprobs(LogitsProcessor):
    """Records log p(token) of each token ``generate`` samples, under the distribution it
    samples from: ``log_softmax(scores / temperature)``. generate runs a caller's processors
    before its temperature warper (which computes the same ``scores / temperature``), and
    :func:`sampling_config` adds no other processor. The token drawn at a step shows in the
    next call's ``input_ids`` (or in the output, for the last step), so only one step's
    log-softmax is held at a time."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.pending: Tensor | None = None
        self.steps: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, input_ids[:, -1:])[:, 0])
        scaled = scores if self.temperature == 1.0 else scores / self.temperature
        self.pending = torch.log_softmax(scaled.float(), dim=-1)
        return scores

    def per_token(self, new_tokens: Tensor) -> Tensor:
        """(B, S) log-probs of ``new_tokens`` (B, S), the tokens generate appended."""
        steps = self.steps[: new_tokens.shape[1]]
        if self.pending is not None and len(steps) < new_tokens.shape[1]:
            steps.append(self.pending.gather(1, new_tokens[:, len(steps), None])[:, 0])
        return torch.stack(steps, 1) if steps else new_tokens.new_zeros(new_tokens.shape,
                                                                         dtype=torch.float32)


def sampling_config(tokenizer, *, max_new_tokens: int, temperature: float,
                    greedy: bool) -> GenerationConfig:
    """The whole sampling setup (see :func:`_without_folder_defaults` for why nothing else
    may come in): plain sampling at ``temperature``, or greedy decoding."""
    sampling = {} if greedy else {"temperature": temperature, "top_k": 0, "top_p": 1.0}
    return GenerationConfig(
        do_sample=not greedy, max_new_tokens=max_new_tokens, use_cache=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling,
    )


@contextmanager
def _without_folder_defaults(policy):
    """generate fills every option a config leaves unset from ``policy.generation_config``,
    i.e. the model folder's generation_config.json (Qwen's repetition_penalty, top_k,
    top_p, ...). Those would change the distribution the rollouts come from, so it would no
    longer be the policy whose log-probs (``log_softmax(logits / temperature)``) the loss
    uses: while sampling, the policy's own generation config is a blank one."""
    saved = policy.generation_config
    policy.generation_config = GenerationConfig()
    try:
        yield
    finally:
        policy.generation_config = saved


def _prompt_inputs(tokenizer, problems: list[Problem],
                   response_prefixes: list[list[int]] | None) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask`` of each problem's prompt (tokenised as
    :func:`build_batch` lays it out) + its response prefix ids, padded on the tokenizer's
    padding side (left for generation) with its PAD. The mask is 1 on every given id, a PAD
    inside a prefix included: the policy drew it, so it attends to it as it did then."""
    if response_prefixes is not None and len(response_prefixes) != len(problems):
        raise ValueError(f"problems ({len(problems)}) and response_prefixes "
                         f"({len(response_prefixes)}) differ in length")
    rows = [tokenizer(p.prompt, add_special_tokens=False).input_ids
            + (list(response_prefixes[i]) if response_prefixes else [])
            for i, p in enumerate(problems)]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    left = tokenizer.padding_side == "left"
    for i, row in enumerate(rows):
        at = slice(width - len(row), width) if left else slice(0, len(row))
        input_ids[i, at] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, at] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def generate(
    policy,
    tokenizer,
    problems: list[Problem],
    task: Task,
    *,
    max_new_tokens: int,
    temperature: float,
    greedy: bool = False,
    response_prefixes: list[list[int]] | None = None,
    record_logprobs: bool = False,
) -> RolloutBatch:
    """Sample (or greedily decode) one response per problem with ``generate`` + KV cache.

    ``response_prefixes`` continue given partial responses, as **token ids** (Monte-Carlo
    prefix values): generation starts from the prompt's ids + exactly these ids, so a
    prefix cut from a sampled response continues from the state the policy was in, special
    tokens it drew (a PAD mid-response) and token splits (``"3" ">"`` where the text
    re-tokenises to ``"3>"``) included; the prefix is then part of the returned response
    and of its score. ``record_logprobs``: also return the log-prob of each sampled token
    as generate drew it (``batch.rollout_logp``), for the loss's rollout correction.
    """
    if record_logprobs and response_prefixes:
        raise ValueError("record_logprobs with response_prefixes: the prefix tokens were not "
                         "sampled, so they have no rollout log-probs")
    device = next(policy.parameters()).device
    encoded = {k: v.to(device) for k, v in _prompt_inputs(tokenizer, problems,
                                                          response_prefixes).items()}
    recorder = SampledLogprobs(temperature) if record_logprobs else None
    modes = [(module, module.training) for module in policy.modules()]
    policy.eval()
    with _without_folder_defaults(policy):
        out = policy.generate(
            **encoded,
            generation_config=sampling_config(tokenizer, max_new_tokens=max_new_tokens,
                                              temperature=temperature, greedy=greedy),
            logits_processor=LogitsProcessorList([recorder] if recorder else []),
            # FSDP: every process runs forwards until all are done (their collectives pair
            # up). Not "a process group exists": vLLM in this process makes one of size 1.
            synced_gpus=torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1,
        )
    for module, training in modes:  # each module's own flag (see models.dropout_off)
        module.training = training
    new_tokens = out[:, encoded["input_ids"].shape[1]:]
    sampled_logp = recorder.per_token(new_tokens).cpu().tolist() if recorder else None
    responses_ids, rollout_logp = [], [] if recorder else None
    for i, tokens in enumerate(new_tokens.cpu().tolist()):
        # Up to and including EOS; a response without EOS never finished, so every one of
        # its tokens was sampled (a pad token the policy drew is a token like any other:
        # dropping it would train on a sequence the policy never produced).
        end = tokens.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in tokens \
            else len(tokens)
        prefix_ids = list(response_prefixes[i]) if response_prefixes else []
        responses_ids.append(prefix_ids + tokens[:end])
        if recorder:
            rollout_logp.append(sampled_logp[i][:end])
    return build_batch(tokenizer, problems, responses_ids, task, rollout_logp)


def demonstration_batch(
    tokenizer, task: Task, rng: random.Random, count: int
) -> RolloutBatch:
    """Supervised warm-up data: the task's demonstrations (with their slips) + EOS."""
    problems, responses_ids = [], []
    while len(problems) < count:
        for problem in task.sample(rng, count - len(problems)):
            demo = task.demonstration(problem, rng)
            if demo is None:
                continue
            problems.append(problem)
            responses_ids.append(
                tokenizer(demo, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            )
    return build_batch(tokenizer, problems, responses_ids, task)


# -- forwards: the model's outputs at the packed response positions --------------------------
def _forward_inputs(batch: RolloutBatch, device, packed: bool) -> dict[str, Tensor]:
    if not packed:
        return {
            "input_ids": batch.input_ids.to(device),
            "attention_mask": batch.attention_mask.to(device),
        }
    # flash-attn varlen: one row, positions restart at 0 for every sequence.
    valid = batch.attention_mask.bool()
    lengths = valid.sum(1)
    positions = torch.cat([torch.arange(int(n)) for n in lengths])
    return {
        "input_ids": batch.input_ids[valid][None].to(device),
        "position_ids": positions[None].to(device),
    }


def _gather(output: Tensor, batch: RolloutBatch, packed: bool) -> Tensor:
    """(B, T, ...) or packed (1, sum T, ...) model output -> (N, ...) at the response positions."""
    rows, cols = batch.token_positions()
    if packed:
        starts = torch.cat([torch.zeros(1, dtype=torch.long),
                            batch.attention_mask.sum(1).cumsum(0)[:-1]])
        return output[0, (starts[rows] + cols).to(output.device)]
    return output[rows.to(output.device), cols.to(output.device)]


def policy_logprobs(
    policy, batch: RolloutBatch, *, temperature: float, logprobs_from: str, packed: bool
) -> tuple[Tensor, Tensor]:
    """Packed (N,) log-probs and entropies of the response tokens under ``policy``.

    From logits through ``vk.token_logprobs``; or from the final hidden states through
    ``vk.linear_logprobs`` (the LM head fused in, no N x V logits).
    """
    device = next(policy.parameters()).device
    targets = batch.targets().to(device)
    inputs = _forward_inputs(batch, device, packed)
    if logprobs_from == "hidden":
        hidden = policy.base_model(**inputs).last_hidden_state
        head = policy.get_output_embeddings()
        with our_op("linear_logprobs"):
            return vk.linear_logprobs(
                _gather(hidden, batch, packed), head.weight, targets, bias=head.bias,
                temperature=temperature, return_entropy=True,
            )
    logits = policy(**inputs).logits
    gathered = _gather(logits, batch, packed)
    with our_op("token_logprobs"):
        return vk.token_logprobs(gathered, targets, temperature=temperature, return_entropy=True)


def value_estimates(value_model, batch: RolloutBatch, *, packed: bool) -> Tensor:
    """Packed (N,) values V(s_t) of the state before each response token."""
    device = next(value_model.parameters()).device
    scores = value_model(**_forward_inputs(batch, device, packed)).logits[..., 0]
    return _gather(scores, batch, packed).float()
