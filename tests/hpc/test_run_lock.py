"""One writer per run directory: `hpcft run` holds <run dir>/.lock; a second writer is refused naming the
holder; a lock whose holder is gone (dead pid on this host, reused pid, silent other host, copied from
elsewhere) is taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from hpc.lifeline import start_time
from hpc.recipe import RecipeError
from hpc.rundir import LOCK, STALE_AFTER_S, RunLock


def _write_lock(root, **fields):
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": start_time(os.getpid()),
        "dir": str(root),
        "command": "hpcft run",
        "run_id": "r1",
        "since": time.time(),
    } | fields
    (root / LOCK).write_text(json.dumps(holder))
    return holder


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_second_writer_is_refused_naming_the_holder_and_the_lock_goes_on_release(tmp_path):
    first = RunLock(tmp_path).acquire("abc")
    holder = json.loads((tmp_path / LOCK).read_text())
    assert holder["pid"] == os.getpid() and holder["run_id"] == "abc" and holder["dir"] == str(tmp_path)
    with pytest.raises(RecipeError) as err:
        RunLock(tmp_path).acquire()
    (line,) = err.value.problems
    assert line.startswith(f"workdir: {tmp_path} is in use by hpcft run (pid {os.getpid()} on host ")
    assert socket.gethostname() in line and line.endswith("; wait for it, or stop it")
    first.release()
    assert not (tmp_path / LOCK).exists()
    with RunLock(tmp_path) as again:  # free again
        assert again.note is None
    assert not (tmp_path / LOCK).exists()


def test_released_when_the_holder_raises(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with RunLock(tmp_path).acquire():
            raise KeyboardInterrupt
    assert not (tmp_path / LOCK).exists()


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path):
    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead, pid_start=None)
    lock = RunLock(tmp_path).acquire()
    assert f"pid {dead}" in lock.note and "no longer running" in lock.note
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_reused_pid_is_told_apart_by_its_start_time(tmp_path):
    _write_lock(tmp_path, pid_start=start_time(os.getpid()) - 1)  # this pid, but another process's start
    lock = RunLock(tmp_path).acquire()
    assert "no longer running" in lock.note
    lock.release()


def test_another_hosts_lock_holds_until_its_heartbeat_stops(tmp_path):
    _write_lock(tmp_path, host="other-node-17", pid=1234)
    with pytest.raises(RecipeError, match="pid 1234 on host other-node-17"):
        RunLock(tmp_path).acquire()
    old = time.time() - STALE_AFTER_S - 60
    os.utime(tmp_path / LOCK, (old, old))
    lock = RunLock(tmp_path).acquire()
    assert "other-node-17" in lock.note and "last touched" in lock.note
    lock.release()


def test_a_lock_copied_with_the_directory_does_not_hold_the_copy(tmp_path):
    _write_lock(tmp_path, dir="/somewhere/else/run")  # a live holder (this process), but of another directory
    lock = RunLock(tmp_path).acquire()
    assert "copied from /somewhere/else/run" in lock.note
    lock.release()


def test_the_holder_touches_the_lock(tmp_path, monkeypatch):
    import hpc.rundir

    monkeypatch.setattr(hpc.rundir, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path).acquire()
    old = time.time() - 1000
    os.utime(tmp_path / LOCK, (old, old))
    time.sleep(0.5)
    assert time.time() - (tmp_path / LOCK).stat().st_mtime < 5
    lock.release()
