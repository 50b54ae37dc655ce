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
    mode: Literal["full", "lora"] = Field("full", description="lora: the reference is the model with "
                                          "adapters disabled, so no second copy is held")
    lora: LoraConfig = LoraConfig()
    optim: OptimConfig = OptimConfig(lr=5e-6, warmup_steps=10)
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference")
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO: assumed label noise")
    rpo_alpha: float = Field(0.0, ge=0, description="weight of the chosen side's per-token NLL added to the "
                             "loss (RPO): keeps the chosen answers' likelihood from sinking with the rejected")
    precompute_reference: bool = Field(False, description="reference log-probs computed once before "
                                       "training (no reference forward per step; the full copy is freed)")
    max_steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1, description="preference pairs per optimizer step (global)")
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(256, ge=8, description="tokens of prompt + response, each side of a pair")
    eval_every: int = Field(50, ge=1, description="held-out preference accuracy every N steps")
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
    mode: Literal["full", "lora"] = "full"
    lora: LoraConfig = LoraConfig()
    optim: OptimConfig = OptimConfig(lr=1e-4, warmup_steps=10)
    max_steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1, description="preference pairs per optimizer step (global)")
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(256, ge=8)
    eval_every: int = Field(50, ge=1, description="held-out pairwise accuracy every N steps")
    log_every: int = Field(10, ge=1)
    seed: int | None = Field(None, description="defaults to the recipe seed")

    @model_validator(mode="after")
    def _batch_divides(self) -> "RewardModelStage":
        return _check_accum(self, self.batch_size, self.grad_accum, "pairs")


# One entry of a recipe's `stages:` list, chosen by its `kind`.
TrainStage = Annotated[Union[SFTStage, DPOStage, RewardModelStage], Field(discriminator="kind")]
