"""Faults injected into a running pipeline on the real dev cluster (slurm/dev-cluster up): a training rank
killed by SIGKILL, a node going down. The pipeline must recover by itself and the CLI must report its true
end (exit 0 or 3, never 1 for a run that completed)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_RECIPE
from tests.slurm.conftest import slurm_cluster  # noqa: F401 - the fixture

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

TRAIN = [
    "--set",
    "stages.0.checkpoint_every=10",
    "--set",
    "stages.0.log_every=5",
    "--set",
    "eval.limit=20",
]


def start_cli(*args) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.Popen(
        [sys.executable, "-m", "hpc.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env,
    )


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(
                f"the CLI ended (exit {proc.returncode}) while waiting for {what}:\n{proc.stdout.read()[-3000:]}"
            )
        time.sleep(1)
    if proc is not None:
        proc.kill()
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def sft_job(wd: Path) -> str | None:
    meta = wd / "run.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("slurm_jobs", {}).get("sft", {}).get("job_id")


def job_processes(job_id: str) -> dict[int, int]:
    """{SLURM_PROCID: pid} of the job's Python task processes (the dev cluster's nodes share this PID space)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"submitit.core._submit" in cmd and env.get(b"SLURM_JOB_ID") == job_id.encode():
            found[int(env.get(b"SLURM_PROCID", b"0"))] = int(proc.name)
    return found


def attempts(job_id: str) -> list[str]:
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-D", "-j", job_id, "--format=State"], capture_output=True, text=True
    ).stdout
    return out.split()


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the CLI did not finish in {timeout}s:\n{out[-3000:]}")
    return proc.returncode, out


def events(wd: Path) -> list[dict]:
    lines = (wd / "stages/sft/progress.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_sigkill_of_rank_0_on_two_nodes_is_retried_and_resumes(slurm_cluster, tmp_path):  # noqa: F811
    """kill -9 of rank 0 of a 2-node training job (what the OOM killer, a segfault or an NCCL abort do):
    srun ends the step, the job's teardown requeues it (max_retries 1), training resumes after its latest
    complete checkpoint, and the CLI, which followed the run throughout, exits with the gate's result. Also the
    plain `hpcft run --executor slurm` path: every other stage's job COMPLETED."""
    wd = tmp_path / "run"
    cli = start_cli(
        "run",
        str(TINY_RECIPE),
        "--workdir",
        str(wd),
        "--executor",
        "slurm",
        *TRAIN,
        "--set",
        "stages.0.max_steps=80",
        "--set",
        "parallel.dp_replicate=2",
        "--set",
        "executor.stages={sft: {nodes: 2, cpus_per_task: 1, max_retries: 1}}",
    )
    job = wait_for(lambda: sft_job(wd), 300, "the sft job", cli)
    wait_for(lambda: (wd / "stages/sft/resume/latest").is_file(), 600, "sft's first checkpoint", cli)
    ranks = wait_for(lambda: (p := job_processes(job)) and len(p) == 2 and p, 60, "both ranks' processes", cli)
    os.kill(ranks[0], signal.SIGKILL)
    code, out = finish(cli)
    assert code in (0, 3), out[-4000:]
    assert "stage sft failed" not in out
    gate = json.loads((wd / "stages/gate/result.json").read_text())
    assert code == (0 if gate["passed"] else 3)
    assert attempts(job) == ["REQUEUED", "COMPLETED"], attempts(job)
    (record,) = [json.loads(line) for line in (wd / "stages/sft/attempts/0.jsonl").read_text().splitlines()]
    assert record["job"] == job and "killed by signal 9 (SIGKILL)" in record["reason"], record
    seen = events(wd)
    retried = [e for e in seen if e.get("event") == "attempt"]
    assert [e["attempt"] for e in retried] == [1, 2]  # the submission's, then the retry's
    assert retried[1]["job_attempt"] == 2 and "killed by signal 9" in retried[1]["after"], retried
    resumed = [e["resumed_from_step"] for e in seen if "resumed_from_step" in e]
    assert resumed and resumed[-1] >= 10, resumed
    assert json.loads((wd / "stages/sft/result.json").read_text())["world_size"] == 2
    # the rest of the pipeline ran as Slurm jobs that all completed (eval: a 4-element array; the data stage's
    # datatrove ranks are array elements too)
    jobs = json.loads((wd / "run.json").read_text())["slurm_jobs"]
    assert set(jobs) == {"model", "data", "sft", "export", "eval", "gate"}

    def ended():  # once sacct has every element's end (a job ends a moment after its stage's marker)
        states = {stage: attempts(j["job_id"]) for stage, j in jobs.items() if stage != "sft"}
        busy = {"PENDING", "RUNNING", "COMPLETING"}
        return states if not any(busy & set(s) for s in states.values()) else None

    ended = wait_for(ended, 60, "every job's end in sacct")
    assert len(ended["eval"]) == 4 and all(set(s) == {"COMPLETED"} for s in ended.values()), ended
    assert list((wd / "stages/data/logs/ranks").glob("*_0_log.err")), "datatrove ranks ran as Slurm jobs"


def _node_of(job_id: str) -> str | None:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T|%N"], capture_output=True, text=True).stdout
    state, _, node = out.strip().partition("|")
    return node if state == "RUNNING" and node else None


def test_node_failure_is_followed_through_the_requeue(slurm_cluster, tmp_path):  # noqa: F811
    """A node set down under the training job: Slurm records NODE_FAIL and requeues the job (--requeue); the
    CLI follows the requeued job instead of reporting a failure, and exits with the pipeline's true result."""
    wd = tmp_path / "run"
    cli = start_cli(
        "run", str(TINY_RECIPE), "--workdir", str(wd), "--executor", "slurm", *TRAIN, "--set", "stages.0.max_steps=60"
    )
    job = wait_for(lambda: sft_job(wd), 300, "the sft job", cli)
    wait_for(lambda: (wd / "stages/sft/resume/latest").is_file(), 600, "sft's first checkpoint", cli)
    node = wait_for(lambda: _node_of(job), 60, "the sft job's node", cli)
    down = ["scontrol", "update", f"nodename={node}", "state=down", "reason=hpcft-fault-test"]
    try:
        subprocess.run(down, check=True)
        wait_for(lambda: "NODE_FAIL" in attempts(job), 120, "sacct NODE_FAIL", cli)
        time.sleep(10)  # the CLI has looked at the run several times with the failed attempt on record
        assert cli.poll() is None, "the CLI gave up on a job Slurm requeued:\n" + cli.stdout.read()[-3000:]
    finally:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], check=False)
    code, out = finish(cli)
    assert code in (0, 3), out[-4000:]
    assert "stage sft failed" not in out
    gate = json.loads((wd / "stages/gate/result.json").read_text())
    assert code == (0 if gate["passed"] else 3)
    states = attempts(job)
    assert states[0] == "NODE_FAIL" and states[-1] == "COMPLETED", states
