"""Step batching: which examples make the global batch of each optimizer step, and how its rows are laid out.

The batch of step s is a pure function of (the examples' lengths and sources, seed, s), so a resumed run
sees exactly the batches it would have seen had it never stopped, and every parallel layout trains on the
same examples (each rank builds the same global batch and the Trainer takes its slice).

- EpochBatches: per epoch, a shuffled selection of the examples (every example once, or a weighted mix of
  the data sources), cut into chunks of BUCKET_BATCHES batches sorted by length (little padding), the
  batches shuffled. Per-epoch state is a few numpy arrays the size of the data (no Python list per row),
  so it scales to millions of rows.
- pack_rows / collate_packed: a step's examples packed into as few rows of at most seq_len tokens as
  possible, documents kept apart by position_ids that restart at 0 (the model attends within a document
  only) and by labels that never cross a document boundary; the token-mean loss and the gradients are
  those of the unpacked batch.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from parallel.trainer import IGNORE_INDEX

# Global batches are cut from chunks of this many batches after sorting each chunk by length:
# padding stays small while the order is still shuffled.
BUCKET_BATCHES = 16

_EPOCH, _SOURCE = 0, 1  # random streams: an epoch's shuffle; a source's passes over its rows


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """A generator that depends on (seed, stream) only; any int seed (negative ones too)."""
    return np.random.default_rng([seed % 2**64, *stream])


def mix_shares(rows: dict[int, int], weights: dict[int, float]) -> dict[int, int]:
    """Examples per epoch from each source: N = the rows of the sources with weight > 0, source s gets
    N * w_s / sum(w) of them, rounded down, the examples left over going one each to the sources with the
    largest remainders (ties: the lower source index), so the shares add up to N. Sources with weight 0
    get none. rows: source index -> its number of examples (sources without rows may be left out)."""
    bad = sorted(s for s in rows if rows[s] and s not in weights)
    if bad:
        raise ValueError(f"data.sources.{bad[0]}.weight: the source has training examples but no weight")
    for s, w in sorted(weights.items()):
        if w < 0 or not math.isfinite(w):
            raise ValueError(f"data.sources.{s}.weight: must be a finite number >= 0, got {w}")
        if w > 0 and not rows.get(s, 0):
            raise ValueError(
                f"data.sources.{s}.weight: the source has weight {w:g} but no training examples to draw from"
            )
    mixed = sorted(s for s, w in weights.items() if w > 0)
    if not mixed:
        raise ValueError("data.sources: every weight is 0; at least one source must have a weight > 0")
    total = sum(rows[s] for s in mixed)
    weight_sum = math.fsum(weights[s] for s in mixed)
    exact = {s: total * weights[s] / weight_sum for s in mixed}
    shares = {s: math.floor(exact[s]) for s in mixed}
    left = total - sum(shares.values())
    for s in sorted(mixed, key=lambda s: (-(exact[s] - shares[s]), s))[:left]:
        shares[s] += 1
    return {s: shares.get(s, 0) for s in sorted(set(rows) | set(weights))}


class EpochBatches:
    """Deterministic global batches (index lists) by optimizer step, over items of the given lengths
    (training examples, preference pairs, prompts); epochs roll over as needed. Items of similar length
    share a batch, and step s's batch is a function of s alone (for the same data and seed), so a resumed
    run picks up the data where it stopped.

    An epoch holds N items; the N % batch_size left over after shuffling are dropped at random, and every
    step sees batch_size items (batches_per_epoch = N // batch_size).

    sources[i]: the index (into the recipe's data.sources) of the source item i came from; weights:
    source index -> its weight (data.sources.<i>.weight), None for natural proportions.
    - Without weights every item appears once per epoch (N = all items), whatever its source.
    - With weights an epoch holds N = the items of the sources with weight > 0 (those with weight 0 are
      left out), source s contributing round(N * w_s / sum(w)) of them (mix_shares: rounded so the
      shares add up to N). Each source's items are drawn from an endless stream of fresh random
      permutations of its rows, epoch after epoch: a source with fewer rows than its share repeats them
      (every row once per pass), one with more rows gets a different subset each epoch, and every row is
      drawn once before any is drawn again. The drawn items are then shuffled together.
    """

    def __init__(
        self,
        lengths,
        batch_size: int,
        seed: int,
        unit: str = "training examples",
        sources: np.ndarray | None = None,
        weights: dict[int, float] | None = None,
    ):
        self._lengths = np.asarray(lengths)
        if self._lengths.ndim != 1:
            raise ValueError(f"lengths of the {unit}: expected a 1-D array, got shape {self._lengths.shape}")
        n = len(self._lengths)
        self.batch_size, self.seed = batch_size, seed
        self._by_source: dict[int, np.ndarray] = {}
        self.shares: dict[int, int] | None = None
        if weights is not None:
            if sources is None:
                raise ValueError("source weights need the source of every item (sources=)")
            sources = np.asarray(sources)
            if sources.shape != (n,):
                raise ValueError(f"sources: expected one source index per item ({n}), got shape {sources.shape}")
            # One stable sort: every source's item indices, ascending, as views of one array.
            order = np.argsort(sources, kind="stable").astype(_index_dtype(n))
            ids, starts, counts = np.unique(sources[order], return_index=True, return_counts=True)
            self._by_source = {int(s): order[a : a + c] for s, a, c in zip(ids, starts, counts)}
            self.shares = mix_shares({s: len(v) for s, v in self._by_source.items()}, dict(weights))
        self.examples_per_epoch = n if self.shares is None else sum(self.shares.values())
        if self.examples_per_epoch < batch_size:
            raise ValueError(f"batch_size {batch_size} is larger than the {self.examples_per_epoch} {unit}")
        self.batches_per_epoch = self.examples_per_epoch // batch_size
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)
        self._batch_order = np.empty(0, dtype=np.int64)

    def __call__(self, step: int) -> list[int]:
        """The item indices of 0-based step `step`'s global batch."""
        epoch, index = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            self._order, self._batch_order = self._build_epoch(epoch)
            self._epoch = epoch
        start = int(self._batch_order[index]) * self.batch_size
        return self._order[start : start + self.batch_size].tolist()

    def epoch_items(self, epoch: int) -> np.ndarray:
        """The items of epoch `epoch` in shuffled order (before the remainder is dropped)."""
        rng = _rng(self.seed, _EPOCH, epoch)
        if self.shares is None:
            return rng.permutation(len(self._lengths)).astype(_index_dtype(len(self._lengths)))
        drawn = [self._draw(s, epoch, share) for s, share in self.shares.items() if share]
        items = np.concatenate(drawn)
        return items[rng.permutation(len(items))]

    def _draw(self, source: int, epoch: int, share: int) -> np.ndarray:
        """Positions [epoch * share, (epoch + 1) * share) of the source's stream of row permutations."""
        rows = self._by_source[source]
        n = len(rows)
        lo, hi = epoch * share, (epoch + 1) * share
        parts = []
        for p in range(lo // n, (hi - 1) // n + 1):
            perm = rows[_rng(self.seed, _SOURCE, source, p).permutation(n)]
            parts.append(perm[max(lo - p * n, 0) : min(hi - p * n, n)])
        return np.concatenate(parts)

    def _build_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(items in batch-sized runs, the order the runs are taken in) for one epoch: shuffle, drop the
        remainder (random items, not always the longest), sort chunks of BUCKET_BATCHES batches by length,
        shuffle the batches."""
        items = self.epoch_items(epoch)
        items = items[: len(items) - len(items) % self.batch_size]
        chunk = self.batch_size * BUCKET_BATCHES
        full = len(items) - len(items) % chunk
        if full:
            block = items[:full].reshape(-1, chunk)
            by_length = np.argsort(self._lengths[block], axis=1, kind="stable")
            items[:full] = np.take_along_axis(block, by_length, axis=1).reshape(-1)
        if full < len(items):
            tail = items[full:]
            items[full:] = tail[np.argsort(self._lengths[tail], kind="stable")]
        batch_order = _rng(self.seed, _EPOCH, epoch, 1).permutation(len(items) // self.batch_size)
        return items, batch_order


def _index_dtype(n: int):
    return np.int32 if n < 2**31 else np.int64


def epoch_batches(num_examples: int, lengths, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Index lists of the global batches of one epoch of EpochBatches over the first num_examples lengths
    (for inspection and tests; training asks EpochBatches for one step's batch)."""
    batches = EpochBatches(np.asarray(lengths)[:num_examples], batch_size, seed)
    first = epoch * batches.batches_per_epoch
    return [batches(first + i) for i in range(batches.batches_per_epoch)]


def steps_for_epochs(num_epochs: float, steps_per_epoch: int) -> int:
    """ceil(num_epochs x steps_per_epoch) optimizer steps (at least 1); products within 1e-9 of an
    integer count as that integer (0.1 x 30 is 3 steps, not 4)."""
    return max(1, math.ceil(round(num_epochs * steps_per_epoch, 9)))


def resolve_max_steps(cfg, steps_per_epoch: int):
    """The stage config with max_steps resolved from num_epochs (a copy), or cfg itself when num_epochs is
    unset. Called once the training data is loaded, before the Learner (its LR schedule needs max_steps)."""
    if getattr(cfg, "num_epochs", None) is None:
        return cfg
    return cfg.model_copy(update={"max_steps": steps_for_epochs(cfg.num_epochs, steps_per_epoch)})


# --- packing: a step's examples in as few rows as possible ------------------------------------------------


def pack_rows(lengths: Sequence[int], capacity: int, multiple: int = 1) -> list[list[int]]:
    """Rows of positions into `lengths` (each at most `capacity` tokens), their number a multiple of
    `multiple`; rows may be empty.

    First-fit decreasing (longest first, into the first row it fits, ties by position) finds few rows;
    their number is rounded up to the multiple. The same examples are then also dealt, longest first, to
    the emptiest of that many rows (ties: the lower row); that layout is taken when everything fits and its
    longest row is no longer than first-fit's (rows padded to the longest row waste less, ranks get even
    work), else first-fit's rows are topped up with empty ones. Deterministic.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise ValueError(f"an example of {too_long[0]} tokens does not fit a packed row of {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    first_fit: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        for r, load in enumerate(loads):
            if load + lengths[i] <= capacity:
                first_fit[r].append(i)
                loads[r] += lengths[i]
                break
        else:
            first_fit.append([i])
            loads.append(lengths[i])
    count = max(multiple, -(-len(first_fit) // multiple) * multiple)
    balanced: list[list[int]] = [[] for _ in range(count)]
    even = [0] * count
    for i in order:
        r = min(range(count), key=lambda r: (even[r], r))
        if even[r] + lengths[i] > capacity:
            break
        balanced[r].append(i)
        even[r] += lengths[i]
    else:
        if max(even) <= max(loads, default=0):
            return balanced
    return first_fit + [[] for _ in range(count - len(first_fit))]


def collate_packed(examples, pad_id: int, seq_len: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """A step's examples packed into rows of at most seq_len tokens (pack_rows), their number a multiple
    of `multiple` (the layout's row split: dp x microbatches x grad_accum), as a batch of input_ids,
    labels and position_ids, right-padded to the longest row; no attention_mask.

    position_ids restart at 0 for every document (and for the padding after the last), so the model
    attends within a document only: transformers builds a block-diagonal causal mask from them when
    attention_mask is None (sdpa/eager/flex; flash-attention takes them as varlen sequences), and RoPE
    sees each document's own positions. The label at each document's first position is IGNORE_INDEX:
    the shifted cross-entropy would otherwise predict it from the previous document's last token (an
    unpacked row never predicts its position 0). Padding and the empty rows carry no labels. So the label
    tokens, and the token-mean loss and its gradients, are those of the unpacked batch (tests: within
    1e-6 on the micro model). transformers detects the packing only when the forward has no KV cache
    (the Trainer's models run with use_cache off) and no attention_mask; pipeline stages take neither
    position_ids, so SFT packs at pp = 1 only.
    examples: objects with input_ids and labels (lists or 1-D arrays of equal length).
    """
    lengths = [len(ex.input_ids) for ex in examples]
    rows = pack_rows(lengths, seq_len, multiple)
    width = max(1, max(sum(lengths[i] for i in row) for row in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at : at + n] = torch.as_tensor(np.asarray(examples[i].input_ids), dtype=torch.long)
            labels[r, at + 1 : at + n] = torch.as_tensor(np.asarray(examples[i].labels[1:]), dtype=torch.long)
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}
