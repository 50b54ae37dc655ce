"""Chat SFT data: tokenise with the model's chat template, mask non-assistant tokens, batch by length.

The batch for optimizer step `s` is a pure function of (examples, seed, s), so a resumed run sees
exactly the batches it would have seen had it never stopped.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_tools.splits import has_split, iter_split, sha256_file, split_files
from data_tools.templates import data_template
from data_tools.tokens import TokenSplit, build_split_store, encode_turns, fingerprint, read_meta, write_meta
from parallel.trainer import IGNORE_INDEX
from training.batching import EpochBatches, epoch_batches  # noqa: F401


@dataclass(frozen=True)
class Example:
    input_ids: Sequence[int]  # a list, or a numpy array when read from the token store
    labels: Sequence[int]  # aligned with input_ids; IGNORE_INDEX where no loss is taken


@dataclass(frozen=True)
class DataStats:
    rows: int
    examples: int
    truncated: int  # rows cut at seq_len (still used if an assistant token survived)
    dropped: int  # rows with no assistant token left after truncation
    rejected: dict = field(default_factory=dict)  # reason -> rows the tokenizer could not use (JSONL input)


def chat_tokenizer(model_dir: Path, renders: str, data_dir: Path | None = None):
    """(tokenizer, pad id) of a model whose chat template renders the stage's rows; `renders` names them
    in the error, e.g. "SFT renders chat rows". With the data stage's store in data_dir, its template
    (data.format.chat_template) replaces the tokenizer's: the stage renders, saves and exports with it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = data_template(data_dir) if data_dir is not None else None
    if template:
        tokenizer.chat_template = template
    if not tokenizer.chat_template:
        raise ValueError(f"model {model_dir}: the tokenizer has no chat template; {renders} with it")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer, pad_id


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def to_example(ids: np.ndarray, mask: np.ndarray, seq_len: int) -> tuple[Example | None, bool]:
    """(example or None, truncated): the first seq_len tokens, labels where the mask is 1; None when no
    label is left after position 0 (that token is never predicted)."""
    truncated = len(ids) > seq_len
    ids, mask = np.asarray(ids[:seq_len], dtype=np.int64), np.asarray(mask[:seq_len])
    if not mask[1:].any():
        return None, truncated
    return Example(ids, np.where(mask.astype(bool), ids, IGNORE_INDEX)), truncated


def tokenize_conversation(tokenizer, messages: list[dict], template: str | None = None) -> Example:
    """Token ids of the whole conversation; labels only on tokens that start inside an assistant span
    (data_tools.tokens.encode_turns, what the data stage stores)."""
    _, ids, mask = encode_turns(tokenizer, messages, template)
    return Example(ids.tolist(), np.where(mask.astype(bool), ids, IGNORE_INDEX).tolist())


def build_examples(rows: list[dict], tokenizer, seq_len: int) -> tuple[list[Example], DataStats]:
    """In memory (tests, small tools): tokenise rows, truncating at seq_len; rows whose assistant tokens were
    all cut are dropped. Training stages read the token store instead (load_split)."""
    examples, truncated, dropped = [], 0, 0
    for row in rows:
        _, ids, mask = encode_turns(tokenizer, row["messages"])
        ex, cut = to_example(ids, mask, seq_len)
        truncated += cut
        if ex is None:
            dropped += 1
            continue
        examples.append(Example(ex.input_ids.tolist(), ex.labels.tolist()))
    return examples, DataStats(len(rows), len(examples), truncated, dropped)


class ChatExamples(Sequence):
    """A chat split of the token store as training examples, read from the mapped files on access: rows cut
    at seq_len, rows with no label left dropped (counted in `stats`). `lengths` (numpy) feeds batching."""

    def __init__(self, split: TokenSplit, seq_len: int, rejected: dict | None = None):
        self.split, self.seq_len = split, seq_len
        full = split.lengths("ids")
        cut = np.flatnonzero(full > seq_len)
        drop = [i for i in cut if not split.get(int(i), "labels", seq_len)[1:].any()]
        keep = np.ones(len(full), dtype=bool)
        keep[drop] = False
        self.index = np.flatnonzero(keep)
        self.lengths = np.minimum(full, seq_len)[self.index]
        self.sources = split.sources[self.index]
        self.stats = DataStats(len(full), len(self.index), len(cut), len(drop), dict(rejected or {}))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = int(self.index[i])
        ex, _ = to_example(
            self.split.get(row, "ids", self.seq_len), self.split.get(row, "labels", self.seq_len), self.seq_len
        )
        return ex


def open_store(data_dir: Path, kind: str, tokenizer, splits: tuple[str, ...] = ("train", "validation")) -> Path:
    """The token store of `data_dir` (`tokens/`, written by the data stage) for rows of `kind`, checked
    against the model's tokenizer. A directory holding only JSONL splits (`<split>.jsonl` or shards; tests,
    hand-made data) gets its store built here, by rank 0 while the others wait, and rebuilt when the
    JSONL or the tokenizer changes."""
    from parallel import engine

    data_dir = Path(data_dir)
    store = data_dir / "tokens"
    meta = read_meta(store)
    if meta is not None and "built_from" not in meta:  # the data stage's store
        if meta["kind"] != kind:
            raise ValueError(f"{store}: a token store of {meta['kind']} rows, not {kind} rows")
        if meta["tokenizer"]["fingerprint"] != fingerprint(tokenizer, meta["chat_template"]):
            raise ValueError(
                f"{store} was tokenized with a different tokenizer than the model's; rerun the data stage "
                "with this model (the data stage tokenizes with the recipe's model)"
            )
        return store
    for name in splits:
        if not has_split(data_dir, name):
            raise ValueError(
                f"{data_dir}: the data split {name}.jsonl does not exist (nor {name}/*.jsonl shards or a token "
                "store tokens/); run the data stage first"
            )
    wanted = {name: [sha256_file(p) for p in split_files(data_dir, name)] for name in splits}
    wanted["tokenizer"] = [fingerprint(tokenizer, None)]
    if engine.is_leader() and (meta is None or meta.get("built_from") != wanted):
        shutil.rmtree(store, ignore_errors=True)
        rejected = {}
        for name in splits:
            stats = build_split_store(iter_split(data_dir, name), kind, tokenizer, None, store / name / "00000")
            rejected[name] = stats.rejected
        write_meta(store, kind, tokenizer, None, "tokenizer", built_from=wanted, rejected=rejected)
    engine.barrier()
    return store


def load_split(data_dir: Path, name: str, tokenizer, seq_len: int) -> tuple[ChatExamples, DataStats]:
    """Split `name` of data_dir's token store (open_store) as training examples."""
    store = open_store(data_dir, "chat", tokenizer)
    rejected = (read_meta(store).get("rejected") or {}).get(name)
    examples = ChatExamples(TokenSplit(store / name, "chat"), seq_len, rejected)
    if not len(examples):
        raise ValueError(
            f"{data_dir}: the {name} split has no usable rows (every row lacked an assistant turn within "
            f"seq_len {seq_len}; {examples.stats})"
        )
    return examples, examples.stats


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
    examples, batch_size: int, pad_id: int, *, fill: bool = False, width: int | None = None
) -> "EvalBatches":
    """All examples, sorted by length so padding is small; order does not matter for a token mean. The
    batches are collated when read, so host memory does not grow with the validation split.

    fill: top the last batch up to batch_size rows with label-less copies of an example (they add
    no loss and no label tokens), for layouts that split every batch evenly over ranks.
    width: pad every batch to this many positions (pipeline stages need one fixed shape).
    """
    lengths = getattr(examples, "lengths", None)
    if lengths is None:
        lengths = [len(ex.input_ids) for ex in examples]
    order = [int(i) for i in np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")]
    blanks = (-len(order) % batch_size) if fill else 0
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if blanks:
        groups[-1] = groups[-1] + [-1] * blanks  # -1: a label-less copy of the shortest example
    return EvalBatches(examples, groups, pad_id, width, order[0] if order else None)


class EvalBatches(Sequence):
    """Validation batches collated on access (see eval_batches)."""

    def __init__(self, examples, groups: list[list[int]], pad_id: int, width: int | None, shortest: int | None):
        self.examples, self.groups, self.pad_id, self.width, self.shortest = examples, groups, pad_id, width, shortest

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        rows = []
        for index in self.groups[i]:
            if index >= 0:
                rows.append(self.examples[index])
            else:
                ex = self.examples[self.shortest]
                rows.append(Example(ex.input_ids, [IGNORE_INDEX] * len(ex.input_ids)))
        return collate(rows, self.pad_id, self.width)
