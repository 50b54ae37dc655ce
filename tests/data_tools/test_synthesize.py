"""Synthetic rows from a real OpenAI-compatible server on 127.0.0.1 (tests/eval/judge_server.py)."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from data_tools.config import DataConfig, PIIConfig, SynthesizeConfig
from data_tools.normalise import RowError
from data_tools.stage import run_data
from data_tools.synthesize import Synthesizer, load_seeds, parse_reply, read_progress
from tests.eval.judge_server import JudgeServer

KEY = "sk-synthkey0123456789abcdef0123456789"
REAL = [{"instruction": f"Name a fact about the number {n}.", "output": f"{n} is a whole number."} for n in range(30)]


def writer(messages, count):
    """Two pairs about the prompt's topic; 'gibberish' topics get prose, 'duplicate' ones a real row,
    'contact' ones an email address."""
    prompt = messages[-1]["content"]
    topic = re.search(r"about: (.*)\n", prompt).group(1)
    n = int(re.search(r"Write (\d+)", prompt).group(1))
    if "gibberish" in topic:
        return "Sure! Here are some great pairs for you."
    if "duplicate" in topic:
        return json.dumps([{"instruction": REAL[0]["instruction"], "response": REAL[0]["output"]}])
    tail = " Write to ada@example.com for more." if "contact" in topic else ""
    pairs = [
        {"instruction": f"Explain {topic}, part {k}.", "response": f"Here is part {k} about {topic}.{tail}"}
        for k in range(n)
    ]
    return "```json\n" + json.dumps(pairs) + "\n```"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from parallel.tiny import build_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save_pretrained(path)
    return path


def _synth(server, topics, **extra) -> dict:
    endpoint = {"base_url": server.base_url, "model": "writer-1", "api_key_env": "SYNTH_TEST_KEY", "max_retries": 3}
    return {"endpoint": endpoint, "topics": topics, **extra}


@pytest.mark.slow
def test_rows_end_to_end_dedup_pii_provenance_and_malformed(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setenv("SYNTH_TEST_KEY", KEY)
    (tmp_path / "real.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REAL))
    topics = ["tide pools", "paper kites", "gibberish please", "duplicate of a real row", "contact details"]
    busy = {"left": 1}

    def rule(messages, count):  # the first request meets a 503: the client backs off and asks again
        if busy["left"]:
            busy["left"] -= 1
            return 503, "overloaded"
        return writer(messages, count)

    with JudgeServer(rule) as server:
        cfg = DataConfig(
            sources=[{"path": "real.jsonl"}, {"synthesize": _synth(server, topics)}],
            tasks=2,
            filters={"min_words": 1},
            dedup={"minhash": False},
        )
        manifest = run_data(cfg, tokenizer_dir, tmp_path / "out", base_dir=tmp_path)
    assert server.requests == len(topics) + 1
    assert server.authorizations == {f"Bearer {KEY}"}

    synthesized = manifest["sources"][1]["synthesized"]
    assert synthesized["seeds"] == 5 and synthesized["requests"] == 5
    assert synthesized["generated"] == 2 + 2 + 1 + 2 and synthesized["malformed"] == {"not_json": 1}
    assert manifest["steps"]["exact_dedup"]["rejected"] == 1  # the generated copy of a real row
    assert synthesized["kept"] == 6
    rows = [
        json.loads(line)
        for split in ("train", "validation", "test")
        for p in (tmp_path / "out" / split).glob("*")
        for line in p.read_text().splitlines()
    ]
    generated = [r for r in rows if r["id"].startswith("s01")]
    assert len(generated) == 6 and len(rows) == 30 + 6
    assert all(r["provenance"]["generator"] == f"writer-1 @ {server.base_url}" for r in generated)
    assert {r["provenance"]["seed_id"] for r in generated} == {
        s for s, t in load_seeds(cfg.sources[1].synthesize, tmp_path) if "gibberish" not in t and "duplicate" not in t
    }
    assert all(len(r["provenance"]["template_sha256"]) == 64 for r in generated)
    assert all("ada@example.com" not in json.dumps(r) for r in rows)
    assert any("<EMAIL>" in json.dumps(r) for r in generated)

    malformed = [
        json.loads(line)
        for p in (tmp_path / "out" / "rejected" / "synthesize").rglob("*.jsonl")
        for line in p.read_text().splitlines()
    ]
    assert [(m["reason"], m["reply"]) for m in malformed] == [("not_json", "Sure! Here are some great pairs for you.")]
    leaked = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert leaked == []

    # the same recipe again, the server gone: every seed has its answer, nothing is asked
    again = run_data(cfg, tokenizer_dir, tmp_path / "out", base_dir=tmp_path)
    assert again["sources"][1]["synthesized"]["requests"] == 0
    assert again["manifest_hash"] == manifest["manifest_hash"]


def test_killed_element_resumes_without_asking_again(tmp_path):
    topics = [f"topic number {k}" for k in range(6)]
    child = {}

    def rule(messages, count):
        if count == 3:  # the element dies while its third request is in flight
            os.kill(child["pid"], signal.SIGKILL)
        return writer(messages, count)

    with JudgeServer(rule) as server:
        os.environ["SYNTH_TEST_KEY"] = KEY
        try:
            cfg = SynthesizeConfig.model_validate(_synth(server, topics))
            seeds = load_seeds(cfg, tmp_path)
            args = [cfg.model_dump_json(), json.dumps(seeds), str(tmp_path / "state"), str(tmp_path / "rows")]
            code = (
                "import json, sys; from data_tools.config import PIIConfig, SynthesizeConfig; "
                "from data_tools.synthesize import Synthesizer; "
                "cfg = SynthesizeConfig.model_validate_json(sys.argv[1]); "
                "seeds = [tuple(s) for s in json.loads(sys.argv[2])]; "
                "step = Synthesizer(cfg, seeds, sys.argv[3], sys.argv[4], PIIConfig()); "
                "list(step.run(rank=0, world_size=1))"
            )
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
            proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env)
            child["pid"] = proc.pid
            assert proc.wait(timeout=120) == -signal.SIGKILL
            assert read_progress(tmp_path / "state" / "progress") == {seeds[0][0], seeds[1][0]}

            step = Synthesizer(cfg, seeds, str(tmp_path / "state"), str(tmp_path / "rows"), PIIConfig())
            list(step.run(rank=0, world_size=1))
        finally:
            del os.environ["SYNTH_TEST_KEY"]
    assert server.requests == len(topics) + 1  # the killed request, then only the 4 seeds it lacked
    rows = [json.loads(line) for line in (tmp_path / "rows" / "00000.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(topics)
    assert sorted({r["provenance"]["seed_id"] for r in rows}) == sorted(s for s, _ in seeds)
    counts = json.loads((tmp_path / "rows" / "counts" / "00000.json").read_text())
    assert counts == {"seeds": 6, "requests": 4, "generated": 12, "malformed": {}}


def test_reply_parsing_reasons():
    good = json.dumps(
        [
            {"instruction": "a", "response": "b"},
            {"instruction": "c", "output": "d"},
            {"instruction": "e", "response": "f"},
        ]
    )
    assert parse_reply(good, 2) == [{"instruction": "a", "response": "b"}, {"instruction": "c", "response": "d"}]
    for text, reason in [
        ("no json here", "not_json"),
        ('{"instruction": "a"}', "not_a_list"),
        ("[]", "not_a_list"),
        ('["a"]', "item_not_an_object"),
        ('[{"instruction": "a"}]', "item_missing_field"),
        ('[{"instruction": " ", "response": "b"}]', "item_empty_field"),
    ]:
        with pytest.raises(RowError) as err:
            parse_reply(text, 2)
        assert err.value.reason == reason


def test_recipe_errors_name_the_field(tmp_path, monkeypatch):
    endpoint = {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "SYNTH_TEST_UNSET"}
    with pytest.raises(ValidationError, match="exactly one generator"):
        SynthesizeConfig(topics=["x"])
    with pytest.raises(ValidationError, match="exactly one of `topics` or `seed_rows`"):
        SynthesizeConfig(endpoint=endpoint)
    with pytest.raises(ValidationError, match=r"must contain \{seed\}"):
        SynthesizeConfig(endpoint=endpoint, topics=["x"], template="Write rows.")
    with pytest.raises(ValidationError, match="exactly one of `path`, `generate` or `synthesize`"):
        DataConfig(sources=[{"path": "a.jsonl", "synthesize": {"endpoint": endpoint, "topics": ["x"]}}])
    monkeypatch.delenv("SYNTH_TEST_UNSET", raising=False)
    cfg = DataConfig(sources=[{"synthesize": {"endpoint": endpoint, "seed_rows": "seeds.jsonl"}}])
    assert cfg.check_paths(tmp_path) == [
        "data.sources.0.synthesize.endpoint.api_key_env: environment variable 'SYNTH_TEST_UNSET' is not set "
        "(export it where the data jobs run)",
        "data.sources.0.synthesize.seed_rows: no such file: seeds.jsonl",
    ]
    (tmp_path / "seeds.jsonl").write_text(
        json.dumps({"instruction": "Hi", "output": "Hello"})
        + "\n"
        + json.dumps({"instruction": "Hi", "output": "Hello"})
        + "\n"
    )
    assert len(load_seeds(cfg.sources[0].synthesize, tmp_path)) == 1  # the same seed twice is asked once
    (tmp_path / "seeds.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="synthesize.seed_rows: seeds.jsonl holds no rows"):
        load_seeds(cfg.sources[0].synthesize, tmp_path)
    with pytest.raises(ValidationError, match="a topic is empty"):
        SynthesizeConfig(endpoint=endpoint, topics=["x", " "])


@pytest.mark.slow
def test_local_model_generator_is_asked_once_per_seed(tmp_path):
    """A local HF directory writes the replies (a random tiny model: what it writes is not JSON, so every
    reply is kept aside as malformed, with the model's text)."""
    from parallel.tiny import build_tiny_model

    model_dir = build_tiny_model("micro-llama", tmp_path / "model")
    cfg = SynthesizeConfig(local=str(model_dir), topics=["kites", "tides"], max_tokens=8, temperature=0)
    seeds = load_seeds(cfg, tmp_path)
    step = Synthesizer(cfg, seeds, str(tmp_path / "state"), str(tmp_path / "rows"), PIIConfig())
    assert step.needs_fresh_process  # torch ranks are spawned (data_tools.stage.local_executor)
    list(step.run(rank=0, world_size=1))
    counts = json.loads((tmp_path / "rows" / "counts" / "00000.json").read_text())
    assert counts["requests"] == 2 and counts["generated"] + sum(counts["malformed"].values()) == 2
    malformed = (tmp_path / "rows" / "malformed" / "00000.jsonl").read_text().splitlines()
    assert len(malformed) == sum(counts["malformed"].values())
    list(step.run(rank=0, world_size=1))
    assert json.loads((tmp_path / "rows" / "counts" / "00000.json").read_text())["requests"] == 0
