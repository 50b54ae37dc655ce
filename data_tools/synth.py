"""The project's generated instruction data: string transforms a tiny model learns on a CPU in minutes.

Clean rows are mixed with exact and near duplicates, low-quality rows and planted PII, so that the data
stage has real work to do. Output is deterministic for a given seed.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz"

TRANSFORMS = {
    "uppercase": (("Uppercase the word: {w}", "Write {w} in capital letters."), lambda w: w.upper()),
    "reverse": (("Reverse the word: {w}", "Spell {w} backwards."), lambda w: w[::-1]),
    "double": (("Repeat the word twice: {w}", "Write {w} two times with no space."), lambda w: w + w),
    "first_last": (("Swap the first and last letters of: {w}",), lambda w: w[-1] + w[1:-1] + w[0]),
}

PII_SNIPPETS = [
    "Contact me at {name}@example.com if needed.",
    "My server is at 203.0.113.{n}, thanks.",
    "Call me on +1 415-555-{n4} after lunch.",
    "Use the key sk-{hex} for the API.",
    "Token: ghp_{alnum} is mine.",
    "AWS key AKIA{upper} was rotated.",
]

LOW_QUALITY = [
    lambda r: ("#### $$$$ %%%% @@@@ &&&& **** ^^^^ !!!! ~~~~ ++++", "@@@@"),
    lambda r: ("buy now " * 40, "buy now " * 40),
    lambda r: ("lorem ipsum dolor sit amet " * 3, "lorem ipsum"),
    lambda r: ("Enable javascript to view this page. " * 2, "javascript required"),
    lambda r: ("".join(r.choice(LETTERS) for _ in range(600)), "x"),
    lambda r: ("\n".join(["click here"] * 12), "click here"),
]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def _pii(rng: random.Random) -> str:
    snippet = rng.choice(PII_SNIPPETS)
    return snippet.format(
        name=_word(rng), n=rng.randint(1, 254), n4=f"{rng.randint(0, 9999):04d}",
        hex="".join(rng.choice("0123456789abcdef") for _ in range(32)),
        alnum="".join(rng.choice(LETTERS + "0123456789") for _ in range(36)),
        upper="".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16)),
    )


def task_example(rng: random.Random, kind: str | None = None) -> tuple[str, str, str]:
    """(kind, instruction, answer) for one clean example."""
    kind = kind or rng.choice(sorted(TRANSFORMS))
    templates, fn = TRANSFORMS[kind]
    w = _word(rng)
    return kind, rng.choice(templates).format(w=w), fn(w)


def generate_tiny_tasks(num_rows: int, seed: int = 0) -> list[dict]:
    """Alpaca-style rows ({instruction, input, output}); ~80% clean, the rest planted problems."""
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < num_rows:
        roll = rng.random()
        if roll < 0.06 and rows:  # exact duplicate of an earlier row
            rows.append(dict(rng.choice(rows)))
            continue
        if roll < 0.10 and rows:  # near duplicate: same content, different spacing/punctuation
            src = dict(rng.choice(rows))
            src["instruction"] = src["instruction"].replace(": ", " :  ").rstrip(".") + " !"
            rows.append(src)
            continue
        if roll < 0.15:
            instruction, output = rng.choice(LOW_QUALITY)(rng)
            rows.append({"instruction": instruction, "input": "", "output": output})
            continue
        kind, instruction, answer = task_example(rng)
        row = {"instruction": instruction, "input": "", "output": answer}
        if roll < 0.22:
            row["input"] = _pii(rng)
        rows.append(row)
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
