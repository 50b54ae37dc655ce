"""Run one eval element: a task on one model, offline and in-process through lm-eval; flat scores + outputs."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from pathlib import Path

from eval.config import EvalConfig
from eval.offline import offline_and_quiet
from eval.tasks import LmEvalRun, TaskSpec

_NOT_METRICS = {"sample_len", "alias", "name", "sample_count"}


def run_task(
    task: TaskSpec,
    model_dir: Path,
    data_dir: Path,
    work_dir: Path,
    cfg: EvalConfig,
    *,
    progress: Callable[[dict], None] | None = None,
) -> dict[str, float]:
    """Evaluate the HF model in `model_dir` on one task; returns {metric: value}.

    Writes `work_dir/results.json` (lm-eval's results) and `work_dir/samples.jsonl` (per-example
    predictions). Nothing touches the network: hub access is switched off for the duration.
    """
    problem = task.check()
    if problem:
        raise ValueError(f"eval.tasks.0: {problem}")
    model_dir, data_dir = Path(model_dir).resolve(), Path(data_dir).resolve()
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    emit = progress or (lambda event: None)
    with offline_and_quiet():
        emit({"event": "eval_load", "task": str(task), "model_dir": str(model_dir)})
        lm, tokenizer = _load_lm(model_dir, cfg)
        run = task.prepare(data_dir, work_dir, cfg, tokenizer)
        emit({"event": "eval_run", "task": str(task)})
        with contextlib.chdir(run.run_dir):
            results = _evaluate(lm, run, cfg)
    scores = flat_scores(results, run.name)
    _write_outputs(results, work_dir)
    emit({"event": "eval_done", "task": str(task), "scores": scores})
    return scores


def _load_lm(model_dir: Path, cfg: EvalConfig):
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    max_length = getattr(model.config, "max_position_embeddings", None) or 2048
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=max_length)
    return lm, tokenizer


def _evaluate(lm, run: LmEvalRun, cfg: EvalConfig) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Without include_defaults=False lm-eval indexes its ~14k bundled YAMLs first (10-15 s).
    if run.include_dir:
        manager = TaskManager(include_path=str(run.include_dir), include_defaults=False)
    else:
        manager = TaskManager()
    return simple_evaluate(
        model=lm,
        tasks=[run.name],
        task_manager=manager,
        limit=run.limit,
        log_samples=True,
        gen_kwargs=run.gen_kwargs,
        bootstrap_iters=0,
        verbosity="WARNING",
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )


def flat_scores(results: dict, name: str) -> dict[str, float]:
    """{metric: value} for task or group `name` from lm-eval results; 'acc,none' -> 'acc', stderr dropped."""
    entry = (results.get("groups") or {}).get(name) or results["results"].get(name)
    if entry is None:
        raise ValueError(f"lm-eval returned no results for {name!r}")
    scores = {}
    for key, value in entry.items():
        metric, _, filter_name = key.partition(",")
        if (
            metric in _NOT_METRICS
            or "_stderr" in metric
            or not isinstance(value, (int, float))
            or isinstance(value, bool)
        ):
            continue
        if math.isnan(value):
            continue
        scores[metric if filter_name in ("", "none") else f"{metric}_{filter_name}"] = float(value)
    return scores


def _write_outputs(results: dict, work_dir: Path) -> None:
    samples = results.get("samples") or {}
    summary = {k: v for k, v in results.items() if k != "samples"}
    (work_dir / "results.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    with open(work_dir / "samples.jsonl", "w") as f:
        for task_name, rows in samples.items():
            for row in rows:
                f.write(json.dumps({"task": task_name, **row}, default=_json_default) + "\n")


def _json_default(value):
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
