"""A check between MinHash stages 2 and 3: keep only candidate pairs whose real Jaccard similarity
reaches the LSH threshold.

LSH buckets are a probabilistic filter. On short templated rows ("Swap the first and last letters of:
abc / cba") most shingles are template, two different rows share ~55% of them, and with 14 bands of 8
hashes each such pair collides ~13% of the time: over thousands of pairs that removed most of a
template. Measuring the candidates' shingle sets keeps the near-duplicates (Jaccard ~1 after
normalisation) and drops the coincidences.
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
    """Rewrites each `.dups` file of MinHash stage 2 without the pairs below `threshold` Jaccard.

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
