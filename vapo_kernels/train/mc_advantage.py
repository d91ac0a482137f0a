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
    straddling an offset (a subword merge) maps to the token after it.

    Precisely: with ``L(t) = len(decode(ids[:t], skip_special_tokens=True))``, offset k
    maps to the first ``t >=`` (offset k-1's token) with ``L(t) >= offset``, or to
    ``len(ids)`` when there is none. Where the tokenizer's decode provably keeps ``L``
    non-decreasing (:func:`_decoded_length_never_decreases`) that ``t`` is found by a
    search from the previous offset's token (a first guess of the previous step's token
    count, galloping past it, then bisection): O(log gap) decodes per offset, 2 when
    steps keep their length, each decode done once. Otherwise ``L`` is read token by
    token up to the last offset's token (one decode per token, each of a whole prefix:
    quadratic in the response length, as it was for every tokenizer). Both give the same
    tokens wherever ``L`` never decreases, i.e. always on the searched tokenizers."""
    n = len(ids)
    decoded: dict[int, int] = {}

    def length(t: int) -> int:
        if t not in decoded:
            decoded[t] = len(tokenizer.decode(ids[:t], skip_special_tokens=True))
        return decoded[t]

    search = _decoded_length_never_decreases(tokenizer)
    out, t, gap = [], 0, 1
    for offset in offsets:
        if not search:
            while t < n and length(t) < offset:
                t += 1
        elif t < n and length(t) < offset:
            # Invariant: L(lo) < offset, and hi == n or L(hi) >= offset. First guess: this
            # step is as long as the last one; then gallop (doubling) past it.
            lo, step = t, gap
            hi = min(n, lo + step)
            while hi < n and length(hi) < offset:
                lo, step = hi, 2 * step
                hi = min(n, lo + step)
            if hi - lo > 1:  # the guess exactly right costs one decode more, not log(gap)
                if length(hi - 1) < offset:
                    lo = hi - 1
                else:
                    hi -= 1
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if length(mid) < offset:
                    lo = mid
                else:
                    hi = mid
            gap, t = hi - t, hi
        out.append(t)
    return out


# Backend decoders under which the decoded text of ids[:t + 1] is that of ids[:t] with
# characters added (Fuse joins the token strings; Metaspace maps each token on its own,
# dropping the first token's "▁"), or, for ByteLevel, from_utf8_lossy of the
# concatenated bytes of the tokens, whose character count never decreases as bytes are
# appended: the valid characters before the last incomplete UTF-8 sequence stay as they
# are, and that sequence (one U+FFFD) either completes into one character, stays one
# U+FFFD, or stays one U+FFFD with the new bytes' characters after it.
_APPEND_ONLY_DECODERS = frozenset({"Fuse", "Metaspace", "ByteLevel"})
_FORCED_CLEAN_UP = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"


def _decoded_length_never_decreases(tokenizer) -> bool:
    """True when ``len(tokenizer.decode(ids[:t], skip_special_tokens=True))`` provably never
    decreases in t, for any ids: a fast tokenizer whose ``decode`` is transformers' own
    (the backend's decode of the non-special tokens, then the optional clean-up), whose
    backend decoder is one of :data:`_APPEND_ONLY_DECODERS` (skipping special tokens just
    drops them from the token list the decoder sees) and whose decode applies no
    ``clean_up_tokenization_spaces`` (``"a '"`` then ``"a ' "`` cleans up to ``"a'"``:
    shorter). Not: SentencePiece byte fallback (``<0xE2><0x82>`` decodes to two U+FFFD,
    ``<0xE2><0x82><0xAC>`` to one "€"), Sequence decoders, slow tokenizers."""
    import json

    from transformers import PreTrainedTokenizerFast

    kind = type(tokenizer)
    if not (isinstance(tokenizer, PreTrainedTokenizerFast)
            and kind.decode is PreTrainedTokenizerFast.decode
            and kind._decode is PreTrainedTokenizerFast._decode):
        return False
    backend = tokenizer.backend_tokenizer
    if backend.decoder is None:
        return False
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        # transformers >= 5 skips the clean-up for a BPE model unless forced; older
        # versions (no such flag) apply it
        forced = getattr(tokenizer, _FORCED_CLEAN_UP, None)
        if forced is None or forced or type(backend.model).__name__ != "BPE":
            return False
    try:
        kind_of_decoder = json.loads(backend.decoder.__getstate__())["type"]
    except (AttributeError, TypeError, ValueError, KeyError):
        return False
    return kind_of_decoder in _APPEND_ONLY_DECODERS


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
