from hpc.tracking import REDACTED, Tracker, flatten, redact


def test_redact_keys_and_values_but_not_lookalikes():
    cfg = {
        "executor": {
            "env": {
                "HF_TOKEN": "hf_abcdefghijklmnopqrstuvwxyz",
                "WANDB_API_KEY": "x",
                "DB_PASSWORD": "p",
                "NCCL_DEBUG": "INFO",
            }
        },
        "eval": {"max_new_tokens": 24},
        "note": "use sk-abcdefghijklmnopqrstuvwx please",
    }
    out = redact(cfg)
    env = out["executor"]["env"]
    assert env["HF_TOKEN"] == env["WANDB_API_KEY"] == env["DB_PASSWORD"] == REDACTED
    assert env["NCCL_DEBUG"] == "INFO" and out["eval"]["max_new_tokens"] == 24
    assert out["note"] == f"use {REDACTED} please"


def test_params_in_mlflow_are_redacted(tmp_path):
    t = Tracker(f"sqlite:///{tmp_path / 'm.db'}")
    run = t.start_parent(
        "e",
        tmp_path / "art",
        "r",
        {"executor": {"env": {"HF_TOKEN": "hf_secretsecretsecretsecret"}}, "stages": [{"lr": 0.1}]},
        {},
    )
    params = t.client.get_run(run).data.params
    assert params["executor.env.HF_TOKEN"] == REDACTED and params["stages.0.lr"] == "0.1"
    assert "hf_secret" not in str(params)


def test_flatten_lists_of_sections():
    assert flatten({"a": [{"b": 1}], "c": [1, 2]}) == {"a.0.b": "1", "c": "[1, 2]"}


def test_secret_values_under_innocent_keys_are_redacted():
    cfg = {
        "executor": {"setup": ["module load cuda", "export WANDB_API_KEY=0123456789abcdef0123456789abcdef01234567"]},
        "tracking": {"uri": "http://alice:s3cretpw@mlflow.example.com:5000"},
        "headers": ["Authorization: Bearer abcDEF123456ghiJKL7890"],
    }
    out = redact(cfg)
    assert out["executor"]["setup"] == ["module load cuda", f"export WANDB_API_KEY={REDACTED}"]
    assert out["tracking"]["uri"] == f"http://alice:{REDACTED}@mlflow.example.com:5000"
    assert out["headers"] == [f"Authorization: Bearer {REDACTED}"]
    flat = flatten(out)
    assert not any(s in str(flat) for s in ("0123456789abcdef", "s3cretpw", "abcDEF123456"))


# --- tolerant tracking: the replay queue (issue 19) -------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store(tmp_path):
    """A real sqlite MLflow store with a parent run and one child: the runs queued calls name."""
    t = Tracker(f"sqlite:///{tmp_path / 'm.db'}")
    parent = t.start_parent("e", tmp_path / "art", "r", {"a": 1}, {})
    return t, parent, t.start_child(parent, "eval")


def test_tolerant_tracker_never_raises_and_queues_in_order(tmp_path, capsys):
    import json
    import os
    import stat
    import time

    from hpc.tracking import queue_path

    queue = queue_path(tmp_path)
    dead = Tracker(f"http://alice:s3cretpw@127.0.0.1:{free_port()}", queue=queue)
    started = time.monotonic()
    dead.log_metrics("r1", {"acc": 0.5, "flag": True, "name": "x"}, step=3)
    dead.set_tags("r1", {"k": "first"})
    dead.log_params("r1", {"tracking": {"uri": "http://bob:pw123456@h"}})
    dead.set_tags("r1", {"k": "second"})
    dead.log_artifact("r1", tmp_path / "m.json")
    dead.end_run("r1", "KILLED")
    assert time.monotonic() - started < 30  # seconds of MLflow retries for the first call, then none
    calls = [json.loads(line) for line in queue.read_text().splitlines()]
    assert [c["method"] for c in calls] == [
        "log_metrics",
        "set_tags",
        "log_params",
        "set_tags",
        "log_artifact",
        "end_run",
    ]
    assert calls[0]["args"]["metrics"] == {"acc": 0.5} and calls[0]["args"]["step"] == 3
    assert calls[4]["args"]["path"] == str((tmp_path / "m.json").resolve())
    assert "pw123456" not in queue.read_text() and "s3cretpw" not in queue.read_text()
    assert stat.S_IMODE(os.stat(queue).st_mode) == 0o600
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err  # one warning while offline, not one per call
    assert "queued in" in err and "s3cretpw" not in err and "Traceback" not in err


def test_replay_applies_the_queue_in_order_and_truncates_it(tmp_path):
    from hpc.tracking import enqueue, queue_path, replay_queue

    store, parent, child = _store(tmp_path)
    queue = queue_path(tmp_path)
    (tmp_path / "scores.json").write_text("{}")
    enqueue(queue, "log_metrics", child, {"metrics": {"acc": 0.25}, "step": 0, "ts": 1000})
    enqueue(queue, "log_metrics", child, {"metrics": {"acc": 0.75}, "step": 1, "ts": 2000})
    enqueue(queue, "set_tags", child, {"tags": {"k": "first"}})
    enqueue(queue, "set_tags", child, {"tags": {"k": "second"}})
    enqueue(queue, "log_params", child, {"params": {"p": "1"}})
    enqueue(queue, "log_artifact", child, {"path": str(tmp_path / "scores.json"), "artifact_path": None})
    enqueue(queue, "end_run", child, {"status": "FINISHED"})
    assert replay_queue(queue, store) == (7, 0, 0)
    assert queue.read_text() == ""
    run = store.client.get_run(child)
    assert [m.value for m in store.client.get_metric_history(child, "acc")] == [0.25, 0.75]
    assert run.data.tags["k"] == "second" and run.data.params["p"] == "1"  # later calls won
    assert run.info.status == "FINISHED"
    assert [a.path for a in store.client.list_artifacts(child)] == ["scores.json"]
    assert replay_queue(queue, store) == (0, 0, 0)  # nothing twice


def test_replay_keeps_the_queue_while_the_server_is_away_and_drops_rejected_calls(tmp_path, capsys):
    from hpc.tracking import enqueue, queue_path, replay_queue

    queue = queue_path(tmp_path)
    enqueue(queue, "log_metrics", "abc", {"metrics": {"acc": 1.0}, "step": 0, "ts": 1})
    enqueue(queue, "end_run", "abc", {"status": "FAILED"})
    before = queue.read_text()
    dead = Tracker(f"http://127.0.0.1:{free_port()}")
    assert replay_queue(queue, dead) == (0, 0, 2)
    assert queue.read_text() == before
    assert "2 queued tracking call(s) stay" in capsys.readouterr().err
    store, _parent, child = _store(tmp_path)
    queue.write_text("")
    enqueue(queue, "log_metrics", "no-such-run", {"metrics": {"acc": 1.0}, "step": 0, "ts": 1})
    enqueue(queue, "log_metrics", child, {"metrics": {"acc": 0.5}, "step": 0, "ts": 1})
    assert replay_queue(queue, store) == (1, 1, 0)  # a rejected call does not block the rest
    assert store.client.get_run(child).data.metrics == {"acc": 0.5}
    assert "dropped" in capsys.readouterr().err


def test_unreachable_answers_in_seconds_with_one_redacted_line(tmp_path):
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from hpc.tracking import unreachable, unreachable_message

    uri = f"http://alice:s3cretpw@127.0.0.1:{free_port()}"
    started = time.monotonic()
    reason = unreachable(uri)
    assert reason and "refused" in reason.lower() and time.monotonic() - started < 6
    message = unreachable_message(uri, reason)
    assert "\n" not in message and "s3cretpw" not in message
    assert message.startswith("tracking.uri: cannot reach the MLflow server at http://alice:***@127.0.0.1:")
    assert unreachable(f"sqlite:///{tmp_path / 'm.db'}") is None

    class Answer(BaseHTTPRequestHandler):
        status = 404

        def do_GET(self):
            self.send_response(Answer.status)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        up = f"http://127.0.0.1:{server.server_port}"
        assert unreachable(up) is None  # it answers: reachability, not permission
        Answer.status = 503  # a proxy whose MLflow is down
        assert unreachable(up) == "HTTP 503"
    finally:
        server.shutdown()


def test_mlflow_http_retries_are_seconds_and_the_user_can_override(monkeypatch):
    import os

    from hpc.tracking import quiet_env

    for name in (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    quiet_env()
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() <= 3 and MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() <= 1
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 77 and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"


def test_end_run_never_raises_and_opening_a_run_is_one_line(tmp_path, capsys):
    import pytest

    from hpc.tracking import TrackingError

    dead = Tracker(f"http://alice:s3cretpw@127.0.0.1:{free_port()}")  # not tolerant
    dead.end_run("r1", "FAILED")
    assert "could not end the MLflow run r1" in capsys.readouterr().err
    with pytest.raises(TrackingError) as err:
        dead.start_child("p", "eval")
    assert "\n" not in str(err.value) and "s3cretpw" not in str(err.value)
    assert "cannot open the run of stage eval" in str(err.value) and "unreachable" in str(err.value)
    store, _parent, child = _store(tmp_path)
    store.end_run(child, "KILLED")
    assert store.client.get_run(child).info.status == "KILLED"


def test_the_gate_registry_without_mlflow_is_one_line_and_other_errors_stay(tmp_path):
    import pytest

    from hpc.jobs import _registry_needs_mlflow
    from hpc.tracking import TrackingError

    dead = f"http://alice:s3cretpw@127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError) as err:
        with _registry_needs_mlflow(dead):
            raise RuntimeError("API request failed\nMax retries exceeded ...")
    assert str(err.value).startswith("gate: the model registry needs MLflow, and the server at http://alice:***@")
    assert "\n" not in str(err.value) and "s3cretpw" not in str(err.value)
    with pytest.raises(KeyError):  # a reachable store: the registry's own error, unchanged
        with _registry_needs_mlflow(f"sqlite:///{tmp_path / 'm.db'}"):
            raise KeyError("version")


def test_watch_replays_the_queue_of_its_run_directory(tmp_path):
    from rich.console import Console

    from hpc.pipeline import prepare_run, watch
    from hpc.recipe import load_recipe
    from hpc.rundir import RunDir
    from hpc.tracking import enqueue, queue_path
    from tests.conftest import TINY_RECIPE

    rd = RunDir(tmp_path / "run")
    meta = prepare_run(load_recipe(TINY_RECIPE), TINY_RECIPE, rd)  # the run's own sqlite store
    enqueue(queue_path(rd.root), "log_metrics", meta["parent_run_id"], {"metrics": {"acc": 0.5}, "step": 0, "ts": 1})
    tracker = Tracker(meta["tracking_uri"])
    watch(rd, Console(record=True), tracker, once=True)
    assert tracker.client.get_run(meta["parent_run_id"]).data.metrics == {"acc": 0.5}
    assert queue_path(rd.root).read_text() == ""
