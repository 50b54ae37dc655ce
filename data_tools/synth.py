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
# Facts about small numbers and letters, asked in several phrasings: a tiny model learns these tables in
# a few hundred steps, and a held-out phrasing tests that it learned the fact, not the string.
FACTS = {
    "add": (("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."), lambda a, b: str(a + b)),
    "sub": (("What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}."), lambda a, b: str(a - b)),
    "mul": (("What is {a} * {b}?", "Multiply {a} by {b}.", "Compute {a} times {b}."), lambda a, b: str(a * b)),
    "max": (("Which is larger, {a} or {b}?", "Name the bigger number: {a}, {b}."), lambda a, b: str(max(a, b))),
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
        name=_word(rng),
        n=rng.randint(1, 254),
        n4=f"{rng.randint(0, 9999):04d}",
        hex="".join(rng.choice("0123456789abcdef") for _ in range(32)),
        alnum="".join(rng.choice(LETTERS + "0123456789") for _ in range(36)),
        upper="".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16)),
    )


# The default mix: a tiny random-init model learns the facts in ~800 steps on 2 cores; the string
# transforms need far longer (copying must emerge first) and are there for harder experiments.
DEFAULT_KINDS = tuple(sorted(FACTS))
ALL_KINDS = tuple(sorted(FACTS) + sorted(TRANSFORMS))


def task_example(
    rng: random.Random, kind: str | None = None, kinds: tuple[str, ...] = DEFAULT_KINDS
) -> tuple[str, str, str]:
    """(kind, instruction, answer) for one clean example."""
    kind = kind or rng.choice(kinds)
    if kind in FACTS:
        templates, fact = FACTS[kind]
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if kind == "sub" and a < b:
            a, b = b, a
        return kind, rng.choice(templates).format(a=a, b=b), fact(a, b)
    templates, fn = TRANSFORMS[kind]
    w = _word(rng)
    return kind, rng.choice(templates).format(w=w), fn(w)


def generate_tiny_tasks(num_rows: int, seed: int = 0, kinds: tuple[str, ...] = DEFAULT_KINDS) -> list[dict]:
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
        kind, instruction, answer = task_example(rng, kinds=kinds)
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


# Wrong answers a partly trained model plausibly gives: off by one, the other operation, the smaller number.
WRONG_FACTS = {
    "add": lambda a, b: [a + b - 1, a + b + 1, a * b, abs(a - b)],
    "sub": lambda a, b: [a - b - 1, a - b + 1, a + b],
    "mul": lambda a, b: [a * b - 1, a * b + 1, a + b, a * (b + 1)],
    "max": lambda a, b: [min(a, b), max(a, b) + 1],
}
WRONG_TRANSFORMS = {
    "uppercase": lambda w: [w, w.capitalize()],
    "reverse": lambda w: [w, w[::-1].upper()],
    "double": lambda w: [w, w + " " + w],
    "first_last": lambda w: [w, w[::-1]],
}
# Rows a preference loader must reject: (label, row builder from a clean row).
BAD_PREFERENCES = [
    ("identical", lambda row: {**row, "rejected": row["chosen"]}),
    ("empty_chosen", lambda row: {**row, "chosen": ""}),
    ("empty_prompt", lambda row: {**row, "prompt": "  "}),
    ("missing_rejected", lambda row: {k: v for k, v in row.items() if k != "rejected"}),
    ("missing_chosen", lambda row: {k: v for k, v in row.items() if k != "chosen"}),
    ("null_rejected", lambda row: {**row, "rejected": None}),
]


def preference_example(rng: random.Random, kinds: tuple[str, ...] = DEFAULT_KINDS) -> tuple[str, str, str, str]:
    """(kind, prompt, correct answer, a wrong answer) for one clean pair."""
    kind = rng.choice(kinds)
    if kind in FACTS:
        templates, fact = FACTS[kind]
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if kind == "sub" and a < b:
            a, b = b, a
        right = fact(a, b)
        wrong = [str(x) for x in WRONG_FACTS[kind](a, b) if str(x) != right]
        return kind, rng.choice(templates).format(a=a, b=b), right, rng.choice(wrong)
    templates, fn = TRANSFORMS[kind]
    w = _word(rng)
    right = fn(w)
    wrong = [x for x in WRONG_TRANSFORMS[kind](w) if x != right] or [right + w[0]]
    return kind, rng.choice(templates).format(w=w), right, rng.choice(wrong)


def generate_tiny_preferences(
    num_rows: int, seed: int = 0, kinds: tuple[str, ...] = DEFAULT_KINDS, bad_fraction: float = 0.1
) -> list[dict]:
    """Preference rows {prompt, chosen, rejected}: chosen is the right answer, rejected a wrong one.

    About 15% of clean rows come as whole conversations ({chosen: messages, rejected: messages}, the
    prompt implicit), and bad_fraction are planted bad rows (identical sides, empty or missing fields).
    """
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < num_rows:
        _kind, prompt, right, wrong = preference_example(rng, kinds)
        row = {"prompt": prompt, "chosen": right, "rejected": wrong}
        roll = rng.random()
        if roll < bad_fraction:
            row = rng.choice(BAD_PREFERENCES)[1](row)
        elif roll < bad_fraction + 0.15:
            user = {"role": "user", "content": prompt}
            row = {
                side: [user, {"role": "assistant", "content": text}]
                for side, text in (("chosen", right), ("rejected", wrong))
            }
        rows.append(row)
    return rows


# Rows an unpaired (KTO) loader must reject: (label, row builder from a clean row).
BAD_UNPAIRED = [
    ("missing_label", lambda row: {k: v for k, v in row.items() if k != "label"}),
    ("bad_label", lambda row: {**row, "label": "yes" if row["label"] else 0}),
    ("empty_completion", lambda row: {**row, "completion": " "}),
    ("missing_completion", lambda row: {k: v for k, v in row.items() if k != "completion"}),
]


def unpair(row: dict) -> list[dict]:
    """A clean preference row as two unpaired rows {prompt, completion, label}: the chosen response
    desirable (label true), the rejected one undesirable. A row in conversation form keeps it: the
    completion is the whole conversation, the prompt its turns before the answer."""
    from data_tools.normalise import parse_preference

    prompt, chosen, rejected = parse_preference(row)
    out = []
    for response, label, side in ((chosen, True, "chosen"), (rejected, False, "rejected")):
        if "prompt" in row:
            out.append({"prompt": row["prompt"], "completion": row[side], "label": label})
        else:
            out.append({"prompt": prompt, "completion": prompt + response, "label": label})
    return out


def generate_tiny_unpaired(
    num_rows: int, seed: int = 0, kinds: tuple[str, ...] = DEFAULT_KINDS, bad_fraction: float = 0.1
) -> list[dict]:
    """Unpaired rows {prompt, completion, label}: the clean tiny preference pairs unpaired (right answers
    desirable, wrong ones not), bad_fraction of them made planted bad rows (missing or non-bool label,
    empty or missing completion)."""
    rng = random.Random(seed + 1)
    rows: list[dict] = []
    pairs = generate_tiny_preferences((num_rows + 1) // 2, seed, kinds, bad_fraction=0.0)
    for row in (r for pair in pairs for r in unpair(pair)):
        rows.append(rng.choice(BAD_UNPAIRED)[1](row) if rng.random() < bad_fraction else row)
    return rows[:num_rows]
