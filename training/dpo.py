"""Direct preference optimisation: setup, a train loop you can read top to bottom, save.

The reference model is a frozen copy of the starting policy (full fine-tuning) or the policy itself
with its LoRA adapters switched off, so LoRA and QLoRA DPO hold one model. With precompute_reference the
reference log-probs of every pair are computed once before training and the copy is freed.

Under torch.distributed (several ranks, one task each) every rank runs this same function: the
reference log-probs are precomputed (each rank scores its share of the pairs before the model is laid
out), and the engine's Trainer trains under data, ZeRO and tensor parallelism with the DPO
loss averaged over the global batch of pairs, so losses and gradients equal one process's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from parallel import engine
from parallel.dims import ParallelConfig
from parallel.trainer import Objective
from training.batching import resolve_max_steps
from training.config import DPOStage
from training.data import EpochBatches
from training.loop import train_one
from training.losses import IGNORE_INDEX, dpo_loss, sequence_logprobs
from training.preference import (
    Pair,
    PairwiseTrainer,
    PreferenceStats,
    collate_pairs,
    eval_pair_batches,
    load_preference_data,
    share_of_pairs,
    sides,
)
from training.resume import Resumer
from training.skeleton import StageRun, adapters, check_stage

Progress = Callable[[dict], None]


def row_logprobs(logits: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed response log-probs of every row, [rows]."""
    return sequence_logprobs(logits, rows["labels"])


def pair_logprobs(model, batch: dict[str, torch.Tensor], runtime: engine.Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of the (chosen, rejected) sides of a collated pair batch, [pairs] each."""
    with runtime.autocast():
        logits = model(
            input_ids=batch["input_ids"].to(runtime.device),
            attention_mask=batch["attention_mask"].to(runtime.device),
            use_cache=False,
        ).logits
    return sides(row_logprobs(logits, {"labels": batch["labels"].to(runtime.device)}))


class DPOObjective(Objective):
    """The DPO (or IPO) loss per pair on interleaved rows carrying the reference log-probs (`ref_logps`)."""

    vocab_parallel = True  # takes vocab-sharded logits (training.losses.token_logprobs)

    def __init__(self, cfg: DPOStage):
        self.cfg = cfg

    def count(self, batch):
        return batch["input_ids"].shape[0] // 2

    def __call__(self, logits, micro):
        chosen, rejected = sides(row_logprobs(logits, micro))
        ref_chosen, ref_rejected = sides(micro["ref_logps"])
        out = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=self.cfg.beta,
            loss_type=self.cfg.loss_type,
            label_smoothing=self.cfg.label_smoothing,
        )
        n = chosen.shape[0]
        summed = out.loss * n
        stats = {
            "loss": out.loss.detach() * n,
            "margin": out.margin * n,
            "accuracy": out.accuracy * n,
            "chosen_reward": out.chosen_rewards.sum(),
            "rejected_reward": out.rejected_rewards.sum(),
            "kl": (chosen - ref_chosen).detach().sum(),
        }
        if self.cfg.rpo_alpha:
            # Per-token NLL of each chosen response (sequence log-prob / its label tokens), summed over pairs.
            tokens = sides((micro["labels"][:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1))[0]
            nll = -(chosen / tokens).sum()
            summed = summed + self.cfg.rpo_alpha * nll
            stats["chosen_nll"] = nll.detach()
        return summed, stats


class Reference:
    """Log-probs of the frozen starting model: its own copy (full) or the policy with adapters off (lora)."""

    def __init__(self, policy, mode: str):
        self.policy = policy
        self.copy, self.released = None, False
        if mode == "full":
            self.copy = copy.deepcopy(policy).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], runtime: engine.Runtime) -> tuple[torch.Tensor, torch.Tensor]:
        # After release a LoRA policy would silently serve as its own reference; that is a bug, not a choice.
        assert not self.released, "reference log-probs were precomputed; the reference was released"
        if self.copy is not None:
            return pair_logprobs(self.copy, batch, runtime)
        was_training = self.policy.training
        self.policy.eval()
        with self.policy.disable_adapter():
            out = pair_logprobs(self.policy, batch, runtime)
        self.policy.train(was_training)
        return out

    def all_pairs(self, pairs: list[Pair], batch_size: int, pad_id: int, runtime) -> torch.Tensor:
        """[len(pairs), 2] (chosen, rejected) reference log-probs, on CPU; under several ranks each
        scores its share and every rank gets them all."""

        def score(some: list[Pair]) -> torch.Tensor:
            rows = [torch.stack(self(b, runtime), dim=1).cpu() for b in eval_pair_batches(some, batch_size, pad_id)]
            return torch.cat(rows)

        return share_of_pairs(pairs, score)

    def release(self) -> None:
        """Drop the copy once every reference log-prob needed is computed."""
        self.copy, self.released = None, True


@dataclass
class Session:
    """Everything the loop needs, built once by `setup`."""

    cfg: DPOStage  # the stage's config, max_steps resolved when num_epochs sets it
    trainer: PairwiseTrainer
    reference: Reference
    tokenizer: object
    runtime: engine.Runtime
    train_pairs: list[Pair]
    batches: EpochBatches
    train_ref: torch.Tensor | None  # [pairs, 2] when precomputed
    val_pairs: list[Pair]
    val_ref: torch.Tensor  # [pairs, 2]; the reference never changes, so always computed once
    pad_id: int
    data_stats: dict[str, PreferenceStats]

    @property
    def policy(self):
        """The policy module of a one-process run (before any multi-process layout cuts it up)."""
        return self.trainer.model if self.trainer.model is not None else self.reference.policy


def run_dpo(cfg: DPOStage, **where) -> dict:
    """Train, validate, write out_dir/checkpoint/ and out_dir/result.json; returns the result dict.
    where: the runner arguments every stage takes (training.skeleton.StageRun.start)."""
    run = StageRun.start(cfg, **where)
    session = setup(cfg, run.model_dir, run.data_dir, run.parallel, run.seed, run.source_weights)
    result = train(session.cfg, session, run.progress, run.resumer())
    return run.finish(
        session.trainer.learner,
        result,
        save=run.save_causal_lm(session.tokenizer),
        data_stats=session.data_stats,
        device=session.runtime.device,
        loss_type=cfg.loss_type,
        beta=cfg.beta,
        precompute_reference=cfg.precompute_reference,
    )


def setup(
    cfg: DPOStage, model_dir: Path, data_dir: Path, parallel: ParallelConfig, seed: int, weights: dict | None = None
) -> Session:
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    check_stage(cfg, parallel, model_dir)
    data = load_preference_data(model_dir, data_dir, cfg.seq_len, cfg.batch_size, seed, "dpo", weights)
    cfg = resolve_max_steps(cfg, data.batches.batches_per_epoch)
    runtime = engine.build_runtime(parallel)
    lora, quant = adapters(cfg)
    # The whole model on every rank first (same seed, same LoRA init); the engine lays it out below.
    policy = engine.load_model(model_dir, lora, quant).to(runtime.device)
    reference = Reference(policy, cfg.mode)
    micro = cfg.batch_size // cfg.grad_accum
    val_ref = reference.all_pairs(data.validation, micro, data.pad_id, runtime)
    train_ref = None
    if cfg.precompute_reference:
        train_ref = reference.all_pairs(data.train, micro, data.pad_id, runtime)
        reference.release()
    trainer = PairwiseTrainer(cfg, policy, model_dir, parallel, DPOObjective(cfg))
    return Session(
        cfg,
        trainer,
        reference,
        data.tokenizer,
        runtime,
        data.train,
        data.batches,
        train_ref,
        data.validation,
        val_ref,
        data.pad_id,
        data.stats,
    )


def dpo_step(cfg: DPOStage, s: Session, indices: list[int]) -> dict[str, float]:
    """One optimizer step over a global batch of pairs; returns its metrics (means over the pairs)."""
    pairs = [s.train_pairs[i] for i in indices]
    if s.train_ref is not None:
        ref = s.train_ref[indices]
    else:  # the whole policy on this rank (one process): the reference scores this batch now
        ref = torch.stack(s.reference(collate_pairs(pairs, s.pad_id), s.runtime), dim=1).cpu()
    metrics = s.trainer.step(s.trainer.collate(pairs, s.pad_id, ref_logps=ref))
    return metrics | {"tokens": s.trainer.learner.metrics.num_tokens}  # both sides of every pair


def flops_per_token(cfg: DPOStage, s: Session) -> float:
    """Model FLOPs per trained token: the policy's forward and backward, plus the reference's forward when
    it scores each batch in the step (not precomputed)."""
    learner = s.trainer.learner
    flops = learner.flops_per_token(cfg.seq_len)
    if s.train_ref is None:
        flops += learner.flops_per_token(cfg.seq_len, forward_only=True)
    return flops


def evaluate(cfg: DPOStage, s: Session) -> dict[str, float]:
    """Held-out DPO loss, implicit-reward accuracy and margin, and the policy's own preference.

    val_logp_accuracy / val_logp_margin compare the policy's log-probs of chosen and rejected
    directly, so they are meaningful before training too (implicit rewards are all 0 at the start).
    """
    policy = s.trainer.pair_values(s.val_pairs, cfg.batch_size // cfg.grad_accum, s.pad_id, row_logprobs)
    out = dpo_loss(
        policy[:, 0],
        policy[:, 1],
        s.val_ref[:, 0],
        s.val_ref[:, 1],
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing,
    )
    return {
        "val_loss": float(out.loss),
        "val_accuracy": float(out.accuracy),
        "val_margin": float(out.margin),
        "val_logp_accuracy": float((policy[:, 0] > policy[:, 1]).float().mean()),
        "val_logp_margin": float((policy[:, 0] - policy[:, 1]).mean()),
        "val_kl": float((policy[:, 0] - s.val_ref[:, 0]).mean()),
    }


def train(cfg: DPOStage, s: Session, progress: Progress, resumer: Resumer | None = None) -> dict:
    def step(n: int) -> dict[str, float]:
        return dpo_step(cfg, s, s.batches(n - 1))

    return train_one(
        cfg,
        s.trainer.learner,
        step,
        lambda: evaluate(cfg, s),
        progress,
        resumer,
        rate=("pairs_per_s", cfg.batch_size),
        flops_per_unit=flops_per_token(cfg, s),
    )
