"""Shared pieces of the multi-process tests: a tiny Llama, fixed batches, one-process reference, diffs."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from parallel.dims import ParallelConfig
from parallel.distributed.mesh import ParallelDims
from parallel.tiny import FAMILIES as TINY_FAMILIES
from parallel.tiny import tiny_config
from parallel.trainer import Trainer, build_adamw, num_label_tokens, summed_ce

MODEL = dict(
    vocab_size=260,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    pad_token_id=3,
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HPARAMS = dict(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
GRAD_CLIP = 1.0
STEPS = 3


FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
SEQ = 16


def build_model(mode: str, seed: int = 0, family: str = "llama", tied: bool = False):
    """The same weights on every call; LoRA B matrices random (not zero) so every adapter gets a gradient.

    qwen3: per-head q/k norms inside attention (their weights get random values so they matter); the other
    families (gemma2, gemma3, phi3, granite, mixtral, qwen3_moe) are parallel.tiny's FAMILIES at this shape.
    tied: lm_head shares the input embedding's weight (tie_word_embeddings)."""
    torch.manual_seed(seed)
    if family in TINY_FAMILIES:
        config = tiny_config({**MODEL, **TINY_FAMILIES[family], "tie_word_embeddings": tied}, eos_token_id=2)
        model = AutoModelForCausalLM.from_config(config)
    else:
        config_cls, model_cls = FAMILIES[family]
        extra = {"head_dim": 16} if family == "qwen3" else {}
        model = model_cls(config_cls(**{**MODEL, "tie_word_embeddings": tied}, **extra))
    if family in ("qwen3", "gemma3"):
        one = 0.0 if family == "gemma3" else 1.0  # Gemma's norms scale by (1 + weight)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    p.copy_(one + 0.2 * torch.randn(p.shape))
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        )
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def make_batch(step: int, rows: int = 8, seq: int = SEQ) -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths; the first third of each row is an unlabelled prompt."""
    gen = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(4, MODEL["vocab_size"], (rows, seq), generator=gen)
    lengths = torch.randint(seq // 2, seq + 1, (rows,), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, MODEL["pad_token_id"])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : seq // 3] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


_REFERENCE: dict[str, dict] = {}


def reference(mode: str, family: str = "llama", seq: int = SEQ, tied: bool = False) -> dict:
    """One process, whole batch: per-step losses and grad norms, the first step's clipped grads, and the
    weights after the last step."""
    key = f"{mode}-{family}-{seq}-{tied}"
    if key in _REFERENCE:
        return _REFERENCE[key]
    model = build_model(mode, family=family, tied=tied).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_adamw(params, **HPARAMS)
    losses, norms, grads = [], [], {}
    for step in range(STEPS):
        batch = make_batch(step, seq=seq)
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = summed_ce(logits, batch["labels"]) / num_label_tokens(batch["labels"])
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)))
        losses.append(float(loss.detach()))
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _REFERENCE[key] = {"losses": losses, "norms": norms, "grads": grads, "weights": weights}
    return _REFERENCE[key]


def full_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every gradient this rank's parts hold, un-sharded (collective over the dp/tp groups)."""
    out = {}
    for part in trainer.parts:
        for name, p in part.named_parameters():
            if p.grad is not None:
                out[name] = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
    return out


def full_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every trainable weight this rank's parts hold, un-sharded (collective over the dp/tp groups)."""
    out = {}
    for part in trainer.parts:
        for name, p in part.named_parameters():
            if p.requires_grad:
                out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    return out


def reference_name(trainer: Trainer, name: str) -> str:
    """The one-process name of a parameter: a tied lm_head copy (last pipeline stage) is the embedding."""
    tied = trainer.tied_names
    return tied[0] if tied is not None and name == tied[1] else name


def check_layout_against_reference(
    cfg: ParallelConfig, mode: str, world_size: int, family: str = "llama", seq: int = SEQ, tied: bool = False
) -> dict:
    """Train STEPS steps under `cfg`; diffs against one process (losses, norms, first-step grads; with
    `tied`, also the tied weight after the last step: its copies on two stages included).

    Also reports which tensor-parallel options the trainer took (sequence/vocab parallel)."""
    mesh = ParallelDims.from_config(cfg, world_size).build_mesh("cpu")
    model = build_model(mode, family=family, tied=tied)
    trainer = Trainer(model, cfg, mesh, mode=mode, grad_clip=GRAD_CLIP, **HPARAMS)
    ref = reference(mode, family, seq, tied)
    losses, norms, grad_abs, grad_rel, names = [], [], 0.0, 0.0, []
    for step in range(STEPS):
        loss, norm = trainer.train_step(make_batch(step, seq=seq))
        losses.append(loss)
        norms.append(norm)
        if step == 0:
            for name, g in full_grads(trainer).items():
                r = ref["grads"][reference_name(trainer, name)]
                diff = float((g - r).abs().max())
                grad_abs = max(grad_abs, diff)
                grad_rel = max(grad_rel, diff / max(float(r.abs().max()), 1e-12))
                names.append(reference_name(trainer, name))
    weight_diff, tied_copy = 0.0, {}
    if tied and trainer.tied_names:  # the tied weight's copies after the last step, against one process's
        for name, w in full_weights(trainer).items():
            if name in trainer.tied_names:
                weight_diff = max(weight_diff, float((w - ref["weights"][trainer.tied_names[0]]).abs().max()))
                tied_copy[name] = w.numpy()  # by value: a tensor would pass as shared memory of an exited rank
    return {
        "weight_diff": weight_diff,
        "tied_copy": tied_copy,
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref["losses"])),
        "norm_diff": max(abs(a - b) / b for a, b in zip(norms, ref["norms"])),
        "grad_abs": grad_abs,
        "grad_rel": grad_rel,
        "names": names,
        "ref_names": sorted(ref["grads"]),
        "losses": losses,
        "sequence_parallel": trainer.sp,
        "vocab_parallel": trainer.vp,
        "chunked": trainer.chunked,
        "vocab_sharded": sorted(
            n
            for part in trainer.parts
            for n, p in part.named_parameters()
            if isinstance(p, DTensor)
            and n.endswith(("embed_tokens.weight", "lm_head.weight"))
            and any(pl.is_shard() for pl in p.placements)
        ),
    }
