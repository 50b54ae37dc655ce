"""Chat SFT data: tokenise with the model's chat template, mask non-assistant tokens, batch by length.

The batch for optimizer step `s` is a pure function of (examples, seed, s), so a resumed run sees
exactly the batches it would have seen had it never stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from parallel.trainer import IGNORE_INDEX
from training.batching import EpochBatches, epoch_batches  # noqa: F401


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; IGNORE_INDEX where no loss is taken


@dataclass(frozen=True)
class DataStats:
    rows: int
    examples: int
    truncated: int  # rows cut at seq_len (still used if an assistant token survived)
    dropped: int  # rows with no assistant token left after truncation


def chat_tokenizer(model_dir: Path, renders: str):
    """(tokenizer, pad id) of a model whose chat template renders the stage's rows; `renders` names them
    in the error, e.g. "SFT renders chat rows"."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise ValueError(f"model {model_dir}: the tokenizer has no chat template; {renders} with it")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer, pad_id


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the assistant writes (turn end included).

    Each span runs from the end of the rendered prefix with a generation prompt to the end of the
    rendered prefix that includes the assistant turn, so any template that renders prefixes as
    prefixes works, whatever its markup.
    """
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise ValueError(
                "the chat template does not render conversation prefixes as text prefixes; "
                "cannot locate assistant turns for loss masking"
            )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict]) -> Example:
    """Token ids of the whole conversation; labels only on tokens that start inside an assistant span."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token_id, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = any(lo <= start < hi for lo, hi in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return Example(list(enc["input_ids"]), labels)


def build_examples(rows: list[dict], tokenizer, seq_len: int) -> tuple[list[Example], DataStats]:
    """Tokenise rows, truncating at seq_len; rows whose assistant tokens were all cut are dropped."""
    examples, truncated, dropped = [], 0, 0
    for row in rows:
        ex = tokenize_conversation(tokenizer, row["messages"])
        if len(ex.input_ids) > seq_len:
            truncated += 1
            ex = Example(ex.input_ids[:seq_len], ex.labels[:seq_len])
        # The label at position 0 is never predicted (no previous token), so it does not count.
        if sum(label != IGNORE_INDEX for label in ex.labels[1:]) == 0:
            dropped += 1
            continue
        examples.append(ex)
    return examples, DataStats(len(rows), len(examples), truncated, dropped)


def load_split(path: Path, tokenizer, seq_len: int) -> tuple[list[Example], DataStats]:
    if not path.exists():
        raise ValueError(f"data split {path} does not exist; run the data stage first")
    examples, stats = build_examples(read_jsonl(path), tokenizer, seq_len)
    if not examples:
        raise ValueError(f"{path}: no usable rows (every row lacked an assistant turn within seq_len)")
    return examples, stats


def collate(examples: list[Example], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example (or to `width`); padded positions carry no label and no attention."""
    width = width or max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def eval_batches(
    examples: list[Example], batch_size: int, pad_id: int, *, fill: bool = False, width: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """All examples, sorted by length so padding is small; order does not matter for a token mean.

    fill: top the last batch up to batch_size rows with label-less copies of an example (they add
    no loss and no label tokens), for layouts that split every batch evenly over ranks.
    width: pad every batch to this many positions (pipeline stages need one fixed shape).
    """
    ordered = sorted(examples, key=lambda ex: len(ex.input_ids))
    if fill and len(ordered) % batch_size:
        blank = Example(ordered[0].input_ids, [IGNORE_INDEX] * len(ordered[0].input_ids))
        ordered += [blank] * (batch_size - len(ordered) % batch_size)
    return [collate(ordered[i : i + batch_size], pad_id, width) for i in range(0, len(ordered), batch_size)]
