"""Registered versions for review/promotion tests without training: a run directory laid out like a real
run's (recipe snapshot, data manifest, eval elements with lm-eval's results.json and samples.jsonl), a
tiny model directory, scores and a gate verdict."""

from __future__ import annotations

import json
from pathlib import Path

from eval import lineage, registry
from eval.gate import Verdict

EXACT = "heldout_exact/exact_match"
MC = "heldout_mc/acc"
URI_PASSWORD = "S3cret-uri-pw"  # the recipe snapshot keeps it; a review must never show it
QUESTIONS = [("Add 2 and 3.", "5"), ("Which is larger, 4 or 9?", "9"), ("Compute 3 times 6.", "18"), ("7 - 2?", "5")]


def write_run_dir(root: Path, *, lr: float, answers: list[str], mc_right: list[bool], rejected_dups: int) -> Path:
    """A run directory whose candidate answered `answers` (exact task) and got `mc_right` (mc task)."""
    root.mkdir(parents=True)
    (root / "recipe.yaml").write_text(
        f"name: tiny-sft\nstages:\n  - kind: sft\n    optim: {{lr: {lr}}}\nparallel: {{dp_shard: 1, tp: 1}}\n"
        f"tracking: {{uri: 'http://alice:{URI_PASSWORD}@127.0.0.1:5000'}}\n"
    )
    manifest = {
        "splits": {"train": 100 - rejected_dups, "test": 4},
        "steps": {
            "exact_dedup": {
                "in": 100,
                "kept": 100 - rejected_dups,
                "rejected": rejected_dups,
                "reasons": {"exact_duplicate": rejected_dups},
            }
        },
        "manifest_hash": f"{rejected_dups:064d}",
    }
    (root / "stages" / "data").mkdir(parents=True)
    (root / "stages" / "data" / "manifest.json").write_text(json.dumps(manifest))
    exact_rows = [
        {
            "task": "heldout_exact",
            "doc_id": i,
            "doc": {"prompt": q, "answer": a},
            "target": a,
            "arguments": [[f"<user>{q}<assistant>", {"until": ["<end>"]}]],
            "filtered_resps": [answers[i]],
            "doc_hash": f"h{i}",
            "exact_match": float(answers[i] == a),
        }
        for i, (q, a) in enumerate(QUESTIONS)
    ]
    mc_rows = [
        {
            "task": "heldout_mc",
            "doc_id": i,
            "doc": {"prompt": q, "choices": [a, "0"], "label": 0},
            "target": 0,
            "arguments": [[q, a], [q, "0"]],
            "filtered_resps": [[-1.0, True], [-2.0, False]][:: 1 if right else -1],
            "doc_hash": f"m{i}",
            "acc": float(right),
        }
        for i, ((q, a), right) in enumerate(zip(QUESTIONS, mc_right))
    ]
    for task, rows, results in (
        (
            "heldout_exact",
            exact_rows,
            {"exact_match,none": _mean(rows_metric(exact_rows, "exact_match")), "exact_match_stderr,none": "N/A"},
        ),
        ("heldout_mc", mc_rows, {"acc,none": _mean(rows_metric(mc_rows, "acc")), "acc_stderr,none": 0.125}),
    ):
        element = root / "stages" / "eval" / f"{task}@candidate"
        element.mkdir(parents=True)
        (element / "result.json").write_text(json.dumps({"task": task, "model": "candidate", "scores": {}}))
        (element / "results.json").write_text(json.dumps({"results": {task: {"name": task, **results}}}))
        (element / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def rows_metric(rows: list[dict], metric: str) -> list[float]:
    return [r[metric] for r in rows]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def register(client, experiment_id: str, name: str, run_dir: Path, model_dir: Path, passed: bool) -> str:
    """Register a version whose scores come from `run_dir`'s samples, with `run_dir` as its lineage."""
    run_id = client.create_run(experiment_id).info.run_id
    scores = {}
    for task, metric in (("heldout_exact", "exact_match"), ("heldout_mc", "acc")):
        rows = [
            json.loads(x)
            for x in (run_dir / f"stages/eval/{task}@candidate/samples.jsonl").read_text().split("\n")
            if x
        ]
        scores[f"{task}/{metric}"] = _mean(rows_metric(rows, metric))
    verdict = Verdict(
        passed=passed, reasons=[f"{'PASS' if passed else 'FAIL'} threshold: {EXACT} = {scores[EXACT]:.4f} >= 0.5000"]
    )
    tags = {
        lineage.RECIPE_HASH: "r" + run_dir.name,
        lineage.GIT_COMMIT: "c0ffee",
        lineage.RUN_DIR: str(run_dir),
        lineage.BASE_MODEL: "tiny-llama",
    }
    return registry.register_candidate(client, name, model_dir, run_id, scores, verdict, tags)


def tiny_model_dir(path: Path) -> Path:
    """A real (tiny) Hugging Face model directory from parallel/tiny.py."""
    from parallel.tiny import build_tiny_model

    return build_tiny_model("tiny-llama", path)
