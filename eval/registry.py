"""MLflow registry actions shared by the gate stage and `hpcft registry`: versions of one model name,
tagged with lineage, scores and the gate's verdict, promoted by moving aliases (MLflow 3 has no stages)."""

from __future__ import annotations

import getpass
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

from eval.gate import Verdict

STAGING = "staging"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous_champion"
GATE_TAG = "gate"  # "passed" | "rejected"
GATE_REASONS_TAG = "gate.reasons"
SCORE_PREFIX = "score."
HISTORY_PREFIX = "history."  # registered-model tags history.000001, ...: one JSON event each
REGISTER_EVENT = "register"  # the gate registered a version; promote, force_promote, rollback move champion
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
    failed = next((line for line in verdict.reasons if line.startswith("FAIL")), "")
    entry = {"event": REGISTER_EVENT, "version": version_str, "gate": tags[GATE_TAG], "time": _iso(None)}
    _append_history(client, name, entry | {"comment": failed})
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


def promote(
    client,
    name: str,
    version: str | int,
    *,
    force: bool = False,
    reason: str = "",
    approver: str | None = None,
    comment: str = "",
    now: datetime | None = None,
) -> str | None:
    """Move 'champion' to `version` and 'previous_champion' to the old champion; returns the old one.

    The approval goes into the version's 'approval.*' tags and the model's history. A version the gate
    rejected is promoted only with force=True and a reason. Promoting the champion again changes nothing.
    """
    version = str(version)
    tags = model_version(client, name, version).tags
    forced = tags.get(GATE_TAG) != "passed"
    if forced and not force:
        raise ValueError(
            f"{name} version {version} did not pass the gate "
            f"(gate={tags.get(GATE_TAG, 'unset')}); promote with force to override"
        )
    if forced and not reason.strip():
        raise ValueError(f"{name} version {version} did not pass the gate: a forced promotion needs a reason")
    require_manage(client, name, f"promote {name} version {version}")
    old = _aliases(client, name).get(CHAMPION)
    if old == version:
        return None
    approver = approver or default_approver()
    time = _iso(now)
    approval = {"approval.approver": approver, "approval.time": time, "approval.comment": comment}
    approval |= {"approval.forced": "true", "approval.force_reason": reason} if forced else {"approval.forced": "false"}
    for key, value in approval.items():
        client.set_model_version_tag(name, version, key, value[:_MAX_TAG_VALUE])
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, old)
    client.set_registered_model_alias(name, CHAMPION, version)
    entry = {"event": "force_promote" if forced else "promote", "version": version, "from": old}
    entry |= {"approver": approver, "time": time, "comment": comment}
    _append_history(client, name, entry | ({"reason": reason} if forced else {}))
    return old


def rollback(client, name: str, *, reason: str, approver: str | None = None, now: datetime | None = None) -> str:
    """Move 'champion' back to 'previous_champion' and 'previous_champion' to the champion before that one
    in the history (none left: the alias is removed), so that repeated rollbacks walk back. Returns the
    version that is champion now."""
    if not reason.strip():
        raise ValueError("a rollback needs a reason")
    require_model(client, name)
    aliases = _aliases(client, name)
    current, previous = aliases.get(CHAMPION), aliases.get(PREVIOUS_CHAMPION)
    if current is None or previous is None:
        raise ValueError(
            f"nothing to roll back to: {name} has "
            + ("no champion" if current is None else f"champion version {current} and no previous_champion")
        )
    require_manage(client, name, f"roll back {name}")
    stack = champion_stack(history(client, name))
    if stack and stack[-1] == current:
        stack.pop()
    before = stack[-2] if len(stack) >= 2 and stack[-1] == previous else None
    client.set_registered_model_alias(name, CHAMPION, previous)
    if before is None or before == previous:
        client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    else:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, before)
    approver = approver or default_approver()
    entry = {"event": "rollback", "version": previous, "from": current, "approver": approver, "time": _iso(now)}
    _append_history(client, name, entry | {"reason": reason})
    return previous


def default_approver() -> str:
    """The user a tracking server authenticates ($MLFLOW_TRACKING_USERNAME), else the OS user."""
    return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()


def champion_stack(entries: list[dict]) -> list[str]:
    """The champions in the order they took over, as the history records it: a promotion pushes its
    version, a rollback pops the champion it replaced."""
    stack: list[str] = []
    for entry in entries:
        if entry.get("event") == "rollback":
            if stack:
                stack.pop()
        elif entry.get("event") in ("promote", "force_promote"):
            stack.append(str(entry["version"]))
    return stack


def history(client, name: str) -> list[dict]:
    """The history of `name`, oldest first (registrations by the gate, promotions, rollbacks): each entry's
    JSON with its index as 'index'."""
    tags = client.get_registered_model(name).tags or {}
    out = []
    for key in sorted(k for k in tags if re.fullmatch(re.escape(HISTORY_PREFIX) + r"\d+", k)):
        try:
            entry = json.loads(tags[key])
        except ValueError:
            entry = {"event": "unreadable", "comment": tags[key][:200]}
        out.append({"index": int(key[len(HISTORY_PREFIX) :])} | entry)
    return sorted(out, key=lambda e: e["index"])


def _append_history(client, name: str, entry: dict) -> None:
    """Write `entry` under the next free 'history.NNNNNN' tag; earlier entries are never rewritten."""
    taken = [e["index"] for e in history(client, name)]
    key = f"{HISTORY_PREFIX}{(max(taken) + 1 if taken else 1):06d}"
    text = json.dumps(entry, separators=(",", ":"))
    if len(text) > _MAX_TAG_VALUE:  # a very long comment is cut, the entry stays valid JSON
        cut = {k: v[:500] if isinstance(v, str) else v for k, v in entry.items()}
        text = json.dumps(cut, separators=(",", ":"))
    client.set_registered_model_tag(name, key, text)


def _iso(now: datetime | None) -> str:
    return (now or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat(timespec="seconds")


def require_manage(client, name: str, action: str) -> None:
    """PermissionError when the tracking server checks access (MLflow's basic-auth app) and the user in
    $MLFLOW_TRACKING_USERNAME has less than MANAGE on the registered model `name`. Asked before anything is
    written, so that a refused promotion leaves nothing half-changed. Stores without access control
    (sqlite, a server without the auth app) allow everything."""
    from mlflow.exceptions import MlflowException

    uri = str(getattr(client, "tracking_uri", "") or "")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if not uri.startswith(("http://", "https://")) or not user:
        return
    from mlflow.server.auth.client import AuthServiceClient

    auth = AuthServiceClient(uri)
    try:
        permission = auth.get_user_permission(user, "registered_model", name).permission
    except MlflowException as err:
        if err.get_http_status_code() == 404 or err.error_code == "ENDPOINT_NOT_FOUND":
            return  # a server without the auth app
        raise
    if permission.upper() == "MANAGE" or _is_admin(auth, user):
        return
    raise PermissionError(f"{user} may not {action} (needs MANAGE on the registered model {name})")


def _is_admin(auth, user: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return bool(auth.get_user(user).is_admin)
    except MlflowException:
        return False


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


def champion_model_dir(client, name: str, download_dir: Path) -> tuple[str, Path] | None:
    """(version, model directory) of the champion (see version_model_dir); None without one."""
    version = _aliases(client, name).get(CHAMPION)
    if version is None:
        return None
    return version, version_model_dir(client, name, version, download_dir)


def version_model_dir(client, name: str, version: str, download_dir: Path) -> Path:
    """A version's model files: its run's exported model when that run directory is still there (tag
    hpcft.run_dir), else its 'model' artifact downloaded into `download_dir`."""
    from eval.lineage import RUN_DIR

    mv = client.get_model_version(name, version)
    run_dir = mv.tags.get(RUN_DIR)
    local = Path(run_dir) / "stages" / "export" / "model" if run_dir else None
    if local is not None and (local / "config.json").is_file():
        return local
    download_dir.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(mv.run_id, ARTIFACT_PATH, str(download_dir)))


def champion_version(client, name: str) -> str | None:
    return _aliases(client, name).get(CHAMPION)


STDERR_PREFIX = "stderr."


def champion_evidence(client, name: str, version: str) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """The champion's per-example values (from its run directory, when still there) and its 'stderr.' tags."""
    from eval.evidence import run_values
    from eval.lineage import RUN_DIR

    tags = client.get_model_version(name, version).tags
    run_dir = tags.get(RUN_DIR)
    values = run_values(Path(run_dir)) if run_dir and Path(run_dir).is_dir() else {}
    errors = {k[len(STDERR_PREFIX) :]: float(v) for k, v in tags.items() if k.startswith(STDERR_PREFIX)}
    return values, errors


def tag_stderrs(client, name: str, version: str, errors: dict[str, float]) -> None:
    """'stderr.<task>/<metric>' tags, so a later gate can test a regression against this version."""
    for key, value in errors.items():
        client.set_model_version_tag(name, version, tag_key(STDERR_PREFIX + key), repr(float(value)))


def await_human_review(client, name: str, version: str, gate_cfg, status: str) -> None:
    """Keep the gate section on the version (import-verdicts decides again with it) and mark it
    'pending_review' while gate.require_human waits for side-by-side verdicts."""
    from eval.human import GATE_CONFIG_TAG

    client.set_model_version_tag(name, version, GATE_CONFIG_TAG, gate_cfg.model_dump_json())
    if status == "pending_review":
        client.set_model_version_tag(name, version, GATE_TAG, status)


def set_gate(client, name: str, version: str, verdict: Verdict, status: str) -> None:
    """Record a later gate decision (after human verdicts): tags, and 'staging' when it passed."""
    client.set_model_version_tag(name, version, GATE_TAG, status)
    client.set_model_version_tag(name, version, GATE_REASONS_TAG, "\n".join(verdict.reasons)[:_MAX_TAG_VALUE])
    if verdict.passed:
        client.set_registered_model_alias(name, STAGING, version)
