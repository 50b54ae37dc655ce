"""Typed configuration of training stages (entries of a recipe's `stages:` list)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraConfig(_Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class QuantConfig(_Section):
    """4-bit base weights for mode: qlora (bitsandbytes); the LoRA adapters train in full precision."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, description="quantize the quantization constants too (~0.4 bit/param less)")


class OptimConfig(_Section):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")


def _checkpoint_every(default: int = 100):
    return Field(
        default,
        ge=0,
        description="save a resumable training state every N steps (0: never); a "
        "restarted stage (requeued, preempted, crashed) resumes from the latest, under any layout",
    )


class SFTStage(_Section):
    kind: Literal["sft"] = "sft"
    name: str = "sft"
    mode: Literal["full", "lora", "qlora"] = Field("full", description="qlora: LoRA on a 4-bit base (bitsandbytes)")
    lora: LoraConfig = LoraConfig()
    quant: QuantConfig = QuantConfig()
    optim: OptimConfig = OptimConfig()
    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1, description="sequences per optimizer step (global)")
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(128, ge=8)
    eval_every: int = Field(50, ge=1, description="validation loss every N steps")
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = _checkpoint_every()
    seed: int | None = Field(None, description="defaults to the recipe seed")

    @model_validator(mode="after")
    def _batch_divides(self) -> "SFTStage":
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}")
        return self


def _check_accum(stage, batch_size: int, grad_accum: int, unit: str):
    if batch_size % grad_accum:
        raise ValueError(f"batch_size {batch_size} must be a multiple of grad_accum {grad_accum} ({unit})")
    return stage


class DPOStage(_Section):
    """Direct preference optimisation on {prompt, chosen, rejected} rows against a frozen reference."""

    kind: Literal["dpo"] = "dpo"
    name: str = "dpo"
    mode: Literal["full", "lora", "qlora"] = Field(
        "full", description="lora/qlora: the reference is the model with adapters disabled, so no second copy is held"
    )
    lora: LoraConfig = LoraConfig()
    quant: QuantConfig = QuantConfig()
    optim: OptimConfig = OptimConfig(lr=5e-6, warmup_steps=10)
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference")
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO: assumed label noise")
    rpo_alpha: float = Field(
        0.0,
        ge=0,
        description="weight of the chosen side's per-token NLL added to the "
        "loss (RPO): keeps the chosen answers' likelihood from sinking with the rejected",
    )
    precompute_reference: bool = Field(
        False,
        description="reference log-probs computed once before "
        "training (no reference forward per step; the full copy is freed)",
    )
    max_steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1, description="preference pairs per optimizer step (global)")
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(256, ge=8, description="tokens of prompt + response, each side of a pair")
    eval_every: int = Field(50, ge=1, description="held-out preference accuracy every N steps")
    checkpoint_every: int = _checkpoint_every()
    log_every: int = Field(10, ge=1)
    seed: int | None = Field(None, description="defaults to the recipe seed")

    @model_validator(mode="after")
    def _batch_divides(self) -> "DPOStage":
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only, not ipo")
        return _check_accum(self, self.batch_size, self.grad_accum, "pairs")


class RewardModelStage(_Section):
    """A scalar reward head on the LM trained with the Bradley-Terry loss on preference rows."""

    kind: Literal["reward_model"] = "reward_model"
    name: str = "reward_model"
    mode: Literal["full", "lora", "qlora"] = Field(
        "full", description="qlora: LoRA on a 4-bit base (bitsandbytes), the score head trained in full precision"
    )
    quant: QuantConfig = QuantConfig()
    lora: LoraConfig = LoraConfig()
    optim: OptimConfig = OptimConfig(lr=1e-4, warmup_steps=10)
    max_steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1, description="preference pairs per optimizer step (global)")
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(256, ge=8)
    eval_every: int = Field(50, ge=1, description="held-out pairwise accuracy every N steps")
    checkpoint_every: int = _checkpoint_every()
    log_every: int = Field(10, ge=1)
    seed: int | None = Field(None, description="defaults to the recipe seed")

    @model_validator(mode="after")
    def _batch_divides(self) -> "RewardModelStage":
        return _check_accum(self, self.batch_size, self.grad_accum, "pairs")


class _RLStage(_Section):
    """Fields PPO and GRPO share: the policy, sampling, the clipped update and the reward."""

    mode: Literal["full", "lora", "qlora"] = Field(
        "full",
        description="lora/qlora (4-bit base, bitsandbytes): the reference is the policy with adapters "
        "disabled, so no second copy is held; PPO's critic is quantized alike",
    )
    lora: LoraConfig = LoraConfig()
    quant: QuantConfig = QuantConfig()
    optim: OptimConfig = Field(
        OptimConfig(lr=1e-6, warmup_steps=0, min_lr_ratio=1.0),
        description="the policy's optimizer; warmup_steps and the schedule count "
        "optimizer updates (ppo_epochs x mini-batches per step)",
    )
    max_steps: int = Field(100, ge=1, description="rollout batches (each followed by ppo_epochs of updates)")
    ppo_epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    clip_eps: float = Field(0.2, gt=0, description="policy ratio clip range")
    max_prompt_len: int = Field(
        256, ge=8, description="prompt tokens (with the chat template); longer prompts are skipped and counted"
    )
    max_new_tokens: int = Field(64, ge=1, description="response tokens sampled per prompt")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; log-probs are taken at it too")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    reward_fn: str | None = Field(
        None,
        description="rule reward 'package.module:function' called as "
        "fn(prompt_messages, response, reference) -> float, e.g. "
        "'training.rewards:exact_match'; None scores with the reward model the "
        "stage is given (reward_model_dir)",
    )
    offload_frozen: bool = Field(
        False,
        description="keep the reference and reward models on CPU, moving them "
        "to the accelerator only for their forward passes",
    )
    eval_every: int = Field(10, ge=1, description="held-out greedy reward / exact match every N steps (and at step 0)")
    checkpoint_every: int = _checkpoint_every(20)
    eval_prompts: int = Field(128, ge=1, description="validation prompts scored per evaluation (the first N)")
    log_every: int = Field(1, ge=1)
    seed: int | None = Field(None, description="defaults to the recipe seed")

    @model_validator(mode="after")
    def _reward_fn_imports(self) -> "_RLStage":
        if self.reward_fn is not None:
            from training.rewards import load_reward_fn

            try:
                load_reward_fn(self.reward_fn)
            except ValueError as err:
                raise ValueError(f"reward_fn: {err}") from None
        return self


class PPOStage(_RLStage):
    """PPO with a critic, a per-token KL penalty against a frozen reference, and GAE advantages."""

    kind: Literal["ppo"] = "ppo"
    name: str = "ppo"
    critic_optim: OptimConfig = Field(
        OptimConfig(lr=1e-5, warmup_steps=0, min_lr_ratio=1.0),
        description="the critic's optimizer, stepped with the policy's",
    )
    critic_init: Literal["auto", "reward_model", "policy"] = Field(
        "auto",
        description="the critic's starting weights: auto = the reward model when the stage is given one "
        "(even with reward_fn set), else the policy with a fresh value head",
    )
    batch_size: int = Field(64, ge=1, description="prompts sampled per rollout batch (one response each)")
    mini_batch_size: int = Field(16, ge=1, description="rollouts per optimizer update")
    kl_coef: float = Field(0.05, ge=0, description="initial coefficient of the per-token KL penalty")
    adaptive_kl: bool = Field(False, description="adapt kl_coef towards kl_target (proportional controller)")
    kl_target: float = Field(6.0, gt=0, description="target KL (nats per response) of the adaptive controller")
    kl_horizon: int = Field(10000, ge=1, description="adaptive controller horizon, in rollouts")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    value_clip_eps: float = Field(0.2, gt=0, description="value clip range around the rollout's values")
    whiten_advantages: bool = True

    @model_validator(mode="after")
    def _batches_divide(self) -> "PPOStage":
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of mini_batch_size {self.mini_batch_size}"
            )
        return self


class GRPOStage(_RLStage):
    """GRPO: group-relative advantages over several samples per prompt, no critic, k3 KL to the reference."""

    kind: Literal["grpo"] = "grpo"
    name: str = "grpo"
    batch_size: int = Field(16, ge=1, description="prompts per rollout batch")
    group_size: int = Field(8, ge=2, description="responses sampled per prompt")
    mini_batch_size: int | None = Field(
        None,
        ge=1,
        description="responses per optimizer update; batch_size "
        "x group_size must be a multiple of it; None: all of them (one "
        "update per epoch)",
    )
    beta: float = Field(
        0.04, ge=0, description="coefficient of the k3 KL estimate in the loss; 0 drops the reference model"
    )
    scale_rewards: bool = Field(True, description="divide each group's centred rewards by its std")

    @model_validator(mode="after")
    def _batches_divide(self) -> "GRPOStage":
        responses = self.batch_size * self.group_size
        if self.mini_batch_size is not None and responses % self.mini_batch_size:
            raise ValueError(
                f"batch_size x group_size = {responses} responses must be a multiple of "
                f"mini_batch_size {self.mini_batch_size}"
            )
        return self


# One entry of a recipe's `stages:` list, chosen by its `kind`.
TrainStage = Annotated[Union[SFTStage, DPOStage, RewardModelStage, PPOStage, GRPOStage], Field(discriminator="kind")]
