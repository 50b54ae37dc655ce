"""The Slurm executor: every pending stage is submitted at once as submitit jobs and job arrays chained
with `afterok`, so the pipeline runs without the CLI; `hpcft watch` follows it through markers and sacct.
Failed jobs requeue themselves while retries remain, jobs are checkpointable (preemption or the time limit
requeue them and training resumes), the data stage's datatrove ranks run as job arrays, and `hpcft sbatch`
writes the same jobs as standalone sbatch scripts."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import yaml

from data_tools.secrets import redact_text
from hpc.executor import StageFailed, StageJobs, SubmitError, SubmittingExecutor, tail
from hpc.jobs import run_stage
from hpc.plan import StageSpec, build_plan
from hpc.recipe import ExecutorConfig, Recipe, RecipeError, SlurmOptions, parse_recipe
from hpc.rundir import RunDir, make_private_dir, private_umask, write_private
from training.stages import KINDS as STAGE_KINDS

# Fabric settings users otherwise copy from wiki pages; applied as exports before every job.
ENV_PRESETS: dict[str, dict[str, str]] = {
    "none": {},
    "coreweave": {  # HGX nodes with 8 InfiniBand rails named ibp*, Ethernet control plane on eth0
        "NCCL_SOCKET_IFNAME": "eth0",
        "NCCL_IB_HCA": "ibp",
        "UCX_NET_DEVICES": ",".join(f"ibp{i}:1" for i in range(8)),
        "NCCL_COLLNET_ENABLE": "0",
        "SHARP_COLL_ENABLE_PCI_RELAXED_ORDERING": "1",
        "NCCL_IB_TIMEOUT": "22",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "NCCL_DEBUG": "WARN",
    },
    "infiniband": {  # generic IB cluster: use IB, keep sockets off loopback/docker bridges
        "NCCL_IB_DISABLE": "0",
        "NCCL_NET_GDR_LEVEL": "PHB",
        "NCCL_SOCKET_IFNAME": "^lo,docker",
        "NCCL_IB_TIMEOUT": "22",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "NCCL_DEBUG": "WARN",
    },
}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
# squeue states of a job that is over; any other (PENDING, RUNNING, REQUEUED, REQUEUE_HOLD, CONFIGURING,
# COMPLETING, SUSPENDED, ...) means Slurm still has it: after NODE_FAIL or PREEMPTED a --requeue job is queued
# again, and its sacct record of the failed attempt is not the job's end.
OVER_STATES = FAILED_STATES | {"COMPLETED", "OUT_OF_MEMORY", "SPECIAL_EXIT"}
TRAIN_KINDS = set(STAGE_KINDS)


@dataclass(frozen=True)
class JobOptions:
    """Everything one stage's job needs from the cluster, after merging recipe-wide and per-stage options."""

    nodes: int
    tasks_per_node: int
    cpus_per_task: int
    gpus_per_node: int
    mem_gb: int | None
    time_min: int
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    extra_sbatch: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    container_image: str | None = None
    container_mounts: tuple[str, ...] = ()
    max_retries: int = 1


def job_options(spec: StageSpec, cfg: ExecutorConfig, ranks: bool = False) -> JobOptions:
    """Options of a stage's job; for the data stage, `ranks=True` gives its datatrove rank arrays' and
    the default gives the small driver job that submits them and waits."""
    r = spec.resources
    opts = JobOptions(
        nodes=r.nodes,
        tasks_per_node=r.tasks_per_node,
        cpus_per_task=r.cpus_per_task,
        gpus_per_node=r.gpus_per_node,
        mem_gb=r.mem_gb,
        time_min=r.time_min,
    )
    world = r.nodes * r.tasks_per_node
    for layer in (cfg.slurm, cfg.stages.get(spec.kind), cfg.stages.get(spec.name)):
        if layer is None:
            continue
        for name in SlurmOptions.model_fields:
            v = getattr(layer, name)
            if v is None or v == []:
                continue
            if name == "env_preset":
                opts = replace(opts, env=ENV_PRESETS[v])
            elif name in ("extra_sbatch", "setup", "container_mounts"):
                opts = replace(opts, **{name: tuple(v)})
            else:
                opts = replace(opts, **{name: v})
    if spec.kind in TRAIN_KINDS and opts.nodes * opts.tasks_per_node != world:
        if world % opts.nodes == 0:  # nodes given, tasks per node follow from the layout
            opts = replace(opts, tasks_per_node=world // opts.nodes)
    if spec.kind not in TRAIN_KINDS:  # data, eval and gate jobs are single tasks (arrays for fan-out)
        opts = replace(opts, nodes=1, tasks_per_node=1)
    if spec.kind == "data" and not ranks:
        opts = replace(opts, cpus_per_task=1, gpus_per_node=0)
    if not opts.gpus_per_node:  # the fabric presets tune NCCL/UCX over GPUs; a CPU-only job gets none
        opts = replace(opts, env={})
    return opts


def check_options(recipe: Recipe, plan: list[StageSpec]) -> list[str]:
    """Problems with executor.* for this plan, as 'field: message' lines."""
    problems = []
    names = {s.name for s in plan} | {s.kind for s in plan}
    for key in recipe.executor.stages:
        if key not in names:
            problems.append(
                f"executor.stages.{key}: no stage or stage kind of that name; allowed: {', '.join(sorted(names))}"
            )
    for spec in plan:
        if spec.kind not in TRAIN_KINDS:
            continue
        o = job_options(spec, recipe.executor)
        world = recipe.parallel.world_size
        if o.nodes * o.tasks_per_node != world:
            problems.append(
                f"executor.stages.{spec.name}: nodes {o.nodes} x tasks_per_node {o.tasks_per_node}"
                f" = {o.nodes * o.tasks_per_node} processes, but the parallel layout needs {world}"
            )
        if o.gpus_per_node and o.gpus_per_node < o.tasks_per_node:
            problems.append(
                f"executor.stages.{spec.name}: gpus_per_node {o.gpus_per_node} < tasks_per_node "
                f"{o.tasks_per_node}: one GPU per rank"
            )
    return problems


def _sbatch_params(o: JobOptions, name: str, deps: list[str]) -> dict:
    extra: dict = {"requeue": True}
    for opt in o.extra_sbatch:
        key, _, value = opt.lstrip("-").partition("=")
        extra[key.replace("-", "_")] = value if value else True
    if o.account:
        extra["account"] = o.account
    params = dict(
        job_name=name,
        time=o.time_min,
        nodes=o.nodes,
        ntasks_per_node=o.tasks_per_node,
        cpus_per_task=o.cpus_per_task,
        mem=f"{o.mem_gb}G" if o.mem_gb else None,
        partition=o.partition,
        qos=o.qos,
        constraint=o.constraint,
        exclusive=o.exclusive or None,
        gpus_per_node=o.gpus_per_node or None,
        setup=[f"export {k}={shlex.quote(str(v))}" for k, v in o.env.items()] + list(o.setup),
        additional_parameters=extra,
    )
    if deps:
        params["dependency"] = "afterok:" + ":".join(deps)
        extra["kill_on_invalid_dep"] = "yes"
    # One dead task (OOM kill, segfault, a raised error) ends the whole step instead of leaving the others
    # blocked in a collective; the job's teardown (slurm_retry) then retries it.
    params["srun_args"] = ["--kill-on-bad-exit=1"] + _container_args(o)
    return {k: v for k, v in params.items() if v is not None}


def _container_args(o: JobOptions) -> list[str]:
    if not o.container_image:
        return []
    return [f"--container-image={o.container_image}"] + (
        [f"--container-mounts={','.join(o.container_mounts)}"] if o.container_mounts else []
    )


def teardown_lines(o: JobOptions, python: str | None, rd: RunDir, stage: str, elements: list[int] | None) -> list[str]:
    """The batch script's lines after its srun step: `python -m hpc.slurm after-step` with the step's exit
    code (hpc.slurm_retry: name the cause, record the attempt, requeue while retries remain). In a container
    job it runs in the image too, through a one-task step (scontrol must be reachable there, as submitit's
    own requeue on preemption already needs)."""
    command = [
        job_python(o, python),
        "-u",
        "-m",
        "hpc.slurm",
        "after-step",
        str(rd.root),
        stage,
        "--retries",
        str(o.max_retries),
    ]
    if elements is not None:
        command += ["--elements", ",".join(str(i) for i in elements)]
    prefix = ["srun", "--nodes=1", "--ntasks=1", *_container_args(o)] if o.container_image else []
    return ["HPCFT_RC=$?", " ".join(shlex.quote(w) for w in prefix + command) + ' --rc "$HPCFT_RC"']


def job_python(o: JobOptions, configured: str | None) -> str:
    """The interpreter a job runs: the recipe's `executor.python` when set; else `python` from the job's PATH
    when a container image or `setup:` lines choose the environment (the submitting host's venv path may not
    exist there, or be the wrong one); else this interpreter."""
    if configured:
        return configured
    if o.container_image or o.setup:
        return "python"
    return sys.executable


def make_executor(
    folder: Path,
    o: JobOptions,
    name: str,
    deps: list[str],
    python: str | None,
    array: int = 0,
    teardown: list[str] | None = None,
):
    """The submitit executor of one stage's job (an array of `array` elements when > 0). Both the submitit
    path and `hpcft sbatch` build their job scripts from it, so the two carry the same sbatch options
    (`--signal=USR2@90`, `--open-mode=append`, `--requeue`, logs, resources, setup, srun arguments, and the
    retrying teardown)."""
    import submitit

    ex = submitit.SlurmExecutor(folder=folder, python=shlex.quote(job_python(o, python)))
    ex.update_parameters(**_sbatch_params(o, name, deps))
    if teardown:
        ex.update_parameters(teardown=teardown)
    if array:
        ex.update_parameters(array_parallelism=array)
    return ex


def run_element(run_root: str, stage: str, index: int, max_retries: int = 0, run_id: str | None = None) -> dict:
    """A Slurm job's body: run the element (a data stage's datatrove ranks as job arrays). Failures are
    retried from outside this process, by the job's teardown (hpc.slurm_retry), so that a process killed by
    a signal is retried like one that raised. An element already done with the same inputs (a job requeued
    after it finished, or an exported submit.sh run over a run directory with finished stages) returns at
    once; so does a job of an earlier submission whose run directory now holds another run (`run_id`), which
    writes nothing. Rank 0 closes the stage's MLflow child run once the stage is done. `max_retries` is
    the teardown's; kept for the exported scripts' command line."""
    rd = RunDir(Path(run_root))
    current = rd.read_meta().get("run_id")
    if run_id and current != run_id:
        print(
            f"hpcft: this job belongs to run {run_id}, but {rd.root} now holds run {current}; nothing written",
            file=sys.stderr,
            flush=True,
        )
        return {"skipped": True}
    spec = {s.name: s for s in build_plan(rd.load_recipe())}[stage]
    if rd.element_done(spec, index):
        print(f"hpcft: {stage}[{index}] is up to date; nothing to run", file=sys.stderr, flush=True)
        return {"skipped": True}
    _note_attempt(rd, spec, index)
    try:
        result = run_stage(run_root, stage, index, datatrove=SlurmExecutor.datatrove_ranks)
    except Exception as err:
        message = str(err)
        if redact_text(message)[0] != message:  # e.g. a tracking URI with its password in an MLflow error
            err.args = (redact_text(message)[0],)
        raise
    if rd.stage_done(spec):
        close_child(rd, spec, ok=True)
    return result


def _note_attempt(rd: RunDir, spec: StageSpec, index: int) -> None:
    """A retried attempt says so (rank 0): a new attempt record in progress.jsonl with why the previous one
    ended, and the MLflow child run's `hpcft.attempt` tag (the job's attempt number)."""
    from hpc.progress import start_attempt
    from hpc.slurm_retry import attempts_file, read_attempts

    job = os.environ.get("SLURM_JOB_ID", "")
    before = read_attempts(attempts_file(rd.stage_dir(spec.name) / "attempts", index), job)
    if not before or os.environ.get("SLURM_PROCID", "0") != "0":
        return
    after = before[-1].get("reason", "")
    start_attempt(rd.progress_path(spec.name), spec.name, spec.input_hash, after=after, job_attempt=len(before) + 1)
    print(f"hpcft: attempt {len(before) + 1} of job {job} (after: {after})", file=sys.stderr, flush=True)
    try:
        from hpc.tracking import Tracker

        meta = rd.read_meta()
        child = meta.get("child_runs", {}).get(spec.name)
        if child:
            Tracker(meta["tracking_uri"]).set_tags(child, {"hpcft.attempt": len(before) + 1})
    except Exception as err:  # noqa: BLE001 - tracking trouble must not cost the attempt
        print(f"hpcft: could not tag the MLflow run of {spec.name}: {err}", file=sys.stderr, flush=True)


def after_step(run_root: str, stage: str, rc: int, max_retries: int, elements: list[int] | None) -> int:
    """The job's teardown (see hpc.slurm_retry): retry the job while retries remain; when none is left, close
    the stage's MLflow child run as failed."""
    from hpc.slurm_retry import after_step as decide

    rd = RunDir(Path(run_root))

    def final(reason: str) -> None:
        spec = {s.name: s for s in build_plan(rd.load_recipe())}[stage]
        close_child(rd, spec, ok=False)

    return decide(rc, rd.stage_dir(stage) / "attempts", max_retries, elements, on_final_failure=final)


def close_child(rd: RunDir, spec: StageSpec, ok: bool) -> None:
    """Mark the stage's MLflow child run finished (or failed) from inside the job, so that a run nobody
    watches (--detach, an exported submit.sh) leaves no child run Running. Rank 0 only; never fails the job."""
    if os.environ.get("SLURM_PROCID", "0") != "0":
        return
    try:
        from hpc.tracking import Tracker, queue_path

        meta = rd.read_meta()
        child = meta.get("child_runs", {}).get(spec.name)
        if child:  # MLflow away: queued for the next `hpcft run`/`watch` (end_run never raises)
            Tracker(meta["tracking_uri"], queue=queue_path(rd.root)).end_run(child, "FINISHED" if ok else "FAILED")
    except Exception as err:  # noqa: BLE001 - tracking trouble must not turn a finished stage into a failure
        print(f"hpcft: could not close the MLflow run of {spec.name}: {err}", file=sys.stderr, flush=True)


class StageJob:
    """What every submitted Slurm job runs: one stage element (run_element). Checkpointable for submitit:
    when the job is preempted or nears its time limit (submitit's USR2, `--signal=USR2@90`), it is requeued
    as it is, and a training stage then resumes from its latest periodic checkpoint (training.resume)
    instead of starting over. Timeouts requeue up to submitit's max_num_timeout times (3)."""

    def __call__(self, run_root: str, stage: str, index: int, max_retries: int = 0, run_id: str | None = None) -> dict:
        return run_element(run_root, stage, index, max_retries, run_id)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


class SlurmExecutor(SubmittingExecutor):
    name = "slurm"
    jobs_key = "slurm_jobs"
    script_command = "sbatch"
    script_help = "write standalone sbatch scripts (one per stage + submit.sh) instead of submitting"

    def check(self, recipe: Recipe, plan: list[StageSpec]) -> list[str]:
        return check_options(recipe, plan)

    def submit(
        self, recipe: Recipe, plan: list[StageSpec], rd: RunDir, start_child: Callable[[str], str], only: str | None
    ) -> dict[str, dict]:
        alive = in_flight(rd.read_meta().get(self.jobs_key, {}))
        if alive:
            raise RecipeError(
                [
                    f"workdir: {rd.root} has jobs of an earlier submission still queued or running "
                    f"({', '.join(f'{stage} {job}' for stage, job in alive.items())}); follow them with "
                    f"`hpcft watch {rd.root}`, or stop them with `hpcft cancel {rd.root}`, before submitting again"
                ]
            )
        submitted: dict[str, dict] = {}
        for spec in plan:
            if only and spec.name != only:
                continue
            if only:
                rd.clear_markers(spec)
            pending = [i for i in range(len(spec.elements)) if not rd.element_done(spec, i)]
            if not pending:
                continue
            deps = [submitted[d]["job_id"] for d in spec.depends_on if d in submitted]
            o = job_options(spec, recipe.executor)
            folder = rd.stage_dir(spec.name) / "logs"
            from hpc.progress import start_attempt

            start_attempt(
                rd.progress_path(spec.name), spec.name, spec.input_hash
            )  # appended: the earlier attempts are kept
            start_child(spec.name)
            teardown = teardown_lines(o, recipe.executor.python, rd, spec.name, pending)
            ex = make_executor(
                folder, o, f"hpcft-{recipe.name}-{spec.name}", deps, recipe.executor.python, teardown=teardown
            )
            run_id = rd.read_meta().get("run_id")
            try:
                if spec.is_array:
                    ex.update_parameters(array_parallelism=max(1, len(pending)))
                    n = len(pending)
                    jobs = ex.map_array(
                        StageJob(), [str(rd.root)] * n, [spec.name] * n, pending, [o.max_retries] * n, [run_id] * n
                    )
                else:
                    jobs = [ex.submit(StageJob(), str(rd.root), spec.name, pending[0], o.max_retries, run_id)]
            except Exception as err:  # noqa: BLE001 - sbatch's refusal, reported with what was asked
                self.cancel(submitted)
                raise SubmitError(spec.name, str(err).strip().splitlines()[-1], _asked(spec.name, o)) from None
            job_id = jobs[0].job_id.split("_")[0]
            submitted[spec.name] = {
                "job_id": job_id,
                "job_ids": [j.job_id for j in jobs],
                "elements": pending,
                "folder": str(folder),
            }
        rd.update_meta(**{self.jobs_key: submitted})  # the latest submission is what `watch` follows
        return submitted

    def states(self, jobs: dict[str, dict]) -> dict[str, StageJobs]:
        ids = [j["job_id"] for j in jobs.values()]
        states = sacct_states(ids)
        queued = squeue_states(ids)
        for jid, state in queued.items():  # Slurm's live view wins: a requeued job's last record is not its end
            if jid in states and states[jid]["state"] != state:
                states[jid] = states[jid] | {"state": state, "requeued": states[jid]["state"]}
            elif jid not in states:
                states[jid] = {"state": state, "exit": "", "elapsed": "", "nodes": ""}
        out = {}
        for stage, job in jobs.items():
            mine = {k: v for k, v in states.items() if k == job["job_id"] or k.startswith(job["job_id"] + "_")}
            counts: dict[str, int] = {}
            for v in mine.values():
                counts[v["state"]] = counts.get(v["state"], 0) + 1
            nodes = sorted({v["nodes"] for v in mine.values() if v["nodes"] not in ("", "None assigned")})
            summary = (
                f"{job['job_id']}: "
                + " ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                + (f" on {','.join(nodes)}" if nodes else "")
            )
            out[stage] = StageJobs(summary, any(v["state"] == "RUNNING" for v in mine.values()), mine)
        return out

    def failure(self, stage: str, job: dict, st: StageJobs) -> StageFailed | None:
        failed = [(k, v) for k, v in st.jobs.items() if v["state"] in FAILED_STATES and not v.get("requeued")]
        own = [(k, v) for k, v in failed if not _cancelled_by_dependency(k, v)]
        if not own:
            return None
        jid, state = own[0]
        log = job_log(job["folder"], jid)
        text = log.read_text(errors="replace") if log.is_file() else f"no log at {log}"
        return StageFailed(stage, f"job {jid} {state['state']} exit {state['exit']}", log, tail(text, 20))

    def cancel(self, jobs: dict[str, dict]) -> list[str]:
        ids = [j["job_id"] for j in jobs.values()]
        if ids:
            subprocess.run(["scancel", *ids], check=False)
        return ids

    def find_log(self, rd: RunDir, stage: str, element: int, rank: int, stdout: bool) -> Path | None:
        job = rd.read_meta().get(self.jobs_key, {}).get(stage)
        if job is None:  # the stage ran elsewhere (an earlier local run of this run directory)
            return super().find_log(rd, stage, element, rank, stdout)
        return job_log(job["folder"], job["job_ids"][min(element, len(job["job_ids"]) - 1)], rank, err=not stdout)

    @staticmethod
    def datatrove_ranks(recipe: Recipe, spec: StageSpec, out_dir: Path) -> Callable | None:
        """Each datatrove step of the data stage runs as a job array, one element per rank."""
        if "SLURM_JOB_ID" not in os.environ:  # run-element by hand outside a job: a local process pool
            return None
        from hpc.datatrove_slurm import SubmititPipelineExecutor

        ranks = job_options(spec, recipe.executor, ranks=True)
        retries = ranks.max_retries  # the executor resubmits failed ranks; each rank job itself never requeues
        opts = replace(ranks, max_retries=0)
        folder = out_dir / "logs" / "ranks"
        name = f"hpcft-{recipe.name}-data-ranks"

        def factory(pipeline, logging_dir, tasks, depends=None):
            return SubmititPipelineExecutor(
                pipeline,
                logging_dir,
                tasks,
                max_retries=retries,
                depends=depends,
                make_executor=lambda: make_executor(folder, opts, name, [], recipe.executor.python),
            )

        return factory

    def write_scripts(
        self, recipe: Recipe, recipe_path: Path, plan: list[StageSpec], rd: RunDir, out: Path
    ) -> list[Path]:
        return write_sbatch(recipe, recipe_path, plan, rd, out, self.cfg.python)


def _asked(stage: str, o: JobOptions) -> str:
    return (
        f"asked for {o.nodes} node(s) x {o.tasks_per_node} task(s), {o.cpus_per_task} cpu/task, "
        f"{o.gpus_per_node} gpu/node, mem {o.mem_gb or 'default'} GB, partition "
        f"{o.partition or 'default'}; adjust executor.slurm or executor.stages.{stage}; "
        "nothing of this run is left queued"
    )


def sacct_states(job_ids: list[str]) -> dict[str, dict]:
    """{job id (array elements as 123_4): {state, exit, elapsed, nodes}} from sacct, newest attempt."""
    if not job_ids:
        return {}
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-D", "-j", ",".join(job_ids), "--format=JobID,State,ExitCode,Elapsed,NodeList"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    states: dict[str, dict] = {}
    for line in out.stdout.splitlines():
        parts = line.split("|")
        if len(parts) < 5:
            continue
        jid, state, code, elapsed, nodes = parts[:5]
        states[jid] = {"state": state.split()[0], "exit": code, "elapsed": elapsed, "nodes": nodes}
    return states


def squeue_states(job_ids: list[str]) -> dict[str, str]:
    """{job id (array elements as 123_4): state} of the jobs Slurm still holds (queued, running, requeued,
    completing); a job that is over is absent (or shown in an OVER_STATES state for a while)."""
    if not job_ids:
        return {}
    out = subprocess.run(
        ["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i|%T"], capture_output=True, text=True, timeout=60
    )
    states = {}
    for line in out.stdout.splitlines():
        jid, _, state = line.strip().partition("|")
        if state and state not in OVER_STATES:
            states[jid] = state
    return states


def in_flight(jobs: dict[str, dict]) -> dict[str, str]:
    """{stage: job id} of a recorded submission's jobs that Slurm still holds."""
    if not jobs:
        return {}
    try:
        queued = squeue_states([j["job_id"] for j in jobs.values()])
    except (OSError, subprocess.SubprocessError):  # no Slurm client here: nothing can be in flight from here
        return {}
    return {
        stage: j["job_id"]
        for stage, j in jobs.items()
        if any(k == j["job_id"] or k.startswith(j["job_id"] + "_") for k in queued)
    }


def _cancelled_by_dependency(job_id: str, st: dict) -> bool:
    if st["state"] != "CANCELLED":
        return False
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", job_id, "--format=Reason"], capture_output=True, text=True, timeout=30
    ).stdout
    return "Dependency" in out or "DependencyNeverSatisfied" in out


def job_log(folder: str, job_id: str, rank: int = 0, err: bool = True) -> Path:
    return Path(folder) / f"{job_id}_{rank}_log.{'err' if err else 'out'}"


def sbatch_script(spec: StageSpec, o: JobOptions, rd: RunDir, job_name: str, python: str | None) -> str:
    """A standalone sbatch script for one stage: the very script the submitit path submits for it (same
    executor, same sbatch options, logs and setup) with `python -m hpc.slurm run-element` as its command."""
    logs = rd.stage_dir(spec.name) / "logs"
    n = len(spec.elements) if spec.is_array else 0
    ex = make_executor(logs, o, job_name, [], python, array=n, teardown=teardown_lines(o, python, rd, spec.name, None))
    if n:
        ex.parameters["map_count"] = n  # what submitit sets for an array: --array=0-<n-1>%<n>, %A_%a logs
    command = " ".join(
        [
            shlex.quote(job_python(o, python)),
            "-u -m hpc.slurm run-element",
            shlex.quote(str(rd.root)),
            shlex.quote(spec.name),
            '"${SLURM_ARRAY_TASK_ID:-0}"',
            f"--retries {o.max_retries}",
        ]
    )
    text = ex._make_submission_file_text(command, "")
    first, _, rest = text.partition("\n")
    note = f"# hpcft: stage {spec.name}; the same job `hpcft run --executor slurm` submits; run by submit.sh"
    return f"{first}\n{note}\n{rest}"


SNAPSHOT = "recipe.yaml"  # the resolved recipe the scripts were written for, next to them


def _shell_name(stage: str) -> str:
    return re.sub(r"\W", "_", stage) + "_job"


def write_sbatch(
    recipe: Recipe, recipe_path: Path, plan: list[StageSpec], rd: RunDir, out: Path, python: str | None
) -> list[Path]:
    """Scripts for every stage plus submit.sh chaining them with afterok; returns the paths written.

    Only `out` is written: the run directory, run.json and MLflow are untouched until submit.sh runs. Its
    first step does what `hpcft run --executor slurm` does before submitting (snapshot the recipe, open the
    MLflow parent and child runs, create the log folders Slurm will not create), then it submits every stage
    and records the job ids in run.json, so `hpcft watch|status|logs|cancel RUN_DIR` follow the run."""
    out = Path(out).resolve()
    if out == rd.root or (out / "run.json").exists():
        raise RecipeError([f"--out: {out} is a run directory; give a separate folder for the scripts"])
    make_private_dir(out)
    write_private(out / SNAPSHOT, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    host_python = shlex.quote(sys.executable)
    root = shlex.quote(str(rd.root))
    submit = [
        "#!/bin/bash",
        f"# Submit the pipeline of recipe {recipe.name} into the run directory {rd.root}, as",
        "# `hpcft run --executor slurm --detach` would. Nothing was written outside this folder before this",
        "# script runs; its first step snapshots the recipe into the run directory and opens the MLflow runs.",
        "# Stages already up to date there finish at once. Follow with: hpcft watch RUN_DIR",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'umask "${HPCFT_UMASK:-077}"  # the jobs inherit it: their logs are private as well',
        f'HPCFT_PYTHON="${{HPCFT_PYTHON:-{host_python}}}"',
        f"RUN_DIR={root}",
        'JOBS=""',
        'trap \'if [ -n "$JOBS" ]; then scancel $JOBS; echo "submission failed; cancelled$JOBS" >&2; fi\' ERR',
        f'"$HPCFT_PYTHON" -m hpc.slurm prepare "$RUN_DIR" {SNAPSHOT} --recipe-path '
        f"{shlex.quote(str(Path(recipe_path).resolve()))}",
    ]
    written = []
    for spec in plan:
        o = job_options(spec, recipe.executor)
        path = out / f"{spec.name}.sbatch"
        write_private(path, sbatch_script(spec, o, rd, f"hpcft-{recipe.name}-{spec.name}", python))
        written.append(path)
        var = _shell_name(spec.name)
        deps = [f"${{{_shell_name(d)}}}" for d in spec.depends_on]
        dep = f" --dependency=afterok:{':'.join(deps)} --kill-on-invalid-dep=yes" if deps else ""
        submit.append(f"{var}=$(sbatch --parsable{dep} {shlex.quote(path.name)})")
        submit.append(f'{var}="${{{var}%%;*}}"; JOBS="$JOBS ${{{var}}}"')
        submit.append(f'echo "{spec.name}: job ${{{var}}}"')
    record = " ".join(f'{shlex.quote(spec.name)}="${{{_shell_name(spec.name)}}}"' for spec in plan)
    submit.append(f'"$HPCFT_PYTHON" -m hpc.slurm record "$RUN_DIR" {record}')
    submit.append('echo "follow with: hpcft watch $RUN_DIR"')
    script = out / "submit.sh"
    write_private(script, "\n".join(submit) + "\n", mode=0o700)
    return written + [script]


def prepare_submission(run_dir: Path, snapshot: Path, recipe_path: Path) -> list[str]:
    """submit.sh's first step: what `hpcft run --executor slurm` does before it submits. Snapshot the recipe
    into the run directory, open the MLflow parent run and a child run per stage to run, create every stage's
    log folder; returns the stages to run."""
    from hpc.pipeline import _start_child, prepare_run
    from hpc.tracking import Tracker

    recipe = parse_recipe(yaml.safe_load(Path(snapshot).read_text()), base_dir=Path(recipe_path).resolve().parent)
    rd = RunDir(run_dir)
    meta = prepare_run(recipe, Path(recipe_path), rd)
    tracker = Tracker(meta["tracking_uri"])
    pending = []
    for spec in build_plan(recipe):
        (rd.stage_dir(spec.name) / "logs").mkdir(parents=True, exist_ok=True)  # Slurm will not create it
        if rd.stage_done(spec):
            continue
        from hpc.progress import start_attempt

        start_attempt(
            rd.progress_path(spec.name), spec.name, spec.input_hash
        )  # appended: the earlier attempts are kept
        _start_child(rd, tracker, spec.name, spec.config)
        pending.append(spec.name)
    print(f"run directory {rd.root}: to run: {', '.join(pending) or 'nothing (all up to date)'}")
    return pending


def record_submission(run_dir: Path, jobs: dict[str, str]) -> dict:
    """submit.sh's last step: the job ids into run.json, as the submitit path records them."""
    rd = RunDir(run_dir)
    plan = {s.name: s for s in build_plan(rd.load_recipe())}
    submitted = {}
    for stage, job_id in jobs.items():
        n = len(plan[stage].elements)
        submitted[stage] = {
            "job_id": job_id,
            "job_ids": [f"{job_id}_{i}" for i in range(n)] if plan[stage].is_array else [job_id],
            "elements": list(range(n)),
            "folder": str(rd.stage_dir(stage) / "logs"),
        }
    rd.update_meta(**{SlurmExecutor.jobs_key: submitted})
    return submitted


def main(argv: list[str] | None = None) -> int:
    """The steps of exported scripts: `python -m hpc.slurm run-element RUN_DIR STAGE INDEX --retries N` (a
    job's body), `after-step RUN_DIR STAGE --rc RC --retries N [--elements I,J]` (its teardown), `prepare
    RUN_DIR SNAPSHOT --recipe-path P` and `record RUN_DIR STAGE=JOB...` (submit.sh)."""
    import argparse

    private_umask()
    p = argparse.ArgumentParser(prog="python -m hpc.slurm")
    sub = p.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run-element")
    run.add_argument("run_dir")
    run.add_argument("stage")
    run.add_argument("index", type=int)
    run.add_argument("--retries", type=int, default=1)
    prep = sub.add_parser("prepare")
    prep.add_argument("run_dir", type=Path)
    prep.add_argument("snapshot", type=Path)
    prep.add_argument("--recipe-path", type=Path, required=True)
    after = sub.add_parser("after-step")
    after.add_argument("run_dir")
    after.add_argument("stage")
    after.add_argument("--rc", type=int, required=True)
    after.add_argument("--retries", type=int, default=1)
    after.add_argument("--elements", default=None, help="element index of each array task, comma-separated")
    rec = sub.add_parser("record")
    rec.add_argument("run_dir", type=Path)
    rec.add_argument("jobs", nargs="+", metavar="STAGE=JOB_ID")
    args = p.parse_args(argv)
    if args.action == "run-element":
        run_element(args.run_dir, args.stage, args.index, args.retries)
    elif args.action == "after-step":
        elements = [int(i) for i in args.elements.split(",")] if args.elements else None
        return after_step(args.run_dir, args.stage, args.rc, args.retries, elements)
    elif args.action == "prepare":
        prepare_submission(args.run_dir, args.snapshot, args.recipe_path)
    else:
        record_submission(args.run_dir, dict(j.split("=", 1) for j in args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
