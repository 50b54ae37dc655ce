"""The data stage's first run: every rank reads its share of the source files, streaming.

Source files are cut into units: a plain JSONL file into byte ranges (a line belongs to the range its
first byte is in), a Parquet file into row groups, a gzip file whole. Unit k goes to rank k % tasks, so
one large file is spread over the array. Row ids stay `s<source>f<file>-<line or row index>` whatever the
cut (a range counts the newlines before it), so outputs do not depend on the number of ranks.

Each rank writes, per row kind (chat, preference), the normalised rows as its datatrove input shard
(`<work>/<kind>/shards/normalised/<rank>.jsonl`), the rows it rejected with their reason
(`<work>/<kind>/rejected/normalise/<rank>.jsonl`, raw text PII-scrubbed) and how many rows it read
(`<work>/normalise/<rank>.json`). Nothing holds more than one row at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from data_tools.config import PIIConfig
from data_tools.normalise import KINDS, RowError, _parse_line, json_line, read_stream, record_text, row_kind, to_record
from data_tools.storage import is_url, open_input, remote_info

MIN_RANGE_BYTES = 1 << 20  # JSONL files are cut into ranges of at least this many bytes
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Unit:
    source: int  # index in data.sources
    file: int  # index among the source's files
    path: str
    fmt: str
    display: str  # the path as the manifest and rejected rows show it
    start: int = 0  # byte range [start, end) of a plain JSONL file, or the row group of a Parquet file
    end: int | None = None

    @property
    def id_prefix(self) -> str:
        return f"s{self.source:02d}f{self.file:03d}"


def plan_units(files: list[tuple[int, int, str, str, str]], tasks: int, options: dict | None = None) -> list[Unit]:
    """Units of (source index, file index, path or URL, format, display path) files for `tasks` ranks;
    `options`: data.storage_options for URLs (data_tools.storage)."""
    units = []
    for source, index, path, fmt, display in files:
        path, suffix = str(path), _suffix(path)
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            with open_input(path, options or {}) as f:
                groups = pq.ParquetFile(f).num_row_groups
            units += [Unit(source, index, path, fmt, display, g, g + 1) for g in range(groups)]
        elif suffix == ".gz":
            units.append(Unit(source, index, path, fmt, display))
        else:
            size = remote_info(path, options or {})["size"] if is_url(path) else Path(path).stat().st_size
            n = max(1, min(tasks, size // MIN_RANGE_BYTES))
            cuts = [size * k // n for k in range(n + 1)]
            units += [Unit(source, index, path, fmt, display, a, b) for a, b in zip(cuts, cuts[1:])]
    return units


def _suffix(path: str | Path) -> str:
    return os.path.splitext(str(path))[1]


def _line_start(f, offset: int) -> tuple[int, int]:
    """(byte offset of the first line starting at or after `offset`, its line index)."""
    if offset == 0:
        return 0, 0
    f.seek(offset - 1)
    while True:  # skip the rest of the line that `offset` falls in
        block = f.read(_BLOCK)
        if not block:
            return f.tell(), -1
        at = block.find(b"\n")
        if at >= 0:
            start = f.tell() - len(block) + at + 1
            break
    f.seek(0)
    lines, remaining = 0, start
    while remaining:
        block = f.read(min(_BLOCK, remaining))
        lines += block.count(b"\n")
        remaining -= len(block)
    return start, lines


def unit_rows(unit: Unit, options: dict | None = None):
    """(row index in its file, parsed row or None, raw line, unreadable reason or None) of a unit."""
    suffix = _suffix(unit.path)
    with open_input(unit.path, options or {}) as f:
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(f)
            first = sum(parquet.metadata.row_group(g).num_rows for g in range(unit.start))
            for i, row in enumerate(parquet.read_row_group(unit.start).to_pylist()):
                yield first + i, row, None, None
            return
        if suffix == ".gz" or unit.end is None:
            yield from read_stream(f, gzipped=suffix == ".gz")
            return
        position, index = _line_start(f, unit.start)
        f.seek(position)
        while position < unit.end:
            raw = f.readline()
            if not raw:
                break
            yield (index, *_parse_line(raw, first=index == 0))
            position += len(raw)
            index += 1


class SourceReader(PipelineStep):
    """Normalises its rank's units (see the module docstring); yields nothing downstream."""

    type = "📖 - READER"
    name = "📖 Sources"

    def __init__(self, units: list[Unit], work_dir: str, pii: PIIConfig, storage_options: dict | None = None):
        super().__init__()
        self.units, self.work_dir, self.pii = units, work_dir, pii
        self.storage_options = storage_options or {}

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from data_tools.pii import Scrubber

        scrub = Scrubber(self.pii).scrub
        work = Path(self.work_dir)
        name = f"{rank:05d}.jsonl"
        outputs = {
            kind: tuple(_open(work / kind / sub / name) for sub in ("shards/normalised", "rejected/normalise"))
            for kind in KINDS
        }
        read = dict.fromkeys(KINDS, 0)
        try:
            for unit in self.units[rank::world_size]:
                for i, row, line, unreadable in unit_rows(unit, self.storage_options):
                    if unreadable == "blank":
                        continue
                    kind = row_kind(row, unit.fmt)
                    read[kind] += 1
                    self.stat_update(f"read_{kind}")
                    row_id = f"{unit.id_prefix}-{i:07d}"
                    kept, rejects = outputs[kind]
                    try:
                        if unreadable is not None:
                            raise RowError(unreadable)
                        record = {"id": row_id, **to_record(row, unit.fmt), "source": unit.display}
                        if isinstance(row, dict) and isinstance(row.get("provenance"), dict):
                            record["provenance"] = row["provenance"]  # synthesized rows (data_tools.synthesize)
                    except RowError as e:
                        raw = line if line is not None else json.dumps(row, default=str)
                        rejects.write(
                            json_line({"id": row_id, "reason": e.reason, "source": unit.display, "raw": scrub(raw)[0]})
                            + "\n"
                        )
                        self.stat_update(f"rejected_{kind}")
                        continue
                    meta = {k: v for k, v in record.items() if k != "id"} | {"source_index": unit.source}
                    kept.write(json_line({"id": row_id, "text": record_text(record), "metadata": meta}) + "\n")
        finally:
            for pair in outputs.values():
                for f in pair:
                    f.close()
        counts = work / "normalise" / f"{rank:05d}.json"
        counts.parent.mkdir(parents=True, exist_ok=True)
        counts.write_text(json.dumps(read))
        return
        yield


def _open(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w", encoding="utf-8")


def read_counts(work: Path) -> dict[str, int]:
    """Rows read per kind over every rank of the normalise run."""
    totals = dict.fromkeys(KINDS, 0)
    for path in sorted((Path(work) / "normalise").glob("*.json")):
        for kind, n in json.loads(path.read_text()).items():
            totals[kind] += n
    return totals
