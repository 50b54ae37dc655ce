"""Stopping `hpcft run` (SIGTERM or Ctrl-C) stops the local jobs it started and says how to resume."""

import json
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


def _cmd(workdir, *sets):
    cmd = [sys.executable, "-m", "hpc.cli", "run", str(TINY_RECIPE), "--workdir", str(workdir)]
    for s in ("data.sources.0.num_rows=300", "stages.0.log_every=5", "stages.0.eval_every=100000", *sets):
        cmd += ["--set", s]
    return cmd


def _start(workdir, *sets) -> subprocess.Popen:
    return subprocess.Popen(_cmd(workdir, *sets), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_training(proc, workdir, timeout=300):
    """Until the sft job has logged a training step."""
    progress = workdir / "stages" / "sft" / "progress.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if progress.is_file() and '"max_steps"' in progress.read_text():
            return
        time.sleep(0.5)
    raise AssertionError("sft never logged a step")


def _left(workdir, seconds):
    deadline = time.time() + seconds
    while _processes_mentioning(str(workdir)) and time.time() < deadline:
        time.sleep(0.2)
    return _processes_mentioning(str(workdir))


def _run_status(workdir, run_id):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}").get_run(run_id).info.status


@pytest.fixture(scope="module")
def hung_up_run(tmp_path_factory):
    """A local run that a second `hpcft run` on the same directory tried to join while it trained, then
    stopped by SIGHUP (its terminal or SSH session closed)."""
    workdir = tmp_path_factory.mktemp("lock") / "run"
    first = _start(workdir, "stages.0.max_steps=100000")
    deadline = time.time() + 120
    while not (workdir / ".lock").is_file() and time.time() < deadline:
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.2)
    assert (workdir / ".lock").is_file(), "the first run never took the lock"
    started = time.time()
    second = subprocess.run(_cmd(workdir, "stages.0.max_steps=100000"), cwd=ROOT, capture_output=True, text=True)
    second_seconds = time.time() - started
    _wait_for_training(first, workdir)
    sft_run = json.loads((workdir / "run.json").read_text())["child_runs"]["sft"]
    first.send_signal(signal.SIGHUP)
    out, _ = first.communicate(timeout=60)
    left = _left(workdir, 30)
    return {
        "workdir": workdir,
        "first": first,
        "out": out,
        "second": second,
        "second_seconds": second_seconds,
        "left": left,
        "sft_run": sft_run,
    }


@pytest.mark.slow
def test_a_second_run_on_a_busy_directory_exits_2_naming_the_holder(hung_up_run):
    second = hung_up_run["second"]
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    flat = " ".join(second.stderr.split())
    assert f"workdir: {hung_up_run['workdir']} is in use by hpcft run (pid {hung_up_run['first'].pid} on host" in flat
    assert "wait for it, or stop it" in flat
    assert hung_up_run["second_seconds"] < 30  # seconds: python start-up and the recipe check, no waiting
    assert "sft" not in second.stdout  # it started nothing


@pytest.mark.slow
def test_sighup_stops_a_local_run_like_sigterm(hung_up_run):
    first, out = hung_up_run["first"], hung_up_run["out"]
    assert first.returncode == 130, out
    flat = " ".join(out.split())
    assert "interrupted during sft" in flat and "Traceback" not in out
    assert not hung_up_run["left"], hung_up_run["left"]
    assert not (hung_up_run["workdir"] / ".lock").exists()  # released
    assert _run_status(hung_up_run["workdir"], hung_up_run["sft_run"]) == "KILLED"


@pytest.mark.slow
def test_a_moved_run_directory_resumes_and_keeps_the_progress_history(hung_up_run, tmp_path):
    """The interrupted run's directory copied elsewhere and the original deleted: the rerun there finds the
    base model in the new place (model.json holds it relative to the run dir) and trains; sft's progress.jsonl
    keeps the interrupted attempt's steps before the new attempt's."""
    import shutil

    old = hung_up_run["workdir"]
    new = tmp_path / "moved"
    shutil.copytree(old, new)
    shutil.rmtree(old)
    assert json.loads((new / "stages/model/model.json").read_text())["path"] == "stages/model/hf"
    p = subprocess.run(
        _cmd(new, "stages.0.max_steps=3") + ["--only", "sft"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert json.loads((new / "stages/sft/result.json").read_text())["steps"] == 3
    assert not old.exists(), sorted(str(p) for p in old.rglob("*"))[:10]  # nothing written in the old place
    events = [json.loads(line) for line in (new / "stages/sft/progress.jsonl").read_text().splitlines()]
    starts = [i for i, e in enumerate(events) if e.get("event") == "attempt"]
    # two attempt records; the rerun's inputs differ (max_steps), so it is a new run: attempt 1 again
    assert [events[i]["attempt"] for i in starts] == [1, 1]
    second = starts[-1]
    before = [e["step"] for e in events[:second] if "max_steps" in e]
    after = [e["step"] for e in events[second:] if "max_steps" in e]
    assert before and after and max(after) <= 3, (before, after)


@pytest.mark.slow
def test_kill_9_of_the_cli_leaves_no_job_behind_and_the_next_run_takes_over(tmp_path):
    """`kill -9` of a local `hpcft run` while it trains: no handler runs, yet its submitit controller and
    training task stop by themselves within 10 s (hpc.lifeline). The next run takes over the stale lock and
    marks the killed attempt's MLflow run KILLED."""
    workdir = tmp_path / "run"
    proc = _start(workdir, "stages.0.max_steps=100000")
    _wait_for_training(proc, workdir)
    sft_run = json.loads((workdir / "run.json").read_text())["child_runs"]["sft"]
    assert _processes_mentioning(str(workdir))
    proc.kill()
    proc.wait(timeout=30)  # not communicate(): the jobs share its stdout until they are gone
    assert not _left(workdir, 10), _processes_mentioning(str(workdir))
    assert (workdir / ".lock").exists()  # nothing could release it
    p = subprocess.run(
        _cmd(workdir, "stages.0.max_steps=3") + ["--only", "sft"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    flat = " ".join(p.stdout.split())
    assert f"took over the lock of {workdir} from hpcft run (pid {proc.pid} on host" in flat
    assert "no longer running" in flat
    assert _run_status(workdir, sft_run) == "KILLED"
    logs = "".join(f.read_text() for f in (workdir / "stages/sft/logs").rglob("*_log.err"))
    assert "the hpcft run that started this job" in logs and f"(pid {proc.pid}) is gone" in logs
