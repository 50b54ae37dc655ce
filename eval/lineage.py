"""Lineage: the tag names a registered version carries and the hashes that fill them."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

RECIPE_HASH = "hpcft.recipe_hash"
RECIPE_NAME = "hpcft.recipe_name"
GIT_COMMIT = "hpcft.git_commit"
GIT_DIRTY = "hpcft.git_dirty"
DATA_MANIFEST_HASH = "hpcft.data_manifest_hash"
BASE_MODEL = "hpcft.base_model"  # the recipe's model by name: the tiny model's, the GGUF's or the path's
BASE_MODEL_PATH = "hpcft.base_model_path"  # where the model stage found (or built) it
BASE_MODEL_HASH = "hpcft.base_model_hash"
LAYOUT = "hpcft.layout"  # "dp_replicate=1,dp_shard=2,tp=1,pp=1,zero=3,microbatches=1"
LAYOUT_JSON = "hpcft.layout_json"  # the whole parallel section
SLURM_JOB_IDS = "hpcft.slurm_job_ids"  # {"stage": ["job id", ...]} of the latest submission, when on Slurm
MODEL_HASH = "hpcft.model_hash"
RUN_DIR = "hpcft.run_dir"  # the run directory the version came from
TAGS = (
    RECIPE_HASH,
    RECIPE_NAME,
    GIT_COMMIT,
    GIT_DIRTY,
    DATA_MANIFEST_HASH,
    BASE_MODEL,
    BASE_MODEL_PATH,
    BASE_MODEL_HASH,
    LAYOUT,
    LAYOUT_JSON,
    SLURM_JOB_IDS,
    MODEL_HASH,
    RUN_DIR,
)

# In a Hugging Face model directory only these define the model; tokenizer re-saves or a README do not.
MODEL_FILE_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "*.pt",
    "*.pth",
    "*.gguf",
    "config.json",
)
_CHUNK = 1 << 20


LAYOUT_FIELDS = ("dp_replicate", "dp_shard", "tp", "pp", "zero", "microbatches")


def layout_tags(parallel: dict) -> dict[str, str]:
    """LAYOUT (the degrees in one compact string) and LAYOUT_JSON of a dumped parallel section."""
    compact = ",".join(f"{k}={parallel[k]}" for k in LAYOUT_FIELDS if k in parallel)
    return {LAYOUT: compact, LAYOUT_JSON: json.dumps(parallel, sort_keys=True)}


def slurm_job_tags(jobs: dict | None) -> dict[str, str]:
    """SLURM_JOB_IDS from run.json's Slurm submission ({stage: {"job_ids": [...]}}); empty off Slurm."""
    ids = {stage: list(job.get("job_ids") or [job["job_id"]]) for stage, job in (jobs or {}).items()}
    return {SLURM_JOB_IDS: json.dumps(ids, sort_keys=True)} if ids else {}


def git_commit(path: Path) -> str:
    """HEAD's commit of the repository holding `path`; "unknown" outside a repository or without git."""
    out = _git(path, "rev-parse", "HEAD")
    return out if out else "unknown"


def git_dirty(path: Path) -> bool | None:
    """Whether tracked files differ from HEAD; None outside a repository."""
    if _git(path, "rev-parse", "HEAD") is None:
        return None
    return bool(_git(path, "status", "--porcelain", "--untracked-files=no"))


def _git(path: Path, *args: str) -> str | None:
    path = Path(path)
    cwd = path if path.is_dir() else path.parent
    try:
        done = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def hash_dir(path: Path) -> str:
    """sha256 over sorted relative paths and contents of the files under `path`.

    In a Hugging Face model directory (config.json present) only weights and config count
    (MODEL_FILE_PATTERNS), so the hash names the model rather than incidental files.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory")
    files = [p for p in path.rglob("*") if p.is_file()]
    if (path / "config.json").is_file():
        files = [p for p in files if any(p.match(pattern) for pattern in MODEL_FILE_PATTERNS)]
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda p: p.relative_to(path).as_posix()):
        # Name and size frame each file's bytes, so moving bytes between files changes the hash.
        digest.update(f"{file.relative_to(path).as_posix()}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def collect(
    *,
    recipe_hash: str,
    repo_dir: Path,
    data_dir: Path | None = None,
    base_model_dir: Path | None = None,
    model_dir: Path | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The lineage tags of a candidate; `extra` maps tag names (e.g. RUN_DIR) to values as given."""
    tags = {RECIPE_HASH: recipe_hash, GIT_COMMIT: git_commit(repo_dir)}
    dirty = git_dirty(repo_dir)
    if dirty is not None:
        tags[GIT_DIRTY] = str(dirty).lower()
    if data_dir is not None:
        manifest = Path(data_dir) / "manifest.json"
        tags[DATA_MANIFEST_HASH] = hash_file(manifest) if manifest.is_file() else hash_dir(data_dir)
    if base_model_dir is not None:
        tags[BASE_MODEL_HASH] = hash_dir(base_model_dir)
    if model_dir is not None:
        tags[MODEL_HASH] = hash_dir(model_dir)
    return {**tags, **{k: str(v) for k, v in (extra or {}).items()}}
