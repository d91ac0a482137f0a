"""Monte-Carlo continuations start from the token ids the policy sampled, not from the
decoded text re-tokenised: with a PAD drawn mid-response (char tokenizer) and with a BPE
merge across the cut, the continuation's input ids are exactly the prompt's ids + the
response's ids up to the cut."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from vapo_kernels.train.mc_advantage import mc_advantages, prefix_values
from vapo_kernels.train.models import BOS, EOS, PAD, build_char_tokenizer
from vapo_kernels.train.rollout import _prompt_inputs, build_batch, generate
from vapo_kernels.train.task import RunningSumTask


class RecordingPolicy(torch.nn.Module):
    """A "policy" whose ``generate`` records each row's input ids (padding removed by the
    attention mask) and answers EOS at once."""

    generation_config = None  # rollout.generate swaps in a blank one while sampling

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device for rollout.generate
        self.inputs: list[list[int]] = []

    def generate(self, input_ids, attention_mask, generation_config, **_):
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            self.inputs.append([i for i, m in zip(ids, mask) if m])
        eos = torch.full((input_ids.shape[0], 1), generation_config.eos_token_id)
        return torch.cat([input_ids, eos], 1)


def merging_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A BPE tokenizer over the characters of ``alphabet`` with one merge, "3" + ">" ->
    "3>": a policy that samples "3" then ">" writes text that re-tokenises to one token."""
    specials = [PAD, BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(alphabet)) + ["3>"])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("3", ">")], unk_token=PAD))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS,
                                   eos_token=EOS, padding_side="left")


@pytest.fixture
def task():
    return RunningSumTask(min_steps=3, max_steps=3, modulus=10, heldout_size=4, seed=0)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def char_ids(tokenizer, text: str) -> list[int]:
    """One id per character (what a policy may sample; BPE would merge some)."""
    return [tokenizer.convert_tokens_to_ids(c) for c in text]


def test_a_pad_drawn_mid_response_stays_in_the_continuation(task):
    tok = build_char_tokenizer(task.alphabet)
    problem = task.problem((3, 5, 7))
    good = ids_of(tok, task.response_prefix(problem, 3))  # "3>3 5>8 7>5 =5"
    sampled = good[:2] + [tok.pad_token_id] + good[2:] + [tok.eos_token_id]
    batch = build_batch(tok, [problem], [sampled], task)
    assert batch.responses == [task.response_prefix(problem, 3)]  # PAD not in the text
    policy = RecordingPolicy()
    mc_advantages(policy, tok, task, batch, samples=1,
                  max_response_tokens=task.max_response_tokens, temperature=1.0)
    prompt = ids_of(tok, problem.prompt)
    # boundaries "3>3 " | "5>8 " | "7>5 " | "=5": tokens 0, 5 (after the PAD), 9, 13
    expected = [prompt + sampled[:cut] for cut in (0, 5, 9, 13)]
    assert sorted(policy.inputs, key=len) == expected
    # The text prefix re-tokenised would have lost the PAD: a different state.
    assert ids_of(tok, tok.decode(sampled[:5], skip_special_tokens=True)) != sampled[:5]


def test_a_bpe_merge_across_the_cut_is_not_redone(task):
    tok = merging_tokenizer(task.alphabet)
    problem = task.problem((3, 5, 7))
    text = task.response_prefix(problem, 3)  # "3>3 5>8 7>5 =5"
    sampled = char_ids(tok, text) + [tok.eos_token_id]  # "3" ">" sampled apart
    assert ids_of(tok, "3>3 ") == [tok.convert_tokens_to_ids("3>"), *char_ids(tok, "3 ")]
    batch = build_batch(tok, [problem], [sampled], task)
    policy = RecordingPolicy()
    adv, values = mc_advantages(policy, tok, task, batch, samples=2,
                                max_response_tokens=task.max_response_tokens, temperature=1.0)
    prompt = ids_of(tok, problem.prompt)
    expected = [prompt + sampled[:cut] for cut in (0, 4, 8, 12) for _ in range(2)]
    assert sorted(policy.inputs, key=len) == expected
    # EOS right after the prefix: each continuation scores as its prefix alone (0), and
    # the last step's advantage is the sampled response's score (1) - 0.
    assert values.tolist() == [0.0] * batch.num_tokens
    assert adv[12:].tolist() == [1.0] * 3 and adv[:12].tolist() == [0.0] * 12

    # prefix_values directly: the returned responses start with the prefix ids as given,
    # grouped by their token count (4 sampled tokens, though "3>3 " re-tokenises to 3).
    policy.inputs.clear()
    values = prefix_values(policy, tok, task, [problem, problem],
                           [sampled[:4], ids_of(tok, "3>3 ")], samples=1,
                           max_response_tokens=16, temperature=1.0)
    assert values.tolist() == [0.0, 0.0]
    assert sorted(policy.inputs, key=len) == [prompt + ids_of(tok, "3>3 "), prompt + sampled[:4]]
    continued = generate(policy, tok, [problem], task, max_new_tokens=4, temperature=1.0,
                         response_prefixes=[sampled[:4]])
    start = int(continued.prompt_lengths[0])
    assert continued.input_ids[0, start: start + 5].tolist() == sampled[:4] + [tok.eos_token_id]


def test_text_prefixes_are_refused(task):
    tok = build_char_tokenizer(task.alphabet)
    with pytest.raises(TypeError, match="token ids"):
        prefix_values(RecordingPolicy(), tok, task, [task.problem((1,))], ["1>1 "], samples=1,
                      max_response_tokens=8, temperature=1.0)


def test_char_task_inputs_are_those_of_the_text_prefix(task):
    """For the built-in character tokenizer, text and ids are one-to-one when no special
    token was drawn: the continuations' model inputs (so, under the same seed, their
    samples and values) are what re-tokenising the text prefix gave."""
    tok = build_char_tokenizer(task.alphabet)
    problems = [task.problem(d) for d in ((3, 5, 7), (1,), (2, 9, 4), (6, 6))]
    texts = ["3>3 ", "", "2>2 9>1 4>5 =", "6"]
    by_text = tok([p.prompt + t for p, t in zip(problems, texts)], return_tensors="pt",
                  padding=True, add_special_tokens=False)
    by_ids = _prompt_inputs(tok, problems, [ids_of(tok, t) if t else [] for t in texts])
    assert by_ids.keys() == {"input_ids", "attention_mask"}
    for key in by_ids:
        assert torch.equal(by_ids[key], by_text[key]), key
    no_prefix = tok([p.prompt for p in problems], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    for key, value in _prompt_inputs(tok, problems, None).items():
        assert torch.equal(value, no_prefix[key]), key
