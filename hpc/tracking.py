"""MLflow tracking for a pipeline: one parent run, one child run per stage, secrets redacted."""

from __future__ import annotations

import os
from pathlib import Path

from data_tools import secrets

REDACTED = "***"


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
    }.items():
        os.environ.setdefault(k, v)


def resolve_uri(configured: str | None, run_root: Path) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_root) / 'mlflow.db'}"


class Tracker:
    """Thin wrapper over MlflowClient so that stage jobs on any node log into one run tree."""

    def __init__(self, uri: str):
        quiet_env()
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def experiment_id(self, name: str, artifact_root: Path) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        # A sqlite store would put artifacts under ./mlruns of whatever directory the job runs in.
        location = Path(artifact_root).resolve().as_uri() if self.uri.startswith("sqlite:") else None
        return self.client.create_experiment(name, artifact_location=location)

    def start_parent(self, experiment: str, artifact_root: Path, run_name: str, params: dict, tags: dict) -> str:
        run = self.client.create_run(self.experiment_id(experiment, artifact_root), run_name=run_name, tags=tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def start_child(self, parent_id: str, stage: str) -> str:
        parent = self.client.get_run(parent_id)
        run = self.client.create_run(
            parent.info.experiment_id, run_name=stage, tags={"mlflow.parentRunId": parent_id, "hpcft.stage": stage}
        )
        return run.info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        flat = flatten(redact(params))
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict, step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(k, float(v), ts, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def set_tags(self, run_id: str, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def finish(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")
