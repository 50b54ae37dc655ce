"""Held-out tasks: lm-eval YAML + JSONL files generated from the data stage's test split.

- ``heldout_exact``: greedy generation of the assistant answer, scored by exact match.
- ``heldout_mc``: the answer among `num_choices` options (other rows' answers), scored by log-likelihood.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from eval.config import EvalConfig

BUILTIN_TASKS = ("heldout_exact", "heldout_mc")
# The metrics each built-in task reports (its YAML's metric_list; no filters, so lm-eval's ',none' keys).
BUILTIN_METRICS = {"heldout_exact": ("exact_match",), "heldout_mc": ("acc", "acc_norm")}
CHATML_STOP = "<|im_end|>"


def build_tasks(
    data_dir: Path, task_dir: Path, cfg: EvalConfig, *, tokenizer=None, names: tuple[str, ...] = BUILTIN_TASKS
) -> None:
    """Write built-in tasks `names` (YAML + JSONL, absolute paths) from the test split of `data_dir` into `task_dir`.

    Prompts are rendered here with `tokenizer`'s chat template (ChatML when None or template-less) and
    add_generation_prompt=True, so lm-eval sees a finished `prompt` string and applies no template itself.
    """
    rows = _read_rows(Path(data_dir), cfg.limit)
    task_dir = Path(task_dir).resolve()
    task_dir.mkdir(parents=True, exist_ok=True)
    render = _renderer(tokenizer)
    examples = [
        {"id": r["id"], "prompt": render(r["messages"][:-1], True), "answer": r["messages"][-1]["content"]}
        for r in rows
    ]
    end = _end_of_turn(render, tokenizer)
    cache = str(task_dir / ".hf_cache")
    if "heldout_exact" in names:
        _write_task(task_dir, "heldout_exact", examples, _exact_yaml(task_dir, cache, cfg, end))
    if "heldout_mc" in names:
        _write_task(task_dir, "heldout_mc", _with_choices(examples, cfg, end), _mc_yaml(task_dir, cache))


def _write_task(task_dir: Path, name: str, examples: list[dict], spec: dict) -> None:
    with open(task_dir / f"{name}.jsonl", "w") as f:
        for example in examples:
            f.write(json.dumps(example) + "\n")
    (task_dir / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def _read_rows(data_dir: Path, limit: int | None) -> list[dict]:
    """The first `limit` rows of the test split (`test.jsonl` or the data stage's `test/*.jsonl` shards)."""
    from data_tools.splits import has_split, split_files

    if not has_split(data_dir, "test"):
        raise ValueError(f"{data_dir}: the data stage's held-out split is missing (test.jsonl or test/*.jsonl)")
    rows = []
    for path in split_files(data_dir, "test"):
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                messages = row.get("messages") or []
                if len(messages) < 2 or messages[-1].get("role") != "assistant":
                    raise ValueError(f"{path}:{line_no}: expected messages ending with an assistant answer")
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    return rows
    if not rows:
        raise ValueError(f"{data_dir}: no test rows")
    return rows


def _renderer(tokenizer) -> Callable[[list[dict], bool], str]:
    """render(messages, add_generation_prompt) with the tokenizer's chat template, else the project's ChatML."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return lambda messages, add: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
    from jinja2 import Template

    from parallel.tiny import CHATML_TEMPLATE

    template = Template(CHATML_TEMPLATE)
    return lambda messages, add: template.render(messages=messages, add_generation_prompt=add)


def _end_of_turn(render: Callable[[list[dict], bool], str], tokenizer) -> str:
    """What the template writes after an answer: '<|im_end|>' in ChatML, '<|eot_id|>' in Llama 3."""
    user = [{"role": "user", "content": "q"}]
    prompt, full = render(user, True), render(user + [{"role": "assistant", "content": "ANSWER"}], False)
    if full.startswith(prompt + "ANSWER") and full[len(prompt) + 6 :].strip():
        return full[len(prompt) + 6 :].strip()
    return getattr(tokenizer, "eos_token", None) or CHATML_STOP


def _with_choices(examples: list[dict], cfg: EvalConfig, end: str) -> list[dict]:
    """Each example with cfg.num_choices options: its answer and other rows' answers, order fixed by seed."""
    pool = sorted({e["answer"] for e in examples})
    if len(pool) < cfg.num_choices:
        raise ValueError(
            f"heldout_mc needs at least eval.num_choices={cfg.num_choices} distinct answers "
            f"in the test split, found {len(pool)}; lower eval.num_choices"
        )
    out = []
    for example in examples:
        rng = random.Random(f"{cfg.seed}:{example['id']}")
        others = [a for a in pool if a != example["answer"]]
        choices = rng.sample(others, cfg.num_choices - 1) + [example["answer"]]
        rng.shuffle(choices)
        # The end-of-turn token is part of each option, so an answer's prefix does not score as the answer.
        out.append({**example, "choices": [c + end for c in choices], "label": choices.index(example["answer"])})
    return out


def _dataset_fields(task_dir: Path, name: str, cache: str) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(task_dir / f"{name}.jsonl")}, "cache_dir": cache},
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "target_delimiter": "",
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }


def _exact_yaml(task_dir: Path, cache: str, cfg: EvalConfig, end: str) -> dict:
    return {
        **_dataset_fields(task_dir, "heldout_exact", cache),
        "output_type": "generate_until",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": [end], "do_sample": False, "max_gen_toks": cfg.max_new_tokens},
        "metric_list": [
            {
                "metric": BUILTIN_METRICS["heldout_exact"][0],
                "aggregation": "mean",
                "higher_is_better": True,
                "regexes_to_ignore": [r"^\s+", r"\s+$"],
            }
        ],
    }


def _mc_yaml(task_dir: Path, cache: str) -> dict:
    return {
        **_dataset_fields(task_dir, "heldout_mc", cache),
        "output_type": "multiple_choice",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [
            {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in BUILTIN_METRICS["heldout_mc"]
        ],
    }
