"""`hpcft registry` against a real `mlflow server --app-name basic-auth` (issue 13): a READ user lists,
reviews and reads the history; promote and rollback need MANAGE on the registered model, a refusal is one
line (exit 2) and leaves nothing changed. Credentials come only from MLFLOW_TRACKING_USERNAME/PASSWORD."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from eval import registry
from tests.eval.review_helpers import register, tiny_model_dir, write_run_dir
from tests.eval.test_review import GOOD, WORSE
from tests.hpc.test_tracking import free_port

pytestmark = pytest.mark.slow
NAME = "shared-model"
ADMIN = ("admin", "Adm1n-s3cret-pw")
USERS = {"reader": "Read3r-s3cret-pw", "approver": "Appr0ver-s3cret-pw"}


def _start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    ini = root / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # without the cache every request pays a PBKDF2 password check (most of this test's time)
        "auth_cache_ttl_seconds = 60\n"
    )
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-csrf-key"}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth"]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "art")]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(root / "server.log", "a")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=log, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return proc, uri
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("mlflow server did not start: " + (root / "server.log").read_text()[-3000:])


def _as(user: str, password: str) -> None:
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user, password


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server, users 'reader' (READ) and 'approver' (MANAGE) on NAME, and two versions that passed."""
    from mlflow import MlflowClient
    from mlflow.server.auth.client import AuthServiceClient

    root = tmp_path_factory.mktemp("auth-server")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    proc, uri = _start_server(root)
    try:
        _as(*ADMIN)
        client, auth = MlflowClient(uri, uri), AuthServiceClient(uri)
        experiment = client.create_experiment("shared")
        model_dir = tiny_model_dir(root / "model")
        for i, recipe in enumerate((GOOD, WORSE)):
            register(client, experiment, NAME, write_run_dir(root / f"run{i}", **recipe), model_dir, passed=True)
        for user, password in USERS.items():
            auth.create_user(user, password)
            auth.grant_user_permission(user, "experiment", experiment, "READ")
        auth.grant_user_permission("reader", "registered_model", NAME, "READ")
        auth.grant_user_permission("approver", "registered_model", NAME, "MANAGE")
        yield uri, client
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _state(client):
    _as(*ADMIN)
    model = client.get_registered_model(NAME)
    versions = {v: dict(client.get_model_version(NAME, v).tags) for v in ("1", "2")}
    return {k: str(v) for k, v in model.aliases.items()}, dict(model.tags), versions


def _cli(capsys, uri, *argv):
    from hpc.cli import main

    code = main(["registry", *argv, "--uri", uri])
    out = capsys.readouterr()
    for secret in (ADMIN[1], *USERS.values()):
        assert secret not in out.out + out.err
    return code, out


def test_a_reader_lists_reviews_and_reads_history_but_may_not_promote(server, capsys):
    uri, client = server
    before = _state(client)
    _as("reader", USERS["reader"])
    code, out = _cli(capsys, uri, "list", NAME)
    assert code == 0 and "staging" in out.out, out
    code, out = _cli(capsys, uri, "review", NAME, "2", "--against", "1")
    assert code == 0 and "-0.500" in out.out and "v2 vs v1" in out.out, out
    assert "the HTML report was not logged to MLflow" in " ".join(out.out.split())  # READ cannot write to the run
    code, out = _cli(capsys, uri, "history", NAME)
    assert code == 0 and out.out.count("register") == 2 and "gate passed" in out.out
    code, out = _cli(capsys, uri, "promote", NAME, "1", "--comment", "looks fine")
    assert code == 2 and out.out == ""
    assert out.err == (
        f"hpcft: error: registry promote: reader may not promote {NAME} version 1"
        f" (needs MANAGE on the registered model {NAME})\n"
    )
    assert _state(client) == before  # nothing half-changed: no alias, no approval tag, no history entry


def test_an_approver_promotes_and_rolls_back_and_a_reader_may_not_roll_back(server, capsys):
    uri, client = server
    _as("approver", USERS["approver"])
    assert _cli(capsys, uri, "promote", NAME, "1", "--comment", "baseline")[0] == 0
    code, out = _cli(capsys, uri, "promote", NAME, "2", "--comment", "better data")
    assert code == 0 and "previous_champion: version 1" in out.out
    aliases, _, versions = _state(client)
    assert (aliases["champion"], aliases["previous_champion"]) == ("2", "1")
    assert versions["2"]["approval.approver"] == "approver" and versions["2"]["approval.comment"] == "better data"

    before = _state(client)
    _as("reader", USERS["reader"])
    code, out = _cli(capsys, uri, "rollback", NAME, "--reason", "I think it regressed")
    assert code == 2 and out.err == (
        f"hpcft: error: registry rollback: reader may not roll back {NAME}"
        f" (needs MANAGE on the registered model {NAME})\n"
    )
    assert _state(client) == before

    _as("approver", USERS["approver"])
    code, out = _cli(capsys, uri, "rollback", NAME, "--reason", "v2 regressed on long prompts")
    assert code == 0 and "from version 2 to version 1" in out.out
    assert _state(client)[0]["champion"] == "1"
    _as("reader", USERS["reader"])
    entries = [e for e in registry.history(client, NAME) if e["event"] != "register"]
    assert [(e["event"], e["version"], e["approver"]) for e in entries] == [
        ("promote", "1", "approver"),
        ("promote", "2", "approver"),
        ("rollback", "1", "approver"),
    ]
    assert entries[-1]["reason"] == "v2 regressed on long prompts"
