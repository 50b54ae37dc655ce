"""parallel.engine: deepspeed against one process (the native engine's reference): losses, grad norms, every
first-step gradient and the weights after the last step, at ZeRO 0-3, LoRA, and with the optimizer (and the
parameters) offloaded to the CPU with DeepSpeed's CPU Adam; checkpoints resume exactly and refuse another
layout in one line."""

from __future__ import annotations

import pytest

pytest.importorskip("deepspeed")

import torch  # noqa: E402

from parallel.dims import OffloadConfig, ParallelConfig  # noqa: E402
from parallel.distributed.launch import launch  # noqa: E402
from tests.parallel.distributed import harness as H  # noqa: E402

pytestmark = pytest.mark.slow

CASES = {
    "zero0": (dict(zero=0), "full"),
    "zero1": (dict(zero=1), "full"),
    "zero2": (dict(zero=2), "full"),
    "zero3": (dict(zero=3), "full"),
    "lora-zero3": (dict(zero=3), "lora"),
    "offload-optimizer-zero2": (dict(zero=2, offload=OffloadConfig(optimizer="cpu")), "full"),
    "offload-all-zero3": (dict(zero=3, offload=OffloadConfig(optimizer="cpu", params="cpu")), "full"),
}


def _trainer(cfg: ParallelConfig, mode: str, seed: int = 0):
    from parallel.deepspeed_engine import DeepSpeedTrainer

    return DeepSpeedTrainer(H.build_model(mode, seed=seed), cfg, mode=mode, grad_clip=H.GRAD_CLIP, **H.HPARAMS)


def _full_grads(trainer) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    return {
        n: safe_get_full_grad(p).detach().clone()
        for n, p in trainer.engine.module.named_parameters()
        if p.requires_grad
    }


def _compare(rank, world, cases):
    out = {}
    for name, (fields, mode) in cases.items():
        cfg = ParallelConfig(engine="deepspeed", dp_shard=world, **fields)
        trainer = _trainer(cfg, mode)
        ref = H.reference(mode)
        losses, norms, grad_rel = [], [], 0.0
        for step in range(H.STEPS):
            local = trainer.forward_backward(H.make_batch(step))
            if step == 0:  # the reference keeps the clipped gradients: clip these alike
                grads = _full_grads(trainer)
                assert set(grads) == set(ref["grads"]), sorted(set(grads) ^ set(ref["grads"]))
                norm = float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads.values()])))
                coef = min(1.0, H.GRAD_CLIP / (norm + 1e-6))
                for n, g in grads.items():
                    r = ref["grads"][n]
                    grad_rel = max(grad_rel, float((g * coef - r).abs().max()) / max(float(r.abs().max()), 1e-12))
            norms.append(trainer.optimizer_step())
            losses.append(trainer._global(local))
        weights = trainer.full_state_dict()
        weight_diff = None
        if weights is not None:
            weight_diff = max(float((weights[n] - w).abs().max()) for n, w in ref["weights"].items())
        out[name] = {
            "loss_diff": max(abs(a - b) for a, b in zip(losses, ref["losses"])),
            "norm_rel": max(abs(a - b) / b for a, b in zip(norms, ref["norms"])),
            "grad_rel": grad_rel,
            "weight_diff": weight_diff,
            "offload": trainer.offload,
        }
    return out


@pytest.fixture(scope="module")
def compared():
    return launch(_compare, 2, CASES, timeout=900)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_deepspeed_matches_one_process(compared, name):
    got = compared[name]
    assert got["loss_diff"] < 2e-6, got
    assert got["norm_rel"] < 1e-5, got
    assert got["grad_rel"] < 1e-5, got
    assert got["weight_diff"] < 1e-5, got
    fields = CASES[name][0]
    if "offload" in fields:
        assert got["offload"] == (fields["offload"].optimizer, fields["offload"].params)


def _resume(rank, world, root, zero):
    """Train 3 steps straight; then 2 steps, save, a fresh trainer loads and trains the third."""
    from pathlib import Path

    from parallel.distributed.checkpoint import load_checkpoint, save_checkpoint

    cfg = ParallelConfig(engine="deepspeed", dp_shard=world, zero=zero)
    straight = _trainer(cfg, "full")
    for step in range(3):
        loss, _ = straight.train_step(H.make_batch(step))
    want = straight.full_state_dict()
    first = _trainer(cfg, "full")
    for step in range(2):
        first.train_step(H.make_batch(step))
    save_checkpoint(first, Path(root) / "step-2", {"data": 7})
    second = _trainer(cfg, "full", seed=5)  # other initial weights: the load must replace them
    extra = load_checkpoint(second, Path(root) / "step-2")
    resumed_loss, _ = second.train_step(H.make_batch(2))
    got = second.full_state_dict()
    diff = None if got is None else max(float((got[n] - w).abs().max()) for n, w in want.items())
    return {"extra": extra, "step": second.step, "loss_diff": abs(resumed_loss - loss), "weight_diff": diff}


def _other_layout(rank, world, root):
    from pathlib import Path

    from parallel.deepspeed_engine import LayoutChanged
    from parallel.distributed.checkpoint import load_checkpoint

    trainer = _trainer(ParallelConfig(engine="deepspeed", dp_shard=world, zero=1 if world > 1 else 0), "full")
    try:
        load_checkpoint(trainer, Path(root) / "step-2")
    except LayoutChanged as err:
        return str(err)
    return None


def test_checkpoint_resumes_exactly_and_refuses_another_layout(tmp_path):
    got = launch(_resume, 2, str(tmp_path), 2, timeout=600)[0]
    assert got["extra"] == {"data": 7} and got["step"] == 3, got
    assert got["loss_diff"] < 1e-6 and got["weight_diff"] < 1e-6, got
    assert (tmp_path / "step-2" / "deepspeed").is_dir()
    message = launch(_other_layout, 1, str(tmp_path), timeout=600)[0]
    assert message is not None and "under 2 data-parallel ranks at ZeRO-2" in message, message
    assert "\n" not in message and "dp_shard: 2" in message


def _nvme(rank, world, path):
    try:
        _trainer(
            ParallelConfig(engine="deepspeed", zero=3, offload=OffloadConfig(optimizer="nvme", nvme_path=path)), "full"
        )
    except ValueError as err:
        return str(err)
    return None


def test_nvme_offload_works_or_says_what_the_machine_lacks(tmp_path):
    from parallel.deepspeed_ops import nvme_problem

    problem = nvme_problem()
    message = launch(_nvme, 1, str(tmp_path), timeout=600)[0]
    if problem is None:  # libaio present: the engine starts with the optimizer state on NVMe
        assert message is None
    else:
        assert message == f"parallel.offload: {problem}" and "libaio" in message, message
