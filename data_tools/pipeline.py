"""The data stage as a short chain of datatrove executor runs.

Before these, the normalise run (data_tools.sources) reads the sources on every rank. Every
document-level step (PII, filters, dedup filters, chat template + tokenization, splitting, writing the
splits and the token store) runs inside the streaming runs; only the dedup barriers (find exact duplicates,
MinHash buckets and clusters) need runs of their own. With both dedups on that is 6 runs per row kind:
  scrub+filter+exact-sig -> exact-find -> exact-filter+minhash-sig -> buckets -> verify+remove
  -> minhash-filter+tokenize+split+write
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.dedup import (
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
    MinhashDedupBuckets,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.utils.text import TextNormConfig

from data_tools.config import DataConfig, FilterConfig
from data_tools.dedup import MinhashRemoveVerified
from data_tools.filters import RegexWordTokenizer, quality_filters
from data_tools.pii import ChatPIIFormatter, detectors
from data_tools.quality import LanguageFilter, PerplexityRangeFilter, late_filters
from data_tools.steps import (
    RankShardReader,
    RejectWriter,
    SplitAssigner,
    TokenizeFilter,
    TokenStoreWriter,
    shard_writer,
    split_writer,
)

# Rejected-row reasons for steps whose datatrove filter gives none.
DEFAULT_REASONS = {"exact_dedup": "exact_duplicate", "minhash_dedup": "near_duplicate"}


@dataclass
class Run:
    name: str
    pipeline: list
    tasks: int


@dataclass
class Plan:
    runs: list[Run]
    steps: list[str]  # document steps in order, each with rejected/<step>/ under the work folder
    pii_detectors: list[str] = field(default_factory=list)  # the kinds the PII step scrubs, in order
    filters: FilterConfig | None = None  # whose model-based steps add their statistics to the manifest


def document_text(doc: Document) -> str:
    return doc.text


class _Work:
    """Folder layout under the work directory."""

    def __init__(self, root: Path):
        self.root = root

    def __call__(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))

    def rejects(self, step: str) -> RejectWriter:
        return RejectWriter(self("rejected", step), step, DEFAULT_REASONS.get(step, step))


def build_plan(cfg: DataConfig, work_dir: Path, tokenizer_dir: Path, chat_template: str, kind: str = "chat") -> Plan:
    """Runs in order for rows of `kind`; rows come from `work_dir/shards/normalised/<rank>.jsonl` (the
    normalise run, data_tools.sources) and end as `work_dir/splits/<split>/<rank>.jsonl` and the token
    store's shards `work_dir/tokens/<split>/<rank>.*`."""
    work, tasks = _Work(work_dir), cfg.tasks
    filters = quality_filters(cfg.filters, work.rejects)
    if cfg.filters.language is not None:
        # first: the heuristics after it are tuned for English words (a Chinese row is one long "word")
        filters.insert(
            0, ("language", LanguageFilter(cfg.filters.language, work("language"), work.rejects("language")))
        )
    pending = [ChatPIIFormatter(cfg.pii, work("pii"))] + [f for _, f in filters]
    steps = ["pii"] + [name for name, _ in filters]
    source, runs = work("shards", "normalised"), []
    for name, signature, barriers, dedup_filter in _dedups(cfg, work):
        out = work("shards", name)
        runs.append(Run(f"{name}_signature", [RankShardReader(source), *pending, shard_writer(out), signature], tasks))
        runs.extend(barriers)
        pending, source = [dedup_filter], out
        steps.append(name)
    for name, scorer in late_filters(cfg.filters, work.rejects, work, str(tokenizer_dir)):
        pending.append(scorer)
        steps.append(name)
    percentiles = cfg.filters.perplexity.keep_percentiles if cfg.filters.perplexity else None
    if percentiles is not None:  # every rank scores first; the next run filters against all their scores
        out = work("shards", "perplexity")
        runs.append(Run("perplexity_score", [RankShardReader(source), *pending, shard_writer(out)], tasks))
        ranged = PerplexityRangeFilter(percentiles, work("scores", "perplexity"), work.rejects("perplexity"))
        pending, source = [ranged], out
    formatter = TokenizeFilter(
        str(tokenizer_dir), chat_template, cfg.format.max_tokens, cfg.format.system_prompt, work.rejects("chat_format")
    )
    splitter = SplitAssigner(cfg.splits.validation, cfg.splits.test, cfg.splits.seed, cfg.dedup.normalize_numbers)
    runs.append(
        Run(
            "format_split",
            [
                RankShardReader(source),
                *pending,
                formatter,
                splitter,
                split_writer(work("splits")),
                TokenStoreWriter(work("tokens"), kind, str(tokenizer_dir)),
            ],
            tasks,
        )
    )
    return Plan(runs, steps + ["chat_format"], detectors(cfg.pii), cfg.filters)


def _dedups(cfg: DataConfig, work: _Work):
    """(name, signature step, barrier runs, filter step) for each enabled dedup, exact first."""
    if cfg.dedup.exact:
        exact = ExactDedupConfig(content_getter=document_text)
        yield (
            "exact_dedup",
            ExactDedupSignature(work("exact", "sigs"), exact),
            [Run("exact_find", [ExactFindDedups(work("exact", "sigs"), work("exact", "dups"), exact)], 1)],
            ExactDedupFilter(work("exact", "dups"), exact, exclusion_writer=work.rejects("exact_dedup")),
        )
    if cfg.dedup.minhash:
        minhash = MinhashConfig(
            n_grams=cfg.dedup.minhash_ngrams,
            num_buckets=cfg.dedup.minhash_buckets,
            hashes_per_bucket=cfg.dedup.minhash_hashes_per_bucket,
            norm_config=TextNormConfig(norm_numbers=cfg.dedup.normalize_numbers),
        )
        words = RegexWordTokenizer()
        barriers = [
            # one task per bucket: datatrove splits buckets, not documents, across these ranks
            Run(
                "minhash_buckets",
                [MinhashDedupBuckets(work("minhash", "sigs"), work("minhash", "buckets"), config=minhash)],
                minhash.num_buckets,
            ),
            Run(
                "minhash_cluster",
                [
                    MinhashRemoveVerified(
                        work("minhash", "buckets"),
                        work("shards", "minhash_dedup"),
                        work("minhash", "remove"),
                        minhash,
                        words,
                        threshold=cfg.dedup.minhash_threshold,
                    ),
                ],
                1,
            ),
        ]
        yield (
            "minhash_dedup",
            MinhashDedupSignature(work("minhash", "sigs"), config=minhash, language=words),
            barriers,
            MinhashDedupFilter(work("minhash", "remove"), exclusion_writer=work.rejects("minhash_dedup")),
        )
