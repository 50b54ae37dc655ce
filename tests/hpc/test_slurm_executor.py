"""The Slurm executor against the real local cluster (slurm/dev-cluster up)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest

from hpc.plan import build_plan
from hpc.recipe import RecipeError, SlurmOptions, load_recipe
from hpc.slurm import check_options, job_options
from tests.conftest import ROOT, TINY_RECIPE
from tests.slurm.conftest import slurm_cluster  # noqa: F401 - the fixture

cloudpickle.register_pickle_by_value(sys.modules[__name__])
FAST = ["--set", "stages.0.max_steps=20", "--set", "eval.limit=20"]


def run_cli(*args, timeout=900):
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "hpc.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env
    )


def sacct(job_ids, settle_s=60):
    """States by job id, once none is still PENDING/RUNNING (a job ends a moment after its marker)."""
    import time

    deadline = time.time() + settle_s
    while True:
        states = _sacct(job_ids)
        if time.time() > deadline or not any(s[0] in ("PENDING", "RUNNING", "COMPLETING") for s in states.values()):
            return states
        time.sleep(1)


def _sacct(job_ids):
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "--format=JobID,State,Reason"],
        capture_output=True,
        text=True,
    ).stdout
    return {line.split("|")[0]: line.split("|")[1:] for line in out.splitlines() if line}


def _never_started(job_id: str) -> bool:
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", job_id, "--format=Start"], capture_output=True, text=True
    ).stdout.split()
    return bool(out) and out[0] in ("None", "Unknown")


def test_options_merge_recipe_and_stage_overrides():
    r = load_recipe(
        TINY_RECIPE,
        [
            "executor.slurm={partition: gpu, account: lab, env_preset: coreweave}",
            "executor.stages={sft: {nodes: 2, gpus_per_node: 8, time_min: 600}, eval: {partition: cpu}}",
            "parallel.dp_shard=16",
            "parallel.zero=3",
        ],
    )
    plan = {s.name: s for s in build_plan(r)}
    sft = job_options(plan["sft"], r.executor)
    assert (sft.nodes, sft.tasks_per_node, sft.gpus_per_node, sft.partition, sft.account) == (2, 8, 8, "gpu", "lab")
    assert sft.env["NCCL_IB_HCA"] == "ibp"
    assert job_options(plan["eval"], r.executor).partition == "cpu"
    assert check_options(r, list(plan.values())) == []
    # an unknown executor.stages key is a recipe error at `hpcft validate` already (issue 15) ...
    with pytest.raises(RecipeError, match="executor.stages.trian: no stage or stage kind of that name"):
        load_recipe(TINY_RECIPE, ["executor.stages={trian: {nodes: 1}}"])
    bad = load_recipe(TINY_RECIPE, ["executor.stages={sft: {nodes: 3}}", "parallel.dp_shard=4"])
    # ... and still one for the executor's own check, for a recipe that never went through validation
    stages = {**bad.executor.stages, "trian": SlurmOptions(nodes=1)}
    bad = bad.model_copy(update={"executor": bad.executor.model_copy(update={"stages": stages})})
    problems = check_options(bad, build_plan(bad))
    assert any(p.startswith("executor.stages.trian:") for p in problems)
    assert any(p.startswith("executor.stages.sft:") and "needs 4" in p for p in problems)


def test_registry_names_the_recipe_executor_kinds():
    from typing import get_args

    from hpc import executors
    from hpc.recipe import ExecutorConfig

    assert set(executors.EXECUTORS) == set(get_args(ExecutorConfig.model_fields["kind"].annotation))
    assert executors.submitting() == ["slurm"] and list(executors.script_writers()) == ["sbatch"]


def test_sbatch_export_writes_chained_scripts(tmp_path):
    p = run_cli(
        "sbatch",
        str(TINY_RECIPE),
        "--out",
        str(tmp_path / "sb"),
        "--workdir",
        str(tmp_path / "w"),
        "--set",
        "executor.slurm={partition: debug, extra_sbatch: ['--reservation=r1'], setup: ['module load cuda/12']}",
    )
    assert p.returncode == 0, p.stderr
    submit = (tmp_path / "sb/submit.sh").read_text()
    assert "eval_job=$(sbatch --parsable --dependency=afterok:${model_job}:${data_job}:${export_job}" in submit
    ev = (tmp_path / "sb/eval.sbatch").read_text()
    assert "#SBATCH --array=0-3" in ev and "#SBATCH --reservation=r1" in ev and "module load cuda/12" in ev
    assert "-m hpc.slurm run-element" in ev and "#SBATCH --partition=debug" in ev


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def test_sbatch_export_changes_no_state(tmp_path):
    """Writing scripts leaves a finished run in the default run directory (run.json, recipe.yaml, MLflow)
    exactly as it was; --out pointing at a run directory is refused."""
    from hpc.pipeline import prepare_run
    from hpc.rundir import RunDir

    recipe = load_recipe(TINY_RECIPE)
    default = tmp_path / "hpcft-runs" / recipe.name
    prepare_run(recipe, TINY_RECIPE, RunDir(default))
    before = _tree(default)
    env = {**os.environ, "COLUMNS": "160"}
    p = subprocess.run(
        [sys.executable, "-m", "hpc.cli", "sbatch", str(TINY_RECIPE), "--out", "sb", "--set", "stages.0.max_steps=5"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert _tree(default) == before  # no rewritten run.json/recipe.yaml, no new MLflow runs in mlflow.db
    assert sorted(x.name for x in (tmp_path / "sb").iterdir()) == sorted(
        ["recipe.yaml", "submit.sh"] + [f"{s}.sbatch" for s in ("model", "data", "sft", "export", "eval", "gate")]
    )
    assert "max_steps: 5" in (tmp_path / "sb/recipe.yaml").read_text()  # what submit.sh will run
    submit = (tmp_path / "sb/submit.sh").read_text()
    assert '-m hpc.slurm prepare "$RUN_DIR" recipe.yaml' in submit and "-m hpc.slurm record" in submit
    refused = run_cli("sbatch", str(TINY_RECIPE), "--out", str(default), "--workdir", str(tmp_path / "w"))
    assert refused.returncode == 2 and "is a run directory" in refused.stderr
    assert _tree(default) == before and not (tmp_path / "w").exists()


def _sbatch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def test_exported_scripts_carry_the_submitit_options(tmp_path):
    """Each exported script has the sbatch options the submitit path submits (requeue near the time limit,
    appended logs), the fabric exports only in GPU jobs, and the interpreter the job's environment chooses."""
    from hpc.rundir import RunDir
    from hpc.slurm import job_python, make_executor, write_sbatch

    r = load_recipe(
        TINY_RECIPE,
        [
            "executor.slurm={env_preset: infiniband, max_retries: 2}",
            "executor.stages={sft: {gpus_per_node: 1}, eval: {setup: ['source /opt/env/bin/activate']},"
            " gate: {container_image: 'nvcr.io/x/y:1'}}",
        ],
    )
    plan = build_plan(r)
    rd = RunDir(tmp_path / "w")
    write_sbatch(r, TINY_RECIPE, plan, rd, tmp_path / "sb", None)
    for spec in plan:
        text = (tmp_path / f"sb/{spec.name}.sbatch").read_text()
        lines = _sbatch_lines(text)
        assert "#SBATCH --signal=USR2@90" in lines and "#SBATCH --open-mode=append" in lines, spec.name
        assert "#SBATCH --requeue" in lines
        o = job_options(spec, r.executor)
        # the submitit path's own script for this stage: the same #SBATCH lines
        ex = make_executor(rd.stage_dir(spec.name) / "logs", o, f"hpcft-{r.name}-{spec.name}", [], None)
        if spec.is_array:
            ex.update_parameters(array_parallelism=len(spec.elements))
            ex.parameters["map_count"] = len(spec.elements)
        assert lines == _sbatch_lines(ex._make_submission_file_text("x", "")), spec.name
        assert ("NCCL_" in text or "UCX_" in text) == (spec.name == "sft"), spec.name
        assert "--retries 2" in text
        assert not (tmp_path / "w").exists()
    assert f"{sys.executable} -u -m hpc.slurm run-element" in (tmp_path / "sb/model.sbatch").read_text()
    ev = (tmp_path / "sb/eval.sbatch").read_text()
    assert ev.index("source /opt/env/bin/activate") < ev.index("python -u -m hpc.slurm run-element")
    assert sys.executable not in ev
    gate = (tmp_path / "sb/gate.sbatch").read_text()
    assert "--container-image=nvcr.io/x/y:1 python -u -m hpc.slurm run-element" in gate
    gate_opts = job_options(next(s for s in plan if s.name == "gate"), r.executor)
    assert job_python(gate_opts, None) == "python" and job_python(gate_opts, "/opt/py") == "/opt/py"
    # the submitit path runs the same interpreter
    assert make_executor(tmp_path / "l", gate_opts, "g", [], None).python == "python"


@pytest.mark.slow
@pytest.mark.slurm
def test_failed_stage_cancels_dependents(slurm_cluster, tmp_path):  # noqa: F811
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 2}')
    wd = tmp_path / "run"
    p = run_cli(
        "run",
        str(TINY_RECIPE),
        "--workdir",
        str(wd),
        "--executor",
        "slurm",
        "--set",
        f"model={{path: {broken}}}",
        "--set",
        "executor.slurm={max_retries: 0}",
    )
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    assert "stage data failed" in p.stdout and "log: " in p.stdout
    assert "dependent stages not run: sft, export, eval, gate" in p.stdout
    jobs = json.loads((wd / "run.json").read_text())["slurm_jobs"]
    states = sacct([j["job_id"] for j in jobs.values()])
    assert states[jobs["data"]["job_id"]][0] == "FAILED"
    for stage in ("sft", "export", "gate"):
        job = jobs[stage]["job_id"]
        st = states[job]
        # The accounting's reason is "DependencyNeverSatisfied" or, depending on when slurmctld cancelled
        # the job, "None"; what matters is that it was cancelled without ever starting.
        assert st[0] == "CANCELLED" and ("Dependency" in st[1] or _never_started(job)), (stage, st)


def _fail_once(flag: str, how: str = "raise") -> str:
    if not Path(flag).exists():
        Path(flag).write_text("failed once")
        if how == "kill":  # what the OOM killer, a segfault or a driver abort do: no Python unwinding at all
            os.kill(os.getpid(), 9)
        raise RuntimeError("planted failure")
    return os.environ["SLURM_JOB_ID"]


def _supervised(folder: Path, attempts: Path, retries: int = 1, **params):
    """A submitit Slurm executor whose jobs retry as stage jobs do: srun --kill-on-bad-exit, then the
    teardown (hpc.slurm_retry) requeues the job while retries remain."""
    import submitit

    ex = submitit.SlurmExecutor(folder=folder, python=sys.executable)
    teardown = [
        "HPCFT_RC=$?",
        f'{sys.executable} -m hpc.slurm_retry --rc "$HPCFT_RC" --attempts {attempts} --retries {retries}',
    ]
    ex.update_parameters(time=5, srun_args=["--kill-on-bad-exit=1"], teardown=teardown, **params)
    return ex


def _attempt_states(job_id: str) -> list[str]:
    """Every attempt of the job, oldest first, once the last one has ended."""
    import time

    deadline = time.time() + 120
    while True:
        attempts = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-D", "-j", job_id, "--format=State"], capture_output=True, text=True
        ).stdout.split()
        if time.time() > deadline or attempts[-1:] not in ([], ["RUNNING"], ["PENDING"], ["COMPLETING"], ["REQUEUED"]):
            return attempts
        time.sleep(1)


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_failed_job_is_requeued_and_succeeds(slurm_cluster, tmp_path, how):  # noqa: F811
    """A job whose process raised, or was killed by SIGKILL (no handler runs), is requeued by its teardown
    and succeeds; the attempt is recorded with its cause, and Slurm shows REQUEUED then COMPLETED."""
    ex = _supervised(tmp_path / "logs", tmp_path / "attempts", additional_parameters={"requeue": True})
    job = ex.submit(_fail_once, str(tmp_path / "flag"), how)
    # (job.result() may read the failed attempt's result before the requeue: the states decide)
    assert _attempt_states(job.job_id) == ["REQUEUED", "COMPLETED"]
    assert job.result() == job.job_id
    (record,) = [json.loads(line) for line in (tmp_path / "attempts/0.jsonl").read_text().splitlines()]
    assert record["attempt"] == 1 and record["job"] == job.job_id
    err = Path(job.paths.stderr).read_text()
    assert "requeueing (0 retries left)" in err
    if how == "kill":
        assert record["rc"] == 137 and "killed by signal 9 (SIGKILL)" in record["reason"], record
        assert "OOM killer" in record["reason"]
    else:
        assert "planted failure" in err and "exited with code 1" in record["reason"], record


def _always_fail():
    raise RuntimeError("planted failure; WANDB_API_KEY=wandb0123456789abcdef")


@pytest.mark.slow
@pytest.mark.slurm
def test_no_retries_left_or_requeue_refused_fails_at_once(slurm_cluster, tmp_path):  # noqa: F811
    """With no retries left the job fails at once with the cause named; a requeue that Slurm refuses
    (--no-requeue) fails the job at once instead of holding its allocation."""
    import time

    for name, retries, params in (("none-left", 0, {"requeue": True}), ("refused", 1, {"no_requeue": True})):
        ex = _supervised(tmp_path / name, tmp_path / f"{name}-attempts", retries, additional_parameters=params)
        started = time.time()
        bad = ex.submit(_always_fail)
        assert _attempt_states(bad.job_id) == ["FAILED"], name
        assert time.time() - started < 100, f"{name}: the failed attempt held its allocation"
        err = Path(bad.paths.stderr).read_text()
        assert "exited with code 1" in err, err[-2000:]
        if name == "refused":
            assert "Slurm refused the requeue" in err
        else:
            assert "no retries left" in err


def test_attempt_causes_are_named():
    """The teardown names what ended a step from srun's task lines, the exit code and sacct's OOM state."""
    from hpc.slurm_retry import describe

    killed = [{"node": "node1", "tasks": "0", "what": "Killed"}]
    assert describe(137, killed, False).startswith("task 0 on node1: killed by signal 9 (SIGKILL): the kernel's OOM")
    assert "out of memory" in describe(137, killed, True) and "mem_gb" in describe(137, killed, True)
    segv = [{"node": "n2", "tasks": "3", "what": "Segmentation fault (core dumped)"}]
    assert describe(139, segv, False) == "task 3 on n2: killed by signal 11 (SIGSEGV)"
    exited = [{"node": "n1", "tasks": "0-1", "what": "Exited with exit code 1"}]
    assert describe(1, exited, False).startswith("task 0-1 on n1: exited with code 1")
    assert describe(143, [], False) == "killed by signal 15 (SIGTERM)"
    assert describe(3, [], False) == "the step exited with code 3"


def test_srun_lines_of_this_attempt_only(tmp_path):
    from hpc.slurm_retry import _srun_errors

    log = tmp_path / "1_0_log.err"
    log.write_text(
        "srun: error: node2: task 1: Killed\nhpcft: attempt 1 of job 1 failed: ...\n"
        "Traceback...\nsrun: error: node1: task 0: Exited with exit code 1\n"
    )
    assert _srun_errors(log) == [{"node": "node1", "tasks": "0", "what": "Exited with exit code 1"}]


@pytest.mark.slow
@pytest.mark.slurm
def test_datatrove_array_element_retried(slurm_cluster, tmp_path):  # noqa: F811
    from hpc.datatrove_slurm import SubmititPipelineExecutor
    from hpc.slurm import JobOptions, make_executor

    flags = tmp_path / "flags"
    flags.mkdir()

    def step(data, rank, world_size):
        if rank == 1 and not (flags / "seen").exists():
            (flags / "seen").write_text("x")
            raise RuntimeError("rank 1 fails on its first attempt")
        (flags / f"done-{rank}").write_text("ok")
        yield from ()

    opts = JobOptions(
        nodes=1, tasks_per_node=1, cpus_per_task=1, gpus_per_node=0, mem_gb=None, time_min=5, max_retries=0
    )
    ex = SubmititPipelineExecutor(
        [step],
        str(tmp_path / "dt"),
        3,
        max_retries=1,
        make_executor=lambda: make_executor(tmp_path / "logs", opts, "dt", [], None),
    )
    ex.run()
    assert sorted(p.name for p in flags.glob("done-*")) == ["done-0", "done-1", "done-2"]
    assert len(ex.job_ids) == 4  # 3 elements, then rank 1 again
    assert len(list((tmp_path / "dt/completions").iterdir())) == 3


def _losses(progress_path: Path) -> dict[int, float]:
    from hpc.progress import current_attempt

    events = [json.loads(line) for line in progress_path.read_text().splitlines() if line.strip()]
    return {e["step"]: e["loss"] for e in current_attempt(events) if "loss" in e and "max_steps" in e}


@pytest.mark.slow
@pytest.mark.slurm
def test_two_node_training_matches_one_process(slurm_cluster, tmp_path):  # noqa: F811
    """sft as one Slurm job of 2 nodes x 2 tasks (dp 4): the ranks agree on the world and every logged
    loss equals the single-process run's."""
    wd = tmp_path / "run"
    steps = ["--set", "stages.0.max_steps=4", "--set", "stages.0.log_every=1", "--set", "eval.limit=10"]
    single = run_cli("run", str(TINY_RECIPE), "--workdir", str(wd), "--executor", "inline", *steps)
    assert single.returncode in (0, 3), single.stdout[-2000:] + single.stderr[-2000:]
    reference = _losses(wd / "stages/sft/progress.jsonl")
    assert sorted(reference) == [1, 2, 3, 4]
    multi = run_cli(
        "run",
        str(TINY_RECIPE),
        "--workdir",
        str(wd),
        "--executor",
        "slurm",
        "--only",
        "sft",
        *steps,
        "--set",
        "parallel.dp_replicate=2",
        "--set",
        "parallel.dp_shard=2",
        "--set",
        "executor.stages={sft: {nodes: 2, cpus_per_task: 1}}",
    )
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    result = json.loads((wd / "stages/sft/result.json").read_text())
    assert result["world_size"] == 4
    job = json.loads((wd / "run.json").read_text())["slurm_jobs"]["sft"]["job_id"]
    assert sacct([job])[job][0] == "COMPLETED"  # waits: the job ends a moment after its marker
    nodes = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", job, "--format=NNodes"], capture_output=True, text=True
    ).stdout.strip()
    assert nodes == "2", nodes
    losses = _losses(wd / "stages/sft/progress.jsonl")
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in reference.items():
        assert abs(losses[step] - loss) < 1e-5, (step, losses[step], loss)


@pytest.mark.slow
@pytest.mark.slurm
def test_preempted_training_job_requeues_and_resumes(slurm_cluster, tmp_path):  # noqa: F811
    """USR2 (what submitit arranges before the time limit, and what preemption brings) requeues the SFT
    job, which resumes after its latest checkpoint instead of starting over; the pipeline completes."""
    import time

    wd = tmp_path / "run"
    args = [
        "--workdir",
        str(wd),
        "--executor",
        "slurm",
        "--set",
        "stages.0.max_steps=150",
        "--set",
        "stages.0.checkpoint_every=10",
        "--set",
        "stages.0.log_every=5",
        "--set",
        "eval.limit=20",
    ]
    p = run_cli("run", str(TINY_RECIPE), *args, "--detach")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    latest = wd / "stages/sft/resume/latest"
    deadline = time.time() + 600
    while not latest.is_file() and time.time() < deadline:
        time.sleep(1)
    assert latest.is_file(), "sft wrote no checkpoint"
    sft_job = json.loads((wd / "run.json").read_text())["slurm_jobs"]["sft"]["job_id"]
    subprocess.run(["scancel", "--signal=USR2", sft_job], check=True)
    w = run_cli("watch", str(wd))
    assert w.returncode in (0, 3), w.stdout[-3000:] + w.stderr[-3000:]  # done; the gate decides
    events = [json.loads(line) for line in (wd / "stages/sft/progress.jsonl").read_text().splitlines()]
    resumed = [e["resumed_from_step"] for e in events if "resumed_from_step" in e]
    assert resumed and resumed[0] >= 10, resumed
    assert json.loads((wd / "stages/sft/result.json").read_text())["resumed_from_step"] == resumed[-1]
    logs = "".join(f.read_text() for f in (wd / "stages/sft/logs").glob("*.err"))
    assert "this job is preempted" in logs and "DUE TO JOB REQUEUE" in logs, logs[-2000:]
    assert sacct([sft_job])[sft_job][0] == "COMPLETED"


@pytest.mark.slow
@pytest.mark.slurm
def test_exported_submit_sh_runs_like_a_normal_run(slurm_cluster, tmp_path):  # noqa: F811
    """`hpcft sbatch` writes only its scripts; submit.sh then runs the tiny recipe as `hpcft run --executor
    slurm` does: every job COMPLETED, every stage's markers, the gate's result, closed MLflow child runs,
    and a later `hpcft run` finds everything up to date."""
    from mlflow.tracking import MlflowClient

    from hpc.rundir import RunDir

    wd, sb = tmp_path / "run", tmp_path / "scripts"
    p = run_cli("sbatch", str(TINY_RECIPE), "--out", str(sb), "--workdir", str(wd), *FAST)
    assert p.returncode == 0, p.stderr
    assert not wd.exists(), "writing scripts must not touch the run directory"
    sub = subprocess.run(["bash", str(sb / "submit.sh")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    w = run_cli("watch", str(wd))
    # 20 steps are too few to pass the gate: the pipeline completes and the gate rejects (exit 3)
    assert w.returncode == 3, w.stdout[-3000:] + w.stderr[-3000:]
    meta = json.loads((wd / "run.json").read_text())
    jobs = meta["slurm_jobs"]
    assert set(jobs) == {"model", "data", "sft", "export", "eval", "gate"}
    states = sacct([j["job_id"] for j in jobs.values()])
    assert len(states) == 9  # eval is a 4-element array
    assert all(s[0] == "COMPLETED" for s in states.values()), states
    rd = RunDir(wd)
    plan = build_plan(rd.load_recipe())
    assert all(rd.stage_done(s) for s in plan)
    gate = json.loads((wd / "stages/gate/result.json").read_text())
    assert gate["passed"] is False and gate["version"]
    assert list((wd / "stages/data/logs/ranks").glob("*_0_log.err")), "datatrove ranks ran as Slurm jobs"
    assert list((wd / "stages/eval/logs").glob(f"{jobs['eval']['job_id']}_3_0_log.err"))
    uri = meta["tracking_uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    children = {s: client.get_run(r).info.status for s, r in meta["child_runs"].items()}
    assert children == {s.name: "FINISHED" for s in plan}, children
    local = run_cli("run", str(TINY_RECIPE), "--workdir", str(wd), *FAST)
    assert local.returncode == 3 and local.stdout.count("up to date, skipped") == 6
