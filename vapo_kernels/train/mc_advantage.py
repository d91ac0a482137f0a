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
    prefixes: list[str],
    *,
    samples: int,
    max_response_tokens: int,
    temperature: float,
    chunk_size: int = 1024,
) -> Tensor:
    """``(len(prefixes),)`` float64: mean verifier score of ``samples`` sampled
    continuations of each ``problems[i].prompt + prefixes[i]``.

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
        tokens = len(tokenizer(prefix, add_special_tokens=False).input_ids) if prefix else 0
        by_length.setdefault(tokens, []).append(i)
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
