"""A bundled lm-eval task (arc_easy) pointed at a local copy of its dataset (`data_dir`), through real lm-eval."""

import json

import pytest

from eval.config import EvalConfig
from eval.tasks import as_task


def _arc_rows(n):
    return [
        {
            "id": f"q{i}",
            "question": f"What is {i} plus one?",
            "choices": {"text": [str(i + 1), str(i + 2), str(i), "seven"], "label": ["A", "B", "C", "D"]},
            "answerKey": "A",
        }
        for i in range(n)
    ]


def test_local_copy_layout_checked_offline(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(_arc_rows(1)[0]) + "\n")
    task = as_task({"lm_eval": "arc_easy", "data_dir": str(tmp_path)})
    assert "has splits train; the task reads 'test'" in task.check()
    assert "no <split>.parquet" in as_task({"lm_eval": "arc_easy", "data_dir": str(tmp_path / "x")}).check()
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "0.parquet").write_bytes(b"")
    assert "mixes parquet and JSON" in task.check()
    assert "not a group" in as_task({"lm_eval": "mmlu", "data_dir": str(tmp_path)}).check()
    # it dumps as its mapping (the string form cannot hold data_dir) and validates back
    dumped = EvalConfig(tasks=[task]).model_dump(mode="json")["tasks"]
    assert dumped == [{"lm_eval": "arc_easy", "data_dir": str(tmp_path)}] and EvalConfig(tasks=dumped).tasks == [task]


@pytest.mark.slow
def test_lm_eval_task_runs_on_a_local_parquet_copy(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from eval.runner import run_task
    from parallel.tiny import build_tiny_model

    copy = tmp_path / "arc"
    copy.mkdir()
    pq.write_table(pa.Table.from_pylist(_arc_rows(6)), copy / "test.parquet")  # no train split: no few-shot
    task = as_task({"lm_eval": "arc_easy", "data_dir": str(copy)})
    assert task.check() is None
    model = build_tiny_model("micro-llama", tmp_path / "model", 0)
    scores = run_task(task, model, tmp_path, tmp_path / "out", EvalConfig(tasks=[task], limit=4))
    assert set(scores) == {"acc", "acc_norm"} and 0 <= scores["acc"] <= 1
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").open()]
    assert [s["doc"]["id"] for s in samples] == ["q0", "q1", "q2", "q3"]  # our rows, cut to eval.limit
    assert all(len(s["arguments"]) == 4 for s in samples)  # the four choices of each question
