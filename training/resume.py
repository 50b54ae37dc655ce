"""Resumable training stages: periodic training-state checkpoints under `<stage out_dir>/resume/`, and
picking up from the newest complete one when the stage starts again (a requeued or preempted Slurm job, a
crashed or interrupted local run).

A checkpoint `step-NNNNNNNN/` is a DCP directory (parallel.distributed.checkpoint: trainable weights,
optimizer state, step, RNG), so a stage saved under one layout resumes under another, or in one process.
It is complete only once its completion record `COMPLETE.json` exists: written last, atomically, by rank 0
after every rank's files are written and fsynced, listing every file of the step (all ranks') with its
size. Sizes, not checksums: truncation (a crash, a full disk) is what breaks checkpoints in practice, and
a checksum would make rank 0 read every rank's shards back over the shared filesystem at each save (tens
to hundreds of GB for a large model) and every rank read them twice at each start; DCP still fails loudly
on a garbled file, and that step is then skipped like any other damaged one.

The newest `keep` complete steps are kept; an older one is deleted only after a newer one is complete, and
steps without a record (a save that never finished) are removed by the next save, never loaded. `latest`
(rewritten atomically after each record) names the newest for people; loading ignores it and scans the
steps, newest first, skipping (with one line saying which and why) a step whose record or files are
wrong or whose load fails, so a damaged newest step costs `every` steps, not the stage. Rank 0 decides
which steps are candidates and every rank agrees on each load's outcome, so all ranks resume from the
same step (DCP loads are collective). If checkpoints existed and none is usable, NoCompleteCheckpoint
says so in one line naming the directory, rather than restarting from step 0. A save that fails (a full
disk) removes its partial step and raises CheckpointSaveError (one line: path, errno, needed and free
space). The orchestrator (hpc.jobs) empties `resume/` when the stage's config or inputs changed, so a
checkpoint is only ever resumed by the run that wrote it.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

from torch.distributed.checkpoint.api import CheckpointException

from parallel import engine
from parallel.distributed.checkpoint import (
    ResumeRefused,
    failure,
    fsync_dir,
    load_checkpoint,
    save_checkpoint,
    state_nbytes,
    write_atomic,
)

LATEST = "latest"
COMPLETE = "COMPLETE.json"
STEP = re.compile(r"step-(\d+)")


class NoCompleteCheckpoint(RuntimeError):
    """Checkpoints exist in a stage's resume directory but none is complete and loadable (one-line message)."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); its message is one line."""


def resume_dir(out_dir: Path) -> Path:
    """Where a stage's resumable training state lives."""
    return Path(out_dir) / "resume"


def discard(out_dir: Path) -> None:
    """Drop a stage's resumable state (the stage completed, or its config changed)."""
    shutil.rmtree(resume_dir(out_dir), ignore_errors=True)


def _human(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _files(step_dir: Path, rank: int = 0) -> dict[str, int]:
    """The files under a step directory (relative path -> size), its record and temporaries aside: all of
    them on rank 0, a rank's own (its DCP shards and RNG file) on another."""
    own = (f"__{rank}_", f"rank-{rank}-of-")
    out = {}
    for path in step_dir.rglob("*"):
        if path.is_file() and path.name != COMPLETE and not path.name.endswith(".tmp"):
            if rank == 0 or path.name.startswith(own):
                out[path.relative_to(step_dir).as_posix()] = path.stat().st_size
    return out


def _problem(step_dir: Path) -> str | None:
    """Why a step is not complete (its record missing or unreadable, a listed file missing or of another
    size), or None when it is."""
    record = step_dir / COMPLETE
    if not record.is_file():
        return f"no {COMPLETE}: its save did not finish"
    try:
        files = json.loads(record.read_text())["files"]
        assert isinstance(files, dict) and files, "it lists no files"
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
        return f"{COMPLETE} is unreadable ({type(err).__name__}: {err})"
    problems = []
    for rel, size in files.items():
        try:
            actual = (step_dir / rel).stat().st_size
        except FileNotFoundError:
            problems.append(f"{rel} is missing")
            continue
        except OSError as err:
            problems.append(f"{rel}: {err.strerror}")
            continue
        if actual != size:
            problems.append(f"{rel}: {actual} bytes, expected {size}")
    if not problems:
        return None
    more = f", and {len(problems) - 3} more" if len(problems) > 3 else ""
    return ", ".join(problems[:3]) + more


def _reason(exc: BaseException) -> tuple[int | None, str]:
    """A failed load: (the rank DCP says failed, if it says) and the exception's type and message in a line."""
    rank, exc = failure(exc)
    text = " ".join(str(exc).split()) or "no message"
    return rank, f"{type(exc).__name__}: {text if len(text) <= 200 else text[:197] + '...'}"


class Resumer:
    """Saves every `every` steps (0: never), keeps the newest `keep` complete steps, and loads the newest
    complete one of a stage's out_dir."""

    def __init__(self, out_dir: Path, every: int, keep: int = 2):
        self.root = resume_dir(out_dir)
        self.every = every
        self.keep = keep

    def steps(self) -> list[Path]:
        """The step directories, newest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP.fullmatch(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found, reverse=True)]

    def _candidates(self) -> tuple[list[tuple[str, str | None, bool]], bool]:
        """Rank 0's view: (step name, why it is not complete or None, has a record) newest first, and
        whether a complete checkpoint ever existed (a record, or a `latest` pointer)."""
        pointer = self.root / LATEST
        latest = pointer.read_text().strip() if pointer.is_file() else None
        listed = []
        for p in self.steps():
            problem = _problem(p)
            if problem is not None and p.name == latest and not (p / COMPLETE).exists() and any(p.rglob(".metadata")):
                problem = None  # written before completion records existed (latest was set after a full save);
                # loading it still checks it, and a damaged one is skipped like any other
            listed.append((p.name, problem, (p / COMPLETE).exists()))
        return listed, pointer.exists() or any(has_record for _, _, has_record in listed)

    def load(self, state, report: Callable[[dict], None] | None = None) -> dict | None:
        """Restore `state` (a Trainer, or a dict of them by name) from the newest complete checkpoint
        (collective); returns its saved extra dict with the loop's `step`, or None when there is nothing to
        resume. Each newer step skipped is told in one line (stderr on rank 0, and `report` on every rank
        as {"resume": "skipped", ...}). Raises NoCompleteCheckpoint when checkpoints were written and none
        can be loaded."""
        found: tuple | OSError | None = None
        if engine.is_leader():
            try:
                found = self._candidates()
            except OSError as err:
                found = err
        found = engine.from_rank0(found)
        if isinstance(found, OSError):
            raise found
        listed, had_checkpoint = found
        skipped: list[tuple[str, str]] = []
        for name, problem, _ in listed:
            if problem is None:
                path = self.root / name
                extra, problem = self._try_load(state, path)
                if problem is None:
                    self._tell(skipped, name, report)
                    return extra | {"step": extra["loop_step"], "path": str(path)}
            skipped.append((name, problem))
        if not had_checkpoint:  # nothing, or only saves that never finished: nothing was lost
            if skipped:
                self._tell(skipped, None, report)
            return None
        details = "; ".join(f"{name}: {why}" for name, why in skipped) or "the step directories are gone"
        raise NoCompleteCheckpoint(
            f"hpcft: no complete checkpoint is left in {self.root} ({details}); delete {self.root} to start "
            f"the stage over, or restore it from a backup"
        )

    def _try_load(self, state, path: Path) -> tuple[dict | None, str | None]:
        """Collective: load one step; (extra, None), or (None, why) when it failed on any rank (every rank
        gets the same answer, so they all go on to the same older step)."""
        extra, problem = None, None
        try:
            if isinstance(state, dict):
                for name, one in state.items():
                    extra = load_checkpoint(one, path / name)
            else:
                extra = load_checkpoint(state, path)
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
            if not isinstance(failure(exc)[1], Exception) or isinstance(exc, ResumeRefused):
                raise  # an interrupt inside DCP, or a sound step this layout cannot take: not a damaged step
            problem = _reason(exc)
        gathered = engine.all_gather_object(problem)
        failed = [(rank, p) for rank, p in enumerate(gathered) if p is not None]
        if not failed:
            return extra, None
        rank, (dcp_rank, text) = failed[0]
        on = f" on rank {rank if dcp_rank is None else dcp_rank}" if len(gathered) > 1 else ""
        return None, f"loading it failed{on}: {text}"

    def _tell(self, skipped: list[tuple[str, str]], resumed: str | None, report) -> None:
        then = f"resuming from {resumed}" if resumed else "no complete checkpoint, starting the stage from step 0"
        for name, why in skipped:
            kind = "incomplete" if why.startswith(f"no {COMPLETE}") else "damaged"
            line = f"hpcft: checkpoint {self.root / name} is {kind} ({why}); {then}"
            if engine.is_leader():
                print(line, file=sys.stderr, flush=True)
            if report is not None:
                report(
                    {
                        "resume": "skipped",
                        "skipped_step": int(STEP.fullmatch(name).group(1)),
                        "checkpoint": str(self.root / name),
                        "reason": why,
                        "resumed_from": resumed,
                    }
                )

    def due(self, step: int, last_step: int) -> bool:
        return self.every > 0 and step % self.every == 0 and step < last_step

    def save(self, state, step: int, extra: dict | None = None) -> Path:
        """Collective: write step-<step>/ (a dict of states: one subdirectory each), then its completion
        record, point `latest` at it and delete the steps beyond `keep`. `step` is the loop's; each state
        keeps its own update count. Raises CheckpointSaveError (on every rank) when it cannot be written."""
        name = f"step-{step:08d}"
        path = self.root / name
        error = None
        if engine.is_leader():
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for old in self.steps():  # a crashed save's leftovers, and an earlier try at this very step
                    if old == path or not (old / COMPLETE).exists():
                        shutil.rmtree(old, ignore_errors=True)
            except OSError as err:
                error = err
        error = engine.from_rank0(error)  # also the barrier before the ranks write
        if error is not None:
            raise self._save_failed(error, path, state) from error
        extra = (extra or {}) | {"loop_step": step}
        try:
            for sub, one in state.items() if isinstance(state, dict) else [(None, state)]:
                save_checkpoint(one, path / sub if sub else path, extra)
            # Rank 0's view of the files, and every rank's own (a shared filesystem may show rank 0 a peer's
            # files late, or their sizes stale).
            try:
                view = _files(path, engine.rank_and_world()[0])
            except OSError as err:
                view = err
            views = engine.all_gather_object(view)
            failed = [v for v in views if isinstance(v, OSError)]
            if failed:
                raise failed[0]
        except OSError as err:  # the same on every rank
            raise self._save_failed(err, path, state) from err
        error = None
        if engine.is_leader():
            files: dict[str, int] = {}
            for view in views:
                for rel, size in view.items():
                    files[rel] = max(size, files.get(rel, 0))
            try:
                record = {"step": step, "world_size": len(views), "files": dict(sorted(files.items()))}
                write_atomic(path / COMPLETE, (json.dumps(record, indent=1) + "\n").encode())
                write_atomic(self.root / LATEST, (name + "\n").encode())
            except OSError as err:
                error = err
        error = engine.from_rank0(error)
        if error is not None:
            raise self._save_failed(error, path, state) from error
        if engine.is_leader():
            self._prune(step)
        engine.barrier()
        return path

    def _prune(self, step: int) -> None:
        """Rank 0, once step `step` is complete: keep it and the newest keep-1 older complete steps. Newer
        steps than it are ones a resume skipped as damaged; they go too."""
        kept = 1
        for old in self.steps():
            number = int(STEP.fullmatch(old.name).group(1))
            if number == step:
                continue
            if number < step and kept < self.keep and _problem(old) is None:
                kept += 1
                continue
            shutil.rmtree(old, ignore_errors=True)
        try:
            fsync_dir(self.root)
        except OSError:  # the deletions need not be durable: a step that comes back is still complete
            pass

    def _save_failed(self, err: OSError, path: Path, state) -> CheckpointSaveError:
        """Collective: remove the partial step and describe the failure in one line (rank 0's words)."""
        if engine.is_leader():
            shutil.rmtree(path, ignore_errors=True)
        states = state.values() if isinstance(state, dict) else [state]
        estimate = max(engine.all_gather_object(sum(state_nbytes(one) for one in states)))
        message = None
        if engine.is_leader():
            try:
                previous = next((p for p in self.steps() if _problem(p) is None), None)
                size = previous and sum(json.loads((previous / COMPLETE).read_text())["files"].values())
            except (OSError, ValueError):
                previous = None
            if previous is not None:
                need = f"{_human(size)} (as {previous.name} did)"
            else:
                need = f"at least {_human(estimate)} (the state's tensors)"
            try:
                free = _human(shutil.disk_usage(self.root).free)
            except OSError:
                free = "an unknown amount"
            code = errno.errorcode.get(err.errno, str(err.errno)) if err.errno is not None else type(err).__name__
            where = f" ({err.filename})" if err.filename else ""
            then = f"; the run can resume from {previous.name}" if previous is not None else ""
            message = (
                f"hpcft: saving checkpoint {path} failed: {code} {err.strerror or err}{where}; a checkpoint needs "
                f"{need} and {free} is free there{then}; free space or move the run's directory, then rerun"
            )
        return CheckpointSaveError(engine.from_rank0(message))
