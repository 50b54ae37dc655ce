"""Every layout against one process: losses over 3 AdamW steps, grad norms, and every first-step gradient.

One forked launch per world size runs many layouts (fork after imports keeps a launch to seconds).
Under tp, sequence and vocab parallelism are on unless a layout turns them off; a third entry picks
the model family (qwen3: per-head q/k norms) or an odd sequence length (padded for sequence parallel).
"""

import time

import pytest

from parallel.dims import ParallelConfig
from parallel.distributed.checkpoint import load_checkpoint, save_checkpoint
from parallel.distributed.launch import launch
from parallel.distributed.mesh import ParallelDims
from parallel.trainer import Trainer
from tests.parallel.distributed import harness as H

pytestmark = pytest.mark.slow

LAYOUTS = {
    2: {
        "tp2": (dict(tp=2), "full"),
        "tp2-lora": (dict(tp=2), "lora"),
        "tp2-no_sp-no_vp": (dict(tp=2, sequence_parallel=False, vocab_parallel=False), "full"),
        "tp2-no_sp-lora": (dict(tp=2, sequence_parallel=False), "lora"),
        "tp2-seq15": (dict(tp=2), "full", dict(seq=15)),
        "tp2-ac_selective": (dict(tp=2, activation_checkpointing="selective"), "full"),
        "tp2-qwen3": (dict(tp=2), "full", dict(family="qwen3")),
        "tp2-qwen3-no_sp": (dict(tp=2, sequence_parallel=False), "full", dict(family="qwen3")),
        "tp2-qwen3-lora": (dict(tp=2), "lora", dict(family="qwen3")),
        "pp2-gpipe": (dict(pp=2, pp_schedule="gpipe", microbatches=2), "full"),
        "pp2-1f1b": (dict(pp=2, pp_schedule="1f1b", microbatches=4), "full"),
        "pp2-interleaved_1f1b": (dict(pp=2, pp_schedule="interleaved_1f1b", microbatches=4), "full"),
        "pp2-zero_bubble": (dict(pp=2, pp_schedule="zero_bubble", microbatches=2), "full"),
        "pp2-1f1b-lora": (dict(pp=2, pp_schedule="1f1b", microbatches=2), "lora"),
        "pp2-zero_bubble-lora": (dict(pp=2, pp_schedule="zero_bubble", microbatches=4), "lora"),
        "dp2-zero0-accum2": (dict(dp_replicate=2, microbatches=2), "full"),
        "dp2-zero1": (dict(dp_shard=2, zero=1), "full"),
        "dp2-zero2-accum2": (dict(dp_shard=2, zero=2, microbatches=2), "full"),
        "dp2-zero3": (dict(dp_shard=2, zero=3), "full"),
        "dp2-zero1-lora": (dict(dp_shard=2, zero=1), "lora"),
        "dp2-zero3-lora-ac_full": (dict(dp_shard=2, zero=3, activation_checkpointing="full"), "lora"),
        "dp2-zero3-ac_selective": (dict(dp_shard=2, zero=3, activation_checkpointing="selective"), "full"),
    },
    4: {
        "hsdp2x2-zero3": (dict(dp_replicate=2, dp_shard=2, zero=3), "full"),
        "hsdp2x2-zero2-lora": (dict(dp_replicate=2, dp_shard=2, zero=2), "lora"),
        "tp2xdp2-zero3": (dict(tp=2, dp_shard=2, zero=3), "full"),
        "tp2xdp2-zero1-lora": (dict(tp=2, dp_shard=2, zero=1), "lora"),
        "pp2xdp2-zero2": (dict(pp=2, dp_shard=2, zero=2, microbatches=2), "full"),
        "pp2xdp2-zero1-interleaved-lora": (
            dict(pp=2, dp_replicate=2, zero=1, microbatches=2, pp_schedule="interleaved_1f1b"),
            "lora",
        ),
        "pp2xtp2-1f1b": (dict(pp=2, tp=2, microbatches=2), "full"),
        "pp2xtp2-gpipe-lora": (dict(pp=2, tp=2, microbatches=2, pp_schedule="gpipe"), "lora"),
        "pp2xtp2-seq15-qwen3": (dict(pp=2, tp=2, microbatches=2), "full", dict(seq=15, family="qwen3")),
        "tp2xdp2-zero2-accum2-ac_full": (
            dict(tp=2, dp_shard=2, zero=2, microbatches=2, activation_checkpointing="full"),
            "full",
        ),
    },
    8: {
        "pp2xdp2xtp2-zero3": (dict(pp=2, dp_shard=2, tp=2, zero=3, microbatches=2), "full"),
        "pp2xdp2xtp2-zero2-zb-lora": (
            dict(pp=2, dp_shard=2, tp=2, zero=2, microbatches=4, pp_schedule="zero_bubble"),
            "lora",
        ),
    },
}
CASES = [(world, name) for world, layouts in LAYOUTS.items() for name in layouts]


def _run_layouts(rank, world_size, layouts):
    out = {}
    for name, (cfg, mode, *opts) in layouts.items():
        start = time.perf_counter()
        out[name] = H.check_layout_against_reference(
            ParallelConfig(**cfg), mode, world_size, **(opts[0] if opts else {})
        )
        out[name]["seconds"] = time.perf_counter() - start
    return out


@pytest.fixture(scope="module")
def results():
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = launch(_run_layouts, world, LAYOUTS[world])
        return cache[world]

    return get


@pytest.mark.parametrize("world, name", CASES, ids=[n for _, n in CASES])
def test_layout_matches_one_process(results, world, name):
    per_rank = [r[name] for r in results(world)]
    covered = set().union(*(r["names"] for r in per_rank))
    assert covered == set(per_rank[0]["ref_names"]), "some gradients were not compared"
    cfg, mode = LAYOUTS[world][name][:2]
    if mode == "lora":
        assert all("lora_" in n for n in covered)
    tp = cfg.get("tp", 1) > 1
    assert [r["sequence_parallel"] for r in per_rank] == [tp and cfg.get("sequence_parallel", True)] * world
    vocab = tp and cfg.get("vocab_parallel", True)
    assert [r["vocab_parallel"] for r in per_rank] == [vocab] * world
    if vocab:  # every rank holding the embedding or the head holds a vocab shard of it
        held = set().union(*(r["vocab_sharded"] for r in per_rank))
        assert {n.split(".")[-2] for n in held} == {"embed_tokens", "lm_head"}, held
    for r in per_rank:
        assert r["loss_diff"] < 1e-5, r["losses"]
        assert r["norm_diff"] < 1e-5
        assert r["grad_abs"] < 1e-6 and r["grad_rel"] < 1e-5, (r["grad_abs"], r["grad_rel"])


def _trainer(world_size, cfg, mode):
    cfg = ParallelConfig(**cfg)
    mesh = ParallelDims.from_config(cfg, world_size).build_mesh("cpu")
    return Trainer(H.build_model(mode), cfg, mesh, mode=mode, grad_clip=H.GRAD_CLIP, **H.HPARAMS)


def _save_after_one_step(rank, world_size, cfg, mode, path):
    trainer = _trainer(world_size, cfg, mode)
    trainer.train_step(H.make_batch(0))
    save_checkpoint(trainer, path, extra={"data_position": 8})
    return [trainer.train_step(H.make_batch(step))[0] for step in (1, 2)]


def _resume(rank, world_size, cfg, mode, path):
    trainer = _trainer(world_size, cfg, mode)
    extra = load_checkpoint(trainer, path)
    return extra, trainer.step, [trainer.train_step(H.make_batch(step))[0] for step in (1, 2)]


@pytest.mark.parametrize("mode, zero", [("full", 3), ("lora", 1)])
def test_checkpoint_resumes_under_another_layout(tmp_path, mode, zero):
    """Saved at tp2 x dp2 after step 1; resumed at pp2 and in one process, the next losses match."""
    path = tmp_path / "ckpt"
    uninterrupted = launch(_save_after_one_step, 4, dict(tp=2, dp_shard=2, zero=zero), mode, path)[0]
    reference = H.reference(mode)["losses"][1:]
    assert uninterrupted == pytest.approx(reference, abs=1e-5)
    for world, cfg in ((2, dict(pp=2, microbatches=2)), (1, dict())):
        extra, step, losses = launch(_resume, world, cfg, mode, path)[0]
        assert (extra, step) == ({"data_position": 8}, 1)
        assert losses == pytest.approx(uninterrupted, abs=1e-5), (world, cfg)


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on purpose")
    return rank


def test_launch_reports_a_failing_rank():
    assert launch(lambda rank, world_size: rank * 10, 2) == [0, 10]
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed:(.|\n)*boom on purpose"):
        launch(_fail_on_rank_one, 2, timeout=60)
