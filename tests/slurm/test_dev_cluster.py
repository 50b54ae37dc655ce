"""The local dev Slurm cluster end to end: nodes, sbatch across nodes, accounting, submitit, and a
2-node torch.distributed (gloo) job. Needs `slurm/dev-cluster up` beforehand (see conftest)."""

import os
import sys
import time

import cloudpickle
import pytest
import submitit

from .conftest import run, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

# Jobs unpickle these functions on the nodes, where this test package may not be importable
# (the job's sys.path depends on the submitting cwd): ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_TIMEOUT_S = 180


def _node_states() -> dict[str, str]:
    out = run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N %T"])
    return dict(line.split() for line in out.splitlines() if line.strip())


def _executor(folder, **params) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(slurm_partition="debug", timeout_min=5, **params)
    return executor


def _results(job: submitit.Job):
    """All task results, failing (and cancelling the job) instead of hanging past the timeout."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"submitit job {job.job_id} not done after {JOB_TIMEOUT_S}s; stderr: {job.stderr()}")
        time.sleep(1)
    return job.results()


def test_all_nodes_idle(slurm_cluster):
    # Other users of the cluster may still be finishing jobs: allow them a moment.
    states = wait_until(
        lambda: (s := _node_states()) and all(v == "idle" for v in s.values()) and s, timeout=60, what="all nodes idle"
    )
    assert sorted(states) == [f"node{i}" for i in range(1, slurm_cluster + 1)]


def test_sbatch_hostname_on_two_nodes_and_sacct(tmp_path):
    out_file = tmp_path / "hostname.out"
    job_id = (
        run(
            [
                "sbatch",
                "--parsable",
                "--wait",
                "-N2",
                "--ntasks-per-node=1",
                "-t",
                "2",
                "-p",
                "debug",
                "-o",
                str(out_file),
                "--wrap",
                "srun hostname",
            ],
            timeout=JOB_TIMEOUT_S,
        )
        .strip()
        .split(";")[0]
    )
    hosts = out_file.read_text().split()
    assert len(hosts) == 2 and len(set(hosts)) == 2 and set(hosts) <= set(_node_states())

    # sacct lags the job's end by about a second.
    def state():
        out = run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,NNodes"]).strip()
        return out if out.startswith("COMPLETED") else None

    assert wait_until(state, timeout=30, what=f"sacct COMPLETED for job {job_id}") == "COMPLETED|2"


def _where_am_i(x: int) -> dict:
    import socket

    return {
        "value": x * 7,
        "host": socket.gethostname(),
        "python": sys.executable,
        "job_id": os.environ["SLURM_JOB_ID"],
    }


def test_submitit_job_returns_value(tmp_path):
    job = _executor(tmp_path).submit(_where_am_i, 6)
    (result,) = _results(job)
    assert result["value"] == 42
    assert result["host"].startswith("node")
    assert result["python"] == sys.executable
    assert result["job_id"] == job.job_id


def _gloo_all_reduce() -> dict:
    import datetime
    import socket
    import subprocess

    import torch
    import torch.distributed as dist

    env = submitit.JobEnvironment()
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True
    ).stdout.split()
    os.environ["MASTER_ADDR"] = hosts[0]
    # Derived from the job id so that concurrent jobs on the same master node do not clash.
    os.environ["MASTER_PORT"] = str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000)
    dist.init_process_group(
        "gloo",
        init_method="env://",
        rank=env.global_rank,
        world_size=env.num_tasks,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        tensor = torch.tensor([float(env.global_rank + 1)])
        dist.all_reduce(tensor)
    finally:
        dist.destroy_process_group()
    return {
        "rank": env.global_rank,
        "world": env.num_tasks,
        "host": socket.gethostname(),
        "master": hosts[0],
        "sum": tensor.item(),
    }


def test_submitit_two_node_gloo_all_reduce(tmp_path):
    executor = _executor(tmp_path, nodes=2, tasks_per_node=2, cpus_per_task=1)
    results = _results(executor.submit(_gloo_all_reduce))
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3]
    assert {r["world"] for r in results} == {4}
    assert {r["sum"] for r in results} == {10.0}  # 1 + 2 + 3 + 4
    hosts = sorted(r["host"] for r in results)
    assert hosts[0] == hosts[1] != hosts[2] == hosts[3]  # two nodes, two tasks each
    assert {r["master"] for r in results} == {hosts[0]}  # first host of the node list


def _visible_devices() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


def test_submitit_gpus_per_node_with_fake_gpus(tmp_path):
    gres = run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%G"]).split()
    gpus = min((int(g.split(":")[-1]) for g in gres if g.startswith("gpu:")), default=0)
    if gpus == 0 or len(gres) != sum(g.startswith("gpu:") for g in gres):
        pytest.skip("cluster is up without fake GPUs: `slurm/dev-cluster up --gpus 2`")
    (visible,) = _results(_executor(tmp_path, gpus_per_node=gpus).submit(_visible_devices))
    assert visible == ",".join(str(i) for i in range(gpus))
