"""DeepSpeedTrainer: the Trainer's interface over a DeepSpeed engine, for data-parallel layouts (dp_shard x
ZeRO 0-3) and what DeepSpeed adds to them: the optimizer state (ZeRO-Offload) and the parameters
(ZeRO-Infinity) on the host or NVMe, with DeepSpeed's CPU Adam. Chosen by parallel.engine: deepspeed.

Same data and loss as the native Trainer: every rank receives the global batch and takes its dp slice, the
loss is the objective's sum divided by the global batch's unit count, and the gradients are the sum over dp
ranks and micro-batches (DeepSpeed averages over ranks, so each rank's loss is scaled by the dp size; its
own 1/accumulation scaling is off). Clipping is the recipe's (DeepSpeed's default of 1.0 never applies) and
the learning rate is set each update by the caller, as for the native Trainer. In fp32 the two engines
agree to rounding; under bf16 DeepSpeed holds bf16 weights with fp32 master copies in the optimizer
(native: fp32 weights under autocast), so they agree to bf16 rounding.

Checkpoints are DeepSpeed's own (trainable weights, partitioned optimizer state) plus, as for native, the
step, each rank's RNG and the caller's `extra`; they resume under the same number of ranks and ZeRO stage
(DeepSpeed's partitioned state does not reshard on load), and a different layout is refused in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from parallel import deepspeed_config as dsc
from parallel.defaults import resolve_defaults
from parallel.dims import ParallelConfig
from parallel.distributed.checkpoint import ResumeRefused
from parallel.distributed.mesh import ParallelDims
from parallel.trainer import TOKEN_CE, LocalMesh, Objective, Trainer, apply_activation_checkpointing, model_inputs

TAG = "deepspeed"  # the subdirectory of a checkpoint step that DeepSpeed writes
LAYOUT_FILE = "deepspeed_layout.json"


class LayoutChanged(ResumeRefused):
    """A DeepSpeed checkpoint cannot resume under this layout (one-line message)."""


def _quiet() -> None:
    """DeepSpeed logs INFO lines about its setup on every rank; hpcft prints its own."""
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def build_optimizer(params: list[nn.Parameter], *, host: bool, lr, weight_decay, betas, eps):
    """AdamW with the native engine's groups (no weight decay on 1-D tensors); DeepSpeed's CPU Adam (AdamW
    mode, the same update) when the optimizer state lives on the host."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if host:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=tuple(betas), eps=eps, adamw_mode=True)
    fused = all(p.is_cuda for p in params) or None
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _ensure_process_group() -> None:
    """DeepSpeed needs a process group even for one rank: a one-process gloo group on a free port."""
    if dist.is_initialized():
        return
    from parallel.distributed.launch import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)


class DeepSpeedTrainer:
    """A model trained by a DeepSpeed engine, with the native Trainer's interface (train_step, forward_rows,
    eval_loss, set_lr, parts, params, step, last_stats) so every stage's Learner uses it unchanged."""

    engine_name = "deepspeed"
    # The native Trainer's: each rank's dp slice of a global batch, statistics summed over the dp ranks.
    _local_batch = Trainer._local_batch
    _sum_over_dp = Trainer._sum_over_dp

    def __init__(
        self,
        model: nn.Module,
        cfg: ParallelConfig,
        *,
        mode: str = "full",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        grad_clip: float = 1.0,
        user_config: dict | None = None,
    ):
        from parallel.distributed.pipeline import find_decoder, tied_names
        from parallel.engine import autocast_dtype
        from parallel.layout import check_layout

        _ensure_process_group()
        import deepspeed

        from parallel import deepspeed_ops

        _quiet()
        rank, world = _world()
        if rank == 0:  # a first run without scripts/install's build: one line, not a silent minute
            deepspeed_ops.build()
        dist.barrier()
        self.cfg = cfg
        self.model_config = find_decoder(model)[1].config
        check_layout(cfg, mode=mode, world=world, model_config=self.model_config)
        self.dims = ParallelDims(1, 1, world, 1)
        # The native mesh over the same ranks, for the callers that gather over dp (sampling, stats).
        self.mesh = (
            LocalMesh() if world == 1 else self.dims.build_mesh("cpu" if not torch.cuda.is_available() else "cuda")
        )
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        self.cfg = cfg = resolve_defaults(cfg, self.device.type, mode=mode).config  # `auto` fields
        self.tied_names = tied_names(model)
        find_decoder(model)[1].config.use_cache = False
        apply_activation_checkpointing(list(find_decoder(model)[1].layers), cfg.activation_checkpointing)
        bf16 = autocast_dtype(cfg.mixed_precision, self.device.type) == torch.bfloat16
        owned = dsc.Owned(
            train_batch_size=None,
            micro_batch=None,
            grad_accum=cfg.microbatches,
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            bf16=bf16,
            zero=cfg.zero,
        )
        config = dsc.build(
            owned,
            offload=cfg.offload,
            user=user_config,
            hidden_size=getattr(self.model_config, "hidden_size", None),
            where=cfg.deepspeed_config or "ds_config",
        )
        self.ds_config = config
        self.offload = dsc.offloaded(config)
        if "nvme" in self.offload:
            nvme_problem = deepspeed_ops.nvme_problem()
            if nvme_problem:
                raise ValueError(f"parallel.offload: {nvme_problem}")
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(
            trainable, host=self.offload[0] != "none", lr=lr, weight_decay=weight_decay, betas=betas, eps=eps
        )
        model.train()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.parts = [self.engine.module]
        self.params = [p for p in self.engine.module.parameters() if p.requires_grad]
        self.optimizers = [self.optimizer]
        self.last_stats: dict[str, float] = {}
        self.step = 0
        self.rank = rank

    # --- the Trainer interface ------------------------------------------------------------------------

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _logits(self, module, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        return module(**model_inputs(rows)).logits

    def forward_backward(self, batch: dict[str, torch.Tensor], objective: Objective | None = None) -> float:
        """Accumulate this rank's share of the gradients of a global batch (DeepSpeed reduces them after the
        last micro-batch); returns its share of the global loss. The optimizer step is `optimizer_step`."""
        objective = objective or TOKEN_CE
        count = objective.count(batch)
        if count == 0:
            raise ValueError(
                "global batch has no label tokens" if objective is TOKEN_CE else "global batch has nothing to train on"
            )
        local = self._local_batch(batch)
        n = self.cfg.microbatches
        chunks = {k: v.chunk(n) for k, v in local.items()}
        total, stats = 0.0, {}
        for i in range(n):
            if i:
                self.engine.step()  # not an accumulation boundary: DeepSpeed only counts the micro-batch
            micro = {k: v[i] for k, v in chunks.items()}
            logits = self._logits(self.engine, micro)
            summed, micro_stats = objective(logits, micro)
            loss = summed / count
            # DeepSpeed averages gradients over the dp ranks: scaled by dp, the average is the sum.
            self.engine.backward(loss * self.dims.dp, scale_wrt_gas=False)
            total += float(loss.detach())
            for key, value in micro_stats.items():
                stats[key] = stats.get(key, 0.0) + float(value)
        self.last_stats = self._sum_over_dp(stats)
        return total

    def optimizer_step(self) -> float:
        """Clip and step (the accumulation boundary); returns the grad norm before clipping."""
        if self.cfg.zero == 0:  # DeepSpeed keeps no norm at ZeRO-0: the reduced gradients' own
            norms = [p.grad.detach().double().norm() for p in self.params if p.grad is not None]
            self._zero0_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        self.engine.step()
        self.step += 1
        return self._grad_norm()

    def train_step(self, batch: dict[str, torch.Tensor], objective: Objective | None = None) -> tuple[float, float]:
        """One optimizer update on a global batch: (the global batch's mean loss on every rank, the grad
        norm before clipping)."""
        local_loss = self.forward_backward(batch, objective)
        norm = self.optimizer_step()
        return self._global(local_loss), norm

    def _grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return self._zero0_norm if self.cfg.zero == 0 else float("nan")
        return float(norm.item() if isinstance(norm, torch.Tensor) else norm)

    def _global(self, value: float) -> float:
        if self.dims.dp == 1:
            return value
        t = torch.tensor(value, dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    @torch.no_grad()
    def forward_rows(self, batch: dict[str, torch.Tensor], fn) -> torch.Tensor:
        """fn(logits, local rows) for every row of a global batch, gathered over the dp ranks in row order."""
        local = self._local_batch(batch)
        out = fn(self._logits(self.engine.module, local), local).detach().float().cpu()
        if self.dims.dp == 1:
            return out
        parts = [torch.empty_like(out) for _ in range(self.dims.dp)]
        dist.all_gather(parts, out)
        return torch.cat(parts)

    @torch.no_grad()
    def eval_loss(self, batches: list[dict[str, torch.Tensor]]) -> float:
        """Token-mean cross-entropy over all label tokens of the batches (collective)."""
        from parallel.trainer import num_label_tokens, summed_ce

        module = self.engine.module
        module.eval()
        total, count = 0.0, 0
        try:
            for batch in batches:
                local = self._local_batch(batch)
                total += self._global(float(summed_ce(self._logits(module, local), local["labels"])))
                count += num_label_tokens(batch["labels"])
        finally:
            module.train()
        return total / count

    # --- the whole model, for export ------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The model's full state dict on CPU at rank 0 (None elsewhere; collective under ZeRO-3): trainable
        weights from the optimizer's fp32 master copies, the rest as the module holds them (gathered from
        their ZeRO-3 shards one at a time). A tied weight appears once, under the embedding's name."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        state = {}
        keys = set(module.state_dict().keys())
        for name, param in module.named_parameters():  # named_parameters names a shared (tied) weight once
            value = safe_get_full_fp32_param(param) if param.requires_grad else None
            if value is None:
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    value = param.data.detach().clone()
            if self.rank == 0:
                state[name] = value.detach().to("cpu", torch.float32, copy=True)
        if self.rank != 0:
            return None
        for name, buffer in module.named_buffers():
            if name in keys:
                state[name] = buffer.detach().to("cpu", copy=True)
        return state

    # --- resumable state --------------------------------------------------------------------------------

    def layout(self) -> dict:
        return {"world_size": self.dims.dp, "zero": self.cfg.zero}

    def save_state(self, path: Path, extra: dict | None = None) -> Path:
        """Collective: DeepSpeed's checkpoint of the trainable weights and optimizer state in path/deepspeed,
        plus the step, this rank's RNG and (rank 0) `extra` and the layout, every file fsynced."""
        from parallel.distributed.checkpoint import fsync_dir, write_rng, write_synced

        path = Path(path)
        error = None
        try:
            self.engine.save_checkpoint(
                str(path),
                tag=TAG,
                client_state={"hpcft_step": self.step},
                save_latest=False,
                exclude_frozen_parameters=True,
            )
        except OSError as err:
            error = err
        errors = [e for e in _gather(error) if e is not None]
        if errors:
            raise errors[0]
        rank = _world()[0]
        try:
            for file in sorted((path / TAG).glob("*")):
                if file.is_file() and (rank == 0 or f"rank_{rank}_" in file.name):
                    with open(file, "rb+") as f:
                        os.fsync(f.fileno())
            rng_file = write_rng(path)
            if rank == 0:
                from parallel.distributed.checkpoint import EXTRA_FILE

                write_synced(path / EXTRA_FILE, json.dumps(extra or {}).encode())
                write_synced(path / LAYOUT_FILE, json.dumps(self.layout()).encode())
                fsync_dir(path / TAG)
            fsync_dir(rng_file.parent)
            fsync_dir(path)
        except OSError as err:
            error = err
        errors = [e for e in _gather(error) if e is not None]
        if errors:
            raise errors[0]
        return path

    def load_state(self, path: Path) -> dict:
        """Collective: restore weights, optimizer, step and RNG from save_state's files; returns `extra`.
        LayoutChanged when the checkpoint was written under another number of ranks or ZeRO stage."""
        from parallel.distributed.checkpoint import EXTRA_FILE, restore_rng

        path = Path(path)
        layout_file = path / LAYOUT_FILE
        if not layout_file.is_file():
            raise FileNotFoundError(f"{layout_file} is missing: not a DeepSpeed checkpoint of hpcft")
        saved = json.loads(layout_file.read_text())
        if saved != self.layout():
            raise LayoutChanged(
                f"hpcft: the checkpoint {path} was written by DeepSpeed under {saved['world_size']} data-parallel "
                f"ranks at ZeRO-{saved['zero']}, and this run has {self.dims.dp} at ZeRO-{self.cfg.zero}; "
                "DeepSpeed's partitioned state resumes only under the same layout: run the stage with "
                f"parallel.dp_shard: {saved['world_size']} and zero: {saved['zero']} to resume, or delete "
                f"{path.parent} to start the stage over"
            )
        load_path, client = self.engine.load_checkpoint(
            str(path), tag=TAG, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {path / TAG}")
        self.step = int(client.get("hpcft_step", 0))
        restore_rng(path)  # the layout check above means the same ranks: each has its own file
        return json.loads((path / EXTRA_FILE).read_text())

    def state_nbytes(self) -> int:
        """Bytes of the trainable state a checkpoint holds (weights + 2 Adam moments, fp32), whole model."""
        return sum(_numel(p) for p in self.params) * 4 * 3


def _numel(p: nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def _gather(value) -> list:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
