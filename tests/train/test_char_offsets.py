"""``char_offsets_to_tokens``: the same tokens as the old scan (which decoded every prefix
``ids[:t]``, quadratic in the response length) on random ids for tiny tokenizers of each
decoder kind, special tokens included; O(log gap) decodes per offset where decoded
prefix lengths provably never decrease, the old scan where they can."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vapo_kernels.train.mc_advantage import (
    _decoded_length_never_decreases,
    char_offsets_to_tokens,
    step_boundaries,
)
from vapo_kernels.train.models import BOS, EOS, PAD, build_char_tokenizer
from vapo_kernels.train.task import RunningSumTask


def old_char_offsets_to_tokens(tokenizer, ids: list[int], offsets: list[int]) -> list[int]:
    """The previous implementation, kept as the oracle."""
    lengths = [len(tokenizer.decode(ids[:t], skip_special_tokens=True))
               for t in range(len(ids) + 1)]
    out, t = [], 0
    for offset in offsets:
        while t < len(ids) and lengths[t] < offset:
            t += 1
        out.append(t)
    return out


CORPUS = ["3>3 5>8 7>5 =5\n", "1>1 1>2 =2\n", "naïve café: € 5 → 7, 😀 ∑ x² ≤ y\n",
          "Schritt 1: 3 + 4 = 7\nSchritt 2: 7 · 2 = 14\n", "日本語のテキスト 123\n"] * 20


def _wrap(core: Tokenizer, **kwargs) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS,
                                   eos_token=EOS, padding_side="left", **kwargs)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2/Qwen-style byte-level BPE (merges split multi-byte characters), with a
    non-special added token."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=[PAD, BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = _wrap(core)
    tokenizer.add_tokens(["<step>"])
    return tokenizer


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE(unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=200, special_tokens=[PAD, BOS, EOS], show_progress=False))
    return _wrap(core)


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2/Mistral-style SentencePiece BPE with byte fallback: a partial character's
    byte pieces decode to one U+FFFD each, so decoded prefix lengths can decrease."""
    pieces = [PAD, BOS, EOS, *(f"<0x{b:02X}>" for b in range(256)), *sorted(set("".join(CORPUS)))]
    pieces = list(dict.fromkeys(pieces + ["▁"]))
    core = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[],
                                unk_token=PAD, byte_fallback=True))
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                      decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return _wrap(core)


TASK = RunningSumTask(min_steps=3, max_steps=3, modulus=10, heldout_size=4, seed=0)
TOKENIZERS = {
    "char": lambda: build_char_tokenizer(TASK.alphabet),
    "byte-level": byte_level_tokenizer,
    "metaspace": metaspace_tokenizer,
    "byte-fallback": byte_fallback_tokenizer,
    "char, clean-up": lambda: PreTrainedTokenizerFast(
        tokenizer_object=build_char_tokenizer(TASK.alphabet + " 'a.,nt").backend_tokenizer,
        pad_token=PAD, bos_token=BOS, eos_token=EOS, clean_up_tokenization_spaces=True),
}
SEARCHED = {"char": True, "byte-level": True, "metaspace": True, "byte-fallback": False,
            "char, clean-up": False}


@pytest.fixture(scope="module")
def tokenizers():
    return {name: build() for name, build in TOKENIZERS.items()}


def test_which_tokenizers_are_searched(tokenizers):
    assert {name: _decoded_length_never_decreases(t) for name, t in tokenizers.items()} == SEARCHED
    # Why byte fallback is not: a partial character is one U+FFFD per byte piece.
    tok = tokenizers["byte-fallback"]
    euro = tok.convert_tokens_to_ids(["<0xE2>", "<0x82>", "<0xAC>"])
    assert [len(tok.decode(euro[:t])) for t in range(4)] == [0, 1, 2, 1]
    # ... nor clean-up: "a '" then "a ' " cleans up to "a'".
    tok = tokenizers["char, clean-up"]
    ids = tok.convert_tokens_to_ids(list("a ' "))
    assert [len(tok.decode(ids[:t])) for t in range(5)] == [0, 1, 2, 3, 2]


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_same_tokens_as_the_old_scan(tokenizers, name):
    tok = tokenizers[name]
    special = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id]

    @settings(max_examples=150, deadline=None)
    @given(data=st.data())
    def check(data):
        ids = data.draw(st.lists(st.one_of(st.integers(0, len(tok) - 1), st.sampled_from(special)),
                                 max_size=40), label="ids")
        text = tok.decode(ids, skip_special_tokens=True)
        offsets = data.draw(st.lists(st.integers(0, len(text) + 2), max_size=8), label="offsets")
        if data.draw(st.booleans(), label="sorted"):
            offsets = sorted(offsets)
        new = char_offsets_to_tokens(tok, ids, offsets)
        assert new == old_char_offsets_to_tokens(tok, ids, offsets)

    check()


def test_documented_cases(tokenizers):
    tok = tokenizers["char"]
    ids = tok("3>3 5>9 =9", add_special_tokens=False).input_ids
    pad = tok.pad_token_id
    # a PAD mid-step; a PAD right at a boundary opens the next step
    mid = ids[:2] + [pad] + ids[2:]
    assert char_offsets_to_tokens(tok, mid, [0, 4, 8]) == [0, 5, 9]
    at = ids[:4] + [pad] + ids[4:]
    assert char_offsets_to_tokens(tok, at, [0, 4, 8]) == [0, 4, 9]
    # a token straddling an offset maps to the token after it
    bl = tokenizers["byte-level"]
    straddle = bl.convert_tokens_to_ids(["3", ">", "3", "Ġ5", ">", "9"])
    assert bl.decode(straddle) == "3>3 5>9"
    assert char_offsets_to_tokens(bl, straddle, [0, 4]) == [0, 4]
    for tokenizer, case in ((tok, mid), (tok, at), (bl, straddle)):
        for offsets in ([0, 4, 8], [4, 2, 9], [100]):
            assert (char_offsets_to_tokens(tokenizer, case, offsets)
                    == old_char_offsets_to_tokens(tokenizer, case, offsets))


def test_a_long_response_takes_few_decodes(monkeypatch):
    """A 4,000-token response with 40 steps: the old scan decoded all 4,001 prefixes; the
    search decodes O(log gap) prefixes per step boundary."""
    tok = build_char_tokenizer(TASK.alphabet + "\n")
    text = "".join(f"{'3>3 5>8 ' * 12}{j:03d}\n"[:100] for j in range(40))
    ids = tok(text, add_special_tokens=False).input_ids
    ids = ids[:1000] + [tok.pad_token_id] + ids[1000:]  # a PAD mid-response
    assert len(ids) == 4001
    offsets = step_boundaries(tok.decode(ids, skip_special_tokens=True))
    assert len(offsets) == 40
    expected = old_char_offsets_to_tokens(tok, ids, offsets)
    calls = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    assert char_offsets_to_tokens(tok, ids, offsets) == expected
    # 104 here: about 2 per boundary once the first step's length is known (O(log gap)
    # when step lengths change); the old scan decoded all 4,001 prefixes
    assert len(calls) <= 200


def test_byte_fallback_keeps_the_old_scan(tokenizers, monkeypatch):
    """Decoded prefix lengths of "€\\na" in byte pieces: 0, 1, 2, 1, 2, 3. The old scan maps
    offset 2 to token 2 (its first crossing, inside "€"); a search, valid only for
    non-decreasing lengths, would find token 4. Byte fallback is therefore scanned, which
    keeps the old result exactly."""
    import vapo_kernels.train.mc_advantage as mc

    tok = tokenizers["byte-fallback"]
    ids = tok.convert_tokens_to_ids(["<0xE2>", "<0x82>", "<0xAC>", "\n", "a"])
    assert tok.decode(ids) == "€\na"
    assert char_offsets_to_tokens(tok, ids, [0, 2]) == [0, 2]
    assert old_char_offsets_to_tokens(tok, ids, [0, 2]) == [0, 2]
    monkeypatch.setattr(mc, "_decoded_length_never_decreases", lambda _: True)
    assert char_offsets_to_tokens(tok, ids, [0, 2]) == [0, 4]
