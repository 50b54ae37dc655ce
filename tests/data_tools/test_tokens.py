"""The token store: what the data stage writes, what training reads, and the checks between them."""

import json

import numpy as np
import pytest

from data_tools.config import DataConfig
from data_tools.splits import read_split
from data_tools.stage import run_data
from data_tools.steps import SPLITS
from data_tools.tokens import (
    ShardWriter,
    TokenSplit,
    encode_chat,
    encode_pair,
    read_meta,
    row_key,
    write_meta,
)
from parallel.tiny import build_tokenizer
from training.data import load_split
from training.preference import load_pairs

IGNORE = -100


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


def _chat(i: int) -> dict:
    return {
        "id": f"r{i}",
        "messages": [
            {"role": "user", "content": f"Reverse the word number {i}: {'ab' * (i % 7 + 1)}"},
            {"role": "assistant", "content": ("ba" * (i % 7 + 1))},
        ],
    }


def test_rows_come_back_in_key_order_whatever_the_shards(tmp_path, tokenizer):
    rows = [_chat(i) for i in range(40)]
    encoded = {r["id"]: encode_chat(tokenizer, r["messages"])[1] for r in rows}
    for shards in (1, 3):
        store = tmp_path / f"s{shards}"
        writers = [ShardWriter(store / "train" / f"{k:05d}", "chat", len(tokenizer)) for k in range(shards)]
        for i, row in enumerate(rows):
            writers[i % shards].add(encoded[row["id"]], row_key(row["id"]), source=i % 2)
        for w in writers:
            w.close()
        meta = write_meta(store, "chat", tokenizer, None, "tokenizer")
        assert meta["splits"]["train"]["rows"] == 40 and len(meta["splits"]["train"]["shards"]) == shards
        assert meta["splits"]["train"]["tokens"] == sum(len(e["ids"]) for e in encoded.values())
        assert meta["splits"]["train"]["label_tokens"] == sum(int(e["labels"].sum()) for e in encoded.values())
    one, three = TokenSplit(tmp_path / "s1" / "train", "chat"), TokenSplit(tmp_path / "s3" / "train", "chat")
    by_key = sorted(rows, key=lambda r: row_key(r["id"]))
    for i, row in enumerate(by_key):
        for split in (one, three):
            assert split.get(i, "ids").tolist() == encoded[row["id"]]["ids"].tolist()
            assert split.get(i, "labels").tolist() == encoded[row["id"]]["labels"].tolist()
            assert split.get(i, "ids", 5).tolist() == encoded[row["id"]]["ids"][:5].tolist()
    assert one.lengths("ids").tolist() == three.lengths("ids").tolist()
    assert one.sources.tolist() == three.sources.tolist()


@pytest.fixture(scope="module")
def data_run(tmp_path_factory, tokenizer_dir):
    base = tmp_path_factory.mktemp("store")
    chat = [{"instruction": f"Repeat the word {w} twice", "output": f"{w} {w}"} for w in _words(60)]
    pref = [{"prompt": f"Spell {w} backwards", "chosen": w[::-1], "rejected": w, "margin": 0.5} for w in _words(60, 7)]
    (base / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    (base / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref))
    cfg = DataConfig(
        sources=[{"path": "chat.jsonl"}, {"path": "pref.jsonl"}],
        dedup={"minhash": False},
        splits={"validation": 0.2, "test": 0.1},
        tasks=2,
    )
    return base, run_data(cfg, tokenizer_dir, base / "out", base_dir=base)


def _words(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=int(rng.integers(4, 12)))) for _ in range(n)]


@pytest.mark.slow
def test_data_stage_tokenizes_once_what_training_would(data_run, tokenizer):
    base, manifest = data_run
    out = base / "out"
    meta = read_meta(out / "tokens")
    assert meta["kind"] == "chat" and meta["splits"]["train"]["rows"] == manifest["splits"]["train"]
    assert manifest["tokens"]["train"]["rows"] == manifest["splits"]["train"]
    assert all(
        name.startswith(("train/", "validation/", "test/", "rejected/", "tokens/")) for name in manifest["files"]
    )
    for name in SPLITS:
        rows = read_split(out, name)
        split = TokenSplit(out / "tokens" / name, "chat")
        assert len(split) == len(rows) == manifest["splits"][name]
        by_key = sorted(rows, key=lambda r: row_key(r["id"]))
        for i, row in enumerate(by_key):
            text, arrays = encode_chat(tokenizer, row["messages"])
            assert text == row["text"]
            assert split.get(i, "ids").tolist() == arrays["ids"].tolist()
            assert split.get(i, "labels").tolist() == arrays["labels"].tolist()
        assert set(split.sources.tolist()) == {0}  # every chat row came from source 0
    # preference rows: both sides, the margin kept
    pref = TokenSplit(out / "preference" / "tokens" / "train", "preference")
    rows = sorted(read_split(out / "preference", "train"), key=lambda r: row_key(r["id"]))
    assert len(pref) == len(rows) > 0
    for i, row in enumerate(rows):
        _, arrays = encode_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"])
        for field, value in arrays.items():
            assert pref.get(i, field).tolist() == value.tolist()
    assert pref.margins.tolist() == [0.5] * len(rows) and set(pref.sources.tolist()) == {1}


@pytest.mark.slow
def test_training_reads_the_store_and_checks_the_tokenizer(data_run, tokenizer, tmp_path):
    base, manifest = data_run
    out = base / "out"
    lengths = TokenSplit(out / "tokens" / "train", "chat").lengths("ids")
    seq_len = int(np.sort(lengths)[len(lengths) // 2])  # half the rows are cut, some lose every label
    examples, stats = load_split(out, "train", tokenizer, seq_len=seq_len)
    assert stats.rows == manifest["splits"]["train"] and stats.truncated > 0
    assert len(examples) == stats.examples == stats.rows - stats.dropped
    ex = examples[0]
    assert len(ex.input_ids) <= seq_len and ex.input_ids.dtype == np.int64
    assert all(lab in (IGNORE, tok) for lab, tok in zip(ex.labels.tolist(), ex.input_ids.tolist()))
    assert examples.lengths.max() <= seq_len and len(examples.lengths) == len(examples)
    pairs, pstats = load_pairs(out / "preference", "train", tokenizer, seq_len=64)
    assert len(pairs) == pstats.pairs == manifest["preference"]["splits"]["train"] and pairs[0].margin == 0.5
    # a model whose tokenizer differs from the one the data stage used is refused with what to do
    other = build_tokenizer()
    other.add_tokens(["<extra_token>"])
    with pytest.raises(ValueError, match="different tokenizer.*rerun the data stage"):
        load_split(out, "train", other, seq_len=16)
    with pytest.raises(ValueError, match="token store of chat rows"):
        load_pairs(out, "train", tokenizer, seq_len=16)


def test_jsonl_only_dirs_get_a_store_rebuilt_when_the_rows_change(tmp_path, tokenizer):
    for name, ids in (("train", range(12)), ("validation", range(100, 104))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(_chat(i)) + "\n" for i in ids))
    examples, stats = load_split(tmp_path, "train", tokenizer, seq_len=64)
    assert len(examples) == 12 and read_meta(tmp_path / "tokens")["built_from"]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(5)) + '"not a row"\n')
    examples, stats = load_split(tmp_path, "train", tokenizer, seq_len=64)
    assert len(examples) == 5 and stats.rejected == {"not_an_object": 1}


def test_a_row_the_template_cannot_render_is_rejected_with_its_reason(tmp_path, tokenizer):
    tok = build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if 'BOOM' in m['content'] %}{{ raise_exception('cannot render') }}{% endif %}"
        "{% endfor %}" + tok.chat_template
    )
    tok.save_pretrained(tmp_path / "tok")
    rows = [{"instruction": f"Say the word {w}", "output": w} for w in _words(20, 3)]
    rows[4]["output"] = "BOOM goes the row"
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(sources=[{"path": "rows.jsonl"}], dedup={"minhash": False}, tasks=1)
    manifest = run_data(cfg, tmp_path / "tok", tmp_path / "out", base_dir=tmp_path)
    assert manifest["steps"]["chat_format"]["reasons"] == {"template_error": 1}
    assert sum(manifest["splits"].values()) == 19
    [(rejected)] = read_split(tmp_path / "out" / "rejected", "chat_format")
    assert rejected["reason"] == "template_error" and "BOOM" in rejected["messages"][1]["content"]
