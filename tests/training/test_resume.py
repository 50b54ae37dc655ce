"""A stopped SFT stage resumes from its latest training-state checkpoint, in one process or under another
layout, and continues exactly as an uninterrupted run (losses of every later step, final weights)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from parallel.checkpoint import load_checkpoint as load_hf  # noqa: E402
from parallel.dims import ParallelConfig  # noqa: E402
from parallel.distributed.launch import launch  # noqa: E402
from parallel.tiny import build_tokenizer  # noqa: E402
from tests.training.preference_helpers import write_preference_data  # noqa: E402
from tests.training.sft_helpers import write_task_data  # noqa: E402
from training.config import DPOStage, GRPOStage, PPOStage, RewardModelStage, SFTStage  # noqa: E402
from training.dpo import run_dpo  # noqa: E402
from training.grpo import run_grpo  # noqa: E402
from training.ppo import run_ppo  # noqa: E402
from training.reward import run_reward_model  # noqa: E402
from training.sft import run_sft  # noqa: E402

STAGE = dict(
    max_steps=6,
    batch_size=8,
    seq_len=48,
    log_every=1,
    eval_every=3,
    checkpoint_every=2,
    optim={"lr": 5e-3, "warmup_steps": 1},
)
STOP_AT = 5  # the checkpoint of step 4 is the latest when the run stops


class Stop(Exception):
    pass


PAIR_STAGE = dict(
    max_steps=6,
    batch_size=8,
    grad_accum=2,
    seq_len=64,
    log_every=1,
    eval_every=3,
    checkpoint_every=2,
    optim={"lr": 5e-3, "warmup_steps": 1},
)
RL_STAGE = dict(
    max_steps=6,
    batch_size=8,
    mini_batch_size=4,
    ppo_epochs=2,
    max_new_tokens=6,
    eval_every=3,
    eval_prompts=8,
    log_every=1,
    checkpoint_every=2,
    reward_fn="training.rewards:exact_match",
    optim={"lr": 1e-3, "warmup_steps": 0},
)
RUNNERS = {
    "sft": (SFTStage, run_sft, STAGE),
    "dpo": (DPOStage, run_dpo, dict(PAIR_STAGE, precompute_reference=True)),
    "reward_model": (RewardModelStage, run_reward_model, PAIR_STAGE),
    "ppo": (PPOStage, run_ppo, dict(RL_STAGE, adaptive_kl=True, kl_target=0.05, kl_horizon=100)),
    "grpo": (GRPOStage, run_grpo, dict(RL_STAGE, batch_size=4, group_size=4, mini_batch_size=8)),
}
RL_KEYS = ("score", "policy_loss", "kl", "response_length", "grad_norm")


def _run(model_dir, data_dir, out_dir, parallel=ParallelConfig(), mode="full", stop_at=None, kind="sft", **overrides):
    """A stage's runner; its per-step losses and events. stop_at: raise from the progress callback there;
    overrides: stage fields."""
    events = []

    def progress(event):
        events.append(event)
        if stop_at is not None and event.get("step") == stop_at and "max_steps" in event:
            raise Stop()

    try:
        config, runner, fields = RUNNERS[kind]
        result = runner(
            config(**(fields | overrides), mode=mode),
            model_dir=model_dir,
            data_dir=data_dir,
            out_dir=out_dir,
            parallel=parallel,
            seed=0,
            progress=progress,
        )
    except Stop:
        result = None
    losses = {e["step"]: e["loss"] for e in events if "loss" in e}
    if kind in ("ppo", "grpo"):  # their training logs: the RL statistics of each step
        losses = {e["step"]: [e.get(k) for k in RL_KEYS + ("value_loss", "kl_coef")] for e in events if "score" in e}
    return result, losses, events


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("data"), build_tokenizer(), num_train=48, num_val=8)


@pytest.fixture(scope="module")
def pref_dir(tmp_path_factory):
    return write_preference_data(tmp_path_factory.mktemp("pref"), num_train=60, num_val=16)


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
    assert sorted(p.name for p in (out_dir / "resume").glob("step-*")) == ["step-00000002", "step-00000004"]
    result, losses, events = _run(model_dir, data_dir, out_dir, mode=mode)
    assert [e["resumed_from_step"] for e in events if "resumed_from_step" in e] == [4]
    assert sorted(losses) == [5, 6]
    for step in (5, 6):
        assert losses[step] == pytest.approx(ref_losses[step], abs=1e-6), step
    assert result["resumed_from_step"] == 4
    assert result["val_loss"] == pytest.approx(ref_result["val_loss"], abs=1e-6)
    _same_weights(out_dir, ref_dir, 1e-6)
    assert not (out_dir / "resume").exists()


@pytest.mark.parametrize(
    "optim, factors",
    # wsd over 6 updates: 1 of warmup, stable, then half a cosine from 1 to 0.2 over the last 3
    # (the 8-bit optimizers' checkpoints: tests/parallel/distributed/test_8bit_optimizers.py)
    [({"lr_scheduler": "wsd", "decay_steps": 3, "min_lr_ratio": 0.2}, [0.5, 1, 1, 1, 0.8, 0.4])],
)
def test_a_schedule_resumes_where_it_stopped(model_dir, data_dir, tmp_path, optim, factors):
    """A resumed run recomputes the same lr at every step (schedules are functions of the update count)."""
    fields = {"optim": STAGE["optim"] | optim}
    _, ref_losses, ref_events = _run(model_dir, data_dir, tmp_path / "whole", **fields)
    _run(model_dir, data_dir, tmp_path / "run", stop_at=STOP_AT, **fields)
    result, losses, events = _run(model_dir, data_dir, tmp_path / "run", **fields)
    assert result["resumed_from_step"] == 4 and sorted(losses) == [5, 6]
    ref_lrs = {e["step"]: e["lr"] for e in ref_events if "lr" in e}
    assert {e["step"]: e["lr"] for e in events if "lr" in e} == {5: ref_lrs[5], 6: ref_lrs[6]}
    # step N logs the lr of update N - 1, as the recipe's schedule gives it
    assert [ref_lrs[s] for s in range(1, 7)] == pytest.approx([5e-3 * f for f in factors])
    for step in (5, 6):
        assert losses[step] == pytest.approx(ref_losses[step], abs=1e-6), step


@pytest.mark.parametrize("kind", ["dpo", "reward_model"])
def test_pairwise_stages_resume_where_they_stopped(model_dir, pref_dir, tmp_path, kind):
    ref_result, ref_losses, _ = _run(model_dir, pref_dir, tmp_path / "whole", kind=kind, mode="lora")
    _run(model_dir, pref_dir, tmp_path / "run", kind=kind, mode="lora", stop_at=STOP_AT)
    result, losses, events = _run(model_dir, pref_dir, tmp_path / "run", kind=kind, mode="lora")
    assert [e["resumed_from_step"] for e in events if "resumed_from_step" in e] == [4]
    assert sorted(losses) == [5, 6]
    for step in (5, 6):
        assert losses[step] == pytest.approx(ref_losses[step], abs=1e-6), step
    assert result["val_before"] == ref_result["val_before"]  # kept in the checkpoint, not re-measured
    assert result["val_accuracy"] == pytest.approx(ref_result["val_accuracy"])
    assert result["val_loss"] == pytest.approx(ref_result["val_loss"], abs=1e-6)


@pytest.mark.parametrize("kind, mode", [("ppo", "full"), ("grpo", "lora")])
def test_rl_stages_resume_where_they_stopped(model_dir, data_dir, tmp_path, kind, mode):
    """Rollouts sample with the restored RNG; PPO's critic and adaptive KL coefficient come back too."""
    ref_result, ref_logs, _ = _run(model_dir, data_dir, tmp_path / "whole", kind=kind, mode=mode)
    _run(model_dir, data_dir, tmp_path / "run", kind=kind, mode=mode, stop_at=STOP_AT)
    result, logs, events = _run(model_dir, data_dir, tmp_path / "run", kind=kind, mode=mode)
    assert [e["resumed_from_step"] for e in events if "resumed_from_step" in e] == [4]
    assert sorted(logs) == [5, 6]
    for step in (5, 6):
        assert logs[step] == pytest.approx(ref_logs[step], abs=1e-5), step
    if kind == "ppo":
        assert ref_logs[6][-1] != ref_logs[1][-1], "the adaptive KL coefficient moved (so restoring it matters)"
    assert result["val_before"] == ref_result["val_before"]
    assert result["val_reward"] == pytest.approx(ref_result["val_reward"], abs=1e-6)
    assert not (tmp_path / "run" / "resume").exists()


def _stop_then_resume(rank, world_size, model_dir, data_dir, pref_dir, root):
    """Stop under dp2 (ZeRO-1), resume that run under tp2; resume a one-process checkpoint under tp2 (SFT),
    and a one-process DPO checkpoint under dp2."""
    _run(model_dir, data_dir, root / "dp2", ParallelConfig(dp_shard=2, zero=1), stop_at=STOP_AT)
    tp2 = ParallelConfig(tp=2)
    from_dp2 = _run(model_dir, data_dir, root / "dp2", tp2)
    from_one = _run(model_dir, data_dir, root / "one", tp2)
    dpo = _run(model_dir, pref_dir, root / "dpo-one", ParallelConfig(dp_replicate=2), kind="dpo")
    # GRPO under dp2: each rank samples its share of the rollouts with its own RNG, restored per rank.
    dp2 = ParallelConfig(dp_replicate=2)
    grpo_whole = _run(model_dir, data_dir, root / "grpo-whole", dp2, kind="grpo")[1]
    _run(model_dir, data_dir, root / "grpo", dp2, kind="grpo", stop_at=STOP_AT)
    grpo = _run(model_dir, data_dir, root / "grpo", dp2, kind="grpo")[1]
    return from_dp2[:2], from_one[:2], dpo[:2], (grpo_whole, grpo)


@pytest.mark.slow
def test_resume_under_another_layout(model_dir, data_dir, pref_dir, tmp_path, uninterrupted):
    ref_result, ref_losses, ref_dir = uninterrupted["full"]
    _run(model_dir, data_dir, tmp_path / "one", stop_at=STOP_AT)  # stopped in one process
    dpo_ref, dpo_ref_losses, _ = _run(model_dir, pref_dir, tmp_path / "dpo-whole", kind="dpo")
    _run(model_dir, pref_dir, tmp_path / "dpo-one", kind="dpo", stop_at=STOP_AT)
    per_rank = launch(_stop_then_resume, 2, model_dir, data_dir, pref_dir, tmp_path, timeout=900)
    for from_dp2, from_one, (dpo, dpo_losses), (grpo_whole, grpo) in per_rank:
        assert sorted(grpo) == [5, 6]
        for step in (5, 6):
            assert grpo[step] == pytest.approx(grpo_whole[step], abs=1e-5), step
        assert dpo["resumed_from_step"] == 4 and sorted(dpo_losses) == [5, 6]
        for step in (5, 6):
            assert dpo_losses[step] == pytest.approx(dpo_ref_losses[step], abs=1e-5), step
        for result, losses in (from_dp2, from_one):
            assert result["resumed_from_step"] == 4 and sorted(losses) == [5, 6]
            for step in (5, 6):
                assert losses[step] == pytest.approx(ref_losses[step], abs=1e-5), step
            assert result["val_loss"] == pytest.approx(ref_result["val_loss"], abs=1e-5)
    _same_weights(tmp_path / "dp2", ref_dir, 1e-5)
    _same_weights(tmp_path / "one", ref_dir, 1e-5)


def _deepspeed_stop_then_resume(rank, world_size, model_dir, data_dir, root):
    """parallel.engine: deepspeed (ZeRO-2, 2 ranks): stop at STOP_AT, resume; then a stopped run resumed under
    another ZeRO stage, which DeepSpeed's partitioned state cannot take."""
    from parallel.deepspeed_engine import LayoutChanged

    zero2 = ParallelConfig(engine="deepspeed", dp_shard=2, zero=2)
    _run(model_dir, data_dir, root / "ds", zero2, stop_at=STOP_AT)
    resumed = _run(model_dir, data_dir, root / "ds", zero2)
    _run(model_dir, data_dir, root / "ds-other", zero2, stop_at=STOP_AT)
    try:
        _run(model_dir, data_dir, root / "ds-other", zero2.model_copy(update={"zero": 3}))
        refused = None
    except LayoutChanged as err:
        refused = str(err)
    return resumed[:2], refused


@pytest.mark.slow
def test_deepspeed_resumes_where_it_stopped_and_refuses_another_layout(model_dir, data_dir, tmp_path, uninterrupted):
    ref_result, ref_losses, ref_dir = uninterrupted["full"]
    for (result, losses), refused in launch(_deepspeed_stop_then_resume, 2, model_dir, data_dir, tmp_path, timeout=900):
        assert result["resumed_from_step"] == 4 and sorted(losses) == [5, 6]
        for step in (5, 6):  # the native one-process run's losses: same data order, same global-batch loss
            assert losses[step] == pytest.approx(ref_losses[step], abs=1e-5), step
        assert result["val_loss"] == pytest.approx(ref_result["val_loss"], abs=1e-5)
        assert refused is not None and "at ZeRO-2, and this run has 2 at ZeRO-3" in refused, refused
    _same_weights(tmp_path / "ds", ref_dir, 1e-5)
    assert not (tmp_path / "ds" / "resume").exists()
    assert (tmp_path / "ds-other" / "resume" / "step-00000004" / "model" / "deepspeed").is_dir()  # refused, not deleted
