import json
import random

import pytest
import yaml

from eval.config import EvalConfig
from eval.heldout import build_tasks


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


# ---------------------------------------------------------------- build_tasks


@pytest.fixture(scope="module")
def tokenizer():
    from parallel.tiny import build_tokenizer

    return build_tokenizer()


def test_build_tasks_renders_prompts_and_choices(tmp_path, tokenizer):
    rows = _rows()
    data_dir = _write_rows(tmp_path / "data", rows)
    cfg = EvalConfig(limit=12, num_choices=4, max_new_tokens=7)
    build_tasks(data_dir, tmp_path / "tasks", cfg, tokenizer=tokenizer)

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
        build_tasks(data_dir, tmp_path / f"t{i}", EvalConfig(seed=seed), names=("heldout_mc",))
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
    build_tasks(data_dir, tmp_path / "t", EvalConfig(), tokenizer=tokenizer)
    spec = yaml.safe_load((tmp_path / "t" / "heldout_exact.yaml").read_text())
    assert spec["generation_kwargs"]["until"] == ["<|eot_id|>"]
    example = _read_jsonl(tmp_path / "t" / "heldout_mc.jsonl")[0]
    assert example["prompt"].endswith("assistant<|end_header_id|>\n\n")
    assert all(c.endswith("<|eot_id|>") for c in example["choices"])


def test_build_tasks_user_errors(tmp_path):
    with pytest.raises(ValueError, match="held-out split is missing"):
        build_tasks(tmp_path, tmp_path / "t", EvalConfig())
    data_dir = _write_rows(tmp_path / "few", _rows(3))
    with pytest.raises(ValueError, match="num_choices=4"):
        build_tasks(data_dir, tmp_path / "t", EvalConfig())
    bad = {"id": "x", "messages": [{"role": "user", "content": "q"}], "text": ""}
    _write_rows(tmp_path / "bad", [bad])
    with pytest.raises(ValueError, match="assistant answer"):
        build_tasks(tmp_path / "bad", tmp_path / "t", EvalConfig())
