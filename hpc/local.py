"""Executors on this machine: inline (in this process, one element after the other) and local (submitit's
LocalExecutor subprocesses, at most `max_parallel` at once)."""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Callable

from hpc.executor import BlockingExecutor, StageFailed, tail
from hpc.jobs import run_stage
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
                run_stage(str(rd.root), spec.name, i)
            except Exception:
                raise StageFailed(spec.name, spec.elements[i], None, tail(traceback.format_exc())) from None
            poll()


class LocalExecutor(BlockingExecutor):
    """Each element is a real subprocess via submitit's LocalExecutor, at most `max_parallel` at once."""

    name = "local"

    def run(self, spec: StageSpec, rd: RunDir, pending: list[int], poll: Callable[[], None]) -> None:
        import submitit

        ex = submitit.LocalExecutor(folder=rd.stage_dir(spec.name) / "logs" / "%j")
        # A multi-process training layout runs as one job of several local tasks (ranks).
        tasks = spec.resources.nodes * spec.resources.tasks_per_node
        ex.update_parameters(timeout_min=self.cfg.timeout_min, tasks_per_node=tasks)
        queue, running = list(pending), {}
        try:
            while queue or running:
                while queue and len(running) < self.cfg.max_parallel:
                    i = queue.pop(0)
                    running[i] = ex.submit(run_stage, str(rd.root), spec.name, i)
                for i, job in list(running.items()):
                    if job.done():
                        del running[i]
                        self._check(spec, i, job, running)
                poll()
                time.sleep(0.3)
        except BaseException:  # Ctrl-C or SIGTERM of the CLI: leave no job behind
            _stop(running.values())
            raise

    def _check(self, spec: StageSpec, i: int, job, running: dict) -> None:
        exc = job.exception()
        if exc is None:
            return
        for other in running.values():
            other.cancel(check=False)
        log = Path(job.paths.stderr)
        text = log.read_text(errors="replace") if log.is_file() else str(exc)
        raise StageFailed(spec.name, spec.elements[i], log, tail(text))


def _stop(jobs) -> None:
    """Stop local jobs at once: each job's submitit controller and every process under it (its tasks and
    their workers). Killing the tree, rather than SIGINT to the controller, leaves no process behind and
    no controller traceback in the terminal."""
    for job in jobs:
        process = getattr(job, "_process", None)
        if process is not None and process.poll() is None:
            _kill_tree(process.pid)
            process.wait()


def _kill_tree(pid: int) -> None:
    import os
    import signal

    try:
        os.kill(pid, signal.SIGSTOP)  # freeze it so it cannot start new children while we look
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (ProcessLookupError, FileNotFoundError):
        children = []
    for child in children:
        _kill_tree(int(child))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
