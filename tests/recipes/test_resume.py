"""A stopped SFT stage resumes from its latest training-state checkpoint, in one process or under another
layout, and continues exactly as an uninterrupted run (losses of every later step, final weights)."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from parallel.checkpoint import load_checkpoint as load_hf  # noqa: E402
from parallel.dims import ParallelConfig  # noqa: E402
from parallel.distributed.launch import launch  # noqa: E402
from parallel.tiny import build_tokenizer  # noqa: E402
from recipes.config import SFTStage  # noqa: E402
from recipes.sft import run_sft  # noqa: E402
from tests.recipes.sft_helpers import write_task_data  # noqa: E402

STAGE = dict(max_steps=6, batch_size=8, seq_len=48, log_every=1, eval_every=3, checkpoint_every=2,
             optim={"lr": 5e-3, "warmup_steps": 1})
STOP_AT = 5  # the checkpoint of step 4 is the latest when the run stops


class Stop(Exception):
    pass


def _run(model_dir, data_dir, out_dir, parallel=ParallelConfig(), mode="full", stop_at=None):
    """run_sft; its per-step losses and events. stop_at: raise from the progress callback at that step."""
    events = []

    def progress(event):
        events.append(event)
        if stop_at is not None and event.get("step") == stop_at and "loss" in event:
            raise Stop()
    try:
        result = run_sft(SFTStage(**STAGE, mode=mode), model_dir=model_dir, data_dir=data_dir, out_dir=out_dir,
                         parallel=parallel, seed=0, progress=progress)
    except Stop:
        result = None
    losses = {e["step"]: e["loss"] for e in events if "loss" in e}
    return result, losses, events


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("data"), build_tokenizer(), num_train=48, num_val=8)


@pytest.fixture(scope="module")
def uninterrupted(model_dir, data_dir, tmp_path_factory):
    out = {}
    for mode in ("full", "lora"):
        out_dir = tmp_path_factory.mktemp(f"whole-{mode}")
        result, losses, _ = _run(model_dir, data_dir, out_dir, mode=mode)
        out[mode] = (result, losses, out_dir)
    return out


def _same_weights(dir_a, dir_b, atol):
    a, b = load_hf(dir_a / "checkpoint"), load_hf(dir_b / "checkpoint")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    worst = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    assert worst < atol, worst


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_one_process_resumes_where_it_stopped(model_dir, data_dir, tmp_path, uninterrupted, mode):
    ref_result, ref_losses, ref_dir = uninterrupted[mode]
    assert ref_result["resumed_from_step"] is None
    assert not (ref_dir / "resume").exists(), "a finished stage keeps no resume state"
    out_dir = tmp_path / "run"
    result, losses, _ = _run(model_dir, data_dir, out_dir, mode=mode, stop_at=STOP_AT)
    assert result is None and (out_dir / "resume" / "latest").read_text().strip() == "step-00000004"
    assert [p.name for p in (out_dir / "resume").glob("step-*")] == ["step-00000004"], "older ones deleted"
    result, losses, events = _run(model_dir, data_dir, out_dir, mode=mode)
    assert [e["resumed_from_step"] for e in events if "resumed_from_step" in e] == [4]
    assert sorted(losses) == [5, 6]
    for step in (5, 6):
        assert losses[step] == pytest.approx(ref_losses[step], abs=1e-6), step
    assert result["resumed_from_step"] == 4
    assert result["val_loss"] == pytest.approx(ref_result["val_loss"], abs=1e-6)
    _same_weights(out_dir, ref_dir, 1e-6)
    assert not (out_dir / "resume").exists()


def _stop_then_resume(rank, world_size, model_dir, data_dir, root):
    """Stop under dp2 (ZeRO-1), resume that run under tp2; resume a one-process checkpoint under tp2."""
    _run(model_dir, data_dir, root / "dp2", ParallelConfig(dp_shard=2, zero=1), stop_at=STOP_AT)
    tp2 = ParallelConfig(tp=2)
    from_dp2 = _run(model_dir, data_dir, root / "dp2", tp2)
    from_one = _run(model_dir, data_dir, root / "one", tp2)
    return from_dp2[:2], from_one[:2]


@pytest.mark.slow
def test_resume_under_another_layout(model_dir, data_dir, tmp_path, uninterrupted):
    ref_result, ref_losses, ref_dir = uninterrupted["full"]
    _run(model_dir, data_dir, tmp_path / "one", stop_at=STOP_AT)  # stopped in one process
    per_rank = launch(_stop_then_resume, 2, model_dir, data_dir, tmp_path, timeout=900)
    for from_dp2, from_one in per_rank:
        for result, losses in (from_dp2, from_one):
            assert result["resumed_from_step"] == 4 and sorted(losses) == [5, 6]
            for step in (5, 6):
                assert losses[step] == pytest.approx(ref_losses[step], abs=1e-5), step
            assert result["val_loss"] == pytest.approx(ref_result["val_loss"], abs=1e-5)
    _same_weights(tmp_path / "dp2", ref_dir, 1e-5)
    _same_weights(tmp_path / "one", ref_dir, 1e-5)
