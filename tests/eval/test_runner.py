import json
import socket

import pytest
import yaml

from eval.config import EvalConfig
from eval.runner import run_task
from eval.tasks import as_task, check_tasks
from tests.eval.test_heldout import _read_jsonl, _rows, _write_rows

# ---------------------------------------------------------------- run_task on a tiny random model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from parallel.tiny import build_tiny_model

    return build_tiny_model("micro-llama", tmp_path_factory.mktemp("micro") / "hf", seed=0)


@pytest.fixture
def no_network(monkeypatch):
    """Records every attempt to reach a non-loopback address (or resolve a host name)."""
    attempts = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            attempts.append(address)
            raise OSError("network disabled in tests")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in ("localhost", "127.0.0.1", "::1", None):
            attempts.append(host)
            raise OSError("network disabled in tests")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    assert attempts == []


CFG = EvalConfig(batch_size=8, max_new_tokens=8, limit=None)


@pytest.mark.slow
def test_exact_match_scores_zero_for_wrong_and_one_for_right_answers(tmp_path, model_dir, no_network):
    rows = _rows()
    data_dir = _write_rows(tmp_path / "data", rows)
    scores = run_task(as_task("heldout_exact"), model_dir, data_dir, tmp_path / "random", CFG)
    assert set(scores) == {"exact_match"} and scores["exact_match"] <= 0.1

    results = json.loads((tmp_path / "random" / "results.json").read_text())
    assert results["results"]["heldout_exact"]["exact_match,none"] == scores["exact_match"]
    samples = _read_jsonl(tmp_path / "random" / "samples.jsonl")
    assert len(samples) == 20 and samples[0]["arguments"][0][0].endswith("<|im_start|>assistant\n")

    # Make the reference answers what this model greedily emits: a "model whose answers are right".
    emitted = {s["doc"]["id"]: s["filtered_resps"][0] for s in samples}
    for row in rows:
        row["messages"][-1]["content"] = "  " + emitted[row["id"]] + "\n"  # whitespace is ignored
    right = run_task(
        as_task("heldout_exact"), model_dir, _write_rows(tmp_path / "right", rows), tmp_path / "right_eval", CFG
    )
    assert right == {"exact_match": 1.0}


@pytest.mark.slow
def test_multiple_choice_accuracy_matches_the_loglikelihoods(tmp_path, model_dir, no_network):
    data_dir = _write_rows(tmp_path / "data", _rows())
    events = []
    scores = run_task(as_task("heldout_mc"), model_dir, data_dir, tmp_path / "mc", CFG, progress=events.append)
    assert set(scores) == {"acc", "acc_norm"}
    samples = _read_jsonl(tmp_path / "mc" / "samples.jsonl")
    assert len(samples) == 20 and all(len(s["filtered_resps"]) == 4 for s in samples)
    hits = [max(range(4), key=lambda i: s["filtered_resps"][i][0]) == s["target"] for s in samples]
    assert scores["acc"] == pytest.approx(sum(hits) / len(hits))
    assert [e["event"] for e in events] == ["eval_load", "eval_run", "eval_done"]


@pytest.mark.slow
def test_user_yaml_task_with_relative_data_file(tmp_path, model_dir, no_network, monkeypatch):
    task_dir = tmp_path / "my_tasks"
    task_dir.mkdir()
    lines = [
        json.dumps({"q": f"<|im_start|>user\nSay {w}<|im_end|>\n<|im_start|>assistant\n", "a": w})
        for w in ("cat", "dog", "owl", "bee", "ant")
    ]
    (task_dir / "rows.jsonl").write_text("\n".join(lines) + "\n")
    spec = {
        "task": "my_say",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "rows.jsonl"}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{q}}",
        "doc_to_target": "{{a}}",
        "generation_kwargs": {"until": ["<|im_end|>"], "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    (task_dir / "say.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    task = as_task("yaml:my_tasks:my_say")
    assert check_tasks([task]) == [] and task.label == "my_say"
    cfg = EvalConfig(batch_size=4, max_new_tokens=3, limit=3)
    scores = run_task(task, model_dir, tmp_path, tmp_path / "out", cfg)
    assert set(scores) == {"exact_match"}
    samples = _read_jsonl(tmp_path / "out" / "samples.jsonl")
    assert len(samples) == 3 and samples[0]["arguments"][0][1]["max_gen_toks"] == 3
