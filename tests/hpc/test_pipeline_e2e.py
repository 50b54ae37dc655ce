"""The tiny recipe end to end on the embedded default: real datatrove, training, lm-eval, MLflow."""

import json
import os
import subprocess
import time

import pytest

from tests.conftest import ROOT, TINY_RECIPE

pytestmark = pytest.mark.slow


def run(cmd, *args, timeout=900):
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e") / "run"


@pytest.fixture(scope="module")
def first_run(workdir):
    import sys

    started = time.time()
    p = run([sys.executable, "-m", "hpc.cli"], "run", str(TINY_RECIPE), "--workdir", str(workdir))
    return p, time.time() - started


def client(workdir):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_tiny_recipe_passes_the_gate(first_run, workdir):
    p, _seconds = first_run  # wall time is a benchmark (about 4 min on 2 idle cores), not asserted here
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for stage in ("model", "data", "sft", "export", "eval", "gate"):
        assert f"{stage}: finished" in p.stdout
    assert "gate: PASSED" in p.stdout and "alias 'staging'" in p.stdout
    gate = json.loads((workdir / "stages/gate/result.json").read_text())
    cand, base = gate["scores"]["candidate"], gate["scores"]["base"]
    assert cand["heldout_exact/exact_match"] >= 0.5 > base["heldout_exact/exact_match"] + 0.3
    assert cand["heldout_mc/acc"] > base["heldout_mc/acc"]


def test_mlflow_tree_registry_and_lineage(first_run, workdir):
    c = client(workdir)
    meta = json.loads((workdir / "run.json").read_text())
    parent = c.get_run(meta["parent_run_id"])
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.info.run_name for r in children} == {"model", "data", "sft", "export", "eval", "gate"}
    sft = next(r for r in children if r.info.run_name == "sft")
    assert len(c.get_metric_history(sft.info.run_id, "loss")) >= 5
    mv = c.get_model_version_by_alias("tiny-sft", "staging")
    tags = mv.tags
    for key in ("hpcft.recipe_hash", "hpcft.git_commit", "hpcft.data_manifest_hash", "hpcft.base_model_hash"):
        assert tags.get(key), key
    assert tags["gate"] == "passed"
    assert parent.data.params["stages.0.mode"] == "full"


def test_mlflow_ui_runs_datasets_and_the_mlflow_model(first_run, workdir, tmp_path):
    import mlflow
    import mlflow.transformers

    c = client(workdir)
    meta = json.loads((workdir / "run.json").read_text())
    manifest = json.loads((workdir / "stages/data/manifest.json").read_text())
    parent = c.get_run(meta["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert c.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {name: c.get_run(run_id) for name, run_id in meta["child_runs"].items()}
    assert runs["sft"].data.params["stage.max_steps"] == "800" and runs["data"].data.params["dedup.exact"] == "True"
    assert (
        runs["sft"].data.params["result.seed"] == "1234" and runs["export"].data.params["result.merged"] == "False"
    )  # full: nothing to merge
    assert (
        not [k for k in runs["sft"].data.metrics if "seed" in k or "params" in k]
        and "final.final_loss" in runs["sft"].data.metrics
    )
    for run in (runs["sft"], parent):  # model -> run -> dataset
        (inp,) = run.inputs.dataset_inputs
        assert inp.dataset.digest == manifest["manifest_hash"][:36]
        assert json.loads(inp.dataset.profile)["splits"] == manifest["splits"]
    funnel = c.get_metric_history(runs["data"].info.run_id, "funnel.rows_kept")
    assert [m.value for m in sorted(funnel, key=lambda m: m.step)] == [st["kept"] for st in manifest["steps"].values()]
    dedup = manifest["steps"]["exact_dedup"]
    assert runs["data"].data.metrics["funnel/exact_dedup/rejected"] == dedup["rejected"] > 0
    gate = runs["gate"]
    assert gate.data.metrics["gate_passed"] == 1 and gate.data.tags["hpcft.gate"] == "passed"
    assert {a.path for a in c.list_artifacts(gate.info.run_id, "gate")} == {"gate/checks.json", "gate/reasons.txt"}
    exact = parent.data.metrics["candidate/heldout_exact/exact_match"]
    assert exact == gate.data.metrics["candidate/heldout_exact/exact_match"] >= 0.5
    top = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"recipe.yaml", "data", "eval"} <= top and [
        a.path for a in c.list_artifacts(parent.info.run_id, "data")
    ] == ["data/manifest.json"]
    elements = c.list_artifacts(parent.info.run_id, "eval")
    assert len(elements) == 4
    for element in elements:
        files = {a.path.rsplit("/", 1)[1] for a in c.list_artifacts(parent.info.run_id, element.path)}
        assert files == {"results.json", "samples.jsonl"}, element.path

    mv = c.get_model_version_by_alias("tiny-sft", "staging")
    assert mv.source.startswith("models:/m-")
    assert mv.tags["hpcft.layout"] == "dp_replicate=1,dp_shard=1,tp=1,pp=1,zero=0,microbatches=1"
    assert json.loads(mv.tags["hpcft.layout_json"])["pp_schedule"] == "1f1b"
    assert mv.tags["hpcft.base_model"] == "tiny-llama" and mv.tags["hpcft.base_model_path"].endswith("stages/model/hf")
    assert "hpcft.slurm_job_ids" not in mv.tags  # a local run has none
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        pipe = mlflow.transformers.load_model("models:/tiny-sft@staging")
    finally:
        mlflow.set_tracking_uri(None)
    prompt = pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which is larger, 2 or 8?"}], add_generation_prompt=True, tokenize=False
    )
    out = pipe(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert out.strip().startswith("8")


def test_exported_model_loads_in_plain_transformers(first_run, workdir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = workdir / "stages/export/model"
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Which is larger, 2 or 8?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip() == "8"


def test_rerun_skips_everything(first_run, workdir, hpcft_cmd):
    p = run(hpcft_cmd, "run", str(TINY_RECIPE), "--workdir", str(workdir))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("up to date, skipped") == 6


def test_only_reruns_one_stage(first_run, workdir, hpcft_cmd):
    p = run(hpcft_cmd, "run", str(TINY_RECIPE), "--workdir", str(workdir), "--only", "export")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "export: finished" in p.stdout and "sft: finished" not in p.stdout


SHORT = ["--set", "stages.0.max_steps=300"]  # val loss ~0.68 but exact match ~0.26: below the gate's 0.5


@pytest.fixture(scope="module")
def short_native(first_run, workdir):
    """The recipe at 300 steps on the native engine, model and data reused: too little to pass the gate."""
    import sys

    p = run([sys.executable, "-m", "hpc.cli"], "run", str(TINY_RECIPE), "--workdir", str(workdir), *SHORT)
    sft = json.loads((workdir / "stages/sft/result.json").read_text())
    gate = json.loads((workdir / "stages/gate/result.json").read_text())
    return p, sft, gate


def test_too_little_training_is_rejected(short_native, workdir):
    p, _sft, _gate = short_native
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr[-2000:]
    assert "model: up to date" in p.stdout and "data: up to date" in p.stdout  # upstream reused
    assert "gate: REJECTED" in p.stdout
    c = client(workdir)
    versions = {int(v.version): v for v in c.search_model_versions("name='tiny-sft'")}
    latest = versions[max(versions)]
    assert latest.tags["gate"] == "rejected"
    rejected = c.get_run(latest.run_id)  # a new parent run, the data stage reused: the dataset input all the same
    assert rejected.info.status == "FINISHED" and len(rejected.inputs.dataset_inputs) == 1
    gate = c.get_run(json.loads((workdir / "run.json").read_text())["child_runs"]["gate"])
    assert gate.data.metrics["gate_passed"] == 0 and gate.data.tags["hpcft.gate"] == "rejected"
    assert c.get_model_version_by_alias("tiny-sft", "staging").version != latest.version


def test_deepspeed_zero3_with_optimizer_offload_trains_and_scores_like_native(short_native, workdir, hpcft_cmd):
    """The same 300 steps on parallel.engine: deepspeed, 2 ranks, ZeRO-3, optimizer state on the CPU (CPU Adam),
    model and data reused: the native run's validation loss (within 2%: two ranks sum in another order, and
    300 steps at lr 1e-3 grow that rounding to ~0.7%, 0.6877 against 0.6831; tests/parallel/test_deepspeed.py
    checks every gradient to 1e-5), the same held-out score through export,
    eval and gate (which rejects both), and the engine on record in MLflow. (The whole recipe under DeepSpeed
    passes the gate like native; 800 steps are left to the benchmark for CI time.)"""
    _p, native_sft, native_gate = short_native
    sets = ["parallel.engine=deepspeed", "parallel.dp_shard=2", "parallel.zero=3", "parallel.offload.optimizer=cpu"]
    p = run(
        hpcft_cmd, "run", str(TINY_RECIPE), "--workdir", str(workdir), *SHORT, *(a for s in sets for a in ("--set", s))
    )
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr[-3000:]
    assert "model: up to date" in p.stdout and "data: up to date" in p.stdout
    assert "gate: REJECTED" in p.stdout
    sft = json.loads((workdir / "stages/sft/result.json").read_text())
    assert sft["world_size"] == 2 and sft["engine"] == "deepspeed" and sft["steps"] == native_sft["steps"], sft
    assert sft["val_loss"] == pytest.approx(native_sft["val_loss"], rel=2e-2), (sft["val_loss"], native_sft["val_loss"])
    assert sft["val_loss"] < 1.0  # learned: the untrained model starts at ~5.6
    metric = "heldout_exact/exact_match"
    score, native = (
        g["scores"]["candidate"][metric]
        for g in (json.loads((workdir / "stages/gate/result.json").read_text()), native_gate)
    )
    assert abs(score - native) <= 0.05, (score, native)
    meta = json.loads((workdir / "run.json").read_text())
    params = client(workdir).get_run(meta["parent_run_id"]).data.params
    assert params["parallel.engine"] == "deepspeed" and params["parallel.offload.optimizer"] == "cpu"


def test_failed_stage_names_stage_and_log(tmp_path, hpcft_cmd):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 2}')
    p = run(hpcft_cmd, "run", str(TINY_RECIPE), "--workdir", str(tmp_path / "w"), "--set", f"model={{path: {broken}}}")
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "stage data failed" in p.stdout
    log = next(line.split("log: ", 1)[1].strip() for line in p.stdout.splitlines() if line.startswith("log: "))
    assert os.path.isfile(log)
    assert "Traceback" not in p.stderr
