"""The chunked linear + cross-entropy against the plain loss: values and gradients (hidden states and head
weight), in one process, through the Trainer, and with the head's vocabulary split over 2 ranks."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from parallel.chunked_ce import auto_chunk_tokens, chunked_ce, why_not_chunked
from parallel.dims import ParallelConfig
from parallel.distributed.launch import launch
from parallel.trainer import LocalMesh, Trainer, summed_ce
from tests.parallel.distributed import harness as H


def _inputs(seed: int = 0, rows: int = 3, seq: int = 19, hidden: int = 24, vocab: int = 70):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, seq, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * 0.3
    labels = torch.randint(0, vocab, (rows, seq), generator=gen)
    labels[0, :7] = -100  # a prompt
    labels[2, 12:] = -100  # padding
    return h, w, labels


def _loss_and_grads(fn, h, w, labels, scale=0.37):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    value = fn(h, w, labels)
    (value * scale).backward()
    return value.detach(), h.grad, w.grad


def _plain(h, w, labels):
    return summed_ce(h @ w.t(), labels)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 16, None, 1000])
def test_matches_plain_loss_and_gradients(chunk, recompute):
    h, w, labels = _inputs()
    ref = _loss_and_grads(_plain, h, w, labels)
    got = _loss_and_grads(lambda a, b, c: chunked_ce(a, b, c, chunk, recompute=recompute), h, w, labels)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)  # hidden (ignored positions: zero)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)  # head weight
    assert got[1][0, :6].abs().max() == 0  # positions predicting a prompt token get no gradient


def test_frozen_head_gets_no_gradient_and_the_hidden_states_theirs():
    """LoRA keeps lm_head frozen: no weight gradient is computed, the hidden states' is unchanged."""
    h, w, labels = _inputs(seed=2)
    ref = _loss_and_grads(_plain, h, w, labels)
    h = h.clone().requires_grad_()
    (chunked_ce(h, w, labels, 4) * 0.37).backward()
    torch.testing.assert_close(h.grad, ref[1], rtol=1e-5, atol=1e-6)


def test_autocast_is_as_close_to_fp32_as_the_bf16_head():
    """Under bf16 autocast the head's matmuls run in bf16 like lm_head's: the chunked loss and gradients
    are no further from the fp32 ones than the plain bf16 path's (fp32 sums over chunks, if anything closer)."""
    h, w, labels = _inputs(seed=1)
    exact = _loss_and_grads(_plain, h, w, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _loss_and_grads(lambda a, b, c: summed_ce(nn.functional.linear(a, b), c), h, w, labels)
        got = _loss_and_grads(lambda a, b, c: chunked_ce(a, b, c, 8), h, w, labels)
    assert got[1].dtype == got[2].dtype == torch.float32
    for mine, theirs, ref in zip(got, plain, exact):
        assert float((mine - ref).abs().max()) <= 1.5 * float((theirs - ref).abs().max()) + 1e-6


def test_auto_chunk_keeps_chunk_logits_near_the_hidden_states_size():
    assert auto_chunk_tokens(64 * 4096, 4096, 128256) == 16384  # 8372 -> next power of two
    assert auto_chunk_tokens(8 * 2048, 2048, 128256) == 1024  # 262: never below 1024 tokens
    assert auto_chunk_tokens(4096, 4096, 4096) == 4096  # small vocabulary: one chunk


def _llama(**extra):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**H.MODEL, **extra}))


def test_heads_that_are_not_a_plain_projection_keep_the_logits_path():
    assert why_not_chunked(_llama()) is None
    assert why_not_chunked(_llama(tie_word_embeddings=True)) is None
    assert "final_logit_softcapping" in why_not_chunked(_llama(final_logit_softcapping=30.0))
    from peft import LoraConfig, get_peft_model

    lora_head = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["lm_head"], task_type="CAUSAL_LM"))
    assert "adapters" in why_not_chunked(lora_head)
    trainer = Trainer(lora_head, ParallelConfig(), LocalMesh(), mode="lora")
    assert not trainer.chunked


@pytest.mark.parametrize("tied", [False, True])
def test_trainer_step_is_the_plain_step(tied):
    """The Trainer's default (chunked) step against loss_chunk_tokens: 0 (whole logits): loss and every grad."""
    batch = H.make_batch(0)
    out = {}
    for chunk in (0, 7):
        trainer = Trainer(
            _llama(tie_word_embeddings=tied), ParallelConfig(loss_chunk_tokens=chunk), LocalMesh(), grad_clip=1e9
        )
        assert trainer.chunked == (chunk != 0)
        loss = trainer.forward_backward(batch)
        out[chunk] = loss, {n: p.grad.clone() for n, p in trainer.parts[0].named_parameters()}
        out[chunk] += (trainer.eval_loss([batch]),)
    assert abs(out[0][0] - out[7][0]) < 1e-6
    assert abs(out[0][2] - out[7][2]) < 1e-6
    for name, g in out[0][1].items():
        torch.testing.assert_close(out[7][1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def _vocab_parallel(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    h, w, labels = _inputs(vocab=72)
    h = h.clone().requires_grad_()
    weight = nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
    (chunked_ce(h, weight, labels, 6) * 0.37).backward()
    value = chunked_ce(h.detach(), weight.detach(), labels, 6)
    return float(value), h.grad.numpy(), weight.grad.full_tensor().numpy()


def test_vocab_parallel_head_matches_one_process():
    """The head's vocabulary split over 2 ranks (Shard(0), as a vocab-parallel lm_head holds it)."""
    h, w, labels = _inputs(vocab=72)
    ref = _loss_and_grads(_plain, h, w, labels)
    for value, grad_h, grad_w in launch(_vocab_parallel, 2, timeout=120):
        assert abs(value - float(ref[0])) < 1e-4
        torch.testing.assert_close(torch.from_numpy(grad_h), ref[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(grad_w), ref[2], rtol=1e-5, atol=1e-6)


# name: (layout, mode, tied embeddings)
CHUNKED_LAYOUTS = {
    2: {
        "dp2-zero2-accum2": (dict(dp_shard=2, zero=2, microbatches=2), "full", False),
        "dp2-zero3": (dict(dp_shard=2, zero=3), "full", False),
        "dp2-zero3-tied": (dict(dp_shard=2, zero=3), "full", True),
        "dp2-zero3-lora": (dict(dp_shard=2, zero=3), "lora", False),
        "pp2-1f1b": (dict(pp=2, microbatches=4), "full", False),
        "pp2-zero_bubble-tied": (dict(pp=2, microbatches=2, pp_schedule="zero_bubble"), "full", True),
    },
    4: {
        "tp2xdp2-zero3": (dict(tp=2, dp_shard=2, zero=3), "full", False),
        "pp2xdp2-zero3-interleaved": (
            dict(pp=2, dp_shard=2, zero=3, microbatches=2, pp_schedule="interleaved_1f1b"),
            "full",
            False,
        ),
        "pp2xtp2-gpipe": (dict(pp=2, tp=2, microbatches=2, pp_schedule="gpipe"), "full", False),
    },
}


def _chunked_layouts(rank, world, layouts):
    out = {}
    for name, (cfg, mode, tied) in layouts.items():
        cfg = ParallelConfig(**cfg, loss_chunk_tokens=7)
        out[name] = {**H.check_layout_against_reference(cfg, mode, world, tied=tied), "name": name}
    return out


@pytest.mark.parametrize("world", sorted(CHUNKED_LAYOUTS))
def test_fsdp_layouts_match_one_process(world):
    """Under FSDP2 (lm_head in the root group, gathered by the forward the loss runs in), with a
    vocab-parallel head over tp, and on the last pipeline stage: 3 steps' losses and every first-step
    gradient against one process's plain loss."""
    for per_rank in zip(*(r.values() for r in launch(_chunked_layouts, world, CHUNKED_LAYOUTS[world], timeout=300))):
        assert set().union(*(r["names"] for r in per_rank)) == set(per_rank[0]["ref_names"]), per_rank[0]["name"]
        for r in per_rank:
            assert r["chunked"]
            assert r["loss_diff"] < 1e-5, (r["name"], r["losses"])
            assert r["norm_diff"] < 1e-5, r["name"]
            assert r["grad_abs"] < 1e-6 and r["grad_rel"] < 1e-5, (r["name"], r["grad_abs"], r["grad_rel"])
            if "tp2" in r["name"]:
                assert r["vocab_parallel"] and r["sequence_parallel"]
            if "tied" in r["name"]:  # the tied weight (both copies under pp) after the last step
                assert r["weight_diff"] < 1e-6, r["name"]


def test_a_softcap_of_one_still_transforms_the_logits():
    """Gemma's tanh soft-capping at 1.0 is not the identity (a scale of 1.0 is)."""
    assert "final_logit_softcapping=1.0" in why_not_chunked(_llama(final_logit_softcapping=1.0))
    assert why_not_chunked(_llama(logits_scaling=1.0)) is None
