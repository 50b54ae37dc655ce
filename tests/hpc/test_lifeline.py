"""hpc.lifeline, the wrapper every local job's task runs under: it names the signal that killed the task, and
it stops the task when the hpcft run that started it is gone (`kill -9` of the CLI)."""

import os
import signal
import socket
import subprocess
import sys
import time

from hpc.lifeline import SUPERVISOR_ENV, same_process, start_time, supervisor_gone
from tests.conftest import ROOT


def _wrapper(code: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hpc.lifeline", "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _gone(pid: int) -> bool:
    return start_time(pid) is None or not same_process(pid, None)


def test_a_task_killed_by_a_signal_is_named_in_its_stderr():
    p = _wrapper("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + 9
    assert "was killed by signal 9 (SIGKILL; the kernel's OOM killer does this when memory runs out)" in err


def test_exit_codes_and_signals_pass_through():
    p = _wrapper("import sys; sys.exit(3)")
    assert p.wait(timeout=60) == 3 and "killed" not in p.stderr.read()
    p = _wrapper("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(7)); time.sleep(60)")
    time.sleep(1.5)  # the child has installed its handler
    p.send_signal(signal.SIGTERM)  # submitit's controller forwards SIGTERM/USR2 like this
    assert p.wait(timeout=30) == 7


def test_the_task_stops_when_the_cli_that_started_it_is_gone():
    cli = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    time.sleep(0.3)
    identity = f"{socket.gethostname()}:{cli.pid}:{start_time(cli.pid)}"
    assert not supervisor_gone(identity)
    assert not supervisor_gone(f"another-host:{cli.pid}:0")  # another host's pid is never judged
    task = _wrapper("import time; time.sleep(120)", env={SUPERVISOR_ENV: identity})
    time.sleep(2)
    children = open(f"/proc/{task.pid}/task/{task.pid}/children").read().split()
    assert len(children) == 1 and task.poll() is None
    cli.kill()  # kill -9: no handler runs in the CLI
    cli.wait()
    assert supervisor_gone(identity)
    started = time.time()
    task.wait(timeout=10)
    assert time.time() - started < 10
    assert "the hpcft run that started this job" in task.stderr.read()
    deadline = time.time() + 5
    while not _gone(int(children[0])) and time.time() < deadline:
        time.sleep(0.1)
    assert _gone(int(children[0]))


def _killed_by_the_kernel():
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_local_job_is_reported_with_its_signal(tmp_path, monkeypatch):
    """What the local executor reports for a job killed without a traceback (the OOM killer's SIGKILL):
    the signal, where submitit alone leaves an empty log and 'has not produced any output'."""
    import pytest
    import submitit

    from hpc.executor import StageFailed
    from hpc.local import LocalExecutor, failure_text
    from hpc.plan import StageSpec

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    ex = submitit.LocalExecutor(folder=tmp_path / "%j", python=f"{sys.executable} -m hpc.lifeline")
    ex.update_parameters(timeout_min=2)
    job = ex.submit(_killed_by_the_kernel)
    deadline = time.time() + 60
    while not job.done() and time.time() < deadline:
        time.sleep(0.2)
    text = failure_text(job, None)
    assert "killed by signal 9 (SIGKILL; the kernel's OOM killer does this" in text, text
    spec = StageSpec(name="sft", kind="sft", depends_on=(), resources=None, input_hash="h")
    started = time.time()
    with pytest.raises(StageFailed) as err:
        LocalExecutor.__new__(LocalExecutor)._check(spec, 0, job, {})
    assert time.time() - started < 5  # reported at once: no wait for a result that cannot come
    assert "killed by signal 9 (SIGKILL" in err.value.tail and err.value.log_path == job.paths.stderr
