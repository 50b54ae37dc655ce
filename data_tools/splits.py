"""Reading a data directory's splits: `<split>/<rank>.jsonl` shards (what the data stage writes) or one
`<split>.jsonl` file (what a user or a test may hand a stage)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator


def split_files(data_dir: Path, name: str) -> list[Path]:
    """The JSONL files of split `name`, in order: `<name>.jsonl` if it exists, else `<name>/*.jsonl`."""
    single = Path(data_dir) / f"{name}.jsonl"
    if single.is_file():
        return [single]
    return sorted((Path(data_dir) / name).glob("*.jsonl"))


def sha256_file(path: Path) -> str:
    """The file's sha256 (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def has_split(data_dir: Path, name: str) -> bool:
    return bool(split_files(data_dir, name))


def has_rows(data_dir: Path, name: str) -> bool:
    return any(path.stat().st_size for path in split_files(data_dir, name))


def iter_split(data_dir: Path, name: str, limit: int | None = None) -> Iterator[dict]:
    """The split's rows, streaming (the first `limit` when given)."""
    seen = 0
    for path in split_files(data_dir, name):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield json.loads(line)


def read_split(data_dir: Path, name: str, limit: int | None = None) -> list[dict]:
    return list(iter_split(data_dir, name, limit))


def rejected_rows(data_dir: Path) -> Iterator[tuple[str, dict]]:
    """(step, row) of every rejected row under `<data_dir>/rejected/<step>/`."""
    for folder in sorted(p for p in (Path(data_dir) / "rejected").iterdir() if p.is_dir()):
        yield from ((folder.name, row) for row in iter_split(folder.parent, folder.name))
