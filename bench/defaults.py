"""The per-device defaults (parallel.defaults) measured: each choice against the plain baseline, same run.

    .venv/bin/python -m bench.defaults [--shape small|llama-1b] [--device cpu|cuda] [--steps N] [--warmup N]
                                       [--batch-size N] [--seq-len N] [--vocab N] [--repeat N] [--threads N]
                                       [--arms base,compile,...] [--json PATH]

hpcft SFT steps (training.learner.Learner over parallel.trainer.Trainer, token CE, the bench.sft_vs_hf model
and batches) with one choice changed at a time:
  base          compile off, activation checkpointing none, torch's default AdamW kernel (the baseline)
  compile       parallel.compile: true (per decoder block); its first step, less a steady one, is the compile
  ac-selective  parallel.activation_checkpointing: selective
  ac-full       parallel.activation_checkpointing: full
  fused         parallel.fused_optimizer: true
and `optim`: AdamW alone on the model's parameters and first gradients, the for-loop, for-each and fused
kernels each stepping a copy in one process, timed and compared value by value.
Every arm is a fresh process; the arms alternate (--repeat rounds), so a busy spell on a shared machine does
not land on one arm; each arm keeps its fastest round. tokens/s: the median step after --warmup steps. Peak
memory: on a GPU torch.cuda.max_memory_allocated; on CPU the weights, buffers and optimizer state held plus
the allocator's peak during one more step (torch profiler alloc/free events). Losses are compared step by
step with the baseline's. The choices the numbers support are printed next to what parallel.defaults resolves
on this device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.sft_vs_hf import OPTIM, SHAPES, Clock, batches, build_model

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "base": dict(compile=False, activation_checkpointing="none", fused_optimizer=False),
    "compile": dict(compile=True, activation_checkpointing="none", fused_optimizer=False),
    "ac-selective": dict(compile=False, activation_checkpointing="selective", fused_optimizer=False),
    "ac-full": dict(compile=False, activation_checkpointing="full", fused_optimizer=False),
    "fused": dict(compile=False, activation_checkpointing="none", fused_optimizer=True),
}
DEFAULTS = {
    "small": dict(batch_size=4, seq_len=128, steps=6, vocab=8192),
    "llama-1b": dict(batch_size=8, seq_len=2048, steps=12, vocab=0),
}
OPTIM_STEPS = 5
KERNELS = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
EXACT = 1e-6  # the most a choice may move a loss or a weight (fp32 rounding over a few steps)
BREAK_EVEN_STEPS = 1000  # compile pays off if it wins its compile time back within this many steps


def peak_cpu_step(learner, batch) -> int:
    """Bytes held between steps (weights, buffers, optimizer state) plus the allocator's peak in one step."""
    from torch.profiler import ProfilerActivity, profile

    from bench.planner_vs_measured import _held_bytes, _peak_allocated

    held = _held_bytes(learner.trainer)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        learner.update(batch)
    return held + _peak_allocated(prof)


def train_child(spec: dict) -> dict:
    import torch

    from parallel.dims import ParallelConfig
    from training.config import OptimConfig
    from training.learner import Learner

    cuda = spec["device"] == "cuda"
    model = build_model(spec)
    data = batches(spec, model.config.vocab_size)
    if cuda:
        data = [{k: v.cuda() for k, v in b.items()} for b in data]
    learner = Learner.build(
        None,
        ParallelConfig(**ARMS[spec["arm"]]),
        mode="full",
        optim=OptimConfig(**OPTIM, warmup_steps=0, min_lr_ratio=1.0),
        num_updates=spec["steps"] + 1,
        model=model,
    )
    clock, losses = Clock(cuda), []
    for batch in data:
        clock.start()
        learner.update(batch)
        clock.stop()
        losses.append(learner.metrics.loss)
    steady = statistics.median(clock.times[spec["warmup"] :] or clock.times)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_cpu_step(learner, data[0])
    return {
        "arm": spec["arm"],
        "tokens_per_s": spec["batch_size"] * spec["seq_len"] / steady,
        "step_s": clock.times,
        "first_step_s": clock.times[0],
        "steady_step_s": steady,
        "peak_mem_bytes": peak,
        "losses": losses,
    }


def optim_child(spec: dict) -> dict:
    """AdamW's kernels on the model's own parameters and first gradients: each kernel steps a copy of them
    (one copy on the device at a time: a 1B model's weights, gradients and two moments are 20 GB)."""
    import time

    import torch

    cuda = spec["device"] == "cuda"
    model = build_model(spec).to("cuda" if cuda else "cpu")
    batch = {k: v.to(model.device) for k, v in batches(spec | {"steps": 1}, model.config.vocab_size)[0].items()}
    model(**batch).loss.backward()
    params = [(p.detach(), p.grad) for p in model.parameters() if p.requires_grad]
    del model, batch
    times, finals = {}, {}
    for kernel, kwargs in KERNELS.items():
        copies = [w.clone().requires_grad_() for w, _ in params]
        for c, (_, g) in zip(copies, params):
            c.grad = g.clone()
        groups = [
            {"params": [c for c in copies if c.ndim >= 2], "weight_decay": OPTIM["weight_decay"]},
            {"params": [c for c in copies if c.ndim < 2], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=OPTIM["lr"], betas=OPTIM["betas"], eps=OPTIM["eps"], **kwargs)
        times[kernel] = []
        for _ in range(OPTIM_STEPS + 1):  # the first step (state allocation) is left out
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            times[kernel].append(time.perf_counter() - t0)
        finals[kernel] = [c.detach().cpu() for c in copies]
        del opt, copies

    def max_diff(a: str, b: str) -> float:
        return max(float((x - y).abs().max()) for x, y in zip(finals[a], finals[b]))

    return {
        "arm": "optim",
        "params": sum(w.numel() for w, _ in params),
        "step_s": {k: statistics.median(v[1:]) for k, v in times.items()},
        "fused_vs_foreach": max_diff("fused", "foreach"),
        "fused_vs_for_loop": max_diff("fused", "for-loop"),
        "foreach_vs_for_loop": max_diff("foreach", "for-loop"),
    }


def child(spec: dict) -> dict:
    import torch

    if spec["device"] == "cpu":
        torch.set_num_threads(spec["threads"])
    return optim_child(spec) if spec["arm"] == "optim" else train_child(spec)


def measure(spec: dict) -> dict:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.defaults", "--child", json.dumps(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"arm {spec['arm']}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(arms: dict[str, dict]) -> dict[str, dict]:
    """Each arm against the baseline: tokens/s and peak memory ratios, the largest loss difference, and for
    compile its compile time and the steps it takes to win that time back."""
    base = arms["base"]
    out = {}
    for name, r in arms.items():
        row = {
            "tokens_per_s_ratio": r["tokens_per_s"] / base["tokens_per_s"],
            "peak_memory_ratio": r["peak_mem_bytes"] / base["peak_mem_bytes"],
            "max_loss_diff": max(abs(a - b) for a, b in zip(r["losses"], base["losses"])),
        }
        if name == "compile":
            row["compile_s"] = max(0.0, r["first_step_s"] - r["steady_step_s"])
            gain = base["steady_step_s"] - r["steady_step_s"]
            row["break_even_steps"] = row["compile_s"] / gain if gain > 0 else None
        out[name] = row
    return out


def choose(ratios: dict[str, dict], optim: dict | None) -> dict[str, tuple[object, str]]:
    """The value of each auto field these numbers support, and why."""
    choices = {}
    c = ratios.get("compile")
    if c is not None:
        exact = c["max_loss_diff"] <= EXACT
        pays = c["break_even_steps"] is not None and c["break_even_steps"] <= BREAK_EVEN_STEPS
        why = (
            f"steady {c['tokens_per_s_ratio']:.2f}x, compile {c['compile_s']:.0f} s"
            + (f", won back after {c['break_even_steps']:.0f} steps" if c["break_even_steps"] else ", never won back")
            + f", loss diff {c['max_loss_diff']:.1e}"
        )
        choices["compile"] = (exact and pays, why)
    ac = {mode: ratios[f"ac-{mode}"] for mode in ("selective", "full") if f"ac-{mode}" in ratios}
    if ac:
        parts = [
            f"{m} {r['tokens_per_s_ratio']:.2f}x tokens/s at {r['peak_memory_ratio']:.2f}x memory"
            for m, r in ac.items()
        ]
        choices["activation_checkpointing"] = ("none", "recompute only buys memory: " + "; ".join(parts))
    f = ratios.get("fused")
    if optim is not None and f is not None:
        s = optim["step_s"]
        speed = s["foreach"] / s["fused"], s["for-loop"] / s["fused"]
        exact = optim["fused_vs_foreach"] <= EXACT and optim["fused_vs_for_loop"] <= EXACT
        bitwise = optim["fused_vs_for_loop"] == 0.0 and f["max_loss_diff"] == 0.0
        why = (
            f"optimizer step {speed[0]:.2f}x for-each, {speed[1]:.2f}x for-loop; weights differ "
            f"{optim['fused_vs_foreach']:.1e} from for-each, {optim['fused_vs_for_loop']:.1e} from for-loop; "
            f"training step {f['tokens_per_s_ratio']:.2f}x, loss diff {f['max_loss_diff']:.1e}"
        )
        choices["fused_optimizer"] = (exact and min(speed) > 1.0, why + ("" if bitwise else " (not bitwise)"))
    return choices


def report(spec: dict, arms: dict[str, dict], ratios: dict, optim: dict | None, choices: dict) -> None:
    from parallel.defaults import resolve_defaults
    from parallel.dims import ParallelConfig

    print(
        f"shape {spec['shape']}{' vocab ' + str(spec['vocab']) if spec['vocab'] else ''}: batch "
        f"{spec['batch_size']} x {spec['seq_len']} tokens, {spec['steps']} steps ({spec['warmup']} warm-up), "
        f"device {spec['device']}{' (' + str(spec['threads']) + ' threads)' if spec['device'] == 'cpu' else ''}"
    )
    head = ("tokens/s", 9), ("ratio", 6), ("peak MiB", 9), ("ratio", 6), ("first s", 8), ("max |dloss|", 11)
    print(f"{'arm':13s} " + " ".join(f"{h:>{w}s}" for h, w in head))
    for name, r in arms.items():
        q = ratios[name]
        print(
            f"{name:13s} {r['tokens_per_s']:9,.0f} {q['tokens_per_s_ratio']:6.2f} {r['peak_mem_bytes'] / 2**20:9.1f} "
            f"{q['peak_memory_ratio']:6.2f} {r['first_step_s']:8.2f} {q['max_loss_diff']:11.1e}"
        )
    if optim is not None:
        times = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in optim["step_s"].items())
        print(
            f"AdamW step on {optim['params']:,} parameters: {times}; max |weight diff| after {OPTIM_STEPS + 1} "
            f"steps: fused-foreach {optim['fused_vs_foreach']:.1e}, fused-for-loop {optim['fused_vs_for_loop']:.1e}, "
            f"foreach-for-loop {optim['foreach_vs_for_loop']:.1e}"
        )
    resolved = resolve_defaults(ParallelConfig(), spec["device"])
    print(f"defaults on {spec['device']}: measured choice | parallel.defaults")
    for name, (value, why) in choices.items():
        rule = getattr(resolved.config, name)
        mark = "agree" if value == rule else "differs"
        print(f"  {name}: {value} | {rule} ({mark}): {why}; rule: {resolved.why[name]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--vocab", type=int, help="override the shape's vocabulary size (0: the shape's)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--arms", default=",".join([*ARMS, "optim"]), help="comma-separated, base first")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads per arm")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of all arms; each keeps its fastest")
    ap.add_argument("--json", type=Path, help="write the arms, ratios and choices here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench.defaults: --device cuda but torch sees no GPU")
    names = args.arms.split(",")
    if names[0] != "base" or any(n not in (*ARMS, "optim") for n in names):
        raise SystemExit(f"--arms: base first, then any of {', '.join([*ARMS, 'optim'])}")
    spec = {"shape": args.shape, "device": args.device, "warmup": args.warmup, "threads": args.threads, "lora": False}
    spec |= {k: v if getattr(args, k) is None else getattr(args, k) for k, v in DEFAULTS[args.shape].items()}
    arms, optim = {}, None
    for _ in range(args.repeat):
        for name in names:
            r = measure(spec | {"arm": name})
            if name == "optim":
                if optim is None or sum(r["step_s"].values()) < sum(optim["step_s"].values()):
                    optim = r
            elif name not in arms or r["tokens_per_s"] > arms[name]["tokens_per_s"]:
                if name in arms and name == "compile":  # the compile time is the first (cold) round's
                    r["first_step_s"] = arms[name]["first_step_s"]
                arms[name] = r
    ratios = compare(arms)
    choices = choose(ratios, optim)
    report(spec, arms, ratios, optim, choices)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"spec": spec, "arms": arms, "ratios": ratios, "optim": optim, "choices": choices}
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
