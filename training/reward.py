"""Reward model: a scalar head on the LM trained with the Bradley-Terry loss on preference pairs.

The model is the Hugging Face sequence-classification variant of the base (num_labels=1), which
scores the last non-pad token; the checkpoint is a plain directory AutoModelForSequenceClassification
loads (LoRA adapters are merged before saving). Under torch.distributed it trains through the engine's
Trainer (data, ZeRO and tensor parallelism) with the loss averaged over the global pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from parallel import engine
from parallel.dims import ParallelConfig
from parallel.trainer import Objective
from training.batching import resolve_max_steps
from training.config import RewardModelStage
from training.data import EpochBatches
from training.loop import train_one
from training.losses import bradley_terry_loss
from training.preference import (
    Pair,
    PairwiseTrainer,
    PreferenceStats,
    load_preference_data,
    sides,
)
from training.resume import Resumer
from training.skeleton import StageRun, adapters, check_stage

Progress = Callable[[dict], None]
MANIFEST = "hpcft_reward_model.json"


def build_reward_model(model_dir: Path, pad_id: int, lora=None, quant=None, *, require_head: bool = False):
    """A sequence-classification model with one output on CPU, in training mode: the base LM with a fresh
    score head (seeded by the caller's RNG state), or a reward model with its head kept (the reward model
    stage, PPO's critic). pad_token_id set so the last real token is scored. lora/quant: typed configs
    (QLoRA's 4-bit base needs lora; the head stays full precision and trains, peft's modules_to_save).
    require_head: refuse a model without a `score` head over a backbone (per-token values need one)."""
    from transformers import AutoModelForSequenceClassification

    model = engine.from_pretrained(AutoModelForSequenceClassification, model_dir, quant, lora, num_labels=1)
    model.config.pad_token_id = pad_id
    if require_head and (not hasattr(model, "score") or not hasattr(model, model.base_model_prefix)):
        raise ValueError(
            f"critic from {model_dir}: {type(model).__name__} has no `score` head over a backbone; "
            "per-token values need one"
        )
    if lora is not None:
        model = engine.apply_lora(model, lora, task_type="SEQ_CLS")
    return model.train()


def row_scores(logits: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's pooled scores ([rows, 1] logits of the last real token) as [rows]. Pipeline stages apply
    the score head at every position ([rows, seq, 1]); then the last real token's score is read."""
    scores = logits.float().squeeze(-1)
    if scores.dim() == 2:
        last = rows["last_index"].long().to(scores.device)
        scores = scores[torch.arange(len(last), device=scores.device), last]
    return scores


def pair_rewards(model, batch: dict[str, torch.Tensor], runtime: engine.Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar rewards of the (chosen, rejected) sides of a collated pair batch, [pairs] each."""
    with runtime.autocast():
        scores = model(
            input_ids=batch["input_ids"].to(runtime.device),
            attention_mask=batch["attention_mask"].to(runtime.device),
            use_cache=False,
        ).logits
    return sides(row_scores(scores, batch))


class BradleyTerryObjective(Objective):
    """-log sigmoid(r_chosen - r_rejected - margin) per pair on interleaved rows."""

    def count(self, batch):
        return batch["input_ids"].shape[0] // 2

    def __call__(self, logits, micro):
        chosen, rejected = sides(row_scores(logits, micro))
        out = bradley_terry_loss(chosen, rejected, sides(micro["margin"])[0])
        n = chosen.shape[0]
        return out.loss * n, {"loss": out.loss.detach() * n, "accuracy": out.accuracy * n, "margin": out.margin * n}


def save_reward_model(model, tokenizer, out_dir: Path, *, base_model_dir: Path, mode: str) -> Path:
    """A plain sequence-classification directory (adapters merged) with the tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = model.merge_and_unload() if mode in ("lora", "qlora") else model
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    manifest = {"kind": "reward_model", "mode": mode, "base_model_dir": str(Path(base_model_dir).resolve())}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


@dataclass
class Session:
    cfg: RewardModelStage  # the stage's config, max_steps resolved when num_epochs sets it
    trainer: PairwiseTrainer
    tokenizer: object
    runtime: engine.Runtime
    train_pairs: list[Pair]
    batches: EpochBatches
    val_pairs: list[Pair]
    pad_id: int
    data_stats: dict[str, PreferenceStats]


def run_reward_model(cfg: RewardModelStage, **where) -> dict:
    """Train, validate, write out_dir/checkpoint/ (HF sequence classifier) and result.json; returns the result.
    where: the runner arguments every stage takes (training.skeleton.StageRun.start)."""
    run = StageRun.start(cfg, **where)
    session = setup(cfg, run.model_dir, run.data_dir, run.parallel, run.seed, run.source_weights)
    result = train(session.cfg, session, run.progress, run.resumer())

    def save(model):
        save_reward_model(
            model, session.tokenizer, run.out_dir / "checkpoint", base_model_dir=run.model_dir, mode=cfg.mode
        )

    return run.finish(
        session.trainer.learner,
        result,
        save=save,
        rebuild=lambda state: _rebuild(cfg, run, session.pad_id, state),
        data_stats=session.data_stats,
        device=session.runtime.device,
    )


def _rebuild(cfg: RewardModelStage, run: StageRun, pad_id: int, state: dict):
    """A one-process, full-precision reward model holding a trained state dict (rank 0's gathered one).
    QLoRA: the trained adapters and score head on the full-precision base."""
    model = build_reward_model(run.model_dir, pad_id, adapters(cfg)[0])
    if cfg.mode != "qlora":
        model.load_state_dict(state)
        return model
    trained = {k: v for k, v in state.items() if "lora_" in k or "modules_to_save" in k}
    expected = {k for k in model.state_dict() if "lora_" in k or "modules_to_save" in k}
    if set(trained) != expected:
        raise ValueError(f"trained adapters do not match the model's: {sorted(set(trained) ^ expected)[:4]}")
    model.load_state_dict(trained, strict=False)
    return model


def setup(
    cfg: RewardModelStage,
    model_dir: Path,
    data_dir: Path,
    parallel: ParallelConfig,
    seed: int,
    weights: dict | None = None,
) -> Session:
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    check_stage(cfg, parallel, model_dir)
    data = load_preference_data(model_dir, data_dir, cfg.seq_len, cfg.batch_size, seed, "reward_model", weights)
    cfg = resolve_max_steps(cfg, data.batches.batches_per_epoch)
    runtime = engine.build_runtime(parallel)
    # Every rank builds the same model on CPU (same seed, same fresh head); the engine lays it out.
    model = build_reward_model(model_dir, data.pad_id, *adapters(cfg))
    trainer = PairwiseTrainer(cfg, model, model_dir, parallel, BradleyTerryObjective())
    return Session(
        cfg, trainer, data.tokenizer, runtime, data.train, data.batches, data.validation, data.pad_id, data.stats
    )


def reward_step(cfg: RewardModelStage, s: Session, indices: list[int]) -> dict[str, float]:
    """One optimizer step over a global batch of pairs; returns its metrics (means over the pairs)."""
    metrics = s.trainer.step(s.trainer.collate([s.train_pairs[i] for i in indices], s.pad_id))
    return metrics | {"tokens": s.trainer.learner.metrics.num_tokens}  # both sides of every pair


def evaluate(cfg: RewardModelStage, s: Session) -> dict[str, float]:
    """Held-out pairwise accuracy (chosen scored above rejected), loss, margin and reward spread."""
    rewards = s.trainer.pair_values(s.val_pairs, cfg.batch_size // cfg.grad_accum, s.pad_id, row_scores)
    margins = torch.tensor([p.margin for p in s.val_pairs])
    out = bradley_terry_loss(rewards[:, 0], rewards[:, 1], margins)
    return {
        "val_loss": float(out.loss),
        "val_accuracy": float(out.accuracy),
        "val_margin": float(out.margin),
        "val_reward_mean": float(rewards.mean()),
        "val_reward_std": float(rewards.std()),
    }


def train(cfg: RewardModelStage, s: Session, progress: Progress, resumer: Resumer | None = None) -> dict:
    def step(n: int) -> dict[str, float]:
        return reward_step(cfg, s, s.batches(n - 1))

    flops = s.trainer.learner.flops_per_token(cfg.seq_len, head_outputs=1)  # a scalar score head
    return train_one(
        cfg,
        s.trainer.learner,
        step,
        lambda: evaluate(cfg, s),
        progress,
        resumer,
        rate=("pairs_per_s", cfg.batch_size),
        flops_per_unit=flops,
    )
