"""LLM-as-judge (eval/judge.py) against a real OpenAI-compatible server on 127.0.0.1 and a local HF judge."""

import json
import socket
import time

import pytest

from eval.config import EvalConfig
from eval.judge import (
    EndpointJudge,
    JudgeError,
    JudgeSpec,
    judge_pairs,
    judge_rubric,
    pairwise_metrics,
    rubric_metrics,
    run_judge,
)
from tests.eval.judge_server import JudgeServer, answer_rated, prefers_keyword

EXAMPLES = [{"id": str(i), "messages": [{"role": "user", "content": f"what is {i} + 1?"}]} for i in range(8)]


def spec(server, **fields) -> JudgeSpec:
    return JudgeSpec(endpoint={"base_url": server.base_url, "model": "rule", "max_retries": 3}, **fields)


def test_judge_rubric_scores_by_answer_length():
    # the rule: 1 point per 10 characters (1..5), whatever the criterion
    rule = lambda messages, count: str(min(5, 1 + len(answer_rated(messages)) // 10))  # noqa: E731
    answers = ["x" * (10 * (i % 5)) for i in range(len(EXAMPLES))]  # scores 1,2,3,4,5,1,2,3
    with JudgeServer(rule) as server:
        s = spec(server, criteria={"helpfulness": "helps", "tone": "polite"})
        records = judge_rubric(EndpointJudge(s.endpoint), s, EXAMPLES, answers)
    metrics = rubric_metrics(records, list(s.criteria))
    assert metrics["helpfulness"] == pytest.approx(21 / 8) and metrics["tone"] == pytest.approx(21 / 8)
    assert metrics["score"] == pytest.approx(21 / 8) and 0 < metrics["score_stderr"] < 1
    assert metrics["n"] == 8 and metrics["unparsed"] == 0 and server.requests == 16


def test_judge_pairwise_prefers_keyword_in_both_orders():
    candidate = [f"the answer is {i + 1}, 42" for i in range(8)]
    reference = [f"the answer is {i + 1}" if i < 6 else "42" for i in range(8)]  # the last two: ties
    with JudgeServer(prefers_keyword("42")) as server:
        s = spec(server, mode="pairwise")
        records = judge_pairs(EndpointJudge(s.endpoint), s, EXAMPLES, candidate, reference, "base")
    metrics = pairwise_metrics(records)
    assert metrics["win_rate"] == pytest.approx((6 + 2 * 0.5) / 8)
    assert metrics["position_consistency"] == 1.0 and metrics["unparsed"] == 0
    assert {r["order"] for r in records} == {"candidate_first", "reference_first"} and len(records) == 16


def test_judge_always_first_gives_half_win_rate():
    """Position bias: a judge that always prefers answer A is cancelled by judging both orders."""
    with JudgeServer(lambda messages, count: "A") as server:
        s = spec(server, mode="pairwise")
        records = judge_pairs(EndpointJudge(s.endpoint), s, EXAMPLES, ["good"] * 8, ["bad"] * 8, "base")
    metrics = pairwise_metrics(records)
    assert metrics["win_rate"] == pytest.approx(0.5, abs=0.05)
    assert metrics["position_consistency"] == 0.0


def test_judge_garbage_is_retried_then_counted_unparsed():
    def rule(messages, count):
        question = messages[-1]["content"]
        if "what is 3 + 1" in question:
            return "I would rather not say."  # never parses
        return "Sure! " if count % 2 else "4"  # every other request is garbage: a retry parses

    with JudgeServer(rule) as server:
        s = spec(server, criteria={"accuracy": "right"}, parse_retries=2)
        records = judge_rubric(EndpointJudge(s.endpoint), s, EXAMPLES, ["4"] * 8)
    metrics = rubric_metrics(records, ["accuracy"])
    bad = [r for r in records if r["parsed"] is None]
    assert metrics["unparsed"] == 1 and len(bad) == 1 and len(bad[0]["raw"]) == 3  # 1 try + 2 retries
    assert metrics["accuracy"] == 4.0 and metrics["n"] == 8  # the unparsed one is reported, not scored


def test_judge_backs_off_on_429():
    def rule(messages, count):
        return (429, "rate limited") if count <= 2 else "A"

    with JudgeServer(rule) as server:
        s = spec(server, mode="pairwise")
        started = time.monotonic()
        text = EndpointJudge(s.endpoint).ask([{"role": "user", "content": "x"}], ("A", "B", "tie"))
        assert text == "A" and server.requests == 3 and time.monotonic() - started >= 0.04


def test_judge_5xx_beyond_retries_fails_with_one_line():
    with JudgeServer(lambda messages, count: (503, "overloaded")) as server:
        s = JudgeSpec(endpoint={"base_url": server.base_url, "model": "rule", "max_retries": 1})
        with pytest.raises(JudgeError, match=r"answered HTTP 503 after 1 retries"):
            EndpointJudge(s.endpoint).ask([{"role": "user", "content": "x"}], ("1",))
        assert server.requests == 2


def test_judge_unreachable_endpoint_names_base_url(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        s = JudgeSpec(endpoint={"base_url": f"http://127.0.0.1:{port}/v1", "model": "m", "max_retries": 0})
        with pytest.raises(JudgeError, match=rf"judge endpoint http://127.0.0.1:{port}/v1 is unreachable"):
            EndpointJudge(s.endpoint).ask([{"role": "user", "content": "x"}], ("1",))
        # run_judge fails before it loads a model or generates an answer
        with pytest.raises(JudgeError, match=r"is unreachable \(Connection refused\)"):
            run_judge(s, tmp_path / "no-model", tmp_path / "no-data", tmp_path / "out", EvalConfig())


def test_judge_key_from_the_named_variable_only(monkeypatch):
    seen = []
    with JudgeServer(lambda messages, count: "3") as server:
        s = JudgeSpec(endpoint={"base_url": server.base_url, "model": "m", "api_key_env": "JUDGE_TEST_KEY"})
        assert "JUDGE_TEST_KEY" in s.check()
        monkeypatch.setenv("JUDGE_TEST_KEY", "sk-secret-value")
        assert s.check() is None
        judge = EndpointJudge(s.endpoint)
        seen.append(judge.client.api_key)
        assert "sk-secret-value" not in json.dumps(s.model_dump(mode="json"))
    assert seen == ["sk-secret-value"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from parallel.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("judge")
    return build_tiny_model("micro-llama", root / "candidate", 0), build_tiny_model("micro-llama", root / "judge", 1)


def test_judge_local_hf_dir_always_parses(tiny_dirs, tmp_path):
    candidate, judge_dir = tiny_dirs
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {i}"}) + "\n" for i in range(3)))
    s = JudgeSpec(local=str(judge_dir), prompts=str(prompts), criteria={"accuracy": "right"}, max_new_tokens=4)
    metrics = run_judge(s, candidate, tmp_path, tmp_path / "out", EvalConfig())
    records = [json.loads(line) for line in (tmp_path / "out" / "judge.jsonl").read_text().splitlines()]
    assert metrics["n"] == 3 and metrics["unparsed"] == 0 and 1 <= metrics["accuracy"] <= 5
    assert all(r["parsed"] in list("12345") and "logprobs" in r["raw"][0] for r in records)
    pair = JudgeSpec(local=str(judge_dir), prompts=str(prompts), mode="pairwise", max_new_tokens=4)
    metrics = run_judge(pair, candidate, tmp_path, tmp_path / "pair", EvalConfig(), reference_dir=judge_dir)
    assert metrics["unparsed"] == 0 and 0 <= metrics["win_rate"] <= 1 and metrics["n"] == 3


def test_judge_recipe_checks_offline(monkeypatch):
    from hpc.recipe import RecipeError, load_recipe
    from tests.conftest import TINY_RECIPE

    monkeypatch.delenv("NOPE_JUDGE_KEY", raising=False)

    def problems(task: str, *more: str) -> list[str]:
        with pytest.raises(RecipeError) as err:
            load_recipe(TINY_RECIPE, [f"eval.tasks=[heldout_exact, {task}]", *more])
        return err.value.problems

    url = "endpoint: {base_url: 'http://127.0.0.1:9/v1', model: m}"
    assert problems("{judge: {endpoint: {base_url: 'ftp//x', model: m}}}") == [
        "eval.tasks.1.judge.endpoint.base_url: 'ftp//x' is not an http(s) URL with a host, e.g. http://127.0.0.1:8000/v1"
    ]
    keyed = "{judge: {endpoint: {base_url: 'http://127.0.0.1:9/v1', model: m, api_key_env: NOPE_JUDGE_KEY}}}"
    assert "environment variable 'NOPE_JUDGE_KEY' is not set" in problems(keyed)[0]
    assert "no config.json" in problems("{judge: {local: /}}")[0]
    [line] = problems("{judge: {endpoint: {base_url: 'http://h/v1', model: m, key: sk-1}}}")
    assert line.startswith("eval.tasks.1.judge.endpoint.key: unknown key; allowed: api_key_env, base_url,")
    assert "exactly one judge" in problems("{judge: {local: /, " + url + "}}")[0]
    assert "scale [3, 3]" in problems("{judge: {scale: [3, 3], " + url + "}}")[0]
    pairwise = "{judge: {mode: pairwise, " + url + "}}"
    [line] = problems(pairwise, "gate.thresholds={judge/win_rate: 0.5}")
    assert line.startswith("gate.primary_metric: 'judge/win_rate' is not measured on the base model")
    [line] = problems(pairwise, "gate.thresholds={judge/accuracy: 0.5}", "eval.include_base=false")
    assert "reports no metric 'accuracy'" in line
    load_recipe(TINY_RECIPE, [f"eval.tasks=[heldout_exact, {pairwise}]"])  # the gate's metric is heldout's
