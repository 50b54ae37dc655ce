"""The run directory: recipe snapshot, run.json, per-stage outputs, logs, progress and completion markers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from hpc.plan import StageSpec
from hpc.recipe import Recipe, RecipeError, parse_recipe


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    @property
    def recipe_path(self) -> Path:
        return self.root / "recipe.yaml"

    def inside(self, path: Path | str, what: str = "path", under: Path | None = None) -> Path:
        """`path` (relative to the run directory, or absolute) made absolute, when it stays inside the run
        directory (or `under`, a directory in it); else RecipeError('<what>: ...'). Compared after resolving
        '.' and '..' but not symlinks: a stages/ folder linked to scratch space is still the run's."""
        base = Path(os.path.normpath(under if under is not None else self.root))
        full = Path(os.path.normpath(self.root / path))
        if full != base and base not in full.parents:
            raise RecipeError([f"{what}: {str(path)!r} leads outside {base}"])
        return full

    def stage_dir(self, name: str) -> Path:
        """<root>/stages/<name>; RecipeError for a name that is not one plain directory name (stage names are
        checked by the recipe; this guards every other way a name gets here, e.g. `hpcft logs NAME`)."""
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or os.sep in name or "\0" in name:
            raise RecipeError([f"stage: {name!r} is not a stage name (one directory under {self.root / 'stages'})"])
        return self.inside(Path("stages") / name, "stage", under=self.root / "stages")

    def element_dir(self, spec: StageSpec, index: int) -> Path:
        """Outputs of one array element (the stage dir itself for single jobs); eval element keys such as
        'yaml:/abs/dir:task@candidate' nest under the stage dir and never leave it."""
        d = self.stage_dir(spec.name)
        return self.inside(d / spec.elements[index], f"{spec.name} element", under=d) if spec.is_array else d

    def progress_path(self, name: str) -> Path:
        return self.stage_dir(name) / "progress.jsonl"

    # run.json ---------------------------------------------------------------------------------
    def read_meta(self) -> dict:
        p = self.root / "run.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def update_meta(self, **fields) -> dict:
        meta = self.read_meta() | fields
        write_json(self.root / "run.json", meta)
        return meta

    def write_recipe(self, recipe: Recipe) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.recipe_path, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))

    def load_recipe(self) -> Recipe:
        """The run's recipe snapshot; RecipeError('workdir: ...') when it is missing or not a recipe."""
        try:
            raw = yaml.safe_load(self.recipe_path.read_text())
        except OSError as err:
            raise RecipeError([f"workdir: cannot read the run's recipe {self.recipe_path}: {err.strerror}"]) from None
        except yaml.YAMLError:
            raise RecipeError([f"workdir: the run's recipe {self.recipe_path} is not valid YAML"]) from None
        try:
            return parse_recipe(raw)
        except RecipeError as err:
            raise RecipeError([f"workdir: {self.recipe_path}: {line}" for line in err.problems]) from None

    # markers ----------------------------------------------------------------------------------
    def _marker(self, spec: StageSpec, index: int) -> Path:
        return self.stage_dir(spec.name) / "markers" / f"{index}.done"

    def mark_done(self, spec: StageSpec, index: int) -> None:
        write_json(self._marker(spec, index), {"input_hash": spec.input_hash, "finished": time.time()})

    def element_done(self, spec: StageSpec, index: int) -> bool:
        p = self._marker(spec, index)
        return p.is_file() and json.loads(p.read_text()).get("input_hash") == spec.input_hash

    def stage_done(self, spec: StageSpec) -> bool:
        return all(self.element_done(spec, i) for i in range(len(spec.elements)))

    def clear_markers(self, spec: StageSpec) -> None:
        for p in (self.stage_dir(spec.name) / "markers").glob("*.done"):
            p.unlink()


def atomic_write(path: Path, text: str) -> None:
    """Write via a temp file + rename so a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    atomic_write(Path(path), json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
