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
    max_new_tokens: int,
    temperature: float,
    chunk_size: int = 1024,
) -> Tensor:
    """``(len(prefixes),)`` float64: mean verifier score of ``samples`` sampled
    continuations of each ``problems[i].prompt + prefixes[i]``.

    Continuations are generated ``chunk_size`` sequences at a time (all copies of a
    prefix are adjacent, so one prefix may span two chunks). ``max_new_tokens`` bounds the
    continuation, not the whole response.
    """
    if len(problems) != len(prefixes):
        raise ValueError(f"problems ({len(problems)}) and prefixes ({len(prefixes)}) differ in length")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not problems:
        return torch.zeros(0, dtype=torch.float64)
    repeated = [i for i in range(len(problems)) for _ in range(samples)]
    scores = []
    for start in range(0, len(repeated), chunk_size):
        rows = repeated[start:start + chunk_size]
        batch = generate(policy, tokenizer, [problems[i] for i in rows], task,
                         max_new_tokens=max_new_tokens, temperature=temperature,
                         response_prefixes=[prefixes[i] for i in rows])
        scores.append(batch.scores.to(torch.float64))
    return torch.cat(scores).view(len(problems), samples).mean(1)
