"""Executors on this machine: inline (in this process, one element after the other) and local (submitit's
LocalExecutor subprocesses, at most `max_parallel` at once)."""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from pathlib import Path
from typing import Callable

from hpc.errors import ERROR_PREFIX, StageError
from hpc.executor import BlockingExecutor, StageFailed, tail
from hpc.jobs import run_stage
from hpc.lifeline import SUPERVISOR_ENV, describe_signal, identity, kill_tree
from hpc.plan import StageSpec
from hpc.rundir import RunDir


class InlineExecutor(BlockingExecutor):
    """Runs every element in this process, one after the other: for debugging with pdb or prints."""

    name = "inline"

    def run(self, spec: StageSpec, rd: RunDir, pending: list[int], poll: Callable[[], None]) -> None:
        if spec.resources.nodes * spec.resources.tasks_per_node > 1:
            raise StageFailed(
                spec.name,
                "0",
                None,
                "the inline executor runs one process; a multi-process "
                "parallel layout needs executor.kind local or slurm",
            )
        for i in pending:
            try:
                run_stage(str(rd.root), spec.name, i, echo=False)  # the CLI's own view shows progress
            except StageError as err:  # the job's own one-line verdict (e.g. a full disk)
                raise StageFailed(spec.name, spec.elements[i], None, ERROR_PREFIX + str(err)) from None
            except Exception:
                raise StageFailed(spec.name, spec.elements[i], None, tail(traceback.format_exc())) from None
            poll()


class LocalExecutor(BlockingExecutor):
    """Each element is a real subprocess via submitit's LocalExecutor, at most `max_parallel` at once."""

    name = "local"

    def run(self, spec: StageSpec, rd: RunDir, pending: list[int], poll: Callable[[], None]) -> None:
        import shlex
        import sys

        import submitit

        # Each task runs under hpc.lifeline's wrapper: it dies with this CLI even after `kill -9` of it, and
        # names the signal that killed a task in the task's stderr log.
        logs = rd.stage_dir(spec.name) / "logs"
        ex = submitit.LocalExecutor(folder=logs / "%j", python=f"{shlex.quote(sys.executable)} -m hpc.lifeline")
        # A multi-process training layout runs as one job of several local tasks (ranks).
        tasks = spec.resources.nodes * spec.resources.tasks_per_node
        ex.update_parameters(timeout_min=self.cfg.timeout_min, tasks_per_node=tasks)
        queue, running = list(pending), {}
        try:
            while queue or running:
                while queue and len(running) < self.cfg.max_parallel:
                    i = queue.pop(0)
                    with _supervised():
                        running[i] = ex.submit(run_stage, str(rd.root), spec.name, i)
                    record_job(logs, i, running[i].job_id)
                for i, job in list(running.items()):
                    if job.done():
                        del running[i]
                        self._check(spec, i, job, running)
                poll()
                time.sleep(0.3)
        except BaseException:  # Ctrl-C or SIGTERM of the CLI: leave no job behind
            _stop(running.values())
            raise
        finally:  # each task's controller creates the folder pattern itself, literally (submitit)
            with contextlib.suppress(OSError):
                (logs / "%j").rmdir()

    def _check(self, spec: StageSpec, i: int, job, running: dict) -> None:
        # A job that ended without a result was killed (a failing job pickles its exception): reported at
        # once, where job.exception() would first wait for a result that cannot come.
        exc = job.exception() if job.paths.result_pickle.exists() else None
        if exc is None and job.paths.result_pickle.exists():
            return
        for other in running.values():
            other.cancel(check=False)
        raise StageFailed(spec.name, spec.elements[i], Path(job.paths.stderr), failure_text(job, exc))


def record_job(logs: Path, element: int, job_id: str) -> None:
    """logs/elements.json: {element index: the job id whose logs/<job id>/ holds its logs}, latest attempt."""
    path = logs / "elements.json"
    jobs = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(jobs | {str(element): str(job_id)}) + "\n")


def failure_text(job, exc: BaseException | None) -> str:
    """Why a local job failed: the tail of its stderr log (the traceback, or hpc.lifeline's line naming the
    signal that killed it), else what is known: no result, the controller's exit status, submitit's words."""
    log = Path(job.paths.stderr)
    text = log.read_text(errors="replace").strip() if log.is_file() else ""
    if text:
        return tail(text)
    process = getattr(job, "_process", None)
    code = process.returncode if process is not None else None
    status = f"; its controller was {describe_signal(-code)}" if code is not None and code < 0 else ""
    said = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else ""
    return f"the job ended without a result and left an empty log{status}" + (f" (submitit: {said})" if said else "")


class _supervised:
    """$HPCFT_SUPERVISOR names this CLI while a job is submitted (submitit copies os.environ then); set only
    around local submissions, so that no job of another executor inherits it."""

    def __enter__(self):
        self.old = os.environ.get(SUPERVISOR_ENV)
        os.environ[SUPERVISOR_ENV] = identity()

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop(SUPERVISOR_ENV, None)
        else:
            os.environ[SUPERVISOR_ENV] = self.old


def _stop(jobs) -> None:
    """Stop local jobs at once: each job's submitit controller and every process under it (its tasks and
    their workers). Killing the tree, rather than SIGINT to the controller, leaves no process behind and
    no controller traceback in the terminal."""
    for job in jobs:
        process = getattr(job, "_process", None)
        if process is not None and process.poll() is None:
            kill_tree(process.pid)
            process.wait()
