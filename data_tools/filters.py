"""Quality filters: datatrove's Gopher, C4 and FineWeb heuristics, re-tuned for short chat rows.

The published thresholds assume web pages of hundreds of words; a chat row like "Spell abc backwards.
/ cba" fails most of them (too few words, no stop words, short lines, no terminal punctuation). The
settings below keep the checks that still mean something for a row: repeated lines and n-grams, symbol
soup, absurd word lengths, lorem ipsum, javascript walls.
"""

from __future__ import annotations

import re

from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.word_tokenizers import WordTokenizer

from data_tools.config import FilterConfig

_WORD_RE = re.compile(r"<[A-Z]+>|\w+(?:['’-]\w+)*|[^\w\s]+")
_SENTENCE_END_RE = re.compile(r"[.!?…]+(?=\s|$)|\n+")


class RegexWordTokenizer(WordTokenizer):
    """Offline English word/sentence splitter; 7-13x faster than spaCy with the same filter decisions.

    PII placeholders such as <EMAIL> stay one word so that scrubbed rows are not penalised as symbol-heavy.
    """

    def __init__(self):
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return _WORD_RE.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text[a:b].strip() for a, b in self.span_tokenize(text)]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for m in _SENTENCE_END_RE.finditer(text):
            spans.append((start, m.end()))
            start = m.end()
        spans.append((start, len(text)))
        return [(a + len(text[a:b]) - len(text[a:b].lstrip()), b) for a, b in spans if text[a:b].strip()]


class MaxCharsFilter(BaseFilter):
    name = "📏 Max chars"

    def __init__(self, max_chars: int, exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        self.max_chars = max_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return len(doc.text) <= self.max_chars or (False, "too_many_chars")


class ChatC4Filter(C4QualityFilter):
    """C4 rules without the rewrite: C4 drops lines it dislikes, but a row's messages must stay whole."""

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        result = super().filter(doc)
        doc.text = text
        return result


def quality_filters(cfg: FilterConfig, exclusion_writer) -> list[tuple[str, BaseFilter]]:
    """(step name, filter) in pipeline order; `exclusion_writer(step)` gives each its rejected-row writer."""
    words = RegexWordTokenizer()
    steps = [("length", MaxCharsFilter(cfg.max_chars, exclusion_writer("length")))]
    if cfg.gopher_repetition:
        # top-n-gram fractions are dropped: in a ten-word row the most common 2-gram covers 20% of the
        # characters even when nothing repeats. Duplicate lines and repeated n-grams still count.
        steps.append(
            (
                "gopher_repetition",
                GopherRepetitionFilter(
                    top_n_grams=(), exclusion_writer=exclusion_writer("gopher_repetition"), language=words
                ),
            )
        )
    if cfg.gopher_quality:
        steps.append(
            (
                "gopher_quality",
                GopherQualityFilter(
                    min_doc_words=cfg.min_words,
                    max_doc_words=cfg.max_words,
                    min_avg_word_length=1,
                    max_avg_word_length=10,
                    max_symbol_word_ratio=cfg.max_symbol_word_ratio,
                    max_ellipsis_lines_ratio=0.5,
                    max_non_alpha_words_ratio=cfg.min_alpha_words_ratio,
                    min_stop_words=None,
                    exclusion_writer=exclusion_writer("gopher_quality"),
                    language=words,
                ),
            )
        )
    if cfg.c4:
        # Answers rarely end in punctuation and code has braces: keep lorem ipsum / javascript / policy.
        steps.append(
            (
                "c4",
                ChatC4Filter(
                    filter_no_terminal_punct=False,
                    min_num_sentences=1,
                    min_words_per_line=-1,
                    filter_curly_bracket=False,
                    exclusion_writer=exclusion_writer("c4"),
                    language=words,
                ),
            )
        )
    if cfg.fineweb:
        # Chat lines are short and unpunctuated by nature; duplicated lines and list-like rows still fail.
        steps.append(
            (
                "fineweb",
                FineWebQualityFilter(
                    line_punct_thr=0.0,
                    short_line_thr=1.0,
                    new_line_ratio=0.5,
                    exclusion_writer=exclusion_writer("fineweb"),
                    language=words,
                ),
            )
        )
    return steps
