import time

import pytest
from pydantic import ValidationError

from eval.config import EvalConfig
from eval.tasks import HeldoutTask, LmEvalTask, YamlTask, as_task, check_tasks


def tasks(*values):
    return [as_task(v) for v in values]


# ---------------------------------------------------------------- the typed union and its shorthand


def test_shorthand_and_mappings_parse_to_the_same_typed_tasks():
    cfg = EvalConfig(
        tasks=["heldout_exact", {"heldout": "exact"}, "yaml:some/dir:t", {"yaml_dir": "some/dir", "task": "t"}]
    )
    assert cfg.tasks == [HeldoutTask(heldout="exact")] * 2 + [YamlTask(yaml_dir="some/dir", task="t")] * 2
    assert as_task("mmlu") == as_task({"lm_eval": "mmlu"}) == LmEvalTask(lm_eval="mmlu")
    assert as_task("heldout_foo") == LmEvalTask(lm_eval="heldout_foo")  # not a built-in: an lm-eval name
    assert as_task("yaml:/a:b:c") == YamlTask(yaml_dir="/a:b", task="c")  # the task name follows the last ':'
    # A task dumps as its shorthand, so recipe snapshots, hashes and element keys keep their form.
    assert cfg.model_dump()["tasks"] == ["heldout_exact", "heldout_exact", "yaml:some/dir:t", "yaml:some/dir:t"]
    assert EvalConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    assert EvalConfig().model_dump()["tasks"] == ["heldout_exact", "heldout_mc"]


def test_relative_yaml_dir_resolves_against_the_context_base_dir(tmp_path):
    cfg = EvalConfig.model_validate({"tasks": ["yaml:my:t", f"yaml:{tmp_path}:u"]}, context={"base_dir": tmp_path})
    assert [t.yaml_dir for t in cfg.tasks] == [str(tmp_path / "my"), str(tmp_path)]
    assert EvalConfig(tasks=["yaml:my:t"]).tasks[0].yaml_dir == "my"  # no context: the working directory


def test_malformed_tasks_are_validation_errors_at_their_index():
    cases = [
        ("yaml:nodir", (), "expected 'yaml:<dir>:<task>'"),
        ({"heldout": "open"}, ("heldout", "heldout"), "'exact' or 'mc'"),
        ({"task": "t"}, (), "a mapping with heldout, yaml_dir + task, lm_eval, or judge"),
        ({"lm_eval": "heldout_mc"}, ("lm_eval", "lm_eval"), "write it as the string 'heldout_mc'"),
        ({"yaml_dir": "d", "task": "a:b"}, ("yaml", "task"), "has no ':'"),
    ]
    for value, rest, message in cases:
        with pytest.raises(ValidationError) as e:
            EvalConfig(tasks=["heldout_mc", value])
        [err] = e.value.errors()
        assert err["loc"] == ("tasks", 1, *rest) and message in err["msg"], (value, err)


def test_task_label():
    assert as_task("heldout_mc").label == "heldout_mc"
    assert as_task("yaml:/some/dir:my_task").label == "my_task"
    assert as_task({"lm_eval": "hellaswag"}).label == "hellaswag"


# ---------------------------------------------------------------- check_tasks


def test_builtin_tasks_need_nothing():
    assert check_tasks(tasks("heldout_exact", "heldout_mc")) == []


def test_standard_task_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    started = time.monotonic()
    problems = check_tasks(tasks("heldout_exact", "mmlu"))
    # A hub lookup would take 23-27 s per task before failing; the check reads lm-eval's task files only
    # (~0.5 s idle, a few seconds on a loaded CI machine).
    assert time.monotonic() - started < 15
    assert len(problems) == 1 and problems[0].startswith("eval.tasks.1: 'mmlu'")
    for hint in ("cais/mmlu", "offline", "HF_HOME", "yaml:<dir>:<task>"):
        assert hint in problems[0]


def test_standard_task_with_cached_dataset_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    (tmp_path / "datasets" / "Rowan___hellaswag").mkdir(parents=True)
    assert check_tasks(tasks("hellaswag")) == []
    assert check_tasks(tasks("arc_easy"))[0].startswith("eval.tasks.0: 'arc_easy' reads hub dataset allenai/ai2_arc")
    (tmp_path / "hub" / "datasets--allenai--ai2_arc").mkdir(parents=True)
    assert check_tasks(tasks("arc_easy", "arc_challenge")) == []


def test_unknown_and_missing_tasks(tmp_path):
    problems = check_tasks(tasks("no_such_task_xyz", f"yaml:{tmp_path}/missing:t", f"yaml:{tmp_path}:u"))
    assert [p.split(":")[0] for p in problems] == [f"eval.tasks.{i}" for i in range(3)]
    assert "nor a task lm-eval knows" in problems[0]
    assert "does not exist" in problems[1]
    assert "defines a task or group named 'u'" in problems[2]
    # two tasks of one label: their '<label>/<metric>' scores would overwrite each other
    problems = check_tasks(tasks(f"yaml:{tmp_path}/a:t", f"yaml:{tmp_path}/b:t"))
    assert problems[1] == "eval.tasks.1: a second task labelled 't' (eval.tasks.0)"
