"""A rerun of a stage appends to its progress.jsonl: the earlier attempts' lines stay (the curve before a crash),
and the readers show the latest attempt only."""

import json

from rich.console import Console

from hpc.plan import StageSpec
from hpc.progress import PipelineView, current_attempt, describe, read_last_event, start_attempt


def _append(path, **event):
    with open(path, "a") as f:
        f.write(json.dumps(event) + "\n")


def test_a_rerun_keeps_the_earlier_attempt_and_shows_only_the_new_one(tmp_path):
    path = tmp_path / "sft" / "progress.jsonl"
    assert start_attempt(path, "sft") == 1
    for step in (10, 20, 30):
        _append(path, t=1.0, stage="sft", step=step, max_steps=100, loss=2.0)
    assert describe(read_last_event(path)).startswith("step 30/100")
    assert start_attempt(path, "sft") == 2
    # the new attempt has logged nothing yet: its start is what is current, not the old step 30
    assert read_last_event(path)["attempt"] == 2
    assert describe(read_last_event(path)) == "attempt 2 started"
    _append(path, t=2.0, stage="sft", step=5, max_steps=100, loss=3.0)
    assert describe(read_last_event(path)).startswith("step 5/100")
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["step"] for e in events if "loss" in e] == [10, 20, 30, 5]  # history kept
    assert [e["step"] for e in current_attempt(events) if "loss" in e] == [5]
    assert current_attempt([{"step": 1}]) == [{"step": 1}]  # a file from before attempt records


def test_the_live_table_does_not_show_the_previous_attempts_final_step(tmp_path):
    path = tmp_path / "progress.jsonl"
    start_attempt(path, "sft")
    _append(path, t=1.0, stage="sft", step=100, max_steps=100, loss=1.0)
    start_attempt(path, "sft")
    spec = StageSpec(name="sft", kind="sft", depends_on=(), resources=None, input_hash="h")
    view = PipelineView([spec], lambda name: path, Console(file=open(tmp_path / "out", "w")))
    view.start(spec, "local")
    assert "100" not in view.detail.get("sft", "") and view.detail["sft"] == "attempt 2 started"


def test_a_rerun_on_changed_inputs_starts_at_attempt_1_and_prints_nothing_of_the_old_run(tmp_path):
    """A stage rerun because its recipe or upstream changed is a new run, not a retry: it says "started", and
    the plain (non-terminal) view prints none of the earlier run's held-out losses as if they were new."""
    path = tmp_path / "progress.jsonl"
    assert start_attempt(path, "sft", "old-inputs") == 1
    _append(path, t=1.0, stage="sft", step=300, val_loss=0.6831)
    assert start_attempt(path, "sft", "old-inputs") == 2  # a retry of the same inputs counts on
    assert start_attempt(path, "sft", "new-inputs") == 1
    assert describe(read_last_event(path)) == "started"
    spec = StageSpec(name="sft", kind="sft", depends_on=(), resources=None, input_hash="new-inputs")
    out = tmp_path / "out"
    view = PipelineView([spec], lambda name: path, Console(file=open(out, "w"), force_terminal=False))
    view.start(spec, "local")
    _append(path, t=2.0, stage="sft", step=0, val_loss=5.6434)
    view.refresh()
    view.console.file.flush()
    printed = out.read_text()
    assert "val_loss 5.6434" in printed and "0.6831" not in printed, printed
