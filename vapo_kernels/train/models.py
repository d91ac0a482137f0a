"""Policy, value model and tokenizer: built from a config (no download) or loaded from a folder.

Every folder the trainer writes (built-in model, warm-up snapshot, final checkpoint) holds
``save_pretrained`` output of the model *and* its tokenizer, so
``AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)``
work on it with nothing fetched from a hub.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A real ``tokenizers`` tokenizer with one token per character of ``alphabet``.

    A word-level model over single characters, with a pre-tokenizer that isolates every
    character, is the smallest tokenizer that round-trips our task text exactly; the
    ``Fuse`` decoder joins the characters back without spaces.
    """
    specials = [PAD, BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(alphabet)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int,
    layers: int,
    heads: int,
    max_positions: int,
    attn_implementation: str,
) -> PreTrainedModel:
    """A randomly initialised Llama sized for a 2-core CPU (no download)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def dropout_off(model: torch.nn.Module | None) -> torch.nn.Module | None:
    """Eval mode for training, as verl runs its models: every dropout off, so the old
    log-probs, the values and the loss forward of one PPO step see the same network (the
    ratio of the first epoch's first mini-batch is exactly 1); gradients still flow in eval
    mode. With activation checkpointing the modules transformers checkpoints (the decoder
    layers, and the model body that hands them no KV cache then) keep their own training
    flag, not their sub-modules': transformers recomputes only a module in training mode."""
    if model is None:
        return None
    model.eval()
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            module.training = True
    return model


def load_tokenizer(folder: str):
    """The folder's tokenizer, left-padding (generation appends on the right)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    return tokenizer


def load_policy(folder: str, attn_implementation: str) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation=attn_implementation, dtype=torch.float32
    )


def value_model_from_policy(policy: PreTrainedModel,
                            state_dict: dict[str, torch.Tensor] | None = None) -> PreTrainedModel:
    """A separate transformers model with a scalar head per token, initialised from ``policy``.

    ``AutoModelForTokenClassification`` with one label is the library's own "backbone +
    linear head per position" for every family (Llama, Qwen2, Mistral, GPT-2, ...). The
    backbone weights are copied from the policy (VAPO initialises the critic from a
    trained model; we have no reward model, so the warmed-up policy); only the head is new,
    and it starts at zero so the first value estimates are 0 rather than noise.
    ``state_dict``: the policy's full weights when its own are sharded (FSDP2).
    """
    config = policy.config.__class__.from_dict(policy.config.to_dict())
    config.num_labels = 1
    config.classifier_dropout = 0.0
    value = AutoModelForTokenClassification.from_config(
        config, attn_implementation=policy.config._attn_implementation
    )
    # strict=False: the policy's LM head has no place in the value model (unexpected keys),
    # and the value head is new (missing keys); anything else missing is an error below.
    missing, _ = value.load_state_dict(
        policy.state_dict() if state_dict is None else state_dict, strict=False)
    head = value.get_submodule(_head_name(value))
    new_params = {f"{_head_name(value)}.{name}" for name, _ in head.named_parameters()}
    copied_wrong = [k for k in missing if k not in new_params]
    if copied_wrong:
        raise ValueError(f"value model: policy weights do not fit its backbone: {copied_wrong[:3]}")
    with torch.no_grad():
        for param in head.parameters():
            param.zero_()
    return value.to(dtype=next(policy.parameters()).dtype)


def load_value_model(folder: str, attn_implementation: str) -> PreTrainedModel:
    return AutoModelForTokenClassification.from_pretrained(
        folder, num_labels=1, attn_implementation=attn_implementation, dtype=torch.float32
    )


def _head_name(value: PreTrainedModel) -> str:
    """The token-classification head's attribute (``score`` for Llama/Qwen2, ``classifier`` for GPT-2)."""
    for name in ("score", "classifier"):
        if hasattr(value, name):
            return name
    raise ValueError(f"{type(value).__name__}: no score/classifier head found")
