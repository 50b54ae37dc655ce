"""The terminal view: a live table of stages and training progress; plain lines when not a terminal."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from hpc.plan import StageSpec

ATTEMPT = "attempt"  # the `event` of the record that starts a stage's (re)run in its progress.jsonl


def start_attempt(path: Path, stage: str, input_hash: str | None = None, **extra) -> int:
    """Append the record starting a new attempt of `stage` ({"t", "stage", "event": "attempt", "attempt": N},
    plus `extra`, e.g. a Slurm retry's `after`: why the previous attempt ended) and return N. A rerun keeps
    the earlier attempts' lines (the curve before a crash stays readable); readers show only what follows the
    latest such record. With `input_hash` (the stage's inputs), N counts only the earlier attempts on the same
    inputs: a stage rerun because its recipe or upstream changed starts again at attempt 1, not "attempt 2"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    if path.is_file():
        with open(path, "rb") as f:
            for line in f:
                if b'"event": "attempt"' not in line:
                    continue
                try:
                    earlier = json.loads(line).get("input_hash")
                except (json.JSONDecodeError, AttributeError):
                    earlier = None
                n += input_hash is None or earlier is None or earlier == input_hash
    record = {"t": time.time(), "stage": stage, "event": ATTEMPT, "attempt": n}
    record |= {"input_hash": input_hash} if input_hash else {}
    with open(path, "a") as f:
        f.write(json.dumps(record | extra) + "\n")
    return n


def read_last_event(path: Path, need: str = "step") -> dict | None:
    """The newest progress event of the latest attempt carrying key `need`, reading only the file's tail;
    the attempt record itself when that attempt has none yet (an earlier attempt's step is not current)."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 16384))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(ev, dict):
            continue
        if need in ev:
            return ev
        if ev.get("event") == ATTEMPT:
            return ev
    return None


def current_attempt(events: list[dict]) -> list[dict]:
    """The events after the latest attempt record (all of them for a file written before attempts existed)."""
    starts = [i for i, ev in enumerate(events) if ev.get("event") == ATTEMPT]
    return events[starts[-1] + 1 :] if starts else events


# Training metrics worth a glance, in display order: (event key, label).
SHOWN = (("loss", "loss"), ("accuracy", "acc"), ("reward", "reward"), ("kl", "kl"))
RATES = (
    ("tokens_per_s", "tok/s"),
    ("pairs_per_s", "pairs/s"),
    ("samples_per_s", "samples/s"),
    ("rollouts_per_s", "rollouts/s"),
    ("generation_tokens_per_s", "gen tok/s"),  # PPO/GRPO sampling, timed apart from the updates
)
EVAL_EVENTS = {"eval_load": "loading model", "eval_run": "running", "eval_done": "done"}


def eta_s(ev: dict, seconds: float | None = None, done: int | None = None) -> float | None:
    """Seconds left for a training step event: `seconds` spent on `done` steps (default: its elapsed time over
    its step count) times the steps left."""
    seconds = ev.get("elapsed_s") if seconds is None else seconds
    done = ev["step"] if done is None else done
    if not seconds or seconds <= 0 or done <= 0:
        return None
    return seconds / done * (ev["max_steps"] - ev["step"])


def describe(ev: dict | None) -> str:
    if not ev:
        return ""
    if ev.get("event") == ATTEMPT:
        if ev.get("attempt", 1) == 1:
            return "started"
        after = f" (after: {ev['after'][:60]})" if ev.get("after") else ""
        return f"attempt {ev['attempt']} started{after}"
    if ev.get("event") in EVAL_EVENTS:
        scores = "  ".join(f"{k} {v:.3f}" for k, v in sorted((ev.get("scores") or {}).items()))
        where = f"{ev['element']}: " if ev.get("element") else ""
        return f"{where}{EVAL_EVENTS[ev['event']]}{'  ' + scores if scores else ''}"
    held_out = [k for k in ev if k.startswith("val_") and isinstance(ev[k], (int, float))]
    if "max_steps" not in ev and held_out:  # a validation event
        return f"step {ev['step']}  " + "  ".join(f"{k} {ev[k]:.4f}" for k in held_out[:3])
    if "max_steps" in ev:
        parts = [f"step {ev['step']}/{ev['max_steps']}"]
        parts += [f"{label} {ev[key]:.4f}" for key, label in SHOWN if isinstance(ev.get(key), (int, float))]
        if isinstance(ev.get("lr"), (int, float)):
            parts.append(f"lr {ev['lr']:.2e}")
        if isinstance(ev.get("grad_norm"), (int, float)):
            parts.append(f"grad norm {ev['grad_norm']:.3f}")
        parts += [f"{ev[key]:,.0f} {label}" for key, label in RATES if ev.get(key)]
        if isinstance(ev.get("mfu"), (int, float)):
            parts.append(f"MFU {ev['mfu']:.1%}")
        if isinstance(ev.get("peak_mem_gib"), (int, float)):
            parts.append(f"mem {ev.get('peak_mem_gib_max', ev['peak_mem_gib']):.1f} GiB")
        eta = eta_s(ev)
        if eta is not None:
            parts.append(f"ETA {eta:,.0f}s")
        return "  ".join(parts)
    if "resumed_from_step" in ev:
        return f"resumed from step {ev['resumed_from_step']}"
    if "checkpoint" in ev and "step" in ev:
        return f"step {ev['step']}  checkpoint saved"
    if "done" in ev and "total" in ev:
        return f"{ev['step']} ({ev['done']}/{ev['total']})"
    return str(ev.get("step", ""))


class StageEvents:
    """What a stage's progress.jsonl says about its latest attempt, read on from where the last read stopped:
    the newest training step, the held-out metrics of each evaluation, the data step, each eval element."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self._reset()

    def _reset(self, started: float | None = None) -> None:
        self.started = started  # when the latest attempt started
        self.train: dict | None = None
        self.train_s: float | None = None  # the train event's elapsed time less held-out evaluations, checkpoints
        self._excluded = 0.0  # ... those, so far
        self._val0_t: float | None = None  # when the step-0 evaluation ended
        self._last_t: float | None = None
        self.val: dict[str, float] = {}
        self.val_step: int | None = None
        self.resumed_step = 0
        self.data: dict | None = None
        self.elements: dict[str, dict] = {}

    def read(self) -> list[dict]:
        """The events appended since the last call (complete lines only), applied to this summary."""
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        events = []
        for line in chunk[:end].decode(errors="replace").splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(ev, dict):
                self._apply(ev)
                events.append(ev)
        return events

    def _apply(self, ev: dict) -> None:
        """The time a training event's elapsed_s spent outside steps is measured from the events' times: the
        step-0 evaluation (elapsed_s of the first step event minus the time since that evaluation's event),
        each later evaluation (its event's time minus the previous event's: the loop logs, then evaluates),
        and each checkpoint's own checkpoint_s."""
        t = ev.get("t") if isinstance(ev.get("t"), (int, float)) else None
        if ev.get("event") == ATTEMPT:
            self._reset(t)
        elif ev.get("event") in EVAL_EVENTS:
            self.elements[str(ev.get("element"))] = ev
        elif "max_steps" in ev:
            if self.train is None and self._val0_t is not None and t is not None and ev.get("elapsed_s"):
                self._excluded += max(0.0, ev["elapsed_s"] - (t - self._val0_t))
            self.train = ev
            self.train_s = ev["elapsed_s"] - self._excluded if ev.get("elapsed_s") else None
        elif "resumed_from_step" in ev:
            self.resumed_step = ev["resumed_from_step"]
        elif isinstance(ev.get("checkpoint_s"), (int, float)):
            self._excluded += ev["checkpoint_s"]
        elif isinstance(ev.get("step"), int) and any(k.startswith("val_") for k in ev):
            self.val = {k: v for k, v in ev.items() if k.startswith("val_") and isinstance(v, (int, float))}
            self.val_step = ev["step"]
            if self.train is None:
                self._val0_t = t
            elif t is not None and self._last_t is not None:
                self._excluded += t - self._last_t
        elif "done" in ev and "total" in ev:
            self.data = ev
        self._last_t = t if t is not None else self._last_t

    def fraction(self, spec: StageSpec) -> float | None:
        """How far the stage is, 0..1 (None: nothing to measure yet)."""
        if spec.is_array:
            done = sum(1 for ev in self.elements.values() if ev["event"] == "eval_done")
            return done / len(spec.elements)
        if self.train:
            return self.train["step"] / self.train["max_steps"]
        if self.data:
            return self.data["done"] / self.data["total"]
        return None

    def summary(self) -> str:
        """Training: step, loss, lr, grad norm, rate, ETA (steps only) and the latest held-out metrics."""
        parts = []
        if self.train:
            ev = self.train
            done = ev["step"] - self.resumed_step
            seconds = self.train_s
            rate = f"  {done / seconds:.2f} steps/s" if seconds and seconds > 0 and done > 0 else ""
            parts.append(describe({k: v for k, v in ev.items() if k != "elapsed_s"}) + rate)
            eta = eta_s(ev, seconds, done) if seconds is not None else None
            if eta is not None:
                parts.append(f"ETA {eta:,.0f}s")
        elif self.data:
            parts.append(describe(self.data))
        if self.val:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in list(self.val.items())[:3])
            parts.append(f"at step {self.val_step}: {shown}")
        return "  ".join(parts)


def funnel_lines(manifest: dict) -> list[str]:
    """The data stage's funnel from its manifest: rows in -> kept per step, the rejection reasons, the splits."""
    lines = []
    for kind, section in (("chat", manifest), *((k, manifest.get(k) or {}) for k in ("preference", "unpaired"))):
        steps = section.get("steps") or {}
        if not steps:
            continue
        first = next(iter(steps.values()))
        chain = " -> ".join(f"{name} {step['kept']}" for name, step in steps.items())
        lines.append(f"{kind} rows: {first['in']} in -> {chain}")
        reasons = [
            f"{name}/{reason} {n}" for name, step in steps.items() for reason, n in (step.get("reasons") or {}).items()
        ]
        if reasons:
            lines.append(f"{kind} rejected: " + ", ".join(reasons))
        splits = section.get("splits") or {}
        lines.append(f"{kind} splits: " + "  ".join(f"{k} {v}" for k, v in splits.items()))
    return lines


class PipelineView:
    """Stage states for the whole plan; `refresh()` is cheap enough to call from a polling loop. On a terminal a
    live table (a progress bar per stage and per eval element, training metrics, the latest held-out metrics,
    total elapsed time); elsewhere plain lines, each event once, at most one training line per stage every 10 s."""

    def __init__(self, plan: list[StageSpec], progress_path, console: Console | None = None):
        self.console = console or Console()
        self.plan = plan
        self.progress_path = progress_path
        self.state = {s.name: "pending" for s in plan}
        self.started: dict[str, float] = {}
        self.elapsed: dict[str, float] = {}
        self.detail: dict[str, str] = {}
        self.jobs: dict[str, str] = {}  # stage -> job ids and element states (cluster executors)
        self.events = {s.name: StageEvents(progress_path(s.name)) for s in plan}
        self.live: Live | None = None
        self.opened = time.time()
        self._last_line: dict[str, float] = {}  # plain mode: when each stage's last progress line was printed
        self._printed: dict[str, dict] = {}  # ... and the event it showed (each event is printed once)

    def __enter__(self):
        if self.console.is_terminal:
            self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.update(self._render())
            self.live.__exit__(*exc)

    def _render(self):
        table = Table(title="hpcft pipeline", expand=False, caption=f"elapsed {time.time() - self.opened:,.0f}s")
        for col in ("stage", "kind", "elements", "state", "time", "jobs", "progress", ""):
            table.add_column(col)
        style = {"done": "green", "skipped": "dim", "running": "yellow", "failed": "red", "pending": "default"}
        for s in self.plan:
            st = self.state[s.name]
            t = self.elapsed.get(s.name) or (time.time() - self.started[s.name] if st == "running" else None)
            events = self.events[s.name]
            fraction = 1.0 if st == "done" else events.fraction(s) if st in ("running", "failed") else None
            table.add_row(
                s.name,
                s.kind,
                str(len(s.elements)),
                f"[{style.get(st, '')}]{st}",
                f"{t:.0f}s" if t is not None else "",
                self.jobs.get(s.name, ""),
                _bar(fraction),
                (events.summary() if st == "running" else "") or self.detail.get(s.name, ""),
            )
            if s.is_array and st in ("running", "failed"):
                for element in s.elements:
                    ev = events.elements.get(element)
                    done = 1.0 if ev and ev["event"] == "eval_done" else 0.5 if ev else 0.0
                    shown = describe({k: v for k, v in ev.items() if k != "element"}) if ev else "waiting"
                    table.add_row(f"  {element}", "", "", "", "", "", _bar(done), shown)
        return Group(table)

    def _print(self, msg: str) -> None:
        if self.live:
            self.live.console.print(msg)
        else:
            self.console.print(msg, highlight=False)

    def skip(self, spec: StageSpec) -> None:
        self.state[spec.name] = "skipped"
        self.detail[spec.name] = "up to date"
        self._print(f"[dim]= {spec.name}: up to date, skipped")
        self.refresh()

    def start(self, spec: StageSpec, executor: str) -> None:
        self.state[spec.name] = "running"
        self.started[spec.name] = time.time()
        jobs = f"{len(spec.elements)} array elements" if spec.is_array else "1 job"
        self._print(f"> {spec.name}: started ({jobs}, {executor} executor)")
        self.refresh()

    def finish(self, spec: StageSpec, ok: bool, note: str = "", lines: list[str] = ()) -> None:
        """`lines`: printed under the stage's verdict (e.g. the data stage's funnel)."""
        self.refresh()  # the last events (an eval element's scores) are printed before the verdict
        self.state[spec.name] = "done" if ok else "failed"
        self.elapsed[spec.name] = time.time() - self.started.get(spec.name, time.time())
        if note or ok:  # a failed stage keeps its last progress line
            self.detail[spec.name] = note
        mark = "[green]✓" if ok else "[red]✗"
        self._print(
            f"{mark} {spec.name}: {'finished' if ok else 'FAILED'} in "
            f"{self.elapsed[spec.name]:.1f}s{'  ' + note if note else ''}"
        )
        for line in lines:
            self._print(f"  {line}")
        self.refresh()

    def _due(self, name: str, ev: dict) -> bool:
        """Plain mode: print a stage's newest event when it is one not printed yet, at most one line per stage
        every 10 s (a slow step is not repeated at every poll)."""
        now = time.time()
        if ev == self._printed.get(name) or now - self._last_line.get(name, 0.0) <= 10:
            return False
        self._printed[name], self._last_line[name] = ev, now
        return True

    def refresh(self) -> None:
        for name, st in self.state.items():
            if st == "running":
                events = self.events[name].read()
                starts = [i for i, ev in enumerate(events) if ev.get("event") == ATTEMPT]
                for ev in events[starts[-1] if starts else 0 :]:  # evaluations are few: each one is printed
                    held_out = "max_steps" not in ev and any(k.startswith("val_") for k in ev)
                    if not self.live and (ev.get("event") in EVAL_EVENTS or held_out):
                        self._print(f"  {name}: {describe(ev)}")
                        self._printed[name] = ev if held_out else self._printed.get(name)
                ev = read_last_event(self.progress_path(name))
                if ev:
                    self.detail[name] = describe(ev)
                    if not self.live and self._due(name, ev):
                        self._print(f"  {name}: {self.detail[name]}")
        if self.live:
            self.live.update(self._render())


def _bar(fraction: float | None):
    if fraction is None:
        return ""
    grid = Table.grid(padding=(0, 1))
    grid.add_row(ProgressBar(total=1.0, completed=fraction, width=24), f"{100 * fraction:3.0f}%")
    return grid
