"""A trained model and its optimizer updates, the same for every stage that trains with an engine Objective
(DPO, the reward model, PPO's policy and critic, GRPO): one process, or the engine's DistributedTrainer."""

from __future__ import annotations

import contextlib

import torch

from parallel import engine
from parallel.distributed.engine import Objective, model_inputs


class Learner:
    """A trained model and its updates: in one process the model with AdamW and the update schedule,
    under torch.distributed the engine's DistributedTrainer (whose laid-out model is `model`).

    update(batch, objective) runs one optimizer update on a global mini-batch and returns the objective's
    statistics as means per unit, the learning rate used and the grad norm before clipping. In one
    process the batch runs as grad_accum micro-batches (a DistributedTrainer has its own count)."""

    def __init__(self, model, optim_cfg, num_updates: int, runtime: engine.Runtime, trainer=None, grad_accum: int = 1):
        self.optim_cfg, self.num_updates, self.runtime, self.trainer = optim_cfg, num_updates, runtime, trainer
        self.grad_accum = grad_accum
        self.updates = 0
        if trainer is not None:
            self.model, self.optimizer, self.scheduler = trainer.parts[0], None, None
        else:
            opt = optim_cfg
            self.model = model
            self.optimizer = engine.build_optimizer(
                model, lr=opt.lr, weight_decay=opt.weight_decay, betas=opt.betas, eps=opt.eps, runtime=runtime
            )
            self.scheduler = update_schedule(self.optimizer, opt, num_updates)

    def state(self):
        """The training state a checkpoint holds: the DistributedTrainer, or the one-process model,
        optimizer and schedule (parallel.distributed.checkpoint), at this learner's update count."""
        from parallel.distributed.checkpoint import OneProcessState

        if self.trainer is not None:
            return self.trainer
        return OneProcessState(self.model, self.optimizer, self.scheduler, step=self.updates)

    def resume(self, resumer) -> dict | None:
        """Restore the latest checkpoint of `resumer` (training.resume.Resumer), if any (collective)."""
        resumed = resumer.load(self.state())
        if resumed:
            self.updates = resumed["step"]
        return resumed

    def update(self, batch: dict[str, torch.Tensor], objective: Objective) -> tuple[dict[str, float], float, float]:
        units = objective.count(batch)
        opt = self.optim_cfg
        if self.trainer is not None:
            lr = opt.lr * engine.lr_factor(
                self.updates, warmup_steps=opt.warmup_steps, max_steps=self.num_updates, min_lr_ratio=opt.min_lr_ratio
            )
            grad_norm = engine.distributed_train_step(self.trainer, batch, lr=lr, objective=objective).grad_norm
            stats = self.trainer.last_stats
        else:
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.zero_grad(set_to_none=True)
            stats = {}
            for micro in _split_rows(batch, self.grad_accum):
                summed, micro_stats = objective(*self._forward(micro))
                (summed / units).backward()
                for key, value in micro_stats.items():
                    stats[key] = stats.get(key, 0.0) + float(value)
            grad_norm = engine.optimizer_step(self.model, self.optimizer, self.scheduler, opt.grad_clip)
        self.updates += 1
        return {k: float(v) / units for k, v in stats.items()}, lr, float(grad_norm)

    @torch.no_grad()
    def rows(self, rows: dict[str, torch.Tensor], fn, context=None) -> torch.Tensor:
        """fn(logits, rows) for every row (eval mode; through the layout, gathered over dp), on CPU."""
        parts = self.trainer.parts if self.trainer is not None else [self.model]
        for part in parts:
            part.eval()
        try:
            with context if context is not None else contextlib.nullcontext():
                if self.trainer is not None:
                    return self.trainer.forward_rows(rows, fn)
                return fn(*self._forward(rows)).float().cpu()
        finally:
            for part in parts:
                part.train()

    def _forward(self, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits, rows on the device) of the one-process model."""
        local = {k: v.to(self.runtime.device) for k, v in rows.items()}
        with self.runtime.autocast():
            return self.model(**model_inputs(local), use_cache=False).logits, local


def update_schedule(optimizer, optim_cfg, num_updates: int):
    """The engine's warmup + cosine schedule over optimizer updates."""
    return engine.build_scheduler(
        optimizer, warmup_steps=optim_cfg.warmup_steps, max_steps=num_updates, min_lr_ratio=optim_cfg.min_lr_ratio
    )


def _split_rows(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    chunks = {k: v.chunk(parts) for k, v in batch.items()}
    return [{k: v[i] for k, v in chunks.items()} for i in range(parts)]
