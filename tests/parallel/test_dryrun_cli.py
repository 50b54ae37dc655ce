"""`hpcft plan --dry-run-layout`: the recipe's layout laid out for real (meta device, fake process group)."""

import json
import os
import subprocess

from parallel.dryrun import SHAPES
from tests.conftest import ROOT, TINY_RECIPE

LAYOUT = ["--set", "parallel.tp=2", "--set", "parallel.pp=2", "--set", "parallel.dp_shard=2"]
LAYOUT += ["--set", "parallel.zero=3", "--set", "parallel.microbatches=2"]


def _plan(hpcft_cmd, tmp_path, *args):
    return subprocess.run(
        hpcft_cmd + ["plan", str(TINY_RECIPE), "--workdir", str(tmp_path / "run"), *LAYOUT, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "300"},
    )


def test_dry_run_of_the_recipe_layout_and_of_a_refused_model(hpcft_cmd, tmp_path):
    p = _plan(hpcft_cmd, tmp_path, "--dry-run-layout")
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout[p.stdout.index("dry run, stage sft (full) of the base model") :]
    assert "dp_shard=2 pp=2 tp=2 zero=3 (8 ranks)" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("first", "last"))]
    assert [(r[0], r[1], r[2], r[-1]) for r in rows] == [("first", "0", "0", "OK"), ("last", "4", "1", "OK")]

    one_kv_head = tmp_path / "model"
    one_kv_head.mkdir()
    (one_kv_head / "config.json").write_text(json.dumps(dict(SHAPES["llama-3-8b"], num_key_value_heads=1)))
    p = _plan(hpcft_cmd, tmp_path, "--dry-run-layout", str(one_kv_head))
    assert p.returncode == 2
    assert "refused: parallel.tp: 2 must divide the model's 32 attention heads and 1 KV heads" in p.stdout
