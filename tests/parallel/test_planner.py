"""The memory planner on hand-computed numbers for micro-llama (H 64, I 128, 4 layers, 4 heads, 2 KV heads).

Per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 = 12288, MLP 3 x 64x128 = 24576, two norms 128:
36992. Embedding and lm_head 260 x 64 = 16640 each, final norm 64. Total 181312.
"""

import pytest

from parallel.dims import ParallelConfig
from parallel.planner import (
    GIB,
    Shape,
    _rank_estimate,
    estimate_memory,
    memory_warnings,
    num_params,
    split_layers,
    zero1_loads,
)
from parallel.tiny import TINY_CONFIGS

MICRO = dict(TINY_CONFIGS["micro-llama"], vocab_size=260)
LAYER, EMBED, TOTAL = 36992, 16640, 181312


def _estimate(mode="full", micro_batch=2, seq_len=16, dtype_bytes=2, **layout):
    layout.setdefault("loss_chunk_tokens", 0)  # whole logits, unless a test asks for chunks
    return estimate_memory(
        MICRO, ParallelConfig(**layout), mode=mode, seq_len=seq_len, micro_batch=micro_batch, dtype_bytes=dtype_bytes
    )


def test_param_count_matches_the_hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    assert num_params(MICRO) == TOTAL
    for extra in ({}, {"tie_word_embeddings": True, "num_key_value_heads": 4}):
        config = dict(MICRO, **extra)
        model = LlamaForCausalLM(LlamaConfig(**config))
        assert num_params(config) == sum(p.numel() for p in model.parameters())


def test_one_process_full_fine_tuning():
    e = _estimate()
    assert (e.params, e.grads, e.optimizer, e.gathered) == (4 * TOTAL, 4 * TOTAL, 8 * TOTAL, 0)
    # 32 tokens x 4 layers x (4*64 + 3*64 + 3*32 + 4*128 = 1056 elements) x 2 bytes, plus
    # logits 32 tokens x 260 x (2 + 8) bytes.
    assert e.activations == 32 * 4 * 1056 * 2 + 32 * 260 * 10


def test_zero_stages_shard_what_they_should():
    # ZeRO-1 gives each tensor to one rank (largest first, to the least loaded): the larger share is
    # 90688 elements, 32 (a norm) above half of 181312.
    assert zero1_loads([5, 4, 3, 3], 2) == [8, 7]
    assert _estimate(dp_shard=2, zero=1).optimizer == 8 * 90688
    assert _estimate(dp_shard=2, zero=1).grads == 4 * TOTAL
    z2 = _estimate(dp_shard=2, zero=2)
    assert (z2.params, z2.grads, z2.optimizer, z2.gathered) == (2 * TOTAL, 2 * TOTAL, 4 * TOTAL, 2 * TOTAL)
    z3 = _estimate(dp_shard=2, zero=3)
    assert z3.gathered == (2 * EMBED + 64 + 2 * LAYER) * 2  # root group + two layers, in bf16
    hsdp = _estimate(dp_replicate=2, dp_shard=2, zero=3)
    assert hsdp.params == 2 * TOTAL  # replicas do not shard


def test_tensor_and_pipeline_splits():
    tp_layer = (12288 + 24576) // 2 + 128
    assert _estimate(tp=2, vocab_parallel=False).params == 4 * (4 * tp_layer + 2 * EMBED + 64)
    assert _estimate(tp=2).params == 4 * (4 * tp_layer + EMBED + 64)  # embedding and lm_head split too
    # pp2: stage 0 = embedding + 2 layers = 90624, stage 1 = 2 layers + norm + lm_head = 90688.
    assert split_layers(5, 2) == [3, 2]
    # 1F1B: stage 0 holds 2 micro-batches in flight (2 x 2 layers x 1056 x 32 tokens x 2 bytes = 270336),
    # more than stage 1 (one in flight, 135168, plus logits 83200), so stage 0 is the most loaded.
    pp = _estimate(pp=2, microbatches=2)
    assert (pp.pp_rank, pp.params, pp.activations) == (0, 4 * (2 * LAYER + EMBED), 270336)


def test_sequence_and_vocab_parallel_split_activations():
    plain = _estimate(tp=2, sequence_parallel=False, vocab_parallel=False)
    # Per token and layer: 4*64 replicated + (3*64 + 3*32 + 4*128) / 2 = 256 + 400 elements.
    assert plain.activations == 32 * 4 * (256 + 400) * 2 + 32 * 260 * 10
    sp = _estimate(tp=2, vocab_parallel=False)
    # Sequence parallel: the gathered attention/MLP inputs stay whole (2*64), layer input + residual halve.
    assert sp.activations == 32 * 4 * (128 + 64 + 400) * 2 + 32 * 260 * 10
    both = _estimate(tp=2)
    assert both.activations == sp.activations - 32 * 130 * 10  # vocab-sharded logits
    tied = estimate_memory(
        dict(MICRO, tie_word_embeddings=True), ParallelConfig(tp=2, loss_chunk_tokens=0), seq_len=16, micro_batch=2
    )
    assert tied.activations == both.activations  # tied embeddings split over the vocabulary alike


def test_tied_embeddings_under_pp_keep_a_copy_on_the_last_stage():
    tied = dict(MICRO, tie_word_embeddings=True)
    one = estimate_memory(tied, ParallelConfig(loss_chunk_tokens=0), seq_len=16, micro_batch=2)
    assert one.params == 4 * (TOTAL - EMBED)  # one tensor for both ends
    gpipe = ParallelConfig(pp=2, microbatches=2, pp_schedule="gpipe", loss_chunk_tokens=0)
    last = estimate_memory(tied, gpipe, seq_len=16, micro_batch=2)
    untied = _estimate(pp=2, microbatches=2, pp_schedule="gpipe")
    # GPipe: both stages hold 2 micro-batches; stage 1 (logits) is the most loaded; its lm_head is a copy
    assert last.pp_rank == untied.pp_rank == 1 and last.params == untied.params == 4 * (2 * LAYER + 64 + EMBED)


def test_lora_trains_only_adapters():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model = get_peft_model(
        LlamaForCausalLM(LlamaConfig(**MICRO)), LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapters == 4 * 8 * (128 + 96 + 96 + 128 + 192 + 192 + 192)  # r x (in + out) per projection
    e = _estimate(mode="lora")
    assert (e.params, e.grads, e.optimizer) == (4 * (TOTAL + adapters), 4 * adapters, 8 * adapters)


def test_activation_checkpointing_shrinks_activations():
    none, full = _estimate(), _estimate(activation_checkpointing="full")
    logits = 32 * 260 * 10
    assert full.activations == (4 * 64 + 1056) * 32 * 2 + logits  # layer inputs + one layer recomputed
    assert full.activations < _estimate(activation_checkpointing="selective").activations < none.activations


def test_warnings_only_above_the_gpu():
    e = _estimate()
    assert memory_warnings(e, 80 * GIB) == []
    warnings = memory_warnings(e, e.total)  # over 90% of a GPU exactly this size
    assert len(warnings) == 1 and "optimizer" in warnings[0] and warnings[0].startswith("parallel:")


def test_unknown_mode_is_a_user_error():
    with pytest.raises(ValueError, match="mode"):
        _estimate(mode="dpo")


def test_chunked_token_loss_holds_one_chunk_of_logits():
    layers = 32 * 4 * 1056 * 2
    assert _estimate().activations == layers + 32 * 260 * 10  # whole logits: bf16 + fp32 copy + log-softmax
    # 8-token chunks: one chunk's logits (bf16 + fp32), the fp32 gradient of the 32 hidden states, and the
    # bf16 copies of the hidden states and the head weight.
    chunk = 8 * 260 * 6 + 32 * 64 * 4 + (32 + 260) * 64 * 2
    assert _estimate(loss_chunk_tokens=8).activations == layers + chunk
    auto = _estimate(loss_chunk_tokens=None).activations  # chunks of at least 1024 tokens: all 32 at once
    assert auto == layers + 32 * 260 * 6 + 32 * 64 * 4 + (32 + 260) * 64 * 2
    # Under ZeRO-3 the fp32 head gradient is held beside FSDP's shard (at ZeRO <= 1 it is the gradient).
    assert _estimate(loss_chunk_tokens=8, dp_shard=2, zero=3).activations == layers + chunk + 260 * 64 * 4

    # The last pipeline stage chunks too (one micro-batch of 16 tokens).
    def last_stage(chunk):
        cfg = ParallelConfig(pp=2, microbatches=2, loss_chunk_tokens=chunk)
        return _rank_estimate(Shape.from_config(MICRO), cfg, 1, "full", 16, 1, 2, 8, "all-linear", True, True)

    saved = 16 * 260 * 10 - (8 * 260 * 6 + 16 * 64 * 4 + (16 + 260) * 64 * 2)
    assert last_stage(0).activations - last_stage(8).activations == saved
    # Where the Trainer keeps the logits path: a loss other than token CE, and loss_chunk_tokens: 0.
    whole = layers + 32 * 260 * 10
    dpo = estimate_memory(MICRO, ParallelConfig(loss_chunk_tokens=8), seq_len=16, micro_batch=2, token_loss=False)
    assert dpo.activations == whole
