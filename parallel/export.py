"""Export a checkpoint as a plain Hugging Face model directory, checked against the trained model."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from parallel.checkpoint import load_checkpoint, read_manifest

MAX_LOGIT_DIFF = 1e-4  # absolute part of the export check's limit
LOGIT_RTOL = 1e-5  # relative part, to the largest logit: a LoRA merge rounds in fp32 at the logits' scale
PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Reverse the word: export"}, {"role": "assistant", "content": "tropxe"}],
    [{"role": "user", "content": "Hello! What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Write a haiku about checkpoints."}],
]


class ExportMismatchError(RuntimeError):
    """The exported model's logits differ from the trained model's."""


def export_hf(model_dir: Path, checkpoint_dir: Path, out_dir: Path) -> dict:
    """Write safetensors, config, generation_config and tokenizer to out_dir (LoRA merged), then compare
    the reloaded export's logits with the trained model's on probe sequences.

    Returns {"max_abs_logit_diff", "params", "merged"}; raises ExportMismatchError above 1e-4 + 1e-5 x the
    largest logit (merging LoRA into 30 layers of a real model rounds at about 1e-4 of logits near 20; a
    wrong export is off by orders more).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = read_manifest(checkpoint_dir)["mode"] in ("lora", "qlora")
    trained = load_checkpoint(checkpoint_dir, base_model_dir=model_dir)
    # Merging rewrites base weights in place, so merge a copy and keep the unmerged model as reference.
    plain = copy.deepcopy(trained).merge_and_unload() if merged else trained
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    _align_generation_config(plain, tokenizer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    exported = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    probes = probe_batch(tokenizer)
    diff = max_logit_diff(trained, exported, probes)
    limit = MAX_LOGIT_DIFF + LOGIT_RTOL * max_abs_logit(trained, probes)
    if diff > limit:
        raise ExportMismatchError(
            f"exported model's logits differ from the trained model's by {diff:.3g} "
            f"(limit {limit:.3g}); {out_dir} is not a faithful export"
        )
    return {"max_abs_logit_diff": diff, "params": sum(p.numel() for p in exported.parameters()), "merged": merged}


def _align_generation_config(model, tokenizer) -> None:
    # Generation should stop at the chat turn end and pad with the tokenizer's pad token.
    gen = model.generation_config
    if tokenizer.eos_token_id is not None:
        gen.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id


def probe_batch(tokenizer) -> list[torch.Tensor]:
    """Token ids of a few chat-rendered probes (one tensor each, no padding to keep the check exact)."""
    probes = []
    for messages in PROBE_CONVERSATIONS:
        if tokenizer.chat_template:
            open_turn = messages[-1]["role"] == "user"
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn)
        else:
            text = "\n".join(m["content"] for m in messages)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        probes.append(ids)
    return probes


@torch.no_grad()
def max_logit_diff(reference, candidate, probes: list[torch.Tensor]) -> float:
    diffs = [(reference(input_ids=ids).logits - candidate(input_ids=ids).logits).abs().max() for ids in probes]
    return float(max(diffs))


@torch.no_grad()
def max_abs_logit(model, probes: list[torch.Tensor]) -> float:
    return float(max(model(input_ids=ids).logits.abs().max() for ids in probes))
