"""Resumable training stages: periodic training-state checkpoints under `<stage out_dir>/resume/`, and
picking up from the latest one when the stage starts again (a requeued or preempted Slurm job, a
crashed or interrupted local run).

A checkpoint is a DCP directory (parallel.distributed.checkpoint: trainable weights, optimizer state,
step, RNG), so a stage saved under one layout resumes under another, or in one process. `latest`
names the newest complete checkpoint; it is replaced only after the new one is fully written, and
the older ones are deleted then. The orchestrator (hpc.jobs) empties `resume/` when the stage's
config or inputs changed, so a checkpoint is only ever resumed by the run that wrote it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from parallel import engine
from parallel.distributed.checkpoint import load_checkpoint, save_checkpoint

LATEST = "latest"


def resume_dir(out_dir: Path) -> Path:
    """Where a stage's resumable training state lives."""
    return Path(out_dir) / "resume"


def discard(out_dir: Path) -> None:
    """Drop a stage's resumable state (the stage completed, or its config changed)."""
    shutil.rmtree(resume_dir(out_dir), ignore_errors=True)


class Resumer:
    """Saves every `every` steps (0: never) and loads the latest checkpoint of a stage's out_dir."""

    def __init__(self, out_dir: Path, every: int):
        self.root = resume_dir(out_dir)
        self.every = every

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def load(self, state) -> dict | None:
        """Restore `state` (a Trainer, or a dict of them by name) from the
        latest checkpoint (collective); returns its saved extra dict with the loop's `step`, or None when
        there is nothing to resume."""
        path = self.latest()
        if path is None:
            return None
        if isinstance(state, dict):
            for name, one in state.items():
                extra = load_checkpoint(one, path / name)
        else:
            extra = load_checkpoint(state, path)
        return extra | {"step": extra["loop_step"], "path": str(path)}

    def due(self, step: int, last_step: int) -> bool:
        return self.every > 0 and step % self.every == 0 and step < last_step

    def save(self, state, step: int, extra: dict | None = None) -> Path:
        """Collective: write step-<step>/ (a dict of states: one subdirectory each), then point `latest` at
        it and delete the older ones. `step` is the loop's; each state keeps its own update count."""
        name = f"step-{step:08d}"
        path = self.root / name
        if engine.is_leader() and path.exists():
            shutil.rmtree(path)
        engine.barrier()
        extra = (extra or {}) | {"loop_step": step}
        for sub, one in state.items() if isinstance(state, dict) else [(None, state)]:
            save_checkpoint(one, path / sub if sub else path, extra)
        if engine.is_leader():
            tmp = self.root / f".{LATEST}.tmp"
            tmp.write_text(name + "\n")
            tmp.replace(self.root / LATEST)
            for old in self.root.glob("step-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        engine.barrier()
        return path
