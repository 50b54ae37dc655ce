"""KTO (Kahneman-Tversky optimisation) on unpaired {prompt, completion, label} rows against a frozen reference.

Each row travels with a mismatched row: its own prompt followed by the completion of the next row of its
split (in key order, cyclic), fixed when the split is loaded so that its reference log-prob can be
precomputed like every other. The pair (row, mismatched row) is a training.preference.Pair, so the DPO
stage's reference machinery (training.dpo.Reference: a frozen copy or the policy with adapters off,
precomputed or per step) scores both without a copy of its code; the policy trains through the pairwise
stages' PairwiseTrainer on batches of rows.

A step first scores the global batch's mismatched rows under the policy (no gradient, through the
layout, gathered over dp) and takes KTO's reference point z0 = max(0, mean(policy - reference)) over all
of them; the training forward then holds only the rows, each carrying its reference log-prob, its label
and z0. So z0, the loss and every gradient equal one process's under dp, ZeRO, tp and pp, whatever the
micro-batching.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from data_tools.tokens import TokenSplit, read_meta
from parallel import engine
from parallel.dims import ParallelConfig
from parallel.trainer import Objective
from training.batching import resolve_max_steps
from training.config import KTOStage
from training.data import EpochBatches, Example, chat_tokenizer, collate, open_store, to_example
from training.dpo import Reference, row_logprobs
from training.loop import train_one
from training.losses import IGNORE_INDEX, kto_loss, kto_reference_point
from training.preference import Pair, PairwiseTrainer, PreferenceStats, collate_pairs
from training.resume import Resumer
from training.skeleton import StageRun, adapters, check_stage

Progress = Callable[[dict], None]


class UnpairedRows(Sequence):
    """An unpaired split of the token store as Pair(row, mismatched row), read from the mapped files on
    access. Rows cut at seq_len with no completion token left are dropped ('response_truncated'); a
    mismatched row cut that far keeps no label and adds 0 to the KL estimate's sum (it still counts).
    `desirable` (bool, numpy), `lengths` (a row's tokens) and `sources` are per kept row."""

    def __init__(self, split: TokenSplit, seq_len: int, rejected: dict | None = None):
        self.split, self.seq_len = split, seq_len
        full = split.lengths("ids")
        cut = np.flatnonzero(full > seq_len)
        drop = [i for i in cut if self._example(int(i)) is None]
        keep = np.ones(len(split), dtype=bool)
        keep[drop] = False
        self.index = np.flatnonzero(keep)
        self.lengths = np.minimum(full, seq_len)[self.index]
        self.sources = split.sources[self.index]
        self.desirable = np.array([bool(split.get(int(i), "desirable")[0]) for i in self.index], dtype=bool)
        reasons = Counter(rejected or {})
        if drop:
            reasons["response_truncated"] += len(drop)
        self.stats = PreferenceStats(len(split), len(self.index), len(cut) - len(drop), dict(sorted(reasons.items())))

    def _example(self, row: int) -> Example | None:
        ids, mask = self.split.get(row, "ids", self.seq_len), self.split.get(row, "labels", self.seq_len)
        return to_example(ids, mask, self.seq_len)[0]

    def _mismatched(self, row: int, other: int) -> Example:
        """Row `row`'s prompt with row `other`'s completion (from its first labelled token), cut at seq_len."""
        ids, mask = self.split.get(row, "ids"), self.split.get(row, "labels")
        other_ids, other_mask = self.split.get(other, "ids"), self.split.get(other, "labels")
        start, other_start = int(np.argmax(mask > 0)), int(np.argmax(other_mask > 0))
        ids = np.concatenate([ids[:start], other_ids[other_start:]]).astype(np.int64)[: self.seq_len]
        mask = np.concatenate([np.zeros(start, np.uint8), other_mask[other_start:]])[: self.seq_len]
        return Example(ids, np.where(mask.astype(bool), ids, IGNORE_INDEX))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row, other = int(self.index[i]), int(self.index[(i + 1) % len(self.index)])
        return Pair(self._example(row), self._mismatched(row, other))


def load_unpaired(data_dir: Path, name: str, tokenizer, seq_len: int) -> UnpairedRows:
    """Split `name` of data_dir's unpaired token store (training.data.open_store) as rows with their
    mismatched rows."""
    store = open_store(data_dir, "unpaired", tokenizer)
    rejected = (read_meta(store).get("rejected") or {}).get(name)
    rows = UnpairedRows(TokenSplit(store / name, "unpaired"), seq_len, rejected)
    if not len(rows):
        raise ValueError(
            f"{data_dir}: no usable unpaired rows in the {name} split out of {rows.stats.rows} "
            f"(rejected: {rows.stats.rejected})"
        )
    return rows


class KTOObjective(Objective):
    """The KTO loss per row; rows carry `ref_logps`, `desirable` (0/1) and the step's reference point `z0`."""

    vocab_parallel = True  # takes vocab-sharded logits (training.losses.token_logprobs)

    def __init__(self, cfg: KTOStage):
        self.cfg = cfg

    def count(self, batch):
        return batch["input_ids"].shape[0]

    def __call__(self, logits, micro):
        policy = row_logprobs(logits, micro)
        desirable = micro["desirable"] > 0.5
        out = kto_loss(
            policy,
            micro["ref_logps"].to(policy.dtype),
            desirable,
            micro["z0"][0],
            beta=self.cfg.beta,
            desirable_weight=self.cfg.desirable_weight,
            undesirable_weight=self.cfg.undesirable_weight,
        )
        n = policy.shape[0]
        # Per-kind reward means would be undefined for a batch of one kind: the signed reward (a desirable
        # row's, minus an undesirable row's) is what KTO raises, and is defined for every batch.
        stats = {
            "loss": out.loss.detach() * n,
            "desirable_share": desirable.sum(),
            "signed_reward": torch.where(desirable, out.rewards, -out.rewards).sum(),
        }
        return out.loss * n, stats


@dataclass
class Session:
    cfg: KTOStage  # the stage's config, max_steps resolved when num_epochs sets it
    trainer: PairwiseTrainer
    reference: Reference
    tokenizer: object
    runtime: engine.Runtime
    train_rows: UnpairedRows
    batches: EpochBatches
    train_ref: torch.Tensor | None  # [rows, 2] (row, mismatched row) when precomputed
    val_rows: UnpairedRows
    val_ref: torch.Tensor  # [rows, 2]
    pad_id: int


def run_kto(cfg: KTOStage, **where) -> dict:
    """Train KTO, validate, write out_dir/checkpoint/ and out_dir/result.json; returns the result dict.
    where: the runner arguments every stage takes (training.skeleton.StageRun.start)."""
    run = StageRun.start(cfg, **where)
    s = setup(cfg, run.model_dir, run.data_dir, run.parallel, run.seed, run.source_weights)
    result = train(s.cfg, s, run.progress, run.resumer())
    return run.finish(
        s.trainer.learner,
        result,
        save=run.save_causal_lm(s.tokenizer),
        data_stats={"train": s.train_rows.stats, "validation": s.val_rows.stats},
        device=s.runtime.device,
        beta=cfg.beta,
        desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight,
        precompute_reference=cfg.precompute_reference,
    )


def setup(
    cfg: KTOStage, model_dir: Path, data_dir: Path, parallel: ParallelConfig, seed: int, weights: dict | None = None
) -> Session:
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    check_stage(cfg, parallel, model_dir)
    tokenizer, pad_id = chat_tokenizer(model_dir, "the kto stage renders rows", data_dir)
    train_rows = load_unpaired(data_dir, "train", tokenizer, cfg.seq_len)
    val_rows = load_unpaired(data_dir, "validation", tokenizer, cfg.seq_len)
    sources = train_rows.sources if weights else None
    batches = EpochBatches(train_rows.lengths, cfg.batch_size, seed, "training rows", sources=sources, weights=weights)
    cfg = resolve_max_steps(cfg, batches.batches_per_epoch)
    runtime = engine.build_runtime(parallel)
    # The whole model on every rank first (same seed, same LoRA init); the engine lays it out below.
    policy = engine.load_model(model_dir, *adapters(cfg)).to(runtime.device)
    reference = Reference(policy, cfg.mode)
    micro = cfg.batch_size // cfg.grad_accum
    val_ref = reference.all_pairs(val_rows, micro, pad_id, runtime)
    train_ref = None
    if cfg.precompute_reference:
        train_ref = reference.all_pairs(train_rows, micro, pad_id, runtime)
        reference.release()
    trainer = PairwiseTrainer(cfg, policy, model_dir, parallel, KTOObjective(cfg))
    return Session(
        cfg, trainer, reference, tokenizer, runtime, train_rows, batches, train_ref, val_rows, val_ref, pad_id
    )


def kto_step(s: Session, indices: list[int]) -> dict[str, float]:
    """One optimizer step over a global batch of rows; returns its metrics (means over the rows)."""
    rows = [s.train_rows[i] for i in indices]
    if s.train_ref is not None:
        ref = s.train_ref[indices]
    else:  # the whole policy on this rank (one process): the reference scores this batch now
        ref = torch.stack(s.reference(collate_pairs(rows, s.pad_id), s.runtime), dim=1).cpu()
    z0 = kto_reference_point(policy_logprobs(s, [p.rejected for p in rows]), ref[:, 1])
    batch = collate([p.chosen for p in rows], s.pad_id, s.trainer.width)
    batch |= {
        "ref_logps": ref[:, 0].float(),
        "desirable": torch.as_tensor(s.train_rows.desirable[indices], dtype=torch.float32),
        "z0": z0.float().expand(len(rows)).clone(),
    }
    return s.trainer.step(batch) | {"kl": float(z0)}


def policy_logprobs(s: Session, examples: list[Example]) -> torch.Tensor:
    """Summed completion log-probs of every example under the policy, through the layout, [examples]. The
    batches have a training batch's shape (batch_size rows, the last filled up by repeating its last row),
    which every layout accepts (pipeline stages keep the first shape they see)."""
    size, out = s.cfg.batch_size, []
    for i in range(0, len(examples), size):
        chunk = examples[i : i + size]
        chunk = chunk + chunk[-1:] * (size - len(chunk))
        out.append(s.trainer.learner.rows(collate(chunk, s.pad_id, s.trainer.width), row_logprobs))
    return torch.cat(out)[: len(examples)]


def evaluate(cfg: KTOStage, s: Session) -> dict[str, float]:
    """Held-out KTO loss with z0 over the whole validation split, the mean rewards of desirable and
    undesirable rows and their gap (val_reward_margin)."""
    pairs = s.val_rows[:]
    policy = policy_logprobs(s, [ex for p in pairs for ex in (p.chosen, p.rejected)]).reshape(-1, 2)
    z0 = kto_reference_point(policy[:, 1], s.val_ref[:, 1])
    desirable = torch.as_tensor(s.val_rows.desirable)
    out = kto_loss(
        policy[:, 0],
        s.val_ref[:, 0],
        desirable,
        z0,
        beta=cfg.beta,
        desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight,
    )
    metrics = {"val_loss": float(out.loss), "val_kl": float(z0)}
    if desirable.any() and (~desirable).any():
        good, bad = out.rewards[desirable].mean(), out.rewards[~desirable].mean()
        metrics |= {
            "val_desirable_reward": float(good),
            "val_undesirable_reward": float(bad),
            "val_reward_margin": float(good - bad),
        }
    return metrics


def train(cfg: KTOStage, s: Session, progress: Progress, resumer: Resumer | None = None) -> dict:
    def step(n: int) -> dict[str, float]:
        return kto_step(s, s.batches(n - 1))

    return train_one(
        cfg, s.trainer.learner, step, lambda: evaluate(cfg, s), progress, resumer, rate=("rows_per_s", cfg.batch_size)
    )
