import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from parallel.checkpoint import load_checkpoint  # noqa: E402
from parallel.dims import ParallelConfig  # noqa: E402
from parallel.export import MAX_LOGIT_DIFF, export_hf, max_logit_diff, probe_batch  # noqa: E402
from parallel.tiny import build_tiny_model, build_tokenizer  # noqa: E402
from tests.training.sft_helpers import write_task_data  # noqa: E402
from training.config import SFTStage  # noqa: E402
from training.sft import run_sft  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model("micro-llama", tmp_path_factory.mktemp("micro"), seed=0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("data"), build_tokenizer(), num_train=16, num_val=8)


def _train(mode, model_dir, data_dir, out_dir):
    cfg = SFTStage(mode=mode, max_steps=3, batch_size=8, seq_len=64, optim={"lr": 1e-2, "warmup_steps": 0})
    run_sft(cfg, model_dir=model_dir, data_dir=data_dir, out_dir=out_dir, parallel=ParallelConfig(), seed=0)
    return out_dir / "checkpoint"


def _base_logit_diff(model_dir, exported_dir):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    exported = AutoModelForCausalLM.from_pretrained(exported_dir, dtype=torch.float32).eval()
    return max_logit_diff(base, exported, probe_batch(AutoTokenizer.from_pretrained(exported_dir)))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_export_is_plain_hf_and_matches_trained_logits(mode, model_dir, data_dir, tmp_path):
    ckpt = _train(mode, model_dir, data_dir, tmp_path / "train")
    out = tmp_path / "export"
    report = export_hf(model_dir, ckpt, out)
    assert report["merged"] == (mode == "lora")
    assert report["max_abs_logit_diff"] <= MAX_LOGIT_DIFF
    base_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    assert report["params"] == base_params  # merged LoRA leaves no adapter weights behind
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).exists(), name
    assert not (out / "adapter_config.json").exists()
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == build_tokenizer().convert_tokens_to_ids("<|im_end|>")
    # Training changed the model, so the export must not simply be the base model.
    assert _base_logit_diff(model_dir, out) > 1e-3


def test_logit_check_sees_a_different_model(model_dir, tmp_path):
    other = build_tiny_model("micro-llama", tmp_path / "other", seed=1)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    probes = probe_batch(build_tokenizer())
    assert max_logit_diff(load(model_dir), load(model_dir), probes) == 0.0
    assert max_logit_diff(load(model_dir), load(other), probes) > MAX_LOGIT_DIFF


def test_not_a_checkpoint_is_a_user_error(model_dir, tmp_path):
    with pytest.raises(ValueError, match="not an hpcft checkpoint"):
        load_checkpoint(model_dir)
