"""Preference rows: accepted shapes, labels on the response only, bad rows rejected with a reason."""

import pytest
import torch

from data_tools.synth import BAD_PREFERENCES, generate_tiny_preferences
from parallel.tiny import build_tokenizer
from training.losses import IGNORE_INDEX
from training.preference import PreferenceRowError, build_pairs, collate_pairs, pair_batches, parse_row

USER = {"role": "user", "content": "What is 2 + 3?"}


def _said(role, text):
    return {"role": role, "content": text}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _labelled_text(tok, ex):
    return tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX])


def test_string_row_labels_only_the_response(tok):
    pairs, stats = build_pairs([{"prompt": USER["content"], "chosen": "5", "rejected": "6"}], tok, 96)
    assert stats.pairs == 1 and stats.rejected == {}
    chosen, rejected = pairs[0].chosen, pairs[0].rejected
    assert _labelled_text(tok, chosen) == "5<|im_end|>\n" and _labelled_text(tok, rejected) == "6<|im_end|>\n"
    assert tok.decode(chosen.input_ids).startswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>")
    assert chosen.input_ids[:-3] == rejected.input_ids[:-3]  # same prompt tokens


def test_message_rows_explicit_and_implicit_prompt_agree(tok):
    system = _said("system", "Be brief.")
    rows = [
        {"prompt": [system, USER], "chosen": "5", "rejected": "6"},
        {"prompt": [system, USER], "chosen": [_said("assistant", "5")], "rejected": [_said("assistant", "6")]},
        {"chosen": [system, USER, _said("assistant", "5")], "rejected": [system, USER, _said("assistant", "6")]},
        {
            "prompt": [system, USER],
            "chosen": [system, USER, _said("assistant", "5")],
            "rejected": [system, USER, _said("assistant", "6")],
        },
    ]
    pairs, stats = build_pairs(rows, tok, 96)
    assert stats.pairs == 4
    assert len({(tuple(p.chosen.input_ids), tuple(p.chosen.labels), tuple(p.rejected.labels)) for p in pairs}) == 1


def test_assistant_turns_inside_the_prompt_are_not_labelled(tok):
    prompt = [USER, _said("assistant", "5"), _said("user", "And 2 + 4?")]
    pairs, _ = build_pairs([{"prompt": prompt, "chosen": "6", "rejected": "7"}], tok, 96)
    assert _labelled_text(tok, pairs[0].chosen) == "6<|im_end|>\n"


@pytest.mark.parametrize(
    "row, reason",
    [
        ("text", "not_an_object"),
        ({"prompt": "q", "rejected": "b"}, "missing_chosen"),
        ({"prompt": "q", "chosen": "a"}, "missing_rejected"),
        ({"prompt": "q", "chosen": "a", "rejected": None}, "missing_rejected"),
        ({"chosen": "a", "rejected": "b"}, "missing_prompt"),
        ({"prompt": " ", "chosen": "a", "rejected": "b"}, "empty_prompt"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "empty_chosen"),
        ({"prompt": "q", "chosen": "a", "rejected": []}, "empty_rejected"),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "identical_responses"),
        ({"prompt": "q", "chosen": [{"role": "bot", "content": "a"}], "rejected": "b"}, "bad_chosen"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "bad_prompt"),
        ({"prompt": [_said("assistant", "hi")], "chosen": "a", "rejected": "b"}, "no_prompt_turn"),
        (
            {"chosen": [USER, _said("assistant", "a")], "rejected": [_said("user", "other"), _said("assistant", "b")]},
            "no_prompt_turn",
        ),
    ],
)
def test_bad_rows_have_reasons(row, reason):
    with pytest.raises(PreferenceRowError) as err:
        parse_row(row)
    assert err.value.reason == reason


def test_bad_rows_are_counted_not_raised_and_truncation(tok):
    rows = [
        {"prompt": "q" * 80, "chosen": "a", "rejected": "b"},  # response cut off at seq_len
        {"prompt": "q", "chosen": "a" * 80, "rejected": "b"},  # chosen truncated, still usable
        {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"},
        {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2},
        7,
    ]
    pairs, stats = build_pairs(rows, tok, 64)
    assert stats.rows == 5 and stats.pairs == 2 and stats.truncated == 1
    assert stats.rejected == {"bad_margin": 1, "not_an_object": 1, "response_truncated": 1}
    assert [p.margin for p in pairs] == [0.0, 2.0] and len(pairs[0].chosen.input_ids) == 64


def test_generated_preferences_plant_every_bad_kind_and_loader_rejects_them(tok):
    rows = generate_tiny_preferences(400, seed=3)
    assert rows == generate_tiny_preferences(400, seed=3) != generate_tiny_preferences(400, seed=4)
    assert any(isinstance(r.get("chosen"), list) for r in rows)  # whole-conversation rows too
    pairs, stats = build_pairs(rows, tok, 96)
    num_bad = sum(stats.rejected.values())
    assert 20 <= num_bad <= 70 and stats.pairs + num_bad == 400
    assert (
        set(stats.rejected)
        == {"identical_responses", "empty_chosen", "empty_prompt", "missing_rejected", "missing_chosen"}
        and len(BAD_PREFERENCES) == 6
    )


def test_collate_and_batches_are_deterministic(tok):
    pairs, _ = build_pairs(generate_tiny_preferences(40, seed=1, bad_fraction=0.0), tok, 96)
    batch = collate_pairs(pairs[:3], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and batch["margin"].tolist() == [0.0] * 6  # per row
    # interleaved: row 2i is pair i's chosen side, row 2i + 1 its rejected side
    assert batch["input_ids"][1, : len(pairs[0].rejected.input_ids)].tolist() == pairs[0].rejected.input_ids
    assert batch["input_ids"][2, : len(pairs[1].chosen.input_ids)].tolist() == pairs[1].chosen.input_ids
    ref = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert collate_pairs(pairs[:3], tok.pad_token_id, ref_logps=ref)["ref_logps"].tolist() == [1, 2, 3, 4, 5, 6]
    a, b = pair_batches(pairs, 8, seed=0), pair_batches(pairs, 8, seed=0)
    steps = [a(s) for s in range(10)]
    assert steps == [b(s) for s in range(10)] and all(len(ix) == 8 for ix in steps)
    assert sorted(sum(steps[:5], [])) == sorted(set(sum(steps[:5], [])))  # one epoch: no repeats
    with pytest.raises(ValueError, match="larger than the 40 training pairs"):
        pair_batches(pairs, 64, seed=0)
