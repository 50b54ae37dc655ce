"""SFT must actually learn the tiny task: held-out exact match goes from ~0 to a clear fraction."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from parallel.checkpoint import load_checkpoint  # noqa: E402
from parallel.dims import ParallelConfig  # noqa: E402
from parallel.tiny import build_tiny_model, build_tokenizer  # noqa: E402
from tests.training.sft_helpers import exact_match, write_task_data  # noqa: E402
from training.config import SFTStage  # noqa: E402
from training.data import read_jsonl  # noqa: E402
from training.sft import run_sft  # noqa: E402

# The default tiny task (arithmetic and comparison facts in several phrasings): measured 74% exact match on
# held-out prompts after 500 steps (58 s on 2 idle cores), 0% after 5. Learning rates of 2e-3 and up stall
# at the unigram plateau on this model.
LEARN = dict(
    max_steps=500,
    batch_size=32,
    seq_len=96,
    eval_every=250,
    log_every=50,
    optim={"lr": 1e-3, "warmup_steps": 25, "weight_decay": 0.1},
)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn")
    model_dir = build_tiny_model("tiny-llama", root / "model", seed=0)
    data_dir = write_task_data(root / "data", build_tokenizer(), num_train=2000, num_val=200, seed=0)
    return model_dir, data_dir


def _train_and_score(task, out_dir, **cfg):
    model_dir, data_dir = task
    events = []
    result = run_sft(
        SFTStage(**cfg),
        model_dir=model_dir,
        data_dir=data_dir,
        out_dir=out_dir,
        parallel=ParallelConfig(),
        seed=0,
        progress=events.append,
    )
    model = load_checkpoint(out_dir / "checkpoint")
    score = exact_match(model, build_tokenizer(), read_jsonl(data_dir / "validation.jsonl"))
    return result, events, score


@pytest.mark.slow
def test_sft_learns_the_tiny_task(task, tmp_path):
    result, events, score = _train_and_score(task, tmp_path, **LEARN)
    val = [e["val_loss"] for e in events if "val_loss" in e]
    assert val[-1] < 0.5 * val[0] and result["val_loss"] < 1.0
    assert score >= 0.5, f"held-out exact match {score:.2%} after {LEARN['max_steps']} steps"


@pytest.mark.slow
def test_too_little_training_does_not_answer(task, tmp_path):
    result, _, score = _train_and_score(task, tmp_path, **{**LEARN, "max_steps": 5, "eval_every": 5})
    assert result["val_loss"] > 2.0 and score <= 0.02
