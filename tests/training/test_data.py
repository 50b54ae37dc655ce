import pytest

from data_tools.normalise import RowError
from data_tools.tokens import assistant_spans
from parallel.tiny import build_tokenizer
from parallel.trainer import IGNORE_INDEX
from training.data import (
    EpochBatches,
    build_examples,
    collate,
    epoch_batches,
    tokenize_conversation,
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Reverse the word: abc"},
    {"role": "assistant", "content": "cba"},
    {"role": "user", "content": "Uppercase the word: xy"},
    {"role": "assistant", "content": "XY"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _labelled_text(tokenizer, example):
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_only_assistant_tokens_carry_labels(tokenizer):
    ex = tokenize_conversation(tokenizer, CONVERSATION)
    assert (
        ex.input_ids
        == tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False)["input_ids"]
    )
    # Each assistant turn's content and its end-of-turn markup, nothing of system or user turns.
    assert _labelled_text(tokenizer, ex) == "cba<|im_end|>\nXY<|im_end|>\n"
    labelled = [i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX]
    for i in labelled:
        assert ex.labels[i] == ex.input_ids[i]
    # Two contiguous runs (one per assistant turn), the second ending at the end of the text.
    runs = sum(1 for a, b in zip(labelled, labelled[1:]) if b != a + 1) + 1
    assert runs == 2 and labelled[-1] == len(ex.input_ids) - 1


def test_spans_come_from_rendered_prefixes(tokenizer):
    text, spans = assistant_spans(tokenizer, CONVERSATION)
    assert [text[a:b] for a, b in spans] == ["cba<|im_end|>\n", "XY<|im_end|>\n"]


def test_template_that_is_not_prefix_stable_is_rejected():
    tok = build_tokenizer()
    # A template that prints the number of messages up front changes every prefix.
    tok.chat_template = "{{ messages|length }}" + tok.chat_template
    with pytest.raises(RowError, match="template_error") as err:
        tokenize_conversation(tok, CONVERSATION[1:3])
    assert "prefixes" in str(err.value.__cause__)


def test_truncation_is_counted_and_label_free_rows_dropped(tokenizer):
    short = {"messages": CONVERSATION[1:3]}
    long_answer = {"messages": [{"role": "user", "content": "Say a lot"}, {"role": "assistant", "content": "x" * 200}]}
    long_prompt = {"messages": [{"role": "user", "content": "y" * 300}, {"role": "assistant", "content": "ok"}]}
    examples, stats = build_examples([short, long_answer, long_prompt], tokenizer, seq_len=64)
    assert (stats.rows, stats.examples, stats.truncated, stats.dropped) == (3, 2, 2, 1)
    assert all(len(ex.input_ids) <= 64 for ex in examples)


def test_batches_are_deterministic_complete_and_length_bucketed():
    lengths = [(i * 37) % 101 for i in range(200)]
    a = epoch_batches(200, lengths, 8, seed=3, epoch=0)
    assert a == epoch_batches(200, lengths, 8, seed=3, epoch=0)
    assert a != epoch_batches(200, lengths, 8, seed=3, epoch=1)
    assert a != epoch_batches(200, lengths, 8, seed=4, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(200)) and all(len(b) == 8 for b in a)
    # Sorting inside buckets keeps each batch's length spread far below the data's spread.
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    assert spread < 20


def test_step_batches_roll_over_epochs(tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * (i % 7 + 1)}]}
        for i in range(20)
    ]
    examples, _ = build_examples(rows, tokenizer, seq_len=64)
    batches = EpochBatches([len(ex.input_ids) for ex in examples], batch_size=6, seed=0)
    assert batches.batches_per_epoch == 3
    first_epoch = [batches(s) for s in range(3)]
    assert len({i for b in first_epoch for i in b}) == 18
    assert batches(3) != first_epoch[0] or batches(4) != first_epoch[1]
    assert batches(1) == first_epoch[1]  # going back to an earlier step gives the same batch
    with pytest.raises(ValueError, match="batch_size"):
        EpochBatches([len(ex.input_ids) for ex in examples], batch_size=21, seed=0)


def test_collate_pads_right_without_labels_or_attention(tokenizer):
    examples, _ = build_examples([{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION[3:5]}], tokenizer, 64)
    batch = collate(examples, pad_id=tokenizer.pad_token_id)
    n0, n1 = (len(ex.input_ids) for ex in examples)
    assert batch["input_ids"].shape == (2, max(n0, n1))
    short = 0 if n0 < n1 else 1
    n = min(n0, n1)
    assert (batch["attention_mask"][short, n:] == 0).all() and (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, n:] == tokenizer.pad_token_id).all()
