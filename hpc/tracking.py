"""MLflow tracking for a pipeline: one parent run, one child run per stage, secrets redacted.

Tracking never costs work: a tolerant Tracker (the one stage jobs and the CLI use) appends a call MLflow did
not take to the run directory's replay queue (`tracking-queue.jsonl`) with a one-line warning instead of
raising, and the next `hpcft run`/`watch` of that run directory replays the queue in order (replay_queue).
An unreachable http(s) server is found in seconds (unreachable(), MLflow's HTTP retries cut in quiet_env)."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from data_tools import secrets
from hpc.recipe import RecipeError

REDACTED = "***"
QUEUE_NAME = "tracking-queue.jsonl"
PROBE_TIMEOUT_S = 5.0
OFFLINE_S = 60.0  # after a failed call, a tolerant Tracker queues without trying for this long
STATUSES = ("FINISHED", "FAILED", "KILLED")
# The kind MLflow 3's UI reads to open an experiment on its runs (machine learning), not GenAI traces.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


class TrackingError(RecipeError):
    """MLflow could not do something hpcft cannot queue (open a run, register a model): one line, redacted.
    A RecipeError so that the CLI prints it as one line (exit 2) wherever it is not caught sooner."""

    def __init__(self, message: str):
        super().__init__([message])
        self.message = message


def one_line(err: BaseException | str, limit: int = 300) -> str:
    """The first line of an error, secrets (a URI's password) redacted, at most `limit` characters."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = secrets.redact_text(text, REDACTED)[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown_uri(uri: str) -> str:
    return secrets.redact_text(uri, REDACTED)[0]


def unreachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the http(s) MLflow server at `uri` cannot be reached (one line), or None when it answers (any
    HTTP status below 500 counts: reachability, not permission) or `uri` is not http(s). Plain urllib with
    one short timeout: MLflow's own retry loop is not involved."""
    import urllib.error
    import urllib.parse
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return None
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{parts.port}" if parts.port else ""
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    context = None
    if url.startswith("https://"):  # the TLS settings MLflow's client would use
        import ssl

        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("true", "1"):
            context = ssl._create_unverified_context()
        elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            context = ssl.create_default_context(cafile=os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"])
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context):
            return None
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}" if err.code >= 500 else None
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            return f"no answer in {timeout:g} s"
        return one_line(reason if str(reason) else err)
    except TimeoutError:
        return f"no answer in {timeout:g} s"
    except (OSError, ValueError) as err:
        return one_line(err)


def unreachable_message(uri: str, reason: str) -> str:
    return (
        f"tracking.uri: cannot reach the MLflow server at {shown_uri(uri)} ({reason}); start it, or unset"
        " tracking.uri to use the run's own sqlite store"
    )


def queue_path(run_root: Path) -> Path:
    """The run directory's replay queue of tracking calls MLflow did not take."""
    return Path(run_root) / QUEUE_NAME


def redact(obj, key: str = ""):
    """A copy of `obj` with values under secret-looking keys, and secrets inside any string (a `setup:`
    line `export WANDB_API_KEY=...`, a URL's password, a bearer token), replaced: data_tools.secrets."""
    return secrets.redact(obj, REDACTED, key)


def flatten(obj, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out |= flatten(v, f"{prefix}{k}.")
    elif isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        for i, v in enumerate(obj):
            out |= flatten(v, f"{prefix}{i}.")
    else:
        out[prefix.rstrip(".")] = str(obj)[:500]
    return out


def quiet_env() -> None:
    """Environment every hpcft process sets: offline hubs, no telemetry, no tqdm carriage returns."""
    for k, v in {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "TQDM_DISABLE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "GIT_PYTHON_REFRESH": "quiet",
        # MLflow's defaults retry a dead server for about 4 minutes per call (7 retries, backoff 2 s,
        # timeout 120 s); hpcft queues what fails (Tracker), so seconds are enough
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
        # ending a run on a server prints its web address, password included (`http://user:pw@host`)
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    }.items():
        os.environ.setdefault(k, v)


def resolve_uri(configured: str | None, run_root: Path) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_root) / 'mlflow.db'}"


class Tracker:
    """Thin wrapper over MlflowClient so that stage jobs on any node log into one run tree.

    With `queue` (a run directory's queue_path) the Tracker is tolerant: log_params, log_metrics, set_tags,
    log_artifact and end_run never raise; a call MLflow does not take (after its short HTTP retries) is
    appended to the queue with one warning line on stderr, and for OFFLINE_S afterwards calls are queued
    without trying. Opening runs (start_parent, start_child) cannot be queued: they raise TrackingError."""

    def __init__(self, uri: str, queue: Path | None = None):
        quiet_env()
        import logging

        from mlflow.tracking import MlflowClient

        # MLflow's sqlite store logs every database error with its whole traceback before raising it; hpcft
        # reports (or queues) the error it raises in one line, so that log would only bury the report.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations of a new store: noise
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.queue = Path(queue) if queue is not None else None
        self._offline_until = 0.0

    def tolerant(self, queue: Path) -> Tracker:
        """This Tracker, queueing failed calls in `queue` from now on."""
        self.queue = Path(queue)
        return self

    def experiment_id(self, name: str, artifact_root: Path) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            # A sqlite store would put artifacts under ./mlruns of whatever directory the job runs in.
            location = Path(artifact_root).resolve().as_uri() if self.uri.startswith("sqlite:") else None
            return self.client.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        if EXPERIMENT_KIND_TAG not in exp.tags:  # an experiment an older hpcft (or someone else) created
            self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id

    def start_parent(self, experiment: str, artifact_root: Path, run_name: str, params: dict, tags: dict) -> str:
        try:
            run = self.client.create_run(self.experiment_id(experiment, artifact_root), run_name=run_name, tags=tags)
        except Exception as err:  # noqa: BLE001 - whatever MLflow raised, the user gets one line
            raise TrackingError(self._cannot("open the parent run", err)) from None
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def start_child(self, parent_id: str, stage: str, params: dict | None = None) -> str:
        """A child run of `parent_id` named after the stage, with the stage's own config as its params."""
        try:
            parent = self.client.get_run(parent_id)
            run = self.client.create_run(
                parent.info.experiment_id,
                run_name=stage,
                tags={"mlflow.parentRunId": parent_id, "hpcft.stage": stage},
            )
        except Exception as err:  # noqa: BLE001
            raise TrackingError(self._cannot(f"open the run of stage {stage}", err)) from None
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def _cannot(self, what: str, err: BaseException) -> str:
        reason = unreachable(self.uri)
        if reason:
            return f"tracking: cannot {what}: the MLflow server at {shown_uri(self.uri)} is unreachable ({reason})"
        return f"tracking: cannot {what} in MLflow at {shown_uri(self.uri)}: {one_line(err)}"

    def log_params(self, run_id: str, params: dict) -> None:
        self._call("log_params", run_id, {"params": flatten(redact(params))})

    def log_metrics(self, run_id: str, metrics: dict, step: int | None = None) -> None:
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self._call("log_metrics", run_id, {"metrics": values, "step": step or 0, "ts": int(time.time() * 1000)})

    def set_tags(self, run_id: str, tags: dict) -> None:
        self._call("set_tags", run_id, {"tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", run_id, {"path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_dataset(self, run_id: str, dataset: dict, context: str = "training") -> None:
        """A dataset input of the run (MLflow's lineage: model -> run -> dataset). `dataset`: name, digest
        (at most 36 characters, MLflow's limit), source (a path or URI) and profile (a dict)."""
        self._call("log_dataset", run_id, {"dataset": dataset, "context": context})

    def finish(self, run_id: str, ok: bool = True) -> None:
        self.end_run(run_id, "FINISHED" if ok else "FAILED")

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """End an MLflow run FINISHED, FAILED or KILLED. Never raises: tolerant, a failure is queued;
        otherwise it is one warning line on stderr."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r}: one of {', '.join(STATUSES)}")
        try:
            self._call("end_run", run_id, {"status": status})
        except Exception as err:  # noqa: BLE001 - ending a run must not hide what the caller is reporting
            warn(f"could not end the MLflow run {run_id} ({status}): {one_line(err)}")

    def _call(self, method: str, run_id: str, args: dict) -> None:
        if self.queue is None:
            return self.apply(method, run_id, args)
        if time.monotonic() < self._offline_until:
            return enqueue(self.queue, method, run_id, args)
        try:
            self.apply(method, run_id, args)
        except Exception as err:  # noqa: BLE001 - tracking never costs work: any failure is queued
            self._offline_until = time.monotonic() + OFFLINE_S
            enqueue(self.queue, method, run_id, args)
            reason = unreachable(self.uri)
            reason = f"unreachable: {reason}" if reason else one_line(err)
            warn(
                f"MLflow at {shown_uri(self.uri)} did not take {method} for run {run_id} ({reason});"
                f" queued in {self.queue}, replayed by the next `hpcft run` or `hpcft watch` of this run directory"
            )

    def apply(self, method: str, run_id: str, args: dict) -> None:
        """Do one tracking call as recorded in the queue: method name, run id, JSON arguments."""
        from mlflow.entities import Metric, Param, RunTag

        if method == "log_params":
            items = [Param(k, v) for k, v in args["params"].items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[i : i + 100])
        elif method == "log_metrics":
            items = [Metric(k, v, args["ts"], args["step"]) for k, v in args["metrics"].items()]
            self.client.log_batch(run_id, metrics=items)
        elif method == "set_tags":
            items = [RunTag(k, v) for k, v in args["tags"].items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, tags=items[i : i + 100])
        elif method == "log_artifact":
            path = Path(args["path"])
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), args["artifact_path"])
            else:
                self.client.log_artifact(run_id, str(path), args["artifact_path"])
        elif method == "log_dataset":
            from mlflow.entities import Dataset, DatasetInput, InputTag

            d = args["dataset"]
            dataset = Dataset(
                name=d["name"],
                digest=d["digest"],
                source_type="local",
                source=json.dumps({"uri": d["source"]}),
                profile=json.dumps(d.get("profile") or {}),
            )
            context = InputTag("mlflow.data.context", args["context"])
            self.client.log_inputs(run_id, [DatasetInput(dataset, [context])])
        elif method == "end_run":
            self.client.set_terminated(run_id, args["status"])
        else:
            raise ValueError(f"unknown tracking call {method!r}")


SYSTEM_METRICS_S = 10.0


def wants_system_metrics(setting: str) -> bool:
    """tracking.system_metrics: on, off, or auto (on where CUDA is present: on CPU the samples add nothing
    that the stage's own peak memory does not say)."""
    if setting == "auto":
        import torch

        return torch.cuda.is_available()
    return setting == "on"


@contextmanager
def system_metrics(tracker: Tracker, run_id: str, setting: str, *, interval: float = SYSTEM_METRICS_S):
    """MLflow's system metrics monitor sampling into run_id while the block runs (wants_system_metrics), or
    nothing; one warning line, not a failure, when it cannot start (e.g. psutil missing)."""
    monitor = None
    if wants_system_metrics(setting):
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=tracker.uri)
            monitor.start()
        except Exception as err:  # noqa: BLE001 - a missing sampler never stops training
            warn(f"tracking: no system metrics: {one_line(err)}")
            monitor = None
    try:
        yield monitor
    finally:
        if monitor is not None:
            monitor.finish()


def warn(message: str) -> None:
    print(f"hpcft: {message}", file=sys.stderr, flush=True)


def enqueue(queue: Path, method: str, run_id: str, args: dict) -> None:
    """Append one call to the replay queue (0600; one write under an exclusive lock, so the array jobs of a
    stage can share the file)."""
    import fcntl

    line = json.dumps({"method": method, "run_id": run_id, "args": args}, default=str) + "\n"
    fd = os.open(queue, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line.encode())
    finally:
        os.close(fd)  # releases the lock


def replay_queue(queue: Path, tracker: Tracker) -> tuple[int, int, int]:
    """Replay the queued calls in order and truncate the queue: (replayed, dropped, left). A call that fails
    while the server is unreachable stops the replay, and it and the calls after it stay queued; one that
    fails against a reachable server (MLflow rejects it, e.g. the run was deleted) is dropped with a
    warning, so that it cannot block the queue for ever."""
    import fcntl

    queue = Path(queue)
    if not queue.is_file() or queue.stat().st_size == 0:
        return 0, 0, 0
    replayed = dropped = 0
    with open(queue, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        lines = [line for line in f.read().splitlines() if line.strip()]
        left: list[str] = []
        for n, line in enumerate(lines):
            try:
                call = json.loads(line)
                tracker.apply(call["method"], call["run_id"], call["args"])
            except Exception as err:  # noqa: BLE001
                reason = unreachable(tracker.uri)
                if reason:
                    left = lines[n:]
                    warn(
                        f"{unreachable_message(tracker.uri, reason).split(': ', 1)[1].split(';')[0]};"
                        f" {len(left)} queued tracking call(s) stay in {queue}"
                    )
                    break
                dropped += 1
                warn(f"MLflow rejected a queued tracking call ({one_line(line, 120)}): {one_line(err)}; dropped")
                continue
            replayed += 1
        f.seek(0)
        f.truncate()
        f.write("".join(line + "\n" for line in left))
    return replayed, dropped, len(left)
