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
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

from data_tools.config import DataConfig, FilterConfig, SourceConfig
from data_tools.normalise import KINDS
from data_tools.pipeline import Plan, Run, build_plan
from data_tools.quality import reason_key, step_stats
from data_tools.sources import SourceReader, plan_units, read_counts
from data_tools.splits import sha256_file
from data_tools.steps import SPLITS
from data_tools.storage import expand, is_url, remote_info, sha256_input, upload
from data_tools.synth import generate_tiny_preferences, generate_tiny_tasks, generate_tiny_unpaired, write_jsonl
from data_tools.tokens import shard_files, write_meta

ExecutorFactory = Callable[..., object]  # (pipeline, logging_dir, tasks, depends=None) -> PipelineExecutor


def local_executor(pipeline: list, logging_dir: str, tasks: int, depends=None):
    """The default executor: datatrove ranks as forked local processes, at most one per core. Ranks that run
    a torch model are spawned instead: a fork of a process that already ran torch hangs in its first
    parallel op (the OpenMP pool does not survive fork; CUDA does not either)."""
    from datatrove.executor import LocalPipelineExecutor

    fresh = any(getattr(step, "needs_fresh_process", False) for step in pipeline)
    return LocalPipelineExecutor(
        pipeline=pipeline,
        logging_dir=logging_dir,
        tasks=tasks,
        workers=min(tasks, os.cpu_count() or 1),
        depends=depends,
        start_method="spawn" if fresh else "fork",
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
    """Build the splits, the token store, rejected rows and manifest.json in `out_dir`, streaming.

    Chat rows give `<split>/<rank>.jsonl` shards, the token store `tokens/` (data_tools.tokens) and
    `rejected/<step>/<rank>.jsonl`; preference rows ({prompt, chosen, rejected}) and unpaired rows ({prompt,
    completion, label}) each go through the same steps in a chain of their own (dedup within their kind)
    and give the same under `preference/` and `unpaired/`. No process
    holds more than a row at a time (the manifest's counts and hashes are summed over the shards).
    """
    out_dir, base_dir = Path(out_dir), Path(base_dir)
    files = _source_files(cfg, base_dir, out_dir / "raw")
    work = out_dir / "work"
    _clear_outputs(out_dir)
    template, template_source = chat_template_for(tokenizer_dir, cfg.format.chat_template, base_dir)
    factory = executor_factory or local_executor
    report = _progress(progress)
    synthesized = {}
    for i, (src, _) in enumerate(files):
        if src.synthesize is not None:
            synthesized[i], paths = _synthesize(i, cfg, base_dir, out_dir, factory)
            files[i] = (src, paths)

    listed = [
        (i, j, path, src.format, _display(path, base_dir))
        for i, (src, paths) in enumerate(files)
        for j, path in enumerate(paths)
    ]
    units = plan_units(listed, cfg.tasks, cfg.storage_options)
    normalise = Run("normalise", [SourceReader(units, str(work), cfg.pii, cfg.storage_options)], cfg.tasks)
    run_chain(Plan([normalise], []), work / "logs", factory, lambda step: None)
    read = read_counts(work)
    kinds = [kind for kind in KINDS if read[kind]]
    plans = {kind: build_plan(cfg, work / kind, Path(tokenizer_dir), template, kind) for kind in kinds}
    kept = {kind: read[kind] - _count_rows(work / kind / "rejected" / "normalise") for kind in kinds}
    report("normalise", total_steps=2 + sum(len(plans[k].runs) for k in kinds if kept[k]))
    for kind in kinds:
        if kept[kind]:
            prefix = "" if kind == "chat" else f"{kind}/"
            run_chain(plans[kind], work / kind / "logs", factory, lambda step, prefix=prefix: report(prefix + step))

    outputs = {kind: write_outputs(plans[kind], read[kind], _kind_dir(out_dir, kind), work / kind) for kind in kinds}
    tokenizer = _load_tokenizer(tokenizer_dir)
    for kind in kinds:
        store = _kind_dir(out_dir, kind) / "tokens"
        if store.is_dir():
            meta = write_meta(store, kind, tokenizer, template, template_source)
            outputs[kind]["tokens"] = meta["splits"]
            outputs[kind]["files"] |= _hash_files(_kind_dir(out_dir, kind), shard_files(store))
    manifest = _manifest(cfg, outputs)
    manifest["sources"] = [_source_entry(src, paths, base_dir, cfg.storage_options) for src, paths in files]
    for i, summary in synthesized.items():
        manifest["sources"][i]["synthesized"] = summary | {"kept": _rows_of_source(out_dir, i)}
    manifest["tokenizer"] = {
        "path": str(tokenizer_dir),
        "chat_template": template_source,
        "chat_template_sha256": _sha256_bytes(template.encode()),
    }
    if cfg.output is not None:
        manifest["output"] = cfg.output
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for folder in work.iterdir():  # intermediates hold unscrubbed rows; logs and PII counts stay
        if folder.name in kinds:
            for sub in folder.iterdir():
                if sub.name not in ("logs", "pii"):
                    shutil.rmtree(sub)
        elif folder.name != "logs":
            shutil.rmtree(folder)
    if cfg.output is not None:  # the manifest last: a reader that finds it finds everything it names
        names = [n for n in (*SPLITS, "rejected", "tokens", *KINDS[1:]) if (out_dir / n).is_dir()]
        upload(out_dir, cfg.output, cfg.storage_options, names + ["manifest.json"])
    report("manifest")
    if not any(out["splits"].get("train") for out in outputs.values()):
        raise ValueError(
            f"data: no rows left for train after filtering; see {out_dir / 'rejected'} and the "
            f"counts per step in {out_dir / 'manifest.json'}"
        )
    return manifest


GENERATORS = {
    "tiny-tasks": generate_tiny_tasks,
    "tiny-preferences": generate_tiny_preferences,
    "tiny-unpaired": generate_tiny_unpaired,
}


def _clear_outputs(out_dir: Path) -> None:
    """What an earlier run left (datatrove skips ranks it finds completed; stale shards would be read)."""
    for name in ("work", "rejected", *KINDS[1:], "tokens", *SPLITS):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in SPLITS:
        (out_dir / f"{name}.jsonl").unlink(missing_ok=True)


def _load_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _kind_dir(out_dir: Path, kind: str) -> Path:
    return out_dir if kind == "chat" else out_dir / kind


def _manifest(cfg: DataConfig, outputs: dict[str, dict]) -> dict:
    """Chat outputs at the top level (steps, splits, shards, files, tokens), preference and unpaired outputs
    under "preference" and "unpaired"; one hash over every split shard and token-store file of every kind."""
    empty = {"steps": {}, "splits": {name: 0 for name in SPLITS}, "files": {}}
    chat = outputs.get("chat", empty)
    split_hashes = {
        f"{kind}/{name}": digest
        for kind, out in outputs.items()
        for name, digest in out["files"].items()
        if not name.startswith("rejected/")
    }
    manifest = {**chat}
    for kind in KINDS[1:]:
        if kind in outputs:
            manifest[kind] = outputs[kind]
    manifest["config"] = cfg.model_dump(mode="json")
    manifest["manifest_hash"] = _sha256_bytes(json.dumps(split_hashes, sort_keys=True).encode())
    return manifest


def _source_files(cfg: DataConfig, base_dir: Path, raw_dir: Path) -> list[tuple[SourceConfig, list[Path | str]]]:
    """Each source with its files (paths, or URLs for object storage); generated sources are written to
    `raw_dir` first."""
    problems = cfg.check_paths(base_dir)
    if problems:
        raise ValueError("; ".join(problems))
    files = []
    for i, src in enumerate(cfg.sources):
        if src.synthesize is not None:  # generated once the outputs are cleared (run_data)
            files.append((src, []))
        elif src.generate:
            generate = GENERATORS[src.generate]
            rows = generate(src.num_rows, src.seed, **({"kinds": tuple(src.kinds)} if src.kinds else {}))
            files.append((src, [write_jsonl(rows, raw_dir / f"{i:02d}-{src.generate}.jsonl")]))
        elif is_url(src.path):
            urls = expand(src.path, cfg.storage_options)
            if not urls:
                raise ValueError(f"data.sources.{i}.path: {src.path} names no files")
            files.append((src, urls))
        else:
            pattern = Path(src.path) if Path(src.path).is_absolute() else base_dir / src.path
            files.append((src, sorted(Path(p) for p in glob.glob(str(pattern)))))
    return files


def _synthesize(index: int, cfg: DataConfig, base_dir: Path, out_dir: Path, factory) -> tuple[dict, list[Path]]:
    """Source `index`'s synthetic rows (data_tools.synthesize) as one datatrove run over the seeds: (summary for
    the manifest, the rows files the normalise run reads). Progress lives under raw/ (kept between runs),
    malformed replies go to rejected/synthesize/<index>/."""
    from data_tools.synthesize import Synthesizer, generator_name, load_seeds, read_synth_counts, sha256_text, state_key

    synth = cfg.sources[index].synthesize
    try:
        seeds = load_seeds(synth, base_dir)
    except ValueError as err:
        raise ValueError(f"data.sources.{index}.{err}") from None
    state = out_dir / "raw" / f"{index:02d}-synthesize-{state_key(synth)}"
    rows = out_dir / "work" / f"synthesize-{index:02d}"
    tasks = min(cfg.tasks, len(seeds))
    run = Run(f"synthesize_{index:02d}", [Synthesizer(synth, seeds, str(state), str(rows), cfg.pii)], tasks)
    run_chain(Plan([run], []), out_dir / "work" / "logs", factory, lambda step: None)
    malformed = out_dir / "rejected" / "synthesize" / f"{index:02d}"
    malformed.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(rows / "malformed", malformed)
    summary = {
        "generator": generator_name(synth),
        "template_sha256": sha256_text(synth.template),
        "state": _display(state, out_dir),
        "malformed_rows": _display(malformed, out_dir),
        **read_synth_counts(rows),
    }
    return summary, sorted(rows.glob("*.jsonl"))


def _rows_of_source(out_dir: Path, index: int) -> int:
    """Chat rows of source `index` in the splits (row ids start with `s<index>`, data_tools.sources)."""
    prefix, total = f"s{index:02d}f", 0
    for name in SPLITS:
        for path in sorted((out_dir / name).glob("*.jsonl")):
            with open(path, encoding="utf-8") as f:
                total += sum(1 for line in f if line.strip() and json.loads(line)["id"].startswith(prefix))
    return total


def chat_template_for(tokenizer_dir: Path, choice: str, base_dir: Path | None = None) -> tuple[str, str]:
    """(template, source) of data.format.chat_template (data_tools.templates.template_for): the tokenizer's
    own ("tokenizer") unless absent or a named template or .jinja file (resolved against base_dir) is chosen."""
    from transformers import AutoTokenizer

    from data_tools.templates import template_for

    return template_for(choice, AutoTokenizer.from_pretrained(tokenizer_dir).chat_template, base_dir)


def run_chain(plan: Plan, logs: Path, factory: ExecutorFactory, report: Callable[[str], None]) -> None:
    """Each run gets its own executor; `depends` lets a cluster executor chain them as jobs. `run()` must
    return only once every rank has finished: the next run reads what this one wrote."""
    previous = None
    with _quiet_tqdm(), _default_sigterm(), _log_to(logs / "datatrove.log"):
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
def _log_to(path: Path):
    """datatrove's console output (pipeline listings, per-rank stats dumps) goes to the data stage's own log
    file, not the console of the run or job: its loggers write to whatever sys.stderr is when they are set up,
    in this process and in the ranks it forks."""
    from loguru import logger

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log, contextlib.redirect_stderr(log):
        logger.remove()
        logger.add(log)
        try:
            yield
        except Exception as err:
            err.add_note(f"datatrove's log (its ranks' tracebacks): {path}")
            raise
        finally:
            logger.remove()
            logger.add(sys.stderr)


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


def write_outputs(plan: Plan, num_read: int, out_dir: Path, work: Path) -> dict:
    """Move the per-rank splits, rejected rows and token-store shards of one row kind into `out_dir`; count
    every step (rows in, kept, rejected by reason) and hash the split shards, streaming over the files."""
    steps, kept = {}, num_read
    for step in ["normalise", *plan.steps]:
        reasons = _count_reasons(work / "rejected" / step)
        steps[step] = {"in": kept, "kept": kept - sum(reasons.values()), "rejected": sum(reasons.values())}
        steps[step]["reasons"] = dict(sorted(reasons.items()))
        kept = steps[step]["kept"]
    steps["pii"]["replaced"] = _pii_counts(work / "pii")
    steps["pii"]["detectors"] = plan.pii_detectors
    for step, stats in step_stats(plan.filters or FilterConfig(), work).items():
        steps[step] |= stats
    splits = {name: _count_rows(work / "splits" / name) for name in SPLITS}
    if kept != sum(splits.values()):
        raise RuntimeError(f"data: {kept} rows passed the last step but the splits hold {sum(splits.values())}")

    moves = [(work / "splits" / n, out_dir / n) for n in SPLITS]
    moves += [(work / "rejected" / step, out_dir / "rejected" / step) for step in ["normalise", *plan.steps]]
    moves.append((work / "tokens", out_dir / "tokens"))
    jsonl = []
    for folder, target in moves:
        if folder.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(folder, target)
            jsonl += sorted(target.rglob("*.jsonl"))
    return {
        "steps": steps,
        "splits": splits,
        "files": _hash_files(out_dir, jsonl),
        "shards": {n: [str(p.relative_to(out_dir)) for p in sorted((out_dir / n).glob("*.jsonl"))] for n in SPLITS},
    }


def _hash_files(root: Path, paths: list[Path]) -> dict[str, str]:
    return {str(Path(p).relative_to(root)): sha256_file(p) for p in paths}


def _count_rows(folder: Path) -> int:
    total = 0
    for path in sorted(Path(folder).rglob("*.jsonl")):
        with open(path, "rb") as f:
            total += sum(1 for line in f if line.strip())
    return total


def _count_reasons(folder: Path) -> Counter:
    reasons = Counter()
    for path in sorted(Path(folder).rglob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            reasons.update(reason_key(json.loads(line)["reason"]) for line in f if line.strip())
    return reasons


def _pii_counts(folder: Path) -> dict:
    totals = Counter()
    for path in sorted(folder.glob("*.json")):
        totals.update(json.loads(path.read_text()))
    return dict(sorted(totals.items()))


def _source_entry(src: SourceConfig, paths: list[Path | str], base_dir: Path, options: dict) -> dict:
    """The source's settings and, per file, its path and sha256; a URL's ETag and size too, checked against
    the listing's: a file replaced while the stage read it fails the stage."""
    entry = src.model_dump(mode="json", exclude_none=True)
    entry["files"] = []
    for p in paths:
        if not is_url(p):
            entry["files"].append({"path": _display(p, base_dir), "sha256": sha256_file(p)})
            continue
        info, sha = remote_info(p, options), sha256_input(p, options)
        if remote_info(p, options) != info:
            raise RuntimeError(f"data: {p} changed while the data stage read it; run the stage again")
        entry["files"].append(info | {"path": p, "sha256": sha})
    return entry


def _display(path: Path | str, base_dir: Path) -> str:
    if is_url(path):
        return path
    try:
        return str(path.relative_to(base_dir))
    except ValueError:
        return str(path)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _progress(callback: Callable[[dict], None] | None) -> Callable[..., None]:
    done, total = 0, 0

    def report(step: str, total_steps: int | None = None) -> None:
        nonlocal done, total
        done += 1
        total = total_steps or total
        if callback is not None:
            callback({"step": step, "done": done, "total": max(total, done)})

    return report
