"""The stage graph: which jobs a recipe needs, in order, with resources and input hashes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from eval.tasks import TaskSpec
from hpc.recipe import Recipe

# Bumped when a stage's outputs change meaning, so old markers stop matching.
STAGE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Resources:
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: int | None = None  # None: the cluster's default
    time_min: int = 60


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str  # model | data | sft | export | eval | gate
    depends_on: tuple[str, ...]
    resources: Resources
    input_hash: str
    elements: tuple[str, ...] = ("0",)  # one label per array element
    config: dict = field(default_factory=dict, compare=False)
    # Training stages: the input hash without the parallel layout. A resumable checkpoint is kept while
    # it stays the same, so a stage restarted under another layout resumes.
    resume_key: str = ""

    @property
    def is_array(self) -> bool:
        return len(self.elements) > 1


def _hash(*parts) -> str:
    blob = json.dumps([STAGE_FORMAT_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class EvalElement:
    """One element of the eval array: a task on one model (the exported candidate or the base model)."""

    task: TaskSpec
    model: Literal["candidate", "base"]

    @property
    def key(self) -> str:
        """The element's label: its run directory, marker, progress and log name ('heldout_exact@candidate')."""
        return f"{self.task.shorthand}@{self.model}"


def eval_elements(recipe: Recipe) -> tuple[EvalElement, ...]:
    models = ("candidate", "base") if recipe.eval.include_base else ("candidate",)
    return tuple(
        EvalElement(task, model) for task in recipe.eval.tasks for model in models if model != "base" or task.on_base
    )


def build_plan(recipe: Recipe) -> list[StageSpec]:
    dump = recipe.model_dump(mode="json")
    stages: list[StageSpec] = []

    def add(name, kind, deps, section, resources=Resources(), elements=("0",), resume_key=""):
        upstream = [s.input_hash for s in stages if s.name in deps]
        h = _hash(kind, section, upstream)
        key = _hash(kind, resume_key, upstream) if resume_key else ""
        stages.append(StageSpec(name, kind, tuple(deps), resources, h, tuple(elements), section or {}, key))

    add("model", "model", [], dump["model"])
    # Source weights only steer the training stages' sampling: changing one retrains, it does not re-tokenize.
    weights = [src.pop("weight", None) for src in dump["data"]["sources"]]
    add("data", "data", ["model"], dump["data"], Resources(cpus_per_task=1))  # per datatrove rank; ranks fan out
    prev = "data"
    world = recipe.parallel.world_size
    for stage, raw in zip(recipe.stages, dump["stages"]):
        add(
            stage.name,
            stage.kind,
            ["model", prev],
            {"stage": raw, "parallel": dump["parallel"], "seed": recipe.seed}
            | ({"source_weights": weights} if any(w is not None for w in weights) else {}),
            Resources(tasks_per_node=world, cpus_per_task=2),
            resume_key={"stage": raw, "seed": recipe.seed}
            | ({"source_weights": weights} if any(w is not None for w in weights) else {}),
        )
        prev = stage.name
    add("export", "export", ["model", prev], {})
    add(
        "eval",
        "eval",
        ["model", "data", "export"],
        dump["eval"],
        Resources(cpus_per_task=2),
        elements=[e.key for e in eval_elements(recipe)],
    )
    add("gate", "gate", ["model", "data", "export", "eval"], {"gate": dump["gate"], "tracking": dump["tracking"]})
    return stages


def downstream_of(stages: list[StageSpec], name: str) -> set[str]:
    out = {name}
    for s in stages:
        if out & set(s.depends_on):
            out.add(s.name)
    return out
