"""Unpaired (KTO) rows {prompt, completion, label}: parsing, tokenisation, and their own chain of the data
stage (normalised, PII-scrubbed, filtered, deduped; broken rows kept aside with their reason)."""

import json

import numpy as np
import pytest

from data_tools import synth
from data_tools.config import DataConfig
from data_tools.normalise import RowError, parse_unpaired, row_kind, to_record
from data_tools.splits import read_split
from data_tools.stage import run_data
from data_tools.steps import SPLITS, prompt_key
from data_tools.tokens import FIELDS, TokenSplit, encode_unpaired


@pytest.fixture(scope="module")
def tokenizer():
    from parallel.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


USER = {"role": "user", "content": "Reverse the word: apple"}
ANSWER = {"role": "assistant", "content": "elppa"}


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "q", "completion": "a"}, "missing_label"),
        ({"prompt": "q", "completion": "a", "label": "true"}, "bad_label"),
        ({"prompt": "q", "completion": "a", "label": 1}, "bad_label"),
        ({"prompt": "q", "completion": "  ", "label": True}, "empty_completion"),
        ({"prompt": "q", "completion": [USER], "label": True}, "empty_completion"),
        ({"prompt": "q", "label": False}, "missing_completion"),
        ({"completion": "a", "label": False}, "missing_prompt"),
        ({"prompt": " ", "completion": "a", "label": False}, "empty_prompt"),
    ],
)
def test_broken_rows_say_why(row, reason):
    assert row_kind(row, "auto") == "unpaired"
    with pytest.raises(RowError) as err:
        to_record(row)
    assert err.value.reason == reason


def test_strings_and_messages_give_the_same_row():
    as_text = parse_unpaired({"prompt": USER["content"], "completion": "elppa", "label": True})
    as_messages = parse_unpaired({"prompt": [USER], "completion": [USER, ANSWER], "label": True})
    assert as_text == as_messages == ([USER], [ANSWER], True)
    record = to_record({"prompt": [USER], "completion": [ANSWER], "label": False})
    assert record == {"messages": [USER, ANSWER], "prompt_turns": 1, "label": False}
    assert row_kind({"messages": [USER, ANSWER], "label": True}, "auto") == "chat"  # a chat row's own field


def test_tokenisation_labels_the_completion_only(tokenizer):
    text, arrays = encode_unpaired(tokenizer, [USER], [ANSWER], False)
    assert set(arrays) == set(FIELDS["unpaired"]) and arrays["desirable"].tolist() == [0]
    ids, mask = arrays["ids"], arrays["labels"].astype(bool)
    assert "elppa" in tokenizer.decode(ids[mask]) and "Reverse" not in tokenizer.decode(ids[mask])
    assert "Reverse" in tokenizer.decode(ids[~mask]) and text.endswith("elppa<|im_end|>\n")


def test_unpaired_rows_get_their_own_chain_splits_and_store(tmp_path, tokenizer_dir):
    words = ("apple", "banana", "cherry", "damson", "elder", "fig", "grape", "hazel")
    rows = [{"prompt": f"Reverse the word: {w}", "completion": w[::-1], "label": True} for w in words]
    rows += [{"prompt": f"Reverse the word: {w}", "completion": w, "label": False} for w in words]
    rows += [
        {"prompt": "Reverse the word: apple", "completion": "elppa", "label": True},  # exact duplicate
        {"prompt": "Reverse the word: kiwi", "completion": "mail kiwi@example.com", "label": False},  # PII
        {"prompt": "Reverse the word: lime", "completion": "emil"},  # no label
        {"prompt": "Reverse the word: plum", "completion": "mulp", "label": "yes"},  # not a bool
        {"prompt": "Reverse the word: pear", "completion": "", "label": True},  # empty completion
        {
            "prompt": "Reverse the word: lime",
            "completion": "The quiet harbour town wakes early, fishermen mend their nets, children race "
            "bicycles past bright market stalls while gulls circle.",
            "label": False,
        },  # too long
    ]
    (tmp_path / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [{"prompt": f"Reverse the word: {w}", "chosen": w[::-1], "rejected": w} for w in words[:3]]
    (tmp_path / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    cfg = DataConfig(
        sources=[{"path": "kto.jsonl"}, {"path": "pref.jsonl"}],
        format={"max_tokens": 100},
        splits={"validation": 0.2, "test": 0.2},
        tasks=2,
    )
    manifest = run_data(cfg, tokenizer_dir, tmp_path / "out", base_dir=tmp_path)
    out, kto = tmp_path / "out", manifest["unpaired"]
    assert sum(manifest["preference"]["splits"].values()) == 3  # the pairs went their own way
    assert kto["steps"]["normalise"]["reasons"] == {"bad_label": 1, "empty_completion": 1, "missing_label": 1}
    assert kto["steps"]["exact_dedup"]["rejected"] == 1
    assert kto["steps"]["chat_format"]["reasons"] == {"too_many_tokens": 1}
    assert kto["steps"]["pii"]["replaced"]["email"] == 1
    rejected = read_split(out / "unpaired" / "rejected", "normalise")
    assert sorted(r["reason"] for r in rejected) == ["bad_label", "empty_completion", "missing_label"]
    kept = {name: read_split(out / "unpaired", name) for name in SPLITS}
    assert sum(map(len, kept.values())) == sum(kto["splits"].values()) == 17
    for row in (r for rs in kept.values() for r in rs):
        assert set(row) == {"id", "prompt", "completion", "label", "text"} and isinstance(row["label"], bool)
        assert row["prompt"][-1]["role"] == "user" and row["completion"][-1]["role"] == "assistant"
    assert any("<EMAIL>" in r["completion"][0]["content"] for rs in kept.values() for r in rs)
    # the token store: one desirable flag per row, matching the split rows' labels
    for name, split_rows in kept.items():
        if split_rows:
            store = TokenSplit(out / "unpaired" / "tokens" / name, "unpaired")
            flags = sorted(int(store.get(i, "desirable")[0]) for i in range(len(store)))
            assert flags == sorted(int(r["label"]) for r in split_rows)
            assert all(np.asarray(store.get(i, "labels")).any() for i in range(len(store)))
    # a prompt lands in the same split whatever the row kind
    pref_split = {prompt_key(r["prompt"]): n for n in SPLITS for r in read_split(out / "preference", n)}
    kto_split = {prompt_key(r["prompt"]): n for n, rs in kept.items() for r in rs}
    assert all(kto_split[k] == v for k, v in pref_split.items() if k in kto_split)


def test_generated_unpaired_rows_come_from_the_pairs():
    pairs = synth.generate_tiny_preferences(20, seed=3, bad_fraction=0.0)
    rows = synth.generate_tiny_unpaired(40, seed=3, bad_fraction=0.0)
    assert rows == [r for p in pairs for r in synth.unpair(p)]
    assert [r["label"] for r in rows] == [True, False] * 20
    noisy = synth.generate_tiny_unpaired(200, seed=3)
    broken = [r for r in noisy if r.get("label") not in (True, False) or not str(r.get("completion", "")).strip()]
    assert 5 <= len(broken) <= 40
