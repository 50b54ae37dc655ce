"""The run directory: recipe snapshot, run.json, per-stage outputs, logs, progress and completion markers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from hpc.plan import StageSpec
from hpc.recipe import Recipe, parse_recipe


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    @property
    def recipe_path(self) -> Path:
        return self.root / "recipe.yaml"

    def stage_dir(self, name: str) -> Path:
        return self.root / "stages" / name

    def element_dir(self, spec: StageSpec, index: int) -> Path:
        """Outputs of one array element (the stage dir itself for single jobs)."""
        d = self.stage_dir(spec.name)
        return d / spec.elements[index] if spec.is_array else d

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
        return parse_recipe(yaml.safe_load(self.recipe_path.read_text()))

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
