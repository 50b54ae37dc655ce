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
    cmd = [
        sys.executable,
        "-m",
        "hpc.cli",
        "run",
        str(TINY_RECIPE),
        "--workdir",
        str(workdir),
        "--set",
        "stages.0.max_steps=100000",
        "--set",
        "data.sources.0.num_rows=300",
    ]
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


@pytest.mark.slow
def test_an_interrupted_stage_resumes_from_its_latest_checkpoint(tmp_path):
    """SIGTERM once the SFT stage has written a training-state checkpoint; the same command again resumes
    after it rather than starting over, and the stage finishes."""
    import json

    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "hpc.cli",
        "run",
        str(TINY_RECIPE),
        "--workdir",
        str(workdir),
        "--set",
        "stages.0.max_steps=100",
        "--set",
        "stages.0.checkpoint_every=10",
        "--set",
        "stages.0.log_every=5",
        "--set",
        "stages.0.eval_every=1000",
        "--set",
        "data.sources.0.num_rows=300",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = workdir / "stages" / "sft" / "resume" / "latest"
    deadline = time.time() + 300
    while not latest.is_file() and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    assert latest.is_file(), "no checkpoint was written"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    saved = int(latest.read_text().strip().split("-")[1])
    assert 10 <= saved < 100
    done = subprocess.run(
        cmd[:-4] + ["--only", "sft"] + cmd[-4:], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
    events = [json.loads(line) for line in (workdir / "stages" / "sft" / "progress.jsonl").read_text().splitlines()]
    resumed = [e["resumed_from_step"] for e in events if "resumed_from_step" in e]
    assert resumed and resumed[-1] >= saved, resumed  # the latest checkpoint (a later one may have landed)
    result = json.loads((workdir / "stages" / "sft" / "result.json").read_text())
    assert result["resumed_from_step"] == resumed[-1] and result["steps"] == 100
    assert not (workdir / "stages" / "sft" / "resume").exists()
