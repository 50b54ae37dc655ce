"""Supervised fine-tuning on chat rows: setup, a train loop you can read top to bottom, save.

The engine (parallel/engine.py) owns the model layout, optimizer, schedule and the optimizer step;
this file owns the data, the loop, validation, progress events and the outputs.

Under torch.distributed with several ranks (the orchestrator starts one task per rank), every rank
runs this same function: each builds the same global batch for a step and the engine's
DistributedTrainer takes its slice, so losses equal one process's. Rank 0 alone writes the
checkpoint and result.json; every rank returns the same result dict.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from parallel import engine
from parallel.checkpoint import gather_full_state_dict, save_checkpoint
from parallel.dims import ParallelConfig
from parallel.distributed.checkpoint import OneProcessState
from training.config import SFTStage
from training.data import DataStats, StepBatches, chat_tokenizer, collate, eval_batches, load_split, micro_batches
from training.resume import Resumer
from training.resume import discard as discard_resume

Progress = Callable[[dict], None]


@dataclass
class Session:
    """Everything the loop needs, built once by `setup`.

    One process: model, optimizer and scheduler. Several: trainer (a DistributedTrainer) instead.
    """

    tokenizer: object
    runtime: engine.Runtime
    train_batches: StepBatches
    val_batches: list[dict[str, torch.Tensor]]
    pad_id: int
    data_stats: dict[str, DataStats]
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    trainer: object | None = None
    pad_width: int | None = None  # fixed batch width (pipeline stages need one shape), else per batch


def run_sft(
    cfg: SFTStage,
    *,
    model_dir: Path,
    data_dir: Path,
    out_dir: Path,
    parallel: ParallelConfig,
    seed: int,
    progress: Progress | None = None,
) -> dict:
    """Train, validate, write out_dir/checkpoint/ and out_dir/result.json; returns the result dict."""
    started = time.perf_counter()
    seed = cfg.seed if cfg.seed is not None else seed
    torch.manual_seed(seed)
    session = setup(cfg, Path(model_dir), Path(data_dir), parallel, seed)
    out_dir = Path(out_dir)
    result = train(cfg, session, progress or (lambda event: None), Resumer(out_dir, cfg.checkpoint_every))
    model = final_model(cfg, session, Path(model_dir))  # collective under several ranks
    if model is not None:  # one process, or rank 0
        save_checkpoint(model, session.tokenizer, out_dir / "checkpoint", base_model_dir=model_dir, mode=cfg.mode)
        trainable, total = engine.count_params(model)
        result.update(
            mode=cfg.mode,
            seed=seed,
            seconds=time.perf_counter() - started,
            trainable_params=trainable,
            total_params=total,
            device=str(session.runtime.device),
            world_size=parallel.world_size,
            data={name: vars(stats) for name, stats in session.data_stats.items()},
        )
        (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        discard_resume(out_dir)  # the stage is complete: nothing to resume
    return engine.from_rank0(result)


def setup(cfg: SFTStage, model_dir: Path, data_dir: Path, parallel: ParallelConfig, seed: int) -> Session:
    from transformers import AutoConfig

    # Fail on a bad layout before spending time on data.
    engine.check_layout(parallel, cfg.mode, AutoConfig.from_pretrained(model_dir))
    distributed = engine.is_distributed()
    if distributed:
        check_batch_split(cfg, parallel)
    tokenizer, pad_id = chat_tokenizer(model_dir, "SFT renders chat rows")
    train_examples, train_stats = load_split(data_dir / "train.jsonl", tokenizer, cfg.seq_len)
    val_examples, val_stats = load_split(data_dir / "validation.jsonl", tokenizer, cfg.seq_len)
    common = dict(
        tokenizer=tokenizer,
        runtime=engine.build_runtime(parallel),
        pad_id=pad_id,
        train_batches=StepBatches(train_examples, cfg.batch_size, seed),
        data_stats={"train": train_stats, "validation": val_stats},
    )
    lora = None if cfg.mode == "full" else cfg.lora.model_dump()
    quant = cfg.quant.model_dump() if cfg.mode == "qlora" else None
    opt = cfg.optim
    if distributed:
        trainer = engine.build_trainer(
            model_dir,
            parallel,
            mode=cfg.mode,
            lora=lora,
            lr=opt.lr,
            weight_decay=opt.weight_decay,
            betas=opt.betas,
            eps=opt.eps,
            grad_clip=opt.grad_clip,
            grad_accum=cfg.grad_accum,
            quant=quant,
        )
        pad_width = cfg.seq_len if parallel.pp > 1 else None
        return Session(
            **common,
            trainer=trainer,
            pad_width=pad_width,
            val_batches=distributed_val_batches(cfg, parallel, val_examples, pad_id, pad_width),
        )

    model = engine.build_model(model_dir, parallel, common["runtime"], lora=lora, quant=quant)
    optimizer = engine.build_optimizer(
        model, lr=opt.lr, weight_decay=opt.weight_decay, betas=opt.betas, eps=opt.eps, runtime=common["runtime"]
    )
    scheduler = engine.build_scheduler(
        optimizer, warmup_steps=opt.warmup_steps, max_steps=cfg.max_steps, min_lr_ratio=opt.min_lr_ratio
    )
    micro_size = cfg.batch_size // cfg.grad_accum
    return Session(
        **common,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        val_batches=eval_batches(val_examples, micro_size, pad_id),
    )


def check_batch_split(cfg: SFTStage, parallel: ParallelConfig) -> None:
    """Every dp rank runs parallel.microbatches x grad_accum equal micro-batches of the global batch."""
    parts = parallel.dp * parallel.microbatches * cfg.grad_accum
    if cfg.batch_size % parts:
        raise ValueError(
            f"batch_size: {cfg.batch_size} sequences do not split into dp={parallel.dp} x "
            f"parallel.microbatches={parallel.microbatches} x grad_accum={cfg.grad_accum} "
            f"equal micro-batches; use a multiple of {parts}"
        )


def distributed_val_batches(
    cfg: SFTStage, parallel: ParallelConfig, examples, pad_id: int, pad_width: int | None
) -> list[dict[str, torch.Tensor]]:
    """Validation batches that split evenly over the layout's ranks.

    Without pp: batches of one training micro-batch per dp rank. With pp: batches shaped exactly like
    a training batch, because pipeline stages keep the first shape they see (per train/eval mode).
    """
    rows = cfg.batch_size if parallel.pp > 1 else cfg.batch_size // (parallel.microbatches * cfg.grad_accum)
    return eval_batches(examples, rows, pad_id, fill=True, width=pad_width)


def train(cfg: SFTStage, s: Session, progress: Progress, resumer: Resumer | None = None) -> dict:
    """The loop: one optimizer step per global batch, logs every log_every, validation every eval_every,
    a resumable checkpoint every checkpoint_every; starts after the latest checkpoint when there is one
    (the batch of step s is a function of s, so the data picks up where it stopped)."""
    started = time.perf_counter()
    step_seconds, total_tokens, val_loss, train_loss = 0.0, 0, None, None
    window = {"losses": [], "tokens": 0, "seconds": 0.0}
    state = s.trainer if s.trainer is not None else OneProcessState(s.model, s.optimizer, s.scheduler)
    resumed = resumer.load(state) if resumer is not None else None
    first = 1 + (resumed["step"] if resumed else 0)
    if resumed:
        progress({"resumed_from_step": resumed["step"], "checkpoint": resumed["path"]})
    for step in range(first, cfg.max_steps + 1):
        t0 = time.perf_counter()
        metrics = train_step(cfg, s, step)
        seconds = time.perf_counter() - t0
        step_seconds += seconds
        total_tokens += metrics.num_tokens
        window["losses"].append(metrics.loss)
        window["tokens"] += metrics.num_tokens
        window["seconds"] += seconds
        last = step == cfg.max_steps
        if step % cfg.log_every == 0 or last:
            train_loss = sum(window["losses"]) / len(window["losses"])
            progress(
                {
                    "step": step,
                    "max_steps": cfg.max_steps,
                    "loss": train_loss,
                    "lr": metrics.lr,
                    "grad_norm": metrics.grad_norm,
                    "tokens_per_s": window["tokens"] / window["seconds"],
                    "elapsed_s": time.perf_counter() - started,
                }
            )
            window = {"losses": [], "tokens": 0, "seconds": 0.0}
        if step % cfg.eval_every == 0 or last:
            val_loss = validation_loss(s)
            progress({"step": step, "val_loss": val_loss})
        if resumer is not None and resumer.due(step, cfg.max_steps):
            t0 = time.perf_counter()
            state.step = step  # one optimizer step per loop step
            path = resumer.save(state, step)
            progress({"step": step, "checkpoint": str(path), "checkpoint_s": time.perf_counter() - t0})
    if val_loss is None:  # resumed after the last step's validation was written: measure it again
        val_loss = validation_loss(s)
    return {
        "final_loss": train_loss,
        "val_loss": val_loss,
        "steps": cfg.max_steps,
        "tokens": total_tokens,
        "train_seconds": step_seconds,
        "tokens_per_s": total_tokens / max(step_seconds, 1e-9),
        "resumed_from_step": resumed["step"] if resumed else None,
    }


def train_step(cfg: SFTStage, s: Session, step: int) -> engine.StepMetrics:
    """Optimizer step `step` (1-based) on its global batch, in one process or across the ranks."""
    examples = s.train_batches(step - 1)
    if s.trainer is None:
        batches = micro_batches(examples, cfg.grad_accum, s.pad_id)
        return engine.train_step(s.model, s.optimizer, s.scheduler, batches, s.runtime, grad_clip=cfg.optim.grad_clip)
    opt = cfg.optim
    lr = opt.lr * engine.lr_factor(
        step - 1, warmup_steps=opt.warmup_steps, max_steps=cfg.max_steps, min_lr_ratio=opt.min_lr_ratio
    )
    return engine.distributed_train_step(s.trainer, collate(examples, s.pad_id, s.pad_width), lr=lr)


def validation_loss(s: Session) -> float:
    if s.trainer is None:
        return engine.eval_loss(s.model, s.val_batches, s.runtime)
    return engine.distributed_eval_loss(s.trainer, s.val_batches)


def final_model(cfg: SFTStage, s: Session, model_dir: Path):
    """The trained model to save: the session's in one process; under several ranks a rebuilt plain
    (or peft) model from the gathered full state dict on rank 0, None on the other ranks."""
    if s.trainer is None:
        return s.model
    state = gather_full_state_dict(s.trainer)
    if state is None:
        return None
    return engine.rebuild_model(
        model_dir, state, None if cfg.mode == "full" else cfg.lora.model_dump(), adapters_only=cfg.mode == "qlora"
    )
