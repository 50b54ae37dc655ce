"""The recipe: YAML validated into one frozen, typed object composed of each package's section model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_tools.config import DataConfig
from eval.config import EvalConfig, GateConfig
from eval.tasks import TASK_KINDS
from parallel.dims import ParallelConfig
from training.config import TrainStage


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """The base model: a Hugging Face directory on disk, or a named tiny config built offline."""

    path: str | None = None
    tiny: str | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _one_kind(self) -> "ModelConfig":
        if (self.path is None) == (self.tiny is None):
            raise ValueError("set exactly one of `path` (a Hugging Face model directory) or `tiny`")
        return self

    @field_validator("tiny")
    @classmethod
    def _known_tiny(cls, v: str | None) -> str | None:
        from parallel.tiny import TINY_CONFIGS

        if v is not None and v not in TINY_CONFIGS:
            raise ValueError(f"unknown tiny model {v!r}; allowed: {', '.join(sorted(TINY_CONFIGS))}")
        return v


class TrackingConfig(_Section):
    uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite in the workdir")
    experiment: str = "hpcft"
    registered_model: str = Field(min_length=1)


class SlurmOptions(_Section):
    """Cluster options for jobs; unset fields fall back to the recipe-wide ones, then to the plan's."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int | None = Field(None, ge=1)
    nodes: int | None = Field(None, ge=1)
    tasks_per_node: int | None = Field(None, ge=1)
    gpus_per_node: int | None = Field(None, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)
    mem_gb: int | None = Field(None, ge=1)
    constraint: str | None = None
    exclusive: bool | None = None
    extra_sbatch: list[str] = Field(default_factory=list, description="raw options, e.g. '--reservation=x'")
    setup: list[str] = Field(default_factory=list, description="shell lines before the job (module load...)")
    env_preset: Literal["none", "coreweave", "infiniband"] | None = None
    container_image: str | None = Field(None, description="pyxis --container-image")
    container_mounts: list[str] = Field(default_factory=list)
    max_retries: int | None = Field(None, ge=0, description="requeues of a failed job or array element")


class ExecutorConfig(_Section):
    kind: Literal["local", "inline", "slurm"] = "local"
    max_parallel: int = Field(2, ge=1, description="array elements running at once (local executor)")
    timeout_min: int = Field(120, ge=1)
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for every job")
    python: str | None = Field(None, description="interpreter on the nodes (default: this one)")
    slurm: SlurmOptions = SlurmOptions()
    stages: dict[str, SlurmOptions] = Field(
        default_factory=dict, description="per-stage overrides, keyed by stage name or kind (data, sft, eval)"
    )


class Recipe(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    model: ModelConfig
    data: DataConfig
    stages: list[TrainStage] = Field(min_length=1)
    parallel: ParallelConfig = ParallelConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    tracking: TrackingConfig
    executor: ExecutorConfig = ExecutorConfig()

    @model_validator(mode="after")
    def _unique_stage_names(self) -> "Recipe":
        names = [s.name for s in self.stages]
        reserved = {"model", "data", "export", "eval", "gate"}
        for n in names:
            if names.count(n) > 1 or n in reserved:
                raise ValueError(f"stage name {n!r} is repeated or reserved ({', '.join(sorted(reserved))})")
        return self

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


class RecipeError(Exception):
    """A recipe that cannot run; `problems` holds one 'field.path: message' line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _stage_kinds() -> dict[str, type[BaseModel]]:
    """kind -> stage model, from TrainStage (one model, or a union discriminated on `kind`)."""
    from typing import get_args

    members, pending = [], [TrainStage]
    while pending:
        t = pending.pop()
        if isinstance(t, type) and issubclass(t, BaseModel):
            members.append(t)
        else:
            pending += [a for a in get_args(t) if not isinstance(a, type(Field()))]
    return {m.model_fields["kind"].default: m for m in members}


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names allowed at `loc` (the parent of an unknown key), walking nested models."""
    kinds = _stage_kinds()
    if model is Recipe and loc[:2] == ("eval", "tasks") and len(loc) == 4 and loc[3] in TASK_KINDS:
        return sorted(TASK_KINDS[loc[3]].model_fields)
    if model is Recipe and loc[:1] == ("stages",) and len(loc) >= 2:
        kind = loc[2] if len(loc) >= 3 and loc[2] in kinds else next(iter(kinds)) if len(kinds) == 1 else None
        start = 3 if len(loc) >= 3 and loc[2] in kinds else 2
        return _allowed_keys(kinds[kind], loc[start:]) if kind else []
    cls: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        cls = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cls is None:
            return []
    return sorted(cls.model_fields) if cls is not None else []


def format_errors(err: ValidationError) -> list[str]:
    lines = []
    kinds = _stage_kinds()
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # a union of stage models puts the chosen `kind` into the location: stages.0.sft.max_steps
        shown = tuple(p for i, p in enumerate(loc) if not (i == 2 and loc[0] == "stages" and p in kinds))
        # ... and a union of eval task kinds its tag: eval.tasks.0.yaml.task
        shown = tuple(
            p for i, p in enumerate(shown) if not (i == 3 and shown[:2] == ("eval", "tasks") and p in TASK_KINDS)
        )
        path = ".".join(str(p) for p in shown) or "<recipe>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(Recipe, loc[:-1])
            msg = "unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        elif e["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{path}: {msg}")
    return lines


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML; list indices allowed) to a raw recipe dict."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError([f"--set {item}: expected KEY=VALUE, e.g. stages.0.max_steps=50"])
        key, value = item.split("=", 1)
        parts = key.split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError([f"--set {key}: {part!r} is not an index of a {len(node)}-item list"])
                part = int(part)
            elif not isinstance(node, dict):
                raise RecipeError([f"--set {key}: {'.'.join(parts[:i])} is not a section"])
            if last:
                node[part] = yaml.safe_load(value)
            else:
                if isinstance(node, dict) and part not in node:
                    node[part] = {}
                node = node[part]
    return raw


def parse_recipe(raw: Any, base_dir: Path | None = None) -> Recipe:
    """Validate a raw recipe; `base_dir` (the recipe file's directory) anchors relative eval task directories."""
    if not isinstance(raw, dict):
        raise RecipeError(["<recipe>: the file must hold a YAML mapping of sections"])
    try:
        return Recipe.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as err:
        raise RecipeError(format_errors(err)) from None


def load_recipe(path: Path, overrides: list[str] = ()) -> Recipe:
    """Read, override, validate and check a recipe file; raises RecipeError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"<recipe>: no such file: {path}"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError([f"<recipe>: not valid YAML: {err}".replace("\n", " ")]) from None
    raw = apply_overrides(raw, list(overrides))
    recipe = parse_recipe(raw, base_dir=path.resolve().parent)
    problems = check_recipe(recipe, base_dir=path.resolve().parent)
    if problems:
        raise RecipeError(problems)
    return recipe


def model_config(recipe: Recipe, base_dir: Path) -> dict | None:
    """The base model's config.json (a dict), from the tiny table or the model directory; None when missing."""
    if recipe.model.tiny:
        from parallel.tiny import TINY_CONFIGS, TINY_VOCAB

        return dict(TINY_CONFIGS[recipe.model.tiny], vocab_size=TINY_VOCAB)
    cfg_path = resolve_path(recipe.model.path, base_dir) / "config.json"
    return json.loads(cfg_path.read_text()) if cfg_path.is_file() else None


def resolve_path(p: str, base_dir: Path) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else base_dir / path


def check_recipe(recipe: Recipe, base_dir: Path) -> list[str]:
    """Checks that need the filesystem or other packages: missing files, layouts, offline eval tasks."""
    from eval.gate import check_config
    from eval.tasks import check_tasks
    from training.stages import check_stages

    problems = check_stages(recipe, model_config(recipe, base_dir))  # order, data, layouts (parallel.layout)
    if recipe.model.path:
        mdir = resolve_path(recipe.model.path, base_dir)
        if not (mdir / "config.json").is_file():
            problems.append(f"model.path: {recipe.model.path} is not a Hugging Face model directory (no config.json)")
    problems += recipe.data.check_paths(base_dir)
    problems += check_tasks(recipe.eval.tasks)
    problems += check_config(recipe.gate, recipe.eval, [t.label for t in recipe.eval.tasks])
    return problems
