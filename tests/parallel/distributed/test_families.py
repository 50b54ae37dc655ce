"""The model families beyond Llama/Qwen (parallel.tiny's FAMILIES): Gemma 2/3 (embedding scaling, soft-capped
attention and logits, sliding-window layers, tied embeddings), Phi-3/Phi-4 (fused projections, split per q/k/v
and gate/up part under tp), Granite
(multipliers), Mixtral and Qwen3-MoE (experts), each against one process: losses over 3 AdamW steps, grad
norms and every first-step gradient.

One process: the Trainer on the mesh of ones. Several: one forked launch of 4 ranks runs every family's
combined layouts (tp x dp under ZeRO-3, pp x tp, pp x dp; OLMo2 without tp, the MoE models under data parallelism
and ZeRO only: the layouts their families refuse are tested in tests/parallel/test_layout.py).
"""

import time

import pytest

from parallel.dims import ParallelConfig
from parallel.distributed.launch import launch
from parallel.trainer import LocalMesh, Trainer
from tests.parallel.distributed import harness as H

TIED = {"gemma2": True, "gemma3": True, "phi3": True}  # Gemma's and Phi-4-mini's own
ONE_PROCESS = ["gemma2", "gemma3", "phi3", "granite", "stablelm", "starcoder2", "olmo2", "mixtral", "qwen3_moe"]

LAYOUTS = {
    "gemma2-tp2xdp2-zero3": (dict(tp=2, dp_shard=2, zero=3), "gemma2"),
    "gemma2-pp2xtp2": (dict(pp=2, tp=2, microbatches=2), "gemma2"),
    "gemma3-tp2xdp2-zero3": (dict(tp=2, dp_shard=2, zero=3), "gemma3"),
    "gemma3-pp2xtp2": (dict(pp=2, tp=2, microbatches=2), "gemma3"),
    "gemma3-tp2xdp2-zero1-lora": (dict(tp=2, dp_shard=2, zero=1), "gemma3", "lora"),
    "phi3-pp2xdp2-zero3": (dict(pp=2, dp_shard=2, zero=3, microbatches=2), "phi3"),
    "phi3-tp2xdp2-zero3": (dict(tp=2, dp_shard=2, zero=3), "phi3"),
    "phi3-pp2xtp2-no_sp": (dict(pp=2, tp=2, microbatches=2, sequence_parallel=False), "phi3"),
    "granite-pp2xtp2": (dict(pp=2, tp=2, microbatches=2), "granite"),
    "stablelm-tp2xdp2-zero3": (dict(tp=2, dp_shard=2, zero=3), "stablelm"),
    "starcoder2-pp2xtp2": (dict(pp=2, tp=2, microbatches=2), "starcoder2"),
    "olmo2-pp2xdp2-zero1": (dict(pp=2, dp_replicate=2, zero=1, microbatches=2), "olmo2"),
    "mixtral-hsdp2x2-zero3": (dict(dp_replicate=2, dp_shard=2, zero=3), "mixtral"),
    "qwen3_moe-dp4-zero1": (dict(dp_shard=4, zero=1), "qwen3_moe"),
}


@pytest.mark.parametrize("family", ONE_PROCESS)
def test_one_process_trainer_matches_the_model(family):
    """The Trainer on one process (no layout) trains the family exactly as its own forward and AdamW do."""
    tied = TIED.get(family, False)
    ref = H.reference("full", family, tied=tied)
    trainer = Trainer(
        H.build_model("full", family=family, tied=tied),
        ParallelConfig(),
        LocalMesh(),
        grad_clip=H.GRAD_CLIP,
        **H.HPARAMS,
    )
    for step in range(H.STEPS):
        loss, norm = trainer.train_step(H.make_batch(step))
        assert loss == pytest.approx(ref["losses"][step], abs=1e-6)
        assert norm == pytest.approx(ref["norms"][step], rel=1e-6)
        if step == 0:
            grads = H.full_grads(trainer)
            assert sorted(grads) == sorted(ref["grads"])
            for name, g in grads.items():
                assert float((g - ref["grads"][name]).abs().max()) < 1e-7, name


def _run_layouts(rank, world_size, layouts):
    out = {}
    for name, (cfg, family, *mode) in layouts.items():
        start = time.perf_counter()
        out[name] = H.check_layout_against_reference(
            ParallelConfig(**cfg), mode[0] if mode else "full", world_size, family=family, tied=TIED.get(family, False)
        )
        out[name]["seconds"] = time.perf_counter() - start
    return out


@pytest.fixture(scope="module")
def results():
    return launch(_run_layouts, 4, LAYOUTS)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_family_layout_matches_one_process(results, name):
    per_rank = [r[name] for r in results]
    print(name, f"{per_rank[0]['seconds']:.1f} s", per_rank[0]["losses"])
    covered = set().union(*(r["names"] for r in per_rank))
    assert covered == set(per_rank[0]["ref_names"]), "some gradients were not compared"
    cfg, family, *mode = LAYOUTS[name]
    if mode == ["lora"]:
        assert covered and all("lora_" in n for n in covered)
    if cfg.get("tp", 1) > 1:
        assert all(
            r["sequence_parallel"] == cfg.get("sequence_parallel", True) and r["vocab_parallel"] for r in per_rank
        )
    for r in per_rank:
        assert r["loss_diff"] < 1e-5, r["losses"]
        assert r["norm_diff"] < 1e-5
        assert r["grad_abs"] < 1e-6 and r["grad_rel"] < 1e-5, (r["grad_abs"], r["grad_rel"])
        if TIED.get(family) and cfg.get("pp", 1) > 1:
            assert r["weight_diff"] < 1e-5  # both copies of the tied weight after the last step


def test_tp_plan_covers_families_by_module_names():
    """The engine's own check (the layers' modules), for families recipe validation cannot name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from parallel.distributed.tensor_parallel import tp_plan_problem

    for family in ("llama", "qwen3", "gemma2", "gemma3", "phi3", "granite", "stablelm", "starcoder2"):
        assert tp_plan_problem(H.build_model("full", family=family).model.layers[0]) is None, family
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["qkv_proj", "o_proj"], task_type="CAUSAL_LM")
    phi3_lora = get_peft_model(H.build_model("full", family="phi3"), lora).base_model.model.model.layers[0]
    assert tp_plan_problem(phi3_lora) == (
        "parallel.tp: LoRA adapters on the fused self_attn.qkv_proj are not split by tp; use tp: 1"
    )
    assert "mixture-of-experts" in tp_plan_problem(H.build_model("full", family="mixtral").model.layers[0])
    olmo2 = tp_plan_problem(H.build_model("full", family="olmo2").model.layers[0])
    assert (
        olmo2
        == "parallel.tp: Olmo2DecoderLayer's self_attn.q_norm is not one norm per head, which tp splits; use tp: 1"
    )
    apertus = AutoModelForCausalLM.from_config(AutoConfig.for_model("apertus", **{**H.MODEL, "eos_token_id": 2}))
    assert "does not place (mlp.act_fn.alpha_p, mlp.act_fn.alpha_n)" in tp_plan_problem(apertus.model.layers[0])


# Dense decoders the plan covers by module names, beyond the families trained above: their pipeline stages
# (one process, chained by hand) give the model's own logits, and their layers pass the tp check.
MORE_DENSE = ["olmo3", "glm4", "smollm3", "exaone4", "seed_oss", "ernie4_5", "nemotron", "arcee"]


@pytest.mark.parametrize("family", [*ONE_PROCESS[:-2], *MORE_DENSE])
def test_stage_modules_compose_to_the_model(family):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from parallel.distributed.pipeline import build_stage_modules
    from parallel.distributed.tensor_parallel import tp_plan_problem

    def build():
        if family in ONE_PROCESS:
            return H.build_model("full", family=family, tied=TIED.get(family, False))
        torch.manual_seed(0)
        config = AutoConfig.for_model(family, **{**H.MODEL, "eos_token_id": 2, "bos_token_id": 1})
        return AutoModelForCausalLM.from_config(config)

    batch = H.make_batch(0)
    full = build().eval()
    with torch.no_grad():
        expected = full(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        x = batch["input_ids"]
        for stage in [s for rank in range(2) for s in build_stage_modules(build(), rank, 2, "1f1b")]:
            x = stage.eval()(x, attention_mask=batch["attention_mask"])
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    if family in MORE_DENSE:
        assert (tp_plan_problem(full.model.layers[0]) is None) == (family != "olmo3")
