"""Shared pieces of the PPO, GRPO and rollout tests: prompt data on the tiny arithmetic task."""

from __future__ import annotations

import json
import random
from pathlib import Path

from data_tools.synth import FACTS


def _row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_fact_prompts(data_dir: Path, num_facts: int, seed: int = 0) -> Path:
    """Chat rows over a small table of `num_facts` random arithmetic facts: train.jsonl asks every fact
    in every phrasing, validation.jsonl each fact once in a random phrasing.

    On a table this small the validation prompts are strings the stage also trains on (as on the full
    generated task, whose ~1000 distinct prompts a 2000-row train split mostly covers): held out as
    rows, not as facts. A few hundred rollouts then visit every fact several times, which is what an
    RL stage on a tiny model needs to move greedy answers within a CPU test's budget.
    """
    rng = random.Random(seed)
    facts: set[tuple[str, int, int]] = set()
    while len(facts) < num_facts:
        kind, a, b = rng.choice(sorted(FACTS)), rng.randint(0, 9), rng.randint(0, 9)
        if kind == "sub" and a < b:
            a, b = b, a
        facts.add((kind, a, b))
    train, validation = [], []
    for kind, a, b in sorted(facts):
        templates, fact = FACTS[kind]
        answer = fact(a, b)
        train += [_row(t.format(a=a, b=b), answer) for t in templates]
        validation.append(_row(rng.choice(templates).format(a=a, b=b), answer))
    rng.shuffle(train)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("validation", validation)):
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data_dir


def write_reward_model(model_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """An untrained scalar reward model on `model_dir`'s backbone, saved the way a reward_model stage saves."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def reward_by_prompt(prompt: list[dict], response: str, reference: str | None) -> float:
    """A rule reward that ignores the response: it differs between prompts, never within a group."""
    return float(sum(map(ord, prompt[-1]["content"])) % 7)


def reward_length(prompt: list[dict], response: str, reference: str | None) -> float:
    """A dense rule reward for a random model (which never answers right): longer responses score more."""
    return len(response) / 10
