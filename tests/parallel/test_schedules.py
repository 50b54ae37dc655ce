"""The LR schedules (engine.lr_factor) at their key steps, and the optim fields that choose them."""

import math

import pytest
from pydantic import ValidationError

from parallel import engine
from training.config import OptimConfig


def _curve(scheduler, max_steps=20, warmup_steps=4, min_lr_ratio=0.1, decay_steps=0):
    return [
        engine.lr_factor(
            s,
            scheduler=scheduler,
            warmup_steps=warmup_steps,
            max_steps=max_steps,
            min_lr_ratio=min_lr_ratio,
            decay_steps=decay_steps,
        )
        for s in range(max_steps)
    ]


@pytest.mark.parametrize("scheduler", engine.LR_SCHEDULERS)
def test_every_schedule_warms_up_alike(scheduler):
    f = _curve(scheduler, decay_steps=5)
    assert f[:5] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5, 1.0])


def test_cosine_with_min_lr_is_the_original_curve():
    # The default keeps hpcft's first schedule (the golden losses were trained on it).
    f = _curve("cosine_with_min_lr")
    assert f[4 + 15 // 2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert f[19] == pytest.approx(0.1)  # the floor at the last step
    assert OptimConfig().lr_scheduler == "cosine_with_min_lr"


def test_cosine_and_linear_reach_zero_after_the_last_step():
    # transformers' get_cosine_schedule_with_warmup / get_linear_schedule_with_warmup after warmup: progress
    # (step - warmup) / (max_steps - warmup)
    cos, lin = _curve("cosine", min_lr_ratio=0.0), _curve("linear", min_lr_ratio=0.0)
    assert cos[12] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert cos[12] == pytest.approx(0.5)
    assert cos[19] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16))) and cos[19] > 0
    assert lin[8] == pytest.approx(0.75) and lin[19] == pytest.approx(1 / 16)
    assert engine.lr_factor(20, scheduler="linear", warmup_steps=4, max_steps=20, min_lr_ratio=0) == 0.0


def test_constant_holds_the_peak():
    assert _curve("constant", min_lr_ratio=0.0)[4:] == [1.0] * 16


def test_wsd_is_stable_then_decays_over_the_last_steps():
    f = _curve("wsd", decay_steps=5, min_lr_ratio=0.2)
    assert f[4:15] == [1.0] * 11  # stable until max_steps - decay_steps
    assert f[15] == 1.0 and f[16] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 5)))
    assert f[19] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))
    assert engine.lr_factor(20, scheduler="wsd", warmup_steps=4, max_steps=20, min_lr_ratio=0.2, decay_steps=5) == (
        pytest.approx(0.2)
    )
    # A decay longer than what follows warmup starts right after it.
    assert _curve("wsd", decay_steps=50)[4] == 1.0 and _curve("wsd", decay_steps=50)[5] < 1.0
    assert OptimConfig(lr_scheduler="wsd", decay_ratio=0.25).decay_updates(40) == 10
    assert OptimConfig(lr_scheduler="wsd", decay_steps=7).decay_updates(40) == 7


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"lr_scheduler": "cosine", "min_lr_ratio": 0.1}, "min_lr_ratio applies to lr_scheduler"),
        ({"lr_scheduler": "linear", "decay_ratio": 0.2}, "decay_ratio apply to lr_scheduler wsd"),
        ({"lr_scheduler": "wsd", "decay_ratio": 0.2, "decay_steps": 3}, "decay_ratio and decay_steps are both"),
        ({"lr_scheduler": "step"}, "lr_scheduler"),
    ],
)
def test_fields_of_another_schedule_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        OptimConfig(**fields)


@pytest.mark.parametrize(
    "fields", [{"lr_scheduler": s} for s in engine.LR_SCHEDULERS] + [{"lr_scheduler": "wsd", "decay_steps": 9}]
)
def test_a_written_out_config_reads_back(fields):
    # a run directory's resolved recipe writes every field out
    cfg = OptimConfig(**fields)
    assert OptimConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    assert cfg.lr_floor == (0.1 if cfg.lr_scheduler == "cosine_with_min_lr" else 0.0)
    if cfg.lr_scheduler in ("wsd", "cosine_with_min_lr"):
        assert OptimConfig(**fields, min_lr_ratio=0.3).lr_floor == 0.3
