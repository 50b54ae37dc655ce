"""Model loading and the trainer's construction: the HF model in fp32 (optionally LoRA, or QLoRA on a
4-bit base), the LR schedules (warmup, then cosine, linear, constant or WSD), and `build_trainer`, which
lays the model out over the mesh of this process group with parallel.trainer.Trainer. One process is a
mesh of ones, so every stage trains through the same Trainer. This module knows nothing about the recipe
schema beyond the typed LoRA/quantization configs.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from parallel import layout
from parallel.dims import LoraConfig, ParallelConfig, QuantConfig


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision the step runs."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


@dataclass(frozen=True)
class StepMetrics:
    loss: float  # mean over the global batch's label tokens
    grad_norm: float  # global norm before clipping
    lr: float  # the rate this step used
    num_label_tokens: int
    num_tokens: int  # non-padding input tokens (packed rows, without attention_mask: every position)


def process_world_size() -> int:
    """Ranks of the default torch.distributed group; 1 when none is initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_distributed() -> bool:
    return process_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes) of the default group; (0, 1) when none is initialised."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def is_leader() -> bool:
    """Rank 0, or the only process: the one that writes shared files."""
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if is_distributed():
        dist.barrier()


def all_gather_object(value) -> list:
    """Every rank's `value`, in rank order ([value] in one process)."""
    if not is_distributed():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def from_rank0(value):
    """Rank 0's value on every rank (e.g. a result only rank 0 completed); the value itself in one process."""
    if not is_distributed():
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_layout(parallel: ParallelConfig, mode: str = "full", model_config=None) -> None:
    """Raise a ValueError naming the parallel.* field for a layout this process group cannot run
    (parallel.layout: the one layout check). model_config: a HF config, to check the model's shape too."""
    layout.check_layout(parallel, mode=mode, world=process_world_size(), model_config=model_config)


def autocast_dtype(mixed_precision: str, device_type: str) -> torch.dtype | None:
    """bf16 on a GPU unless fp32 is asked for; on CPU only when bf16 is asked for (bf16 autocast on CPU is
    slow without AMX). None: plain fp32."""
    if device_type == "cuda":
        return None if mixed_precision == "fp32" else torch.bfloat16
    return torch.bfloat16 if mixed_precision == "bf16" else None


def build_runtime(parallel: ParallelConfig) -> Runtime:
    """CUDA when present (under torch.distributed the rendezvous has already picked this rank's GPU), else
    CPU, with autocast_dtype's precision."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return Runtime(device, autocast_dtype(parallel.mixed_precision, device.type))


def load_model(model_dir: Path, lora: LoraConfig | None = None, quant: QuantConfig | None = None):
    """The HF causal LM in fp32 (master weights) on CPU, wrapped with LoRA when asked.

    lora: None for full fine-tuning, else a LoraConfig (parallel.dims: r, alpha, dropout, target_modules).
    quant: QLoRA, a QuantConfig (quant_type, double_quant): the linear layers' weights load as
    bitsandbytes 4-bit (computing in fp32 here; autocast casts to bf16 where asked), only adapters train.
    """
    from transformers import AutoModelForCausalLM

    model = from_pretrained(AutoModelForCausalLM, model_dir, quant, lora)
    return model if lora is None else apply_lora(model, lora)


def from_pretrained(
    model_cls, model_dir: Path, quant: QuantConfig | None = None, lora: LoraConfig | None = None, **kwargs
):
    """model_cls.from_pretrained in fp32; with `quant` (QLoRA) every decoder linear layer loads as a
    bitsandbytes 4-bit weight (the heads, lm_head or a classifier's score, stay full precision) and the
    whole model is frozen for k-bit training: only adapters added afterwards train."""
    if quant is None:
        return model_cls.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    if lora is None:
        raise ValueError("mode: qlora trains LoRA adapters; a 4-bit base cannot be fully fine-tuned")
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["lm_head", "score"],
    )
    model = model_cls.from_pretrained(model_dir, dtype=torch.float32, quantization_config=config, **kwargs)
    # Freezes the base, keeps norms in fp32, lets gradients reach the adapters through frozen embeddings.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def apply_lora(model, lora: LoraConfig, task_type: str = "CAUSAL_LM"):
    """Wrap with peft LoRA adapters (`lora`: a LoraConfig); only the adapters stay trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, config)


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


LR_SCHEDULERS = ("cosine_with_min_lr", "cosine", "linear", "constant", "wsd")


def lr_factor(
    step: int,
    *,
    warmup_steps: int,
    max_steps: int,
    min_lr_ratio: float,
    scheduler: str = "cosine_with_min_lr",
    decay_steps: int = 0,
) -> float:
    """Multiplier of the peak LR at 0-based optimizer step `step`, a pure function of the step (a resumed
    run recomputes the same sequence).

    Every schedule warms up linearly, reaching the peak at step `warmup_steps`; after that:
    cosine_with_min_lr: cosine decay reaching min_lr_ratio at the last step (max_steps - 1);
    cosine, linear: transformers' curves to 0 at step max_steps (the last step still trains);
    constant: the peak; wsd: the peak until the last `decay_steps` steps (at most those after warmup),
    then cosine decay towards min_lr_ratio, reached at step max_steps.
    """
    if scheduler not in LR_SCHEDULERS:
        raise ValueError(f"unknown lr scheduler {scheduler!r}; choose one of {', '.join(LR_SCHEDULERS)}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if scheduler == "constant":
        return 1.0
    if scheduler == "cosine_with_min_lr":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - 1 - warmup_steps))
        return _cosine(progress, min_lr_ratio)
    if scheduler == "wsd":
        decay_start = max(warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return 1.0
        return _cosine(min(1.0, (step - decay_start) / max(1, max_steps - decay_start)), min_lr_ratio)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return 1.0 - progress if scheduler == "linear" else _cosine(progress, 0.0)


def _cosine(progress: float, floor: float) -> float:
    """Half a cosine from 1 at progress 0 down to `floor` at progress 1."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_trainer(
    model_dir: Path,
    parallel: ParallelConfig,
    *,
    mode: str,
    optim,
    lora=None,
    quant=None,
    grad_accum: int = 1,
    model=None,
):
    """The model laid out over this process group's mesh as a Trainer (collective under several ranks; one
    process is the mesh of ones).

    Every rank loads the same weights (and, seeded alike, the same LoRA init). grad_accum multiplies
    the micro-batches each dp rank runs: parallel.microbatches x grad_accum of them, each
    batch_size / (dp x microbatches x grad_accum) rows. optim: optimizer, lr, weight_decay, betas, eps, grad_clip
    (the LR itself is set per step by the caller). model: an already loaded full model (e.g. a reward
    model with its score head) instead of the causal LM of model_dir.
    """
    from parallel.defaults import resolve_defaults
    from parallel.trainer import Trainer, build_mesh

    model = load_model(model_dir, lora, quant) if model is None else model
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    # `auto` fields the stage's start left (callers without a stage): no memory estimate here.
    parallel = resolve_defaults(parallel, device_type, mode=mode, optimizer=optim.optimizer).config
    layout = parallel.model_copy(update={"microbatches": parallel.microbatches * grad_accum})
    if parallel.engine == "deepspeed":
        from parallel.deepspeed_config import read_user_config
        from parallel.deepspeed_engine import DeepSpeedTrainer

        return DeepSpeedTrainer(
            model,
            layout,
            mode=mode,
            lr=optim.lr,
            weight_decay=optim.weight_decay,
            betas=optim.betas,
            eps=optim.eps,
            grad_clip=optim.grad_clip,
            user_config=read_user_config(parallel.deepspeed_config) if parallel.deepspeed_config else None,
        )
    mesh = build_mesh(layout, process_world_size(), device_type)
    return Trainer(
        model,
        layout,
        mesh,
        mode=mode,
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        betas=optim.betas,
        eps=optim.eps,
        grad_clip=optim.grad_clip,
        optimizer=optim.optimizer,
    )


def train_step(trainer, batch: dict[str, torch.Tensor], *, lr: float, objective=None) -> StepMetrics:
    """One optimizer step of a Trainer on the global batch (the same on every rank) at `lr`;
    objective: token cross-entropy by default (see parallel.trainer.Objective)."""
    from parallel.trainer import num_label_tokens

    trainer.set_lr(lr)
    loss, grad_norm = trainer.train_step(batch, objective)
    labels = num_label_tokens(batch["labels"]) if "labels" in batch else 0
    mask = batch.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return StepMetrics(loss, grad_norm, lr, labels, tokens)


def rebuild_model(model_dir: Path, state: dict[str, torch.Tensor], lora=None, adapters_only: bool = False):
    """A plain (or peft) model on CPU holding a gathered full state dict, ready to save.

    adapters_only (QLoRA): the state's base weights are 4-bit; only its adapter weights are loaded,
    into a full-precision base with the same adapters (what the checkpoint saves anyway). A tied lm_head
    may be missing from `state` (gather_full_state_dict keeps the shared weight once): it is the embedding."""
    from parallel.distributed.pipeline import tied_names

    model = load_model(model_dir, lora)
    if adapters_only:
        adapters = {k: v for k, v in state.items() if "lora_" in k}
        expected = {k for k in model.state_dict() if "lora_" in k}
        if set(adapters) != expected:
            raise ValueError(f"gathered adapters do not match the model's: {sorted(set(adapters) ^ expected)[:4]}")
        model.load_state_dict(adapters, strict=False)
        return model.eval()
    names = tied_names(model)
    if names is not None and names[1] not in state and names[0] in state:
        state = {**state, names[1]: state[names[0]]}
    model.load_state_dict(state, strict=True)
    return model.eval()
