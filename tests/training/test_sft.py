import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from parallel.dims import ParallelConfig  # noqa: E402
from parallel.tiny import build_tokenizer  # noqa: E402
from tests.training.sft_helpers import write_task_data  # noqa: E402
from training.config import SFTStage  # noqa: E402
from training.sft import run_sft  # noqa: E402

TRAIN_EVENT_KEYS = {"step", "max_steps", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gib", "elapsed_s"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("data"), build_tokenizer(), num_train=48, num_val=16)


def _run(model_dir, data_dir, out_dir, **overrides):
    cfg = SFTStage(
        **{
            "max_steps": 6,
            "batch_size": 8,
            "grad_accum": 2,
            "seq_len": 64,
            "log_every": 2,
            "eval_every": 3,
            "optim": {"lr": 5e-3, "warmup_steps": 1},
            **overrides,
        }
    )
    events = []
    result = run_sft(
        cfg,
        model_dir=model_dir,
        data_dir=data_dir,
        out_dir=out_dir,
        parallel=ParallelConfig(),
        seed=0,
        progress=events.append,
    )
    return result, events


def test_full_run_writes_checkpoint_result_and_progress(model_dir, data_dir, tmp_path):
    result, events = _run(model_dir, data_dir, tmp_path)
    train = [e for e in events if "loss" in e]
    val = [e for e in events if "val_loss" in e]
    assert [e["step"] for e in train] == [2, 4, 6] and all(set(e) == TRAIN_EVENT_KEYS for e in train)
    assert all(0 < e["peak_mem_gib"] < 64 for e in train)  # CPU: the resident set's high-water, no MFU
    assert [e["step"] for e in val] == [0, 3, 6]  # the shared loop measures the start too (val_before)
    assert train[-1]["loss"] < train[0]["loss"] and val[-1]["val_loss"] < val[0]["val_loss"]
    assert train[0]["lr"] == pytest.approx(5e-3)  # step 2 is the first after the one warmup step
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))
    assert result["steps"] == 6 and result["tokens"] > 0 and result["tokens_per_s"] > 0
    assert result["val_loss"] == val[-1]["val_loss"] and result["trainable_params"] == result["total_params"]
    ckpt = tmp_path / "checkpoint"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "tokenizer.json").exists()
    assert json.loads((ckpt / "hpcft_checkpoint.json").read_text())["mode"] == "full"


def test_same_seed_same_losses_bitwise(model_dir, data_dir, tmp_path):
    a, events_a = _run(model_dir, data_dir, tmp_path / "a", max_steps=3, log_every=1)
    b, events_b = _run(model_dir, data_dir, tmp_path / "b", max_steps=3, log_every=1)
    c, _ = _run(model_dir, data_dir, tmp_path / "c", max_steps=3, log_every=1, seed=1)
    losses = lambda events: [e["loss"] for e in events if "loss" in e]  # noqa: E731
    assert losses(events_a) == losses(events_b)
    assert a["val_loss"] == b["val_loss"] != c["val_loss"]


def test_lora_run_saves_adapter_and_manifest(model_dir, data_dir, tmp_path):
    result, _ = _run(model_dir, data_dir, tmp_path, mode="lora", max_steps=2)
    ckpt = tmp_path / "checkpoint"
    assert (ckpt / "adapter_config.json").exists() and (ckpt / "adapter_model.safetensors").exists()
    assert not (ckpt / "model.safetensors").exists()
    manifest = json.loads((ckpt / "hpcft_checkpoint.json").read_text())
    assert manifest == {"mode": "lora", "base_model_dir": str(model_dir.resolve())}
    assert 0 < result["trainable_params"] < result["total_params"] / 5


def test_multi_process_layout_is_refused_before_training(model_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match="parallel: world size 2 .*needs 2 processes"):
        run_sft(
            SFTStage(),
            model_dir=model_dir,
            data_dir=data_dir,
            out_dir=tmp_path,
            parallel=ParallelConfig(dp_shard=2),
            seed=0,
        )
    assert not (tmp_path / "checkpoint").exists()


def test_missing_split_is_a_user_error(model_dir, tmp_path):
    with pytest.raises(ValueError, match="train.jsonl"):
        run_sft(SFTStage(), model_dir=model_dir, data_dir=tmp_path, out_dir=tmp_path, parallel=ParallelConfig(), seed=0)
