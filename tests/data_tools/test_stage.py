"""The whole data stage on real datatrove runs (forked local ranks)."""

import hashlib
import json
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datatrove.utils.text import TextNormConfig, simplify_text

from data_tools import synth
from data_tools.config import DataConfig
from data_tools.splits import read_split, rejected_rows
from data_tools.stage import chat_template_for, local_executor, run_data
from data_tools.steps import SPLITS, prompt_key

PII_PATTERNS = [
    r"[\w.]+@example\.com",
    r"203\.0\.113\.\d",
    r"415-555-\d{4}",
    r"sk-[0-9a-f]{32}",
    r"ghp_[a-z0-9]{36}",
    r"AKIA[A-Z2-7]{16}",
]
LOW_QUALITY_MARKERS = ("####", "buy now", "lorem ipsum", "javascript", "click here")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from parallel.tiny import build_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save_pretrained(path)
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _full_text(row: dict, normalize_numbers: bool = False) -> str:
    """A row as the dedup compares it (numbers kept apart unless dedup.normalize_numbers)."""
    text = "\n".join(m["content"] for m in row["messages"])
    return simplify_text(text, TextNormConfig(norm_numbers=normalize_numbers))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tokenizer_dir):
    cfg = DataConfig(sources=[{"generate": "tiny-tasks", "num_rows": 1500}], tasks=2)
    out = tmp_path_factory.mktemp("data")
    events = []
    manifest = run_data(cfg, tokenizer_dir, out, base_dir=out, progress=events.append)
    return cfg, out, manifest, events


@pytest.mark.slow
def test_outputs_and_progress(tiny_run):
    _, out, manifest, events = tiny_run
    assert [e["done"] for e in events] == list(range(1, events[0]["total"] + 1))
    assert manifest == json.loads((out / "manifest.json").read_text())
    for name in SPLITS:
        rows = read_split(out, name)
        assert len(rows) == manifest["splits"][name] > 0
        assert all(set(r) == {"id", "messages", "text"} for r in rows)
        assert all(r["text"].startswith("<|im_start|>user\n") for r in rows)
    assert manifest["splits"]["train"] > 0.75 * sum(manifest["splits"].values())
    assert manifest["tokenizer"]["chat_template"] == "tokenizer"


@pytest.mark.slow
def test_low_quality_and_duplicates_rejected_with_reasons(tiny_run):
    cfg, out, manifest, _ = tiny_run
    raw = {f"s00f000-{i:07d}": row for i, row in enumerate(_read(out / "raw" / "00-tiny-tasks.jsonl"))}
    kept = {r["id"]: r for name in SPLITS for r in read_split(out, name)}
    rejected = {r["id"]: (step, r["reason"]) for step, r in rejected_rows(out)}
    assert not kept.keys() & rejected.keys() and len(kept) + len(rejected) == len(raw)
    low = [
        i
        for i, row in raw.items()
        if any(m in row["instruction"] for m in LOW_QUALITY_MARKERS) or len(row["instruction"]) >= 600
    ]
    assert len(low) > 30
    assert {rejected[i][0] for i in low} <= {
        "gopher_repetition",
        "gopher_quality",
        "c4",
        "fineweb",
        "exact_dedup",
        "minhash_dedup",
    }
    assert all(rejected[i][1] for i in low)
    assert manifest["steps"]["exact_dedup"]["reasons"]["exact_duplicate"] > 50
    assert manifest["steps"]["minhash_dedup"]["reasons"]["near_duplicate"] > 20
    # no two kept rows are the same after normalisation, and every near-duplicate dropped has its twin kept
    texts = [_full_text(r, cfg.dedup.normalize_numbers) for r in kept.values()]
    assert len(texts) == len(set(texts))
    near = read_split(out / "rejected", "minhash_dedup")
    assert all(_full_text(r, cfg.dedup.normalize_numbers) in set(texts) for r in near)


@pytest.mark.slow
def test_no_pii_in_any_output(tiny_run):
    _, out, manifest, _ = tiny_run
    assert sum(manifest["steps"]["pii"]["replaced"][k] for k in ("email", "ip", "phone", "secret")) > 50
    raw_text = (out / "raw" / "00-tiny-tasks.jsonl").read_text()
    assert all(re.search(p, raw_text) for p in PII_PATTERNS)  # the planted PII is really there
    outputs = [p for p in out.rglob("*") if p.is_file() and "raw" not in p.relative_to(out).parts]
    assert len(outputs) > 10
    for path in outputs:
        text = path.read_text(errors="replace")
        assert not [p for p in PII_PATTERNS if re.search(p, text)], path


@pytest.mark.slow
def test_splits_share_no_prompt(tiny_run):
    cfg, out, _, _ = tiny_run
    norm = cfg.dedup.normalize_numbers
    keys = {name: {prompt_key(r["messages"], norm) for r in read_split(out, name)} for name in SPLITS}
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]


@pytest.mark.slow
def test_manifest_counts_and_hashes_add_up(tiny_run):
    _, out, manifest, _ = tiny_run
    steps = list(manifest["steps"].values())
    assert steps[0]["in"] == 1500
    for step in steps:
        assert step["in"] == step["kept"] + step["rejected"] == step["kept"] + sum(step["reasons"].values())
    for before, after in zip(steps, steps[1:]):
        assert after["in"] == before["kept"]
    assert steps[-1]["kept"] == sum(manifest["splits"].values())
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    [source] = manifest["sources"]
    assert source["files"][0]["sha256"] == hashlib.sha256((out / source["files"][0]["path"]).read_bytes()).hexdigest()


@pytest.mark.slow
def test_deterministic(tiny_run, tmp_path, tokenizer_dir):
    cfg, _, manifest, _ = tiny_run
    again = run_data(cfg, tokenizer_dir, tmp_path, base_dir=tmp_path)
    assert again["manifest_hash"] == manifest["manifest_hash"]
    assert again["files"] == manifest["files"]


def _write_sources(base: Path) -> None:
    alpaca = [
        {"instruction": f"Reverse the word: {w}", "input": "", "output": w[::-1]}
        for w in ("apple", "banana", "cherry", "damson")
    ]
    alpaca.append({"instruction": "Reverse the word: apple", "input": "", "output": "elppa"})  # exact dup
    alpaca.append({"instruction": "Describe it", "input": "", "output": ""})  # empty answer
    alpaca.append(
        {
            "instruction": "Summarise: the quiet harbour town wakes early, fishermen mend their nets, "
            "children race bicycles past bright market stalls while gulls circle.",
            "input": "",
            "output": "A busy harbour morning.",
        }
    )  # over max_tokens
    (base / "data").mkdir()
    lines = [json.dumps(r) for r in alpaca] + ["{broken"]
    (base / "data" / "a.jsonl").write_text("\n".join(lines) + "\n")
    sharegpt = [
        {"conversations": [{"from": "human", "value": f"Uppercase the word: {w}"}, {"from": "gpt", "value": w.upper()}]}
        for w in ("kiwi", "lemon", "mango")
    ]
    sharegpt.append(
        {
            "conversations": [
                {"from": "human", "value": "Mail me at al@example.com: plum"},
                {"from": "gpt", "value": "PLUM"},
            ]
        }
    )
    sharegpt.append({"conversations": [{"from": "robot", "value": "hi"}]})
    pq.write_table(pa.Table.from_pylist(sharegpt), base / "data" / "b.parquet")


def test_jsonl_and_parquet_sources(tmp_path, tokenizer_dir):
    _write_sources(tmp_path)
    cfg = DataConfig(
        sources=[{"path": "data/*.jsonl"}, {"path": "data/b.parquet", "format": "sharegpt"}],
        format={"max_tokens": 120, "system_prompt": "Be brief."},
        tasks=2,
    )
    calls = []

    def factory(pipeline, logging_dir, tasks, depends=None):
        calls.append((Path(logging_dir).name, tasks, depends))
        return local_executor(pipeline, logging_dir, tasks, depends)

    manifest = run_data(cfg, tokenizer_dir, tmp_path / "out", base_dir=tmp_path, executor_factory=factory)
    steps = manifest["steps"]
    assert steps["normalise"] == {
        "in": 13,
        "kept": 10,
        "rejected": 3,
        "reasons": {"bad_json": 1, "bad_role": 1, "empty_answer": 1},
    }
    assert steps["exact_dedup"]["rejected"] == 1
    assert steps["chat_format"]["reasons"] == {"too_many_tokens": 1}
    assert sum(manifest["splits"].values()) == 8
    assert [s["files"][0]["path"] for s in manifest["sources"]] == ["data/a.jsonl", "data/b.parquet"]
    rows = [r for name in SPLITS for r in read_split(tmp_path / "out", name)]
    assert all(r["messages"][0] == {"role": "system", "content": "Be brief."} for r in rows)
    assert any("<EMAIL>" in r["text"] for r in rows) and not any("al@example.com" in r["text"] for r in rows)
    # every datatrove run went through the factory, each depending on the one before
    assert [c[0] for c in calls][:3] == ["normalise", "exact_dedup_signature", "exact_find"]
    assert calls[0][2] is None and calls[1][2] is None and all(c[2] is not None for c in calls[2:])
    assert calls[4][:2] == ("minhash_buckets", 14)


def test_bad_sources_are_user_errors(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match="matched no files"):
        run_data(DataConfig(sources=[{"path": "missing/*.jsonl"}]), tokenizer_dir, tmp_path, base_dir=tmp_path)
    with pytest.raises(ValueError, match="no rows left for train"):
        (tmp_path / "bad.jsonl").write_text('{"prompt": "q", "chosen": "a"}\n{"broken\n')
        run_data(DataConfig(sources=[{"path": "bad.jsonl"}]), tokenizer_dir, tmp_path / "out", base_dir=tmp_path)


def test_preference_rows_get_their_own_chain_and_splits(tmp_path, tokenizer_dir):
    user = {"role": "user", "content": "Reverse the word: apple"}
    rows = [
        {"prompt": f"Reverse the word: {w}", "chosen": w[::-1], "rejected": w}
        for w in ("apple", "banana", "cherry", "damson", "elder", "fig", "grape", "hazel")
    ]
    rows += [
        {"prompt": "Reverse the word: apple", "chosen": "elppa", "rejected": "apple"},  # exact duplicate
        {"prompt": "Reverse the word: kiwi", "chosen": "iwik", "rejected": "mail kiwi@example.com"},  # PII
        {
            "prompt": "Reverse the word: lime",
            "chosen": "emil",
            "rejected": "The quiet harbour town wakes early, fishermen mend their "
            "nets, children race bicycles past bright market stalls while gulls circle.",
        },  # rejected side too long
        {"prompt": "Reverse the word: plum", "chosen": "mulp", "rejected": "mulp"},  # identical sides
        {"chosen": [user, {"role": "assistant", "content": "elppa"}]},  # no rejected side
    ]
    (tmp_path / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = [{"instruction": f"Uppercase the word: {w}", "output": w.upper()} for w in ("apple", "kiwi", "lime")]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    cfg = DataConfig(
        sources=[{"path": "chat.jsonl"}, {"path": "pref.jsonl"}],
        format={"max_tokens": 100},
        splits={"validation": 0.2, "test": 0.2},
        tasks=2,
    )
    manifest = run_data(cfg, tokenizer_dir, tmp_path / "out", base_dir=tmp_path)
    out, pref = tmp_path / "out", manifest["preference"]
    assert sum(manifest["splits"].values()) == 3  # chat rows are not near-duplicates of preference rows
    assert pref["steps"]["normalise"]["reasons"] == {"identical_responses": 1, "missing_rejected": 1}
    assert pref["steps"]["exact_dedup"]["rejected"] == 1
    assert pref["steps"]["chat_format"]["reasons"] == {"too_many_tokens": 1}
    assert pref["steps"]["pii"]["replaced"]["email"] == 1
    kept = {name: read_split(out / "preference", name) for name in SPLITS}
    assert sum(map(len, kept.values())) == sum(pref["splits"].values()) == 9
    for row in (r for rs in kept.values() for r in rs):
        assert set(row) == {"id", "prompt", "chosen", "rejected", "text", "text_rejected"}
        assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
        assert row["text_rejected"].endswith(row["rejected"][-1]["content"] + "<|im_end|>\n")
    assert any("<EMAIL>" in r["rejected"][0]["content"] for rs in kept.values() for r in rs)
    assert read_split(out / "preference" / "rejected", "chat_format")
    # a prompt lands in the same split whatever the row kind, so no test prompt is trained on
    chat_split = {prompt_key(r["messages"]): name for name in SPLITS for r in read_split(out, name)}
    pref_split = {prompt_key(r["prompt"]): name for name, rs in kept.items() for r in rs}
    assert all(pref_split[k] == v for k, v in chat_split.items() if k in pref_split)


def test_chat_template_choice(tmp_path, tokenizer_dir):
    from parallel.tiny import CHATML_TEMPLATE, build_tokenizer

    assert chat_template_for(tokenizer_dir, "auto")[1] == "tokenizer"
    assert chat_template_for(tokenizer_dir, "chatml") == (CHATML_TEMPLATE, "chatml")
    bare = build_tokenizer()
    bare.chat_template = None
    bare.save_pretrained(tmp_path)
    assert chat_template_for(tmp_path, "auto") == (CHATML_TEMPLATE, "chatml")


def test_synth_markers_match_generator():
    # guards the markers above against drift in synth.LOW_QUALITY
    rows = [make(random.Random(0)) for make in synth.LOW_QUALITY]
    assert all(any(m in p for m in LOW_QUALITY_MARKERS) or len(p) >= 600 for p, _ in rows)


def _hostile_corpus(root: Path) -> tuple[dict[str, int], list[dict]]:
    """Good chat rows (distinct, each kept) mixed with lines real exports contain; returns the expected
    rejection count per reason and the good rows. Generated here, so nothing is shipped."""
    good = [
        {"instruction": f"Spell the number {n} in words, then add a short note", "output": f"{n} is written {n}."}
        for n in ("seven", "eight", "nine", "ten", "eleven", "twelve")
    ]
    good.append(
        {
            "messages": [
                {"role": "user", "content": "Line\u2028separator inside?"},
                {"role": "assistant", "content": "Yes, kept as text."},
            ]
        }
    )
    good.append({"instruction": "A long answer follows", "output": "word " * 40_000})  # a 200 KB line
    lines = [b"\xef\xbb\xbf" + json.dumps(good[0]).encode()]  # byte-order mark on the first line
    lines += [json.dumps(good[1]).encode() + b"\r"]  # CRLF
    lines += [b'{"instruction": "caf\xe9", "output": "latin-1 byte"}']  # not UTF-8
    lines += [b'{"instruction": "nul\x00", "output": "x"}']  # a raw NUL byte
    lines += [json.dumps(r, ensure_ascii=False).encode() for r in good[2:]]
    lines += [b"[1, 2, 3]", b"42", b'"just a string"', b"null"]  # JSON that is no object
    lines += [b'{"instruction": 5, "output": "wrong type"}', b'{"instruction": "", "output": ""}']
    lines += [b"{not json", b"", b"   ", b'{"instruction": "half a pair \\ud83d", "output": "x"}']
    lines += [b'{"instruction": "cut off at the end of the ex']  # truncated last line, no newline
    (root / "data").mkdir(parents=True)
    (root / "data" / "hostile.jsonl").write_bytes(b"\n".join(lines))
    expected = {
        "bad_utf8": 1,
        "nul_byte": 1,
        "not_an_object": 4,
        "bad_json": 1,
        "truncated_line": 1,
        "lone_surrogate": 1,
    }
    return expected, good


def test_hostile_lines_are_rejected_with_reasons_and_good_rows_kept(tmp_path, tokenizer_dir):
    expected, good = _hostile_corpus(tmp_path)
    cfg = DataConfig(
        sources=[{"path": "data/hostile.jsonl"}],
        format={"max_tokens": 400_000},  # the 200 KB line is ~200k byte-level tokens
        dedup={"minhash": False},
        # the reading is under test, not the quality policy: the 200 KB row passes the filters
        filters={
            "gopher_repetition": False,
            "gopher_quality": False,
            "c4": False,
            "fineweb": False,
            "max_chars": 400_000,
        },
        splits={"validation": 0.0, "test": 0.0},
        tasks=1,
    )
    manifest = run_data(cfg, tokenizer_dir, tmp_path / "out", base_dir=tmp_path)
    normalise = manifest["steps"]["normalise"]
    reasons = normalise["reasons"]
    # the wrong-typed and the empty row get the row checks' own reasons
    assert {k: v for k, v in reasons.items() if k in expected} == expected
    assert normalise["rejected"] == sum(expected.values()) + 2 and normalise["kept"] == len(good)
    assert sum(manifest["splits"].values()) == len(good)
    rows = read_split(tmp_path / "out", "train")
    answers = sorted(r["messages"][-1]["content"] for r in rows)
    assert answers == sorted(g.get("output", "").strip() or g["messages"][-1]["content"] for g in good)
    rejected = read_split(tmp_path / "out" / "rejected", "normalise")
    assert any(r["reason"] == "bad_utf8" and "caf\\xe9" in r["raw"] for r in rejected)
