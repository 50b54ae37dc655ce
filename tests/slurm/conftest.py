"""Shared fixtures for tests against the local dev Slurm cluster (slurm/dev-cluster).

These tests never start the cluster: CI runs `slurm/dev-cluster up` before pytest. Without `sinfo`
or a controller that answers, every test here is skipped with the reason.
"""

import shutil
import subprocess
import time
from pathlib import Path

import pytest

# Written by `slurm/dev-cluster up`: the node count it was asked for.
CLUSTER_ENV = Path("/var/lib/hpcft-slurm/cluster.env")


def run(cmd: list[str], timeout: float = 60) -> str:
    """Runs a Slurm client command; its stdout, or an assertion error carrying stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}"
    return proc.stdout


def expected_nodes() -> int:
    """Node count the cluster was brought up with (2 when the state file is missing)."""
    if CLUSTER_ENV.exists():
        for word in CLUSTER_ENV.read_text().split():
            key, _, value = word.partition("=")
            if key == "NODES":
                return int(value)
    return 2


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    """Polls `check()` until it returns something truthy; fails the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def slurm_cluster() -> int:
    """Skips unless the dev cluster's controller answers; returns the expected node count."""
    if shutil.which("sinfo") is None:
        pytest.skip("sinfo not on PATH: run `slurm/dev-cluster up` first")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        first_line = (ping.stdout.strip() or ping.stderr.strip() or "no answer").splitlines()[0]
        pytest.skip(f"Slurm controller not up ({first_line}): run `slurm/dev-cluster up` first")
    return expected_nodes()
