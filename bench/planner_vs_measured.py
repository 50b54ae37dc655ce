"""`hpcft plan`'s per-rank memory against the measured peak of real training steps on CPU, per layout.

    .venv/bin/python -m bench.planner_vs_measured [--seq 256] [--rows 4] [--vocab 16384] [--layouts one,zero3,tp]

How it is measured: torch has no allocator statistics for CPU memory, so each layout runs in freshly
forked ranks (parallel.distributed.launch) whose glibc malloc is told to serve every allocation above
64 KiB by mmap and to give freed memory back at once (mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD): the
resident set then follows the live tensors. A rank records its resident set before the model is built,
runs one training step (AdamW's state is created), resets the kernel's high-water mark
(/proc/self/clear_refs) and runs a second step: measured = the second step's high-water mark minus the
resident set before the model and minus the file-backed pages (library code) the steps made resident.
That is the steady state the planner describes (weights, optimizer state,
gradients, activations). Compute is fp32 (the CPU default), so the planner runs with dtype_bytes=4.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os

LAYOUTS = {
    "one": dict(),
    "zero3": dict(dp_shard=2, zero=3),
    "tp": dict(tp=2, dp_shard=2),
}


def shape(vocab: int, hidden: int, layers: int) -> dict:
    return dict(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def _malloc_follows_tensors() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (also stops glibc raising it dynamically)
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rank(rank: int, world: int, config: dict, layout: dict, rows: int, seq: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoConfig, AutoModelForCausalLM

    from parallel.dims import ParallelConfig
    from parallel.trainer import TOKEN_CE, Trainer, build_mesh

    _malloc_follows_tensors()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, config["vocab_size"], (rows, seq), generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    cfg = ParallelConfig(**layout)
    gc.collect()
    before, files = _status_kib("VmRSS"), _status_kib("RssFile")
    torch.manual_seed(0)
    values = {k: v for k, v in config.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **values))
    trainer = Trainer(model, cfg, build_mesh(cfg, world))
    del model
    trainer.train_step(batch, TOKEN_CE)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    held = _held_bytes(trainer)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step(batch, TOKEN_CE)
    # Library code pages the first steps touched are resident too (file-backed, not tensors): left out.
    code = _status_kib("RssFile") - files
    return {"allocator": held + _peak_allocated(prof), "rss": (_status_kib("VmHWM") - before - code) * 1024}


def _held_bytes(trainer) -> int:
    """Bytes of the distinct storages of the weights, buffers and optimizer state between steps."""
    from torch.distributed.tensor import DTensor

    tensors = [t for part in trainer.parts for t in [*part.parameters(), *part.buffers()]]
    tensors += [v for opt in trainer.optimizers if opt for s in opt.state.values() for v in s.values()]
    storages = {}
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def _peak_allocated(prof) -> int:
    """The highest net bytes the CPU allocator handed out during the profile (its alloc/free events)."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure(config: dict, layout: dict, rows: int, seq: int) -> int:
    """The largest per-rank peaks of the layout's ranks (bytes): allocator statistics, resident set."""
    from parallel.dims import ParallelConfig
    from parallel.distributed.launch import launch

    world = ParallelConfig(**layout).world_size
    results = launch(_rank, world, config, layout, rows, seq, timeout=1800)
    return max(r["allocator"] for r in results), max(r["rss"] for r in results)


def planned(config: dict, layout: dict, rows: int, seq: int):
    from parallel.dims import ParallelConfig
    from parallel.planner import estimate_memory

    cfg = ParallelConfig(**layout)
    return estimate_memory(config, cfg, seq_len=seq, micro_batch=rows // (cfg.dp * cfg.microbatches), dtype_bytes=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rows", type=int, default=4, help="global batch (sequences)")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--chunk-tokens", type=int, default=0, help="parallel.loss_chunk_tokens (0: whole logits)")
    args = ap.parse_args()
    import torch  # noqa: F401  (imported once here, before the ranks fork)
    import transformers  # noqa: F401

    config = shape(args.vocab, args.hidden, args.layers)
    print(
        f"llama shape: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; global batch "
        f"{args.rows} x {args.seq} tokens; fp32 on CPU; loss_chunk_tokens {args.chunk_tokens}"
    )
    print(
        f"{'layout':8s} {'planned MiB':>12s} {'measured MiB':>13s} {'error':>7s} {'RSS MiB':>8s}   planned parts (MiB)"
    )
    for name in args.layouts.split(","):
        layout = {**LAYOUTS[name], "loss_chunk_tokens": args.chunk_tokens}
        plan = planned(config, layout, args.rows, args.seq)
        got, rss = measure(config, layout, args.rows, args.seq)
        parts = ", ".join(
            f"{k} {getattr(plan, k) / 2**20:.1f}" for k in ("params", "gathered", "grads", "optimizer", "activations")
        )
        print(
            f"{name:8s} {plan.total / 2**20:12.1f} {got / 2**20:13.1f} {plan.total / got - 1:+7.1%} "
            f"{rss / 2**20:8.1f}   {parts}"
        )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
