"""The parallel layout: data-parallel replicate x shard, pipeline, tensor, and the ZeRO stage."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
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
    compile: bool = Field(
        False,
        description="torch.compile each decoder block (after TP and activation "
        "checkpointing, before FSDP); the first steps pay the compile time",
    )

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.pp * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def check_model(
        self, num_layers: int, num_kv_heads: int, vocab_size: int | None = None, tied_embeddings: bool = False
    ) -> list[str]:
        """Layout problems for a model, as 'field: message' lines."""
        problems = []
        if self.tp > 1 and self.vocab_parallel:
            if tied_embeddings:
                problems.append(
                    "parallel.vocab_parallel: the model ties lm_head to the input embedding, which "
                    "cannot be split over the vocabulary here; leave vocab_parallel unset or false"
                )
            elif vocab_size and vocab_size % self.tp:
                problems.append(
                    f"parallel.vocab_parallel: the vocabulary ({vocab_size}) does not divide by "
                    f"tp={self.tp}; leave vocab_parallel unset or false"
                )
        if num_kv_heads % self.tp:
            problems.append(f"parallel.tp: {self.tp} must divide the model's {num_kv_heads} KV heads")
        if self.pp > num_layers:
            problems.append(f"parallel.pp: {self.pp} stages but the model has only {num_layers} layers")
        return problems
