"""training.stages: the kind table is the only place that knows a kind; an unknown kind is an error."""

from types import SimpleNamespace

import pytest

from parallel.dims import ParallelConfig
from parallel.tiny import TINY_CONFIGS
from training.config import DPOStage, GRPOStage, KTOStage, PPOStage, RewardModelStage, SFTStage, TrainStage
from training.stages import (
    KINDS,
    check_stage_layout,
    check_stages,
    kind_of,
    plan_memory,
    stage_layout,
    stage_layout_problems,
)

CONFIG = {**TINY_CONFIGS["tiny-llama"], "vocab_size": 300}


def test_every_stage_model_has_a_row_and_every_row_a_model():
    from typing import get_args

    models = get_args(get_args(TrainStage)[0])
    assert sorted(m.model_fields["kind"].default for m in models) == sorted(KINDS)


def test_unknown_kind_is_an_error_naming_the_known_kinds():
    bogus = SimpleNamespace(kind="xpo", mode="full", batch_size=8)
    for call in (
        lambda: kind_of("xpo"),
        lambda: plan_memory(bogus, ParallelConfig(), CONFIG),
        lambda: stage_layout(bogus, ParallelConfig()),
        lambda: stage_layout_problems(bogus, ParallelConfig()),
    ):
        with pytest.raises(
            ValueError,
            match=r"unknown training stage kind 'xpo'; known kinds: sft, dpo, simpo, orpo, kto, reward_model",
        ):
            call()
    recipe = SimpleNamespace(stages=[SFTStage(), bogus], parallel=ParallelConfig(), data=SimpleNamespace(sources=[]))
    with pytest.raises(ValueError, match="'xpo'"):
        check_stages(recipe)


def test_frozen_copies_follow_the_table():
    def frozen(stage):
        return kind_of(stage).frozen(stage)

    assert frozen(SFTStage()) == frozen(RewardModelStage()) == ()
    assert frozen(DPOStage()) == ("reference",)
    assert frozen(DPOStage(precompute_reference=True)) == frozen(DPOStage(mode="lora")) == ()
    assert frozen(KTOStage()) == ("reference",) and frozen(KTOStage(precompute_reference=True)) == ()
    assert frozen(PPOStage()) == ("reference", "reward model")
    assert frozen(PPOStage(mode="lora", reward_fn="training.rewards:exact_match")) == ()
    assert frozen(GRPOStage(beta=0.0)) == ("reward model",)
    assert frozen(GRPOStage(offload_frozen=True)) == ()


def test_stage_layout_problems_use_the_kinds_batch_and_pipeline_rule():
    layout = ParallelConfig(dp_shard=3)
    assert stage_layout_problems(SFTStage(batch_size=12), layout) == []
    (line,) = stage_layout_problems(DPOStage(batch_size=16), layout)
    assert line.startswith("stages (dpo).batch_size: 16 pairs do not split into dp=3")
    (line,) = stage_layout_problems(GRPOStage(batch_size=4, group_size=2), layout)
    assert line.startswith("stages (grpo).batch_size x group_size: 8 responses")
    (line,) = stage_layout_problems(PPOStage(batch_size=32, mini_batch_size=16), layout)
    assert line.startswith("stages (ppo).mini_batch_size: 16 rollouts")
    pp = ParallelConfig(pp=2, microbatches=2)
    assert stage_layout_problems(RewardModelStage(), pp) == []
    assert [p.split(":")[0] for p in stage_layout_problems(PPOStage(), pp)] == ["parallel.pp"]
    # the world the engine knows at start-up
    assert stage_layout_problems(SFTStage(), pp, world=1)[0].startswith("parallel: world size 2")


def test_check_stage_layout_is_what_a_runner_calls_at_start_up():
    from transformers import LlamaConfig

    model = LlamaConfig(**CONFIG)
    check_stage_layout(SFTStage(), ParallelConfig(), world=1, model_config=model)
    with pytest.raises(ValueError, match=r"^parallel: world size 2 .*not initialised"):
        check_stage_layout(SFTStage(), ParallelConfig(tp=2), world=1, model_config=model)
    with pytest.raises(ValueError, match=r"^precompute_reference: must be true under several processes"):
        check_stage_layout(DPOStage(), ParallelConfig(tp=2), world=2, model_config=model)
    check_stage_layout(DPOStage(precompute_reference=True), ParallelConfig(tp=2), world=2, model_config=model)
    with pytest.raises(ValueError, match=r"^parallel.pp: the ppo stage trains under data"):
        check_stage_layout(PPOStage(), ParallelConfig(pp=2, microbatches=2), world=2)
