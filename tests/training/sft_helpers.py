"""The tiny string-transform task as chat rows, and greedy exact match on held-out prompts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from data_tools.synth import task_example


def task_rows(tokenizer, num_rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(num_rows):
        _kind, instruction, answer = task_example(rng)
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        rows.append({"id": f"{seed}-{i}", "messages": messages, "text": text})
    return rows


def write_task_data(data_dir: Path, tokenizer, num_train: int, num_val: int, seed: int = 0) -> Path:
    """train.jsonl and validation.jsonl from different seeds, so validation words are mostly unseen."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (
        ("train", task_rows(tokenizer, num_train, seed)),
        ("validation", task_rows(tokenizer, num_val, seed + 10_000)),
    ):
        with open(data_dir / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return data_dir


@torch.no_grad()
def exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int = 24, batch_size: int = 64) -> float:
    """Fraction of rows whose greedy answer (prompt = user turn + generation prompt, stop at the
    turn end) equals the reference assistant turn exactly."""
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the right edge
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    hits = 0
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        prompts = [
            tokenizer.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True) for r in chunk
        ]
        enc = tokenizer(prompts, add_special_tokens=False, return_tensors="pt", padding=True)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, ids in zip(chunk, out[:, enc["input_ids"].shape[1] :]):
            answer = tokenizer.decode(ids, skip_special_tokens=False).split("<|im_end|>")[0]
            hits += answer == row["messages"][1]["content"]
    return hits / len(rows)
