"""Step batching in the stages: SFT packed and unpacked train alike, num_epochs sets max_steps at stage start,
the recipe's source weights mix the data stage's sources."""

import json
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from parallel.dims import ParallelConfig  # noqa: E402
from parallel.tiny import build_tokenizer  # noqa: E402
from tests.training.preference_helpers import write_preference_data  # noqa: E402
from tests.training.sft_helpers import write_task_data  # noqa: E402
from training.config import DPOStage, SFTStage  # noqa: E402
from training.sft import run_sft  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("data"), build_tokenizer(), num_train=48, num_val=16)


def _run(model_dir, data_dir, out_dir, **overrides):
    stage = {"batch_size": 8, "grad_accum": 2, "seq_len": 64, "log_every": 1, "eval_every": 2, **overrides}
    stage.setdefault("optim", {"lr": 5e-3, "warmup_steps": 1})
    if "num_epochs" not in stage:
        stage.setdefault("max_steps", 3)
    events = []
    result = run_sft(
        SFTStage(**stage),
        model_dir=model_dir,
        data_dir=data_dir,
        out_dir=out_dir,
        parallel=ParallelConfig(),
        seed=0,
        progress=events.append,
    )
    return result, events


def test_packed_sft_trains_like_unpacked(model_dir, data_dir, tmp_path):
    packed, packed_events = _run(model_dir, data_dir, tmp_path / "packed", packing=True)
    plain, plain_events = _run(model_dir, data_dir, tmp_path / "plain", packing=False)
    assert packed["packing"] is True and plain["packing"] is False
    losses = [[e["loss"] for e in events if "loss" in e] for events in (packed_events, plain_events)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=1e-5)
    vals = [[e["val_loss"] for e in events if "val_loss" in e] for events in (packed_events, plain_events)]
    assert vals[0] == pytest.approx(vals[1], abs=1e-5)
    assert packed["tokens"] == plain["tokens"]  # real tokens, not the padded rows


def test_num_epochs_sets_the_steps(model_dir, data_dir, tmp_path):
    result, events = _run(model_dir, data_dir, tmp_path, num_epochs=1.5, log_every=100, eval_every=100)
    per_epoch = result["data"]["train"]["examples"] // 8
    assert result["steps"] == math.ceil(1.5 * per_epoch)
    assert [e["max_steps"] for e in events if "loss" in e] == [result["steps"]]


def test_num_epochs_in_a_pairwise_stage(model_dir, tmp_path):
    from training.dpo import setup

    data_dir = write_preference_data(tmp_path / "pref", num_train=40, num_val=8)
    s = setup(DPOStage(num_epochs=0.5, batch_size=8, seq_len=64), model_dir, data_dir, ParallelConfig(), seed=0)
    assert s.batches.batches_per_epoch == len(s.train_pairs) // 8
    assert s.cfg.max_steps == math.ceil(0.5 * s.batches.batches_per_epoch)
    assert s.trainer.learner.num_updates == s.cfg.max_steps  # the LR schedule counts the resolved steps


@pytest.mark.slow
def test_recipe_source_weights_mix_the_data_stage_sources(model_dir, tmp_path):
    """Two chat sources through the data stage; the runner's source weights (the recipe's
    data.sources.<i>.weight, handed over by the job) set each source's share of an epoch."""
    from collections import Counter

    from data_tools.config import DataConfig
    from data_tools.stage import run_data
    from training.sft import setup

    for name, verb in (("a", "Repeat"), ("b", "Echo back")):
        rows = [{"instruction": f"{verb} the code {i:04d}{name} please", "output": f"{i:04d}{name}"} for i in range(90)]
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows[: 90 if name == "a" else 30])
        )
    cfg = DataConfig(
        sources=[{"path": "a.jsonl"}, {"path": "b.jsonl"}],
        dedup={"minhash": False, "normalize_numbers": False},  # rows differ by their numbers
        filters={"gopher_repetition": False, "gopher_quality": False, "c4": False, "fineweb": False},
        tasks=2,
    )
    run_data(cfg, model_dir, tmp_path / "data", base_dir=tmp_path)
    stage = SFTStage(batch_size=8, seq_len=64)
    natural = setup(stage, model_dir, tmp_path / "data", ParallelConfig(), seed=0)
    mixed = setup(stage, model_dir, tmp_path / "data", ParallelConfig(), seed=0, weights={0: 1.0, 1: 1.0})

    def shares(s):
        epoch = [i for step in range(s.train_batches.batches_per_epoch) for i in s.train_batches(step)]
        return Counter(int(s.train_examples.sources[i]) for i in epoch)

    got, want = shares(natural), Counter(int(x) for x in natural.train_examples.sources)
    assert got[1] / (got[0] + got[1]) == pytest.approx(want[1] / (want[0] + want[1]), abs=0.07)  # ~1/4
    got = shares(mixed)
    assert got[1] / (got[0] + got[1]) == pytest.approx(0.5, abs=0.07)  # the small source repeats
