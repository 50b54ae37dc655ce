"""PPO stage: config, the KL controller, critic, outputs, the reference, and learning on the tiny task.

Learning figures (measured on this 2-core box, shared with other runs, so seconds vary ~5x with load):
from tiny-llama after 300 SFT steps, on the 16-fact prompt table (tests/training/rl_helpers.py):
- exact_match reward: held-out greedy exact match 0.19 -> 0.50 after 30 PPO steps (32 rollouts each),
  KL to the reference 0.6-1.1 nats per response, 24 s of RL on an idle box.
- reward model (400 Bradley-Terry steps on generated preferences, held-out pairwise accuracy 0.75, 38 s):
  held-out mean RM score 1.63 -> 2.85 after 30 steps at kl_coef 0.2, KL <= 2.2 nats per response, exact
  match unchanged (0.19 -> 0.19): the reward model is a weak proxy of correctness. At kl_coef 0.05 with a
  150-step reward model (accuracy 0.61) the score rose too while exact match fell to 0.125 (reward hacking).
The SFT start itself takes 30-150 s once per test session (shared with the DPO and reward-model tests).
"""

import json
import os

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from parallel.dims import ParallelConfig  # noqa: E402
from parallel.export import export_hf  # noqa: E402
from parallel.tiny import build_tokenizer  # noqa: E402
from tests.training.preference_helpers import sft_start_model, write_preference_data  # noqa: E402
from tests.training.rl_helpers import write_fact_prompts, write_reward_model  # noqa: E402
from tests.training.sft_helpers import write_task_data  # noqa: E402
from training.config import GRPOStage, PPOStage, RewardModelStage, TrainStage  # noqa: E402
from training.ppo import KLController, run_ppo, setup, token_values  # noqa: E402
from training.reward import run_reward_model  # noqa: E402

EXACT = "training.rewards:exact_match"
TRAIN_KEYS = {
    "step",
    "max_steps",
    "score",
    "kl",
    "kl_coef",
    "policy_loss",
    "value_loss",
    "clip_fraction",
    "value_clip_fraction",
    "approx_kl",
    "entropy",
    "response_length",
    "eos_rate",
    "lr",
    "critic_lr",
    "grad_norm",
    "critic_grad_norm",
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


@pytest.fixture(scope="module")
def reward_dir(model_dir, tmp_path_factory):
    return write_reward_model(model_dir, tmp_path_factory.mktemp("rm") / "rm", seed=1)


def _run(model_dir, data_dir, out_dir, reward_model_dir=None, **overrides):
    cfg = PPOStage(
        **{
            "max_steps": 3,
            "batch_size": 8,
            "mini_batch_size": 4,
            "ppo_epochs": 2,
            "max_new_tokens": 6,
            "eval_every": 2,
            "eval_prompts": 8,
            "reward_fn": EXACT,
            "optim": {"lr": 1e-3, "warmup_steps": 0},
            **overrides,
        }
    )
    events = []
    result = run_ppo(
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


def test_config_kinds_defaults_and_errors():
    stages = TypeAdapter(list[TrainStage]).validate_python(
        [{"kind": "ppo", "reward_fn": EXACT}, {"kind": "grpo", "group_size": 4, "mode": "lora"}]
    )
    assert [type(s) for s in stages] == [PPOStage, GRPOStage] and stages[1].group_size == 4
    ppo = PPOStage()
    assert ppo.reward_fn is None and ppo.critic_init == "auto" and not ppo.adaptive_kl and not ppo.offload_frozen
    for spec, message in (
        ("training.rewards:nope", "reward_fn: module 'training.rewards' has no attribute"),
        ("no_such_module:f", "reward_fn: cannot import module 'no_such_module'"),
        ("exact_match", "reward_fn: 'exact_match' is not of the form"),
    ):
        with pytest.raises(ValidationError, match=message):
            PPOStage(reward_fn=spec)
        with pytest.raises(ValidationError, match=message):
            GRPOStage(reward_fn=spec)
    with pytest.raises(ValidationError, match="multiple of mini_batch_size"):
        PPOStage(batch_size=10, mini_batch_size=4)
    with pytest.raises(ValidationError, match="critic_init"):
        PPOStage(critic_init="value_model")
    with pytest.raises(ValidationError):
        TypeAdapter(TrainStage).validate_python({"kind": "ppo", "kl_coeff": 0.1})


def test_kl_controller():
    fixed = KLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.coef == 0.1
    adaptive = KLController(0.1, target=6.0, horizon=1000)
    adaptive.update(12.0, 100)  # far above target: the error is clipped at +0.2
    assert adaptive.coef == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    adaptive.update(3.0, 100)  # below target: the coefficient shrinks
    assert adaptive.coef == pytest.approx(0.1 * 1.02 * (1 - 0.2 * 100 / 1000))
    adaptive.update(6.0, 100)
    assert adaptive.coef == pytest.approx(0.1 * 1.02 * 0.98)


def test_run_writes_exportable_checkpoint_result_and_progress(model_dir, data_dir, tmp_path):
    result, train, val = _run(model_dir, data_dir, tmp_path, adaptive_kl=True, kl_target=0.01, kl_horizon=8)
    assert [e["step"] for e in train] == [1, 2, 3] and all(set(e) == TRAIN_KEYS for e in train)
    # Efficiency (training.loop): the updates' tokens/s, sampling's apart, peak memory; no MFU on CPU.
    assert all(e["tokens_per_s"] > 0 and e["generation_tokens_per_s"] > 0 and 0 < e["peak_mem_gib"] < 64 for e in train)
    assert [e["step"] for e in val] == [0, 2, 3] and all(set(e) == VAL_KEYS for e in val)
    # The policy starts as the reference: the first rollout's KL is exactly 0, so the coefficient shrinks.
    assert train[0]["kl"] == 0.0 and train[0]["kl_coef"] == 0.05
    assert train[1]["kl_coef"] == pytest.approx(0.05 * (1 - 0.2 * 8 / 8))
    assert train[-1]["kl"] != 0.0 and all(0 < e["response_length"] <= 6 for e in train)
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))
    assert result["val_before"] == {k: v for k, v in val[0].items() if k != "step"}
    assert result["reward"] == f"function:{EXACT}" and result["critic_init"] == "policy"
    assert result["data"]["train"]["prompts"] == 40 and result["trainable_params"] == result["total_params"]
    ckpt = tmp_path / "checkpoint"
    assert json.loads((ckpt / "hpcft_checkpoint.json").read_text())["mode"] == "full"
    assert export_hf(model_dir, ckpt, tmp_path / "export")["max_abs_logit_diff"] <= 1e-4
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(ckpt)
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(trained.lm_head.weight, start.lm_head.weight)  # it trained


def test_reward_model_run_with_offloaded_frozen_models_and_rm_critic(model_dir, data_dir, reward_dir, tmp_path):
    on_device, train, _ = _run(model_dir, data_dir, tmp_path / "a", reward_dir, reward_fn=None, max_steps=2)
    offloaded, train_off, _ = _run(
        model_dir, data_dir, tmp_path / "b", reward_dir, reward_fn=None, max_steps=2, offload_frozen=True
    )
    assert on_device["reward"] == f"model:{reward_dir.resolve()}" and on_device["critic_init"] == "reward_model"
    assert train[0]["score"] != 0.0  # a real scalar score, not a 0/1 rule
    # Where the frozen models live changes nothing in the numbers.
    assert [e["score"] for e in train] == pytest.approx([e["score"] for e in train_off], abs=1e-6)
    assert offloaded["final_policy_loss"] == pytest.approx(on_device["final_policy_loss"], abs=1e-6)


def test_critic_from_reward_model_keeps_its_head_and_reads_every_position(model_dir, data_dir, reward_dir):
    from transformers import AutoModelForSequenceClassification

    s = setup(
        PPOStage(batch_size=8, mini_batch_size=4, reward_fn=EXACT),
        model_dir,
        data_dir,
        ParallelConfig(),
        0,
        reward_model_dir=reward_dir,
    )
    head = AutoModelForSequenceClassification.from_pretrained(reward_dir).score.weight
    assert torch.equal(s.critic.score.weight.detach(), head)
    rollout, _ = s.sampler(s.policy, s.train_prompts[:3], max_new_tokens=5)
    values = token_values(s.critic, rollout, s.runtime)
    assert values.shape == rollout.response_ids.shape and values.requires_grad
    s_policy = setup(
        PPOStage(batch_size=8, mini_batch_size=4, reward_fn=EXACT, critic_init="policy"),
        model_dir,
        data_dir,
        ParallelConfig(),
        0,
        reward_model_dir=reward_dir,
    )
    assert not torch.equal(s_policy.critic.score.weight.detach(), head)


def test_lora_reference_is_the_policy_with_adapters_off(model_dir, data_dir, tmp_path):
    result, train, _ = _run(
        model_dir, data_dir, tmp_path, mode="lora", lora={"r": 4}, max_steps=2, optim={"lr": 1e-2, "warmup_steps": 0}
    )
    assert train[0]["kl"] == 0.0 and train[1]["kl"] != 0.0
    ckpt = tmp_path / "checkpoint"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    assert 0 < result["trainable_params"] < result["total_params"] / 5
    assert export_hf(model_dir, ckpt, tmp_path / "export")["merged"]


def test_user_errors_before_any_training(model_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match="no reward model directory was given"):
        run_ppo(
            PPOStage(batch_size=8, mini_batch_size=4),
            model_dir=model_dir,
            data_dir=data_dir,
            out_dir=tmp_path,
            parallel=ParallelConfig(),
            seed=0,
        )
    with pytest.raises(ValueError, match="critic_init is 'reward_model'"):
        run_ppo(
            PPOStage(reward_fn=EXACT, critic_init="reward_model", batch_size=8, mini_batch_size=4),
            model_dir=model_dir,
            data_dir=data_dir,
            out_dir=tmp_path,
            parallel=ParallelConfig(),
            seed=0,
        )
    with pytest.raises(ValueError, match="does not exist"):
        run_ppo(
            PPOStage(batch_size=8, mini_batch_size=4),
            model_dir=model_dir,
            data_dir=data_dir,
            out_dir=tmp_path,
            parallel=ParallelConfig(),
            seed=0,
            reward_model_dir=tmp_path / "nowhere",
        )
    with pytest.raises(ValueError, match="world size 2 .* needs 2 processes, but torch.distributed is not"):
        run_ppo(
            PPOStage(reward_fn=EXACT),
            model_dir=model_dir,
            data_dir=data_dir,
            out_dir=tmp_path,
            parallel=ParallelConfig(dp_shard=2),
            seed=0,
        )
    with pytest.raises(ValueError, match="batch_size 64 is larger than the 40 training prompts"):
        run_ppo(
            PPOStage(reward_fn=EXACT),
            model_dir=model_dir,
            data_dir=data_dir,
            out_dir=tmp_path,
            parallel=ParallelConfig(),
            seed=0,
        )
    assert not (tmp_path / "checkpoint").exists()


# Measured: see the module docstring. 30 steps x 32 prompts, 2 epochs of 16-rollout mini-batches.
LEARN = dict(
    max_steps=30,
    batch_size=32,
    mini_batch_size=16,
    ppo_epochs=2,
    max_new_tokens=6,
    eval_every=30,
    log_every=5,
    kl_coef=0.05,
    reward_fn=EXACT,
    optim={"lr": 3e-4, "warmup_steps": 0, "min_lr_ratio": 1.0},
    critic_optim={"lr": 1e-3, "warmup_steps": 0, "min_lr_ratio": 1.0},
)


@pytest.mark.slow
def test_ppo_raises_heldout_reward_with_bounded_kl(tmp_path_factory, tmp_path):
    start = sft_start_model(tmp_path_factory.mktemp("start"))
    data = write_fact_prompts(tmp_path / "facts", num_facts=16)
    events = []
    result = run_ppo(
        PPOStage(**LEARN),
        model_dir=start,
        data_dir=data,
        out_dir=tmp_path / "ppo",
        parallel=ParallelConfig(),
        seed=0,
        progress=events.append,
    )
    before = result["val_before"]["val_exact_match"]
    assert 0.05 < before < 0.5, result  # partly learned
    assert result["val_exact_match"] >= before + 0.2, result
    assert result["val_reward"] == result["val_exact_match"]  # exact_match is the reward here
    kls = [e["kl"] for e in events if "kl" in e]
    assert max(kls) < 3.0, kls  # nats per response; ~1 measured


@pytest.mark.slow
def test_ppo_raises_heldout_reward_model_score_with_bounded_kl(tmp_path_factory, tmp_path):
    start = sft_start_model(tmp_path_factory.mktemp("start"))
    preferences = write_preference_data(tmp_path / "pref", num_train=1000, num_val=200)
    rm = run_reward_model(
        RewardModelStage(
            max_steps=400,
            batch_size=16,
            seq_len=96,
            eval_every=400,
            log_every=100,
            optim={"lr": 5e-4, "warmup_steps": 10},
        ),
        model_dir=start,
        data_dir=preferences,
        out_dir=tmp_path / "rm",
        parallel=ParallelConfig(),
        seed=0,
    )
    assert rm["val_accuracy"] >= 0.7, rm
    events = []
    result = run_ppo(
        PPOStage(**{**LEARN, "reward_fn": None, "kl_coef": 0.2}),
        model_dir=start,
        data_dir=write_fact_prompts(tmp_path / "facts", num_facts=16),
        out_dir=tmp_path / "ppo",
        parallel=ParallelConfig(),
        seed=0,
        reward_model_dir=tmp_path / "rm" / "checkpoint",
        progress=events.append,
    )
    assert result["critic_init"] == "reward_model" and result["reward"].startswith("model:")
    before = result["val_before"]
    assert result["val_reward"] >= before["val_reward"] + 0.5, result
    # The proxy is optimised; whether the task survives depends on the proxy. With this weak reward model
    # exact match fell 0.31 -> 0.125 (kl_coef 0.2) and -> 0.06 (0.5) after the step batching changed
    # (issue 12; it held before): reward hacking, which the gate catches in recipes/tiny-rlhf.yaml.
    kls = [e["kl"] for e in events if "kl" in e]
    assert max(kls) < 4.0, kls  # nats per response; <= 2.2 measured
