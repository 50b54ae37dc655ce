"""One-process tests: layout validation, stage splitting, names, ZeRO-1 partition, checkpointing policy."""

import pytest
import torch

from parallel.dims import ParallelConfig
from parallel.distributed.mesh import ParallelDims
from parallel.distributed.pipeline import build_stage_modules, find_decoder, split_layers
from parallel.distributed.zero import partition_params
from parallel.layout import layout_problems, model_problems
from parallel.trainer import apply_activation_checkpointing, num_label_tokens, summed_ce
from tests.parallel.distributed.harness import build_model, make_batch


def test_world_size_mismatch_names_the_fields():
    with pytest.raises(ValueError, match=r"dp_shard=2 x pp=2 x tp=2 = 8, but 4 processes"):
        ParallelDims.from_config(ParallelConfig(dp_shard=2, pp=2, tp=2), 4)
    assert ParallelDims.from_config(ParallelConfig(dp_replicate=2, dp_shard=2, tp=2), 8).dp == 4


@pytest.mark.parametrize(
    "cfg, mode, quantized, field",
    [
        (dict(tp=2), "qlora", False, "parallel.tp"),
        (dict(tp=2), "lora", True, "parallel.tp"),
        (dict(dp_shard=2, zero=3), "qlora", False, "parallel.zero"),
        (dict(dp_replicate=2, zero=3), "full", False, "parallel.zero"),
        (dict(zero=1), "full", False, "parallel.zero"),
        (dict(pp=4, microbatches=2), "full", False, "parallel.microbatches"),
        (dict(pp=2, microbatches=3, pp_schedule="interleaved_1f1b"), "full", False, "parallel.microbatches"),
    ],
)
def test_check_layout_problems(cfg, mode, quantized, field):
    problems = layout_problems(ParallelConfig(**cfg), mode="qlora" if quantized else mode)
    assert problems and problems[0].startswith(field + ":"), problems


def test_check_layout_accepts_valid_layouts():
    assert layout_problems(ParallelConfig(pp=2, tp=2, dp_shard=2, zero=3, microbatches=4), mode="full") == []
    assert layout_problems(ParallelConfig(dp_replicate=2, zero=1), mode="qlora") == []
    assert layout_problems(ParallelConfig(), mode="sft") == ["mode: 'sft' is not one of ['full', 'lora', 'qlora']"]


def test_check_model_layout():
    kw = dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    assert model_problems(ParallelConfig(tp=4), kw)[0].startswith("parallel.tp:")
    assert model_problems(ParallelConfig(pp=4, pp_schedule="zero_bubble"), kw)[0].startswith("parallel.pp:")
    assert model_problems(ParallelConfig(pp=2), {**kw, "tie_word_embeddings": True}) == []  # copies on two stages
    assert model_problems(ParallelConfig(pp=2, tp=2, pp_schedule="interleaved_1f1b"), kw) == []


def test_split_layers_is_balanced_and_contiguous():
    assert split_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b"])
def test_stage_modules_keep_global_names_and_compose_to_the_model(mode, schedule):
    """Stages chained by hand give the full model's logits; their names partition the model's names."""
    batch = make_batch(0)
    full = build_model(mode).eval()
    with torch.no_grad():
        expected = full(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    names = {n for n, _ in full.named_parameters()}
    stages = [s for rank in range(2) for s in build_stage_modules(build_model(mode), rank, 2, schedule)]
    stages.sort(key=lambda s: s.layer_ids[0])
    stage_names = [n for s in stages for n, _ in s.named_parameters()]
    assert sorted(stage_names) == sorted(names)
    x = batch["input_ids"]
    with torch.no_grad():
        for stage in stages:
            x = stage.eval()(x, attention_mask=batch["attention_mask"])
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-6)


def test_find_decoder_rejects_other_models():
    with pytest.raises(ValueError, match="not a Llama-family causal LM"):
        find_decoder(torch.nn.Linear(2, 2))


def test_partition_params_balances_sizes():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (100, 10, 60, 40, 5)]
    owners = partition_params(params, 2)
    load = [sum(p.numel() for p, o in zip(params, owners) if o == r) for r in range(2)]
    assert sorted(load) == [105, 110]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_recomputes_with_same_grads(mode):
    batch = make_batch(0)

    def grads_and_mlp_calls(ac: str):
        model = build_model("full").train()
        layers = list(find_decoder(model)[1].layers)
        apply_activation_checkpointing(layers, ac)
        calls = []
        layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))  # pre: recompute stops early
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        (summed_ce(logits, batch["labels"]) / num_label_tokens(batch["labels"])).backward()
        return {n: p.grad for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads_and_mlp_calls("none")
    checkpointed, ac_calls = grads_and_mlp_calls(mode)
    assert (plain_calls, ac_calls) == (1, 2)  # the layer ran again in backward
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-7)
