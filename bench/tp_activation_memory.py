"""What sequence and vocab parallelism buy under tensor parallelism: activation bytes kept for backward
per rank, and step time, against plain TP (and one process) in the same run.

    .venv/bin/python -m bench.tp_activation_memory [--tp 2] [--seq 512] [--vocab 32000] [--steps 3]

Activation bytes are measured, not estimated: every tensor autograd saves during one forward (+ loss)
is counted once per storage (saved_tensors_hooks), so the figure is exact on any device. On CPU the
step times only show the communication overhead of gloo; on GPUs run it with NCCL for real timings.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.distributed.tensor import DTensor

from parallel.dims import ParallelConfig
from parallel.distributed.launch import launch
from parallel.distributed.mesh import ParallelDims
from parallel.trainer import TOKEN_CE, Trainer, model_inputs, summed_ce


def build_model(vocab: int, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=3 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            pad_token_id=0,
        )
    )


def batch(rows: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (rows, seq), generator=gen)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


class SavedBytes:
    """Bytes of the distinct storages autograd keeps for backward while active."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        local = t._local_tensor if isinstance(t, DTensor) else t
        if local.device.type != "meta":
            storage = local.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _measure(trainer_or_model, data, *, distributed: bool) -> int:
    saved = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        if distributed:
            trainer = trainer_or_model
            sharded = trainer.vp
            logits = trainer.logits(data, vocab_sharded=sharded)
            from contextlib import nullcontext

            from torch.distributed.tensor.parallel import loss_parallel

            with loss_parallel() if sharded else nullcontext():
                loss = summed_ce(logits, data["labels"])
                loss.backward()
        else:
            logits = trainer_or_model(**model_inputs(data)).logits
            summed_ce(logits, data["labels"]).backward()
    return saved.total


def _rank(rank, world, args, layouts):
    out = {}
    data = batch(args.rows, args.seq, args.vocab)
    for name, cfg in layouts.items():
        mesh = ParallelDims.from_config(cfg, world).build_mesh("cpu")
        trainer = Trainer(build_model(args.vocab, args.hidden, args.layers), cfg, mesh)
        saved = _measure(trainer, data, distributed=True)
        for p in trainer.params:
            p.grad = None
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            trainer.train_step(data, TOKEN_CE)
            times.append(time.perf_counter() - start)
        out[name] = {"saved": saved, "step_s": min(times), "sp": trainer.sp, "vp": trainer.vp}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    model = build_model(args.vocab, args.hidden, args.layers)
    one = _measure(model, batch(args.rows, args.seq, args.vocab), distributed=False)
    layouts = {
        "tp (projections only)": ParallelConfig(tp=args.tp, sequence_parallel=False, vocab_parallel=False),
        "tp + sequence parallel": ParallelConfig(tp=args.tp, sequence_parallel=True, vocab_parallel=False),
        "tp + sequence + vocab parallel": ParallelConfig(tp=args.tp, sequence_parallel=True, vocab_parallel=True),
    }
    results = launch(_rank, args.tp, args, layouts, timeout=1800)[0]
    base = results["tp (projections only)"]
    print(
        f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.rows} x {args.seq} tokens; "
        f"tp={args.tp}"
    )
    print(f"{'layout':34s} {'saved MiB/rank':>15s} {'vs tp':>7s} {'vs 1 proc':>9s} {'step s':>8s} {'vs tp':>7s}")
    print(f"{'one process':34s} {one / 2**20:15.1f} {one / base['saved']:7.2f} {1:9.2f} {'':>8s} {'':>7s}")
    for name, r in results.items():
        print(
            f"{name:34s} {r['saved'] / 2**20:15.1f} {r['saved'] / base['saved']:7.2f} {r['saved'] / one:9.2f} "
            f"{r['step_s']:8.3f} {r['step_s'] / base['step_s']:7.2f}"
        )


if __name__ == "__main__":
    main()
