"""Off a terminal the pipeline prints plain progress lines: each progress event once, however often the
pipeline polls while a slow step (or a step-0 validation) runs."""

import json

from rich.console import Console

from hpc import progress
from hpc.plan import StageSpec
from hpc.progress import PipelineView


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _append(path, **event):
    with open(path, "a") as f:
        f.write(json.dumps(event) + "\n")


def test_each_event_is_printed_once_in_plain_mode(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "time", clock)
    paths = {name: tmp_path / f"{name}.jsonl" for name in ("sft", "data")}
    out = tmp_path / "out.txt"
    specs = [StageSpec(name=n, kind=n, depends_on=(), resources=None, input_hash="h") for n in paths]
    with open(out, "w") as f:
        view = PipelineView(specs, lambda name: paths[name], Console(file=f, width=200))
        with view:
            assert view.live is None  # a file is not a terminal: plain lines
            for spec in specs:
                view.start(spec, "local")

            def poll(times: int) -> None:  # the pipeline's polling loop, every 2.5 s
                for _ in range(times):
                    clock.now += 2.5
                    view.refresh()

            _append(paths["sft"], t=1.0, stage="sft", step=0, val_loss=2.5)
            poll(20)  # a validation that takes 50 s
            _append(paths["sft"], t=2.0, stage="sft", step=5, max_steps=10, loss=1.5, elapsed_s=5.0)
            _append(paths["data"], t=2.0, stage="data", step="exact_find", done=1, total=2)
            poll(40)  # a slow step (e.g. under tp=3 on CPU): 100 s of polls
            _append(paths["sft"], t=3.0, stage="sft", step=10, max_steps=10, loss=1.0, elapsed_s=10.0)
            poll(8)
    lines = out.read_text().splitlines()
    progress_lines = [line.strip() for line in lines if line.startswith("  ")]
    assert progress_lines == [
        "sft: step 0  val_loss 2.5000",
        "sft: step 5/10  loss 1.5000  ETA 5s",
        "data: exact_find (1/2)",
        "sft: step 10/10  loss 1.0000  ETA 0s",
    ]


def test_a_burst_of_events_is_still_throttled_per_stage(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "time", clock)
    path = tmp_path / "sft.jsonl"
    out = tmp_path / "out.txt"
    spec = StageSpec(name="sft", kind="sft", depends_on=(), resources=None, input_hash="h")
    with open(out, "w") as f:
        view = PipelineView([spec], lambda name: path, Console(file=f, width=200))
        view.start(spec, "local")
        for step in range(1, 41):  # a step every second, polled every second
            _append(path, t=float(step), stage="sft", step=step, max_steps=40, loss=1.0)
            clock.now += 1.0
            view.refresh()
    shown = [line for line in out.read_text().splitlines() if line.startswith("  sft: step")]
    assert 3 <= len(shown) <= 4  # one line per 10 s, never the same step twice
    assert len(set(shown)) == len(shown)
