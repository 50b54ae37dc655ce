"""Read source files and turn every row into `messages` (a list of {role, content}).

Alpaca, ShareGPT and OpenAI-messages rows are accepted; `auto` picks the format per row. A row that
cannot be parsed is rejected with a short reason instead of failing the run.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


class RowError(ValueError):
    """A row that cannot become a conversation; `reason` is a short machine-readable label."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Normalised:
    kept: list[dict] = field(default_factory=list)      # {"id", "messages", "source"}
    rejected: list[dict] = field(default_factory=list)  # {"id", "reason", "source", "raw"}
    num_read: int = 0


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row or "output" in row:
        return "alpaca"
    raise RowError("unknown_format")


def to_messages(row: object, fmt: str = "auto") -> list[dict]:
    """The row as a validated conversation; raises RowError on anything unusable."""
    if not isinstance(row, dict):
        raise RowError("not_an_object")
    fmt = detect_format(row) if fmt == "auto" else fmt
    parse = {"alpaca": _from_alpaca, "sharegpt": _from_sharegpt, "messages": _from_messages}[fmt]
    messages = parse(row)
    check_conversation(messages)
    return messages


def _text(row: dict, key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise RowError(f"missing_{key}")
        return ""
    if not isinstance(row[key], str):
        raise RowError(f"bad_{key}")
    return row[key].strip()


def _from_alpaca(row: dict) -> list[dict]:
    instruction, extra = _text(row, "instruction"), _text(row, "input", required=False)
    output, system = _text(row, "output"), _text(row, "system", required=False)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _from_sharegpt(row: dict) -> list[dict]:
    turns = row.get("conversations")
    if turns is None:
        raise RowError("missing_conversations")
    if not isinstance(turns, list):
        raise RowError("bad_conversations")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError("bad_turn")
        if turn["from"] not in SHAREGPT_ROLES:
            raise RowError("bad_role")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": _text(turn, "value")})
    return messages


def _from_messages(row: dict) -> list[dict]:
    turns = row.get("messages")
    if turns is None:
        raise RowError("missing_messages")
    if not isinstance(turns, list):
        raise RowError("bad_messages")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise RowError("bad_turn")
        if turn["role"] not in ROLES:
            raise RowError("bad_role")
        messages.append({"role": turn["role"], "content": _text(turn, "content")})
    return messages


def check_conversation(messages: list[dict]) -> None:
    """Optional leading system message, then user/assistant turns alternating, ending on an answer."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise RowError("no_turns")
    for i, message in enumerate(body):
        if message["role"] != ("user", "assistant")[i % 2]:
            raise RowError("bad_turn_order")
    if body[-1]["role"] != "assistant":
        raise RowError("no_answer")
    for message in messages:
        if not message["content"]:
            raise RowError("empty_answer" if message["role"] == "assistant" else "empty_prompt")


def chat_text(messages: list[dict]) -> str:
    """The text the quality filters and dedup look at: message contents, one line block per message."""
    return "\n".join(m["content"] for m in messages)


def read_rows(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """(row index, parsed row or None, raw line) for a JSONL(.gz) or Parquet file."""
    if path.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield i, row, None
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line), line.rstrip("\n")
            except json.JSONDecodeError:
                yield i, None, line.rstrip("\n")


def normalise_file(path: Path, fmt: str, id_prefix: str, source: str, out: Normalised) -> None:
    """Append the file's rows to `out`; ids are `<id_prefix>-<row index>`, stable across runs."""
    for i, row, line in read_rows(path):
        out.num_read += 1
        row_id = f"{id_prefix}-{i:07d}"
        try:
            if row is None:
                raise RowError("bad_json")
            out.kept.append({"id": row_id, "messages": to_messages(row, fmt), "source": source})
        except RowError as e:
            raw = line if line is not None else json.dumps(row, default=str)
            out.rejected.append({"id": row_id, "reason": e.reason, "source": source, "raw": raw})
