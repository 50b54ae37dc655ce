"""Preference rows ({prompt, chosen, rejected}) as token pairs with labels on the response only.

Accepted rows:
- {"prompt": str | messages, "chosen": str, "rejected": str}: the responses are assistant turns;
- {"prompt": messages (optional), "chosen": messages, "rejected": messages}: the response messages
  follow the prompt; without a prompt, the longest shared prefix of the two conversations is it.
A row that cannot be used is rejected with a short reason and counted, never raised.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_tools.normalise import RowError as PreferenceRowError
from data_tools.normalise import parse_preference as parse_row
from data_tools.normalise import row_margin
from data_tools.tokens import FIELDS, TokenSplit, encode_pair, encode_turns, read_meta
from training.data import EpochBatches, Example, chat_tokenizer, collate, open_store, to_example
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
    # Assistant turns inside the prompt are context, not part of what is being preferred.
    skip = sum(m["role"] == "assistant" for m in prompt)
    _, ids, mask = encode_turns(tokenizer, prompt + response, skip_answers=skip)
    return Example(ids.tolist(), np.where(mask.astype(bool), ids, IGNORE_INDEX).tolist())


def to_pair(arrays: dict[str, np.ndarray], seq_len: int, margin: float = 0.0) -> tuple[Pair | None, bool]:
    """(pair or None, a side was cut at seq_len); None when a side has no response token left."""
    chosen, cut_c = to_example(arrays["chosen_ids"], arrays["chosen_labels"], seq_len)
    rejected, cut_r = to_example(arrays["rejected_ids"], arrays["rejected_labels"], seq_len)
    if chosen is None or rejected is None:
        return None, cut_c or cut_r
    return Pair(chosen, rejected, margin), cut_c or cut_r


def build_pairs(rows: list, tokenizer, seq_len: int) -> tuple[list[Pair], PreferenceStats]:
    """In memory (tests, small tools): tokenised pairs of the usable rows, and counts of what was truncated
    or rejected (by reason). Training stages read the token store instead (load_pairs)."""
    pairs, stats, reasons = [], PreferenceStats(rows=len(rows)), Counter()
    for row in rows:
        try:
            prompt, chosen, rejected = parse_row(row)
            margin = row_margin(row)
            _, arrays = encode_pair(tokenizer, prompt, chosen, rejected)
            pair, cut = to_pair(arrays, seq_len, margin)
            if pair is None:
                raise PreferenceRowError("response_truncated")
        except PreferenceRowError as err:
            reasons[err.reason] += 1
            continue
        stats.truncated += cut
        chosen, rejected = (Example(ex.input_ids.tolist(), ex.labels.tolist()) for ex in (pair.chosen, pair.rejected))
        pairs.append(Pair(chosen, rejected, pair.margin))
    stats.pairs, stats.rejected = len(pairs), dict(sorted(reasons.items()))
    return pairs, stats


class PairExamples(Sequence):
    """A preference split of the token store as pairs, read from the mapped files on access: sides cut at
    seq_len, pairs with a side left without response tokens dropped (counted as 'response_truncated').
    `lengths` (a pair's longer side, numpy) feeds batching."""

    def __init__(self, split: TokenSplit, seq_len: int, rejected: dict | None = None):
        self.split, self.seq_len = split, seq_len
        full = {side: split.lengths(f"{side}_ids") for side in ("chosen", "rejected")}
        cut = np.flatnonzero((full["chosen"] > seq_len) | (full["rejected"] > seq_len))
        drop = [i for i in cut if self._pair(int(i))[0] is None]
        keep = np.ones(len(split), dtype=bool)
        keep[drop] = False
        self.index = np.flatnonzero(keep)
        self.lengths = np.minimum(np.maximum(full["chosen"], full["rejected"]), seq_len)[self.index]
        self.sources = split.sources[self.index]
        reasons = Counter(rejected or {})
        if drop:
            reasons["response_truncated"] += len(drop)
        self.stats = PreferenceStats(len(split), len(self.index), len(cut) - len(drop), dict(sorted(reasons.items())))

    def _pair(self, row: int) -> tuple[Pair | None, bool]:
        arrays = {f: self.split.get(row, f, self.seq_len) for f in FIELDS["preference"]}
        return to_pair(arrays, self.seq_len, float(self.split.margins[row]))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._pair(int(self.index[i]))[0]


def load_pairs(data_dir: Path, name: str, tokenizer, seq_len: int) -> tuple[PairExamples, PreferenceStats]:
    """Split `name` of data_dir's preference token store (training.data.open_store) as pairs."""
    store = open_store(data_dir, "preference", tokenizer)
    rejected = (read_meta(store).get("rejected") or {}).get(name)
    pairs = PairExamples(TokenSplit(store / name, "preference"), seq_len, rejected)
    if not len(pairs):
        stats = pairs.stats
        raise ValueError(
            f"{data_dir}: no usable preference rows in the {name} split out of {stats.rows} "
            f"(rejected: {stats.rejected})"
        )
    return pairs, pairs.stats


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


def pair_batches(
    pairs: list[Pair], batch_size: int, seed: int, weights: dict[int, float] | None = None
) -> EpochBatches:
    """Global batches of pair indices by step; a pair's length is its longer side. weights: the data
    sources' (data.sources.<i>.weight by source index), mixed by the pairs' `sources`."""
    lengths = getattr(pairs, "lengths", None)
    if lengths is None:
        lengths = [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs]
    sources = getattr(pairs, "sources", None) if weights else None
    return EpochBatches(lengths, batch_size, seed, "training pairs", sources=sources, weights=weights)


@dataclass
class PreferenceData:
    tokenizer: object
    pad_id: int
    train: list[Pair]
    validation: list[Pair]
    batches: EpochBatches
    stats: dict[str, PreferenceStats]


def load_preference_data(
    model_dir: Path,
    data_dir: Path,
    seq_len: int,
    batch_size: int,
    seed: int,
    stage: str,
    weights: dict[int, float] | None = None,
) -> PreferenceData:
    """The tokenizer and the tokenised train/validation pairs of data_dir (the data stage's preference/);
    weights: the recipe's source weights (None: every pair once per epoch)."""
    tokenizer, pad_id = chat_tokenizer(model_dir, f"the {stage} stage renders rows", data_dir)
    train, train_stats = load_pairs(data_dir, "train", tokenizer, seq_len)
    validation, val_stats = load_pairs(data_dir, "validation", tokenizer, seq_len)
    return PreferenceData(
        tokenizer,
        pad_id,
        train,
        validation,
        pair_batches(train, batch_size, seed, weights),
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
