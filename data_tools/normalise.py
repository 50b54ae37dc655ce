"""Read source files and turn every row into `messages` (a list of {role, content}).

Alpaca, ShareGPT and OpenAI-messages rows are accepted; `auto` picks the format per row. A row that
cannot be parsed is rejected with a short reason instead of failing the run.
"""

from __future__ import annotations

import contextlib
import gzip
import json
from pathlib import Path
from typing import Iterator

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RowError(ValueError):
    """A row that cannot become a conversation; `reason` is a short machine-readable label."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


KINDS = ("chat", "preference", "unpaired")


def detect_format(row: dict) -> str:
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "completion" in row or ("label" in row and "prompt" in row):
        return "unpaired"
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


# ---- preference rows ------------------------------------------------------------------------------


def _pref_messages(value: object, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError(f"empty_{key}" if value == [] else f"bad_{key}")
    for m in value:
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise RowError(f"bad_{key}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _pref_turns(value: object, key: str) -> list[dict]:
    """A response as messages: a string is one assistant turn."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"empty_{key}")
        return [{"role": "assistant", "content": value}]
    return _pref_messages(value, key)


def _shared_prefix(a: list[dict], b: list[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def parse_preference(row: object) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen response messages, rejected response messages); raises RowError.

    Accepted: {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}; without a
    prompt, the chosen and rejected conversations' shared prefix is the prompt.
    """
    if not isinstance(row, dict):
        raise RowError("not_an_object")
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise RowError(f"missing_{key}")
    chosen, rejected = _pref_turns(row["chosen"], "chosen"), _pref_turns(row["rejected"], "rejected")
    if row.get("prompt") is None:
        if isinstance(row["chosen"], str) or isinstance(row["rejected"], str):
            raise RowError("missing_prompt")
        # Implicit prompt: everything the two conversations share before they differ.
        n = _shared_prefix(chosen, rejected)
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    elif isinstance(row["prompt"], str):
        if not row["prompt"].strip():
            raise RowError("empty_prompt")
        prompt = [{"role": "user", "content": row["prompt"]}]
    else:
        prompt = _pref_messages(row["prompt"], "prompt")
    if row.get("prompt") is not None:
        # Responses given as whole conversations repeat the prompt; keep what follows it.
        chosen, rejected = (t[len(prompt) :] if t[: len(prompt)] == prompt else t for t in (chosen, rejected))
    if not prompt or prompt[-1]["role"] == "assistant":
        raise RowError("no_prompt_turn")
    if chosen == rejected:
        raise RowError("identical_responses")
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
            raise RowError(f"empty_{key}")
    return prompt, chosen, rejected


def _prompt_turns(value: object) -> list[dict]:
    if value is None:
        raise RowError("missing_prompt")
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty_prompt")
        return [{"role": "user", "content": value}]
    return _pref_messages(value, "prompt")


def parse_unpaired(row: object) -> tuple[list[dict], list[dict], bool]:
    """(prompt messages, completion messages, desirable) of an unpaired row; raises RowError.

    Accepted (TRL's unpaired preference format): {"prompt": str | messages, "completion": str | messages,
    "label": true | false}; a completion given as the whole conversation repeats the prompt first."""
    if not isinstance(row, dict):
        raise RowError("not_an_object")
    if row.get("label") is None:
        raise RowError("missing_label")
    if not isinstance(row["label"], bool):
        raise RowError("bad_label")
    if row.get("completion") is None:
        raise RowError("missing_completion")
    prompt, completion = _prompt_turns(row.get("prompt")), _pref_turns(row["completion"], "completion")
    if completion[: len(prompt)] == prompt:
        completion = completion[len(prompt) :]
    if prompt[-1]["role"] == "assistant":
        raise RowError("no_prompt_turn")
    if not completion or completion[-1]["role"] != "assistant" or not completion[-1]["content"].strip():
        raise RowError("empty_completion")
    return prompt, completion, row["label"]


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


def record_text(record: dict) -> str:
    """What filters, PII counts and dedup see: the conversation, and a preference row's rejected response."""
    return chat_text(record["messages"] + record.get("rejected", []))


UTF8_BOM = b"\xef\xbb\xbf"


def json_line(obj) -> str:
    """One JSONL line (no newline): UTF-8 text as is, but U+2028/U+2029 escaped, since readers that split
    on every Unicode line break (str.splitlines, JavaScript) would cut the line there."""
    return json.dumps(obj, ensure_ascii=False).replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def read_rows(path: Path) -> Iterator[tuple[int, object, str | None, str | None]]:
    """(row index, parsed row or None, raw line, reason the line is unreadable or None) for a JSONL(.gz) or
    Parquet file. Nothing in a line stops the file: bytes that are not UTF-8 ('bad_utf8'), NUL bytes
    ('nul_byte'), JSON that does not parse ('bad_json'; 'truncated_line' for a last line without its
    newline), an unpaired surrogate escape no UTF-8 output could hold ('lone_surrogate') and a gzip
    stream that ends early ('truncated_file') come back as reasons. Lines end at b"\n" only (a U+2028
    inside a string is content), a byte-order mark on the first line and CR of CRLF are dropped, blank
    lines are skipped."""
    if path.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield i, row, None, None
        return
    with open(path, "rb") as f:
        yield from read_stream(f, gzipped=path.suffix == ".gz")


def read_stream(f, gzipped: bool = False) -> Iterator[tuple[int, object, str | None, str | None]]:
    """read_rows of an open binary JSONL stream (a local file or a data_tools.storage URL)."""
    i = -1
    with gzip.open(f, "rb") if gzipped else contextlib.nullcontext(f) as lines:
        try:
            for i, raw in enumerate(lines):
                yield (i, *_parse_line(raw, first=i == 0))
        except (EOFError, gzip.BadGzipFile, OSError) as err:  # a compressed file cut short
            yield i + 1, None, f"{type(err).__name__}: {err}", "truncated_file"


def _parse_line(raw: bytes, *, first: bool) -> tuple[object, str | None, str | None]:
    complete = raw.endswith(b"\n")
    raw = raw.rstrip(b"\r\n")
    if first and raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM) :]
    if not raw.strip():
        return None, None, "blank"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, raw.decode("utf-8", errors="backslashreplace"), "bad_utf8"
    if "\x00" in text:
        return None, text.replace("\x00", "\\x00"), "nul_byte"
    try:
        row = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None, text, "bad_json" if complete else "truncated_line"
    if "\\ud" in text.lower():  # an escaped UTF-16 surrogate: valid only as a pair
        try:
            json_line(row).encode("utf-8")
        except UnicodeEncodeError:
            return None, text, "lone_surrogate"
    return row, text, None


def row_kind(row: object, fmt: str) -> str:
    """ "preference" or "unpaired" for rows in those formats (declared or detected), else "chat"."""
    if fmt in ("preference", "unpaired"):
        return fmt
    if fmt == "auto" and isinstance(row, dict):
        with contextlib.suppress(RowError):
            detected = detect_format(row)
            if detected in ("preference", "unpaired"):
                return detected
    return "chat"


def to_record(row: object, fmt: str = "auto") -> dict:
    """The row as a normalised record; raises RowError on anything unusable. Chat: {"messages"}. Preference:
    {"messages": prompt + chosen response, "rejected": the rejected response's messages, "prompt_turns",
    "margin" (when the row has one)}. Unpaired: {"messages": prompt + completion, "prompt_turns", "label"}."""
    kind = row_kind(row, fmt)
    if kind == "chat":
        return {"messages": to_messages(row, fmt)}
    if kind == "unpaired":
        prompt, completion, desirable = parse_unpaired(row)
        check_conversation(prompt + completion)
        return {"messages": prompt + completion, "prompt_turns": len(prompt), "label": desirable}
    prompt, chosen, rejected = parse_preference(row)
    check_conversation(prompt + chosen)
    check_conversation(prompt + rejected)
    record = {"messages": prompt + chosen, "rejected": rejected, "prompt_turns": len(prompt)}
    if row.get("margin") is not None:  # an optional reward margin (reward model stages)
        record["margin"] = row_margin(row)
    return record


def row_margin(row: dict) -> float:
    """A preference row's reward margin (0.0 when it has none); RowError('bad_margin') if not a number."""
    value = row.get("margin", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError("bad_margin")
    return float(value)
