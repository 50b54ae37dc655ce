"""The executors by name (the recipe's `executor.kind`, `hpcft run --executor`). The pipeline and the CLI
find executors here and talk to them only through the interface in `hpc/executor.py`.

Adding an executor (Kubernetes, Ray, ...) touches one new module plus the EXECUTORS line below:
- a BlockingExecutor runs the CLI's stages one at a time and implements `run(spec, rd, pending, poll)`
  (raise StageFailed for a failed element; on KeyboardInterrupt stop what it started);
- a SubmittingExecutor hands the whole pipeline to a scheduler and implements `submit(recipe, plan, rd,
  start_child, only)` (raise SubmitError), `states(jobs)`, `failure(stage, job, st)`, `cancel(jobs)`, and
  sets `jobs_key` (its run.json key); it may override `find_log(rd, stage, element, rank, stdout)`.
Either may implement `check(recipe, plan)` (option problems, exit 2), `datatrove_ranks(recipe, spec,
out_dir)` (where the data stage's datatrove ranks run; its job body passes it to `jobs.run_stage`), and
`write_scripts` with `script_command` (an `hpcft` subcommand writing standalone job scripts, e.g. sbatch).
Every job runs `hpc.jobs.run_stage(run_root, stage, index)`. (The recipe's `executor.kind` choices and the
executor's own option section, like `executor.slurm`, are in hpc/recipe.py.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpc.executor import Executor, SubmittingExecutor
from hpc.local import InlineExecutor, LocalExecutor
from hpc.slurm import SlurmExecutor

if TYPE_CHECKING:
    from hpc.recipe import ExecutorConfig

EXECUTORS: dict[str, type[Executor]] = {cls.name: cls for cls in (LocalExecutor, InlineExecutor, SlurmExecutor)}


def get(cfg: ExecutorConfig) -> Executor:
    """The executor the recipe's `executor` section names."""
    return EXECUTORS[cfg.kind](cfg)


def submitting() -> list[str]:
    """Names of the executors that run a pipeline without the CLI (--detach)."""
    return [name for name, cls in EXECUTORS.items() if cls.submits]


def script_writers() -> dict[str, type[Executor]]:
    """{hpcft subcommand: executor} for the executors that write standalone job scripts."""
    return {cls.script_command: cls for cls in EXECUTORS.values() if cls.script_command}


def submitted_by(meta: dict, cfg: ExecutorConfig | None = None) -> tuple[SubmittingExecutor, dict[str, dict]] | None:
    """The executor whose jobs a run directory's run.json records (its latest submission), with them.
    Following, cancelling and finding logs need only run.json; `cfg` is the recipe's executor section."""
    for cls in EXECUTORS.values():
        if issubclass(cls, SubmittingExecutor) and meta.get(cls.jobs_key):
            return cls(cfg), meta[cls.jobs_key]
    return None
