"""What an executor is. Executors are the only code that knows where a job runs; the pipeline and the CLI
talk to this interface, and `hpc/executors.py` names the implementations (adding one: see there).

Every job, wherever it lands, runs `hpc.jobs.run_stage(run_root, stage, index)` for one element of one
stage. Two flavours:
- BlockingExecutor: `run` runs a stage's pending elements and returns once they are done, or raises
  StageFailed; the CLI walks the plan stage by stage (inline: this process; local: subprocesses).
- SubmittingExecutor: `submit` hands every pending stage to a scheduler at once, each after the stages it
  depends on, and returns; the CLI (or `hpcft watch` later, the CLI may detach) follows the run through
  `states` and `failure`, `hpcft cancel` calls `cancel`, `hpcft logs` calls `find_log` (slurm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

if TYPE_CHECKING:
    from hpc.plan import StageSpec
    from hpc.recipe import ExecutorConfig, Recipe
    from hpc.rundir import RunDir


class StageFailed(Exception):
    def __init__(self, stage: str, element: str, log_path: Path | None, tail: str):
        super().__init__(f"stage {stage} [{element}] failed")
        self.stage, self.element, self.log_path, self.tail = stage, element, log_path, tail


class SubmitError(Exception):
    """The scheduler refused a stage; `detail` says what was asked and what to adjust. Nothing of the run is
    left queued."""

    def __init__(self, stage: str, message: str, detail: str):
        super().__init__(f"stage {stage} could not be submitted: {message}")
        self.stage, self.message, self.detail = stage, message, detail


@dataclass
class StageJobs:
    """One look at a submitted stage's jobs."""

    summary: str  # one line for the progress table: job ids, states, nodes
    running: bool  # some element has started
    jobs: dict = field(default_factory=dict)  # the scheduler's own view, handed back to `failure`


def tail(text: str, lines: int = 15) -> str:
    """What a failure report shows of a job's log: the job's own one-line verdict when it wrote one (a line
    starting `hpcft: error: `, e.g. a full disk named with its path), else the log's last lines."""
    from hpc.errors import ERROR_PREFIX

    all_lines = text.rstrip().splitlines()
    verdicts = [line for line in all_lines[-80:] if line.startswith(ERROR_PREFIX)]  # this attempt's, not older
    if verdicts:
        return verdicts[-1]
    return "\n".join(all_lines[-lines:])


class Executor:
    """The part every executor has. `name` is the recipe's `executor.kind`."""

    name: ClassVar[str]
    submits: ClassVar[bool] = False
    script_command: ClassVar[str | None] = None  # an `hpcft` subcommand writing standalone job scripts
    script_help: ClassVar[str] = ""

    def __init__(self, cfg: ExecutorConfig | None = None):
        self.cfg = cfg  # None: a submitted run looked at through run.json only (states, cancel, logs)

    def check(self, recipe: Recipe, plan: list[StageSpec]) -> list[str]:
        """Problems with the recipe's executor options for this plan, as 'field: message' lines."""
        return []

    @staticmethod
    def datatrove_ranks(recipe: Recipe, spec: StageSpec, out_dir: Path) -> Callable | None:
        """Inside a job: the datatrove executor factory `(pipeline, logging_dir, tasks, depends=None)` that
        runs the data stage's ranks where this executor runs jobs; None: a process pool in the data job.
        A job body hands it to `run_stage(..., datatrove=...)`."""
        return None

    def find_log(self, rd: RunDir, stage: str, element: int, rank: int, stdout: bool) -> Path | None:
        """A stage job's log (it may not exist yet); None: no logs for the stage. Here: the logs of the local
        job that ran `element` (logs/elements.json), else the newest that submitit's local jobs left in the
        stage's logs/<job>/ folders."""
        import json

        folder = rd.stage_dir(stage) / "logs"
        jobs = json.loads((folder / "elements.json").read_text()) if (folder / "elements.json").is_file() else {}
        if jobs:  # a run from before elements.json falls back to the newest logs
            job = jobs.get(str(element))
            return folder / job / f"{job}_{rank}_log.{'out' if stdout else 'err'}" if job else None
        logs = sorted(
            (rd.stage_dir(stage) / "logs").glob(f"*/*_{rank}_log.{'out' if stdout else 'err'}"),
            key=lambda p: p.stat().st_mtime,
        )
        return logs[min(element, len(logs) - 1)] if logs else None

    def write_scripts(
        self, recipe: Recipe, recipe_path: Path, plan: list[StageSpec], rd: RunDir, out: Path
    ) -> list[Path]:
        """Standalone job scripts for every stage (`script_command`) into `out`; the last path written submits
        them. Writing them changes nothing else (no run directory files, no MLflow runs): the submitting script
        prepares the run directory `rd` when it runs."""
        raise NotImplementedError(f"the {self.name} executor writes no job scripts")


class BlockingExecutor(Executor):
    def run(self, spec: StageSpec, rd: RunDir, pending: list[int], poll: Callable[[], None]) -> None:
        """Run the pending elements of one stage; call `poll` now and then (it redraws the progress table);
        raise StageFailed for the first element that fails. Ctrl-C (KeyboardInterrupt) leaves no job behind."""
        raise NotImplementedError


class SubmittingExecutor(Executor):
    submits = True
    jobs_key: ClassVar[str]  # run.json key holding the latest submission, {stage: record}

    def submit(
        self, recipe: Recipe, plan: list[StageSpec], rd: RunDir, start_child: Callable[[str], str], only: str | None
    ) -> dict[str, dict]:
        """Submit every stage not up to date (only `only`, its markers cleared, when given), each after the
        jobs of the stages it depends on; call start_child(stage) before submitting a stage. Returns
        {stage: {"job_id", "job_ids", ...}} and records it in run.json under `jobs_key`; raises SubmitError
        after cancelling what it had submitted."""
        raise NotImplementedError

    def states(self, jobs: dict[str, dict]) -> dict[str, StageJobs]:
        """One look at every submitted stage's jobs (the records `submit` returned)."""
        raise NotImplementedError

    def failure(self, stage: str, job: dict, st: StageJobs) -> StageFailed | None:
        """The stage's own failure (not a cancellation because a stage before it failed), with its log."""
        raise NotImplementedError

    def cancel(self, jobs: dict[str, dict]) -> list[str]:
        """Cancel the submitted jobs; returns their ids."""
        raise NotImplementedError
