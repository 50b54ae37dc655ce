"""Supervised fine-tuning on chat rows: setup, one optimizer step per global batch, the shared loop, save.

The engine's Trainer (through training.learner.Learner) owns the model layout, optimizer and the optimizer
step in one process and under every layout; this file owns the data, the step, validation and outputs.
Under torch.distributed with several ranks (the orchestrator starts one task per rank), every rank runs
this same function: each builds the same global batch for a step and the Trainer takes its slice, so
losses equal one process's. Rank 0 alone writes the checkpoint and result.json; every rank returns the
same result dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from parallel import engine
from parallel.dims import ParallelConfig
from training.batching import collate_packed, resolve_max_steps
from training.config import SFTStage
from training.data import ChatExamples, DataStats, EpochBatches, chat_tokenizer, collate, eval_batches, load_split
from training.learner import Learner
from training.loop import train_one
from training.resume import Resumer
from training.skeleton import StageRun, adapters, check_stage
from training.stages import packs

Progress = Callable[[dict], None]


@dataclass
class Session:
    """Everything the loop needs, built once by `setup`."""

    cfg: SFTStage  # the stage's config, max_steps resolved when num_epochs sets it
    tokenizer: object
    runtime: engine.Runtime
    learner: Learner
    train_examples: ChatExamples
    train_batches: EpochBatches
    val_batches: list[dict[str, torch.Tensor]]
    pad_id: int
    data_stats: dict[str, DataStats]
    pad_width: int | None = None  # fixed batch width (pipeline stages need one shape), else per batch
    packing: bool = False  # a step's examples packed into rows (training.batching.collate_packed)
    row_split: int = 1  # packed rows: a multiple of this many (dp x microbatches x grad_accum)


def run_sft(cfg: SFTStage, **where) -> dict:
    """Train, validate, write out_dir/checkpoint/ and out_dir/result.json; returns the result dict.
    where: the runner arguments every stage takes (training.skeleton.StageRun.start)."""
    run = StageRun.start(cfg, **where)
    session = setup(cfg, run.model_dir, run.data_dir, run.parallel, run.seed, run.source_weights)
    result = train(session.cfg, session, run.progress, run.resumer())
    return run.finish(
        session.learner,
        result,
        save=run.save_causal_lm(session.tokenizer),
        data_stats=session.data_stats,
        device=session.runtime.device,
        packing=session.packing,
    )


def setup(
    cfg: SFTStage, model_dir: Path, data_dir: Path, parallel: ParallelConfig, seed: int, weights: dict | None = None
) -> Session:
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    check_stage(cfg, parallel, model_dir)
    tokenizer, pad_id = chat_tokenizer(model_dir, "SFT renders chat rows", data_dir)
    train_examples, train_stats = load_split(data_dir, "train", tokenizer, cfg.seq_len)
    val_examples, val_stats = load_split(data_dir, "validation", tokenizer, cfg.seq_len)
    train_batches = EpochBatches(
        train_examples.lengths, cfg.batch_size, seed, sources=train_examples.sources, weights=weights
    )
    cfg = resolve_max_steps(cfg, train_batches.batches_per_epoch)
    lora, quant = adapters(cfg)
    learner = Learner.build(
        model_dir,
        parallel,
        mode=cfg.mode,
        optim=cfg.optim,
        num_updates=cfg.max_steps,
        lora=lora,
        quant=quant,
        grad_accum=cfg.grad_accum,
    )
    pad_width = cfg.seq_len if parallel.pp > 1 else None
    return Session(
        cfg=cfg,
        tokenizer=tokenizer,
        runtime=engine.build_runtime(parallel),
        learner=learner,
        train_examples=train_examples,
        train_batches=train_batches,
        val_batches=val_batches(cfg, parallel, val_examples, pad_id, pad_width),
        pad_id=pad_id,
        data_stats={"train": train_stats, "validation": val_stats},
        pad_width=pad_width,
        packing=packs(cfg, parallel),
        row_split=parallel.dp * parallel.microbatches * cfg.grad_accum,
    )


def val_batches(
    cfg: SFTStage, parallel: ParallelConfig, examples, pad_id: int, pad_width: int | None
) -> list[dict[str, torch.Tensor]]:
    """Validation batches that split evenly over the layout's ranks.

    Without pp: batches of one training micro-batch per dp rank. With pp: batches shaped exactly like
    a training batch, because pipeline stages keep the first shape they see (per train/eval mode).
    """
    rows = cfg.batch_size if parallel.pp > 1 else cfg.batch_size // (parallel.microbatches * cfg.grad_accum)
    return eval_batches(examples, rows, pad_id, fill=True, width=pad_width)


def sft_step(s: Session, step: int) -> dict[str, float]:
    """Optimizer step `step` (1-based) on its global batch: loss, lr, grad norm, and its input tokens.
    Packed or not, the batch holds the same examples and the loss is the same token mean."""
    examples = [s.train_examples[i] for i in s.train_batches(step - 1)]
    if s.packing:
        batch = collate_packed(examples, s.pad_id, s.cfg.seq_len, s.row_split)
    else:
        batch = collate(examples, s.pad_id, s.pad_width)
    _, lr, grad_norm = s.learner.update(batch)
    metrics = s.learner.metrics
    tokens = sum(len(ex.input_ids) for ex in examples)
    return {"loss": metrics.loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}


def train(cfg: SFTStage, s: Session, progress: Progress, resumer: Resumer | None = None) -> dict:
    """The shared loop (training.loop): held-out loss at the start and every eval_every, logs every
    log_every, a resumable checkpoint every checkpoint_every; starts after the latest checkpoint when there
    is one (the batch of step s is a function of s, so the data picks up where it stopped)."""

    def step(n: int) -> dict[str, float]:
        return sft_step(s, n)

    def evaluate() -> dict[str, float]:
        return {"val_loss": s.learner.eval_loss(s.val_batches)}

    flops = s.learner.flops_per_token(cfg.seq_len)
    return train_one(
        cfg, s.learner, step, evaluate, progress, resumer, rate=("tokens_per_s", "tokens"), flops_per_unit=flops
    )
