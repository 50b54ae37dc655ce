"""The terminal view: a live table of stages and training progress; plain lines when not a terminal."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from hpc.plan import StageSpec

ATTEMPT = "attempt"  # the `event` of the record that starts a stage's (re)run in its progress.jsonl


def start_attempt(path: Path, stage: str, **extra) -> int:
    """Append the record starting a new attempt of `stage` ({"t", "stage", "event": "attempt", "attempt": N},
    plus `extra`, e.g. a Slurm retry's `after`: why the previous attempt ended) and return N. A rerun keeps
    the earlier attempts' lines (the curve before a crash stays readable); readers show only what follows the
    latest such record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    if path.is_file():
        with open(path, "rb") as f:
            n += sum(1 for line in f if b'"event": "attempt"' in line)
    with open(path, "a") as f:
        f.write(json.dumps({"t": time.time(), "stage": stage, "event": ATTEMPT, "attempt": n} | extra) + "\n")
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
RATES = (("tokens_per_s", "tok/s"), ("pairs_per_s", "pairs/s"), ("samples_per_s", "samples/s"))


def describe(ev: dict | None) -> str:
    if not ev:
        return ""
    if ev.get("event") == ATTEMPT:
        if ev.get("attempt", 1) == 1:
            return "started"
        after = f" (after: {ev['after'][:60]})" if ev.get("after") else ""
        return f"attempt {ev['attempt']} started{after}"
    held_out = [k for k in ev if k.startswith("val_") and isinstance(ev[k], (int, float))]
    if "max_steps" not in ev and held_out:  # a validation event
        return f"step {ev['step']}  " + "  ".join(f"{k} {ev[k]:.4f}" for k in held_out[:3])
    if "max_steps" in ev:
        parts = [f"step {ev['step']}/{ev['max_steps']}"]
        parts += [f"{label} {ev[key]:.4f}" for key, label in SHOWN if isinstance(ev.get(key), (int, float))]
        parts += [f"{ev[key]:,.0f} {label}" for key, label in RATES if ev.get(key)]
        if isinstance(ev.get("mfu"), (int, float)):
            parts.append(f"MFU {ev['mfu']:.1%}")
        if isinstance(ev.get("peak_mem_gib"), (int, float)):
            parts.append(f"mem {ev.get('peak_mem_gib_max', ev['peak_mem_gib']):.1f} GiB")
        if ev.get("elapsed_s") and ev["step"]:
            eta = ev["elapsed_s"] / ev["step"] * (ev["max_steps"] - ev["step"])
            parts.append(f"ETA {eta:,.0f}s")
        return "  ".join(parts)
    if "resumed_from_step" in ev:
        return f"resumed from step {ev['resumed_from_step']}"
    if "checkpoint" in ev and "step" in ev:
        return f"step {ev['step']}  checkpoint saved"
    if "done" in ev and "total" in ev:
        return f"{ev['step']} ({ev['done']}/{ev['total']})"
    return str(ev.get("step", ""))


class PipelineView:
    """Stage states for the whole plan; `refresh()` is cheap enough to call from a polling loop."""

    def __init__(self, plan: list[StageSpec], progress_path, console: Console | None = None):
        self.console = console or Console()
        self.plan = plan
        self.progress_path = progress_path
        self.state = {s.name: "pending" for s in plan}
        self.started: dict[str, float] = {}
        self.elapsed: dict[str, float] = {}
        self.detail: dict[str, str] = {}
        self.jobs: dict[str, str] = {}  # stage -> job ids and element states (cluster executors)
        self.live: Live | None = None
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
        table = Table(title="hpcft pipeline", expand=False)
        for col in ("stage", "kind", "elements", "state", "time", "jobs", "progress"):
            table.add_column(col)
        style = {"done": "green", "skipped": "dim", "running": "yellow", "failed": "red"}
        for s in self.plan:
            st = self.state[s.name]
            t = self.elapsed.get(s.name) or (time.time() - self.started[s.name] if st == "running" else None)
            table.add_row(
                s.name,
                s.kind,
                str(len(s.elements)),
                f"[{style.get(st, '')}]{st}",
                f"{t:.0f}s" if t is not None else "",
                self.jobs.get(s.name, ""),
                self.detail.get(s.name, ""),
            )
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

    def finish(self, spec: StageSpec, ok: bool, note: str = "") -> None:
        self.state[spec.name] = "done" if ok else "failed"
        self.elapsed[spec.name] = time.time() - self.started.get(spec.name, time.time())
        if note:
            self.detail[spec.name] = note
        mark = "[green]✓" if ok else "[red]✗"
        self._print(
            f"{mark} {spec.name}: {'finished' if ok else 'FAILED'} in "
            f"{self.elapsed[spec.name]:.1f}s{'  ' + note if note else ''}"
        )
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
                ev = read_last_event(self.progress_path(name))
                if ev:
                    self.detail[name] = describe(ev)
                    if not self.live and self._due(name, ev):
                        self._print(f"  {name}: {self.detail[name]}")
        if self.live:
            self.live.update(self._render())
