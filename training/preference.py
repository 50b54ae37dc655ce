"""Preference rows ({prompt, chosen, rejected}) as token pairs with labels on the response only.

Accepted rows:
- {"prompt": str | messages, "chosen": str, "rejected": str}: the responses are assistant turns;
- {"prompt": messages (optional), "chosen": messages, "rejected": messages}: the response messages
  follow the prompt; without a prompt, the longest shared prefix of the two conversations is it.
A row that cannot be used is rejected with a short reason and counted, never raised.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_tools.normalise import RowError as PreferenceRowError
from data_tools.normalise import parse_preference as parse_row
from training.data import EpochBatches, Example, assistant_spans, chat_tokenizer, collate, read_jsonl
from training.learner import Learner
from training.losses import IGNORE_INDEX


@dataclass(frozen=True)
class Pair:
    chosen: Example
    rejected: Example
    margin: float = 0.0  # optional per-row reward margin (reward model only)


@dataclass
class PreferenceStats:
    rows: int = 0
    pairs: int = 0
    truncated: int = 0  # pairs with a side cut at seq_len (still used if response tokens survived)
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count


def tokenize_response(tokenizer, prompt: list[dict], response: list[dict]) -> Example:
    """Token ids of prompt + response with labels only on the response's assistant turns (turn ends included)."""
    text, spans = assistant_spans(tokenizer, prompt + response)
    # Assistant turns inside the prompt are context, not part of what is being preferred.
    spans = spans[sum(m["role"] == "assistant" for m in prompt) :]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tid if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for tid, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"])
    ]
    return Example(list(enc["input_ids"]), labels)


def _truncate(ex: Example, seq_len: int) -> tuple[Example, bool]:
    if len(ex.input_ids) <= seq_len:
        return ex, False
    return Example(ex.input_ids[:seq_len], ex.labels[:seq_len]), True


def _has_labels(ex: Example) -> bool:
    # The label at position 0 is never predicted (no previous token).
    return any(label != IGNORE_INDEX for label in ex.labels[1:])


def _margin(row: dict) -> float:
    value = row.get("margin", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PreferenceRowError("bad_margin")
    return float(value)


def build_pairs(rows: list, tokenizer, seq_len: int) -> tuple[list[Pair], PreferenceStats]:
    """Tokenised pairs of the usable rows, and counts of what was truncated or rejected (by reason)."""
    pairs, stats, reasons = [], PreferenceStats(rows=len(rows)), Counter()
    for row in rows:
        try:
            prompt, chosen, rejected = parse_row(row)
            margin = _margin(row)
            chosen_ex, cut_c = _truncate(tokenize_response(tokenizer, prompt, chosen), seq_len)
            rejected_ex, cut_r = _truncate(tokenize_response(tokenizer, prompt, rejected), seq_len)
            if not (_has_labels(chosen_ex) and _has_labels(rejected_ex)):
                raise PreferenceRowError("response_truncated")
        except PreferenceRowError as err:
            reasons[err.reason] += 1
            continue
        stats.truncated += cut_c or cut_r
        pairs.append(Pair(chosen_ex, rejected_ex, margin))
    stats.pairs, stats.rejected = len(pairs), dict(sorted(reasons.items()))
    return pairs, stats


def load_pairs(path: Path, tokenizer, seq_len: int) -> tuple[list[Pair], PreferenceStats]:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"preference split {path} does not exist; run the data stage first")
    pairs, stats = build_pairs(read_jsonl(path), tokenizer, seq_len)
    if not pairs:
        raise ValueError(f"{path}: no usable preference rows out of {stats.rows} (rejected: {stats.rejected})")
    return pairs, stats


def collate_pairs(
    pairs: list[Pair], pad_id: int, ref_logps: torch.Tensor | None = None, width: int | None = None
) -> dict[str, torch.Tensor]:
    """One right-padded batch with the sides interleaved: row 2i is pair i's chosen side, row 2i+1 its
    rejected side, so splitting the rows into even-sized parts (data-parallel ranks, micro-batches) never
    separates a pair. Per-row extras: `margin` (the pair's), `last_index` (of the last real token, where a
    score head reads), `ref_logps` ([pairs, 2] given -> per row). width: pad every batch to it (pipeline
    stages need one shape)."""
    batch = collate([side for p in pairs for side in (p.chosen, p.rejected)], pad_id, width)
    batch["margin"] = torch.tensor([p.margin for p in pairs for _ in range(2)], dtype=torch.float32)
    batch["last_index"] = batch["attention_mask"].sum(1) - 1
    if ref_logps is not None:
        batch["ref_logps"] = ref_logps.reshape(-1).float()
    return batch


def sides(per_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) halves of a per-row tensor of an interleaved pair batch."""
    return per_row[0::2], per_row[1::2]


def eval_pair_batches(
    pairs: list[Pair], batch_size: int, pad_id: int, multiple: int = 1, width: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """All pairs in order, batch_size pairs per batch (order kept so results line up with `pairs`). The
    last batch is filled up to a multiple of `multiple` pairs by repeating its last pair (data-parallel
    ranks need equal shares; multiple = batch_size makes every batch full); callers drop the extra results."""
    batches = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        chunk = chunk + chunk[-1:] * (-len(chunk) % multiple)
        batches.append(collate_pairs(chunk, pad_id, width=width))
    return batches


def pair_batches(pairs: list[Pair], batch_size: int, seed: int) -> EpochBatches:
    """Global batches of pair indices by step; a pair's length is its longer side."""
    lengths = [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs]
    return EpochBatches(lengths, batch_size, seed, "training pairs")


@dataclass
class PreferenceData:
    tokenizer: object
    pad_id: int
    train: list[Pair]
    validation: list[Pair]
    batches: EpochBatches
    stats: dict[str, PreferenceStats]


def load_preference_data(
    model_dir: Path, data_dir: Path, seq_len: int, batch_size: int, seed: int, stage: str
) -> PreferenceData:
    """The tokenizer and the tokenised train/validation pairs of data_dir (the data stage's preference/)."""
    tokenizer, pad_id = chat_tokenizer(model_dir, f"the {stage} stage renders rows")
    train, train_stats = load_pairs(Path(data_dir) / "train.jsonl", tokenizer, seq_len)
    validation, val_stats = load_pairs(Path(data_dir) / "validation.jsonl", tokenizer, seq_len)
    return PreferenceData(
        tokenizer,
        pad_id,
        train,
        validation,
        pair_batches(train, batch_size, seed),
        {"train": train_stats, "validation": val_stats},
    )


class PairwiseTrainer:
    """Trains a model on interleaved pair batches with an Objective (parallel.trainer) through a Learner
    (the engine's Trainer: one process or any layout: dp, ZeRO, tp, pp). The objective's statistics come
    back as means per pair; losses and gradients equal one process's."""

    def __init__(self, cfg, model, model_dir: Path, parallel, objective):
        self.cfg, self.objective, self.pp = cfg, objective, parallel.pp
        self.width = cfg.seq_len if parallel.pp > 1 else None  # pipeline stages keep the first shape they see
        self.learner = Learner.build(
            model_dir,
            parallel,
            mode=cfg.mode,
            optim=cfg.optim,
            num_updates=cfg.max_steps,
            grad_accum=cfg.grad_accum,
            model=model,
        )
        self.dp = self.learner.trainer.dims.dp

    @property
    def model(self):
        """The trained model when the layout keeps it whole on this rank (no pp, tp or FSDP), else None."""
        return self.learner.trainer.whole_model

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step on a global pair batch: per-pair mean statistics, lr, grad_norm."""
        stats, lr, grad_norm = self.learner.update(batch, self.objective)
        return stats | {"lr": lr, "grad_norm": grad_norm}

    def collate(self, pairs: list[Pair], pad_id: int, ref_logps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return collate_pairs(pairs, pad_id, ref_logps, width=self.width)

    def pair_values(self, pairs: list[Pair], batch_size: int, pad_id: int, fn) -> torch.Tensor:
        """[len(pairs), 2] (chosen, rejected) of fn(logits, rows) -> per-row values, for every pair."""
        if self.pp > 1:  # batches shaped exactly like a training batch
            batch_size = self.cfg.batch_size
        multiple = batch_size if self.pp > 1 else self.dp
        out = [
            self.learner.rows(batch, fn)
            for batch in eval_pair_batches(pairs, batch_size, pad_id, multiple=multiple, width=self.width)
        ]
        return torch.cat(out).reshape(-1, 2)[: len(pairs)]


def share_of_pairs(pairs: list[Pair], fn_all) -> torch.Tensor:
    """fn_all(some pairs) -> [n, 2] computed by each rank for its share of `pairs` (every world-th pair),
    then gathered so every rank holds all len(pairs) rows in order (one process: all of them)."""
    from parallel import engine

    rank, world = engine.rank_and_world()
    mine = fn_all(pairs[rank::world]) if pairs[rank::world] else torch.zeros(0, 2)
    out = torch.zeros(len(pairs), 2)
    for r, values in enumerate(engine.all_gather_object(mine)):
        out[r::world] = values
    return out
