"""The exported model as an MLflow transformers model, and the Tracker's dataset input, on a real sqlite
store with a tiny model (creating the store's tables takes ~10 s, hence slow)."""

import json

import pytest

from eval import lineage, registry
from eval.gate import Verdict
from eval.mlflow_model import HF_SUBDIR, log_transformers_model
from hpc.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from parallel.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("mlflow-model")
    tracker = Tracker(f"sqlite:///{root}/mlflow.db")
    parent = tracker.start_parent("exp", root / "art", "r", {"seed": 1}, {})
    model_dir = build_tiny_model("tiny-llama", root / "hf", seed=0)
    return tracker, parent, model_dir


def test_registered_version_loads_as_a_generating_pipeline(store, tmp_path):
    import mlflow
    import mlflow.pyfunc
    import mlflow.transformers

    tracker, parent, model_dir = store
    client, model_hash = tracker.client, lineage.hash_dir(model_dir)
    model_id = log_transformers_model(client, model_dir, parent, model_hash)
    assert log_transformers_model(client, model_dir, parent, model_hash) == model_id  # a rerun: no second upload
    verdict = Verdict(passed=True, reasons=["PASS"], checks=[])
    version = registry.register_candidate(client, "tiny", model_dir, parent, {"t/acc": 0.5}, verdict, {}, model_id)
    registry.promote(client, "tiny", version)
    mv = client.get_model_version("tiny", version)
    assert mv.source == f"models:/{model_id}"  # the UI links the version to the model, and back:
    assert json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"]) == [
        {"name": "tiny", "version": version}
    ]
    assert [o.model_id for o in client.get_run(parent).outputs.model_outputs] == [model_id]
    assert registry.ARTIFACT_PATH not in [a.path for a in client.list_artifacts(parent)]  # one copy of the weights

    mlflow.set_tracking_uri(tracker.uri)  # what a user's MLFLOW_TRACKING_URI does
    try:
        pipe = mlflow.transformers.load_model("models:/tiny@champion")
        served = mlflow.pyfunc.load_model("models:/tiny@champion")  # what `mlflow models serve` runs
        local = mlflow.artifacts.download_artifacts(
            f"models:/{model_id}", dst_path=str(tmp_path), tracking_uri=tracker.uri
        )
    finally:
        mlflow.set_tracking_uri(None)
    out = pipe("1 + 1 =", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert out.startswith("1 + 1 =") and len(pipe.tokenizer(out)["input_ids"]) > len(
        pipe.tokenizer("1 + 1 =")["input_ids"]
    )
    (answer,) = served.predict(["1 + 1 ="], params={"max_new_tokens": 3})
    assert answer.startswith("1 + 1 =") and answer != "1 + 1 ="
    requirements = (tmp_path / "requirements.txt").read_text()
    assert "transformers==" in requirements and "torch==" in requirements  # explicit, not inferred from PyPI

    from transformers import AutoModelForCausalLM, AutoTokenizer  # the plain Hugging Face folder loads too

    hf = tmp_path / HF_SUBDIR
    assert local and AutoTokenizer.from_pretrained(hf).chat_template
    assert AutoModelForCausalLM.from_pretrained(hf).config.vocab_size == pipe.model.config.vocab_size


def test_dataset_input_experiment_kind_and_child_params(store):
    tracker, parent, _ = store
    child = tracker.start_child(parent, "data", {"dedup": {"exact": True}, "env": {"HF_TOKEN": "hf_" + "x" * 30}})
    digest = "ab" * 32
    dataset = {"name": "r-data", "digest": digest[:36], "source": "/runs/r/stages/data", "profile": {"num_rows": 3}}
    tracker.log_dataset(child, dataset)
    run = tracker.client.get_run(child)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == digest[:36] and inp.dataset.name == "r-data"
    assert json.loads(inp.dataset.source) == {"uri": "/runs/r/stages/data"}
    assert json.loads(inp.dataset.profile) == {"num_rows": 3}
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    assert run.data.params["dedup.exact"] == "True" and "hf_x" not in str(run.data.params)
    experiment = tracker.client.get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
