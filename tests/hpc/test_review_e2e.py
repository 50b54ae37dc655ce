"""Issue 13's "done when" on one MLflow sqlite store shared by two real runs of the tiny recipe (shrunk):
run -> v1 promoted by an approver -> a worse variant -> the gate rejects it -> review shows why -> forced
promote records the reason -> rollback restores v1 -> history lists every event."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY_RECIPE

pytestmark = pytest.mark.slow
MODEL = "tiny-sft"
SMALL = [
    "data.sources.0.num_rows=300",
    "stages.0.eval_every=1000",
    "eval.limit=10",
    "eval.include_base=false",
]


def _run(workdir, store, *overrides):
    cmd = [sys.executable, "-m", "hpc.cli", "run", str(TINY_RECIPE), "--workdir", str(workdir)]
    for item in [*SMALL, f"tracking.uri=sqlite:///{store}", *overrides]:
        cmd += ["--set", item]
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)


def _registry(capsys, store, *argv):
    from hpc.cli import main

    code = main(["registry", *argv, "--uri", f"sqlite:///{store}"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_promote_review_force_rollback_history(tmp_path, capsys):
    from mlflow import MlflowClient

    store = tmp_path / "mlflow.db"
    p = _run(tmp_path / "run1", store, "stages.0.max_steps=20", "gate.thresholds={heldout_mc/acc: 0.0}")
    assert p.returncode == 0 and "gate: PASSED" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    code, out, err = _registry(capsys, store, "promote", MODEL, "1", "--comment", "baseline", "--approver", "alice")
    assert code == 0 and f"{MODEL} version 1 is now 'champion'" in out, err

    # the worse variant: one step of training, and a bar it cannot reach
    # (the same run directory: the model and data stages are reused, only training onward reruns)
    p = _run(tmp_path / "run1", store, "stages.0.max_steps=1", "gate.thresholds={heldout_mc/acc: 0.99}")
    assert p.returncode == 3 and "gate: REJECTED" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]

    html = tmp_path / "review.html"
    code, out, err = _registry(capsys, store, "review", MODEL, "2", "--html", str(html))
    assert code == 0, err
    out = " ".join(out.split())  # rich wraps long lines
    assert f"{MODEL} v2 vs v1 (champion) gate: rejected" in out
    assert "FAIL threshold: heldout_mc/acc" in out  # why it was rejected
    assert "- max_steps: 20" in out and "+ max_steps: 1" in out  # the recipe diff says what changed
    assert "bootstrap over 10 examples" in out and "held-out examples (5)" in out
    page = html.read_text()
    assert "FAIL threshold: heldout_mc/acc" in page and "max_steps: 1" in page

    code, out, err = _registry(capsys, store, "promote", MODEL, "2", "--comment", "ship it", "--force")
    assert code == 2 and err.startswith("hpcft: error: registry promote: --force needs --reason"), err
    code, out, err = _registry(
        capsys, store, "promote", MODEL, "2", "--comment", "ship it", "--force", "--reason", "demo tomorrow"
    )
    assert code == 0, err
    code, out, err = _registry(
        capsys, store, "rollback", MODEL, "--reason", "v2 answers nothing", "--approver", "carol"
    )
    assert code == 0 and "rolled back from version 2 to version 1" in out, err

    client = MlflowClient(tracking_uri=f"sqlite:///{store}", registry_uri=f"sqlite:///{store}")
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    v2 = client.get_model_version(MODEL, "2")
    assert v2.tags["approval.forced"] == "true" and v2.tags["approval.force_reason"] == "demo tomorrow"
    artifacts = [f.path for f in client.list_artifacts(v2.run_id, "review")]
    assert artifacts == ["review/review-v2-vs-v1.html"]

    code, out, err = _registry(capsys, store, "history", MODEL, "--json")
    assert code == 0, err
    entries = [json.loads(line) for line in out.splitlines()]
    assert [(e["event"], e["version"]) for e in entries] == [
        ("register", "1"),
        ("promote", "1"),
        ("register", "2"),
        ("force_promote", "2"),
        ("rollback", "1"),
    ]
    assert entries[1]["approver"] == "alice" and entries[1]["comment"] == "baseline"
    assert entries[2]["gate"] == "rejected" and entries[2]["comment"].startswith("FAIL threshold: heldout_mc/acc")
    assert entries[3]["reason"] == "demo tomorrow" and entries[3]["from"] == "1"
    assert (entries[4]["approver"], entries[4]["from"], entries[4]["reason"]) == ("carol", "2", "v2 answers nothing")
    code, out, err = _registry(capsys, store, "history", MODEL)
    assert code == 0 and "demo tomorrow" in out and "v2 answers nothing" in out
