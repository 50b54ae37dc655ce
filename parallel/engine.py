"""The training engine: model for a ParallelConfig, optimizer, LR schedule, and one optimizer step.

One process runs the plain model (`build_model`, `train_step`, `eval_loss`). When torch.distributed
is initialised with several ranks, `build_trainer` lays the model out over the 3-D mesh with
parallel.distributed.engine.DistributedTrainer and `distributed_train_step` / `distributed_eval_loss`
give the same numbers as one process. This module knows nothing about the recipe schema: callers
pass plain values.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.dims import ParallelConfig
from parallel.distributed import mesh as mesh_mod

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


def process_world_size() -> int:
    """Ranks of the default torch.distributed group; 1 when none is initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_distributed() -> bool:
    return process_world_size() > 1


def from_rank0(value):
    """Rank 0's value on every rank (e.g. a result only rank 0 completed); the value itself in one process."""
    if not is_distributed():
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_layout(parallel: ParallelConfig, mode: str = "full", model_config=None) -> None:
    """Raise a ValueError naming the parallel.* field for a layout this process (group) cannot run.

    model_config: a HF config, to check the layout against the model's shape too.
    """
    world = process_world_size()
    if parallel.world_size > 1 and world == 1:
        raise ValueError(
            f"parallel: world size {parallel.world_size} (dp_replicate={parallel.dp_replicate}, "
            f"dp_shard={parallel.dp_shard}, pp={parallel.pp}, tp={parallel.tp}) needs {parallel.world_size} "
            "processes, but torch.distributed is not initialised in this one; run the stage with the local "
            "or slurm executor, which starts one task per rank"
        )
    if world > 1:
        mesh_mod.ParallelDims.from_config(parallel, world)  # names `parallel` when the sizes differ
        problems = mesh_mod.check_layout(parallel, mode)
        if model_config is not None:
            problems += mesh_mod.check_model_layout(
                parallel,
                num_layers=model_config.num_hidden_layers,
                num_heads=model_config.num_attention_heads,
                num_kv_heads=model_config.num_key_value_heads,
                tied_embeddings=bool(getattr(model_config, "tie_word_embeddings", False)),
            )
        if problems:
            raise ValueError("; ".join(problems))
        return
    if parallel.zero:
        raise ValueError(
            f"parallel.zero: ZeRO stage {parallel.zero} shards over data-parallel ranks; "
            "a single process has none (use zero: 0)"
        )
    if parallel.microbatches != 1:
        raise ValueError(
            "parallel.microbatches: pipeline micro-batches need pp > 1; "
            "use the stage's grad_accum for accumulation in one process"
        )
    if parallel.activation_checkpointing == "selective":
        raise ValueError(
            "parallel.activation_checkpointing: 'selective' needs the multi-process engine; "
            "use 'full' or 'none' in one process"
        )


def build_runtime(parallel: ParallelConfig) -> Runtime:
    """CUDA when present, with bf16 autocast unless fp32 is asked for; CPU runs fp32 unless bf16 is asked for."""
    if torch.cuda.is_available():
        # Under torch.distributed the rendezvous has already picked this rank's GPU.
        device = torch.device("cuda", torch.cuda.current_device())
        dtype = None if parallel.mixed_precision == "fp32" else torch.bfloat16
    else:
        device = torch.device("cpu")
        # bf16 autocast on CPU is slow without AMX, so only an explicit request turns it on.
        dtype = torch.bfloat16 if parallel.mixed_precision == "bf16" else None
    return Runtime(device, dtype)


def load_model(model_dir: Path, lora: dict | None = None, quant: dict | None = None):
    """The HF model in fp32 (master weights) on CPU, wrapped with LoRA when asked.

    lora: None for full fine-tuning, else {"r", "alpha", "dropout", "target_modules"}.
    quant: QLoRA, {"quant_type", "double_quant"}: the linear layers' weights load as bitsandbytes 4-bit
    (computing in fp32 here; autocast casts to bf16 where asked) and only the adapters train.
    """
    from transformers import AutoModelForCausalLM

    model = from_pretrained(AutoModelForCausalLM, model_dir, quant, lora)
    return model if lora is None else apply_lora(model, **lora)


def from_pretrained(model_cls, model_dir: Path, quant: dict | None = None, lora: dict | None = None, **kwargs):
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
        bnb_4bit_quant_type=quant["quant_type"],
        bnb_4bit_use_double_quant=quant["double_quant"],
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["lm_head", "score"],
    )
    model = model_cls.from_pretrained(model_dir, dtype=torch.float32, quantization_config=config, **kwargs)
    # Freezes the base, keeps norms in fp32, lets gradients reach the adapters through frozen embeddings.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def build_model(
    model_dir: Path, parallel: ParallelConfig, runtime: Runtime, lora: dict | None = None, quant: dict | None = None
):
    """Load the model for one process (optionally with LoRA, or QLoRA with `quant`) and apply activation
    checkpointing."""
    check_layout(parallel)
    if quant is not None:
        model = load_model(model_dir, lora, quant)
        if parallel.activation_checkpointing == "full":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return compile_blocks(model, parallel).to(runtime.device).train()
    model = load_model(model_dir)
    if parallel.activation_checkpointing == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        model = apply_lora(model, **lora)
    return compile_blocks(model, parallel).to(runtime.device).train()


def compile_blocks(model, parallel: ParallelConfig):
    """torch.compile every decoder block in place when parallel.compile is set (one graph per block type
    is reused by all blocks, so compile time does not grow with depth)."""
    if parallel.compile:
        from parallel.distributed.pipeline import find_decoder

        for layer in find_decoder(model)[1].layers:
            layer.compile()
    return model


def apply_lora(model, r: int, alpha: int, dropout: float, target_modules):
    """Wrap with peft LoRA adapters; only the adapters stay trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def build_optimizer(
    model, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float, runtime: Runtime
) -> torch.optim.AdamW:
    """AdamW over trainable parameters; norms and biases (1-D) get no weight decay."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = runtime.device.type == "cuda"
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps, fused=fused)


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
        optimizer,
        lambda step: lr_factor(step, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio),
    )


def _label_token_count(batch: dict[str, torch.Tensor]) -> int:
    # Position 0 is never a target: labels are compared with the logits of the previous position.
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def summed_loss(model, batch: dict[str, torch.Tensor], runtime: Runtime) -> torch.Tensor:
    """Sum of next-token cross-entropy over the batch's label tokens (fp32)."""
    batch = {k: v.to(runtime.device) for k, v in batch.items()}
    with runtime.autocast():
        # use_cache=False per call, not in the config, so saved checkpoints still generate with a KV cache.
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


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


def train_step(
    model, optimizer, scheduler, micro_batches: list[dict[str, torch.Tensor]], runtime: Runtime, *, grad_clip: float
) -> StepMetrics:
    """One optimizer step: forward/backward over the micro-batches, clip, step, advance the LR."""
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    loss, num_labels = forward_backward(model, micro_batches, runtime)
    grad_norm = optimizer_step(model, optimizer, scheduler, grad_clip)
    num_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
    return StepMetrics(loss, grad_norm, lr, num_labels, num_tokens)


def optimizer_step(model, optimizer, scheduler, grad_clip: float) -> float:
    """Clip (when grad_clip > 0), step, advance the LR; returns the global grad norm before clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    # max_norm=inf measures the norm without scaling when clipping is off.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    scheduler.step()
    return float(grad_norm)


@torch.no_grad()
def eval_loss(model, batches: list[dict[str, torch.Tensor]], runtime: Runtime) -> float:
    """Token-mean loss over all label tokens of the batches."""
    was_training = model.training
    model.eval()
    total = sum(float(summed_loss(model, b, runtime)) for b in batches)
    count = sum(_label_token_count(b) for b in batches)
    model.train(was_training)
    return total / count


def build_trainer(
    model_dir: Path,
    parallel: ParallelConfig,
    *,
    mode: str,
    lora: dict | None,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    grad_clip: float,
    grad_accum: int = 1,
    model=None,
    quant: dict | None = None,
):
    """The model laid out over the default process group as a DistributedTrainer (collective).

    Every rank loads the same weights (and, seeded alike, the same LoRA init). grad_accum multiplies
    the micro-batches each dp rank runs: parallel.microbatches x grad_accum of them, each
    batch_size / (dp x microbatches x grad_accum) rows. model: an already loaded full model (e.g. a
    reward model with its score head) instead of the causal LM of model_dir.
    """
    from parallel.distributed.engine import DistributedTrainer

    check_layout(parallel, mode)
    model = load_model(model_dir, lora, quant) if model is None else model
    layout = parallel.model_copy(update={"microbatches": parallel.microbatches * grad_accum})
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = mesh_mod.ParallelDims.from_config(layout, process_world_size()).build_mesh(device_type)
    return DistributedTrainer(
        model, layout, mesh, mode=mode, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, grad_clip=grad_clip
    )


def distributed_train_step(trainer, batch: dict[str, torch.Tensor], *, lr: float, objective=None) -> StepMetrics:
    """One optimizer step of a DistributedTrainer on the global batch (the same on every rank) at `lr`;
    objective: token cross-entropy by default (see parallel.distributed.engine.Objective)."""
    trainer.set_lr(lr)
    loss, grad_norm = trainer.train_step(batch, objective)
    labels = _label_token_count(batch) if "labels" in batch else 0
    return StepMetrics(loss, grad_norm, lr, labels, int(batch["attention_mask"].sum()))


@torch.no_grad()
def distributed_eval_loss(trainer, batches: list[dict[str, torch.Tensor]]) -> float:
    """Token-mean loss over all label tokens of the batches, through the laid-out model (collective).

    Each dp rank takes its slice of every batch; under pp the schedule's forward-only `eval` runs
    and the last stage sums the loss. Rows must split evenly over dp (and the micro-batches under pp;
    the pipeline also needs the training batches' shape): see training.data.eval_batches(fill=...).
    """
    for part in trainer.parts:
        part.eval()
    total = sum(_distributed_loss_sum(trainer, b) for b in batches)
    count = sum(_label_token_count(b) for b in batches)
    for part in trainer.parts:
        part.train()
    return total / count


def _distributed_loss_sum(trainer, batch: dict[str, torch.Tensor]) -> float:
    from parallel.distributed.engine import summed_ce

    rows = batch["input_ids"].shape[0] // trainer.dims.dp
    start = mesh_mod.dp_rank(trainer.mesh) * rows
    local = {k: v[start : start + rows].to(trainer.device) for k, v in batch.items()}
    with trainer._autocast():
        if trainer.schedule is None:
            logits = trainer.logits(local)
            local_sum = float(summed_ce(logits, local["labels"]))
        else:
            # The trainer's pipeline loss is summed_ce x _inv_count; 1.0 makes it a plain sum. The
            # next train_step sets its own count again.
            trainer._inv_count = 1.0
            losses: list[torch.Tensor] = []
            inputs = trainer._padded({"input_ids": local["input_ids"], "attention_mask": local["attention_mask"]})
            trainer.schedule.eval(
                inputs["input_ids"], attention_mask=inputs["attention_mask"], target=local["labels"], losses=losses
            )
            local_sum = float(sum(loss.double() for loss in losses)) if losses else 0.0
    return trainer._global_loss(local_sum)  # sums over pp stages and dp ranks


def rebuild_model(
    model_dir: Path, state: dict[str, torch.Tensor], lora: dict | None = None, adapters_only: bool = False
):
    """A plain (or peft) model on CPU holding a gathered full state dict, ready to save.

    adapters_only (QLoRA): the state's base weights are 4-bit; only its adapter weights are loaded,
    into a full-precision base with the same adapters (what the checkpoint saves anyway)."""
    model = load_model(model_dir, lora)
    if adapters_only:
        adapters = {k: v for k, v in state.items() if "lora_" in k}
        expected = {k for k in model.state_dict() if "lora_" in k}
        if set(adapters) != expected:
            raise ValueError(f"gathered adapters do not match the model's: {sorted(set(adapters) ^ expected)[:4]}")
        model.load_state_dict(adapters, strict=False)
        return model.eval()
    model.load_state_dict(state, strict=True)
    return model.eval()
