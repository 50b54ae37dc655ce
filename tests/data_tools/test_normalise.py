import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.config import PIIConfig
from data_tools.normalise import KINDS, RowError, detect_format, to_messages
from data_tools.sources import SourceReader, plan_units


def test_alpaca_joins_input_and_keeps_system():
    row = {"instruction": "Reverse the word", "input": " abc ", "output": "cba", "system": "Be terse."}
    assert to_messages(row) == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Reverse the word\n\nabc"},
        {"role": "assistant", "content": "cba"},
    ]


def test_sharegpt_roles_are_mapped():
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Bye"},
            {"from": "gpt", "value": "Ciao"},
        ]
    }
    assert [m["role"] for m in to_messages(row)] == ["system", "user", "assistant", "user", "assistant"]


def test_messages_pass_through_stripped():
    row = {"messages": [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Yo\n"}]}
    assert to_messages(row, "messages") == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]


@pytest.mark.parametrize(
    "row,fmt",
    [
        ({"messages": []}, "messages"),
        ({"conversations": []}, "sharegpt"),
        ({"instruction": "x"}, "alpaca"),
        ({"output": "x"}, "alpaca"),
    ],
)
def test_auto_detects_per_row(row, fmt):
    assert detect_format(row) == fmt


@pytest.mark.parametrize(
    "row,reason",
    [
        ([1, 2], "not_an_object"),
        ({"text": "hello"}, "unknown_format"),
        ({"instruction": "Do it"}, "missing_output"),
        ({"instruction": "Do it", "output": "   "}, "empty_answer"),
        ({"instruction": "", "output": "ok"}, "empty_prompt"),
        ({"instruction": 3, "output": "ok"}, "bad_instruction"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "bad_role"),
        ({"conversations": [{"from": "human"}]}, "bad_turn"),
        ({"conversations": "hi"}, "bad_conversations"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "bad_role"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "bad_turn_order"),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "q2"},
                ]
            },
            "no_answer",
        ),
        ({"messages": [{"role": "system", "content": "s"}]}, "no_turns"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "empty_answer"),
    ],
)
def test_bad_rows_are_rejected_with_reason(row, reason):
    with pytest.raises(RowError) as err:
        to_messages(row)
    assert err.value.reason == reason


def test_explicit_format_reports_missing_field():
    with pytest.raises(RowError) as err:
        to_messages({"instruction": "x", "output": "y"}, "sharegpt")
    assert err.value.reason == "missing_conversations"


def test_jsonl_file_with_bad_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"instruction": "Reverse: abc", "output": "cba"}),
                "{not json",
                "",
                json.dumps({"instruction": "Reverse: xyz", "output": ""}),
                json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}),
            ]
        )
        + "\n"
    )
    kinds = _normalise(path, "auto", tmp_path, source=0)
    out = kinds["chat"]
    assert out.num_read == 4  # the blank line is not a row
    assert [r["id"] for r in out.kept] == ["s00f000-0000000", "s00f000-0000004"]
    assert [(r["id"], r["reason"]) for r in out.rejected] == [
        ("s00f000-0000001", "bad_json"),
        ("s00f000-0000003", "empty_answer"),
    ]
    assert out.rejected[0]["raw"] == "{not json"


def test_parquet_file(tmp_path):
    path = tmp_path / "rows.parquet"
    rows = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Hello"}]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    kinds = _normalise(path, "sharegpt", tmp_path, source=1)
    out = kinds["chat"]
    assert out.kept[0]["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert [r["reason"] for r in out.rejected] == ["bad_role"]


def test_preference_rows_are_their_own_kind(tmp_path):
    path = tmp_path / "mixed.jsonl"
    user = {"role": "user", "content": "What is 2 + 3?"}
    path.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},
                {"messages": [user, {"role": "assistant", "content": "5"}]},
                {
                    "chosen": [user, {"role": "assistant", "content": "5"}],
                    "rejected": [user, {"role": "assistant", "content": "4"}],
                },
                {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "5"},
                {"prompt": "What is 2 + 3?", "chosen": "5"},
            ]
        )
        + "\n"
    )
    kinds = _normalise(path, "auto", tmp_path, source=0)
    chat, pref = kinds["chat"], kinds["preference"]
    assert chat.num_read == 1 and pref.num_read == 4
    assert pref.kept[0]["messages"] == [user, {"role": "assistant", "content": "5"}]
    assert pref.kept[0]["rejected"] == [{"role": "assistant", "content": "6"}] and pref.kept[0]["prompt_turns"] == 1
    assert pref.kept[1]["rejected"] == [{"role": "assistant", "content": "4"}]  # implicit prompt
    assert [r["reason"] for r in pref.rejected] == ["identical_responses", "missing_rejected"]
    assert detect_format({"chosen": "a"}) == "preference"


def test_gzip_cut_short_keeps_the_rows_before_and_says_so(tmp_path):
    import gzip

    rows = [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(2000)]
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])  # a download or copy that stopped half way
    kinds = _normalise(path, "auto", tmp_path, source=0)
    out = kinds["chat"]
    assert 0 < len(out.kept) < len(rows)
    assert [r["reason"] for r in out.rejected][-1] == "truncated_file"
    assert all(r["reason"] in ("truncated_file", "truncated_line", "bad_json") for r in out.rejected)


def _normalise(path, fmt, tmp_path, source=0, tasks=1):
    """The normalise run's SourceReader over one file on `tasks` ranks (in this process); per kind the kept
    rows ({"id", **metadata}), rejected rows and rows read, in id order."""
    work = tmp_path / f"work-{tasks}"
    reader = SourceReader(plan_units([(source, 0, path, fmt, path.name)], tasks), str(work), PIIConfig())
    for rank in range(tasks):
        list(reader.run(None, rank, tasks))
    out = {}
    for kind in KINDS:
        kept = [json.loads(x) for f in (work / kind / "shards" / "normalised").glob("*.jsonl") for x in f.open()]
        rejected = [json.loads(x) for f in (work / kind / "rejected" / "normalise").glob("*.jsonl") for x in f.open()]
        counts = [json.loads(f.read_text())[kind] for f in (work / "normalise").glob("*.json")]
        out[kind] = SimpleNamespace(
            kept=sorted(({"id": d["id"], **d["metadata"]} for d in kept), key=lambda r: r["id"]),
            rejected=sorted(rejected, key=lambda r: r["id"]),
            num_read=sum(counts),
        )
    return out


def test_a_large_file_is_cut_into_byte_ranges_with_the_same_rows_and_ids(tmp_path, monkeypatch):
    from data_tools import sources

    lines = [json.dumps({"instruction": f"Say {i} " + "x" * (i % 37), "output": f"{i}"}) for i in range(3000)]
    lines[1234] = "{not json"
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(sources, "MIN_RANGE_BYTES", 1000)
    units = plan_units([(0, 0, path, "auto", "big.jsonl")], 4)
    assert len(units) == 4 and units[0].start == 0 and units[-1].end == path.stat().st_size
    one, four = _normalise(path, "auto", tmp_path), _normalise(path, "auto", tmp_path, tasks=4)
    assert one["chat"].num_read == four["chat"].num_read == 3000
    assert (
        [r["id"] for r in four["chat"].kept]
        == [r["id"] for r in one["chat"].kept]
        == [f"s00f000-{i:07d}" for i in range(3000) if i != 1234]
    )
    assert four["chat"].kept == one["chat"].kept
    assert [(r["id"], r["reason"]) for r in four["chat"].rejected] == [("s00f000-0001234", "bad_json")]
    for rank in range(4):  # every rank got a share
        assert (tmp_path / "work-4" / "chat" / "shards" / "normalised" / f"{rank:05d}.jsonl").stat().st_size > 0
