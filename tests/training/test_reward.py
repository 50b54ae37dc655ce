"""Reward model stage: Bradley-Terry on a sequence-classification head, HF checkpoint, learning on the tiny task."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from parallel.dims import ParallelConfig  # noqa: E402
from parallel.engine import build_runtime  # noqa: E402
from parallel.tiny import build_tokenizer  # noqa: E402
from tests.training.preference_helpers import sft_start_model, write_preference_data  # noqa: E402
from training.config import RewardModelStage  # noqa: E402
from training.preference import build_pairs, collate_pairs  # noqa: E402
from training.reward import MANIFEST, build_reward_model, pair_rewards, run_reward_model  # noqa: E402

TRAIN_KEYS = {"step", "max_steps", "loss", "accuracy", "margin", "lr", "grad_norm", "pairs_per_s", "elapsed_s"}
TRAIN_KEYS |= {"tokens_per_s", "peak_mem_gib"}  # efficiency (training.loop); no MFU on CPU


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_preference_data(tmp_path_factory.mktemp("pref"), num_train=60, num_val=16)


def _run(model_dir, data_dir, out_dir, **overrides):
    cfg = RewardModelStage(
        **{
            "max_steps": 4,
            "batch_size": 8,
            "grad_accum": 2,
            "seq_len": 64,
            "log_every": 2,
            "eval_every": 2,
            "optim": {"lr": 5e-3, "warmup_steps": 0},
            **overrides,
        }
    )
    events = []
    result = run_reward_model(
        cfg,
        model_dir=model_dir,
        data_dir=data_dir,
        out_dir=out_dir,
        parallel=ParallelConfig(),
        seed=0,
        progress=events.append,
    )
    return result, [e for e in events if "loss" in e], [e for e in events if "val_loss" in e]


def _heldout_accuracy(checkpoint, data_dir) -> float:
    """Pairwise accuracy of the saved model loaded the plain Hugging Face way."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    pairs, _ = build_pairs([json.loads(x) for x in (data_dir / "validation.jsonl").read_text().splitlines()], tok, 64)
    with torch.no_grad():
        chosen, rejected = pair_rewards(model, collate_pairs(pairs, tok.pad_token_id), build_runtime(ParallelConfig()))
    return float((chosen > rejected).float().mean())


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_run_saves_a_plain_sequence_classifier(model_dir, data_dir, tmp_path, mode):
    result, train, val = _run(model_dir, data_dir, tmp_path, mode=mode)
    assert [e["step"] for e in train] == [2, 4] and all(set(e) == TRAIN_KEYS for e in train)
    # Efficiency (training.loop): both sides' tokens/s and peak memory; CPU has no peak FLOP/s, so no MFU.
    assert all(e["tokens_per_s"] > 0 and 0 < e["peak_mem_gib"] < 64 for e in train)
    assert [e["step"] for e in val] == [0, 2, 4]
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))
    ckpt = tmp_path / "checkpoint"
    assert (ckpt / "model.safetensors").exists() and not (ckpt / "adapter_config.json").exists()
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["pad_token_id"] == build_tokenizer().pad_token_id
    assert json.loads((ckpt / MANIFEST).read_text())["mode"] == mode
    # The reloaded classifier scores the validation pairs exactly as the run's last evaluation did.
    assert _heldout_accuracy(ckpt, data_dir) == pytest.approx(result["val_accuracy"])
    assert (result["trainable_params"] < result["total_params"] / 3) == (mode == "lora")


def test_reward_reads_the_last_real_token_whatever_the_padding(model_dir):
    tok = build_tokenizer()
    model = build_reward_model(model_dir, tok.pad_token_id).eval()
    short = {"prompt": "1 + 1?", "chosen": "2", "rejected": "3"}
    long = {"prompt": "What is the sum of one and one, please?", "chosen": "2", "rejected": "11"}
    pairs, _ = build_pairs([short, long], tok, 96)
    runtime = build_runtime(ParallelConfig())
    with torch.no_grad():
        alone = pair_rewards(model, collate_pairs(pairs[:1], tok.pad_token_id), runtime)
        padded = pair_rewards(model, collate_pairs(pairs, tok.pad_token_id), runtime)
    assert float(alone[0][0]) == pytest.approx(float(padded[0][0]), abs=1e-5)
    assert float(alone[1][0]) == pytest.approx(float(padded[1][0]), abs=1e-5)


def test_per_row_margin_enters_the_loss(model_dir, tmp_path):
    rows = [{"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(8)]
    for name, margin in (("plain", None), ("margin", 3.0)):
        d = tmp_path / name
        d.mkdir()
        text = "".join(json.dumps(r if margin is None else {**r, "margin": margin}) + "\n" for r in rows)
        (d / "train.jsonl").write_text(text)
        (d / "validation.jsonl").write_text(text)
    _, _, plain = _run(model_dir, tmp_path / "plain", tmp_path / "o1", max_steps=1)
    _, _, margin = _run(model_dir, tmp_path / "margin", tmp_path / "o2", max_steps=1)
    # Same model, same pairs: only the margin differs, and -logsigmoid(d - 3) > -logsigmoid(d).
    assert margin[0]["val_margin"] == pytest.approx(plain[0]["val_margin"])
    assert margin[0]["val_loss"] > plain[0]["val_loss"] + 1.0


# Measured (issue 17), from tiny-llama after 300 SFT steps (plain and chunked token loss) at seeds 0 and 1:
# held-out pairwise accuracy 0.52-0.57 with a fresh head, 0.53-0.69 after 200 steps (noisy: a rounding-level
# change of the start model moved it by 0.06), 0.64-0.75 after 400 steps. 400 steps clear the bar by 8+ pairs.
LEARN = dict(
    max_steps=400, batch_size=16, seq_len=96, eval_every=400, log_every=50, optim={"lr": 5e-4, "warmup_steps": 10}
)


@pytest.mark.slow
def test_reward_model_learns_heldout_preferences(tmp_path_factory, tmp_path):
    start = sft_start_model(tmp_path_factory.mktemp("start"))
    data = write_preference_data(tmp_path / "pref", num_train=1000, num_val=200)
    result = run_reward_model(
        RewardModelStage(**LEARN),
        model_dir=start,
        data_dir=data,
        out_dir=tmp_path / "rm",
        parallel=ParallelConfig(),
        seed=0,
    )
    assert 0.3 < result["val_before"]["val_accuracy"] < 0.6  # a fresh head is at chance, below the bar
    # Above chance on the held-out pairs (180 after the planted bad rows; standard error ~0.037).
    assert result["val_accuracy"] >= 0.6, result
    assert result["val_margin"] > 0.2 and result["val_loss"] < result["val_before"]["val_loss"] - 0.05, result
