"""Retries from outside the dying process: what a Slurm stage job does after its `srun` step ends.

Whatever ends a training process (a Python exception, the kernel's OOM killer, a segfault, an NCCL or
driver abort, `kill -9`; on any rank, on any node) ends its `srun` step: srun runs with
`--kill-on-bad-exit=1`, so one dead task takes the others down instead of leaving them blocked in a
collective. The job's batch script then runs its teardown, `python -m hpc.slurm after-step`, on the
batch host: `after_step` names the cause, records the attempt in the stage directory
(`attempts/<element>.jsonl`) and, while retries remain, requeues the job with `scontrol requeue`. Slurm
starts it again (its `afterok` dependants keep waiting) and a training stage resumes from its latest
complete checkpoint. Requeues Slurm does itself (preemption, a failed node, submitit's time-limit
checkpoint) are not counted: they are recognised from the job's restart count and state.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REQUEUED_EXIT = 75  # exit code of an attempt that requeued itself (EX_TEMPFAIL)
SRUN_TASK_ERROR = re.compile(r"srun: error: (?P<node>\S+): tasks? (?P<tasks>[\d,\-]+): (?P<what>.+)$")
SRUN_SIGNALS = {"Killed": 9, "Segmentation fault": 11, "Aborted": 6, "Bus error": 7, "Terminated": 15}  # srun's words
OOM_HINT = "the kernel's OOM killer does this when a process runs out of memory"


def attempts_file(attempts_dir: Path, index: int) -> Path:
    return Path(attempts_dir) / f"{index}.jsonl"


def read_attempts(path: Path, job: str | None = None) -> list[dict]:
    """The failed attempts recorded in `path` (those of job `job` only, when given)."""
    if not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if job is None or row.get("job") == job:
            rows.append(row)
    return rows


def _scontrol_job(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60)
    fields = {}
    for word in out.stdout.split():
        key, eq, value = word.partition("=")
        if eq:
            fields.setdefault(key, value)
    return fields


def already_requeued(job: str) -> bool:
    """Slurm (or submitit, on preemption or near the time limit) requeued this job while the step ended: the
    restart count grew past the one this attempt started with, or the job is no longer running."""
    info = _scontrol_job(job)
    if not info:
        return False
    started_with = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    restarts = int(info.get("Restarts", "0") or 0)
    return restarts > started_with or info.get("JobState", "RUNNING") not in ("RUNNING", "COMPLETING")


def _srun_errors(log: Path | None) -> list[dict]:
    """srun's per-task error lines of this attempt (after the last line an earlier teardown wrote)."""
    if log is None or not log.is_file():
        return []
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - 65536))
        lines = f.read().decode(errors="replace").splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("hpcft: attempt "):
            lines = lines[i + 1 :]
            break
    return [m.groupdict() for line in lines if (m := SRUN_TASK_ERROR.search(line.strip()))]


def _step_oom(job: str) -> bool:
    out = subprocess.run(
        ["sacct", "-n", "-P", "-j", job, "--format=JobID,State"], capture_output=True, text=True, timeout=60
    ).stdout
    return "OUT_OF_MEMORY" in out


def describe(rc: int, errors: list[dict], oom: bool) -> str:
    """One line naming why the step ended: the first task srun reported dead, and how."""
    where = f"task {errors[0]['tasks']} on {errors[0]['node']}: " if errors else ""
    what = errors[0]["what"].strip() if errors else ""
    if oom or "out of memory" in what.lower():
        return f"{where}out of memory (sacct: OUT_OF_MEMORY); ask for more with executor.slurm.mem_gb"
    code = re.search(r"[Ee]xited with exit code (\d+)", what)
    if code:
        return f"{where}exited with code {code.group(1)} (its traceback is in the log above)"
    signum = next((num for word, num in SRUN_SIGNALS.items() if what.startswith(word)), None)
    if signum is None and rc > 128:
        signum = rc - 128
    if signum is not None:
        try:
            sig = signal.Signals(signum).name
        except ValueError:
            sig = f"signal {signum}"
        line = f"{where}killed by signal {signum} ({sig})"
        if signum == 9:
            line += f": {OOM_HINT} (then sacct shows OUT_OF_MEMORY), as do kill -9 and driver or NCCL aborts"
        return line
    return f"{where}{what or f'the step exited with code {rc}'}"


def after_step(
    rc: int,
    attempts_dir: Path,
    max_retries: int,
    elements: list[int] | None = None,
    log: Path | None = None,
    on_final_failure=None,
) -> int:
    """The job's teardown after its srun step returned `rc`. Returns the batch script's exit code: 0 when
    the step succeeded, REQUEUED_EXIT when this job was requeued for another attempt, `rc` otherwise (the
    job fails; `on_final_failure(reason)` runs first)."""
    if rc == 0:
        return 0
    job = os.environ.get("SLURM_JOB_ID", "")
    task = int(os.environ.get("SLURM_ARRAY_TASK_ID") or 0)
    index = elements[task] if elements else task
    say = lambda line: print(f"hpcft: {line}", file=sys.stderr, flush=True)  # noqa: E731
    if job and already_requeued(job):
        say(f"attempt of job {job} ended (exit {rc}) after Slurm requeued it; not counted as a failure")
        return rc
    if log is None and job:
        err = _scontrol_job(job).get("StdErr")
        log = Path(err) if err else None
    reason = describe(rc, _srun_errors(log), bool(job) and _step_oom(job))
    path = attempts_file(attempts_dir, index)
    n = len(read_attempts(path, job)) + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"attempt": n, "job": job, "element": index, "rc": rc, "reason": reason, "t": time.time()}
    record["node"] = os.environ.get("SLURMD_NODENAME", "")
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if job and n <= max_retries:
        say(f"attempt {n} of job {job} failed: {reason}; requeueing ({max_retries - n} retries left)")
        asked = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
        if asked.returncode == 0:
            return REQUEUED_EXIT
        say(f"Slurm refused the requeue ({(asked.stderr or asked.stdout).strip()}); the job fails")
    else:
        say(f"attempt {n} of job {job} failed: {reason}; no retries left (executor.slurm.max_retries={max_retries})")
    if on_final_failure is not None:
        try:
            on_final_failure(reason)
        except Exception as err:  # noqa: BLE001 - the job's failure must be reported whatever else breaks
            say(f"could not record the failure: {err}")
    return rc


def main(argv: list[str] | None = None) -> int:
    """`python -m hpc.slurm_retry --rc RC --attempts DIR --retries N`: after_step for any submitit job (stage
    jobs use `python -m hpc.slurm after-step`, which also closes the stage's MLflow run)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m hpc.slurm_retry")
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--attempts", type=Path, required=True)
    p.add_argument("--retries", type=int, default=1)
    args = p.parse_args(argv)
    return after_step(args.rc, args.attempts, args.retries)


if __name__ == "__main__":
    sys.exit(main())
