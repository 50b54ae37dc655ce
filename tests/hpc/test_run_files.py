"""What a run directory exposes: no secret in clear in run.json, MLflow params or hpcft's own output lines,
a recipe snapshot that still reruns the run (kept private instead of redacted), and permissions that keep
the directory from other users of a shared cluster (0700/0600 unless $HPCFT_UMASK says otherwise)."""

import json
import os
import stat
import sys

import pytest

from hpc.pipeline import prepare_run
from hpc.recipe import load_recipe
from hpc.rundir import PRIVATE_META, RunDir
from tests.conftest import TINY_RECIPE

WANDB = "wandb0123456789abcdefXYZ"
BEARER = "abcDEF0123456789tokenvalue"
HF = "hf_" + "a1B2c3D4e5F6g7H8i9J0k1L2"
PASSWORD = "s3cret-Pa55word"


@pytest.fixture(autouse=True)
def _restore_umask():
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def _secret_recipe(extra=()):
    return load_recipe(
        TINY_RECIPE,
        [
            f"executor.slurm={{setup: ['export WANDB_API_KEY={WANDB}',"
            f" 'curl -H \"Authorization: Bearer {BEARER}\" https://example.org/ping']}}",
            f"executor.env={{HF_TOKEN: {HF}, NCCL_DEBUG: WARN}}",
            *extra,
        ],
    )


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_secrets_stay_out_of_run_json_mlflow_and_output(tmp_path):
    from mlflow.tracking import MlflowClient

    recipe = _secret_recipe()
    rd = RunDir(tmp_path / "run")
    meta = prepare_run(recipe, TINY_RECIPE, rd)
    client = MlflowClient(tracking_uri=meta["tracking_uri"])
    params = json.dumps(client.get_run(meta["parent_run_id"]).data.params)
    shared = [params, (rd.root / "run.json").read_text(), (rd.root / "recipe.redacted.yaml").read_text()]
    for text in shared:
        for secret in (WANDB, BEARER, HF):
            assert secret not in text
    assert "export WANDB_API_KEY=" in params and "NCCL_DEBUG" in params  # redacted values, not whole fields
    # the snapshot reruns the run: every value the jobs need is there, readable by the owner only
    assert rd.load_recipe() == recipe
    assert rd.load_recipe().executor.env["HF_TOKEN"] == HF
    assert _mode(rd.recipe_path) == 0o600


def test_tracking_uri_password_only_in_the_private_file(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.root.mkdir()
    uri = f"https://alice:{PASSWORD}@mlflow.example.org/"
    rd.update_meta(tracking_uri=uri, run_id="abc")
    shown = (rd.root / "run.json").read_text()
    assert PASSWORD not in shown and "https://alice:" in shown and "mlflow.example.org" in shown
    assert rd.read_meta()["tracking_uri"] == uri and rd.read_meta()["run_id"] == "abc"
    assert _mode(rd.root / PRIVATE_META) == 0o600
    rd.update_meta(tracking_uri="sqlite:///x.db")  # a URI without a password: nothing private is left
    assert json.loads((rd.root / PRIVATE_META).read_text()) == {}
    assert rd.read_meta()["tracking_uri"] == "sqlite:///x.db"


def test_pipeline_prints_the_tracking_uri_redacted(tmp_path, monkeypatch):
    import hpc.pipeline as pipeline

    uri = f"https://alice:{PASSWORD}@mlflow.example.org"
    monkeypatch.setattr(pipeline, "prepare_run", lambda *a: {"tracking_uri": uri, "parent_run_id": "p"})
    monkeypatch.setattr(pipeline, "Tracker", lambda u: None)

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(pipeline, "_run_blocking", stop)
    from rich.console import Console

    console = Console(record=True, width=200)
    with pytest.raises(Stop):
        pipeline.run_pipeline(load_recipe(TINY_RECIPE), TINY_RECIPE, tmp_path / "run", console=console)
    out = console.export_text()
    assert "tracking: https://alice:" in out and PASSWORD not in out


def test_sbatch_scripts_keep_setup_secrets_private(tmp_path):
    """The scripts need the recipe's setup lines as written; they are 0600 (submit.sh 0700) in a 0700
    folder, and the CLI's own output shows no secret."""
    from tests.hpc.test_slurm_executor import run_cli

    p = run_cli(
        "sbatch",
        str(TINY_RECIPE),
        "--out",
        str(tmp_path / "sb"),
        "--workdir",
        str(tmp_path / "w"),
        "--set",
        f"executor.slurm={{setup: ['export WANDB_API_KEY={WANDB}']}}",
    )
    assert p.returncode == 0, p.stderr
    assert WANDB not in p.stdout + p.stderr
    sb = tmp_path / "sb"
    assert _mode(sb) == 0o700 and _mode(sb / "submit.sh") == 0o700
    assert WANDB in (sb / "model.sbatch").read_text() and _mode(sb / "model.sbatch") == 0o600
    assert _mode(sb / "recipe.yaml") == 0o600
    assert 'umask "${HPCFT_UMASK:-077}"' in (sb / "submit.sh").read_text()  # jobs' logs: private too


def test_run_directory_is_private_by_default(tmp_path):
    rd = RunDir(tmp_path / "run")
    meta = prepare_run(load_recipe(TINY_RECIPE), TINY_RECIPE, rd)
    assert _mode(rd.root) == 0o700
    db = rd.root / "mlflow.db"
    assert meta["tracking_uri"].endswith(str(db)) and _mode(db) == 0o600
    for name in ("run.json", "recipe.yaml", "recipe.redacted.yaml"):
        assert _mode(rd.root / name) == 0o600, name
    # files a job writes later (stage outputs, logs) are created under the same umask
    probe = rd.stage_dir("model") / "probe"
    probe.parent.mkdir(parents=True)
    probe.write_text("x")
    assert _mode(probe) == 0o600 and _mode(probe.parent) == 0o700


def test_hpcft_umask_configures_the_permissions(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCFT_UMASK", "027")
    rd = RunDir(tmp_path / "run")
    prepare_run(load_recipe(TINY_RECIPE), TINY_RECIPE, rd)
    assert _mode(rd.root) == 0o750 and _mode(rd.root / "mlflow.db") == 0o640
    assert _mode(rd.root / "run.json") == 0o640
    assert _mode(rd.recipe_path) == 0o600  # the snapshot may hold secrets: owner only, always
    monkeypatch.setenv("HPCFT_UMASK", "rw")
    with pytest.raises(ValueError, match="HPCFT_UMASK"):
        prepare_run(load_recipe(TINY_RECIPE), TINY_RECIPE, RunDir(tmp_path / "other"))


def test_jobs_write_under_the_private_umask(tmp_path):
    """A job process (any executor) sets the umask before writing, whatever it inherited: its outputs are
    private too."""
    import subprocess

    from hpc.pipeline import _start_child
    from hpc.tracking import Tracker

    rd = RunDir(tmp_path / "run")
    meta = prepare_run(load_recipe(TINY_RECIPE), TINY_RECIPE, rd)
    _start_child(rd, Tracker(meta["tracking_uri"]), "model")
    code = "import os, sys; os.umask(0o022); from hpc.jobs import run_stage; run_stage(sys.argv[1], 'model', 0)"
    subprocess.run([sys.executable, "-c", code, str(rd.root)], check=True, timeout=300)
    assert _mode(rd.stage_dir("model") / "model.json") == 0o600
    assert _mode(rd.stage_dir("model")) == 0o700 and _mode(rd.stage_dir("model") / "markers/0.done") == 0o600
