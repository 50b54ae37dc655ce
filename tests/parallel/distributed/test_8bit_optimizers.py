"""bitsandbytes' 8-bit AdamW (optim.optimizer adamw_8bit / paged_adamw_8bit) in the Trainer: 8-bit states,
no weight decay on 1-D weights, close to AdamW; under dp ZeRO-1 the same steps as one process; a DCP
checkpoint of its states resumes the same next steps in another layout; sharded parameters are refused."""

from types import SimpleNamespace

import pytest
import torch

from parallel import engine
from parallel.dims import ParallelConfig
from parallel.distributed.checkpoint import load_checkpoint, save_checkpoint
from parallel.distributed.launch import launch
from parallel.layout import layout_problems
from parallel.trainer import Trainer, build_mesh
from tests.parallel.distributed import harness as H
from training.config import OptimConfig, SFTStage
from training.stages import check_stages, plan_memory


def _trainer(world_size, cfg, optimizer):
    cfg = ParallelConfig(**cfg)
    mesh = build_mesh(cfg, world_size, "cpu")  # one process: the mesh of ones
    return Trainer(H.build_model("full"), cfg, mesh, grad_clip=H.GRAD_CLIP, optimizer=optimizer, **H.HPARAMS)


def _steps(trainer, steps):
    return [trainer.train_step(H.make_batch(step))[0] for step in steps]


def _save_after_one_step(rank, world_size, cfg, optimizer, path):
    trainer = _trainer(world_size, cfg, optimizer)
    first = _steps(trainer, [0])
    save_checkpoint(trainer, path)
    return first + _steps(trainer, [1, 2])


def _resume(rank, world_size, cfg, optimizer, path):
    trainer = _trainer(world_size, cfg, optimizer)
    load_checkpoint(trainer, path)
    return _steps(trainer, [1, 2])


def test_8bit_states_and_groups_in_one_process():
    # through the engine, as a stage builds it from its optim section
    optim = OptimConfig(lr=H.HPARAMS["lr"], weight_decay=H.HPARAMS["weight_decay"], optimizer="adamw_8bit")
    trainer = engine.build_trainer(None, ParallelConfig(), mode="full", optim=optim, model=H.build_model("full"))
    (opt,) = trainer.optimizers
    assert [g["weight_decay"] for g in opt.param_groups] == [H.HPARAMS["weight_decay"], 0.0]
    assert all(p.ndim < 2 for p in opt.param_groups[1]["params"])
    losses = _steps(trainer, range(H.STEPS))
    # bitsandbytes keeps 32-bit states for tensors under 4096 elements (the norms), 8-bit for the rest
    for group in opt.param_groups:
        for p in group["params"]:
            assert opt.state[p]["state1"].dtype == (torch.uint8 if p.numel() >= 4096 else torch.float32)
    reference = H.reference("full")["losses"]
    assert losses[0] == pytest.approx(reference[0], abs=1e-6)  # the first step's loss precedes any update
    assert losses != reference and losses == pytest.approx(reference, abs=1e-2)


def test_8bit_under_zero1_steps_as_one_process_and_resumes_in_another_layout(tmp_path):
    # paged_adamw_8bit: on CPU bitsandbytes runs it unpaged (on CUDA its states live in unified memory)
    paged = "paged_adamw_8bit"
    one = _save_after_one_step(0, 1, {}, paged, tmp_path / "one")
    zero1 = launch(_save_after_one_step, 2, dict(dp_shard=2, zero=1), paged, tmp_path / "zero1")
    for losses in zero1:
        assert losses == pytest.approx(one, abs=1e-5)
    # the dp2 ZeRO-1 checkpoint (each rank saved the states it owns) in one process, and back
    assert _resume(0, 1, {}, paged, tmp_path / "zero1") == pytest.approx(one[1:], abs=1e-5)
    for losses in launch(_resume, 2, dict(dp_replicate=2), paged, tmp_path / "one"):
        assert losses == pytest.approx(one[1:], abs=1e-5)


def test_8bit_is_refused_where_parameters_are_dtensors():
    assert layout_problems(ParallelConfig(dp_shard=2, zero=1), optimizer="adamw_8bit") == []
    assert layout_problems(ParallelConfig(pp=2, microbatches=2), optimizer="paged_adamw_8bit") == []
    (zero3,) = layout_problems(ParallelConfig(dp_shard=2, zero=3), optimizer="adamw_8bit")
    assert zero3.startswith("parallel.zero: optim.optimizer adamw_8bit (bitsandbytes) steps plain tensors")
    (tp,) = layout_problems(ParallelConfig(tp=2), optimizer="paged_adamw_8bit")
    assert tp.startswith("parallel.tp: optim.optimizer paged_adamw_8bit") and "use tp 1" in tp
    stage = SFTStage(optim={"optimizer": "adamw_8bit"}, batch_size=8)
    recipe = SimpleNamespace(
        stages=[stage], parallel=ParallelConfig(dp_shard=2, zero=2), data=SimpleNamespace(sources=[])
    )
    assert [p for p in check_stages(recipe) if "bitsandbytes" in p] == [zero3.replace("ZeRO-3", "ZeRO-2")]


def test_the_plan_counts_8bit_states():
    config = {**H.MODEL, "hidden_size": 512, "intermediate_size": 1024}
    adamw = plan_memory(SFTStage(), ParallelConfig(), config)
    eight = plan_memory(SFTStage(optim={"optimizer": "adamw_8bit"}), ParallelConfig(), config)
    assert eight.optimizer == adamw.optimizer // 4 and eight.params == adamw.params
