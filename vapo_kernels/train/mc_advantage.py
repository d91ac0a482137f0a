"""Monte-Carlo values of response prefixes (VinePPO's estimator, arXiv 2410.01679).

The value of a prefix under the current policy is the expected final reward of a
continuation sampled from it; :func:`prefix_values` estimates it as the mean score of
``samples`` continuations. The diagnostics use it as ground truth (VinePPO's analyzers
take 256 continuations per step boundary); the trainer can use it in place of the value
model to build advantages.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rollout import generate
from .task import Problem, Task


@torch.no_grad()
def prefix_values(
    policy,
    tokenizer,
    task: Task,
    problems: list[Problem],
    prefixes: list[list[int]],
    *,
    samples: int,
    max_response_tokens: int,
    temperature: float,
    chunk_size: int = 1024,
) -> Tensor:
    """``(len(prefixes),)`` float64: mean verifier score of ``samples`` sampled
    continuations of each ``problems[i]``'s prompt followed by ``prefixes[i]``.

    ``prefixes[i]``: the **token ids** of the response's beginning as sampled (special
    tokens the policy drew included), not its text: a continuation starts from the
    prompt's ids + exactly these ids, the state whose value is wanted. Its decoded text
    re-tokenised could be another state (a PAD drawn mid-response vanishes from the text;
    ``"3" ">"`` sampled as two tokens re-tokenises to one ``"3>"``). A hand-written text
    prefix is ``tokenizer(text, add_special_tokens=False).input_ids``.

    A continuation may take the response (prefix included) to ``max_response_tokens``,
    the bound the rollouts have, so the value is that of the policy the trainer samples.
    Prefixes of the same token count are generated together, ``chunk_size`` sequences at
    a time.
    """
    if len(problems) != len(prefixes):
        raise ValueError(f"problems ({len(problems)}) and prefixes ({len(prefixes)}) differ in length")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    totals = torch.zeros(len(problems), dtype=torch.float64)
    by_length: dict[int, list[int]] = {}
    for i, prefix in enumerate(prefixes):
        if isinstance(prefix, str):
            raise TypeError("prefix_values takes token ids, not text: pass the response's ids "
                            "as sampled (or tokenizer(text, add_special_tokens=False).input_ids)")
        by_length.setdefault(len(prefix), []).append(i)
    for tokens, members in sorted(by_length.items()):
        new_tokens = max_response_tokens - tokens
        if new_tokens < 1:
            raise ValueError(f"a prefix of {tokens} tokens leaves no room under "
                             f"max_response_tokens={max_response_tokens}")
        repeated = [i for i in members for _ in range(samples)]
        for start in range(0, len(repeated), chunk_size):
            rows = repeated[start:start + chunk_size]
            batch = generate(policy, tokenizer, [problems[i] for i in rows], task,
                             max_new_tokens=new_tokens, temperature=temperature,
                             response_prefixes=[prefixes[i] for i in rows])
            totals.index_add_(0, torch.tensor(rows), batch.scores.to(torch.float64))
    return totals / samples


def char_offsets_to_tokens(tokenizer, ids: list[int], offsets: list[int]) -> list[int]:
    """For each character offset into ``decode(ids, skip_special_tokens=True)`` (the
    response text the task scores), the index of the first token of ``ids`` whose decoded
    prefix reaches it. A special token the policy drew mid-response (PAD, BOS) stays in
    ``ids`` but not in the text, so re-tokenising the text would put every later boundary
    one token early; a special token right at a boundary opens the next step, and a token
    straddling an offset (a subword merge) maps to the token after it."""
    lengths = [len(tokenizer.decode(ids[:t], skip_special_tokens=True)) for t in range(len(ids) + 1)]
    out, t = [], 0
    for offset in offsets:
        while t < len(ids) and lengths[t] < offset:
            t += 1
        out.append(t)
    return out


def step_boundaries(response: str) -> list[int]:
    """Character offsets where a new step starts: 0 and after every newline; a response
    without newlines (the built-in running sum) is split after every space instead. Only
    offsets before the end of the response count."""
    separator = "\n" if "\n" in response else " "
    return [0] + [i + 1 for i, ch in enumerate(response) if ch == separator and i + 1 < len(response)]


@torch.no_grad()
def mc_advantages(
    policy,
    tokenizer,
    task: Task,
    batch,
    *,
    samples: int,
    max_response_tokens: int,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """VinePPO's advantages for a :class:`~vapo_kernels.train.rollout.RolloutBatch`:
    ``(advantages, step_values)``, both packed ``(N,)``.

    The value of every step boundary is the mean score of ``samples`` continuations
    (:func:`prefix_values`) of the response's token ids as sampled up to the boundary
    (found in the text by :func:`step_boundaries`, mapped onto the ids by
    :func:`char_offsets_to_tokens`); each token of step j gets V(after step j) - V(before step j),
    the last step's tokens the sequence's score - V(before it). ``step_values`` holds, per
    token, the Monte-Carlo value of the boundary that opens its step.
    """
    lengths = batch.response_lengths.tolist()
    starts = batch.cu_seqlens[:-1].tolist()
    segments, prefixes, owners = [], [], []  # (sequence, first token, end token)
    for i, text in enumerate(batch.responses):  # boundaries in the text, cuts on the ids
        cuts = []
        offsets = step_boundaries(text)
        first = int(batch.prompt_lengths[i])
        ids = batch.input_ids[i, first: first + lengths[i]].tolist()  # as sampled
        for offset, tokens in zip(offsets, char_offsets_to_tokens(tokenizer, ids, offsets)):
            if tokens < lengths[i] and (not cuts or tokens > cuts[-1]):
                cuts.append(tokens)
                prefixes.append(ids[:tokens])  # continued from the state as sampled
                owners.append(batch.problems[i])
        for j, cut in enumerate(cuts):
            segments.append((i, cut, cuts[j + 1] if j + 1 < len(cuts) else lengths[i]))
    values = prefix_values(policy, tokenizer, task, owners, prefixes, samples=samples,
                           max_response_tokens=max_response_tokens, temperature=temperature)
    advantages = torch.zeros(batch.num_tokens, dtype=torch.float32)
    step_values = torch.zeros(batch.num_tokens, dtype=torch.float32)
    for n, (i, first, end) in enumerate(segments):
        last = n + 1 == len(segments) or segments[n + 1][0] != i
        after = float(batch.scores[i]) if last else float(values[n + 1])
        advantages[starts[i] + first: starts[i] + end] = after - float(values[n])
        step_values[starts[i] + first: starts[i] + end] = float(values[n])
    return advantages, step_values


def trainer_advantages(state, task: Task, batch, config) -> Tensor:
    """``--advantage mc`` in the trainer: :func:`mc_advantages` of the rollout batch with
    the rollouts' sampling settings, whitened over the batch when the config says so."""
    import vapo_kernels as vk

    from .metrics import our_op
    from .vapo import max_new_tokens

    advantages, _ = mc_advantages(state.policy, state.tokenizer, task, batch,
                                  samples=config.algorithm.mc_samples,
                                  max_response_tokens=max_new_tokens(config, task),
                                  temperature=config.rollout.temperature)
    if config.algorithm.whiten_advantages:
        with our_op("masked_whiten"):  # like every vk call of the trainer
            advantages = vk.masked_whiten(advantages, None, batch.cu_seqlens)
    return advantages
