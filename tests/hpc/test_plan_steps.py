"""`hpcft plan` on a stage with num_epochs: the steps from the data stage's manifest once it exists."""

import json
import os
import subprocess

from tests.conftest import ROOT, TINY_RECIPE


def test_cli_plan_prints_steps_of_num_epochs(hpcft_cmd, tmp_path):
    def plan() -> str:
        p = subprocess.run(
            hpcft_cmd
            + ["plan", str(TINY_RECIPE), "--workdir", str(tmp_path)]
            + ["--set", "stages.0={kind: sft, num_epochs: 2, batch_size: 32, seq_len: 96, packing: true}"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "COLUMNS": "300"},
        )
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout

    out = plan()
    assert "num_epochs 2 (steps computed from the train split at stage start)" in out
    assert "packing on" in out
    (tmp_path / "stages" / "data").mkdir(parents=True)
    (tmp_path / "stages" / "data" / "manifest.json").write_text(json.dumps({"splits": {"train": 3200}}))
    assert "num_epochs 2: about 200 steps (100 per epoch from the 3200 train rows" in plan()
