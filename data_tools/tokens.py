"""Tokenize once: rows as token ids + assistant-only label masks in a memory-mapped token store.

The store uses megatron-core's indexed dataset format (`megatron.core.datasets.indexed_dataset`: a .bin of
concatenated sequences and an .idx of their lengths and offsets), one pair of files per field and shard,
so Megatron-LM / NeMo tools can read the token ids as they are. Layout of `<data>/tokens/`:

    meta.json                         kind, fields, dtypes, tokenizer fingerprint, chat template, splits
    <split>/<rank>.<field>.bin|.idx   one indexed dataset per field (chat: ids, labels; preference:
                                      chosen_ids, chosen_labels, rejected_ids, rejected_labels; unpaired:
                                      ids, labels, desirable (one 0/1 value)); row i of every field belongs
                                      to the same example, one document per row
    <split>/<rank>.rows               ROW_DTYPE records: the row's key (from its id), source index, margin

`labels` fields are 0/1 masks (uint8): 1 where the token starts inside an assistant turn (its end
marker included). Readers order a split's rows by key, so the order (and every batch drawn from it)
does not depend on how many ranks wrote the shards.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from data_tools.normalise import RowError

FIELDS = {
    "chat": ("ids", "labels"),
    "preference": ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"),
    "unpaired": ("ids", "labels", "desirable"),
}
LENGTH_FIELD = {"chat": ("ids",), "preference": ("chosen_ids", "rejected_ids"), "unpaired": ("ids",)}
MASK_FIELDS = ("labels", "desirable")  # 0/1 per token (or per row), stored as uint8
ROW_DTYPE = np.dtype([("key", "<u8"), ("source", "<i4"), ("margin", "<f4")])
FORMAT = "megatron-indexed-dataset"
META = "meta.json"

# A conversation every chat template can render, tokenized to tell whether two tokenizers agree.
_PROBE = [
    {"role": "user", "content": "Héllo wörld, 12 + 30 = ?\n  tabs\tand ✓ emoji 🙂"},
    {"role": "assistant", "content": "42. Ünïcode ok!"},
]


def _indexed():
    """megatron-core's indexed dataset module (its package __init__ warns about optional CUDA extensions)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def row_key(row_id: str) -> int:
    return int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "little")


# ---- rendering and label masks ---------------------------------------------------------------------


def render(tokenizer, messages: list[dict], template: str | None, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_spans(tokenizer, messages: list[dict], template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the assistant writes (turn end included).

    Each span runs from the end of the rendered prefix with a generation prompt to the end of the
    rendered prefix that includes the assistant turn, so any template that renders prefixes as
    prefixes works, whatever its markup.
    """
    text = render(tokenizer, messages, template, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], template, generation_prompt=True)
        through = render(tokenizer, messages[: i + 1], template, generation_prompt=False)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise ValueError(
                "the chat template does not render conversation prefixes as text prefixes; "
                "cannot locate assistant turns for loss masking"
            )
        spans.append((len(before), len(through)))
    return text, spans


def encode_turns(
    tokenizer, messages: list[dict], template: str | None = None, skip_answers: int = 0
) -> tuple[str, np.ndarray, np.ndarray]:
    """(rendered text, token ids, label mask) of a conversation: the mask is 1 on tokens that start inside
    an assistant span, leaving out the first `skip_answers` assistant turns (context of a preference pair).
    A template that cannot render the turns raises RowError('template_error')."""
    try:
        text, spans = assistant_spans(tokenizer, messages, template)
    except Exception as err:  # jinja raises on role orders a template refuses; the row is unusable
        raise RowError("template_error") from err
    spans = spans[skip_answers:]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    starts = np.asarray([start for start, _ in enc["offset_mapping"]], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for lo, hi in spans:
        mask |= ((starts >= lo) & (starts < hi)).astype(np.uint8)
    return text, ids, mask


def _has_labels(mask: np.ndarray) -> bool:
    return bool(mask[1:].any())  # position 0 is never predicted (no previous token)


def encode_chat(tokenizer, messages: list[dict], template: str | None = None) -> tuple[str, dict[str, np.ndarray]]:
    text, ids, mask = encode_turns(tokenizer, messages, template)
    if not _has_labels(mask):
        raise RowError("no_answer_tokens")
    return text, {"ids": ids, "labels": mask}


def encode_pair(
    tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict], template: str | None = None
) -> tuple[tuple[str, str], dict[str, np.ndarray]]:
    """Both sides of a preference pair, labels on the responses' assistant turns only."""
    skip = sum(m["role"] == "assistant" for m in prompt)
    out, texts = {}, []
    for side, response in (("chosen", chosen), ("rejected", rejected)):
        text, ids, mask = encode_turns(tokenizer, prompt + response, template, skip)
        if not _has_labels(mask):
            raise RowError("no_answer_tokens")
        out[f"{side}_ids"], out[f"{side}_labels"] = ids, mask
        texts.append(text)
    return (texts[0], texts[1]), out


def encode_unpaired(
    tokenizer, prompt: list[dict], completion: list[dict], desirable: bool, template: str | None = None
) -> tuple[str, dict[str, np.ndarray]]:
    """An unpaired (KTO) row: labels on the completion's assistant turns only, and its desirable flag."""
    skip = sum(m["role"] == "assistant" for m in prompt)
    text, ids, mask = encode_turns(tokenizer, prompt + completion, template, skip)
    if not _has_labels(mask):
        raise RowError("no_answer_tokens")
    return text, {"ids": ids, "labels": mask, "desirable": np.array([int(desirable)], dtype=np.uint8)}


def fingerprint(tokenizer, template: str | None) -> str:
    """A hash of what the tokenizer and template make of a probe conversation (and the vocabulary size): two
    tokenizers with the same fingerprint tokenize a store's rows alike."""
    try:
        ids = encode_turns(tokenizer, _PROBE, template)[1].tolist()
    except RowError:
        ids = tokenizer(_PROBE[0]["content"], add_special_tokens=False)["input_ids"]
    return hashlib.sha256(json.dumps([len(tokenizer), ids]).encode()).hexdigest()


# ---- writing -------------------------------------------------------------------------------------


def ids_dtype(vocab_size: int):
    return _indexed().DType.optimal_dtype(vocab_size)


class ShardWriter:
    """One shard (`<prefix>.<field>.bin|.idx` + `<prefix>.rows`) of a split, written row by row; memory
    holds only the index (a length per row and field) until close()."""

    def __init__(self, prefix: Path, kind: str, vocab_size: int):
        import torch  # megatron's builder takes tensors

        self._torch = torch
        self.prefix, self.kind = Path(prefix), kind
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        indexed = _indexed()
        dtypes = {f: (np.uint8 if f.endswith(MASK_FIELDS) else ids_dtype(vocab_size)) for f in FIELDS[kind]}
        self._builders = {f: indexed.IndexedDatasetBuilder(self._path(f, ".bin"), dtype=d) for f, d in dtypes.items()}
        self._rows = open(f"{self.prefix}.rows", "wb")
        self.num_rows = self.num_tokens = 0

    def _path(self, field: str, suffix: str) -> str:
        return f"{self.prefix}.{field}{suffix}"

    def add(self, arrays: dict[str, np.ndarray], key: int, source: int = -1, margin: float = 0.0) -> None:
        for field, builder in self._builders.items():
            builder.add_item(self._torch.from_numpy(np.ascontiguousarray(arrays[field])))
            builder.end_document()
        self._rows.write(np.array([(key, source, margin)], dtype=ROW_DTYPE).tobytes())
        self.num_rows += 1
        self.num_tokens += sum(len(arrays[f]) for f in LENGTH_FIELD[self.kind])

    def close(self) -> None:
        for field, builder in self._builders.items():
            builder.finalize(self._path(field, ".idx"))
        self._rows.close()


def shard_files(folder: Path) -> list[Path]:
    """Every file of the shards under `folder` (a split folder or the store), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in (".bin", ".idx", ".rows"))


def write_meta(store: Path, kind: str, tokenizer, template: str | None, template_source: str, **extra) -> dict:
    """meta.json of a store whose shards are written: rows and tokens per split, from the shards' indexes."""
    store = Path(store)
    splits = {}
    for split_dir in sorted(p for p in store.iterdir() if p.is_dir()):
        data = TokenSplit(split_dir, kind)
        splits[split_dir.name] = {
            "rows": len(data),
            "tokens": int(sum(int(data.lengths(f).sum()) for f in LENGTH_FIELD[kind])),
            "label_tokens": int(data.label_tokens()),
            "shards": [p.name[: -len(".rows")] for p in sorted(split_dir.glob("*.rows"))],
        }
    meta = {
        "format": FORMAT,
        "kind": kind,
        "fields": list(FIELDS[kind]),
        "tokenizer": {"vocab_size": len(tokenizer), "fingerprint": fingerprint(tokenizer, template)},
        "chat_template": template,
        "chat_template_source": template_source,
        "chat_template_sha256": hashlib.sha256((template or "").encode()).hexdigest(),
        "splits": splits,
        **extra,
    }
    (store / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_meta(store: Path) -> dict | None:
    path = Path(store) / META
    return json.loads(path.read_text()) if path.is_file() else None


# ---- reading -------------------------------------------------------------------------------------


class TokenSplit:
    """One split of a store, memory-mapped: every shard's rows, ordered by row key."""

    def __init__(self, folder: Path, kind: str):
        self.folder, self.kind = Path(folder), kind
        self.prefixes = prefixes = [str(p)[: -len(".rows")] for p in sorted(self.folder.glob("*.rows"))]
        indexed = _indexed()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._data = {f: [indexed.IndexedDataset(f"{p}.{f}") for p in prefixes] for f in FIELDS[kind]}
        rows = [np.fromfile(f"{p}.rows", dtype=ROW_DTYPE) for p in prefixes]
        counts = [len(r) for r in rows]
        for field, shards in self._data.items():
            if [len(d) for d in shards] != counts:
                raise ValueError(f"token store {self.folder}: field {field} does not line up with its rows files")
        self.rows = np.concatenate(rows) if rows else np.zeros(0, ROW_DTYPE)
        self.order = np.argsort(self.rows["key"], kind="stable")
        self._shard = np.repeat(np.arange(len(counts)), counts)[self.order]
        self._local = np.concatenate([np.arange(c) for c in counts]).astype(np.int64)[self.order] if counts else []

    def __len__(self) -> int:
        return len(self.order)

    def lengths(self, field: str) -> np.ndarray:
        """Tokens per row of `field`, in key order."""
        shards = self._data[field]
        if not shards:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([d.sequence_lengths for d in shards]).astype(np.int64)[self.order]

    def get(self, i: int, field: str, length: int | None = None) -> np.ndarray:
        """Row i (key order) of `field`, the first `length` tokens when given (read from the mapped file)."""
        dataset = self._data[field][self._shard[i]]
        local = int(self._local[i])
        if length is None:
            return dataset[local]
        return dataset.get(local, 0, min(length, int(dataset.sequence_lengths[local])))

    @property
    def sources(self) -> np.ndarray:
        return self.rows["source"][self.order]

    @property
    def margins(self) -> np.ndarray:
        return self.rows["margin"][self.order]

    def label_tokens(self) -> int:
        """Tokens with a label (mask 1) over every labels field, summed from the mapped files."""
        total = 0
        for field in (f for f in FIELDS[self.kind] if f.endswith("labels")):
            for prefix in self.prefixes:
                path = Path(f"{prefix}.{field}.bin")
                if path.stat().st_size:
                    total += int(np.memmap(path, dtype=np.uint8, mode="r").sum(dtype=np.int64))
        return total


@dataclass
class BuildStats:
    rows: int = 0
    kept: int = 0
    rejected: dict | None = None


def build_split_store(rows: Iterable[dict], kind: str, tokenizer, template: str | None, prefix: Path) -> BuildStats:
    """Tokenize JSONL split rows (chat: {"messages"}; preference: {"prompt", "chosen", "rejected"};
    unpaired: {"prompt", "completion", "label"}, each in any accepted form) into one shard; unusable rows are
    counted by reason, never raised."""
    from collections import Counter

    from data_tools.normalise import parse_preference, parse_unpaired, row_margin

    writer = ShardWriter(prefix, kind, len(tokenizer))
    stats, reasons = BuildStats(), Counter()
    for i, row in enumerate(rows):
        stats.rows += 1
        try:
            if not isinstance(row, dict):
                raise RowError("not_an_object")
            margin = row_margin(row)
            if kind == "chat":
                messages = row.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise RowError("bad_messages")
                _, arrays = encode_chat(tokenizer, messages, template)
            elif kind == "unpaired":
                _, arrays = encode_unpaired(tokenizer, *parse_unpaired(row), template)
            else:
                _, arrays = encode_pair(tokenizer, *parse_preference(row), template)
        except RowError as err:
            reasons[err.reason] += 1
            continue
        writer.add(arrays, row_key(str(row.get("id", i))), margin=margin)
        stats.kept += 1
    writer.close()
    stats.rejected = dict(sorted(reasons.items()))
    return stats
