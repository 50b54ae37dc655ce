"""parallel.layout: the one layout check, rule by rule, without a world (recipe validation) and with one."""

import pytest

from parallel.dims import ParallelConfig
from parallel.layout import check_layout, layout_problems

LLAMA = dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=300)


def fields(problems: list[str]) -> list[str]:
    return [p.split(":")[0] for p in problems]


def test_a_plain_layout_has_no_problems():
    assert layout_problems(ParallelConfig()) == []
    assert layout_problems(ParallelConfig(), world=1, model_config=LLAMA, batch_rows=16) == []
    assert layout_problems(ParallelConfig(pp=2, tp=2, dp_shard=2, zero=3, microbatches=4), world=8) == []


def test_unknown_mode_is_the_only_problem():
    assert layout_problems(ParallelConfig(zero=3), mode="sft") == [
        "mode: 'sft' is not one of ['full', 'lora', 'qlora']"
    ]


@pytest.mark.parametrize(
    "cfg, world, message",
    [
        (dict(tp=2), 1, "needs 2 processes, but torch.distributed is not initialised"),
        (dict(dp_shard=2, pp=2, tp=2, microbatches=2), 4, "dp_shard=2 x pp=2 x tp=2 = 8, but 4 processes were started"),
        (dict(), 2, "= 1, but 2 processes were started"),
    ],
)
def test_world_rules_apply_only_when_the_world_is_known(cfg, world, message):
    parallel = ParallelConfig(**cfg)
    assert layout_problems(parallel) == []  # recipe validation: no processes yet
    problems = layout_problems(parallel, world=world)
    assert len(problems) == 1 and problems[0].startswith("parallel:") and message in problems[0]
    assert layout_problems(parallel, world=parallel.world_size) == []


@pytest.mark.parametrize(
    "cfg, field, words",
    [
        (dict(zero=2), "parallel.zero", "ZeRO-2 shards parameters over parallel.dp_shard"),
        (dict(dp_replicate=2, zero=3), "parallel.zero", "ZeRO-3 shards parameters"),
        (dict(zero=1), "parallel.zero", "ZeRO-1 shards optimizer state"),
        (dict(pp=4, microbatches=2), "parallel.microbatches", "cannot fill 4 pipeline stages"),
        (dict(pp=2, microbatches=3, pp_schedule="interleaved_1f1b"), "parallel.microbatches", "multiple of"),
        (dict(tp=2, compile=True), "parallel.compile", "torch.compile of tensor-parallel blocks"),
    ],
)
def test_degree_rules(cfg, field, words):
    problems = layout_problems(ParallelConfig(**cfg))
    assert fields(problems) == [field] and words in problems[0], problems


@pytest.mark.parametrize(
    "cfg, field",
    [
        (dict(tp=2), "parallel.tp"),
        (dict(pp=2, microbatches=2), "parallel.pp"),
        (dict(dp_shard=2, zero=3), "parallel.zero"),
    ],
)
def test_quantized_base_rules_apply_to_qlora_only(cfg, field):
    parallel = ParallelConfig(**cfg)
    assert layout_problems(parallel, mode="lora") == []
    problems = layout_problems(parallel, mode="qlora")
    assert fields(problems) == [field] and "4-bit quantized (QLoRA)" in problems[0]


@pytest.mark.parametrize(
    "cfg, model, field, words",
    [
        (dict(tp=4), {}, "parallel.tp", "4 must divide the model's 4 attention heads and 2 KV heads"),
        # the pipeline rule counts virtual stages: interleaved schedules hold two per pp rank
        (dict(pp=4, microbatches=4, pp_schedule="interleaved_1f1b"), {}, "parallel.pp", "8 pipeline stages"),
        (dict(tp=2, vocab_parallel=True), {"vocab_size": 301}, "parallel.vocab_parallel", "(301) does not divide"),
    ],
)
def test_model_shape_rules(cfg, model, field, words):
    parallel = ParallelConfig(**cfg)
    assert layout_problems(parallel) == []  # no model config: no shape rules
    problems = layout_problems(parallel, model_config={**LLAMA, **model})
    assert fields(problems) == [field] and words in problems[0], problems


def test_model_rules_read_a_hf_config_object():
    from transformers import LlamaConfig

    config = LlamaConfig(**{**LLAMA, "num_key_value_heads": 1})
    assert fields(layout_problems(ParallelConfig(tp=2), model_config=config)) == ["parallel.tp"]
    assert layout_problems(ParallelConfig(pp=4, microbatches=4), model_config=config) == []


def test_kinds_without_pipeline_refuse_pp():
    parallel = ParallelConfig(pp=2, microbatches=2)
    assert layout_problems(parallel, pipeline=False, stage="grpo") == [
        "parallel.pp: the grpo stage trains under data, ZeRO and tensor parallelism, not pipeline stages "
        "yet; set pp = 1"
    ]
    assert layout_problems(ParallelConfig(tp=2), pipeline=False) == []


def test_batch_split_counts_dp_microbatches_and_grad_accum():
    parallel = ParallelConfig(dp_shard=2, microbatches=2, pp=1)
    assert layout_problems(parallel, batch_rows=8, grad_accum=2) == []
    assert layout_problems(parallel, batch_rows=12, grad_accum=2) == [
        "batch_size: 12 sequences do not split into dp=2 x parallel.microbatches=2 x grad_accum=2 equal "
        "micro-batches; use a multiple of 8"
    ]
    (line,) = layout_problems(parallel, batch_rows=6, unit="pairs", stage="dpo")
    assert line.startswith("stages (dpo).batch_size: 6 pairs do not split") and line.endswith("multiple of 4")
    (line,) = layout_problems(parallel, batch_rows=6, unit="rollouts", stage="ppo", batch_field="mini_batch_size")
    assert line.startswith("stages (ppo).mini_batch_size: 6 rollouts")


def test_check_layout_raises_every_problem_at_once():
    parallel = ParallelConfig(tp=2, zero=1)
    problems = layout_problems(parallel, mode="qlora", world=1)
    assert fields(problems) == ["parallel", "parallel.zero", "parallel.tp"]
    with pytest.raises(ValueError) as err:
        check_layout(parallel, mode="qlora", world=1)
    assert str(err.value) == "; ".join(problems)
    check_layout(ParallelConfig(dp_shard=2, zero=1), world=2)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(pp=2, microbatches=2),
        dict(pp=2, microbatches=4, pp_schedule="interleaved_1f1b"),
        dict(tp=2, vocab_parallel=True),
        dict(pp=2, tp=2, dp_shard=2, zero=3, microbatches=2, vocab_parallel=True),
    ],
)
def test_tied_embeddings_train_under_every_layout(cfg):
    tied = {**LLAMA, "tie_word_embeddings": True}
    assert layout_problems(ParallelConfig(**cfg), model_config=tied) == []
    assert layout_problems(ParallelConfig(**cfg), mode="lora", model_config=tied) == []


def test_config_json_and_the_hf_config_read_alike():
    """Recipe validation reads config.json, the job a HF config object: a key config.json leaves out takes
    its class default in both (Gemma's classes default to tied embeddings, and its config.json files omit
    the key), and a composite config stands for its text decoder."""
    from transformers import Gemma2Config

    from parallel.layout import is_tied, resolve_model_config

    gemma = {"model_type": "gemma2", "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
    assert is_tied(gemma) and is_tied(Gemma2Config(**{k: v for k, v in gemma.items() if k != "model_type"}))
    assert not is_tied({**gemma, "tie_word_embeddings": False})
    assert not is_tied({"model_type": "llama", "num_hidden_layers": 4}) and not is_tied(LLAMA)
    assert resolve_model_config({"model_type": "gemma3", "text_config": {**LLAMA, "tie_word_embeddings": True}}) == {
        **LLAMA,
        "tie_word_embeddings": True,
    }
    # an unknown model_type: the values as written
    assert resolve_model_config({"model_type": "no-such-model", "num_hidden_layers": 3}) == {
        "model_type": "no-such-model",
        "num_hidden_layers": 3,
    }


def test_pipeline_stages_refuse_what_they_cannot_reproduce():
    """Gemma 2/3 (soft-capped logits, sliding-window layers) and Granite (multipliers) run under pp: the
    stage modules reproduce them (tests/parallel/distributed/test_families.py); other layer types and logit
    transforms are refused."""
    gemma2 = {"model_type": "gemma2", "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
    pp2 = ParallelConfig(pp=2, microbatches=2)
    assert layout_problems(pp2, model_config=gemma2) == []
    assert layout_problems(ParallelConfig(tp=2), model_config=gemma2) == []
    granite = {**LLAMA, "model_type": "granite", "embedding_multiplier": 12.0, "logits_scaling": 8.0}
    assert layout_problems(pp2, model_config=granite) == []
    other = {**LLAMA, "layer_types": ["full_attention", "linear_attention"] * 2, "logit_scale": 0.25}
    assert layout_problems(pp2, model_config=other) == [
        "parallel.pp: pipeline stages would skip its linear_attention layers and its logit_scale; use pp: 1"
    ]
    assert layout_problems(pp2, model_config={**LLAMA, "use_bidirectional_attention": True}) == [
        "parallel.pp: pipeline stages would skip its bidirectional attention; use pp: 1"
    ]


@pytest.mark.parametrize("model_type, experts_key", [("mixtral", "num_local_experts"), ("qwen3_moe", "num_experts")])
def test_mixture_of_experts_refuses_tp_and_pp(model_type, experts_key):
    """Experts train unsplit under dp/ZeRO; tp and pp name their field and say expert parallelism is missing,
    from config.json (recipe validation) and from the HF config object (the job) alike."""
    from transformers import AutoConfig

    moe = {**LLAMA, "model_type": model_type, experts_key: 8}
    for parallel in (ParallelConfig(dp_shard=2, zero=3), ParallelConfig(dp_replicate=2, dp_shard=2, zero=1)):
        assert layout_problems(parallel, model_config=moe) == []
    problems = layout_problems(ParallelConfig(tp=2, pp=2, microbatches=2), model_config=moe)
    assert fields(problems) == ["parallel.tp", "parallel.pp"], problems
    assert all("mixture of experts (8 experts); expert parallelism is not supported yet" in p for p in problems)
    job = AutoConfig.for_model(model_type, **{k: v for k, v in moe.items() if k != "model_type"})
    assert layout_problems(ParallelConfig(tp=2), model_config=job) == problems[:1]
    with pytest.raises(ValueError, match="parallel.pp: the model is a mixture of experts"):
        check_layout(ParallelConfig(pp=2, microbatches=2), world=2, model_config=job)


def test_norms_across_heads_refuse_tp_only():
    """OLMo2/OLMo3's q/k norms span all heads: no exact split over tp (the engine's own check from the
    modules: tests/parallel/distributed/test_families.py). Phi-3's fused projections are split exactly."""
    olmo2 = {**LLAMA, "model_type": "olmo2"}
    assert layout_problems(ParallelConfig(tp=2), model_config=olmo2) == [
        "parallel.tp: the model has q/k norms across all heads, which tp would split; use tp: 1 (pp and ZeRO work)"
    ]
    assert layout_problems(ParallelConfig(pp=2, dp_shard=2, zero=3, microbatches=2), model_config=olmo2) == []
    assert layout_problems(ParallelConfig(tp=2), model_config={**LLAMA, "model_type": "phi3"}) == []


def test_validation_and_the_job_read_a_model_directory_alike(tmp_path):
    """Recipe validation reads <model.path>/config.json as a dict, the job AutoConfig.from_pretrained of the
    same directory: the same problems and the same tying, also for a hub-style Gemma 2 config.json that
    leaves tie_word_embeddings out (its class default is true)."""
    import json

    from transformers import AutoConfig, Gemma2Config

    from parallel.layout import is_tied

    Gemma2Config(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16).save_pretrained(
        tmp_path
    )
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("tie_word_embeddings")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    job = AutoConfig.from_pretrained(tmp_path)
    assert is_tied(raw) and is_tied(job) and job.tie_word_embeddings
    for cfg in (dict(pp=2, microbatches=2), dict(tp=4), dict(tp=2, vocab_parallel=True)):
        parallel = ParallelConfig(**cfg)
        assert layout_problems(parallel, model_config=raw) == layout_problems(parallel, model_config=job)
    assert layout_problems(ParallelConfig(tp=4), model_config=raw)  # its 2 KV heads


def test_recipe_validation_refuses_expert_and_cross_head_splits():
    """`hpcft validate` on the tiny recipe with the MoE and OLMo2 tiny models: one line per field, exit 2."""
    from hpc.recipe import RecipeError, load_recipe
    from tests.conftest import TINY_RECIPE

    with pytest.raises(RecipeError) as e:
        load_recipe(
            TINY_RECIPE, ["model.tiny=micro-qwen3-moe", "parallel.tp=2", "parallel.pp=2", "parallel.microbatches=2"]
        )
    assert fields(e.value.problems) == ["parallel.tp", "parallel.pp"], e.value.problems
    assert "expert parallelism is not supported yet" in e.value.problems[0]
    with pytest.raises(RecipeError) as e:
        load_recipe(TINY_RECIPE, ["model.tiny=micro-olmo2", "parallel.tp=2"])
    assert e.value.problems == [layout_problems(ParallelConfig(tp=2), model_config={"model_type": "olmo2"})[0]]
    load_recipe(TINY_RECIPE, ["model.tiny=micro-phi3", "parallel.tp=2", "parallel.dp_shard=2", "parallel.zero=3"])
    load_recipe(TINY_RECIPE, ["model.tiny=micro-mixtral", "parallel.dp_shard=2", "parallel.zero=3"])
    load_recipe(TINY_RECIPE, ["model.tiny=micro-gemma3", "parallel.pp=2", "parallel.tp=2", "parallel.microbatches=2"])
