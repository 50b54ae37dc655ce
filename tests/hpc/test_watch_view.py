"""The live view reads a stage's events as they come: training bars with ETAs that leave out evaluation time,
held-out metrics at each evaluation, one row per eval element, the data funnel; plain lines off a terminal."""

import io
import json

import pytest
from rich.console import Console

from hpc import cli
from hpc.plan import StageSpec
from hpc.progress import PipelineView, StageEvents, describe, eta_s, funnel_lines, start_attempt


def _append(path, **event):
    with open(path, "a") as f:
        f.write(json.dumps(event) + "\n")


def _spec(name, kind, elements=("0",)):
    return StageSpec(name=name, kind=kind, depends_on=(), resources=None, input_hash="h", elements=elements)


def test_eta_counts_steps_only_and_events_are_read_incrementally(tmp_path):
    path = tmp_path / "sft.jsonl"
    start_attempt(path, "sft")
    events = StageEvents(path)
    # the step-0 evaluation took 30 s (the first step event's 50 s elapsed, 20 s after that evaluation ended)
    _append(path, t=100.0, step=0, val_loss=5.0)
    _append(path, t=120.0, step=10, max_steps=40, loss=2.0, lr=1e-3, grad_norm=0.5, elapsed_s=50.0)
    assert len(events.read()) == 3 and events.read() == []  # nothing new: nothing read twice
    assert events.train_s == pytest.approx(20.0)
    _append(path, t=160.0, step=10, val_loss=1.5)  # an evaluation of 40 s
    _append(path, t=163.0, step=10, checkpoint="resume/step-10", checkpoint_s=3.0)
    _append(path, t=183.0, step=20, max_steps=40, loss=1.8, lr=9e-4, grad_norm=0.25, elapsed_s=113.0)
    with open(path, "a") as f:
        f.write('{"t": 190.0, "step": 21, "max_st')  # a line being written: left for the next read
    events.read()
    # 113 s elapsed, 30 + 40 + 3 of them not in steps: 20 steps in 40 s, 20 steps left
    assert events.train_s == pytest.approx(40.0)
    summary = events.summary()
    assert "step 20/40" in summary and "lr 9.00e-04" in summary and "grad norm 0.250" in summary
    assert "0.50 steps/s" in summary and "ETA 40s" in summary and "at step 10: val_loss 1.5000" in summary
    assert eta_s(events.train) == pytest.approx(113.0)  # a lone event's ETA counts everything
    assert events.fraction(_spec("sft", "sft")) == 0.5
    with open(path, "a") as f:
        f.write('eps": 40, "loss": 1.0, "elapsed_s": 115.0}\n')
    events.read()
    assert events.train["step"] == 21
    start_attempt(path, "sft")  # a rerun: what the earlier attempt said is no longer current
    events.read()
    assert events.train is None and events.val == {}


def test_eval_elements_are_shown_each_in_a_row_and_printed_once_off_a_terminal(tmp_path):
    path = tmp_path / "eval.jsonl"
    spec = _spec("eval", "eval", ("exact@candidate", "exact@base"))
    out = io.StringIO()
    view = PipelineView([spec], lambda name: path, Console(file=out, width=200))
    view.start(spec, "local")
    _append(path, element="exact@candidate", event="eval_load", task="exact")
    view.refresh()
    _append(path, element="exact@candidate", event="eval_done", task="exact", scores={"exact_match": 0.75})
    view.refresh()
    view.refresh()
    printed = [line.strip() for line in out.getvalue().splitlines() if line.startswith("  eval:")]
    assert printed == ["eval: exact@candidate: loading model", "eval: exact@candidate: done  exact_match 0.750"]
    assert view.events["eval"].fraction(spec) == 0.5
    screen = Console(file=io.StringIO(), width=220, force_terminal=True, record=True)
    screen.print(view._render())
    text = screen.export_text()
    assert " 50%" in text and "exact@base" in text and "waiting" in text and "exact_match 0.750" in text
    assert "elapsed" in text


def test_training_bar_and_funnel_in_the_terminal_table(tmp_path):
    path = tmp_path / "sft.jsonl"
    specs = [_spec("data", "data"), _spec("sft", "sft")]
    view = PipelineView(specs, lambda name: tmp_path / f"{name}.jsonl", Console(file=io.StringIO(), width=200))
    view.start(specs[1], "local")
    _append(path, t=10.0, step=30, max_steps=40, loss=1.25, tokens_per_s=900.0, elapsed_s=30.0)
    view.refresh()
    screen = Console(file=io.StringIO(), width=240, force_terminal=True, record=True)
    screen.print(view._render())
    text = screen.export_text()
    assert " 75%" in text and "loss 1.2500" in text and "900 tok/s" in text and "ETA 10s" in text
    manifest = {
        "steps": {
            "normalise": {"in": 10, "kept": 9, "reasons": {"empty": 1}},
            "exact_dedup": {"in": 9, "kept": 6, "reasons": {"exact_duplicate": 3}},
        },
        "splits": {"train": 5, "validation": 1},
    }
    assert funnel_lines(manifest) == [
        "chat rows: 10 in -> normalise 9 -> exact_dedup 6",
        "chat rejected: normalise/empty 1, exact_dedup/exact_duplicate 3",
        "chat splits: train 5  validation 1",
    ]


def test_job_step_lines_and_version(capsys):
    line = describe({"step": 20, "max_steps": 100, "loss": 1.5, "lr": 2e-4, "grad_norm": 1.25, "tokens_per_s": 10.0})
    assert line == "step 20/100  loss 1.5000  lr 2.00e-04  grad norm 1.250  10 tok/s"
    with pytest.raises(SystemExit) as exit_:
        cli._parser().parse_args(["--version"])
    assert exit_.value.code == 0
    from importlib.metadata import version

    assert capsys.readouterr().out.strip() == f"hpcft {version('hpcft')}"


def test_each_held_out_evaluation_is_printed_even_right_after_a_step_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    spec = _spec("sft", "sft")
    out = io.StringIO()
    view = PipelineView([spec], lambda name: path, Console(file=out, width=200))
    view.start(spec, "local")
    _append(path, t=1.0, step=10, max_steps=20, loss=2.0, elapsed_s=5.0)
    view.refresh()
    _append(path, t=2.0, step=10, val_loss=1.75)  # within the 10 s that throttle step lines
    view.refresh()
    view.refresh()
    lines = [line.strip() for line in out.getvalue().splitlines() if line.startswith("  sft:")]
    assert lines == ["sft: step 10/20  loss 2.0000  ETA 5s", "sft: step 10  val_loss 1.7500"]


def test_off_a_terminal_long_lines_are_not_wrapped(capsys, monkeypatch):
    from tests.conftest import TINY_RECIPE

    monkeypatch.delenv("COLUMNS", raising=False)
    name = "m" * 150
    assert cli.main(["validate", str(TINY_RECIPE), "--set", f"tracking.registered_model={name}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"registered model '{name}'")
