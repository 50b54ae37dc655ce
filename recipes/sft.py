"""Supervised fine-tuning on chat rows: setup, a train loop you can read top to bottom, save.

The engine (parallel/engine.py) owns the model layout, optimizer, schedule and the optimizer step;
this file owns the data, the loop, validation, progress events and the outputs.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from parallel import engine
from parallel.checkpoint import save_checkpoint
from parallel.dims import ParallelConfig
from recipes.config import SFTStage
from recipes.data import DataStats, StepBatches, eval_batches, load_split, micro_batches

Progress = Callable[[dict], None]


@dataclass
class Session:
    """Everything the loop needs, built once by `setup`."""

    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    runtime: engine.Runtime
    train_batches: StepBatches
    val_batches: list[dict[str, torch.Tensor]]
    pad_id: int
    data_stats: dict[str, DataStats]


def run_sft(cfg: SFTStage, *, model_dir: Path, data_dir: Path, out_dir: Path, parallel: ParallelConfig,
            seed: int, progress: Progress | None = None) -> dict:
    """Train, validate, write out_dir/checkpoint/ and out_dir/result.json; returns the result dict."""
    started = time.perf_counter()
    seed = cfg.seed if cfg.seed is not None else seed
    torch.manual_seed(seed)
    session = setup(cfg, Path(model_dir), Path(data_dir), parallel, seed)
    result = train(cfg, session, progress or (lambda event: None))
    out_dir = Path(out_dir)
    save_checkpoint(session.model, session.tokenizer, out_dir / "checkpoint", base_model_dir=model_dir,
                    mode=cfg.mode)
    trainable, total = engine.count_params(session.model)
    result.update(
        mode=cfg.mode, seed=seed, seconds=time.perf_counter() - started, trainable_params=trainable,
        total_params=total, device=str(session.runtime.device),
        data={name: vars(stats) for name, stats in session.data_stats.items()},
    )
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def setup(cfg: SFTStage, model_dir: Path, data_dir: Path, parallel: ParallelConfig, seed: int) -> Session:
    from transformers import AutoTokenizer

    engine.check_layout(parallel)  # fail on a bad layout before spending time on data
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise ValueError(f"model {model_dir}: the tokenizer has no chat template; SFT renders chat rows with it")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_examples, train_stats = load_split(data_dir / "train.jsonl", tokenizer, cfg.seq_len)
    val_examples, val_stats = load_split(data_dir / "validation.jsonl", tokenizer, cfg.seq_len)
    micro_size = cfg.batch_size // cfg.grad_accum

    runtime = engine.build_runtime(parallel)
    lora = None if cfg.mode == "full" else cfg.lora.model_dump()
    model = engine.build_model(model_dir, parallel, runtime, lora=lora)
    opt = cfg.optim
    optimizer = engine.build_optimizer(model, lr=opt.lr, weight_decay=opt.weight_decay, betas=opt.betas,
                                       eps=opt.eps, runtime=runtime)
    scheduler = engine.build_scheduler(optimizer, warmup_steps=opt.warmup_steps, max_steps=cfg.max_steps,
                                       min_lr_ratio=opt.min_lr_ratio)
    return Session(
        model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler, runtime=runtime,
        train_batches=StepBatches(train_examples, cfg.batch_size, seed),
        val_batches=eval_batches(val_examples, micro_size, pad_id), pad_id=pad_id,
        data_stats={"train": train_stats, "validation": val_stats},
    )


def train(cfg: SFTStage, s: Session, progress: Progress) -> dict:
    """The loop: one optimizer step per global batch, logs every log_every, validation every eval_every."""
    started = time.perf_counter()
    step_seconds, total_tokens, val_loss = 0.0, 0, None
    window = {"losses": [], "tokens": 0, "seconds": 0.0}
    for step in range(1, cfg.max_steps + 1):
        batch = micro_batches(s.train_batches(step - 1), cfg.grad_accum, s.pad_id)
        t0 = time.perf_counter()
        metrics = engine.train_step(s.model, s.optimizer, s.scheduler, batch, s.runtime,
                                    grad_clip=cfg.optim.grad_clip)
        seconds = time.perf_counter() - t0
        step_seconds += seconds
        total_tokens += metrics.num_tokens
        window["losses"].append(metrics.loss)
        window["tokens"] += metrics.num_tokens
        window["seconds"] += seconds
        last = step == cfg.max_steps
        if step % cfg.log_every == 0 or last:
            train_loss = sum(window["losses"]) / len(window["losses"])
            progress({"step": step, "max_steps": cfg.max_steps, "loss": train_loss, "lr": metrics.lr,
                      "grad_norm": metrics.grad_norm, "tokens_per_s": window["tokens"] / window["seconds"],
                      "elapsed_s": time.perf_counter() - started})
            window = {"losses": [], "tokens": 0, "seconds": 0.0}
        if step % cfg.eval_every == 0 or last:
            val_loss = engine.eval_loss(s.model, s.val_batches, s.runtime)
            progress({"step": step, "val_loss": val_loss})
    return {"final_loss": train_loss, "val_loss": val_loss, "steps": cfg.max_steps, "tokens": total_tokens,
            "train_seconds": step_seconds, "tokens_per_s": total_tokens / step_seconds}
