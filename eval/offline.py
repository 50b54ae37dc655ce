"""Evaluation runs offline: the process patching for it (hub access off, progress bars quiet, restored
afterwards), and the up-front check that an lm-eval task's definition and datasets are on this machine."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

# datasets builders that read local files: no hub access needed.
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}
_QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TQDM_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# huggingface_hub and datasets read the offline switches at import; these are patched when already imported.
_OFFLINE_FLAGS = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
)


@contextlib.contextmanager
def offline_and_quiet() -> Iterator[None]:
    """Hub access off and progress bars quiet for the duration, restored afterwards."""
    saved_env = {k: os.environ.get(k) for k in _QUIET_ENV}
    os.environ.update(_QUIET_ENV)
    patched = _set_module_flags(True)
    try:
        with _tqdm_disabled():
            yield
    finally:
        for module, attr, old in patched:
            setattr(module, attr, old)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _set_module_flags(value: bool) -> list[tuple[object, str, object]]:
    patched = []
    for module_name, attr in _OFFLINE_FLAGS:
        if module_name.split(".")[0] not in sys.modules:
            continue  # not imported yet: it will read the environment variables set above
        module = importlib.import_module(module_name)
        if hasattr(module, attr):
            patched.append((module, attr, getattr(module, attr)))
            setattr(module, attr, value)
    return patched


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


# ---------------------------------------------------------------- task definitions and datasets on this machine

_DEFINITION = re.compile(rb"^(?:task|group|tag):[ \t]*['\"]?([\w.\-]+)['\"]?[ \t]*$", re.M)
_DATASET_PATH = re.compile(r"^dataset_path:\s*['\"]?([^'\"\s#]+)", re.M)


def definitions(root: Path) -> dict[str, list[Path]]:
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
def bundled_definitions() -> dict[str, list[Path]]:
    """definitions() of the tasks lm-eval ships."""
    return definitions(_lm_eval_tasks_dir())


def _lm_eval_tasks_dir() -> Path:
    import importlib.util

    # find_spec locates the package without importing it (importing lm_eval takes seconds).
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("lm-eval is not installed: pip install 'lm-eval[hf]'")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def datasets_problem(task: str, found: list[Path]) -> str | None:
    """Why `task` (defined in the YAML files `found`) cannot read its datasets offline; None when it can."""
    datasets = _dataset_paths(found)
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


_LOCAL_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
_SPLIT_KEYS = re.compile(r"^(training_split|validation_split|test_split|fewshot_split):\s*['\"]?([\w.-]+)", re.M)


def split_keys(definition: Path) -> dict[str, str]:
    """{'test_split': 'test', ...}: the split names a task's YAML file sets."""
    return dict(_SPLIT_KEYS.findall(definition.read_text(errors="replace")))


def local_copy(data_dir: Path) -> tuple[str, dict[str, list[str]]]:
    """(datasets builder, {split: files}) of a local dataset copy: <split>.<ext> or <split>/*.<ext> files,
    ext parquet or jsonl; ValueError when it holds none or mixes formats."""
    files: dict[str, list[str]] = {}
    builders = set()
    for path in sorted(Path(data_dir).iterdir()) if Path(data_dir).is_dir() else []:
        members = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for member in members:
            if member.suffix in _LOCAL_SUFFIXES:
                builders.add(_LOCAL_SUFFIXES[member.suffix])
                files.setdefault(path.stem if path.is_file() else path.name, []).append(str(member.resolve()))
    if not files:
        raise ValueError(f"{data_dir}: no <split>.parquet, <split>.jsonl or <split>/*.parquet|jsonl files")
    if len(builders) > 1:
        raise ValueError(f"{data_dir}: mixes parquet and JSON files; use one format")
    return builders.pop(), files


def local_copy_problem(task: str, found: list[Path], data_dir: Path) -> str | None:
    """Why `task` cannot read its local copy in `data_dir`; None when the split it evaluates is there."""
    if len(found) != 1 or re.search(r"^group:", found[0].read_text(errors="replace"), re.M):
        return f"{task!r}: data_dir works for one task defined in one YAML file, not a group"
    try:
        _builder, files = local_copy(data_dir)
    except ValueError as err:
        return f"{task!r}: data_dir {err}"
    keys = split_keys(found[0])
    wanted = [keys[k] for k in ("test_split", "validation_split") if k in keys]
    if wanted and not set(wanted) & set(files):
        return f"{task!r}: data_dir {str(data_dir)!r} has splits {', '.join(files)}; the task reads {wanted[0]!r}"
    return None


def _dataset_paths(found: list[Path]) -> set[str]:
    """dataset_path values in the defining files' directories (lm-eval tasks share templates there)."""
    paths: set[str] = set()
    for directory in {p.parent for p in found}:
        for path in directory.iterdir():
            if path.is_file() and ("yaml" in path.name):
                paths.update(_DATASET_PATH.findall(path.read_text(errors="replace")))
    return paths


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
