"""lm-eval tasks and runner: held-out tasks built from the data stage's test split, run offline in-process.

Task names in `eval.tasks` take one of three forms:

- ``heldout_exact`` / ``heldout_mc``: built-in tasks generated from ``<data_dir>/test.jsonl``.
- ``yaml:<dir>:<task>``: task (or group) ``<task>`` defined by the user's lm-eval YAML files in ``<dir>``
  (relative paths resolve against the working directory; the runner runs lm-eval from inside ``<dir>``,
  so relative ``data_files`` in those YAMLs resolve against it). Its metrics are keyed by ``<task>``.
- any other name: a standard lm-eval task (mmlu, hellaswag, arc_easy, ...). These read hub datasets;
  they are accepted only when the dataset is already in the local Hugging Face cache, because
  evaluation always runs with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from eval.config import BUILTIN_TASKS, EvalConfig

YAML_PREFIX = "yaml:"
CHATML_STOP = "<|im_end|>"
# The project's chat format; used when a tokenizer has no chat template of its own.
_CHATML_FALLBACK = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# datasets builders that read local files: no hub access needed.
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}
_NOT_METRICS = {"sample_len", "alias", "name", "sample_count"}
_QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TQDM_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# ---------------------------------------------------------------- task names and up-front checks


def task_label(task: str) -> str:
    """The name a task's metrics are keyed by ('<label>/<metric>'): the task name inside a yaml: spec."""
    return _split_yaml_spec(task)[1] if task.startswith(YAML_PREFIX) else task


def check_tasks(tasks: list[str]) -> list[str]:
    """Problems with `eval.tasks`, as 'eval.tasks.<i>: message' lines; empty when all can run offline."""
    problems = []
    for i, task in enumerate(tasks):
        if task in BUILTIN_TASKS:
            continue
        problem = _check_yaml_task(task) if task.startswith(YAML_PREFIX) else _check_standard_task(task)
        if problem:
            problems.append(f"eval.tasks.{i}: {problem}")
    return problems


def _split_yaml_spec(task: str) -> tuple[Path, str]:
    body = task[len(YAML_PREFIX) :]
    directory, sep, name = body.rpartition(":")
    if not sep or not directory or not name:
        raise ValueError(f"{task!r}: expected 'yaml:<dir>:<task>'")
    return Path(directory).expanduser(), name


def _check_yaml_task(task: str) -> str | None:
    try:
        directory, name = _split_yaml_spec(task)
    except ValueError as err:
        return str(err)
    if not directory.is_dir():
        return f"{task!r}: task directory {str(directory)!r} does not exist"
    found = _definitions(directory).get(name)
    if not found:
        return f"{task!r}: no YAML file in {str(directory)!r} defines a task or group named {name!r}"
    return _check_datasets(task, found)


def _check_standard_task(task: str) -> str | None:
    found = _bundled_definitions().get(task)
    if not found:
        return (
            f"{task!r} is neither a built-in task ({', '.join(BUILTIN_TASKS)}), a 'yaml:<dir>:<task>' "
            "spec, nor a task lm-eval knows"
        )
    return _check_datasets(task, found)


def _lm_eval_tasks_dir() -> Path:
    import importlib.util

    # find_spec locates the package without importing it (importing lm_eval takes seconds).
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("lm-eval is not installed: pip install 'lm-eval[hf]'")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


_DEFINITION = re.compile(rb"^(?:task|group|tag):[ \t]*['\"]?([\w.\-]+)['\"]?[ \t]*$", re.M)


def _definitions(root: Path) -> dict[str, list[Path]]:
    """{name: YAML files defining it} from scalar `task:`/`group:`/`tag:` lines: a text scan of the ~14k
    bundled files in ~0.5 s, where lm-eval's own index takes 10-15 s."""
    index: dict[str, list[Path]] = {}
    for directory, _, files in os.walk(root):
        for file in files:
            if not file.endswith(".yaml"):
                continue
            path = Path(directory, file)
            for name in _DEFINITION.findall(path.read_bytes()):
                index.setdefault(name.decode(), []).append(path)
    return index


@functools.lru_cache(maxsize=1)
def _bundled_definitions() -> dict[str, list[Path]]:
    return _definitions(_lm_eval_tasks_dir())


def _check_datasets(task: str, definitions: list[Path]) -> str | None:
    datasets = _dataset_paths(definitions)
    if not datasets:
        return (
            f"{task!r}: could not tell which dataset it reads; evaluation runs offline, so use a local "
            "YAML task ('yaml:<dir>:<task>' with dataset_path: json and absolute data_files)"
        )
    missing = sorted(d for d in datasets if not _is_local_dataset(d) and not _in_hf_cache(d))
    if not missing:
        return None
    return (
        f"{task!r} reads hub dataset {', '.join(missing)}, not in the local Hugging Face cache "
        f"({_datasets_cache()} or {_hub_cache()}) and evaluation runs offline. On a machine with "
        f"network, "
        f"load it once (`lm_eval --tasks {task} ...` or datasets.load_dataset) with the same HF_HOME and "
        f"copy the cache here, or use a local task: 'yaml:<dir>:<task>' with dataset_path: json"
    )


def _dataset_paths(definitions: list[Path]) -> set[str]:
    """dataset_path values in the defining files' directories (lm-eval tasks share templates there)."""
    pattern = re.compile(r"^dataset_path:\s*['\"]?([^'\"\s#]+)", re.M)
    found: set[str] = set()
    for directory in {p.parent for p in definitions}:
        for path in directory.iterdir():
            if path.is_file() and ("yaml" in path.name):
                found.update(pattern.findall(path.read_text(errors="replace")))
    return found


def _is_local_dataset(dataset_path: str) -> bool:
    return dataset_path in _LOCAL_BUILDERS or Path(dataset_path).expanduser().exists()


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()


def _datasets_cache() -> Path:
    return Path(os.environ.get("HF_DATASETS_CACHE", _hf_home() / "datasets")).expanduser()


def _hub_cache() -> Path:
    return Path(os.environ.get("HF_HUB_CACHE", _hf_home() / "hub")).expanduser()


def _in_hf_cache(dataset_path: str) -> bool:
    # datasets stores prepared data as 'owner___name', the hub cache raw files as 'datasets--owner--name'.
    prepared = _datasets_cache() / dataset_path.replace("/", "___")
    raw = _hub_cache() / ("datasets--" + dataset_path.replace("/", "--"))
    return prepared.is_dir() or raw.is_dir()


# ---------------------------------------------------------------- built-in held-out tasks


def build_tasks(
    data_dir: Path, task_dir: Path, cfg: EvalConfig, *, tokenizer=None, names: tuple[str, ...] = BUILTIN_TASKS
) -> None:
    """Write built-in tasks `names` (YAML + JSONL, absolute paths) from `data_dir/test.jsonl` into `task_dir`.

    Prompts are rendered here with `tokenizer`'s chat template (ChatML when None or template-less) and
    add_generation_prompt=True, so lm-eval sees a finished `prompt` string and applies no template itself.
    """
    rows = _read_rows(Path(data_dir) / "test.jsonl", cfg.limit)
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


def _read_rows(path: Path, limit: int | None) -> list[dict]:
    if not path.is_file():
        raise ValueError(f"{path}: the data stage's held-out split is missing")
    rows = []
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
                break
    if not rows:
        raise ValueError(f"{path}: no test rows")
    return rows


def _renderer(tokenizer) -> Callable[[list[dict], bool], str]:
    """render(messages, add_generation_prompt) with the tokenizer's chat template, else ChatML."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return lambda messages, add: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
    from jinja2 import Template

    template = Template(_CHATML_FALLBACK)
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
                "metric": "exact_match",
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
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }


# ---------------------------------------------------------------- running one task


def run_task(
    task: str,
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
    problems = check_tasks([task])
    if problems:
        raise ValueError(problems[0])
    model_dir, data_dir = Path(model_dir).resolve(), Path(data_dir).resolve()
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    emit = progress or (lambda event: None)
    with _offline_and_quiet():
        emit({"event": "eval_load", "task": task, "model_dir": str(model_dir)})
        lm, tokenizer = _load_lm(model_dir, cfg)
        include_dir, name, run_dir = _resolve_task(task, data_dir, work_dir, cfg, tokenizer)
        emit({"event": "eval_run", "task": task})
        # Built-in tasks are already cut to cfg.limit when built.
        limit = None if task in BUILTIN_TASKS else cfg.limit
        with _chdir(run_dir):
            results = _evaluate(lm, name, include_dir, limit, cfg)
    scores = flat_scores(results, name)
    _write_outputs(results, name, work_dir)
    emit({"event": "eval_done", "task": task, "scores": scores})
    return scores


def _resolve_task(
    task: str, data_dir: Path, work_dir: Path, cfg: EvalConfig, tokenizer
) -> tuple[Path | None, str, Path]:
    """(include_path for TaskManager or None for lm-eval's own tasks, task name, directory to run in)."""
    if task in BUILTIN_TASKS:
        task_dir = work_dir / "tasks"
        build_tasks(data_dir, task_dir, cfg, tokenizer=tokenizer, names=(task,))
        return task_dir, task, work_dir
    if task.startswith(YAML_PREFIX):
        directory, name = _split_yaml_spec(task)
        return directory.resolve(), name, directory.resolve()
    return None, task, work_dir


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


def _evaluate(lm, name: str, include_dir: Path | None, limit: int | None, cfg: EvalConfig) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Without include_defaults=False lm-eval indexes its ~14k bundled YAMLs first (10-15 s).
    manager = TaskManager(include_path=str(include_dir), include_defaults=False) if include_dir else TaskManager()
    # Built-in tasks carry max_gen_toks in their YAML; others get it as an override.
    gen_kwargs = None if name in BUILTIN_TASKS else {"max_gen_toks": cfg.max_new_tokens}
    return simple_evaluate(
        model=lm,
        tasks=[name],
        task_manager=manager,
        limit=limit,
        log_samples=True,
        gen_kwargs=gen_kwargs,
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


def _write_outputs(results: dict, name: str, work_dir: Path) -> None:
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


@contextlib.contextmanager
def _offline_and_quiet() -> Iterator[None]:
    """Hub access off and progress bars quiet for the duration, restored afterwards."""
    saved_env = {k: os.environ.get(k) for k in _QUIET_ENV}
    os.environ.update(_QUIET_ENV)
    # huggingface_hub and datasets read the offline switches at import; patch them if already imported.
    patched = _set_module_flags(True)
    try:
        with _tqdm_disabled():
            yield
    finally:
        _restore_module_flags(patched)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_OFFLINE_FLAGS = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
)


def _set_module_flags(value: bool) -> list[tuple[object, str, object]]:
    import importlib
    import sys

    patched = []
    for module_name, attr in _OFFLINE_FLAGS:
        if module_name.split(".")[0] not in sys.modules:
            continue  # not imported yet: it will read the environment variables set above
        module = importlib.import_module(module_name)
        if hasattr(module, attr):
            patched.append((module, attr, getattr(module, attr)))
            setattr(module, attr, value)
    return patched


def _restore_module_flags(patched: list[tuple[object, str, object]]) -> None:
    for module, attr, old in patched:
        setattr(module, attr, old)


@contextlib.contextmanager
def _tqdm_disabled() -> Iterator[None]:
    # TQDM_DISABLE is read when tqdm is imported, usually long before; lm-eval's bars ignore it anyway.
    from tqdm import std

    original = std.tqdm.__init__

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = quiet_init
    try:
        yield
    finally:
        std.tqdm.__init__ = original


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)
