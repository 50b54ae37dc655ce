"""The run directory: recipe snapshot, run.json, per-stage outputs, logs, progress and completion markers.

Permissions: hpcft processes create files under the umask $HPCFT_UMASK (octal, default 077: directories
0700, files 0600), so a run directory on a shared cluster filesystem is not readable by other users; jobs
inherit it (sbatch passes the umask to the job). The recipe snapshot keeps the values the jobs need
(`executor.env`, `setup:` lines, a tracking URI with a password) and is always 0600. run.json holds no
secret in clear: a value that data_tools.secrets redacts is written redacted, and the real one goes to the
0600 file `.run.private.json` beside it, which read_meta merges back."""

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
        p, private = self.root / "run.json", self.root / PRIVATE_META
        meta = json.loads(p.read_text()) if p.is_file() else {}
        return meta | (json.loads(private.read_text()) if private.is_file() else {})

    def update_meta(self, **fields) -> dict:
        """Merge `fields` into run.json; top-level values holding a secret (a tracking URI with a password)
        are written redacted there and kept whole in the private file."""
        from data_tools.secrets import redact

        meta = self.read_meta() | fields
        shown = redact(meta, REDACTED)
        hidden = {k: v for k, v in meta.items() if shown[k] != v}
        if hidden or (self.root / PRIVATE_META).exists():
            atomic_write(self.root / PRIVATE_META, json.dumps(hidden, indent=2, sort_keys=True), mode=0o600)
        write_json(self.root / "run.json", shown)
        return meta

    def write_recipe(self, recipe: Recipe) -> None:
        """The resolved recipe, loadable to rerun the run; 0600, since it keeps secrets the jobs need."""
        make_private_dir(self.root)
        atomic_write(self.recipe_path, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), mode=0o600)

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


PRIVATE_META = ".run.private.json"
REDACTED = "***"


def hpcft_umask() -> int:
    """The umask hpcft creates run files under: $HPCFT_UMASK (octal, e.g. 027 to share with the group),
    default 077 (directories 0700, files 0600)."""
    raw = os.environ.get("HPCFT_UMASK", "077")
    try:
        value = int(raw, 8)
    except ValueError:
        raise ValueError(f"HPCFT_UMASK={raw!r}: expected an octal umask such as 077 or 027") from None
    if not 0 <= value <= 0o777:
        raise ValueError(f"HPCFT_UMASK={raw!r}: expected an octal umask such as 077 or 027")
    return value


def private_umask() -> int:
    """Set this process's umask to hpcft_umask() (children and submitted jobs inherit it); returns the old."""
    return os.umask(hpcft_umask())


def make_private_dir(path: Path) -> Path:
    """mkdir -p; a directory created here gets 0777 & ~hpcft_umask() (0700 by default), whatever the
    process umask; an existing one is left as it is."""
    path = Path(path)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777 & ~hpcft_umask())
    return path


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write a file that may hold secrets: `mode` (0600 by default) whatever the umask."""
    atomic_write(Path(path), text, mode=mode)


def atomic_write(path: Path, text: str, mode: int | None = None) -> None:
    """Write via a temp file + rename so a reader never sees a half-written file; `mode`: exact permissions
    (set before any content is written), else the umask's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if mode is None:
        tmp.write_text(text)
    else:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    atomic_write(Path(path), json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
