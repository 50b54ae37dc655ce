import json
import re
import subprocess

import pytest

from eval import lineage


def _git(cwd, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd, check=True, capture_output=True
    )


def test_git_commit_outside_repo_is_unknown(tmp_path):
    assert lineage.git_commit(tmp_path) == "unknown"
    assert lineage.git_dirty(tmp_path) is None


def test_git_commit_and_dirty_in_repo(tmp_path):
    (tmp_path / "a.txt").write_text("1")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "one")
    commit = lineage.git_commit(tmp_path / "a.txt")
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    assert lineage.git_dirty(tmp_path) is False
    (tmp_path / "a.txt").write_text("2")
    assert lineage.git_dirty(tmp_path) is True


def _tree(root, files):
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return root


def test_hash_dir_depends_on_paths_and_contents(tmp_path):
    a = lineage.hash_dir(_tree(tmp_path / "a", {"x": b"12", "sub/y": b"3"}))
    assert a == lineage.hash_dir(_tree(tmp_path / "b", {"sub/y": b"3", "x": b"12"}))
    assert a != lineage.hash_dir(_tree(tmp_path / "c", {"x": b"12", "sub/y": b"4"}))
    assert a != lineage.hash_dir(_tree(tmp_path / "d", {"x": b"12", "sub/z": b"3"}))
    # Bytes moved from one file to the next must not collide.
    assert a != lineage.hash_dir(_tree(tmp_path / "e", {"x": b"1", "sub/y": b"23"}))
    with pytest.raises(ValueError):
        lineage.hash_dir(tmp_path / "missing")


def test_hash_model_dir_covers_weights_and_config_only(tmp_path):
    files = {"config.json": b"{}", "model.safetensors": b"w", "tokenizer.json": b"t", "README.md": b"r"}
    base = lineage.hash_dir(_tree(tmp_path / "m1", files))
    assert base == lineage.hash_dir(_tree(tmp_path / "m2", {**files, "README.md": b"other"}))
    assert base != lineage.hash_dir(_tree(tmp_path / "m3", {**files, "model.safetensors": b"W"}))
    assert base != lineage.hash_dir(_tree(tmp_path / "m4", {**files, "config.json": b'{"a": 1}'}))


def test_collect(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"rows": 3}))
    model = _tree(tmp_path / "m", {"config.json": b"{}", "model.safetensors": b"w"})
    tags = lineage.collect(
        recipe_hash="r1",
        repo_dir=tmp_path,
        data_dir=data,
        base_model_dir=model,
        model_dir=model,
        extra={lineage.RUN_DIR: tmp_path},
    )
    assert tags[lineage.RECIPE_HASH] == "r1" and tags[lineage.GIT_COMMIT] == "unknown"
    assert tags[lineage.DATA_MANIFEST_HASH] == lineage.hash_file(data / "manifest.json")
    assert tags[lineage.BASE_MODEL_HASH] == tags[lineage.MODEL_HASH] == lineage.hash_dir(model)
    assert tags[lineage.RUN_DIR] == str(tmp_path)
    assert set(tags) <= set(lineage.TAGS)
