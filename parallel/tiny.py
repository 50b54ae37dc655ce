"""Tiny decoder models (Llama and the other supported families) and a byte-level tokenizer, built offline for
tests and the tiny recipes."""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
TINY_VOCAB = len(SPECIAL_TOKENS) + 256  # the special tokens and every byte

# Per family, what its tiny config sets beyond the shared shape: model_type, and values that make the family's
# own arithmetic matter at this size (soft-caps that bite, a sliding window shorter than the test sequences,
# non-unit multipliers, several experts per token), so a layout that skipped one would not match one process.
FAMILIES: dict[str, dict] = {
    "gemma2": dict(
        model_type="gemma2",
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        attn_logit_softcapping=1.0,
        final_logit_softcapping=1.0,
        initializer_range=0.05,
        tie_word_embeddings=True,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        final_logit_softcapping=1.0,
        initializer_range=0.05,
        tie_word_embeddings=True,
    ),
    # Phi-4-mini's shape: Phi-3's fused layers, partial rotary embeddings, tied embeddings (Phi-4: untied)
    "phi3": dict(model_type="phi3", partial_rotary_factor=0.5, tie_word_embeddings=True),
    "granite": dict(
        model_type="granite",
        embedding_multiplier=4.0,
        logits_scaling=0.5,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
        tie_word_embeddings=False,
    ),
    "stablelm": dict(model_type="stablelm", use_qkv_bias=True, partial_rotary_factor=0.5, tie_word_embeddings=False),
    "starcoder2": dict(model_type="starcoder2", sliding_window=4, tie_word_embeddings=False),
    "olmo2": dict(model_type="olmo2", tie_word_embeddings=False),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        tie_word_embeddings=False,
    ),
}
_MICRO = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

# name -> config kwargs (model_type: llama when absent); vocab_size is filled in from the tokenizer.
TINY_CONFIGS: dict[str, dict] = {
    "tiny-llama": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "micro-llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    **{f"micro-{family.replace('_', '-')}": {**_MICRO, **extra} for family, extra in FAMILIES.items()},
}


def build_tokenizer():
    """A byte-level BPE tokenizer with no merges (every byte is a token) plus ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a randomly initialised tiny model and its tokenizer as a Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM

    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_CONFIGS)}")
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = tiny_config(
        TINY_CONFIGS[name],
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "hpcft_tiny.json").write_text(json.dumps({"name": name, "seed": seed}))
    return out_dir


def tiny_config(kwargs: dict, **more):
    """The HF config of a TINY_CONFIGS entry (model_type picks the family's config class)."""
    from transformers import AutoConfig

    kwargs = {**kwargs, **more}
    return AutoConfig.for_model(kwargs.pop("model_type", "llama"), **kwargs)
