"""The RLHF recipe (sft -> reward_model -> ppo) end to end on the embedded default, shortened.

Learning is shown stage by stage in tests/training/; this test proves the chaining: preference rows reach
the reward model, PPO starts from the SFT policy's export and scores with that reward model, the last
policy stage is exported, evaluated, gated and registered, and every stage reports to MLflow.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
RLHF = ROOT / "recipes" / "tiny-rlhf.yaml"
SHORT = [
    "stages.0.max_steps=60",
    "stages.0.eval_every=60",
    "stages.1.max_steps=8",
    "stages.1.eval_every=8",
    "stages.2.max_steps=2",
    "stages.2.batch_size=16",
    "stages.2.eval_every=2",
    "stages.2.eval_prompts=16",
    "data.sources.0.num_rows=1200",
    "data.sources.1.num_rows=500",
    "eval.limit=24",
    "eval.include_base=false",
    "gate.thresholds={heldout_exact/exact_match: 0.0}",
    "gate.min_gain_over_base=0.0",
]


@pytest.fixture(scope="module")
def rlhf_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rlhf") / "run"
    cmd = [sys.executable, "-m", "hpc.cli", "run", str(RLHF), "--workdir", str(workdir)]
    for item in SHORT:
        cmd += ["--set", item]
    p = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200, env={**os.environ, "COLUMNS": "160"}
    )
    return p, workdir


def test_stages_chain_and_the_last_policy_is_gated(rlhf_run):
    p, workdir = rlhf_run
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for stage in ("model", "data", "sft", "reward_model", "ppo", "export", "eval", "gate"):
        assert f"{stage}: finished" in p.stdout, stage
    stages = workdir / "stages"
    manifest = json.loads((stages / "data" / "manifest.json").read_text())
    assert manifest["preference"]["splits"]["train"] > 0 and manifest["splits"]["train"] > 0
    rm = json.loads((stages / "reward_model" / "result.json").read_text())
    assert rm["data"]["train"]["pairs"] == manifest["preference"]["splits"]["train"]
    # the reward model and PPO both start from the SFT policy's merged export
    for stage in ("reward_model", "ppo"):
        assert (stages / stage / "start_model" / "model.safetensors").is_file()
    ppo = json.loads((stages / "ppo" / "result.json").read_text())
    assert ppo["reward"].startswith("model:") and ppo["critic_init"] == "reward_model"
    export = json.loads((stages / "export" / "result.json").read_text())
    assert export["max_abs_logit_diff"] < 1e-4
    gate = json.loads((stages / "gate" / "result.json").read_text())
    assert gate["passed"] and gate["registered_model"] == "tiny-rlhf"


def test_every_stage_reports_to_mlflow(rlhf_run):
    from mlflow.tracking import MlflowClient

    _, workdir = rlhf_run
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    meta = json.loads((workdir / "run.json").read_text())
    parent = client.get_run(meta["parent_run_id"])
    children = {
        r.info.run_name: r
        for r in client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    }
    assert {"sft", "reward_model", "ppo"} <= set(children)
    assert client.get_metric_history(children["reward_model"].info.run_id, "val_accuracy")
    for metric in ("score", "kl", "clip_fraction", "value_loss", "entropy", "response_length"):
        assert client.get_metric_history(children["ppo"].info.run_id, metric), metric
