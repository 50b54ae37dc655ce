"""hpcft's SFT training path against transformers' Trainer: tokens/s, peak memory and the loss, same run.

    .venv/bin/python -m bench.sft_vs_hf [--lora] [--shape small|llama-1b] [--vocab N] [--steps N]
                                        [--batch-size N] [--seq-len N] [--arms hf,hpcft] [--repeat N]
                                        [--json PATH]

Both arms train the same randomly initialised Llama (built from a LlamaConfig, seed 0, no network) on the
same batches of random token ids (every position labelled, the same batch at every step in both), with
the same AdamW (lr, betas, eps, weight decay on matrices only, constant lr, grad clip 1.0) and precision
(fp32 on CPU; on a GPU fp32 weights under bf16 autocast with the fused AdamW, what `bf16=True` does):
  hf            transformers.Trainer (peft LoRA with --lora), batches in order (no shuffling)
  hf-compile    the same with torch_compile=True (the whole model)
  hpcft         training.learner.Learner over parallel.trainer.Trainer, run by training.loop.train_loop:
                the code path of training/sft.py (token CE Objective, chunked linear + cross-entropy)
  hpcft-compile the same with parallel.compile (per decoder block)
Each arm runs in a fresh process, so its peak memory is its own: on a GPU torch.cuda.max_memory_allocated,
on CPU the resident set's high-water mark (ru_maxrss) minus the resident set before the model was built
(the interpreter and libraries, the same in both arms). tokens/s is the median step time's after
--warmup steps (with --repeat, each arm's fastest run is kept); MFU uses parallel.efficiency (GPU
only). The last line reads
`tokens/s ratio hpcft/HF: X  peak memory ratio: Y  final loss diff: Z`.

--vocab 128256 shows what the chunked loss saves: the [tokens, vocab] logits are most of the activations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "small": dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    # Llama-3.2-1B (../shared/notes/gpu-baseline.md), random weights.
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
}
DEFAULTS = {"small": dict(batch_size=8, seq_len=256, steps=8), "llama-1b": dict(batch_size=8, seq_len=2048, steps=15)}
OPTIM = dict(lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8, grad_clip=1.0)
LORA = dict(r=16, alpha=32)


def build_model(spec: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = SHAPES[spec["shape"]] | ({"vocab_size": spec["vocab"]} if spec["vocab"] else {})
    config = LlamaConfig(**shape, max_position_embeddings=max(spec["seq_len"], 128), pad_token_id=0)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    if spec["lora"]:
        from parallel import engine
        from parallel.dims import LoraConfig

        model = engine.apply_lora(model, LoraConfig(**LORA))
    return model


def batches(spec: dict, vocab: int) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(spec["steps"]):
        ids = torch.randint(1, vocab, (spec["batch_size"], spec["seq_len"]), generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Clock:
    """Per-step wall times (and this process's CPU times: on a CPU shared with other jobs, at --threads 1,
    the work a step does rather than how long it waited for a core); synchronises the GPU so a step's
    kernels are inside its time."""

    def __init__(self, cuda: bool):
        self.cuda, self.times, self.cpu_times, self.t0, self.cpu0 = cuda, [], [], 0.0, 0.0

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def start(self):
        self._sync()
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def stop(self):
        self._sync()
        self.times.append(time.perf_counter() - self.t0)
        self.cpu_times.append(time.process_time() - self.cpu0)


def run_hf(spec: dict, model, data: list[dict], clock: Clock, cuda: bool) -> list[float]:
    import tempfile

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    losses: list[float] = []

    class InOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.stop()

    rows = [{k: v[i] for k, v in batch.items()} for batch in data for i in range(spec["batch_size"])]
    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(
            output_dir=out_dir,
            per_device_train_batch_size=spec["batch_size"],
            max_steps=spec["steps"],
            learning_rate=OPTIM["lr"],
            weight_decay=OPTIM["weight_decay"],
            adam_beta1=OPTIM["betas"][0],
            adam_beta2=OPTIM["betas"][1],
            adam_epsilon=OPTIM["eps"],
            max_grad_norm=OPTIM["grad_clip"],
            lr_scheduler_type="constant",
            optim="adamw_torch_fused" if cuda else "adamw_torch",
            bf16=cuda,
            use_cpu=not cuda,
            torch_compile=spec["compile"],
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            seed=0,
        )
        InOrder(model=model, args=args, train_dataset=rows, callbacks=[Timing()]).train()
    return losses


def run_hpcft(spec: dict, model, data: list[dict], clock: Clock) -> list[float]:
    from types import SimpleNamespace

    from parallel.dims import ParallelConfig
    from training.config import OptimConfig
    from training.learner import Learner
    from training.loop import train_loop

    optim = OptimConfig(**OPTIM, warmup_steps=0, min_lr_ratio=1.0)
    learner = Learner.build(
        None,
        ParallelConfig(compile=spec["compile"], loss_chunk_tokens=None),
        mode="lora" if spec["lora"] else "full",
        optim=optim,
        num_updates=spec["steps"],
        model=model,
    )
    losses: list[float] = []

    def step(n: int) -> dict:
        clock.start()
        learner.update(data[n - 1])
        clock.stop()
        losses.append(learner.metrics.loss)
        return {"loss": learner.metrics.loss}

    cfg = SimpleNamespace(max_steps=spec["steps"], log_every=spec["steps"], eval_every=spec["steps"])
    train_loop(cfg, step, dict, lambda event: None, rate=("steps_per_s", 1))
    return losses


def child(spec: dict) -> dict:
    """One arm in this fresh process: build, train, time, measure."""
    import torch

    from parallel.efficiency import flops_per_token, mfu, peak_flops

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(spec["threads"])
    base_rss = rss_bytes()
    model = build_model(spec)
    config = (model.base_model.model if spec["lora"] else model).config
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = batches(spec, config.vocab_size)
    clock = Clock(cuda)
    if spec["arm"].startswith("hf"):
        losses = run_hf(spec, model, data, clock, cuda)
    else:
        losses = run_hpcft(spec, model.cuda() if cuda else model, data, clock)
    timed = clock.times[spec["warmup"] :] or clock.times
    cpu_timed = clock.cpu_times[spec["warmup"] :] or clock.cpu_times
    tokens_per_s = spec["batch_size"] * spec["seq_len"] / statistics.median(timed)
    flops = flops_per_token(config, spec["seq_len"], trainable_params=trainable if spec["lora"] else None)
    if cuda:
        peak_mem = torch.cuda.max_memory_allocated()
        device = torch.cuda.get_device_name()
    else:
        import resource

        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
        device = f"cpu ({spec['threads']} threads)"
    return {
        "arm": spec["arm"],
        "device": device,
        "tokens_per_s": tokens_per_s,
        "step_s": timed,
        "tokens_per_cpu_s": spec["batch_size"] * spec["seq_len"] / statistics.median(cpu_timed),
        "first_step_s": clock.times[0],
        "flops_per_token": flops,
        "mfu": mfu(tokens_per_s, flops, peak_flops(device)) if cuda else None,
        "peak_mem_bytes": peak_mem,
        "losses": losses,
    }


def measure(spec: dict) -> dict:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.sft_vs_hf", "--child", json.dumps(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"arm {spec['arm']}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict], spec: dict) -> dict:
    print(
        f"shape {spec['shape']}{' vocab ' + str(spec['vocab']) if spec['vocab'] else ''}"
        f"{' LoRA r=16' if spec['lora'] else ''}: batch {spec['batch_size']} x {spec['seq_len']} tokens, "
        f"{spec['steps']} steps ({spec['warmup']} warm-up), device {next(iter(results.values()))['device']}"
    )
    print(f"{'arm':14s} {'tokens/s':>10s} {'MFU':>6s} {'peak GiB':>9s} {'first step s':>12s} {'final loss':>11s}")
    for arm, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(
            f"{arm:14s} {r['tokens_per_s']:10,.0f} {mfu:>6s} {r['peak_mem_bytes'] / 2**30:9.3f} "
            f"{r['first_step_s']:12.2f} {r['losses'][-1]:11.6f}"
        )
    summary = {}
    if "hf" in results and "hpcft" in results:
        hf, ours = results["hf"], results["hpcft"]
        summary = {
            "tokens_per_s_ratio": ours["tokens_per_s"] / hf["tokens_per_s"],
            "peak_memory_ratio": ours["peak_mem_bytes"] / hf["peak_mem_bytes"],
            "tokens_per_cpu_s_ratio": ours["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"],
            "final_loss_diff": abs(ours["losses"][-1] - hf["losses"][-1]),
            "max_loss_diff": max(abs(a - b) for a, b in zip(ours["losses"], hf["losses"])),
        }
        print(
            f"tokens/s ratio hpcft/HF: {summary['tokens_per_s_ratio']:.2f}  "
            f"peak memory ratio: {summary['peak_memory_ratio']:.2f}  "
            f"final loss diff: {summary['final_loss_diff']:.1e}"
        )
        print(
            f"tokens per CPU-second ratio hpcft/HF: {summary['tokens_per_cpu_s_ratio']:.2f} (the work, not the waits)"
        )
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--vocab", type=int, default=0, help="override the shape's vocabulary size")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--arms", default="hf,hpcft", help="comma-separated: hf, hf-compile, hpcft, hpcft-compile")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads per arm")
    ap.add_argument("--repeat", type=int, default=1, help="run the arms this many times, keep each one's fastest")
    ap.add_argument("--json", type=Path, help="write the per-arm results and ratios here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    spec = {
        "shape": args.shape,
        "lora": args.lora,
        "vocab": args.vocab,
        "warmup": args.warmup,
        "threads": args.threads,
        **{k: getattr(args, k) or v for k, v in DEFAULTS[args.shape].items()},
    }
    arms = args.arms.split(",")
    for arm in arms:
        if arm not in ("hf", "hf-compile", "hpcft", "hpcft-compile"):
            raise SystemExit(f"--arms: unknown arm {arm!r}")
    results: dict[str, dict] = {}
    for _ in range(args.repeat):  # arms alternate, so a busy spell on a shared machine hits both
        for arm in arms:
            r = measure(spec | {"arm": arm, "compile": arm.endswith("-compile")})
            if arm not in results or r["tokens_per_s"] > results[arm]["tokens_per_s"]:
                results[arm] = r
    summary = report(results, spec)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"spec": spec, "arms": results, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
