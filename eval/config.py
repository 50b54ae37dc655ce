"""Typed configuration of evaluation and the promotion gate (`eval:` and `gate:` sections)."""

from __future__ import annotations

from typing import Literal

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
    lower_is_better: list[str] = Field(default_factory=list, description="metric keys where less is better")
    regression_test: Literal["point", "significance"] = Field(
        "point", description="significance: a regression fails only when its interval lies below the allowed drop"
    )
    significance: float = Field(0.05, gt=0, lt=0.5, description="two-sided level of the regression interval")
    bootstrap_samples: int = Field(2000, ge=100, description="paired bootstrap resamples over examples")
    require_human: bool = Field(False, description="stay pending_review until enough side-by-side verdicts exist")
    min_human_verdicts: int = Field(20, ge=1, description="verdicts `hpcft registry import-verdicts` must record")
