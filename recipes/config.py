"""Typed configuration of training stages (entries of a recipe's `stages:` list)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraConfig(_Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


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
    mode: Literal["full", "lora"] = "full"
    lora: LoraConfig = LoraConfig()
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


# The discriminated union grows with DPO, reward model, PPO and GRPO stages.
TrainStage = SFTStage
