"""Eval tasks: the typed union behind `eval.tasks`, its string shorthand, and each kind's offline check.

A task is one of four kinds, each with a `label` (its metrics are keyed '<label>/<metric>'):

- HeldoutTask ``{heldout: exact|mc}``, shorthand ``heldout_exact`` / ``heldout_mc``: built from the data
  stage's ``test.jsonl`` (eval/heldout.py). Label: the shorthand.
- YamlTask ``{yaml_dir: <dir>, task: <name>}``, shorthand ``yaml:<dir>:<name>``: task (or group) ``<name>``
  defined by the user's lm-eval YAML files in ``<dir>``. A relative ``<dir>`` resolves against the recipe's
  directory (validation context ``base_dir``), else the working directory; lm-eval runs from inside it, so
  relative ``data_files`` in those YAMLs resolve against it. Label: ``<name>``.
- JudgeTask ``{judge: {...}}`` (no shorthand): an LLM judge scores the candidate's answers (eval/judge.py).
  Label: ``judge.name`` (default ``judge``).
- LmEvalTask ``{lm_eval: <name>}``, shorthand: any other name: a standard lm-eval task (mmlu, hellaswag, ...).
  These read hub datasets; they are accepted only when the dataset is already in the local Hugging Face
  cache, because evaluation always runs offline, or with ``data_dir: <dir>``, a local copy (air-gapped
  clusters): ``<split>.parquet|.jsonl`` or ``<split>/*.parquet|.jsonl`` replacing the task's dataset_path and
  data_files (a single task, not a group). Label: ``<name>``.

Strings are parsed into these objects in one place (`parse_shorthand`, the before-validator of `EvalTask`),
and every task dumps back to its shorthand, so recipe snapshots, hashes and eval element keys keep their form.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from eval import offline
from eval.heldout import BUILTIN_METRICS, BUILTIN_TASKS, build_tasks
from eval.judge import JudgeSpec

if TYPE_CHECKING:
    from eval.config import EvalConfig

YAML_PREFIX = "yaml:"
# Task names end up in eval element keys, which name directories under <workdir>/stages/eval/: one plain
# path component. The same pattern as training.config.NAME_PATTERN (stage and recipe names; eval does not
# import training, a test keeps the two equal); every task lm-eval bundles matches it.
TASK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def _check_task_name(value: str) -> str:
    if not re.fullmatch(TASK_NAME_PATTERN, value):
        raise ValueError(
            f"{value!r} is not a valid task name: use letters, digits, '_', '.' and '-', starting with a "
            "letter or digit (it names a directory of the run)"
        )
    return value


@dataclass(frozen=True)
class LmEvalRun:
    """How the runner hands one task to lm-eval."""

    name: str  # the task or group name lm-eval knows
    include_dir: Path | None  # TaskManager include_path; None: lm-eval's bundled tasks
    run_dir: Path  # working directory during the evaluation
    limit: int | None  # examples to evaluate; None: all
    gen_kwargs: dict | None  # overrides of the task's generation settings


class _Task(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClassVar[str]  # the union's tag
    key: ClassVar[str]  # the field whose presence in a mapping selects this kind

    @property
    def label(self) -> str:
        """The name this task's metrics are keyed by ('<label>/<metric>')."""
        raise NotImplementedError

    @property
    def shorthand(self) -> str:
        """The string form of this task in a recipe (and in eval element keys)."""
        raise NotImplementedError

    @property
    def metrics(self) -> tuple[str, ...] | None:
        """The metric names this task reports ('<label>/<metric>'); None when they are not known offline
        (lm-eval task definitions can compute any metric, filters rename them)."""
        return None

    @property
    def on_base(self) -> bool:
        """Whether the eval array also runs this task on the base model."""
        return True

    def check(self) -> str | None:
        """Why this task cannot run offline on this machine; None when it can."""
        return None

    def prepare(self, data_dir: Path, work_dir: Path, cfg: EvalConfig, tokenizer) -> LmEvalRun:
        """Whatever the task needs on disk before lm-eval runs it (in `work_dir`), and how to call lm-eval."""
        raise NotImplementedError

    @model_serializer
    def _dump(self) -> str:
        return self.shorthand

    def __str__(self) -> str:
        return self.shorthand


class HeldoutTask(_Task):
    kind: ClassVar[str] = "heldout"
    key: ClassVar[str] = "heldout"
    heldout: Literal["exact", "mc"]

    @property
    def label(self) -> str:
        return f"heldout_{self.heldout}"

    @property
    def shorthand(self) -> str:
        return self.label

    @property
    def metrics(self) -> tuple[str, ...]:
        return BUILTIN_METRICS[self.label]

    def prepare(self, data_dir: Path, work_dir: Path, cfg: EvalConfig, tokenizer) -> LmEvalRun:
        task_dir = work_dir / "tasks"
        build_tasks(data_dir, task_dir, cfg, tokenizer=tokenizer, names=(self.label,))
        # Already cut to cfg.limit when built; max_gen_toks is in the generated YAML.
        return LmEvalRun(self.label, task_dir, work_dir, None, None)


def _resolve(v: str | None, info: ValidationInfo) -> str | None:
    """A relative path against the recipe's directory when validated with context {'base_dir': ...}."""
    base_dir = (info.context or {}).get("base_dir")
    if v is None or base_dir is None:
        return v
    path = Path(v).expanduser()
    return os.path.normpath(path if path.is_absolute() else Path(base_dir) / path)


class YamlTask(_Task):
    kind: ClassVar[str] = "yaml"
    key: ClassVar[str] = "yaml_dir"
    yaml_dir: str = Field(min_length=1)
    task: str = Field(min_length=1)

    @field_validator("yaml_dir")
    @classmethod
    def _against_recipe_dir(cls, v: str, info: ValidationInfo) -> str:
        """Relative to the recipe's directory when validated with context {'base_dir': ...}: jobs run elsewhere."""
        base_dir = (info.context or {}).get("base_dir")
        if base_dir is None:
            return v
        path = Path(v).expanduser()
        # normalised: no '..' left in the element key, whose directory nests under stages/eval/
        return os.path.normpath(path if path.is_absolute() else Path(base_dir) / path)

    @field_validator("task")
    @classmethod
    def _no_colon(cls, v: str) -> str:
        if ":" in v:
            raise ValueError(f"{v!r}: a task name has no ':'")
        return _check_task_name(v)

    @property
    def label(self) -> str:
        return self.task

    @property
    def shorthand(self) -> str:
        return f"{YAML_PREFIX}{self.yaml_dir}:{self.task}"

    @property
    def directory(self) -> Path:
        return Path(self.yaml_dir).expanduser()

    def check(self) -> str | None:
        directory = self.directory
        if not directory.is_dir():
            return f"{self.shorthand!r}: task directory {str(directory)!r} does not exist"
        found = offline.definitions(directory).get(self.task)
        if not found:
            return f"{self.shorthand!r}: no YAML file in {str(directory)!r} defines a task or group named {self.task!r}"
        return offline.datasets_problem(self.shorthand, found)

    def prepare(self, data_dir: Path, work_dir: Path, cfg: EvalConfig, tokenizer) -> LmEvalRun:
        directory = self.directory.resolve()
        return LmEvalRun(self.task, directory, directory, cfg.limit, {"max_gen_toks": cfg.max_new_tokens})


class LmEvalTask(_Task):
    kind: ClassVar[str] = "lm_eval"
    key: ClassVar[str] = "lm_eval"
    lm_eval: str = Field(min_length=1)
    data_dir: str | None = Field(
        None, description="a local copy of the task's dataset: <split>.parquet|.jsonl or <split>/*.parquet|.jsonl"
    )

    @field_validator("data_dir")
    @classmethod
    def _against_recipe_dir(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _resolve(v, info)

    @field_validator("lm_eval")
    @classmethod
    def _not_another_kind(cls, v: str) -> str:
        if v in BUILTIN_TASKS or v.startswith(YAML_PREFIX):
            raise ValueError(f"{v!r} is not an lm-eval task name; write it as the string {v!r}")
        return _check_task_name(v)

    @property
    def label(self) -> str:
        return self.lm_eval

    @property
    def shorthand(self) -> str:
        return self.lm_eval

    def check(self) -> str | None:
        found = offline.bundled_definitions().get(self.lm_eval)
        if not found:
            return (
                f"{self.lm_eval!r} is neither a built-in task ({', '.join(BUILTIN_TASKS)}), a 'yaml:<dir>:<task>' "
                "spec, nor a task lm-eval knows"
            )
        if self.data_dir is not None:
            return offline.local_copy_problem(self.lm_eval, found, Path(self.data_dir))
        return offline.datasets_problem(self.lm_eval, found)

    def prepare(self, data_dir: Path, work_dir: Path, cfg: EvalConfig, tokenizer) -> LmEvalRun:
        gen_kwargs = {"max_gen_toks": cfg.max_new_tokens}
        if self.data_dir is None:
            return LmEvalRun(self.lm_eval, None, work_dir, cfg.limit, gen_kwargs)
        # The bundled definition, included, with its dataset swapped for the local copy's files.
        [definition] = offline.bundled_definitions()[self.lm_eval]
        builder, files = offline.local_copy(Path(self.data_dir))
        task_dir = Path(work_dir) / "local_task"
        task_dir.mkdir(parents=True, exist_ok=True)
        spec = {
            "include": str(definition),
            "task": self.lm_eval,
            "dataset_path": builder,
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files, "cache_dir": str(task_dir / ".hf_cache")},
            # splits the copy lacks (often train, for few-shot examples) are switched off
            **{key: None for key, split in offline.split_keys(definition).items() if split not in files},
        }
        (task_dir / f"{self.lm_eval}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        return LmEvalRun(self.lm_eval, task_dir, work_dir, cfg.limit, gen_kwargs)

    @model_serializer
    def _dump(self) -> str | dict:
        return self.lm_eval if self.data_dir is None else {"lm_eval": self.lm_eval, "data_dir": self.data_dir}


class JudgeTask(_Task):
    """``{judge: {...}}`` (eval/judge.py): an LLM judge scores the candidate's answers. No shorthand string; it
    dumps as its mapping. Label: ``judge.name``."""

    kind: ClassVar[str] = "judge"
    key: ClassVar[str] = "judge"
    judge: JudgeSpec

    @property
    def label(self) -> str:
        return self.judge.name

    @property
    def shorthand(self) -> str:  # names its eval elements ('<name>@candidate')
        return self.judge.name

    @property
    def on_base(self) -> bool:
        return self.judge.mode == "rubric"  # pairwise compares with a reference model, not the base alone

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.judge.metrics

    def check(self) -> str | None:
        return self.judge.check()

    @model_serializer
    def _dump(self) -> dict:
        return {"judge": self.judge.model_dump(mode="json", exclude_defaults=True)}


TASK_KINDS: dict[str, type[_Task]] = {cls.kind: cls for cls in (HeldoutTask, YamlTask, LmEvalTask, JudgeTask)}


def parse_shorthand(value: Any) -> Any:
    """The one parser of the string forms: 'heldout_exact', 'yaml:<dir>:<task>', 'mmlu' -> mappings of a kind."""
    if not isinstance(value, str):
        return value
    if value in BUILTIN_TASKS:
        return {"heldout": value.removeprefix("heldout_")}
    if value.startswith(YAML_PREFIX):
        directory, sep, name = value[len(YAML_PREFIX) :].rpartition(":")
        if not sep or not directory or not name:
            raise ValueError(f"{value!r}: expected 'yaml:<dir>:<task>'")
        return {"yaml_dir": directory, "task": name}
    return {"lm_eval": value}


def _kind_of(value: Any) -> str | None:
    if isinstance(value, _Task):
        return value.kind
    if isinstance(value, dict):
        return next((cls.kind for cls in TASK_KINDS.values() if cls.key in value), None)
    return None


TaskSpec = Annotated[
    Annotated[HeldoutTask, Tag("heldout")]
    | Annotated[YamlTask, Tag("yaml")]
    | Annotated[LmEvalTask, Tag("lm_eval")]
    | Annotated[JudgeTask, Tag("judge")],
    Discriminator(
        _kind_of,
        custom_error_type="task_kind",
        custom_error_message=(
            "expected 'heldout_exact', 'heldout_mc', 'yaml:<dir>:<task>', an lm-eval task name, "
            "or a mapping with heldout, yaml_dir + task, lm_eval, or judge"
        ),
    ),
]
# What `eval.tasks` holds: a TaskSpec, or its string shorthand.
EvalTask = Annotated[TaskSpec, BeforeValidator(parse_shorthand)]


@functools.cache
def _adapter() -> TypeAdapter:
    return TypeAdapter(EvalTask)


def as_task(value: Any) -> TaskSpec:
    """A TaskSpec from a shorthand string, a mapping or a TaskSpec (ValidationError when none fits)."""
    return _adapter().validate_python(value)


def check_tasks(tasks: Sequence[TaskSpec]) -> list[str]:
    """Problems with `eval.tasks`, as 'eval.tasks.<i>: message' lines; empty when all can run offline."""
    problems = []
    labels = [task.label for task in tasks]
    for i, task in enumerate(tasks):
        if task.label in labels[:i]:  # its scores ('<label>/<metric>') would overwrite the other's
            problems.append(
                f"eval.tasks.{i}: a second task labelled {task.label!r} (eval.tasks.{labels.index(task.label)})"
            )
            continue
        problem = task.check()
        if problem:
            problems.append(f"eval.tasks.{i}: {problem}")
    return problems
