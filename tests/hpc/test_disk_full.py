"""A run directory on a small filesystem that fills up: the user gets one line naming the path and the
errno (not pages of datatrove, SQLAlchemy or DCP tracebacks), the CLI exits 1, and once there is room a
rerun goes on. Needs root to mount a tmpfs (skipped otherwise)."""

import os
import subprocess
import sys

import pytest

from hpc.errors import describe_os_error
from tests.conftest import ROOT, TINY_RECIPE


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_os_errors_are_one_line():
    import errno

    err = OSError(errno.ENOSPC, "No space left on device")
    line = describe_os_error(err, where="/scratch/run/stages/sft")
    assert line.startswith("/scratch/run/stages/sft: No space left on device (ENOSPC)")
    wrapped = RuntimeError("DCP failed")
    wrapped.__context__ = PermissionError(errno.EACCES, "Permission denied", "/scratch/x")
    assert describe_os_error(wrapped) == "/scratch/x: Permission denied (EACCES)"
    sqlite = Exception("(sqlite3.OperationalError) database or disk is full\n[SQL: UPDATE runs ...]")
    assert describe_os_error(sqlite, "/r/mlflow.db").startswith("/r/mlflow.db: database or disk is full (ENOSPC)")
    assert describe_os_error(ValueError("bad value")) is None


@pytest.mark.slow
def test_a_filling_filesystem_is_one_line(small_fs):
    """The embedded default (local executor): the jobs' logs are on the full disk too, so the CLI names it.
    (The inline executor, for debugging, also shows what the libraries running in its process log.)"""
    wd = small_fs / "run"
    env = {**os.environ, "COLUMNS": "160"}
    cmd = [sys.executable, "-m", "hpc.cli", "run", str(TINY_RECIPE), "--workdir", str(wd), "--executor", "local"]
    cmd += ["--set", "stages.0.max_steps=10", "--set", "stages.0.checkpoint_every=5"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-3000:]
    lines = [line for line in out.splitlines() if "No space left on device (ENOSPC)" in line or "disk is full" in line]
    assert lines and str(small_fs) in lines[-1], out[-3000:]
    assert "Traceback" not in out and len(out.splitlines()) < 40, out[-5000:]
