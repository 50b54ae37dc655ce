"""Pipeline steps of the data stage: shard reading, rejected-row writing, chat formatting, splitting."""

from __future__ import annotations

import hashlib
import json
from typing import IO, Callable

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.text import simplify_text

from data_tools.normalise import json_line

SPLITS = ("train", "validation", "test")


# datatrove's JsonlReader/JsonlWriter need orjson (its optional "io" extra); these use the stdlib.
class JsonLinesWriter(DiskWriter):
    default_output_filename = "${rank}.jsonl"
    name = "🐿 JSON lines"

    def __init__(self, output_folder: str, output_filename: str | None = None, adapter: Callable | None = None):
        super().__init__(output_folder, output_filename=output_filename, compression=None, adapter=adapter)

    def _write(self, document: dict, file_handler: IO, _filename: str) -> None:
        file_handler.write(json_line(document) + "\n")


class RankShardReader(BaseDiskReader):
    """Reads exactly `<rank>.jsonl`: dedup filters count documents by position, so each rank must see
    the same stream its signature stage saw, even when an earlier rank wrote no file at all."""

    name = "📖 Rank shard"

    def __init__(self, data_folder: str):
        super().__init__(data_folder, add_file_path=False)

    def read_file(self, filepath: str) -> DocumentsPipeline:
        with self.data_folder.open(filepath, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                with self.track_time():
                    document = self.get_document_from_dict(json.loads(line), filepath, i)
                if document:
                    yield document

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        path = f"{rank:05d}.jsonl"
        if self.data_folder.exists(path):
            yield from self.read_files_shard([path])


def shard_writer(folder: str) -> JsonLinesWriter:
    return JsonLinesWriter(folder)


class RejectWriter(JsonLinesWriter):
    """Exclusion writer: one row per rejected document with the filter's reason (or the step's)."""

    def __init__(self, folder: str, step: str, default_reason: str):
        super().__init__(folder)
        self.step, self.default_reason = step, default_reason

    def _default_adapter(self, document: Document) -> dict:
        meta = document.metadata
        row = {
            "id": document.id,
            "reason": meta.get("filter_reason", self.default_reason),
            "source": meta.get("source"),
            "messages": meta["messages"],
        }
        return row | ({"rejected": meta["rejected"]} if "rejected" in meta else {})


class TokenizeFilter(BaseFilter):
    """Renders each conversation with the chat template and tokenizes it once, with its assistant-only
    label mask (data_tools.tokens); rows over `max_tokens`, rows the template cannot render and rows with no
    answer token are rejected with that reason. The rendered text and the token arrays ride along in the
    document's metadata to the split and token-store writers."""

    name = "💬 Chat template + tokens"

    def __init__(
        self,
        tokenizer_dir: str,
        chat_template: str,
        max_tokens: int,
        system_prompt: str | None = None,
        exclusion_writer: DiskWriter | None = None,
    ):
        super().__init__(exclusion_writer)
        self.tokenizer_dir, self.chat_template = tokenizer_dir, chat_template
        self.max_tokens, self.system_prompt = max_tokens, system_prompt
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:  # loaded in the rank's process, not pickled with the pipeline
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return self._tokenizer

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        from data_tools.normalise import RowError
        from data_tools.tokens import encode_chat, encode_pair, encode_unpaired

        meta = doc.metadata
        messages = meta["messages"]
        prompt_turns = meta.get("prompt_turns")
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}] + messages
            prompt_turns = prompt_turns + 1 if prompt_turns is not None else None
        try:
            if "rejected" in meta:  # a preference row: both sides must fit
                n = prompt_turns
                (text, rejected_text), arrays = encode_pair(
                    self.tokenizer, messages[:n], messages[n:], meta["rejected"], self.chat_template
                )
                num_tokens = max(len(arrays["chosen_ids"]), len(arrays["rejected_ids"]))
                meta.update(rendered_rejected=rejected_text, prompt_turns=n)
            elif "label" in meta:  # an unpaired (KTO) row
                n = prompt_turns
                text, arrays = encode_unpaired(
                    self.tokenizer, messages[:n], messages[n:], meta["label"], self.chat_template
                )
                num_tokens = len(arrays["ids"])
                meta.update(prompt_turns=n)
            else:
                text, arrays = encode_chat(self.tokenizer, messages, self.chat_template)
                num_tokens = len(arrays["ids"])
        except RowError as err:
            return False, err.reason
        if num_tokens > self.max_tokens:
            return False, "too_many_tokens"
        meta.update(messages=messages, rendered=text, num_tokens=num_tokens, tokens=arrays)
        return True

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}


class TokenStoreWriter(PipelineStep):
    """Writes each document's token arrays to its split's shard of the token store
    (`<folder>/<split>/<rank>.*`, data_tools.tokens), then drops them from the document."""

    type = "💽 - WRITER"
    name = "🔢 Token store"

    def __init__(self, folder: str, kind: str, tokenizer_dir: str):
        super().__init__()
        self.folder, self.kind, self.tokenizer_dir = folder, kind, tokenizer_dir

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from pathlib import Path

        from transformers import AutoTokenizer

        from data_tools.tokens import ShardWriter, row_key

        vocab = len(AutoTokenizer.from_pretrained(self.tokenizer_dir))
        writers = {}
        try:
            for doc in data:
                meta = doc.metadata
                split = meta["split"]
                if split not in writers:
                    writers[split] = ShardWriter(Path(self.folder) / split / f"{rank:05d}", self.kind, vocab)
                writers[split].add(
                    meta.pop("tokens"), row_key(doc.id), meta.get("source_index", -1), meta.get("margin", 0.0)
                )
                self.stat_update(f"tokens_{split}", value=meta["num_tokens"])
                yield doc
        finally:
            for writer in writers.values():
                writer.close()


def prompt_key(messages: list[dict], normalize_numbers: bool = True) -> str:
    """The user side of a conversation, lower-cased, without punctuation or extra spaces; numbers are
    kept apart when the dedup config says rows differ by their numbers."""
    from datatrove.utils.text import TextNormConfig

    text = "\n".join(m["content"] for m in messages if m["role"] == "user")
    return simplify_text(text, TextNormConfig(norm_numbers=normalize_numbers))


def assign_split(key: str, validation: float, test: float, seed: int) -> str:
    """Deterministic split for a prompt key: rows with the same key always land together."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if u < test else "validation" if u < test + validation else "train"


class SplitAssigner(PipelineStep):
    type = "🗂 - SPLIT"
    name = "🗂 Split by prompt"

    def __init__(self, validation: float, test: float, seed: int, normalize_numbers: bool = True):
        super().__init__()
        self.validation, self.test, self.seed = validation, test, seed
        self.normalize_numbers = normalize_numbers

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            key = prompt_key(doc.metadata["messages"], self.normalize_numbers)
            split = assign_split(key, self.validation, self.test, self.seed)
            doc.metadata["split"] = split
            self.stat_update(split)
            yield doc


def _split_row(writer: DiskWriter, doc: Document) -> dict:
    meta = doc.metadata
    if "label" in meta:
        n = meta["prompt_turns"]
        return {
            "id": doc.id,
            "prompt": meta["messages"][:n],
            "completion": meta["messages"][n:],
            "label": meta["label"],
            "text": meta["rendered"],
        }
    if "rejected" not in meta:
        row = {"id": doc.id, "messages": meta["messages"], "text": meta["rendered"]}
        return row | ({"provenance": meta["provenance"]} if "provenance" in meta else {})
    n = meta["prompt_turns"]
    return {
        "id": doc.id,
        "prompt": meta["messages"][:n],
        "chosen": meta["messages"][n:],
        "rejected": meta["rejected"],
        "text": meta["rendered"],
        "text_rejected": meta["rendered_rejected"],
    } | ({"margin": meta["margin"]} if "margin" in meta else {})


def split_writer(folder: str) -> JsonLinesWriter:
    return JsonLinesWriter(folder, output_filename="${split}/${rank}.jsonl", adapter=_split_row)
