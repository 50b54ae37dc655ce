import json
import random
import socket
import time

import pytest
import yaml

from eval import lmeval
from eval.config import EvalConfig


def _rows(n=20, seed=0):
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        word = "".join(rng.choice("abcdefgh") for _ in range(5))
        if word in seen:
            continue
        seen.add(word)
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Reverse the word: {word}"},
            {"role": "assistant", "content": word[::-1]},
        ]
        rows.append({"id": f"row-{len(rows)}", "messages": messages, "text": ""})
    return rows


def _write_rows(data_dir, rows):
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "test.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return data_dir


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- check_tasks


def test_builtin_tasks_need_nothing():
    assert lmeval.check_tasks(["heldout_exact", "heldout_mc"]) == []


def test_standard_task_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    started = time.monotonic()
    problems = lmeval.check_tasks(["heldout_exact", "mmlu"])
    # A hub lookup would take 23-27 s per task before failing; the check reads lm-eval's task files only
    # (~0.5 s idle, a few seconds on a loaded CI machine).
    assert time.monotonic() - started < 15
    assert len(problems) == 1 and problems[0].startswith("eval.tasks.1: 'mmlu'")
    for hint in ("cais/mmlu", "offline", "HF_HOME", "yaml:<dir>:<task>"):
        assert hint in problems[0]


def test_standard_task_with_cached_dataset_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    (tmp_path / "datasets" / "Rowan___hellaswag").mkdir(parents=True)
    assert lmeval.check_tasks(["hellaswag"]) == []
    assert lmeval.check_tasks(["arc_easy"])[0].startswith("eval.tasks.0: 'arc_easy' reads hub dataset allenai/ai2_arc")
    (tmp_path / "hub" / "datasets--allenai--ai2_arc").mkdir(parents=True)
    assert lmeval.check_tasks(["arc_easy", "arc_challenge"]) == []


def test_unknown_and_malformed_tasks(tmp_path):
    problems = lmeval.check_tasks(
        ["no_such_task_xyz", "yaml:nodir", f"yaml:{tmp_path}/missing:t", f"yaml:{tmp_path}:t"]
    )
    assert [p.split(":")[0] for p in problems] == [f"eval.tasks.{i}" for i in range(4)]
    assert "nor a task lm-eval knows" in problems[0]
    assert "expected 'yaml:<dir>:<task>'" in problems[1]
    assert "does not exist" in problems[2]
    assert "defines a task or group named 't'" in problems[3]


def test_task_label():
    assert lmeval.task_label("heldout_mc") == "heldout_mc"
    assert lmeval.task_label("yaml:/some/dir:my_task") == "my_task"


# ---------------------------------------------------------------- build_tasks


@pytest.fixture(scope="module")
def tokenizer():
    from parallel.tiny import build_tokenizer

    return build_tokenizer()


def test_build_tasks_renders_prompts_and_choices(tmp_path, tokenizer):
    rows = _rows()
    data_dir = _write_rows(tmp_path / "data", rows)
    cfg = EvalConfig(limit=12, num_choices=4, max_new_tokens=7)
    lmeval.build_tasks(data_dir, tmp_path / "tasks", cfg, tokenizer=tokenizer)

    exact_spec = yaml.safe_load((tmp_path / "tasks" / "heldout_exact.yaml").read_text())
    data_file = exact_spec["dataset_kwargs"]["data_files"]["test"]
    assert data_file.startswith("/") and exact_spec["generation_kwargs"]["until"] == ["<|im_end|>"]
    assert exact_spec["generation_kwargs"]["max_gen_toks"] == 7
    exact = _read_jsonl(tmp_path / "tasks" / "heldout_exact.jsonl")
    assert len(exact) == 12
    expected = tokenizer.apply_chat_template(rows[0]["messages"][:-1], tokenize=False, add_generation_prompt=True)
    assert exact[0]["prompt"] == expected and exact[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert rows[0]["messages"][-1]["content"] not in exact[0]["prompt"]
    assert exact[0]["answer"] == rows[0]["messages"][-1]["content"]

    mc = _read_jsonl(tmp_path / "tasks" / "heldout_mc.jsonl")
    answers = {r["answer"] for r in exact}
    for example in mc:
        choices = [c.removesuffix("<|im_end|>") for c in example["choices"]]
        assert len(set(choices)) == 4 and choices[example["label"]] == example["answer"]
        assert set(choices) <= answers  # distractors are other test rows' answers
    assert sorted({e["label"] for e in mc}) != [mc[0]["label"]]  # the answer is not always in one slot


def test_build_tasks_is_deterministic_by_seed(tmp_path):
    data_dir = _write_rows(tmp_path / "data", _rows())
    outputs = []
    for i, seed in enumerate((0, 0, 1)):
        lmeval.build_tasks(data_dir, tmp_path / f"t{i}", EvalConfig(seed=seed), names=("heldout_mc",))
        outputs.append((tmp_path / f"t{i}" / "heldout_mc.jsonl").read_text())
        assert not (tmp_path / f"t{i}" / "heldout_exact.yaml").exists()
    assert outputs[0] == outputs[1] != outputs[2]
    # without a tokenizer the prompt is the project's ChatML
    assert json.loads(outputs[0].splitlines()[0])["prompt"].startswith("<|im_start|>system\nBe brief.")


def test_build_tasks_follow_the_templates_end_of_turn(tmp_path):
    from parallel.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = (  # Llama-3 style turns
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
        "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
        "\n\n{% endif %}"
    )
    data_dir = _write_rows(tmp_path / "data", _rows())
    lmeval.build_tasks(data_dir, tmp_path / "t", EvalConfig(), tokenizer=tokenizer)
    spec = yaml.safe_load((tmp_path / "t" / "heldout_exact.yaml").read_text())
    assert spec["generation_kwargs"]["until"] == ["<|eot_id|>"]
    example = _read_jsonl(tmp_path / "t" / "heldout_mc.jsonl")[0]
    assert example["prompt"].endswith("assistant<|end_header_id|>\n\n")
    assert all(c.endswith("<|eot_id|>") for c in example["choices"])


def test_build_tasks_user_errors(tmp_path):
    with pytest.raises(ValueError, match="held-out split is missing"):
        lmeval.build_tasks(tmp_path, tmp_path / "t", EvalConfig())
    data_dir = _write_rows(tmp_path / "few", _rows(3))
    with pytest.raises(ValueError, match="num_choices=4"):
        lmeval.build_tasks(data_dir, tmp_path / "t", EvalConfig())
    bad = {"id": "x", "messages": [{"role": "user", "content": "q"}], "text": ""}
    _write_rows(tmp_path / "bad", [bad])
    with pytest.raises(ValueError, match="assistant answer"):
        lmeval.build_tasks(tmp_path / "bad", tmp_path / "t", EvalConfig())


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
    scores = lmeval.run_task("heldout_exact", model_dir, data_dir, tmp_path / "random", CFG)
    assert set(scores) == {"exact_match"} and scores["exact_match"] <= 0.1

    results = json.loads((tmp_path / "random" / "results.json").read_text())
    assert results["results"]["heldout_exact"]["exact_match,none"] == scores["exact_match"]
    samples = _read_jsonl(tmp_path / "random" / "samples.jsonl")
    assert len(samples) == 20 and samples[0]["arguments"][0][0].endswith("<|im_start|>assistant\n")

    # Make the reference answers what this model greedily emits: a "model whose answers are right".
    emitted = {s["doc"]["id"]: s["filtered_resps"][0] for s in samples}
    for row in rows:
        row["messages"][-1]["content"] = "  " + emitted[row["id"]] + "\n"  # whitespace is ignored
    right = lmeval.run_task(
        "heldout_exact", model_dir, _write_rows(tmp_path / "right", rows), tmp_path / "right_eval", CFG
    )
    assert right == {"exact_match": 1.0}


@pytest.mark.slow
def test_multiple_choice_accuracy_matches_the_loglikelihoods(tmp_path, model_dir, no_network):
    data_dir = _write_rows(tmp_path / "data", _rows())
    events = []
    scores = lmeval.run_task("heldout_mc", model_dir, data_dir, tmp_path / "mc", CFG, progress=events.append)
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
    task = "yaml:my_tasks:my_say"
    assert lmeval.check_tasks([task]) == [] and lmeval.task_label(task) == "my_say"
    cfg = EvalConfig(batch_size=4, max_new_tokens=3, limit=3)
    scores = lmeval.run_task(task, model_dir, tmp_path, tmp_path / "out", cfg)
    assert set(scores) == {"exact_match"}
    samples = _read_jsonl(tmp_path / "out" / "samples.jsonl")
    assert len(samples) == 3 and samples[0]["arguments"][0][1]["max_gen_toks"] == 3
