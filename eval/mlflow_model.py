"""The exported model as an MLflow transformers model (a LoggedModel of the run), so that
`mlflow.transformers.load_model("models:/NAME@champion")` and `mlflow models serve` can use it.

One copy of the weights: the flavour is saved with save_pretrained=True, whose `model/` folder holds the
Hugging Face weights and config; the tokenizer files are copied there too (MLflow keeps its own under
`components/tokenizer/`), so `<model artifacts>/model/` is also a plain Hugging Face directory."""

from __future__ import annotations

import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from eval.lineage import MODEL_HASH

HF_SUBDIR = "model"  # the Hugging Face directory inside the MLflow model (MLflow's own layout)
TOKENIZER_SUBDIR = "components/tokenizer"
TASK = "text-generation"
GENERATION_PARAMS = (("max_new_tokens", 64), ("do_sample", False), ("temperature", 1.0), ("top_p", 1.0))
# Explicit requirements: MLflow would otherwise infer them by loading the model and asking PyPI.
REQUIREMENTS = ("transformers", "torch", "safetensors", "accelerate")


def pip_requirements() -> list[str]:
    """The serving requirements, pinned to what is installed here (a package that is not: unpinned)."""
    out = []
    for name in REQUIREMENTS:
        try:
            version = metadata.version(name).split("+")[0]  # 2.13.0+cpu is not on PyPI
        except metadata.PackageNotFoundError:
            continue
        out.append(f"{name}=={version}")
    return out


def log_transformers_model(client, model_dir: Path, run_id: str, model_hash: str, name: str = "model") -> str:
    """Log the Hugging Face directory `model_dir` (weights + tokenizer) as a text-generation MLflow
    transformers model whose source run is `run_id`; returns the LoggedModel's id (`models:/<id>`).
    A rerun of the gate reuses the run's READY model of the same `model_hash` (no second upload)."""
    import mlflow.transformers
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    experiment_id = client.get_run(run_id).info.experiment_id
    earlier = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}' AND tags.`{MODEL_HASH}` = '{model_hash}'"
    )
    ready = [m for m in earlier if m.status == LoggedModelStatus.READY]
    if ready:
        return ready[0].model_id
    logged = client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, tags={MODEL_HASH: model_hash}, model_type="LLM"
    )
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        mlflow_model = Model(
            artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id, model_id=logged.model_id
        )
        components = {
            "model": AutoModelForCausalLM.from_pretrained(model_dir),
            "tokenizer": AutoTokenizer.from_pretrained(model_dir),
        }
        with tempfile.TemporaryDirectory(prefix="hpcft-mlflow-model-") as tmp:
            local = Path(tmp) / "mlflow_model"
            mlflow.transformers.save_model(
                components,
                str(local),
                task=TASK,
                mlflow_model=mlflow_model,
                pip_requirements=pip_requirements(),
                signature=_signature(),
                save_pretrained=True,
                model_card=None,
            )
            _complete_hf_dir(local)
            client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return logged.model_id


def _signature():
    """Text in, text out, and the generation settings a caller (`mlflow models serve`) may pass as params."""
    from mlflow.models import infer_signature

    return infer_signature(["prompt"], ["text"], params=dict(GENERATION_PARAMS))


def _complete_hf_dir(local: Path) -> None:
    """Copy the tokenizer files next to the weights: `model/` alone loads with from_pretrained."""
    hf, tokenizer = local / HF_SUBDIR, local / TOKENIZER_SUBDIR
    if not (hf / "config.json").is_file():
        raise RuntimeError(f"MLflow saved no Hugging Face directory at {HF_SUBDIR}/ (layout changed?)")
    for file in tokenizer.iterdir() if tokenizer.is_dir() else ():
        if file.is_file() and not (hf / file.name).exists():
            shutil.copy2(file, hf / file.name)
