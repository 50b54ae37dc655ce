"""Trainer: the one training path. A HF (optionally peft) model laid out over (pp, dp_replicate, dp_shard,
tp); one process is the mesh of ones (`LocalMesh`: nothing is cut up, nothing communicates), not a second
engine.

Order of transformations, as in torchtitan: PP cuts the model into stage modules first; then, on each
stage module: TP -> activation checkpointing -> FSDP (ZeRO-2/3). Every rank receives the same global
batch and takes its dp slice, so the data order does not depend on the layout.

Loss convention (same as parallel/engine.py): next-token cross-entropy summed over label tokens
(labels != -100, position 0 never a target) and divided by the label-token count of the whole global
batch; gradients are summed over dp ranks and micro-batches, giving exactly one process's gradients.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from parallel.chunked_ce import chunk_stage_loss, loss_in_forward, why_not_chunked
from parallel.defaults import resolve_defaults
from parallel.dims import ParallelConfig
from parallel.distributed import zero as zero_mod
from parallel.distributed.grads import clip_grads_
from parallel.distributed.mesh import AXES, ParallelDims, dp_mesh, dp_rank, fsdp_mesh
from parallel.distributed.pipeline import TiedCopies, build_schedule, build_stage_modules, find_decoder, tied_names
from parallel.distributed.tensor_parallel import (
    LogitsLayout,
    PartialGrads,
    apply_tensor_parallel,
    apply_tp_ends,
    gather_sequence,
    vocab_parallel_supported,
)
from parallel.layout import check_layout

IGNORE_INDEX = -100  # label of a position that is not a target (padding, prompt tokens)


def summed_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over label tokens, in fp32."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _local_value(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def num_label_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def dims_of(mesh) -> ParallelDims:
    return ParallelDims(*(mesh[axis].size() for axis in ("pp", "dp_replicate", "dp_shard", "tp")))


def apply_activation_checkpointing(layers: list[nn.Module], mode: str) -> None:
    """Recompute each decoder layer in backward ('full') or all but its matmuls and attention ('selective').

    Uses the layers' own HF checkpointing hook, so parameter names and FSDP hooks stay untouched.
    """
    assert mode != "auto", "parallel.defaults resolves activation_checkpointing first"
    if mode == "none":
        return
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    kwargs = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _save_matmuls)
    for layer in layers:
        if not hasattr(layer, "gradient_checkpointing"):
            raise ValueError(
                f"parallel.activation_checkpointing: {type(layer).__name__} has no HF gradient checkpointing support"
            )
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(checkpoint, **kwargs)


def _save_matmuls(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    ops = torch.ops.aten
    saved = {
        ops.mm.default,
        ops.addmm.default,
        ops.bmm.default,
        ops._scaled_dot_product_flash_attention_for_cpu.default,
        ops._scaled_dot_product_efficient_attention.default,
        ops._scaled_dot_product_flash_attention.default,
    }
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


def build_adamw(
    params: list[nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    betas,
    eps: float,
    optimizer: str = "adamw",
    fused: bool = False,
):
    """AdamW (optimizer: adamw, or bitsandbytes' adamw_8bit / paged_adamw_8bit, which need plain tensors:
    parallel.layout refuses them under ZeRO-2/3 and tp); norms and biases (1-D) get no weight decay. Empty
    param lists give None. fused (parallel.fused_optimizer): torch's fused kernel, CUDA or CPU, for plain
    tensors; sharded DTensors always take torch's default."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        return None
    if optimizer != "adamw":
        # Tensors under min_8bit_size (4096) elements keep 32-bit states, as bitsandbytes defaults.
        return _bnb_class(optimizer)(groups, lr=lr, betas=tuple(betas), eps=eps)
    # fused (parallel.fused_optimizer): torch's fused kernel for plain tensors; sharded DTensors take the default.
    plain = not any(isinstance(p, DTensor) for p in params)
    fused = fused and plain
    # Otherwise on CPU torch defaults to one parameter at a time: a dozen small ops per tensor, which for LoRA's
    # many small adapters cost more than their arithmetic. The foreach kernels give the same bits in fewer ops.
    foreach = True if plain and not fused else None
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None, foreach=foreach)


def _bnb_class(optimizer: str) -> type:
    """bitsandbytes' 8-bit AdamW class of that name, with torch's own state_dict: bitsandbytes nests its
    quantization state (state1/2, qmap, absmax) under one key for FSDP1's gathering, but the flattened
    state dicts of DCP checkpoints load a parameter's states by the names the optimizer holds them under."""
    import bitsandbytes as bnb

    base = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[optimizer]
    return type(base.__name__, (base,), {"state_dict": torch.optim.Optimizer.state_dict})


def model_inputs(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's inputs among a batch's tensors (position_ids when the rows are left-padded)."""
    return {k: rows[k] for k in ("input_ids", "attention_mask", "position_ids") if k in rows}


class Objective:
    """A training loss for Trainer: per-unit losses summed over a micro-batch.

    count(global batch) -> the number of units the loss is averaged over (label tokens, pairs, ...);
    __call__(logits, micro-batch) -> (summed loss tensor, {statistic: summed value}). A micro-batch
    holds whole units: rows that belong together (a preference pair) must not straddle a split.
    vocab_parallel: True when __call__ also takes vocab-sharded DTensor logits (it then runs inside
    torch's loss_parallel context, at pp = 1 under a vocab-parallel head); otherwise logits are gathered.
    """

    vocab_parallel = False

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor, micro: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


class TokenCrossEntropy(Objective):
    vocab_parallel = True  # summed_ce runs on vocab-sharded logits under torch's loss_parallel

    def count(self, batch):
        return num_label_tokens(batch["labels"])

    def __call__(self, logits, micro):
        return summed_ce(logits, micro["labels"]), {}


TOKEN_CE = TokenCrossEntropy()


class LocalMesh:
    """The mesh of one process: every axis (and any slice or flattening of axes) has size 1 and local rank 0.

    It stands in for a DeviceMesh when the world is one process, so the trainer needs no process group;
    every collective the trainer issues is skipped for size-1 axes, so it never asks for a group."""

    mesh_dim_names = AXES

    def __init__(self, device_type: str = "cpu"):
        self.device_type = device_type

    def __getitem__(self, axes) -> "LocalMesh":
        return self

    def _flatten(self, name: str) -> "LocalMesh":
        return self

    def size(self, dim: int | None = None) -> int:
        return 1

    def get_local_rank(self, dim=None) -> int:
        return 0

    def get_group(self, dim=None):
        raise RuntimeError("a one-process mesh has no process group (no collective should ask for one)")


def build_mesh(cfg: ParallelConfig, world_size: int, device_type: str = "cpu"):
    """The mesh for `cfg` over `world_size` processes: a DeviceMesh (torch.distributed initialised) or,
    for one process, the LocalMesh. ValueError naming `parallel` when the sizes differ."""
    dims = ParallelDims.from_config(cfg, world_size)
    return LocalMesh(device_type) if world_size == 1 else dims.build_mesh(device_type)


@dataclass
class Layout:
    """What `parallelize` made of a model: the parts this rank holds (one, or its pipeline stages) and the
    tensor-parallel bookkeeping the trainer needs at run time."""

    parts: list[nn.Module]
    sequence_parallel: bool
    vocab_parallel: bool
    logits: LogitsLayout
    partial: PartialGrads


def tp_options(model: nn.Module, cfg: ParallelConfig, tp: int) -> tuple[bool, bool]:
    """(sequence parallel, vocab parallel): unset means on under tp where the model allows it."""
    if tp == 1:
        return False, False
    _, decoder, _, head = find_decoder(model)
    c = decoder.config
    why_not = vocab_parallel_supported(decoder.embed_tokens, head, c.vocab_size, tp)
    if cfg.vocab_parallel and why_not:
        raise ValueError(f"parallel.vocab_parallel: {why_not}; set vocab_parallel: false")
    return cfg.sequence_parallel is not False, cfg.vocab_parallel is not False and why_not is None


def parallelize(model: nn.Module, cfg: ParallelConfig, mesh, device: torch.device) -> Layout:
    """Lay `model` out over `mesh` in place, torchtitan's order: the pipeline split first, then on each
    part TP -> activation checkpointing -> compile -> FSDP (ZeRO-2/3). A mesh of ones applies only
    activation checkpointing and compile. `auto` fields resolve for `device` (parallel.defaults)."""
    cfg = resolve_defaults(cfg, device.type).config
    dims = dims_of(mesh)
    keep_4bit_trainable(model)
    sp, vp = tp_options(model, cfg, dims.tp)
    layout = Layout([], sp, vp, LogitsLayout(), PartialGrads())
    find_decoder(model)[1].config.use_cache = False
    if dims.pp > 1:
        parts = build_stage_modules(model, mesh["pp"].get_local_rank(), dims.pp, cfg.pp_schedule)
    else:
        parts = [model]
    mp_policy = zero_mod.mixed_precision_policy(cfg.mixed_precision, device.type)
    for part in parts:
        part.to(device).train()
        layers = part.layers if dims.pp > 1 else list(find_decoder(part)[1].layers)
        if dims.tp > 1:
            _apply_tp(part, layers, mesh["tp"], layout, pipelined=dims.pp > 1)
        apply_activation_checkpointing(layers, cfg.activation_checkpointing)
        if cfg.compile is True:
            for layer in layers:
                layer.compile()
        if cfg.zero >= 2:
            zero_mod.apply_fsdp(part, layers, fsdp_mesh(mesh, dims), zero=cfg.zero, mp_policy=mp_policy)
    layout.parts = parts
    return layout


def keep_4bit_trainable(model: nn.Module) -> None:
    """bitsandbytes repacks a 4-bit weight for a CPU inference kernel (AVX512-BF16) at the first eval-mode
    forward without gradients, and keeps it: that kernel has no backward, so every training step after an
    evaluation would silently lose the gradients through the 4-bit base layers (the adapters of all earlier
    layers would stop learning). A trained model keeps the differentiable kernel."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def _apply_tp(part: nn.Module, layers: list[nn.Module], tp_mesh, layout: Layout, *, pipelined: bool) -> None:
    if pipelined:
        embed, _, _, norm, head = part._parts
        first, last = part.is_first, part.is_last
    else:
        _, decoder, _, head = find_decoder(part)
        embed, norm, first, last = decoder.embed_tokens, decoder.norm, True, True
    sp = layout.sequence_parallel
    partial = apply_tensor_parallel(layers, tp_mesh, sequence_parallel=sp, gather_output=not last)
    ends = apply_tp_ends(
        tp_mesh,
        embed=embed if first else None,
        norm=norm if last else None,
        head=head if last else None,
        sequence_parallel=sp,
        vocab_parallel=layout.vocab_parallel,
        logits=layout.logits,
    )
    layout.partial.entries += partial.entries + ends.entries


@dataclass
class PipelineLoss:
    """What the last pipeline stage's loss needs for one schedule call, passed to it explicitly (the
    schedule's loss_fn is fixed when the schedule is built): token CE on labels by default; an
    Objective's sum on a packed target (its per-micro-batch statistics collected in `stats`); or, for
    forward_rows, per-row values of `rows_fn`. `scale` is 1 / the global batch's unit count (1.0: sums).
    summed: the last stage's output is already the micro-batch's summed token loss (chunked)."""

    scale: float = 1.0
    seq: int = 0  # logits are cut back to this width (sequence-parallel padding)
    objective: "Objective | None" = None
    rows_fn: object = None
    extras: list[str] = field(default_factory=list)
    stats: list[dict[str, float]] = field(default_factory=list)
    summed: bool = False

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.summed:
            return logits[0] * self.scale
        logits = logits[:, : self.seq]
        if self.objective is None and self.rows_fn is None:
            return summed_ce(logits, target) * self.scale
        micro = self.unpack(target)
        if self.rows_fn is not None:
            return self.rows_fn(logits, micro).float()
        summed, stats = self.objective(logits, micro)
        self.stats.append({key: float(value) for key, value in stats.items()})
        return summed * self.scale

    def pack(self, local: dict[str, torch.Tensor]) -> torch.Tensor:
        """labels and every 1-D per-row tensor of a batch as one float64 target [rows, seq + extras], which
        the pipeline schedule splits into micro-batches like the inputs (token ids are exact in float64)."""
        self.extras = sorted(k for k, v in local.items() if v.dim() == 1)
        others = [k for k, v in local.items() if v.dim() != 1 and k not in ("input_ids", "attention_mask", "labels")]
        if others:
            raise ValueError(
                f"parallel.pp: pipeline stages carry labels and per-row values only, not {others}; "
                "this stage's loss needs pp = 1"
            )
        return torch.cat([local["labels"].double()] + [local[k].double().unsqueeze(1) for k in self.extras], dim=1)

    def unpack(self, target: torch.Tensor) -> dict[str, torch.Tensor]:
        width = target.shape[1] - len(self.extras)
        micro = {"labels": target[:, :width].long()}
        for i, key in enumerate(self.extras):
            micro[key] = target[:, width + i].float()
        return micro


class Trainer:
    """Parallelized model parts, their optimizers, and one `train_step` per global batch.

    model: a full HF causal LM on every rank (already wrapped by peft for LoRA), same weights
    everywhere; it is cut up in place. mesh: from ParallelDims.build_mesh.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: ParallelConfig,
        mesh,
        *,
        mode: str = "full",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        grad_clip: float = 1.0,
        optimizer: str = "adamw",
    ):
        self.cfg, self.mesh, self.dims = cfg, mesh, dims_of(mesh)
        if (self.dims.pp, self.dims.dp_replicate, self.dims.dp_shard, self.dims.tp) != (
            cfg.pp,
            cfg.dp_replicate,
            cfg.dp_shard,
            cfg.tp,
        ):
            raise ValueError(f"parallel: the mesh {self.dims} does not match the config {cfg}")
        self.model_config = find_decoder(model)[1].config  # the HF config (stage modules under pp have none)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if mesh.device_type == "cuda"
            else torch.device(mesh.device_type)
        )
        # `auto` fields not resolved by the stage's start (which knows the stage's memory) resolve here.
        cfg = self.cfg = resolve_defaults(cfg, self.device.type, mode=mode, optimizer=optimizer).config
        # The one layout check (parallel.layout), once, against this world and the model's shape.
        check_layout(cfg, mode=mode, world=self.dims.world_size, model_config=self.model_config, optimizer=optimizer)
        self.grad_clip = grad_clip
        self.pp_rank = mesh["pp"].get_local_rank()
        # Sequence-parallel padding uses the pad token: a classifier (the reward model) pools the last non-pad one.
        self._pad_id = getattr(find_decoder(model)[1].config, "pad_token_id", None) or 0
        self._seq = 0
        # Tied embeddings: (embedding, lm_head) weight names, read before the model is cut into stages.
        self.tied_names = tied_names(model)
        tied_trainable = self.tied_names is not None and find_decoder(model)[1].embed_tokens.weight.requires_grad
        # The token loss from hidden states + head weight in chunks (parallel.chunked_ce) where the head is a
        # plain projection, inside the forward of the part or last pipeline stage (so under any ZeRO).
        self.chunked = cfg.loss_chunk_tokens != 0 and why_not_chunked(model) is None
        layout = parallelize(model, cfg, mesh, self.device)
        self.parts, self.sp, self.vp = layout.parts, layout.sequence_parallel, layout.vocab_parallel
        self.logits_layout, self.partial = layout.logits, layout.partial
        if self.chunked and self.dims.pp > 1:
            for part in self.parts:
                chunk_stage_loss(part, cfg.loss_chunk_tokens, self._gather_sequence() if self.sp else None)
        # Not cut up (no pp, tp or FSDP sharding): the model itself, whole on this rank.
        self.whole_model = model if (self.dims.pp, self.dims.tp) == (1, 1) and cfg.zero < 2 else None
        self.params = [p for part in self.parts for p in part.parameters() if p.requires_grad]
        # Under pp the first and last stages each hold a copy of a tied weight; their gradients are summed.
        self.tied = TiedCopies.build(self.tied_names, tied_trainable, self.parts, mesh, self.dims.pp)
        self._build_optimizers(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, optimizer=optimizer)
        self.schedule = None
        if self.dims.pp > 1:
            self.schedule = build_schedule(
                self.parts,
                self.pp_rank,
                self.dims.pp,
                cfg.pp_schedule,
                microbatches=cfg.microbatches,
                loss_fn=lambda logits, target: self._pp_loss(logits, target),
                pp_group=mesh["pp"].get_group(),
                device=self.device,
            )
        self._pp_loss = PipelineLoss()  # replaced by each schedule call
        self.last_stats: dict[str, float] = {}
        self.step = 0

    def _padded(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model inputs right-padded to a multiple of tp tokens under sequence parallelism (masked out;
        callers cut the logits back to `self._seq`). Packed rows (position_ids, no attention_mask: the
        model keeps their documents apart by position_ids) get the padding as one more document, still
        without a mask, which would switch the packed-sequence attention off."""
        seq = inputs["input_ids"].shape[1]
        self._seq = seq
        extra = (-seq) % self.dims.tp if self.sp else 0
        if not extra:
            return inputs
        rows = inputs["input_ids"].shape[0]
        out = dict(inputs)
        out["input_ids"] = F.pad(inputs["input_ids"], (0, extra), value=self._pad_id)
        if "attention_mask" not in inputs and "position_ids" in inputs:
            tail = torch.arange(extra, device=inputs["position_ids"].device).expand(rows, extra)
            out["position_ids"] = torch.cat([inputs["position_ids"], tail], 1)
            return out
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones(rows, seq, dtype=torch.long, device=inputs["input_ids"].device)
        out["attention_mask"] = F.pad(mask, (0, extra))
        if "position_ids" in inputs:
            last = inputs["position_ids"][:, -1:]
            out["position_ids"] = torch.cat(
                [inputs["position_ids"], last + torch.arange(1, extra + 1, device=last.device)], 1
            )
        return out

    def logits(self, rows: dict[str, torch.Tensor], *, vocab_sharded: bool = False):
        """The one-stage (pp = 1) model's logits for local rows [rows, seq, vocab]; vocab_sharded: a
        vocab-sharded DTensor for loss_parallel when the head is vocab-parallel."""
        self.logits_layout.keep_sharded = vocab_sharded and self.vp
        try:
            logits = self.parts[0](**self._padded(model_inputs(rows))).logits
        finally:
            self.logits_layout.keep_sharded = False
        return logits[:, : self._seq] if logits.shape[1] != self._seq else logits

    def chunked_ce(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """summed_ce of the one-stage model on local rows without whole logits, computed inside the model's
        forward (parallel.chunked_ce.loss_in_forward: under FSDP the head is gathered once)."""
        gather = self._gather_sequence() if self.sp else None
        with loss_in_forward(self.parts[0], rows["labels"], self.cfg.loss_chunk_tokens, gather):
            return self.parts[0](**self._padded(model_inputs(rows)), logits_to_keep=1)

    def _gather_sequence(self):
        """Under sequence parallelism the final norm leaves this rank's slice of the sequence."""
        return partial(gather_sequence, tp_mesh=self.mesh["tp"])

    def _autocast(self):
        """bf16 autocast (engine.autocast_dtype's rule) where FSDP's mixed-precision policy does not already
        cast (ZeRO-0/1, or CPU)."""
        from parallel.engine import autocast_dtype

        dtype = autocast_dtype(self.cfg.mixed_precision, self.device.type)
        if dtype is None or (self.device.type == "cuda" and self.cfg.zero >= 2):
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every optimizer (for an LR schedule computed by the caller)."""
        for opt in self.optimizers:
            for group in opt.param_groups if opt is not None else []:
                group["lr"] = lr

    def _build_optimizers(self, **hparams) -> None:
        """One optimizer per model part (torchtitan's container); ZeRO-1 keeps only owned parameters."""
        self.owners = None
        if self.cfg.zero == 1:
            self.owners = zero_mod.partition_params(self.params, self.dims.dp)
            mine = {id(p) for p, o in zip(self.params, self.owners) if o == dp_rank(self.mesh)}
        self.optimizers = []
        for part in self.parts:
            params = [p for p in part.parameters() if p.requires_grad]
            if self.owners is not None:
                params = [p for p in params if id(p) in mine]
            self.optimizers.append(build_adamw(params, **hparams, fused=self.cfg.fused_optimizer))

    def _from_last_stage(self, value):
        """A Python value only the last pipeline stage computed, on every rank of the pp group."""
        gathered = [None] * self.dims.pp
        dist.all_gather_object(gathered, value, group=self.mesh["pp"].get_group())
        return next(v for v in reversed(gathered) if v is not None)

    def _local_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rows = batch["input_ids"].shape[0]
        per_rank = rows // self.dims.dp
        if rows % (self.dims.dp * self.cfg.microbatches):
            raise ValueError(
                f"parallel.microbatches: a global batch of {rows} rows does not split into "
                f"dp={self.dims.dp} x microbatches={self.cfg.microbatches} equal parts"
            )
        start = dp_rank(self.mesh) * per_rank
        return {k: v[start : start + per_rank].to(self.device) for k, v in batch.items()}

    def forward_backward(self, batch: dict[str, torch.Tensor], objective: "Objective | None" = None) -> float:
        """Accumulate this rank's share of the gradients; returns its share of the global loss.

        objective: token cross-entropy when None; otherwise an Objective whose per-unit losses (e.g. one
        per preference pair) are averaged over the global batch. Its statistics, summed over the dp
        ranks, are left in `self.last_stats`. Every tensor of `batch` is split by rows like input_ids.
        """
        objective = objective or TOKEN_CE
        count = objective.count(batch)
        if count == 0:
            raise ValueError(
                "global batch has no label tokens" if objective is TOKEN_CE else "global batch has nothing to train on"
            )
        scale = 1.0 / count
        local = self._local_batch(batch)
        self.last_stats = {}
        if self.schedule is not None:
            custom = objective is not TOKEN_CE
            inputs = self._padded(model_inputs(local))
            self._pp_loss = PipelineLoss(
                scale, self._seq, objective if custom else None, summed=self.chunked and not custom
            )
            target = self._pp_loss.pack(local) if custom else local["labels"]
            losses: list[torch.Tensor] = []
            with self._autocast():
                self.schedule.step(
                    inputs["input_ids"], **self._stage_kwargs(inputs, local, custom), target=target, losses=losses
                )
            if custom:
                stats = None
                if self.pp_rank == self.dims.pp - 1:
                    # The schedule's first step also runs the loss on a shape-inference pass: only the
                    # last `microbatches` calls are the real micro-batches.
                    stats = {}
                    for micro_stats in self._pp_loss.stats[-self.cfg.microbatches :]:
                        for key, value in micro_stats.items():
                            stats[key] = stats.get(key, 0.0) + value
                self.last_stats = self._sum_over_dp(self._from_last_stage(stats))
            self._sum_partial_grads()
            return float(sum(l.detach().double() for l in losses)) if losses else 0.0
        total, stats = 0.0, {}
        model = self.parts[0]
        n = self.cfg.microbatches
        chunks = {k: v.chunk(n) for k, v in local.items()}
        use_chunks = self.chunked and objective is TOKEN_CE
        sharded = self.vp and objective.vocab_parallel and not use_chunks
        for i in range(n):
            if self.cfg.zero >= 2:  # reduce-scatter once, after the last micro-batch
                model.set_requires_gradient_sync(i == n - 1)
            micro = {k: v[i] for k, v in chunks.items()}
            with self._autocast():
                if use_chunks:
                    summed, micro_stats = self.chunked_ce(micro), {}
                else:
                    logits = self.logits(micro, vocab_sharded=sharded)
            with loss_parallel() if sharded else nullcontext():
                if not use_chunks:
                    summed, micro_stats = objective(logits, micro)
                loss = summed / count  # (not * scale: the same rounding as a plain token mean)
                loss.backward()
            total += float(_local_value(loss.detach()))
            for key, value in micro_stats.items():
                stats[key] = stats.get(key, 0.0) + float(value)
        self.last_stats = self._sum_over_dp(stats)
        self._sum_partial_grads()
        return total

    def _stage_kwargs(self, inputs, local, custom: bool = False) -> dict[str, torch.Tensor]:
        """Keywords of every pipeline stage's forward: the labels too when the last stage computes the
        chunked token loss (parallel.chunked_ce.chunk_stage_loss)."""
        kwargs = {"attention_mask": inputs["attention_mask"]}
        if self.chunked and not custom:
            kwargs["labels"] = local["labels"]
        return kwargs

    def _sum_partial_grads(self) -> None:
        """Gradients each tp rank computed from its sequence slice or its heads (norms under sequence
        parallelism, Qwen3's q/k norms, LoRA B behind a rowwise layer): summed over tp, once per
        forward_backward (which expects gradients cleared before it, as train_step does). Then every
        gradient is laid out like its parameter (see _grads_like_params)."""
        if self.partial.entries:
            zero_mod.allreduce_grads(self.partial.params(), self.mesh["tp"].get_group())
        self._grads_like_params()

    def _grads_like_params(self) -> None:
        """A vocab-parallel embedding's gradient comes back replicated over tp (the whole [vocab, hidden] on
        every tp rank, tp times its weight's shard): keep this rank's shard, a local slice, before the dp
        all-reduce, clipping and the optimizer (found by bench/planner_vs_measured.py)."""
        for p in self.params:
            grad = p.grad
            if isinstance(grad, DTensor) and tuple(grad.placements) != tuple(p.placements):
                p.grad = grad.redistribute(p.device_mesh, p.placements)

    def _sum_over_dp(self, stats: dict[str, float]) -> dict[str, float]:
        if not stats or self.dims.dp == 1:
            return stats
        keys = sorted(stats)
        values = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(values, group=dp_mesh(self.mesh).get_group())
        return dict(zip(keys, values.tolist()))

    @torch.no_grad()
    def forward_rows(self, batch: dict[str, torch.Tensor], fn) -> torch.Tensor:
        """fn(logits, local rows) -> a [local rows, ...] tensor for every row of a global batch, gathered
        over the dp ranks in row order (collective). For held-out metrics of custom objectives. Under pp the
        batch must be shaped like a training batch (rows and width), and fn sees labels and per-row extras."""
        local = self._local_batch(batch)
        if self.schedule is not None:  # the last stage computes the values; every pp rank gets them
            losses: list[torch.Tensor] = []
            inputs = self._padded(model_inputs(local))
            self._pp_loss = PipelineLoss(seq=self._seq, rows_fn=fn)
            with self._autocast():
                self.schedule.eval(
                    inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    target=self._pp_loss.pack(local),
                    losses=losses,
                )
            out = torch.cat([l.detach().float().cpu() for l in losses]) if losses else None
            out = self._from_last_stage(out)
        else:
            with self._autocast():
                logits = self.logits(local)
            out = fn(logits, local).detach().float().cpu()
        if self.dims.dp == 1:
            return out
        parts = [torch.empty_like(out) for _ in range(self.dims.dp)]
        dist.all_gather(parts, out, group=dp_mesh(self.mesh).get_group())
        return torch.cat(parts)

    @torch.no_grad()
    def eval_loss(self, batches: list[dict[str, torch.Tensor]]) -> float:
        """Token-mean cross-entropy over all label tokens of the batches, through the layout (collective).

        Each dp rank takes its slice of every batch; under pp the schedule's forward-only `eval` runs and
        the last stage sums the loss. Rows must split evenly over dp (and the micro-batches under pp, whose
        batches must also have the training batches' shape): see training.data.eval_batches(fill=...)."""
        for part in self.parts:
            part.eval()
        total, count = 0.0, 0
        try:
            for batch in batches:  # one pass: batches may be collated as they are read
                total += self._summed_ce(batch)
                count += num_label_tokens(batch["labels"])
        finally:
            for part in self.parts:
                part.train()
        return total / count

    def _summed_ce(self, batch: dict[str, torch.Tensor]) -> float:
        local = self._local_batch(batch)
        with self._autocast():
            if self.schedule is None and self.chunked:
                local_sum = float(self.chunked_ce(local))
            elif self.schedule is None:
                local_sum = float(summed_ce(self.logits(local), local["labels"]))
            else:
                losses: list[torch.Tensor] = []
                inputs = self._padded(model_inputs(local))
                self._pp_loss = PipelineLoss(1.0, self._seq, summed=self.chunked)  # a plain sum
                self.schedule.eval(
                    inputs["input_ids"], **self._stage_kwargs(inputs, local), target=local["labels"], losses=losses
                )
                local_sum = float(sum(loss.double() for loss in losses)) if losses else 0.0
        return self._global_loss(local_sum)  # sums over pp stages and dp ranks

    def train_step(self, batch: dict[str, torch.Tensor], objective: "Objective | None" = None) -> tuple[float, float]:
        """One optimizer step on a global batch {input_ids, labels, attention_mask, ...}: (loss, grad norm).

        loss: the mean loss of the whole global batch (per label token by default, per objective unit
        otherwise), on every rank; grad norm before clipping.
        """
        # Not opt.zero_grad(): under ZeRO-1 an optimizer sees only the parameters its rank owns.
        for p in self.params:
            p.grad = None
        local_loss = self.forward_backward(batch, objective)
        if self.cfg.zero <= 1 and self.dims.dp > 1:
            zero_mod.allreduce_grads(self.params, dp_mesh(self.mesh).get_group())
        self.tied.sum_grads()  # both copies of a tied weight now hold the whole gradient
        pp_group = self.mesh["pp"].get_group() if self.dims.pp > 1 else None
        counted_elsewhere = [self.tied.param] if self.tied.counted_elsewhere else []
        grad_norm = clip_grads_(self.params, self.grad_clip, self.mesh, pp_group, counted_elsewhere=counted_elsewhere)
        for opt in self.optimizers:
            if opt is not None:
                opt.step()
        if self.owners is not None:
            zero_mod.broadcast_params(self.params, self.owners, dp_mesh(self.mesh).get_group())
        self.step += 1
        return self._global_loss(local_loss), grad_norm

    def _global_loss(self, local_loss: float) -> float:
        value = torch.tensor(local_loss, dtype=torch.float64)
        if self.dims.pp > 1:
            dist.all_reduce(value, group=self.mesh["pp"].get_group())
        if self.dims.dp > 1:
            dist.all_reduce(value, group=dp_mesh(self.mesh).get_group())
        return float(value)
