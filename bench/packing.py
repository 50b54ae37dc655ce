"""SFT label tokens/s with and without packing, on a long-tailed length mix (same steps, same examples).

    .venv/bin/python -m bench.packing [--model tiny-llama] [--hidden N] [--steps 32] [--batch-size 8]
                                      [--seq-len 2048] [--rows 3000] [--repeat 2]

A token store of --rows chat rows (random ids in the tiny vocabulary, labels on the second half of each
row) with lognormal lengths, median ~300 and p99 ~2,000 tokens, cut at --seq-len, is trained on by a small
Llama (parallel.tiny TINY_CONFIGS[--model], max_position_embeddings raised to --seq-len, optionally a wider
--hidden) through training.sft.setup + sft_step, once with `packing: true` and once with `packing: false`,
each in a fresh process (the same seed, so the same examples in every step), alternating --repeat times;
each step's fastest time is kept. The first step is a warm-up; label tokens/s are over the remaining steps.
Printed: label tokens/s for both, the ratio packed/unpacked (goal >= 1.5), the largest difference between
the two loss curves, the tokens each layout computes per real token (rows x width of the batch tensors:
what packing can save), and the time of both on the short and on the long batches (the unpacked batch
wider than seq_len / 2).

Both layouts' batches come from training.batching.EpochBatches, which sorts chunks of 16 batches by length,
so unpacked batches already carry little padding; the script also prints the padding random (unsorted)
batches of the same size would carry, for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def build_model(name: str, out_dir: Path, max_positions: int, hidden: int | None) -> Path:
    """A randomly initialised Llama from TINY_CONFIGS[name] (hidden size and MLP width scaled when `hidden`
    is given), max_position_embeddings at least `max_positions`, with the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from parallel.tiny import TINY_CONFIGS, build_tokenizer

    tokenizer = build_tokenizer()
    shape = dict(TINY_CONFIGS[name])
    if hidden:
        shape["intermediate_size"] = shape["intermediate_size"] * hidden // shape["hidden_size"]
        shape["hidden_size"] = hidden
    shape["max_position_embeddings"] = max(max_positions, shape["max_position_embeddings"])
    config = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **shape
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def child(spec: dict) -> dict:
    """Fresh process: setup, then `steps` optimizer steps timed one by one; losses, label tokens and the
    shape of every step's batch."""
    import torch

    from parallel.dims import ParallelConfig
    from parallel.trainer import IGNORE_INDEX
    from training.batching import collate_packed
    from training.config import SFTStage
    from training.data import collate
    from training.sft import setup, sft_step

    torch.set_num_threads(spec["threads"])
    cfg = SFTStage(
        batch_size=spec["batch_size"],
        seq_len=spec["seq_len"],
        max_steps=spec["steps"],
        packing=spec["packing"],
        optim={"lr": 1e-3, "warmup_steps": 1},
    )
    started = time.perf_counter()
    s = setup(cfg, Path(spec["model"]), Path(spec["data"]), ParallelConfig(), seed=0)
    setup_seconds = time.perf_counter() - started
    steps = []
    for step in range(1, spec["steps"] + 1):
        examples = [s.train_examples[i] for i in s.train_batches(step - 1)]
        if s.packing:
            shape = collate_packed(examples, s.pad_id, s.cfg.seq_len, s.row_split)["input_ids"].shape
        else:
            shape = collate(examples, s.pad_id, s.pad_width)["input_ids"].shape
        labels = sum(int((np.asarray(ex.labels[1:]) != IGNORE_INDEX).sum()) for ex in examples)
        t0 = time.perf_counter()
        out = sft_step(s, step)
        steps.append(
            {
                "seconds": time.perf_counter() - t0,
                "loss": float(out["loss"]),
                "tokens": int(out["tokens"]),
                "label_tokens": labels,
                "rows": int(shape[0]),
                "width": int(shape[1]),
            }
        )
    return {"packing": s.packing, "setup": setup_seconds, "steps": steps}


def measure(spec: dict) -> dict:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.packing", "--child", json.dumps(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{spec}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(result: dict) -> dict:
    timed = result["steps"][1:] or result["steps"]
    seconds = sum(s["seconds"] for s in timed)
    labels = sum(s["label_tokens"] for s in timed)
    computed = sum(s["rows"] * s["width"] for s in timed)
    return {
        "label_tokens_per_s": labels / seconds,
        "seconds_per_step": seconds / len(timed),
        "computed_per_label": computed / labels,
        "computed_per_token": computed / sum(s["tokens"] for s in timed),
        "rows": np.mean([s["rows"] for s in timed]),
        "width": np.mean([s["width"] for s in timed]),
    }


def fastest_steps(results: list[dict]) -> dict:
    """One result from repeated runs of the same configuration: each step's fastest time (the steps compute
    the same thing every run; the fastest is the one least disturbed by other processes)."""
    steps = [dict(s) for s in results[0]["steps"]]
    for i, step in enumerate(steps):
        step["seconds"] = min(r["steps"][i]["seconds"] for r in results)
    return {**results[0], "steps": steps}


def random_batch_padding(data: Path, batch_size: int, seq_len: int, seed: int = 0) -> float:
    """Padded tokens / real tokens if the train rows were drawn into batches at random (no length sort)."""
    from data_tools.tokens import TokenSplit

    lengths = np.minimum(TokenSplit(data / "tokens" / "train", "chat").lengths("ids"), seq_len)
    order = np.random.default_rng(seed).permutation(len(lengths))
    order = order[: len(order) - len(order) % batch_size].reshape(-1, batch_size)
    batches = lengths[order]
    return float(batches.max(axis=1).sum() * batch_size / batches.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="a parallel.tiny TINY_CONFIGS name")
    parser.add_argument("--hidden", type=int, help="hidden size (MLP width scaled alike); default: the config's")
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps per run (the first is a warm-up)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=3000, help="rows in the generated token store")
    parser.add_argument("--repeat", type=int, default=2, help="alternate the two runs this many times; best kept")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (1: robust on a shared machine, where spinning OpenMP threads that wait for "
        "a busy core slow a step down by several times)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return

    from bench.data_scale import write_token_store
    from data_tools.tokens import TokenSplit
    from parallel.tiny import build_tokenizer

    started = time.perf_counter()
    print(f"cores: {os.cpu_count()}, load average now: {os.getloadavg()[0]:.1f} (other processes skew times)")
    with tempfile.TemporaryDirectory(prefix="hpcft-bench-packing-") as tmp:
        tmp = Path(tmp)
        model = build_model(args.model, tmp / "model", args.seq_len, args.hidden)
        splits = write_token_store(tmp / "data", int(args.rows * 420), build_tokenizer(), max_len=args.seq_len)
        train = np.minimum(TokenSplit(tmp / "data" / "tokens" / "train", "chat").lengths("ids"), args.seq_len)
        config = json.loads((model / "config.json").read_text())
        print(
            f"model: {args.model} hidden {config['hidden_size']}, {config['num_hidden_layers']} layers; store: "
            f"{splits['train']['rows']:,} train rows, lengths median {np.median(train):.0f}, p90 "
            f"{np.percentile(train, 90):.0f}, p99 {np.percentile(train, 99):.0f}, max {train.max()} (seq_len "
            f"{args.seq_len}); {args.steps} steps x batch {args.batch_size}",
            flush=True,
        )
        spec = {
            "model": str(model),
            "data": str(tmp / "data"),
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "threads": args.threads,
        }
        runs = {True: [], False: []}
        for i in range(args.repeat):
            for packing in (False, True):
                result = measure({**spec, "packing": packing})
                runs[packing].append(result)
                s = summary(result)
                print(
                    f"  run {i} packing={str(packing).lower():5s}: setup {result['setup']:.1f} s, "
                    f"{s['seconds_per_step']:.2f} s/step, {s['label_tokens_per_s']:,.0f} label tokens/s, "
                    f"batch {s['rows']:.1f} rows x {s['width']:.0f} wide on average",
                    flush=True,
                )
        best = {p: fastest_steps(runs[p]) for p in runs}
        packed, unpacked = summary(best[True]), summary(best[False])
        losses = {p: [s["loss"] for s in best[p]["steps"]] for p in best}
        diff = max(abs(a - b) for a, b in zip(losses[True], losses[False]))
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses[True], losses[False]))
        same = [s["label_tokens"] for s in best[True]["steps"]] == [s["label_tokens"] for s in best[False]["steps"]]
        random_pad = random_batch_padding(tmp / "data", args.batch_size, args.seq_len)
    short, long = [], []
    for u, k in zip(best[False]["steps"][1:], best[True]["steps"][1:]):
        (long if u["width"] > args.seq_len // 2 else short).append((u["seconds"], k["seconds"]))
    for name, group in (("short", short), (f"long (unpacked width > {args.seq_len // 2})", long)):
        if group:
            unp, pk = sum(g[0] for g in group), sum(g[1] for g in group)
            print(
                f"  {len(group)} {name} batches: unpacked {unp:.1f} s, packed {pk:.1f} s, "
                f"time packed/unpacked {pk / unp:.2f}"
            )
    print(f"\nlosses unpacked: {' '.join(f'{x:.5f}' for x in losses[False])}")
    print(f"losses packed:   {' '.join(f'{x:.5f}' for x in losses[True])}")
    print(
        f"tokens computed (batch rows x width) per real token: unpacked {unpacked['computed_per_token']:.3f}, "
        f"packed {packed['computed_per_token']:.3f}; random unsorted batches would pad to {random_pad:.3f}"
    )
    print(
        f"label tokens/s (each step's fastest of {args.repeat} runs, steps 2-{args.steps}, "
        f"{args.threads} torch thread(s)): unpacked "
        f"{unpacked['label_tokens_per_s']:,.0f}, packed {packed['label_tokens_per_s']:,.0f}"
    )
    ratio = packed["label_tokens_per_s"] / unpacked["label_tokens_per_s"]
    print(f"RATIO label tokens/s packed/unpacked: {ratio:.3f} (goal >= 1.5)")
    print(
        f"RATIO loss curves: max |packed - unpacked| {diff:.2e} (relative {rel:.2e}) over {args.steps} steps; "
        f"same label tokens per step: {same}"
    )
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    if not math.isfinite(diff):
        raise SystemExit("a loss was not finite")


if __name__ == "__main__":
    main()
