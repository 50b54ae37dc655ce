from datatrove.data import Document
from datatrove.utils.text import split_into_sentences

from data_tools import synth
from data_tools.config import FilterConfig, PIIConfig
from data_tools.filters import RegexWordTokenizer, quality_filters
from data_tools.normalise import chat_text, to_messages
from data_tools.pii import Scrubber

LOW_QUALITY_MARKERS = ("####", "buy now", "lorem ipsum", "javascript", "click here")


def _verdict(filters, messages):
    doc = Document(text=chat_text(messages), id="x")
    for name, step in filters:
        result = step.filter(doc)
        if result is not True:
            return name, result[1]
    return None


def _is_low_quality(row):
    return any(m in row["instruction"] for m in LOW_QUALITY_MARKERS) or len(row["instruction"]) >= 600


def test_planted_low_quality_rejected_and_clean_rows_kept():
    filters = quality_filters(FilterConfig(), lambda step: None)
    scrubber = Scrubber(PIIConfig())
    rejected, clean_rejected, num_low = set(), [], 0
    for row in synth.generate_tiny_tasks(1500, seed=1):
        messages = [{**m, "content": scrubber.scrub(m["content"])[0]} for m in to_messages(row)]
        verdict = _verdict(filters, messages)
        if _is_low_quality(row):
            num_low += 1
            assert verdict is not None, row
            rejected.add(verdict[0])
        elif verdict is not None:
            clean_rejected.append((row, verdict))
    assert num_low > 30 and clean_rejected == []
    assert rejected == {"gopher_repetition", "gopher_quality"}


def test_c4_and_fineweb_still_bite():
    filters = dict(quality_filters(FilterConfig(gopher_repetition=False), lambda step: None))
    lorem = Document(text="Write a filler text.\nLorem ipsum dolor sit amet.", id="1")
    javascript = Document(text="Enable JavaScript to view this page.\nJavaScript required", id="2")
    dup_lines = Document(text="Say hi twice.\nhi there friend\nhi there friend", id="3")
    assert filters["c4"].filter(lorem) == (False, "lorem_ipsum")
    assert filters["c4"].filter(javascript) == (False, "too_few_sentences")
    assert filters["fineweb"].filter(dup_lines) == (False, "char_dup_ratio")


def test_c4_does_not_rewrite_kept_rows():
    c4 = dict(quality_filters(FilterConfig(), lambda step: None))["c4"]
    doc = Document(text="Explain cookies.\nThis site uses cookies.\nThey store state.", id="1")
    assert c4.filter(doc) is True
    assert doc.text == "Explain cookies.\nThis site uses cookies.\nThey store state."


def test_max_chars_and_min_words_come_from_config():
    filters = dict(quality_filters(FilterConfig(max_chars=20, min_words=3), lambda step: None))
    assert filters["length"].filter(Document(text="x" * 21, id="1")) == (False, "too_many_chars")
    assert filters["gopher_quality"].filter(Document(text="Hi\nyo", id="2")) == (False, "gopher_short_doc")


def test_regex_tokenizer_words_and_sentences():
    words = RegexWordTokenizer()
    assert words.word_tokenize("Mail <EMAIL>, don't wait...") == ["Mail", "<EMAIL>", ",", "don't", "wait", "..."]
    text = "One. Two!\nthree four\n\nFive?"
    assert words.sent_tokenize(text) == ["One.", "Two!", "three four", "Five?"]
    parts = split_into_sentences(text, words)  # datatrove cuts at our span ends
    assert len(parts) == 4 and "".join(parts) == text
