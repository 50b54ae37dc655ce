"""run_sft under multi-process layouts against one process: per-step losses, validation loss, exported logits.

One forked launch runs every 2-rank layout in turn (fork after imports keeps it to seconds).
"""

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from parallel import engine  # noqa: E402
from parallel.checkpoint import load_checkpoint  # noqa: E402
from parallel.dims import ParallelConfig  # noqa: E402
from parallel.distributed.launch import launch  # noqa: E402
from parallel.export import export_hf, max_logit_diff, probe_batch  # noqa: E402
from parallel.tiny import build_tokenizer  # noqa: E402
from tests.training.sft_helpers import write_task_data  # noqa: E402
from training.config import SFTStage  # noqa: E402
from training.sft import run_sft  # noqa: E402

STAGE = dict(
    max_steps=4,
    batch_size=8,
    grad_accum=2,
    seq_len=48,
    log_every=1,
    eval_every=2,
    optim={"lr": 5e-3, "warmup_steps": 1},
)
LAYOUTS = {  # name -> (parallel section, mode)
    "dp2-zero0": (dict(dp_replicate=2), "full"),
    "dp2-zero3": (dict(dp_shard=2, zero=3), "full"),
    "tp2": (dict(tp=2), "full"),
    "pp2-1f1b": (dict(pp=2, pp_schedule="1f1b", microbatches=2), "full"),
    "dp2-zero1-lora": (dict(dp_shard=2, zero=1), "lora"),
    "tp2-lora": (dict(tp=2), "lora"),  # sequence + vocab parallel (the defaults under tp) with adapters
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("data"), build_tokenizer(), num_train=32, num_val=10)


def _sft(model_dir, data_dir, out_dir, parallel: ParallelConfig, mode: str):
    events = []
    result = run_sft(
        SFTStage(**STAGE, mode=mode),
        model_dir=model_dir,
        data_dir=data_dir,
        out_dir=out_dir,
        parallel=parallel,
        seed=0,
        progress=events.append,
    )
    return result, events


def _ranks_main(rank, world_size, model_dir, data_dir, out_root):
    out = {"refusals": []}
    for layout in (ParallelConfig(), ParallelConfig(tp=4)):  # 1 and 4 ranks configured, 2 started
        try:
            engine.check_layout(layout)
        except ValueError as err:
            out["refusals"].append(str(err))
    for name, (layout, mode) in LAYOUTS.items():
        out[name] = _sft(model_dir, data_dir, out_root / name, ParallelConfig(**layout), mode)
    return out


@pytest.fixture(scope="module")
def ranks(model_dir, data_dir, tmp_path_factory):
    """(output root, per-rank results) of one 2-rank launch."""
    root = tmp_path_factory.mktemp("ranks")
    return root, launch(_ranks_main, 2, model_dir, data_dir, root, timeout=600)


@pytest.fixture(scope="module")
def single(model_dir, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return {
        mode: (*_sft(model_dir, data_dir, root / mode, ParallelConfig(), mode), root / mode)
        for mode in ("full", "lora")
    }


def _curves(events):
    train = [(e["step"], e["loss"], e["grad_norm"], e["lr"]) for e in events if "loss" in e]
    val = [(e["step"], e["val_loss"]) for e in events if "val_loss" in e]
    return train, val


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_trains_like_one_process(ranks, single, model_dir, name, tmp_path):
    root, ranks = ranks
    mode = LAYOUTS[name][1]
    ref_result, ref_events, ref_dir = single[mode]
    ref_train, ref_val = _curves(ref_events)
    results = [r[name][0] for r in ranks]
    assert results[0] == results[1], "every rank returns rank 0's result"
    for _result, events in (r[name] for r in ranks):
        train, val = _curves(events)
        assert [t[0] for t in train] == [1, 2, 3, 4] and [v[0] for v in val] == [0, 2, 4]
        loss_diff = max(abs(a[1] - b[1]) for a, b in zip(train, ref_train))
        val_diff = max(abs(a[1] - b[1]) for a, b in zip(val, ref_val))
        assert loss_diff < 1e-5 and val_diff < 1e-5, (loss_diff, val_diff)
        assert [t[2] for t in train] == pytest.approx([t[2] for t in ref_train], rel=1e-4)
        assert [t[3] for t in train] == pytest.approx([t[3] for t in ref_train], rel=1e-12)
    result = results[0]
    assert result["trainable_params"] == ref_result["trainable_params"]
    assert result["total_params"] == ref_result["total_params"]
    assert result["tokens"] == ref_result["tokens"] and result["world_size"] == 2
    out_dir = root / name
    assert json.loads((out_dir / "result.json").read_text()) == json.loads(json.dumps(result))

    export = export_hf(model_dir, out_dir / "checkpoint", tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    reference = load_checkpoint(ref_dir / "checkpoint")
    logit_diff = max_logit_diff(reference, exported, probe_batch(build_tokenizer()))
    print(
        f"{name}: loss diff {loss_diff:.2e}, val diff {val_diff:.2e}, logit diff {logit_diff:.2e}, "
        f"export check {export['max_abs_logit_diff']:.2e}"
    )
    assert logit_diff < 1e-4


@pytest.mark.slow
def test_process_group_size_must_match_the_layout(ranks):
    for refusals in (r["refusals"] for r in ranks[1]):
        assert len(refusals) == 2
        assert all(msg.startswith("parallel:") and "2 processes were started" in msg for msg in refusals)


def test_layout_without_process_group_is_refused():
    with pytest.raises(ValueError, match=r"parallel: world size 2 .*needs 2 processes.*not initialised"):
        engine.check_layout(ParallelConfig(tp=2))
