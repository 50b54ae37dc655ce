"""MLflow registry actions shared by the gate stage and `hpcft registry`: versions of one model name,
tagged with lineage, scores and the gate's verdict, promoted by moving aliases (MLflow 3 has no stages)."""

from __future__ import annotations

import re
from pathlib import Path

from eval.gate import Verdict

STAGING = "staging"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous_champion"
GATE_TAG = "gate"  # "passed" | "rejected"
GATE_REASONS_TAG = "gate.reasons"
SCORE_PREFIX = "score."
ARTIFACT_PATH = "model"
_MAX_TAG_VALUE = 5000  # MLflow allows more for version tags; the UI and servers do better with less


def tag_key(key: str) -> str:
    """`key` made into a valid MLflow tag key: only letters, digits, '_', '-', '.', ' ' and '/' between
    non-empty path parts (MLflow treats keys as paths; ':' is rejected on Windows servers)."""
    key = re.sub(r"[^\w.\- /]", "_", key)
    return "/".join(part for part in key.split("/") if part not in ("", ".", ".."))


def register_candidate(
    client,
    name: str,
    model_dir: Path,
    run_id: str,
    scores: dict[str, float],
    verdict: Verdict,
    lineage: dict[str, str],
    model_id: str | None = None,
) -> str:
    """Register a new version of `name`: the LoggedModel `model_id` (eval.mlflow_model, the version then
    links to it in the UI), or else `model_dir` logged under run `run_id` as the plain folder 'model'.

    Tags: lineage, 'score.<task>/<metric>' per score, 'gate' and 'gate.reasons'; alias 'staging' when
    the verdict passed. Returns the version as a string.
    """
    if model_id is None:
        _log_model_dir(client, Path(model_dir), run_id)
    _ensure_registered_model(client, name)
    tags = {tag_key(k): str(v) for k, v in lineage.items()}
    tags.update({tag_key(SCORE_PREFIX + k): repr(float(v)) for k, v in scores.items()})
    tags[GATE_TAG] = "passed" if verdict.passed else "rejected"
    tags[GATE_REASONS_TAG] = "\n".join(verdict.reasons)[:_MAX_TAG_VALUE]
    if model_id is None:
        source = f"runs:/{run_id}/{ARTIFACT_PATH}"
        version = client.create_model_version(name=name, source=source, run_id=run_id, tags=tags)
    else:
        version = _version_of_logged_model(client, name, model_id, run_id, tags)
    version_str = str(version.version)
    if verdict.passed:
        client.set_registered_model_alias(name, STAGING, version_str)
    return version_str


def _version_of_logged_model(client, name: str, model_id: str, run_id: str, tags: dict[str, str]):
    """A version whose source is `models:/<model_id>` (the UI's "Source model" link) and which the model's
    `mlflow.modelVersions` tag lists (the model's page links back), as mlflow.register_model does."""
    import json

    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    # MLflow's sqlite registry looks the model up through the process-wide tracking URI, not this client's.
    with _use_tracking_uri(client._tracking_client.tracking_uri):
        version = client.create_model_version(
            name=name, source=f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id
        )
    listed = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    listed.append({"name": name, "version": str(version.version)})
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed)})
    return version


def _log_model_dir(client, model_dir: Path, run_id: str) -> None:
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir}: model directory does not exist")
    # A rerun of the gate stage must not upload the weights twice.
    if client.list_artifacts(run_id, ARTIFACT_PATH):
        return
    client.log_artifacts(run_id, str(model_dir), ARTIFACT_PATH)


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name)


def _aliases(client, name: str) -> dict[str, str]:
    """{alias: version}; empty when the model is not registered."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def scores_of(tags: dict[str, str]) -> dict[str, float]:
    """{'<task>/<metric>': value} from a version's 'score.' tags."""
    return {k[len(SCORE_PREFIX) :]: float(v) for k, v in tags.items() if k.startswith(SCORE_PREFIX)}


def champion_scores(client, name: str) -> tuple[str, dict[str, float]] | None:
    """(version, scores) of the version holding alias 'champion'; None when there is none."""
    version = _aliases(client, name).get(CHAMPION)
    if version is None:
        return None
    return version, scores_of(client.get_model_version(name, version).tags)


def promote(client, name: str, version: str | int, *, force: bool = False) -> str | None:
    """Move 'champion' to `version` and 'previous_champion' to the old champion; returns the old one.

    A version the gate rejected is promoted only with force=True.
    """
    version = str(version)
    tags = model_version(client, name, version).tags
    if tags.get(GATE_TAG) != "passed" and not force:
        raise ValueError(
            f"{name} version {version} did not pass the gate "
            f"(gate={tags.get(GATE_TAG, 'unset')}); promote with force to override"
        )
    old = _aliases(client, name).get(CHAMPION)
    if old is not None and old != version:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, old)
    client.set_registered_model_alias(name, CHAMPION, version)
    return old if old != version else None


def require_model(client, name: str) -> None:
    """ValueError naming the registered models there are when `name` is not one of them."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    known = sorted(m.name for m in client.search_registered_models(max_results=50))
    raise ValueError(f"no registered model {name!r}" + (f"; registered: {', '.join(known)}" if known else ""))


def model_version(client, name: str, version: str):
    """The ModelVersion; ValueError naming the versions there are when `name` has no `version`."""
    from mlflow.exceptions import MlflowException

    require_model(client, name)
    try:
        return client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    versions = [row["version"] for row in list_versions(client, name)]
    raise ValueError(f"{name} has no version {version!r}; versions: {', '.join(versions) or 'none'}")


def list_versions(client, name: str) -> list[dict]:
    """All versions of `name`, oldest first: version, aliases, gate, scores, run_id, source, created, tags."""
    by_version: dict[str, list[str]] = {}
    for alias, version in _aliases(client, name).items():
        by_version.setdefault(version, []).append(alias)
    rows = []
    for mv in _search_versions(client, name):
        version = str(mv.version)
        rows.append(
            {
                "version": version,
                "aliases": sorted(by_version.get(version, [])),
                "gate": mv.tags.get(GATE_TAG),
                "scores": scores_of(mv.tags),
                "run_id": mv.run_id,
                "source": mv.source,
                "created": mv.creation_timestamp,
                "tags": dict(mv.tags),
            }
        )
    return sorted(rows, key=lambda row: int(row["version"]))


def _search_versions(client, name: str) -> list:
    escaped = name.replace("'", "\\'")
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{escaped}'", page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions
