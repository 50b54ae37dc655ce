"""A run directory can be moved or copied: paths inside it are stored relative to it, old absolute ones still
resolve, and the embedded MLflow store follows the move (no artifact is written into the old place)."""

import json
import shutil

from hpc.jobs import base_model_dir
from hpc.pipeline import prepare_run
from hpc.recipe import load_recipe
from hpc.rundir import RunDir
from hpc.tracking import Tracker
from tests.conftest import TINY_RECIPE


def test_paths_inside_are_stored_relative_and_old_absolute_ones_still_resolve(tmp_path):
    old, new = RunDir(tmp_path / "a"), RunDir(tmp_path / "b")
    hf = new.root / "stages/model/hf"
    hf.mkdir(parents=True)
    assert new.relative(hf) == "stages/model/hf"
    assert new.relative(tmp_path / "elsewhere") == str(tmp_path / "elsewhere")  # outside: absolute
    (new.root / "stages/model/model.json").write_text(json.dumps({"path": "stages/model/hf"}))
    assert base_model_dir(new) == hf
    # model.json written before paths were relative: the old run directory's absolute path, now gone
    (new.root / "stages/model/model.json").write_text(json.dumps({"path": str(old.root / "stages/model/hf")}))
    assert base_model_dir(new) == hf
    user_model = tmp_path / "models/llama"
    user_model.mkdir(parents=True)
    (new.root / "stages/model/model.json").write_text(json.dumps({"path": str(user_model)}))
    assert base_model_dir(new) == user_model


def test_the_embedded_mlflow_store_follows_a_moved_run_directory(tmp_path):
    recipe = load_recipe(TINY_RECIPE)
    a = RunDir(tmp_path / "a")
    meta = prepare_run(recipe, TINY_RECIPE, a)
    shutil.copytree(a.root, tmp_path / "b")
    shutil.rmtree(a.root)
    b = RunDir(tmp_path / "b")
    assert b.follow_move() == a.root
    assert b.follow_move() is None  # once
    moved = prepare_run(recipe, TINY_RECIPE, b)
    assert moved["parent_run_id"] == meta["parent_run_id"]  # the same MLflow run tree, not a new one
    assert moved["tracking_uri"] == f"sqlite:///{b.root / 'mlflow.db'}"
    tracker = Tracker(moved["tracking_uri"])
    note = tmp_path / "note.txt"
    note.write_text("x")
    tracker.log_artifact(tracker.start_child(moved["parent_run_id"], "sft"), note)
    assert not a.root.exists()  # MLflow wrote nothing into the old place
    assert list((b.root / "mlartifacts").rglob("note.txt"))
    assert tracker.client.get_run(moved["parent_run_id"]).info.artifact_uri.startswith(b.root.as_uri())
