"""The dry run at scale: Llama-3 8B / 70B and Qwen2.5 72B on the meta device, laid out by the engine's
parallelize for ranks of a fake 64-, 256- and 512-rank world; the planner's weight, gradient and optimizer
bytes must equal the shards the ranks actually hold."""

import re

import pytest

from parallel.dims import LoraConfig, ParallelConfig
from parallel.dryrun import SHAPES, actual_state, dry_run, table
from parallel.planner import num_params
from parallel.tiny import TINY_CONFIGS

LAYOUTS = {
    64: ParallelConfig(tp=8, dp_shard=8, zero=3),
    256: ParallelConfig(pp=4, tp=8, dp_shard=8, zero=1, microbatches=4),
    512: ParallelConfig(pp=8, tp=8, dp_shard=8, zero=3, microbatches=8),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_planner_equals_the_shards_at_64_256_and_512_ranks(shape):
    for world, parallel in LAYOUTS.items():
        checks = dry_run(SHAPES[shape], parallel)
        assert parallel.world_size == world
        assert [c.kind for c in checks] == (["all"] if parallel.pp == 1 else ["first", "middle", "last"])
        for c in checks:
            assert c.ok, (shape, world, table(checks))
            assert c.actual.params > 0 and c.actual.optimizer > 0


def test_hybrid_sharding_interleaved_stages_and_lora_adapters():
    hsdp = ParallelConfig(
        dp_replicate=2, dp_shard=4, pp=4, tp=4, zero=2, microbatches=8, pp_schedule="interleaved_1f1b"
    )
    assert all(c.ok for c in dry_run(SHAPES["llama-3-8b"], hsdp))
    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    checks = dry_run(
        SHAPES["llama-3-8b"], ParallelConfig(pp=2, tp=4, dp_shard=4, zero=3, microbatches=2), mode="lora", lora=lora
    )
    assert all(c.ok for c in checks), table(checks)
    # Only the adapters train: per layer q's A (8 x 4096, whole under tp) and B (4096 / tp 4 rows x 8), v's
    # A (8 x 4096) and B (1024 / 4 rows x 8), each tensor's rows split over 4 dp_shard ranks; 16 layers.
    adapters = 16 * (2 * 4096 + 256 * 8 + 2 * 4096 + 64 * 8)
    assert checks[0].actual.grads == 4 * adapters


def test_one_process_holds_the_whole_model():
    config = dict(TINY_CONFIGS["micro-llama"], vocab_size=260)
    state = actual_state(config, ParallelConfig(), 0, mode="full", lora=None)
    assert state.params == state.grads == 4 * num_params(config) and state.optimizer == 8 * num_params(config)


@pytest.mark.parametrize(
    "layout, message",
    [
        (dict(tp=16, dp_shard=4), "parallel.tp: 16 must divide the model's 64 attention heads and 8 KV heads"),
        (dict(pp=96, microbatches=96), "parallel.pp: 96 pipeline stages (1f1b) but the model has only 80 layers"),
        (dict(pp=8, tp=8, microbatches=4), "parallel.microbatches: 4 micro-batches cannot fill 8 pipeline stages"),
        (dict(tp=8, dp_shard=8, zero=3, compile=True), "parallel.compile: torch.compile of tensor-parallel"),
    ],
)
def test_layouts_the_engine_refuses(layout, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dry_run(SHAPES["llama-3-70b"], ParallelConfig(**layout))


def test_other_families_biases_tied_weights_and_uneven_shards():
    """Llama with attention/MLP biases, Qwen3's per-head norms, tied embeddings (a copy on the last stage),
    a vocabulary tp does not divide (embeddings whole) and dims dp_shard 3 or 5 does not divide (FSDP2 pads)."""
    base = dict(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=6)
    base |= dict(num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    configs = [
        dict(base, model_type="llama", attention_bias=True, mlp_bias=True),
        dict(base, model_type="qwen3", tie_word_embeddings=True),
        dict(base, model_type="qwen2", vocab_size=1001, tie_word_embeddings=True),
    ]
    layouts = [
        ParallelConfig(pp=3, tp=2, dp_shard=3, zero=3, microbatches=3),
        ParallelConfig(tp=2, dp_shard=5, zero=2),
        ParallelConfig(pp=2, tp=4, dp_replicate=2, zero=1, microbatches=2, pp_schedule="zero_bubble"),
    ]
    for config in configs:
        for parallel in layouts:
            checks = dry_run(config, parallel)
            assert all(c.ok for c in checks), (config["model_type"], parallel, table(checks))
