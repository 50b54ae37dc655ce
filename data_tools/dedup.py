"""MinHash dedup's last two steps: check candidate pairs by their true Jaccard, then remove only rows that
have a kept near-duplicate.

LSH buckets are a probabilistic filter. On short templated rows ("Swap the first and last letters of:
abc / cba") most shingles are template, two different rows share ~55% of them, and with 14 bands of 8
hashes each such pair collides ~13% of the time: over thousands of pairs that removed most of a
template. MinhashVerifyPairs measures each candidate pair's shingle sets, built exactly as the
signatures were (same text normalisation, tokenizer and n), and keeps the pairs at or above
`dedup.minhash_threshold`. datatrove's clustering would then remove every member of a connected
component but one, so a row could go because of a chain (A~B, B~C, A and C far apart);
MinhashRemoveVerified walks each group's rows in order and removes a row only when its true Jaccard with a
row already kept reaches the threshold.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict

from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import SENTINEL, MinhashConfig
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.text import ngrams, simplify_text
from datatrove.utils.word_tokenizers import WordTokenizer

_PAIR = struct.Struct("<4I")


def lsh_threshold(config: MinhashConfig) -> float:
    """The similarity at which a pair becomes more likely than not to share a bucket."""
    return (1 / config.num_buckets) ** (1 / config.hashes_per_bucket)


class MinhashVerifyPairs(PipelineStep):
    """Rewrites each `.dups` file of MinHash stage 2 without the pairs below `threshold` Jaccard (default:
    the LSH threshold of `config`; the data stage passes `dedup.minhash_threshold`).

    `docs_folder` holds `<rank>.jsonl`, the documents in exactly the order stage 1 hashed them.
    """

    type = "🫂 - DEDUP"
    name = "🎯 MinHash verify pairs"

    def __init__(
        self,
        input_folder: DataFolderLike,
        docs_folder: DataFolderLike,
        output_folder: DataFolderLike,
        config: MinhashConfig,
        word_tokenizer: WordTokenizer,
        threshold: float | None = None,
    ):
        super().__init__()
        self.input_folder = get_datafolder(input_folder)
        self.docs_folder = get_datafolder(docs_folder)
        self.output_folder = get_datafolder(output_folder)
        self.config, self.word_tokenizer = config, word_tokenizer
        self.threshold = lsh_threshold(config) if threshold is None else threshold

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        assert world_size == 1, "pair verification needs every pair in one task"
        pairs = {name: self._read_pairs(name) for name in self.input_folder.list_files(glob_pattern="*.dups")}
        wanted = defaultdict(set)
        for pair_list in pairs.values():
            for f1, d1, f2, d2 in pair_list:
                wanted[f1].add(d1)
                wanted[f2].add(d2)
        shingles = self._load_shingles(wanted)
        for name, pair_list in pairs.items():
            with self.output_folder.open(name, "wb") as out:
                for f1, d1, f2, d2 in pair_list:
                    self.stat_update("candidate_pairs")
                    if f1 == SENTINEL or self._similar(shingles[f1, d1], shingles[f2, d2]):
                        out.write(_PAIR.pack(f1, d1, f2, d2))
                        self.stat_update("verified_pairs")

    def _read_pairs(self, name: str) -> list[tuple[int, int, int, int]]:
        with self.input_folder.open(name, "rb") as f:
            return list(read_tuples_from_file(f, "4I"))

    def _load_shingles(self, wanted: dict[int, set[int]]) -> dict[tuple[int, int], set[str]]:
        shingles = {}
        for file_id, doc_ids in wanted.items():
            if file_id == SENTINEL:
                continue
            with self.docs_folder.open(f"{file_id:05d}.jsonl", "rt", encoding="utf-8") as f:
                for doc_id, line in enumerate(f):
                    if doc_id in doc_ids:
                        shingles[file_id, doc_id] = self._shingles(json.loads(line)["text"])
        return shingles

    def _shingles(self, text: str) -> set[str]:
        words = self.word_tokenizer.word_tokenize(simplify_text(text, self.config.norm_config))
        return {" ".join(gram) for gram in ngrams(words, self.config.n_grams)}

    def _similar(self, a: set[str], b: set[str]) -> bool:
        return len(a & b) >= self.threshold * len(a | b)


class MinhashRemoveVerified(MinhashVerifyPairs):
    """Verifies the candidate pairs like MinhashVerifyPairs, then writes `<file>.remove` (MinhashDedupFilter's
    input) to `output_folder` instead of pairs: within each group of rows joined by verified pairs, rows are
    walked in (file, row) order and a row is removed only when its true Jaccard with a row already kept
    reaches `threshold`. So every removed row has a kept twin at the threshold, even where LSH paired
    rows as a chain (it pairs neighbours in sorted signature order: A-B, B-C for three equal rows)."""

    name = "🎯 MinHash verify + remove"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        assert world_size == 1, "removal needs every pair in one task"
        pairs = [p for name in self.input_folder.list_files(glob_pattern="*.dups") for p in self._read_pairs(name)]
        pairs = [(f1, d1, f2, d2) for f1, d1, f2, d2 in pairs if f1 != SENTINEL]  # SENTINEL: an index, unused
        wanted = defaultdict(set)
        for f1, d1, f2, d2 in pairs:
            wanted[f1].add(d1)
            wanted[f2].add(d2)
        shingles = self._load_shingles(wanted)
        parent: dict = {}

        def root(x):
            while parent.setdefault(x, x) != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for f1, d1, f2, d2 in pairs:
            self.stat_update("candidate_pairs")
            if self._similar(shingles[f1, d1], shingles[f2, d2]):
                self.stat_update("verified_pairs")
                parent[root((f1, d1))] = root((f2, d2))
        kept, removals = defaultdict(list), defaultdict(list)
        for node in sorted(parent):
            group = kept[root(node)]
            if any(self._similar(shingles[node], shingles[other]) for other in group):
                removals[node[0]].append(node[1])
                self.stat_update("to_remove")
            else:
                group.append(node)
        for file_id, docs in removals.items():
            with self.output_folder.open(f"{file_id:06d}.remove", "wb") as out:
                for doc in docs:
                    out.write(struct.pack("<I", doc))
