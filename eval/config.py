"""Typed configuration of evaluation and the promotion gate (`eval:` and `gate:` sections)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from eval.tasks import EvalTask, HeldoutTask


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvalConfig(_Section):
    tasks: list[EvalTask] = Field(
        default_factory=lambda: [HeldoutTask(heldout="exact"), HeldoutTask(heldout="mc")],
        min_length=1,
        description="eval/tasks.py: {heldout: exact|mc}, {yaml_dir, task}, {lm_eval: name}, or their shorthand",
    )
    include_base: bool = True
    limit: int | None = Field(200, ge=1, description="max examples per task (None: all)")
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(24, ge=1)
    num_choices: int = Field(4, ge=2, description="options per multiple-choice question")
    seed: int = 0


class GateConfig(_Section):
    """Promotion rules. Metric keys are '<task>/<metric>', e.g. 'heldout_exact/exact_match'."""

    thresholds: dict[str, float] = Field(default_factory=dict)
    max_regression: float = Field(0.02, ge=0, description="allowed drop vs the champion, absolute")
    min_gain_over_base: float = Field(0.0, description="candidate must beat the base model by this much")
    primary_metric: str | None = Field(None, description="defaults to the first threshold key")
