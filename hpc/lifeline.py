"""Process lifetimes of local jobs: who started a job, whether that process still lives, and what killed a job.

A local job is a tree: `hpcft run` (the CLI) -> submitit's controller (`submitit.local._local`) -> the task
-> its workers (datatrove's process pool, ...). The CLI stops the tree on SIGTERM, SIGHUP and Ctrl-C
(hpc/local.py `_stop`), but after `kill -9` of the CLI no handler runs, and the controller and the task,
reparented to PID 1, would train on unsupervised. PR_SET_PDEATHSIG does not help: the CLI is not the task's
parent (the controller is, and it outlives the CLI). So the task runs through this module's wrapper
(`python -m hpc.lifeline <the task's command>`, passed as submitit.LocalExecutor's `python`):

- it starts the real task as its child and waits for it, forwarding SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2
  (the controller's interrupt, timeout and preemption signals);
- every `CHECK_S` it checks that the CLI named in $HPCFT_SUPERVISOR ("host:pid:start time") is still the same
  live process (the start time, field 22 of /proc/<pid>/stat, tells a reused pid apart); when it is not, it
  kills the task's tree, then the submitit controller above it, and exits: nothing is left within seconds;
- when the task dies from a signal (SIGKILL from the OOM killer, ...), it writes one line naming the signal
  into the task's stderr log, which the CLI's failure report shows (submitit itself records nothing).

Only a local job's environment has $HPCFT_SUPERVISOR, and a supervisor on another host is never judged.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

SUPERVISOR_ENV = "HPCFT_SUPERVISOR"
CHECK_S = 1.0
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)

SIGNAL_NOTES = {
    signal.SIGKILL: "the kernel's OOM killer does this when memory runs out",
    signal.SIGSEGV: "a crash in native code",
    signal.SIGBUS: "a crash in native code, or a memory-mapped file that went away",
    signal.SIGABRT: "an abort in native code",
}


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (/proc/<pid>/stat field 22); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: count fields after the last ')'
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 overall = the 20th after the name


def same_process(pid: int, started: int | None) -> bool:
    """True while `pid` is alive and is the process that had start time `started` (not a reuse of its pid)."""
    now = start_time(pid)
    if now is None:
        return False
    if started is not None and now != started:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has died; only its exit status is left


def identity() -> str:
    """This process as $HPCFT_SUPERVISOR holds it: 'host:pid:start time'."""
    return f"{socket.gethostname()}:{os.getpid()}:{start_time(os.getpid())}"


def supervisor_gone(value: str) -> bool:
    """True when the supervisor `value` ('host:pid:start') ran on this host and is no longer that process."""
    host, pid, started = value.rsplit(":", 2)
    if host != socket.gethostname():
        return False
    return not same_process(int(pid), int(started) if started.isdigit() else None)


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process under it; each is frozen first (SIGSTOP) so that it cannot start new
    children while its own are listed."""
    try:
        os.kill(pid, signal.SIGSTOP)
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (ProcessLookupError, FileNotFoundError, PermissionError):
        children = []
    for child in children:
        kill_tree(int(child))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def describe_signal(signum: int) -> str:
    """'killed by signal 9 (SIGKILL; the kernel's OOM killer does this when memory runs out)'."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"killed by signal {signum}"
    note = SIGNAL_NOTES.get(signum)
    return f"killed by signal {signum} ({name}{'; ' + note if note else ''})"


def _controller_pid() -> int | None:
    """The submitit controller this wrapper runs under (its parent), if that is what the parent is."""
    parent = os.getppid()
    try:
        cmdline = Path(f"/proc/{parent}/cmdline").read_bytes()
    except OSError:
        return None
    return parent if b"submitit.local._local" in cmdline else None


def _watch_supervisor(value: str, child: subprocess.Popen) -> None:
    while child.poll() is None:
        if supervisor_gone(value):
            pid = value.rsplit(":", 2)[1]
            print(
                f"hpcft: the hpcft run that started this job (pid {pid}) is gone; stopping the job",
                file=sys.stderr,
                flush=True,
            )
            kill_tree(child.pid)
            controller = _controller_pid()
            if controller is not None:  # not kill_tree: this wrapper is under it, and would stop itself
                try:
                    os.kill(controller, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os._exit(137)
        time.sleep(CHECK_S)


def main(argv: list[str]) -> int:
    """Run `python <argv>` (the submitit task) as a child, supervised as the module docstring says."""
    child = subprocess.Popen([sys.executable, *argv])

    def forward(signum, frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    value = os.environ.get(SUPERVISOR_ENV)
    if value:
        threading.Thread(target=_watch_supervisor, args=(value, child), daemon=True).start()
    while True:
        try:
            code = child.wait()
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
            continue
    if code < 0:
        print(f"hpcft: the job process (pid {child.pid}) was {describe_signal(-code)}", file=sys.stderr, flush=True)
        return 128 - code
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
