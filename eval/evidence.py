"""Per-example values of a run's eval elements, for the gate's paired bootstrap: lm-eval's samples.jsonl and
the judge's judge.jsonl, keyed '<task>/<metric>' -> {example id: value}, and standard errors from them."""

from __future__ import annotations

import json
import math
from pathlib import Path

from eval import judge


def element_values(element_dir: Path, label: str) -> dict[str, dict[str, float]]:
    """{'<label>/<metric>': {example id: value}} from one element's outputs; empty when it kept none."""
    element_dir = Path(element_dir)
    if (element_dir / "judge.jsonl").is_file():
        records = judge.read_records(element_dir / "judge.jsonl")
        mode = "pairwise" if records and "order" in records[0] else "rubric"
        return {f"{label}/{m}": v for m, v in judge.per_example(records, mode).items()}
    out: dict[str, dict[str, float]] = {}
    if not (element_dir / "samples.jsonl").is_file():
        return out
    with open(element_dir / "samples.jsonl") as f:
        for line in f:
            row = json.loads(line)
            doc = row.get("doc") if isinstance(row.get("doc"), dict) else {}
            example_id = str(doc.get("id", row.get("doc_id")))
            suffix = "" if row.get("filter") in (None, "none") else f"_{row['filter']}"
            for metric in row.get("metrics") or []:
                value = row.get(metric)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out.setdefault(f"{label}/{metric}{suffix}", {})[example_id] = float(value)
    return out


def run_values(run_dir: Path, model: str = "candidate") -> dict[str, dict[str, float]]:
    """Every eval element of `model` in the run directory `run_dir` (stages/eval/*/result.json)."""
    out: dict[str, dict[str, float]] = {}
    for result in sorted(Path(run_dir).glob("stages/eval/*/result.json")):
        meta = json.loads(result.read_text())
        if meta.get("model") == model:
            out.update(element_values(result.parent, meta["task"]))
    return out


def stderrs(values: dict[str, dict[str, float]]) -> dict[str, float]:
    """{metric: standard error of its mean} over examples (metrics with at least two examples)."""
    out = {}
    for metric, by_id in values.items():
        xs = list(by_id.values())
        if len(xs) >= 2:
            mean = sum(xs) / len(xs)
            out[metric] = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
    return out
