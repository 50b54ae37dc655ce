"""The training engine: model for a ParallelConfig, optimizer, LR schedule, and one optimizer step.

Today only the single-process layout exists; the multi-process layouts (FSDP, TP, PP) plug in at
`build_model` and `forward_backward` without changing the recipes' loops. This module knows nothing
about the recipe schema: callers pass plain values.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from parallel.dims import ParallelConfig

IGNORE_INDEX = -100


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
    num_tokens: int  # non-padding input tokens


def check_layout(parallel: ParallelConfig) -> None:
    """Raise a ValueError naming the parallel.* field for any layout this engine cannot run yet."""
    if parallel.world_size > 1:
        raise ValueError(
            f"parallel: world size {parallel.world_size} (dp_replicate={parallel.dp_replicate}, "
            f"dp_shard={parallel.dp_shard}, pp={parallel.pp}, tp={parallel.tp}) needs several processes; "
            "multi-process layouts land with the parallel engine issue")
    if parallel.zero:
        raise ValueError(f"parallel.zero: ZeRO stage {parallel.zero} shards over data-parallel ranks; "
                         "a single process has none (use zero: 0)")
    if parallel.microbatches != 1:
        raise ValueError("parallel.microbatches: pipeline micro-batches need pp > 1; "
                         "use the stage's grad_accum for accumulation in one process")
    if parallel.activation_checkpointing == "selective":
        raise ValueError("parallel.activation_checkpointing: 'selective' lands with the parallel engine "
                         "issue; use 'full' or 'none'")


def build_runtime(parallel: ParallelConfig) -> Runtime:
    """CUDA when present, with bf16 autocast unless fp32 is asked for; CPU runs fp32 unless bf16 is asked for."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
        dtype = None if parallel.mixed_precision == "fp32" else torch.bfloat16
    else:
        device = torch.device("cpu")
        # bf16 autocast on CPU is slow without AMX, so only an explicit request turns it on.
        dtype = torch.bfloat16 if parallel.mixed_precision == "bf16" else None
    return Runtime(device, dtype)


def build_model(model_dir: Path, parallel: ParallelConfig, runtime: Runtime, lora: dict | None = None):
    """Load the HF model in fp32 (master weights), optionally wrap it with LoRA, apply the layout.

    lora: None for full fine-tuning, else {"r", "alpha", "dropout", "target_modules"}.
    """
    from transformers import AutoModelForCausalLM

    check_layout(parallel)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if parallel.activation_checkpointing == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        model = apply_lora(model, **lora)
    return model.to(runtime.device).train()


def apply_lora(model, r: int, alpha: int, dropout: float, target_modules):
    """Wrap with peft LoRA adapters; only the adapters stay trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def build_optimizer(model, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                    runtime: Runtime) -> torch.optim.AdamW:
    """AdamW over trainable parameters; norms and biases (1-D) get no weight decay."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = runtime.device.type == "cuda"
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps,
                             fused=fused)


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR at 0-based optimizer step `step`.

    Linear warmup reaching the peak at step `warmup_steps`, then cosine decay that reaches
    min_lr_ratio at the last step (max_steps - 1).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, max_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, *, warmup_steps: int, max_steps: int, min_lr_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps=warmup_steps, max_steps=max_steps,
                                          min_lr_ratio=min_lr_ratio))


def _label_token_count(batch: dict[str, torch.Tensor]) -> int:
    # Position 0 is never a target: labels are compared with the logits of the previous position.
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def summed_loss(model, batch: dict[str, torch.Tensor], runtime: Runtime) -> torch.Tensor:
    """Sum of next-token cross-entropy over the batch's label tokens (fp32)."""
    batch = {k: v.to(runtime.device) for k, v in batch.items()}
    with runtime.autocast():
        # use_cache=False per call, not in the config, so saved checkpoints still generate with a KV cache.
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits
    logits = logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def forward_backward(model, micro_batches: list[dict[str, torch.Tensor]], runtime: Runtime) -> tuple[float, int]:
    """Accumulate gradients of the global batch's token-mean loss; returns (that loss, label tokens).

    Each micro-batch's summed loss is divided by the label-token count of the whole global batch,
    so accumulation gives the same gradient as one big batch, not a mean of micro-batch means.
    """
    num_labels = sum(_label_token_count(mb) for mb in micro_batches)
    assert num_labels > 0, "data loading drops examples without label tokens"
    total = 0.0
    for mb in micro_batches:
        loss = summed_loss(model, mb, runtime) / num_labels
        loss.backward()
        total += loss.item()
    return total, num_labels


def train_step(model, optimizer, scheduler, micro_batches: list[dict[str, torch.Tensor]], runtime: Runtime,
               *, grad_clip: float) -> StepMetrics:
    """One optimizer step: forward/backward over the micro-batches, clip, step, advance the LR."""
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    loss, num_labels = forward_backward(model, micro_batches, runtime)
    params = [p for p in model.parameters() if p.requires_grad]
    # max_norm=inf measures the norm without scaling when clipping is off.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    scheduler.step()
    num_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
    return StepMetrics(loss, float(grad_norm), lr, num_labels, num_tokens)


@torch.no_grad()
def eval_loss(model, batches: list[dict[str, torch.Tensor]], runtime: Runtime) -> float:
    """Token-mean loss over all label tokens of the batches."""
    was_training = model.training
    model.eval()
    total = sum(float(summed_loss(model, b, runtime)) for b in batches)
    count = sum(_label_token_count(b) for b in batches)
    model.train(was_training)
    return total / count
