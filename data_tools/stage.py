"""The data stage: sources -> normalised conversations -> datatrove runs -> splits, rejects, manifest."""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import shutil
import signal
from collections import Counter
from pathlib import Path
from typing import Callable

from data_tools.config import DataConfig, SourceConfig
from data_tools.normalise import KINDS, Normalised, json_line, normalise_file, record_text
from data_tools.pii import Scrubber
from data_tools.pipeline import Plan, build_plan
from data_tools.steps import SPLITS
from data_tools.synth import generate_tiny_preferences, generate_tiny_tasks, write_jsonl

ExecutorFactory = Callable[..., object]  # (pipeline, logging_dir, tasks, depends=None) -> PipelineExecutor


def local_executor(pipeline: list, logging_dir: str, tasks: int, depends=None):
    """The default executor: datatrove ranks as forked local processes, at most one per core."""
    from datatrove.executor import LocalPipelineExecutor

    return LocalPipelineExecutor(
        pipeline=pipeline,
        logging_dir=logging_dir,
        tasks=tasks,
        workers=min(tasks, os.cpu_count() or 1),
        depends=depends,
        start_method="fork",
    )


def run_data(
    cfg: DataConfig,
    tokenizer_dir: Path,
    out_dir: Path,
    *,
    base_dir: Path,
    executor_factory: ExecutorFactory | None = None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Build the splits, rejected rows and manifest.json in `out_dir`.

    Chat rows give train/validation/test.jsonl and rejected/<step>.jsonl; preference rows
    ({prompt, chosen, rejected}) go through the same steps in a chain of their own (dedup within their
    kind) and give preference/{train,validation,test}.jsonl and preference/rejected/<step>.jsonl.
    """
    out_dir, base_dir = Path(out_dir), Path(base_dir)
    files = _source_files(cfg, base_dir, out_dir / "raw")
    work = out_dir / "work"
    for stale in (work, out_dir / "rejected", out_dir / "preference"):  # datatrove skips completed ranks
        shutil.rmtree(stale, ignore_errors=True)
    template, template_source = chat_template_for(tokenizer_dir, cfg.format.chat_template)
    normalised = _normalise(files, base_dir)
    kinds = [kind for kind in KINDS if normalised[kind].num_read]
    plans = {kind: build_plan(cfg, work / kind, Path(tokenizer_dir), template) for kind in kinds}
    report = _progress(progress, total=sum(len(plans[k].runs) for k in kinds if normalised[k].kept) + 2)

    for kind in kinds:
        write_shards(normalised[kind].kept, work / kind / "shards" / "normalised", cfg.tasks)
    report("normalise")
    for kind in kinds:
        if normalised[kind].kept:
            prefix = "" if kind == "chat" else f"{kind}/"
            run_chain(
                plans[kind],
                work / kind / "logs",
                executor_factory or local_executor,
                lambda step, prefix=prefix: report(prefix + step),
            )

    outputs = {
        kind: write_outputs(cfg, plans[kind], normalised[kind], _kind_dir(out_dir, kind), work / kind) for kind in kinds
    }
    manifest = _manifest(cfg, outputs)
    manifest["sources"] = [_source_entry(src, paths, base_dir) for src, paths in files]
    manifest["tokenizer"] = {
        "path": str(tokenizer_dir),
        "chat_template": template_source,
        "chat_template_sha256": _sha256_bytes(template.encode()),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for kind in kinds:  # intermediates hold unscrubbed rows; logs and PII counts stay
        for folder in (work / kind).iterdir():
            if folder.name not in ("logs", "pii"):
                shutil.rmtree(folder)
    report("manifest")
    if not any(out["splits"].get("train") for out in outputs.values()):
        raise ValueError(
            f"data: no rows left for train after filtering; see {out_dir / 'rejected'} and the "
            f"counts per step in {out_dir / 'manifest.json'}"
        )
    return manifest


def _kind_dir(out_dir: Path, kind: str) -> Path:
    return out_dir if kind == "chat" else out_dir / kind


def _manifest(cfg: DataConfig, outputs: dict[str, dict]) -> dict:
    """Chat outputs at the top level (steps, splits, files), preference outputs under "preference"; one
    hash over every split file of both kinds."""
    empty = {"steps": {}, "splits": {name: 0 for name in SPLITS}, "files": {}}
    chat = outputs.get("chat", empty)
    split_hashes = {
        f"{kind}/{name}": digest for kind, out in outputs.items() for name, digest in out.pop("split_hashes").items()
    }
    manifest = {**chat}
    if "preference" in outputs:
        manifest["preference"] = outputs["preference"]
    # Chat-only runs keep the hash they always had (split hashes keyed by file name alone).
    keyed = {k.split("/", 1)[1]: v for k, v in split_hashes.items()} if set(outputs) == {"chat"} else split_hashes
    manifest["config"] = cfg.model_dump(mode="json")
    manifest["manifest_hash"] = _sha256_bytes(json.dumps(keyed, sort_keys=True).encode())
    return manifest


def _normalise(files: list[tuple[SourceConfig, list[Path]]], base_dir: Path) -> dict[str, Normalised]:
    normalised = {kind: Normalised() for kind in KINDS}
    for i, (src, paths) in enumerate(files):
        for j, path in enumerate(paths):
            normalise_file(path, src.format, f"s{i:02d}f{j:03d}", _display(path, base_dir), normalised)
    return normalised


def _source_files(cfg: DataConfig, base_dir: Path, raw_dir: Path) -> list[tuple[SourceConfig, list[Path]]]:
    """Each source with its files; generated sources are written to `raw_dir` first."""
    problems = cfg.check_paths(base_dir)
    if problems:
        raise ValueError("; ".join(problems))
    files = []
    for i, src in enumerate(cfg.sources):
        if src.generate:
            generate = generate_tiny_preferences if src.generate == "tiny-preferences" else generate_tiny_tasks
            rows = generate(src.num_rows, src.seed, **({"kinds": tuple(src.kinds)} if src.kinds else {}))
            files.append((src, [write_jsonl(rows, raw_dir / f"{i:02d}-{src.generate}.jsonl")]))
        else:
            pattern = Path(src.path) if Path(src.path).is_absolute() else base_dir / src.path
            files.append((src, sorted(Path(p) for p in glob.glob(str(pattern)))))
    return files


def chat_template_for(tokenizer_dir: Path, choice: str) -> tuple[str, str]:
    """(template, "tokenizer" | "chatml"): the tokenizer's own template unless absent or overridden."""
    from transformers import AutoTokenizer

    from parallel.tiny import CHATML_TEMPLATE

    own = AutoTokenizer.from_pretrained(tokenizer_dir).chat_template
    if isinstance(own, dict):  # several named templates: the unnamed one is "default"
        own = own.get("default")
    if choice == "chatml" or not own:
        return CHATML_TEMPLATE, "chatml"
    return own, "tokenizer"


def write_shards(rows: list[dict], folder: Path, tasks: int) -> None:
    """Round-robin the rows into one datatrove input file per rank (datatrove parallelises by file)."""
    folder.mkdir(parents=True, exist_ok=True)
    for rank in range(tasks):
        with open(folder / f"{rank:05d}.jsonl", "w", encoding="utf-8") as f:
            for row in rows[rank::tasks]:
                meta = {k: v for k, v in row.items() if k != "id"}
                doc = {"id": row["id"], "text": record_text(row), "metadata": meta}
                f.write(json_line(doc) + "\n")


def run_chain(plan: Plan, logs: Path, factory: ExecutorFactory, report: Callable[[str], None]) -> None:
    """Each run gets its own executor; `depends` lets a cluster executor chain them as jobs. `run()` must
    return only once every rank has finished: the next run reads what this one wrote."""
    previous = None
    with _quiet_tqdm(), _default_sigterm():
        for run in plan.runs:
            executor = factory(run.pipeline, str(logs / run.name), run.tasks, depends=previous)
            executor.run()
            previous = executor
            report(run.name)


@contextlib.contextmanager
def _default_sigterm():
    """Job runners (submitit) ignore SIGTERM in the job process; forked pool workers inherit that and then
    never exit when the pool terminates them, so the run hangs. Workers are forked with the default."""
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _quiet_tqdm():
    """datatrove's dedup stages draw tqdm bars; in batch logs they are noise. TQDM_DISABLE only works for
    processes that import tqdm later (Slurm ranks), so bars already imported here are switched off too."""
    import tqdm

    saved_env, saved_init = os.environ.get("TQDM_DISABLE"), tqdm.tqdm.__dict__["__init__"]
    os.environ["TQDM_DISABLE"] = "1"
    tqdm.tqdm.__init__ = functools.partialmethod(saved_init, disable=True)
    try:
        yield
    finally:
        tqdm.tqdm.__init__ = saved_init
        if saved_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved_env


def write_outputs(cfg: DataConfig, plan: Plan, normalised: Normalised, out_dir: Path, work: Path) -> dict:
    """Merge per-rank files into sorted outputs; count every step; hash every file."""
    scrubber = Scrubber(cfg.pii)
    normalise_rejects = [{**r, "raw": scrubber.scrub(r["raw"])[0]} for r in normalised.rejected]
    rejected = {"normalise": normalise_rejects}
    rejected |= {step: _read_rows(work / "rejected" / step) for step in plan.steps}
    splits = {name: _read_rows(work / "splits" / name) for name in SPLITS}

    steps = {"normalise": _count(normalised.num_read, normalise_rejects)}
    kept = steps["normalise"]["kept"]
    for step in plan.steps:
        steps[step] = _count(kept, rejected[step])
        kept = steps[step]["kept"]
    steps["pii"]["replaced"] = _pii_counts(work / "pii")
    assert kept == sum(map(len, splits.values())), "rows lost between the last step and the splits"

    hashes = {f"{name}.jsonl": _write_jsonl(out_dir / f"{name}.jsonl", rows) for name, rows in splits.items()}
    split_hashes = dict(hashes)
    for step, rows in rejected.items():
        hashes[f"rejected/{step}.jsonl"] = _write_jsonl(out_dir / "rejected" / f"{step}.jsonl", rows)
    return {
        "steps": steps,
        "splits": {name: len(rows) for name, rows in splits.items()},
        "files": hashes,
        "split_hashes": split_hashes,
    }


def _count(num_in: int, rejected: list[dict]) -> dict:
    reasons = Counter(r["reason"] for r in rejected)
    return {
        "in": num_in,
        "kept": num_in - len(rejected),
        "rejected": len(rejected),
        "reasons": dict(sorted(reasons.items())),
    }


def _read_rows(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.rglob("*.jsonl")):
        with open(path) as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return sorted(rows, key=lambda r: r["id"])


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json_line(row) + "\n" for row in rows).encode()
    path.write_bytes(data)
    return _sha256_bytes(data)


def _pii_counts(folder: Path) -> dict:
    totals = Counter()
    for path in sorted(folder.glob("*.json")):
        totals.update(json.loads(path.read_text()))
    return dict(sorted(totals.items()))


def _source_entry(src: SourceConfig, paths: list[Path], base_dir: Path) -> dict:
    entry = src.model_dump(mode="json", exclude_none=True)
    entry["files"] = [{"path": _display(p, base_dir), "sha256": _sha256_file(p)} for p in paths]
    return entry


def _display(path: Path, base_dir: Path) -> str:
    try:
        return str(path.relative_to(base_dir))
    except ValueError:
        return str(path)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _progress(callback: Callable[[dict], None] | None, total: int) -> Callable[[str], None]:
    done = 0

    def report(step: str) -> None:
        nonlocal done
        done += 1
        if callback is not None:
            callback({"step": step, "done": done, "total": total})

    return report
