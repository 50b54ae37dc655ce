"""Reference-free preference optimisation: SimPO and ORPO on {prompt, chosen, rejected} pairs.

Both score a response by its mean per-token log-prob under the policy alone, so no reference model is
loaded, precomputed or run: one model in memory, one forward per pair side. Training goes through the
pairwise stages' PairwiseTrainer (one process, dp, ZeRO, tp with vocab-sharded log-probs, pp), so losses
and gradients equal one process's in every layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from parallel import engine
from parallel.dims import ParallelConfig
from parallel.trainer import Objective
from training.batching import resolve_max_steps
from training.config import ORPOStage, SimPOStage
from training.data import EpochBatches
from training.loop import train_one
from training.losses import IGNORE_INDEX, OddsRatioLoss, PreferenceLoss, mean_logprobs, orpo_loss, simpo_loss
from training.preference import Pair, PairwiseTrainer, PreferenceStats, load_preference_data, sides
from training.resume import Resumer
from training.skeleton import StageRun, adapters, check_stage

Progress = Callable[[dict], None]
Stage = SimPOStage | ORPOStage


def row_mean_logprobs(logits: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean response-token log-prob of every row, [rows]."""
    return mean_logprobs(logits, rows["labels"])


def preference_loss(cfg: Stage, chosen: torch.Tensor, rejected: torch.Tensor) -> PreferenceLoss:
    """The stage's loss on mean log-probs [pairs] of the chosen and rejected sides."""
    if cfg.kind == "simpo":
        return simpo_loss(chosen, rejected, beta=cfg.beta, gamma=cfg.gamma)
    return orpo_loss(chosen, rejected, beta=cfg.beta)


def _extra(out: PreferenceLoss) -> dict[str, torch.Tensor]:
    """ORPO's own statistics (means over the pairs): the chosen NLL and the log odds ratio."""
    return {"chosen_nll": out.nll, "log_odds_ratio": out.log_odds} if isinstance(out, OddsRatioLoss) else {}


class ReferenceFreeObjective(Objective):
    """The SimPO or ORPO loss per pair on interleaved rows (no extras needed: the labels say everything)."""

    vocab_parallel = True  # takes vocab-sharded logits (training.losses.token_logprobs)

    def __init__(self, cfg: Stage):
        self.cfg = cfg

    def count(self, batch):
        return batch["input_ids"].shape[0] // 2

    def __call__(self, logits, micro):
        chosen, rejected = sides(row_mean_logprobs(logits, micro))
        out = preference_loss(self.cfg, chosen, rejected)
        n = chosen.shape[0]
        stats = {
            "loss": out.loss.detach() * n,
            "margin": out.margin * n,
            "accuracy": out.accuracy * n,
            "chosen_reward": out.chosen_rewards.sum(),
            "rejected_reward": out.rejected_rewards.sum(),
        }
        return out.loss * n, stats | {k: v * n for k, v in _extra(out).items()}


@dataclass
class Session:
    cfg: Stage  # the stage's config, max_steps resolved when num_epochs sets it
    trainer: PairwiseTrainer
    tokenizer: object
    runtime: engine.Runtime
    train_pairs: list[Pair]
    batches: EpochBatches
    val_pairs: list[Pair]
    val_tokens: torch.Tensor  # [pairs, 2] response tokens of each side (summed log-prob = mean x tokens)
    pad_id: int
    data_stats: dict[str, PreferenceStats]


def run_simpo(cfg: SimPOStage, **where) -> dict:
    """Train SimPO, validate, write out_dir/checkpoint/ and out_dir/result.json; returns the result dict.
    where: the runner arguments every stage takes (training.skeleton.StageRun.start)."""
    return _run(cfg, where, gamma=cfg.gamma)


def run_orpo(cfg: ORPOStage, **where) -> dict:
    """Train ORPO, validate, write out_dir/checkpoint/ and out_dir/result.json; returns the result dict."""
    return _run(cfg, where)


def _run(cfg: Stage, where: dict, **facts) -> dict:
    run = StageRun.start(cfg, **where)
    session = setup(cfg, run.model_dir, run.data_dir, run.parallel, run.seed, run.source_weights)
    result = train(session.cfg, session, run.progress, run.resumer())
    return run.finish(
        session.trainer.learner,
        result,
        save=run.save_causal_lm(session.tokenizer),
        data_stats=session.data_stats,
        device=session.runtime.device,
        beta=cfg.beta,
        **facts,
    )


def _response_tokens(pairs: list[Pair]) -> torch.Tensor:
    """[pairs, 2] label tokens (after the shift) of each side."""
    return torch.tensor(
        [[int((torch.as_tensor(ex.labels)[1:] != IGNORE_INDEX).sum()) for ex in (p.chosen, p.rejected)] for p in pairs]
    )


def setup(
    cfg: Stage, model_dir: Path, data_dir: Path, parallel: ParallelConfig, seed: int, weights: dict | None = None
) -> Session:
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    check_stage(cfg, parallel, model_dir)
    data = load_preference_data(model_dir, data_dir, cfg.seq_len, cfg.batch_size, seed, cfg.kind, weights)
    cfg = resolve_max_steps(cfg, data.batches.batches_per_epoch)
    runtime = engine.build_runtime(parallel)
    # The whole model on every rank first (same seed, same LoRA init); the engine lays it out.
    policy = engine.load_model(model_dir, *adapters(cfg)).to(runtime.device)
    trainer = PairwiseTrainer(cfg, policy, model_dir, parallel, ReferenceFreeObjective(cfg))
    return Session(
        cfg,
        trainer,
        data.tokenizer,
        runtime,
        data.train,
        data.batches,
        data.validation,
        _response_tokens(data.validation),
        data.pad_id,
        data.stats,
    )


def evaluate(cfg: Stage, s: Session) -> dict[str, float]:
    """Held-out loss, accuracy and margin of the method's rewards (mean log-probs), and the policy's
    preference by summed log-probs (val_logp_*, what the DPO stage reports too)."""
    mean = s.trainer.pair_values(s.val_pairs, cfg.batch_size // cfg.grad_accum, s.pad_id, row_mean_logprobs)
    out = preference_loss(cfg, mean[:, 0], mean[:, 1])
    summed = mean * s.val_tokens
    metrics = {
        "val_loss": float(out.loss),
        "val_accuracy": float(out.accuracy),
        "val_margin": float(out.margin),
        "val_logp_accuracy": float((summed[:, 0] > summed[:, 1]).float().mean()),
        "val_logp_margin": float((summed[:, 0] - summed[:, 1]).mean()),
    }
    return metrics | {f"val_{k}": float(v) for k, v in _extra(out).items()}


def train(cfg: Stage, s: Session, progress: Progress, resumer: Resumer | None = None) -> dict:
    def step(n: int) -> dict[str, float]:
        pairs = [s.train_pairs[i] for i in s.batches(n - 1)]
        metrics = s.trainer.step(s.trainer.collate(pairs, s.pad_id))
        return metrics | {"tokens": s.trainer.learner.metrics.num_tokens}  # both sides of every pair

    return train_one(
        cfg,
        s.trainer.learner,
        step,
        lambda: evaluate(cfg, s),
        progress,
        resumer,
        rate=("pairs_per_s", cfg.batch_size),
        flops_per_unit=s.trainer.learner.flops_per_token(cfg.seq_len),  # no reference model runs
    )
