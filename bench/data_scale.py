"""Data at real size: does memory stay flat and time grow linearly as the data grows?

    .venv/bin/python -m bench.data_scale [--rows 8000] [--scale 10] [--tokens 5000000] [--tasks 1,2,4]
                                         [--parts abd] [--keep DIR]

(a) the data stage (data_tools.stage.run_data, tasks=2, default filters and dedup) on a generated JSONL
    source of --rows and --rows x --scale chat rows: wall time, the driver's peak RSS and the largest
    datatrove rank's peak RSS, and the ratios large/small (goal: peak RSS <= 1.3, time ~ --scale).
    Default 8,000 and 80,000 rows, not 20,000 and 200,000: on this 2-core machine, shared with other
    work, the stage does ~350-1,100 rows/s of these ~700-byte rows (PII scrub, Gopher/C4/FineWeb filters,
    exact + MinHash dedup, tokenization) depending on the load, so 200k rows alone take 3-9 minutes; with
    8k/80k the whole script takes 2.5-4.5 minutes. Pass `--rows 20000` for the full-size comparison.
    A 300-row run first warms the file cache; its time stands for the stage's fixed cost.
(b) SFT start-up (training.sft.setup: token store opened and checked, model built) plus one sft_step, on
    token stores of --tokens and --tokens x 10 tokens written directly (lognormal row lengths, median
    ~300, labels on the second half of each row, 5% validation as the data stage's default split):
    seconds from process start and the process's peak RSS, and the ratios large/small (goal <= 1.1), also
    at the end of setup (the step runs on a batch of about the mean tokens, picked alike in both stores).
(d) tokenization throughput with --tasks array tasks (datatrove ranks) on the --rows source, filters and
    dedup left on (the defaults): rows/s of the whole stage, of its last run (format_split: MinHash
    filter, chat template + tokenization, split, JSONL and token-store writers), and of the tokenizer
    step alone per task-second (datatrove's stats). The 2-task run of (a) is reused.

Every measured configuration runs in a fresh subprocess (`--child`), so ru_maxrss (RUSAGE_SELF for the
process, RUSAGE_CHILDREN for the largest forked rank) belongs to that configuration alone. The rows are
generated from a pool of random pseudo-word sentences with lognormal counts per turn (1-2 turns, some
multi-paragraph answers), so nearly every row is unique and passes the quality filters; `format.max_tokens`
is raised to 8192 so that long rows are kept (the byte-level tiny tokenizer makes a token per byte).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STOP_WORDS = (
    "the be to of and a in that have it for not on with he as you do at this but his by from they we say her "
    "she or an will my one all would there their what so up out if about who get which go me when make can"
).split()
MAX_TOKENS = 8192  # format.max_tokens of the stage runs: long generated rows are kept, not rejected


# ---- generated data ----------------------------------------------------------------------------------


def _sentences(rng: np.random.Generator, count: int) -> list[str]:
    """`count` random sentences of 4-20 words: pseudo-words from a syllable vocabulary, a third stop words."""
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "st", "ch", "sh", "er", "an", "on"]
    vocab = set()
    while len(vocab) < 6000:
        vocab.add("".join(rng.choice(syllables, int(rng.integers(1, 4)))))
    words = np.array(sorted(vocab) + STOP_WORDS * 60)  # ~1/3 of the draws are stop words
    lengths = rng.integers(4, 21, count)
    drawn = words[rng.integers(0, len(words), int(lengths.sum()))].tolist()
    ends = rng.choice([".", ".", ".", "?", "!"], count).tolist()
    out, at = [], 0
    for n, end in zip(lengths.tolist(), ends):
        part = drawn[at : at + n]
        at += n
        out.append(part[0].capitalize() + " " + " ".join(part[1:]) + end)
    return out


def write_chat_source(path: Path, rows: int, seed: int = 0) -> dict:
    """A JSONL file of `rows` chat rows ({"id", "messages"}); returns its size and rows."""
    rng = np.random.default_rng(seed)
    pool = _sentences(rng, max(50_000, 2 * rows))
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            messages = []
            for _ in range(1 if rng.random() < 0.8 else 2):
                for role, median in (("user", 1.5), ("assistant", 4.0)):
                    n = int(min(60, max(1, round(rng.lognormal(np.log(median), 0.9)))))
                    picked = [pool[j] for j in rng.integers(0, len(pool), n).tolist()]
                    if role == "assistant" and n > 6 and rng.random() < 0.5:  # a few paragraphs
                        cut = sorted(set(rng.integers(1, n, 2).tolist()))
                        parts = np.split(np.array(picked, dtype=object), cut)
                        content = "\n\n".join(" ".join(p) for p in parts)
                    else:
                        content = " ".join(picked)
                    messages.append({"role": role, "content": content})
            f.write(json.dumps({"id": f"row-{seed}-{i}", "messages": messages}) + "\n")
    return {"rows": rows, "bytes": path.stat().st_size}


def write_token_store(
    data_dir: Path, tokens: int, tokenizer, seed: int = 0, validation: float = 0.05, max_len: int = 4096
) -> dict:
    """A data-stage token store of about `tokens` tokens (train + validation) under data_dir/tokens/: random
    ids in the tokenizer's vocabulary, labels on the second half of each row, row lengths lognormal (median
    300, p99 ~2,000, at most `max_len`); train in two rank shards like a tasks=2 data stage."""
    from data_tools.tokens import ShardWriter, write_meta

    rng = np.random.default_rng(seed)
    sigma = np.log(2000 / 300) / 2.326
    lengths = np.clip(rng.lognormal(np.log(300), sigma, int(tokens / 300 * 1.5)), 16, max_len).astype(np.int64)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), tokens)) + 1]
    vocab = len(tokenizer)
    store = Path(data_dir) / "tokens"
    writers = {
        ("train", 0): ShardWriter(store / "train" / "00000", "chat", vocab),
        ("train", 1): ShardWriter(store / "train" / "00001", "chat", vocab),
        ("validation", 0): ShardWriter(store / "validation" / "00000", "chat", vocab),
    }
    split = rng.random(len(lengths)) < validation
    keys = rng.integers(0, 2**63, len(lengths), dtype=np.int64).astype(np.uint64)
    chunk = 1 << 22
    ids_pool = rng.integers(0, vocab, chunk + max_len)
    for i, n in enumerate(lengths.tolist()):
        start = int(rng.integers(0, chunk))
        ids = ids_pool[start : start + n]
        labels = np.zeros(n, dtype=np.uint8)
        labels[n // 2 :] = 1
        writer = writers[("validation", 0)] if split[i] else writers[("train", i % 2)]
        writer.add({"ids": ids, "labels": labels}, int(keys[i]))
    for writer in writers.values():
        writer.close()
    meta = write_meta(store, "chat", tokenizer, tokenizer.chat_template, "tokenizer")
    return {name: {k: v for k, v in split.items() if k != "shards"} for name, split in meta["splits"].items()}


def build_model(name: str, out_dir: Path, max_positions: int) -> Path:
    """parallel.tiny.build_tiny_model, its config's max_position_embeddings raised to `max_positions`."""
    from parallel.tiny import build_tiny_model

    build_tiny_model(name, out_dir, seed=0)
    config = json.loads((out_dir / "config.json").read_text())
    config["max_position_embeddings"] = max(max_positions, config["max_position_embeddings"])
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


# ---- the measured children -----------------------------------------------------------------------------


def _peaks() -> dict:
    """Peak RSS in MiB of this process and of its largest waited-for descendant (Linux: ru_maxrss in KiB),
    and the CPU seconds (user + system) of both together."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "rss_mib": round(own.ru_maxrss / 1024, 1),
        "child_rss_mib": round(children.ru_maxrss / 1024, 1),
        "cpu_s": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
    }


def _rss_now() -> dict:
    """Resident MiB now, anonymous and file-backed (mapped files such as the token store's .bin)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile") if k in fields}


class _TimedExecutor:
    """Wraps a datatrove executor to record how long each run's run() takes."""

    def __init__(self, inner, name: str, seconds: dict):
        self.inner, self.name, self.seconds = inner, name, seconds

    def run(self):
        started = time.perf_counter()
        self.inner.run()
        self.seconds[self.name] = self.seconds.get(self.name, 0.0) + time.perf_counter() - started

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


def child_stage(spec: dict) -> dict:
    """One data-stage run (fresh process): wall seconds, peak RSS, seconds per datatrove run, counts."""
    started = time.perf_counter()
    from data_tools.config import DataConfig
    from data_tools.stage import local_executor, run_data

    run_seconds: dict[str, float] = {}

    def factory(pipeline, logging_dir, tasks, depends=None):
        inner = depends.inner if isinstance(depends, _TimedExecutor) else depends
        name = f"{Path(logging_dir).parent.parent.name}/{Path(logging_dir).name}"
        return _TimedExecutor(local_executor(pipeline, logging_dir, tasks, depends=inner), name, run_seconds)

    out = Path(spec["out"])
    cfg = DataConfig(sources=[{"path": spec["source"]}], tasks=spec["tasks"], format={"max_tokens": MAX_TOKENS})
    manifest = run_data(cfg, Path(spec["tokenizer"]), out, base_dir=out.parent, executor_factory=factory)
    seconds = time.perf_counter() - started
    tokenize = {"task_seconds": 0.0, "rows": 0}
    stats_path = out / "work" / "chat" / "logs" / "format_split" / "stats.json"
    for step in json.loads(stats_path.read_text()):
        if "Chat template" in step["name"] and isinstance(step["time_stats"], dict):
            tokenize = {"task_seconds": step["time_stats"]["total"], "rows": step["time_stats"]["n"]}
    return {
        "seconds": seconds,
        **_peaks(),
        "runs": run_seconds,
        "tokenize": tokenize,
        "kept": manifest["steps"]["chat_format"]["kept"],
        "read": manifest["steps"]["normalise"]["in"],
        "rejected": {k: v["rejected"] for k, v in manifest["steps"].items() if v["rejected"]},
        "tokens": sum(s["tokens"] for s in manifest.get("tokens", {}).values()),
    }


def child_sft(spec: dict) -> dict:
    """training.sft.setup + one sft_step (fresh process): seconds from spawn, per phase, and peak RSS."""
    from parallel.dims import ParallelConfig
    from training.config import SFTStage
    from training.sft import setup, sft_step

    imported = time.time()
    cfg = SFTStage(batch_size=spec["batch_size"], seq_len=spec["seq_len"], max_steps=1000)
    session = setup(cfg, Path(spec["model"]), Path(spec["data"]), ParallelConfig(), seed=0)
    set_up = time.time()
    setup_rss, rss_now = _peaks()["rss_mib"], _rss_now()
    val_mib = sum(t.nbytes for batch in session.val_batches for t in batch.values()) / 2**20
    # The step: the first whose batch holds the mean batch's tokens +-10%, so that both stores step on a
    # like batch (a step's time and memory follow the lengths of its rows).
    lengths = session.train_examples.lengths
    target = cfg.batch_size * float(lengths.mean())
    step = next(
        (n for n in range(1, 1001) if abs(int(lengths[session.train_batches(n - 1)].sum()) - target) <= 0.1 * target),
        1,
    )
    picked = time.time()
    out = sft_step(session, step)
    stepped = time.time()
    return {
        "seconds": stepped - spec["spawned"] - (picked - set_up),
        "to_setup": set_up - spec["spawned"],
        "imports": imported - spec["spawned"],
        "setup": set_up - imported,
        "step": stepped - picked,
        "step_tokens": out["tokens"],
        "step_index": step,
        "val_batches_mib": val_mib,
        "setup_rss_now": rss_now,
        "train_examples": len(session.train_examples),
        "val_batches": len(session.val_batches),
        "setup_rss_mib": setup_rss,
        **_peaks(),
    }


CHILDREN = {"stage": child_stage, "sft": child_sft}


def measure(kind: str, spec: dict) -> dict:
    """Run one configuration in a fresh interpreter and return its result (the last stdout line)."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    load = os.getloadavg()[0]
    spec = {**spec, "spawned": time.time()}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.data_scale", "--child", kind, json.dumps(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} {spec}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - started
    result["load"] = load
    return result


# ---- the parts ------------------------------------------------------------------------------------------


def _stage(tmp: Path, source: Path, tasks: int, label: str) -> dict:
    result = measure(
        "stage", {"source": str(source), "tasks": tasks, "tokenizer": str(tmp / "tokenizer"), "out": str(tmp / label)}
    )
    rejected = ", ".join(f"{k} {v}" for k, v in result["rejected"].items()) or "none"
    print(
        f"  {label}: {result['read']:,} rows, tasks={tasks}: {result['seconds']:.1f} s "
        f"({result['read'] / result['seconds']:.0f} rows/s, {result['cpu_s']:.0f} CPU s, load before "
        f"{result['load']:.1f}), driver peak RSS {result['rss_mib']:.0f} MiB, "
        f"largest rank {result['child_rss_mib']:.0f} MiB; kept {result['kept']:,} ({result['tokens']:,} tokens), "
        f"rejected: {rejected}",
        flush=True,
    )
    return result


def part_a(tmp: Path, rows: int, scale: int, sources: dict[int, Path]) -> dict:
    print(f"\n(a) data stage, tasks=2, default filters + dedup, {rows:,} vs {rows * scale:,} rows", flush=True)
    write_chat_source(tmp / "source-warmup.jsonl", 300, seed=1)
    # Warms the file cache; its time is the stage's fixed cost (imports, a process pool per run, 14 MinHash
    # bucket tasks), which the second time ratio leaves out.
    warm = _stage(tmp, tmp / "source-warmup.jsonl", 2, "stage-warmup")
    small = _stage(tmp, sources[rows], 2, f"stage-{rows}-t2")
    large = _stage(tmp, sources[rows * scale], 2, f"stage-{rows * scale}-t2")
    slowest = sorted(large["runs"].items(), key=lambda kv: -kv[1])[:3]
    print("  slowest runs at the large size: " + ", ".join(f"{k} {v:.1f} s" for k, v in slowest))
    fixed = warm["seconds"]
    print(
        f"RATIO (a) data stage {scale}x/1x rows: driver peak RSS {large['rss_mib'] / small['rss_mib']:.3f}, "
        f"largest rank peak RSS {large['child_rss_mib'] / small['child_rss_mib']:.3f} (goal <= 1.3)"
    )
    fixed_cpu = warm["cpu_s"]
    print(
        f"RATIO (a) data stage {scale}x/1x rows: time {large['seconds'] / small['seconds']:.2f}, CPU seconds "
        f"{large['cpu_s'] / small['cpu_s']:.2f}; less the fixed cost ({fixed:.1f} s, {fixed_cpu:.0f} CPU s): time "
        f"{(large['seconds'] - fixed) / (small['seconds'] - fixed):.2f}, CPU seconds "
        f"{(large['cpu_s'] - fixed_cpu) / (small['cpu_s'] - fixed_cpu):.2f} (expect ~{scale})"
    )
    return small


def part_b(tmp: Path, tokens: int) -> None:
    from parallel.tiny import build_tokenizer

    seq_len, batch = 2048, 4
    model = build_model("tiny-llama", tmp / "model", seq_len)
    tokenizer = build_tokenizer()
    print(
        f"\n(b) SFT start-up (setup + 1 sft_step, tiny-llama, seq_len {seq_len}, batch {batch}, packing on), "
        f"{tokens:,} vs {tokens * 10:,} token stores",
        flush=True,
    )
    spec = {"model": str(model), "seq_len": seq_len, "batch_size": batch}
    write_token_store(tmp / "store-warmup", 100_000, tokenizer)
    measure("sft", {**spec, "data": str(tmp / "store-warmup")})  # warm the file cache; not reported
    results = []
    for size in (tokens, tokens * 10):
        data = tmp / f"store-{size}"
        started = time.perf_counter()
        splits = write_token_store(data, size, tokenizer)
        written = time.perf_counter() - started
        r = measure("sft", {**spec, "data": str(data)})
        results.append(r)
        where = ", ".join(f"{k} {v['rows']:,} rows / {v['tokens']:,} tokens" for k, v in splits.items())
        print(
            f"  {size:,} tokens ({where}; written in {written:.1f} s): {r['seconds']:.2f} s from spawn "
            f"(imports {r['imports']:.2f}, setup {r['setup']:.2f}, step {r['step']:.2f} on {r['step_tokens']:,} "
            f"tokens, step {r['step_index']}), peak RSS {r['rss_mib']:.0f} MiB; at the end of setup: peak "
            f"{r['setup_rss_mib']:.0f} MiB, resident {r['setup_rss_now']['RssAnon']:.0f} MiB anonymous + "
            f"{r['setup_rss_now']['RssFile']:.0f} MiB file-backed, of which {r['val_batches']} validation "
            f"batches hold {r['val_batches_mib']:.0f} MiB",
            flush=True,
        )
    small, large = results
    print(
        f"RATIO (b) SFT start-up 10x/1x tokens: spawn->setup+step {large['seconds'] / small['seconds']:.3f}, "
        f"peak RSS {large['rss_mib'] / small['rss_mib']:.3f}; spawn->end of setup "
        f"{large['to_setup'] / small['to_setup']:.3f}, peak RSS at end of setup "
        f"{large['setup_rss_mib'] / small['setup_rss_mib']:.3f} (goal <= 1.1 each)"
    )


def part_d(tmp: Path, rows: int, source: Path, tasks: list[int], reuse: dict) -> None:
    cores = os.cpu_count()
    print(f"\n(d) tokenization throughput by array tasks, {rows:,} rows, filters + dedup on; {cores} cores", flush=True)
    results = {}
    for t in tasks:
        results[t] = reuse[t] if t in reuse else _stage(tmp, source, t, f"stage-{rows}-t{t}")
    base = tasks[0]
    for t, r in results.items():
        fmt = r["runs"].get("chat/format_split", float("nan"))
        tok = r["tokenize"]
        per_task = tok["rows"] / tok["task_seconds"] if tok["task_seconds"] else float("nan")
        print(
            f"  tasks={t}: stage {r['read'] / r['seconds']:.0f} rows/s; format_split run {r['kept'] / fmt:.0f} "
            f"rows/s ({fmt:.1f} s); tokenizer step {per_task:.0f} rows per task-second"
        )
    for t in tasks[1:]:
        a, b = results[base], results[t]
        fa, fb = a["runs"]["chat/format_split"], b["runs"]["chat/format_split"]
        print(
            f"RATIO (d) tasks={t}/tasks={base}: stage rows/s {a['seconds'] / b['seconds']:.2f}, "
            f"format_split rows/s {fa / fb:.2f}"
        )
    print(
        "  (with tasks=1 the local executor runs the rank inside the driver, so the driver's peak RSS holds the "
        "rank's; 'load before' counts other processes too: on a shared machine the ranks may not get a core each)"
    )
    if any(t > (cores or 1) for t in tasks):
        print(
            f"  note: this machine has {cores} cores and the local executor runs at most one rank per core, so "
            f"tasks > {cores} cannot beat tasks={cores} (extra ranks queue behind the first ones)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8_000, help="rows of the 1x source for (a) and (d)")
    parser.add_argument("--scale", type=int, default=10, help="(a): the larger source has rows x scale rows")
    parser.add_argument("--tokens", type=int, default=5_000_000, help="(b): tokens of the small store (large: x10)")
    parser.add_argument("--tasks", default="1,2,4", help="(d): array tasks to compare (the first is the baseline)")
    parser.add_argument("--parts", default="abd", help="which of a, b, d to run")
    parser.add_argument("--keep", type=Path, help="keep the generated data and outputs in this folder")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))), flush=True)
        return

    started = time.perf_counter()
    tmp_ctx = tempfile.TemporaryDirectory(prefix="hpcft-bench-data-") if args.keep is None else None
    tmp = Path(tmp_ctx.name) if tmp_ctx else args.keep
    tmp.mkdir(parents=True, exist_ok=True)
    tasks = [int(t) for t in args.tasks.split(",")]
    try:
        print(f"cores: {os.cpu_count()}, load average now: {os.getloadavg()[0]:.1f} (other processes skew times)")
        sources = {}
        if "a" in args.parts or "d" in args.parts:
            from parallel.tiny import build_tokenizer

            build_tokenizer().save_pretrained(tmp / "tokenizer")
            for rows in sorted({args.rows, args.rows * args.scale} if "a" in args.parts else {args.rows}):
                t0 = time.perf_counter()
                sources[rows] = tmp / f"source-{rows}.jsonl"
                info = write_chat_source(sources[rows], rows)
                print(
                    f"generated {rows:,} rows ({info['bytes'] / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s",
                    flush=True,
                )
        reuse = {}
        if "a" in args.parts:
            reuse[2] = part_a(tmp, args.rows, args.scale, sources)
        if "b" in args.parts:
            part_b(tmp, args.tokens)
        if "d" in args.parts:
            part_d(tmp, args.rows, sources[args.rows], tasks, reuse)
    finally:
        if tmp_ctx:
            tmp_ctx.cleanup()
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
