"""Stopping `hpcft run` (SIGTERM or Ctrl-C) stops the local jobs it started and says how to resume."""
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, TINY_RECIPE


def _processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -eo" not in line]


@pytest.mark.slow
def test_sigterm_stops_running_local_jobs(tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "hpc.cli", "run", str(TINY_RECIPE), "--workdir", str(workdir),
           "--set", "stages.0.max_steps=100000", "--set", "data.sources.0.num_rows=300"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    progress = workdir / "stages" / "sft" / "progress.jsonl"
    deadline = time.time() + 300
    while not (progress.is_file() and progress.stat().st_size) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(1)
    assert progress.is_file(), "sft never started"
    assert _processes_mentioning(str(workdir)), "the sft job should be running"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    flat = " ".join(out.split())  # the console wraps long lines
    assert "interrupted during sft" in flat and "run the same command again to resume" in flat
    assert "Traceback" not in out
    deadline = time.time() + 30
    while _processes_mentioning(str(workdir)) and time.time() < deadline:
        time.sleep(1)
    assert not _processes_mentioning(str(workdir)), _processes_mentioning(str(workdir))
