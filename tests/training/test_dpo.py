"""DPO stage: the loop, the reference (copy, adapters off, precomputed), outputs, and learning on the tiny task."""

import json
import math
import os

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from parallel.dims import ParallelConfig  # noqa: E402
from parallel.export import export_hf  # noqa: E402
from tests.training.preference_helpers import sft_start_model, write_preference_data  # noqa: E402
from training.config import DPOStage, RewardModelStage, SFTStage, TrainStage  # noqa: E402
from training.dpo import pair_logprobs, run_dpo, setup  # noqa: E402
from training.preference import eval_pair_batches  # noqa: E402

TRAIN_KEYS = {
    "step",
    "max_steps",
    "loss",
    "margin",
    "accuracy",
    "chosen_reward",
    "rejected_reward",
    "kl",
    "lr",
    "grad_norm",
    "pairs_per_s",
    "tokens_per_s",
    "peak_mem_gib",
    "elapsed_s",
}
VAL_KEYS = {"step", "val_loss", "val_accuracy", "val_margin", "val_logp_accuracy", "val_logp_margin", "val_kl"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_preference_data(tmp_path_factory.mktemp("pref"), num_train=60, num_val=16)


def _run(model_dir, data_dir, out_dir, **overrides):
    cfg = DPOStage(
        **{
            "max_steps": 4,
            "batch_size": 8,
            "grad_accum": 2,
            "seq_len": 64,
            "log_every": 1,
            "eval_every": 2,
            "optim": {"lr": 5e-3, "warmup_steps": 0},
            **overrides,
        }
    )
    events = []
    result = run_dpo(
        cfg,
        model_dir=model_dir,
        data_dir=data_dir,
        out_dir=out_dir,
        parallel=ParallelConfig(),
        seed=0,
        progress=events.append,
    )
    return result, [e for e in events if "loss" in e], [e for e in events if "val_loss" in e]


def test_stage_kinds_are_a_discriminated_union():
    stages = TypeAdapter(list[TrainStage]).validate_python(
        [{"kind": "sft"}, {"kind": "dpo", "beta": 0.2, "mode": "lora"}, {"kind": "reward_model", "name": "rm"}]
    )
    assert [type(s) for s in stages] == [SFTStage, DPOStage, RewardModelStage] and stages[1].beta == 0.2
    with pytest.raises(ValidationError, match="label_smoothing"):
        DPOStage(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValidationError, match="sigmoid and robust losses only, not hinge"):
        DPOStage(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValidationError, match="loss_type"):
        DPOStage(loss_type="exo_pair")
    with pytest.raises(ValidationError, match="multiple of grad_accum"):
        DPOStage(batch_size=6, grad_accum=4)
    with pytest.raises(ValidationError):
        TypeAdapter(TrainStage).validate_python({"kind": "dpo", "beta": 0.1, "max_stpes": 3})


def test_first_step_loss_is_log2_when_policy_is_the_reference(model_dir, data_dir, tmp_path):
    _, train, val = _run(model_dir, data_dir, tmp_path, max_steps=1)
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-5) and train[0]["margin"] == pytest.approx(0.0, abs=1e-6)
    assert val[0]["step"] == 0 and val[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert val[0]["val_accuracy"] == 0.0 and val[0]["val_kl"] == 0.0


@pytest.mark.parametrize(
    "variant, first_loss",
    [
        (dict(loss_type="ipo", beta=0.1), (1 / (2 * 0.1)) ** 2),
        (dict(loss_type="hinge", beta=0.1), 1.0),  # relu(1 - beta * 0)
    ],
)
def test_variant_first_step_loss(model_dir, data_dir, tmp_path, variant, first_loss):
    _, train, val = _run(model_dir, data_dir, tmp_path, max_steps=1, **variant)
    assert train[0]["loss"] == pytest.approx(first_loss, rel=1e-5)
    assert val[0]["val_loss"] == pytest.approx(first_loss, rel=1e-5)


def test_full_run_writes_exportable_checkpoint_result_and_progress(model_dir, data_dir, tmp_path):
    result, train, val = _run(model_dir, data_dir, tmp_path)
    assert [e["step"] for e in train] == [1, 2, 3, 4] and all(set(e) == TRAIN_KEYS for e in train)
    # Efficiency (training.loop): both sides' tokens/s and peak memory; CPU has no peak FLOP/s, so no MFU.
    assert all(e["tokens_per_s"] > 0 and 0 < e["peak_mem_gib"] < 64 for e in train)
    assert [e["step"] for e in val] == [0, 2, 4] and all(set(e) == VAL_KEYS for e in val)
    # The policy leaves the reference (whether 4 steps already help depends on the batches drawn; learning
    # is shown by test_dpo_raises_heldout_preference_accuracy_and_margin).
    assert abs(train[-1]["margin"]) > 1e-3 and train[-1]["loss"] != pytest.approx(math.log(2), abs=1e-4)
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))
    assert result["val_before"] == {k: v for k, v in val[0].items() if k != "step"}
    assert result["val_accuracy"] == val[-1]["val_accuracy"] and result["trainable_params"] == result["total_params"]
    bad = result["data"]["train"]["rejected"]
    assert sum(bad.values()) + result["data"]["train"]["pairs"] == 60 and bad
    ckpt = tmp_path / "checkpoint"
    assert json.loads((ckpt / "hpcft_checkpoint.json").read_text())["mode"] == "full"
    assert export_hf(model_dir, ckpt, tmp_path / "export")["max_abs_logit_diff"] <= 1e-4


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_precomputed_reference_gives_the_same_run(model_dir, data_dir, tmp_path, mode):
    _, live, live_val = _run(model_dir, data_dir, tmp_path / "live", mode=mode, max_steps=3)
    _, pre, pre_val = _run(model_dir, data_dir, tmp_path / "pre", mode=mode, max_steps=3, precompute_reference=True)
    assert [e["loss"] for e in live] == pytest.approx([e["loss"] for e in pre], abs=1e-6)
    assert live_val[-1]["val_margin"] == pytest.approx(pre_val[-1]["val_margin"], abs=1e-6)


def test_lora_reference_is_the_policy_with_adapters_off(model_dir, data_dir, tmp_path):
    cfg = DPOStage(mode="lora", batch_size=8, seq_len=64, lora={"r": 4})
    s = setup(cfg, model_dir, data_dir, ParallelConfig(), seed=0)
    assert s.reference.copy is None and s.reference.policy is s.policy  # no second model
    with torch.no_grad():  # move the adapters off zero: the policy changes, the reference must not
        for name, p in s.policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    before = s.val_ref
    after = s.reference.all_pairs(s.val_pairs, 8, s.pad_id, s.runtime)
    assert torch.allclose(before, after, atol=1e-5)
    with torch.no_grad():
        policy = torch.stack(pair_logprobs(s.policy, eval_pair_batches(s.val_pairs, 8, s.pad_id)[0], s.runtime), 1)
    assert not torch.allclose(policy, before[: len(policy)], atol=1e-3)


def test_lora_run_saves_adapter(model_dir, data_dir, tmp_path):
    result, _, _ = _run(model_dir, data_dir, tmp_path, mode="lora", max_steps=2)
    ckpt = tmp_path / "checkpoint"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    assert 0 < result["trainable_params"] < result["total_params"] / 5


def test_qlora_run_uses_a_4bit_base_and_exports(model_dir, data_dir, tmp_path):
    result, train, _ = _run(model_dir, data_dir, tmp_path, mode="qlora", max_steps=2)
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # reference = adapters off
    assert (tmp_path / "checkpoint" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "checkpoint" / "hpcft_checkpoint.json").read_text())["mode"] == "qlora"
    assert export_hf(model_dir, tmp_path / "checkpoint", tmp_path / "export")["merged"]


def test_multi_process_layout_and_missing_split_are_user_errors(model_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match="needs 2 processes, but torch.distributed is not initialised"):
        run_dpo(
            DPOStage(),
            model_dir=model_dir,
            data_dir=data_dir,
            out_dir=tmp_path,
            parallel=ParallelConfig(dp_shard=2),
            seed=0,
        )
    with pytest.raises(ValueError, match="validation.jsonl does not exist"):
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "train.jsonl").write_text((data_dir / "train.jsonl").read_text())
        run_dpo(
            DPOStage(batch_size=8),
            model_dir=model_dir,
            data_dir=tmp_path / "d",
            out_dir=tmp_path,
            parallel=ParallelConfig(),
            seed=0,
        )
    assert not (tmp_path / "checkpoint").exists()


# Measured (see the report of issue 5): from tiny-llama after 300 SFT steps, 150 DPO steps lift held-out
# implicit-reward accuracy from 0 (all ties) to ~0.7 and the policy's own chosen-minus-rejected log-prob
# margin from ~1.4 to ~3 nats. Plain DPO also sank the chosen answers' likelihood (val_kl -6 nats; exact
# match 0.55 -> 0.39 from a 500-step SFT start); with rpo_alpha 1 (chosen NLL added) val_kl stayed > 0,
# logp accuracy rose 0.87 -> 0.94 and exact match 0.55 -> 0.62 (tiny-dpo.yaml's data, 150 steps, 133 s).
LEARN = dict(
    max_steps=150,
    batch_size=16,
    seq_len=96,
    eval_every=150,
    log_every=25,
    beta=0.1,
    rpo_alpha=1.0,
    precompute_reference=True,
    optim={"lr": 2e-4, "warmup_steps": 10},
)


@pytest.mark.slow
def test_dpo_raises_heldout_preference_accuracy_and_margin(tmp_path_factory, tmp_path):
    start = sft_start_model(tmp_path_factory.mktemp("start"))
    data = write_preference_data(tmp_path / "pref", num_train=1000, num_val=200)
    result = run_dpo(
        DPOStage(**LEARN), model_dir=start, data_dir=data, out_dir=tmp_path / "dpo", parallel=ParallelConfig(), seed=0
    )
    before = result["val_before"]
    assert before["val_accuracy"] == 0.0 and 0.55 < before["val_logp_accuracy"] < 0.95  # partly right
    assert result["val_accuracy"] >= 0.62, result
    assert result["val_logp_margin"] >= before["val_logp_margin"] + 0.75, result
    assert result["val_loss"] < math.log(2) - 0.03 and result["val_margin"] > 0.1, result
    assert result["val_kl"] > -0.5, result  # the chosen answers did not lose likelihood (rpo_alpha)
