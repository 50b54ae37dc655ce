"""GRPO stage: groups, outputs, the reference (copy, adapters off, none), and learning on the tiny task.

Learning figures (measured on this 2-core box, shared with other runs, so seconds vary ~5x with load):
from tiny-llama after 300 SFT steps, on the 16-fact prompt table (tests/training/rl_helpers.py), held-out
greedy exact match 0.19 -> 0.44 after 20 GRPO steps (16 prompts x 8 samples, exact_match reward, beta
0.04), k3 KL to the reference ~0.3 per token; 160 s of RL under load, ~25 s idle. On the whole generated
task (~1000 distinct prompts) 30 steps moved nothing measurable: every fact is visited about once.
"""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from parallel.dims import ParallelConfig  # noqa: E402
from parallel.export import export_hf  # noqa: E402
from parallel.tiny import build_tokenizer  # noqa: E402
from tests.training.preference_helpers import sft_start_model  # noqa: E402
from tests.training.rl_helpers import write_fact_prompts, write_reward_model  # noqa: E402
from tests.training.sft_helpers import write_task_data  # noqa: E402
from training.config import GRPOStage  # noqa: E402
from training.grpo import run_grpo, setup  # noqa: E402

EXACT = "training.rewards:exact_match"
LENGTH = "tests.training.rl_helpers:reward_length"  # dense, so a random model's groups have a spread
TRAIN_KEYS = {
    "step",
    "max_steps",
    "score",
    "score_std",
    "zero_std_fraction",
    "loss",
    "policy_loss",
    "kl",
    "clip_fraction",
    "approx_kl",
    "entropy",
    "response_length",
    "eos_rate",
    "lr",
    "grad_norm",
    "rollouts_per_s",
    "tokens_per_s",  # the updates' tokens
    "generation_tokens_per_s",
    "peak_mem_gib",
    "elapsed_s",
}
VAL_KEYS = {"step", "val_reward", "val_exact_match", "val_response_length", "val_eos_rate"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("task"), build_tokenizer(), num_train=40, num_val=12)


def _run(model_dir, data_dir, out_dir, reward_model_dir=None, **overrides):
    cfg = GRPOStage(
        **{
            "max_steps": 3,
            "batch_size": 4,
            "group_size": 4,
            "max_new_tokens": 6,
            "eval_every": 2,
            "eval_prompts": 8,
            "reward_fn": LENGTH,
            "optim": {"lr": 1e-3, "warmup_steps": 0},
            **overrides,
        }
    )
    events = []
    result = run_grpo(
        cfg,
        model_dir=model_dir,
        data_dir=data_dir,
        out_dir=out_dir,
        parallel=ParallelConfig(),
        seed=0,
        reward_model_dir=reward_model_dir,
        progress=events.append,
    )
    return result, [e for e in events if "score" in e], [e for e in events if "val_reward" in e]


def test_run_writes_exportable_checkpoint_result_and_progress(model_dir, data_dir, tmp_path):
    result, train, val = _run(model_dir, data_dir, tmp_path)
    assert [e["step"] for e in train] == [1, 2, 3] and all(set(e) == TRAIN_KEYS for e in train)
    # Efficiency (training.loop): the updates' tokens/s, sampling's apart, peak memory; no MFU on CPU.
    assert all(e["tokens_per_s"] > 0 and e["generation_tokens_per_s"] > 0 and 0 < e["peak_mem_gib"] < 64 for e in train)
    assert [e["step"] for e in val] == [0, 2, 3] and all(set(e) == VAL_KEYS for e in val)
    # One update per rollout batch: the ratio is exactly 1, so nothing is clipped; the policy starts as
    # the reference, so the first step's KL is 0 and later ones are not.
    assert all(e["clip_fraction"] == 0.0 and e["approx_kl"] == 0.0 for e in train)
    assert train[0]["kl"] == 0.0 and train[-1]["kl"] > 0.0
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))
    assert result["val_before"] == {k: v for k, v in val[0].items() if k != "step"}
    assert result["reward"] == f"function:{LENGTH}" and result["group_size"] == 4
    assert val[0]["val_exact_match"] == 0.0 and val[0]["val_reward"] > 0.0  # scored by the stage's reward
    ckpt = tmp_path / "checkpoint"
    assert json.loads((ckpt / "hpcft_checkpoint.json").read_text())["mode"] == "full"
    assert export_hf(model_dir, ckpt, tmp_path / "export")["max_abs_logit_diff"] <= 1e-4


def test_advantages_are_relative_to_each_prompts_group(model_dir, data_dir, tmp_path):
    # A reward that depends on the prompt only differs between groups, never within one: every
    # advantage is 0, so there is no gradient (beta 0: no KL term either), whatever the scores are.
    _, train, _ = _run(
        model_dir, data_dir, tmp_path, max_steps=1, beta=0.0, reward_fn="tests.training.rl_helpers:reward_by_prompt"
    )
    assert train[0]["score"] not in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)  # the groups did score differently
    assert train[0]["zero_std_fraction"] == 1.0 and train[0]["score_std"] == 0.0
    assert train[0]["loss"] == 0.0 and train[0]["grad_norm"] == 0.0


def test_multiple_epochs_and_minibatches_clip(model_dir, data_dir, tmp_path):
    _, train, _ = _run(
        model_dir,
        data_dir,
        tmp_path,
        max_steps=2,
        mini_batch_size=8,
        ppo_epochs=3,
        clip_eps=0.05,
        optim={"lr": 1e-2, "warmup_steps": 0},
    )
    assert max(e["clip_fraction"] for e in train) > 0 and max(e["approx_kl"] for e in train) > 0


def test_beta_zero_holds_no_reference(model_dir, data_dir):
    s = setup(
        GRPOStage(batch_size=4, group_size=4, beta=0.0, reward_fn=EXACT), model_dir, data_dir, ParallelConfig(), 0
    )
    assert s.reference is None
    s = setup(
        GRPOStage(batch_size=4, group_size=4, reward_fn=EXACT, offload_frozen=True),
        model_dir,
        data_dir,
        ParallelConfig(),
        0,
    )
    assert all(p.device.type == "cpu" and not p.requires_grad for p in s.reference.frozen.model.parameters())


def test_lora_run_with_a_reward_model(model_dir, data_dir, tmp_path):
    rm = write_reward_model(model_dir, tmp_path / "rm")
    result, train, _ = _run(
        model_dir,
        data_dir,
        tmp_path / "out",
        rm,
        reward_fn=None,
        mode="lora",
        lora={"r": 4},
        max_steps=2,
        optim={"lr": 1e-2, "warmup_steps": 0},
    )
    assert result["reward"] == f"model:{rm.resolve()}" and train[0]["kl"] == 0.0 and train[1]["kl"] > 0.0
    assert train[0]["score_std"] > 0.0  # scalar scores differ within groups
    ckpt = tmp_path / "out" / "checkpoint"
    assert (ckpt / "adapter_model.safetensors").exists()
    assert 0 < result["trainable_params"] < result["total_params"] / 5


def test_user_errors_before_any_training(model_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match="the grpo stage scores responses with a reward model"):
        run_grpo(
            GRPOStage(batch_size=4),
            model_dir=model_dir,
            data_dir=data_dir,
            out_dir=tmp_path,
            parallel=ParallelConfig(),
            seed=0,
        )
    with pytest.raises(ValueError, match="world size 4 .* needs 4 processes, but torch.distributed is not"):
        run_grpo(
            GRPOStage(reward_fn=EXACT),
            model_dir=model_dir,
            data_dir=data_dir,
            out_dir=tmp_path,
            parallel=ParallelConfig(tp=2, dp_shard=2),
            seed=0,
        )
    assert not (tmp_path / "checkpoint").exists()


# Measured: see the module docstring.
LEARN = dict(
    max_steps=20,
    batch_size=16,
    group_size=8,
    mini_batch_size=64,
    max_new_tokens=6,
    eval_every=20,
    log_every=5,
    beta=0.04,
    reward_fn=EXACT,
    optim={"lr": 3e-4, "warmup_steps": 0, "min_lr_ratio": 1.0},
)


@pytest.mark.slow
def test_grpo_raises_heldout_reward_with_bounded_kl(tmp_path_factory, tmp_path):
    start = sft_start_model(tmp_path_factory.mktemp("start"))
    data = write_fact_prompts(tmp_path / "facts", num_facts=16)
    events = []
    result = run_grpo(
        GRPOStage(**LEARN),
        model_dir=start,
        data_dir=data,
        out_dir=tmp_path / "grpo",
        parallel=ParallelConfig(),
        seed=0,
        progress=events.append,
    )
    before = result["val_before"]["val_exact_match"]
    assert 0.05 < before < 0.5, result  # partly learned
    assert result["val_exact_match"] >= before + 0.15, result
    kls = [e["kl"] for e in events if "kl" in e]
    assert max(kls) < 1.0, kls  # k3 per token; ~0.3 measured
    assert torch.isfinite(torch.tensor(kls)).all()
