"""The parallel layout (data-parallel replicate x shard, pipeline, tensor, the ZeRO stage) and the typed
LoRA / 4-bit quantization configs the engine takes (the stages' `lora:` and `quant:` sections)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator


def _auto_or_bool(value):
    if value == "auto" or isinstance(value, bool):
        return value
    raise ValueError(f"expected auto, true or false, got {value!r}")


# auto (parallel.defaults picks per device) or an explicit choice; one error line for anything else
AutoBool = Annotated[bool | Literal["auto"], PlainValidator(_auto_or_bool, json_schema_input_type=bool | str)]


class LoraConfig(BaseModel):
    """LoRA adapters (modes lora and qlora): rank, scaling, dropout and the linear layers they wrap."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class QuantConfig(BaseModel):
    """4-bit base weights for mode: qlora (bitsandbytes); the LoRA adapters train in full precision."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, description="quantize the quantization constants too (~0.4 bit/param less)")


class OffloadConfig(BaseModel):
    """ZeRO-Offload / ZeRO-Infinity (parallel.engine: deepspeed): where the optimizer state and the
    parameters live between uses; the accelerator holds only what the current layer needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    optimizer: Literal["none", "cpu", "nvme"] = Field(
        "none", description="fp32 master weights + Adam moments on the host (DeepSpeed's CPU Adam steps them)"
    )
    params: Literal["none", "cpu", "nvme"] = Field("none", description="ZeRO-3 parameter shards on the host")
    nvme_path: str | None = Field(None, description="a local NVMe directory, for optimizer or params on nvme")
    pin_memory: bool = Field(True, description="page-locked host buffers (faster copies, locked RAM)")


class ParallelConfig(BaseModel):
    """The `parallel:` section. Degrees multiply to the world size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dp_replicate: int = Field(1, ge=1)
    dp_shard: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    tp: int = Field(1, ge=1)
    zero: Literal[0, 1, 2, 3] = 0
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = "1f1b"
    microbatches: int = Field(1, ge=1)
    activation_checkpointing: Literal["auto", "none", "full", "selective"] = Field(
        "auto",
        description="recompute each decoder block in backward: full, selective (all but matmuls and "
        "attention) or none. auto: none, unless the planner says the stage does not fit the GPU "
        "(then selective, then full); parallel.defaults",
    )
    mixed_precision: Literal["auto", "fp32", "bf16"] = "auto"
    sequence_parallel: bool | None = Field(
        None,
        description="with tp > 1: norms and the residual stream hold a slice of the sequence per tp "
        "rank (activation memory / tp). Unset: on, except in stages that sample (ppo, grpo)",
    )
    vocab_parallel: bool | None = Field(
        None,
        description="with tp > 1: embedding and lm_head split the vocabulary and the token loss "
        "runs on vocab-sharded logits. Unset: on where the model allows (untied embeddings, vocab "
        "divisible by tp, a vocabulary head)",
    )
    compile: AutoBool = Field(
        "auto",
        description="torch.compile each decoder block (after TP and activation "
        "checkpointing, before FSDP); the first steps pay the compile time. auto: on CUDA at tp 1 "
        "(not QLoRA, not stages that sample), off on CPU; parallel.defaults",
    )
    fused_optimizer: AutoBool = Field(
        "auto",
        description="AdamW's fused kernel (CUDA or CPU) for plain-tensor parameters (ZeRO 0/1, tp 1); false: "
        "torch's default kernel. auto: on where it applies; parallel.defaults",
    )
    loss_chunk_tokens: int | None = Field(
        0,
        ge=0,
        description="the token loss runs lm_head + cross-entropy this many label tokens at a time "
        "(parallel.chunked_ce), so [tokens, vocab] logits are never held whole. Unset: chunks whose logits "
        "match the hidden states' size; 0 (the default for now): off. Applies to a plain head under any "
        "layout (ZeRO 0-3, tp, the last pipeline stage)",
    )

    engine: Literal["native", "deepspeed"] = Field(
        "native",
        description="native: the PyTorch-native engine (dp x ZeRO x pp x tp, exact layouts); deepspeed: "
        "DeepSpeed for data-parallel layouts (dp x ZeRO 0-3) with optimizer/parameter offload",
    )
    offload: OffloadConfig | None = Field(
        None, description="engine: deepspeed only: optimizer state / parameters on the host or NVMe"
    )
    deepspeed_config: str | None = Field(
        None,
        description="engine: deepspeed only: a ds_config JSON; its batch, optimizer, schedule, precision, "
        'clipping and ZeRO stage must be absent, "auto" or equal to the recipe\'s; the rest passes through',
    )

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.pp * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard
