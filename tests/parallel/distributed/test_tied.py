"""Tied embeddings (lm_head = the input embedding) under every layout, against one process.

Under pp the first stage holds the embedding and the last lm_head, each a copy of the shared weight whose
gradients the trainer sums over the two stages; the grad norm counts it once (the first step is clipped:
the reference norm is above GRAD_CLIP). Compared: losses, grad norms, every first-step gradient (a
last-stage lm_head copy against the one-process embedding's), and the tied copies' weights after the last
step (equal on both stages, and to one process's). Checkpoints store the weight once and load under any
layout; a pp-trained tied model exports with tie_word_embeddings and the same logits.
"""

import json
import time

import numpy as np
import pytest
import torch

from parallel.dims import ParallelConfig
from parallel.distributed.launch import launch
from parallel.distributed.mesh import ParallelDims
from parallel.trainer import LocalMesh, Trainer
from tests.parallel.distributed import harness as H

pytestmark = pytest.mark.slow

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
LAYOUTS = {
    2: {
        "pp2-gpipe": (dict(pp=2, pp_schedule="gpipe", microbatches=2), "full"),
        "pp2-1f1b-accum4": (dict(pp=2, pp_schedule="1f1b", microbatches=4), "full"),
        "pp2-interleaved_1f1b": (dict(pp=2, pp_schedule="interleaved_1f1b", microbatches=2), "full"),
        "pp2-1f1b-lora": (dict(pp=2, pp_schedule="1f1b", microbatches=2), "lora"),
        "tp2": (dict(tp=2), "full"),  # vocab parallel: one sharded tensor serves both ends
        "dp2-zero3": (dict(dp_shard=2, zero=3), "full"),
    },
    3: {  # a middle stage between the two copies: their own process group
        "pp3-1f1b": (dict(pp=3, pp_schedule="1f1b", microbatches=4), "full"),
    },
    4: {
        "pp2xdp2-zero3": (dict(pp=2, dp_shard=2, zero=3, microbatches=2), "full"),
        "pp2xdp2-zero1": (dict(pp=2, dp_shard=2, zero=1, microbatches=2), "full"),
        "pp2xtp2": (dict(pp=2, tp=2, microbatches=2), "full"),  # vocab-sharded copies on both ends
        "pp2xtp2-no_vp": (dict(pp=2, tp=2, microbatches=2, vocab_parallel=False), "full"),
        "pp2xtp2-lora": (dict(pp=2, tp=2, microbatches=2), "lora"),
        "tp2xdp2-zero3": (dict(tp=2, dp_shard=2, zero=3), "full"),  # FSDP over one vocab-sharded tensor
    },
    6: {  # one {first, last} group per dp rank, around a middle stage
        "pp3xdp2-zero3": (dict(pp=3, dp_shard=2, zero=3, pp_schedule="1f1b", microbatches=4), "full"),
    },
    8: {  # FSDP shards of vocab-sharded copies, summed shard by shard
        "pp2xdp2xtp2-zero3": (dict(pp=2, dp_shard=2, tp=2, zero=3, microbatches=2), "full"),
    },
}
CASES = [(world, name) for world, layouts in LAYOUTS.items() for name in layouts]


def _run_layouts(rank, world_size, layouts):
    out = {}
    for name, (cfg, mode) in layouts.items():
        start = time.perf_counter()
        out[name] = H.check_layout_against_reference(ParallelConfig(**cfg), mode, world_size, tied=True)
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
def test_tied_layout_matches_one_process(results, world, name):
    per_rank = [r[name] for r in results(world)]
    cfg, mode = LAYOUTS[world][name]
    covered = set().union(*(r["names"] for r in per_rank))
    assert covered == set(per_rank[0]["ref_names"]), "some gradients were not compared"
    for r in per_rank:
        assert r["loss_diff"] < 1e-5, r["losses"]
        assert r["norm_diff"] < 1e-5  # the shared weight counted once
        assert r["grad_abs"] < 1e-6 and r["grad_rel"] < 1e-5, (r["grad_abs"], r["grad_rel"])
        print(name, "tied weight after the last step differs from one process's by", r["weight_diff"])
        assert r["weight_diff"] < 1e-5
    vocab = cfg.get("tp", 1) > 1 and cfg.get("vocab_parallel", True)
    assert all(r["vocab_parallel"] == vocab for r in per_rank)
    if mode == "lora":
        assert all("lora_" in n for n in covered)  # the tied weight stays frozen
        return
    copies = [(n, w) for r in per_rank for n, w in r["tied_copy"].items()]
    pp = cfg.get("pp", 1)
    # every rank of the first stage holds the embedding, every rank of the last stage the lm_head copy
    assert sorted(n for n, _ in copies) == sorted([EMBED] * (world // pp) + ([HEAD] * (world // pp) if pp > 1 else []))
    for _, w in copies:
        assert np.array_equal(w, copies[0][1])  # the copies stay identical, bit for bit
    if vocab:
        held = set().union(*(r["vocab_sharded"] for r in per_rank))
        assert held == ({EMBED, HEAD} if pp > 1 else {EMBED}), held


def test_the_first_step_is_clipped():
    ref = launch(lambda rank, world: H.reference("full", tied=True)["norms"], 1)[0]
    assert ref[0] > H.GRAD_CLIP


# --- checkpoints: the tied weight stored once, loaded under another layout ------------------------------


def _trainer(world_size, cfg, mode="full"):
    cfg = ParallelConfig(**cfg)
    mesh = ParallelDims.from_config(cfg, world_size).build_mesh("cpu") if world_size > 1 else LocalMesh()
    return Trainer(H.build_model(mode, tied=True), cfg, mesh, mode=mode, grad_clip=H.GRAD_CLIP, **H.HPARAMS)


def _save_after_one_step(rank, world_size, cfg, path):
    from parallel.distributed.checkpoint import save_checkpoint

    trainer = _trainer(world_size, cfg)
    trainer.train_step(H.make_batch(0))
    save_checkpoint(trainer, path, extra={"data_position": 8})
    weights = _by_value(H.full_weights(trainer))
    return [trainer.train_step(H.make_batch(step))[0] for step in (1, 2)], weights


def _resume(rank, world_size, cfg, path):
    from parallel.distributed.checkpoint import load_checkpoint

    trainer = _trainer(world_size, cfg)
    load_checkpoint(trainer, path)
    weights = _by_value(H.full_weights(trainer))
    return [trainer.train_step(H.make_batch(step))[0] for step in (1, 2)], weights


def _by_value(weights: dict) -> dict:
    """numpy copies: tensors returned from a rank would pass as shared memory of a process that exits."""
    return {n: w.numpy() for n, w in weights.items()}


def _stored_keys(path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


@pytest.mark.parametrize(
    "saved, loaded",
    [
        ((2, dict(pp=2, microbatches=2)), (1, dict())),
        ((1, dict()), (4, dict(pp=2, dp_shard=2, zero=3, microbatches=2))),
    ],
    ids=["pp2-to-one", "one-to-pp2xdp2"],
)
def test_tied_checkpoint_loads_under_another_layout(tmp_path, saved, loaded):
    path = tmp_path / "ckpt"
    results = launch(_save_after_one_step, saved[0], saved[1], path)
    uninterrupted = results[0][0]
    assert uninterrupted == pytest.approx(H.reference("full", tied=True)["losses"][1:], abs=1e-5)
    keys = _stored_keys(path)
    assert f"model.{EMBED}" in keys and not any(HEAD in k for k in keys), sorted(keys)  # stored once
    assert any(k.startswith(f"optim.state.{EMBED}.") for k in keys)
    saved_weights = {n: w for _, weights in results for n, w in weights.items()}
    resumed = launch(_resume, loaded[0], loaded[1], path)
    for losses, weights in resumed:
        assert losses == pytest.approx(uninterrupted, abs=1e-5), loaded
        for name, w in weights.items():  # every copy (lm_head on a last stage) holds the stored weight
            assert np.array_equal(w, saved_weights.get(name, saved_weights.get(EMBED))), name


# --- export of a pp-trained tied model -------------------------------------------------------------------


def _train_and_save(rank, world_size, cfg, model_dir, out_dir):
    from parallel import engine
    from parallel.checkpoint import gather_full_state_dict, save_checkpoint
    from parallel.tiny import build_tokenizer

    trainer = _trainer(world_size, cfg)
    for step in range(2):
        trainer.train_step(H.make_batch(step))
    state = gather_full_state_dict(trainer)
    if engine.is_leader():
        assert EMBED in state and HEAD not in state  # gathered once
        model = engine.rebuild_model(model_dir, state)
        save_checkpoint(model, build_tokenizer(), out_dir, base_model_dir=model_dir, mode="full")
    return None


def test_pp_trained_tied_model_exports_tied(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from parallel.export import export_hf
    from parallel.tiny import build_tokenizer

    model_dir, ckpt, out = tmp_path / "base", tmp_path / "ckpt", tmp_path / "export"
    H.build_model("full", tied=True).save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    launch(_train_and_save, 2, dict(pp=2, microbatches=2), model_dir, ckpt)
    result = export_hf(model_dir, ckpt, out)
    assert result["max_abs_logit_diff"] <= 1e-5
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert EMBED in f.keys() and HEAD not in f.keys()
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    # the same weights as two steps in one process
    one = _trainer(1, dict())
    for step in range(2):
        one.train_step(H.make_batch(step))
    ids = H.make_batch(5)["input_ids"]
    with torch.no_grad():
        diff = (exported(input_ids=ids).logits - one.parts[0](input_ids=ids).logits).abs().max()
    assert float(diff) < 1e-4
