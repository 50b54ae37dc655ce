"""A datatrove PipelineExecutor whose ranks run as a submitit job array, so that datatrove's own
completion markers, per-rank logs and stats work unchanged on Slurm (datatrove's SlurmPipelineExecutor
writes sbatch scripts itself and cannot be chained with hpcft's submitit jobs)."""

from __future__ import annotations

import json
from typing import Callable

from datatrove.executor.base import DistributedEnvVars, PipelineExecutor
from datatrove.utils.stats import PipelineStats


class SubmititPipelineExecutor(PipelineExecutor):
    def __init__(
        self,
        pipeline: list,
        logging_dir: str,
        tasks: int,
        *,
        make_executor: Callable,
        max_retries: int = 1,
        depends=None,
    ):
        super().__init__(pipeline, logging_dir, skip_completed=True)
        self.tasks = tasks
        self.make_executor = make_executor  # () -> submitit executor configured for this array
        self.max_retries = max_retries
        self.depends = depends  # run_chain calls run() in order and each run() blocks: nothing to wait for
        self.job_ids: list[str] = []

    @property
    def world_size(self) -> int:
        return self.tasks

    def get_distributed_env(self, node_rank: int = -1) -> DistributedEnvVars:
        return DistributedEnvVars(
            datatrove_node_ips="localhost",
            datatrove_cpus_per_task="-1",
            datatrove_mem_per_cpu="-1",
            datatrove_gpus_on_node="-1",
            datatrove_executor="SLURM",
        )

    def run_rank(self, rank: int) -> None:
        self._run_for_rank(rank)

    def run(self) -> PipelineStats:
        ranks = self.get_incomplete_ranks()
        for _attempt in range(self.max_retries + 1):
            if not ranks:
                break
            ex = self.make_executor()
            ex.update_parameters(array_parallelism=len(ranks))
            jobs = ex.map_array(self.run_rank, ranks)
            self.job_ids += [j.job_id for j in jobs]
            for job in jobs:
                job.exception()  # waits; failures are judged by datatrove's completion markers below
            ranks = self.get_incomplete_ranks()
        if ranks:
            raise RuntimeError(
                f"datatrove ranks {ranks} of {self.logging_dir.path} failed after "
                f"{self.max_retries} retries; see {self.logging_dir.path}/logs and jobs "
                f"{', '.join(self.job_ids)}"
            )
        stats = PipelineStats()
        for name in self.logging_dir.list_files("stats"):
            with self.logging_dir.open(name) as f:
                stats += PipelineStats.from_json(json.load(f))
        with self.logging_dir.open("stats.json", "wt") as f:
            stats.save_to_disk(f)
        return stats
