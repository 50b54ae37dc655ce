"""A trained model and its optimizer updates, the same for every training stage (SFT's token loss, DPO,
the reward model, PPO's policy and critic, GRPO): the engine's Trainer over this process group's mesh
(one process is the mesh of ones) and the optimizer's LR schedule (optim.lr_scheduler) over its updates."""

from __future__ import annotations

import contextlib

import torch

from parallel import efficiency, engine
from parallel.trainer import Objective


class Learner:
    """A model laid out by the engine's Trainer (`trainer`; `model` is the part this rank holds, the whole
    model when nothing is cut up) and its updates.

    update(batch, objective) runs one optimizer update on a global mini-batch and returns the objective's
    statistics as means per unit, the learning rate used and the grad norm before clipping."""

    def __init__(self, trainer, optim_cfg, num_updates: int):
        self.trainer, self.optim_cfg, self.num_updates = trainer, optim_cfg, num_updates
        self.model = trainer.parts[0]
        self.updates = 0

    @classmethod
    def build(
        cls,
        model_dir,
        parallel,
        *,
        mode: str,
        optim,
        num_updates: int,
        lora=None,
        quant=None,
        grad_accum: int = 1,
        model=None,
    ) -> "Learner":
        """Load (or take) the model and lay it out (collective under several ranks); see engine.build_trainer."""
        trainer = engine.build_trainer(
            model_dir, parallel, mode=mode, optim=optim, lora=lora, quant=quant, grad_accum=grad_accum, model=model
        )
        return cls(trainer, optim, num_updates)

    def state(self):
        """The training state a checkpoint holds (parallel.distributed.checkpoint), at this update count."""
        self.trainer.step = self.updates
        return self.trainer

    def lr(self) -> float:
        """The learning rate of the next update."""
        opt = self.optim_cfg
        return opt.lr * engine.lr_factor(
            self.updates,
            warmup_steps=opt.warmup_steps,
            max_steps=self.num_updates,
            min_lr_ratio=opt.lr_floor,
            scheduler=opt.lr_scheduler,
            decay_steps=opt.decay_updates(self.num_updates) if opt.lr_scheduler == "wsd" else 0,
        )

    def update(self, batch: dict[str, torch.Tensor], objective: Objective | None = None):
        """One optimizer update: (statistics as means per unit, lr, grad norm); `metrics` keeps the
        engine's StepMetrics of it (loss, label and input token counts). objective: token CE when None."""
        units = objective.count(batch) if objective is not None else None
        self.metrics = engine.train_step(self.trainer, batch, lr=self.lr(), objective=objective)
        self.updates += 1
        stats = {k: float(v) / units for k, v in self.trainer.last_stats.items()} if units else {}
        return stats, self.metrics.lr, float(self.metrics.grad_norm)

    @torch.no_grad()
    def rows(self, rows: dict[str, torch.Tensor], fn, context=None) -> torch.Tensor:
        """fn(logits, rows) for every row (eval mode; through the layout, gathered over dp), on CPU."""
        for part in self.trainer.parts:
            part.eval()
        try:
            with context if context is not None else contextlib.nullcontext():
                return self.trainer.forward_rows(rows, fn)
        finally:
            for part in self.trainer.parts:
                part.train()

    def efficiency(self, units_per_s: float | None, flops_per_unit: float | None = None) -> dict[str, float]:
        """mfu (when units_per_s and flops_per_unit are given and the device's peak is known: tokens/s x
        FLOPs per token over the world's summed peak), and peak memory in GiB: this rank's and, under several
        ranks, the largest of any rank (collective)."""
        device = self.trainer.device
        peak_gib = efficiency.peak_memory_bytes(device) / 2**30
        out = {"peak_mem_gib": peak_gib}
        if engine.is_distributed():
            out["peak_mem_gib_max"] = max(engine.all_gather_object(peak_gib))
        if units_per_s is not None and flops_per_unit is not None:
            world = engine.process_world_size()
            utilisation = efficiency.mfu(units_per_s, flops_per_unit, efficiency.device_peak_flops(device), world)
            if utilisation is not None:
                out["mfu"] = utilisation
        return out

    def flops_per_token(self, seq_len: int, *, forward_only: bool = False, head_outputs: int | None = None) -> float:
        """Training FLOPs per token of this model at seq_len (parallel.efficiency; LoRA: frozen base), or of
        its forward pass alone (forward_only: a frozen copy of it, or its base with the adapters off, scoring).
        head_outputs: 1 for a scalar score head (reward model, critic); None: the LM head."""
        config = self.trainer.model_config
        if forward_only:
            return efficiency.flops_per_token(config, seq_len, forward_only=True, head_outputs=head_outputs)
        total = sum(p.numel() for part in self.trainer.parts for p in part.parameters())
        trainable = sum(p.numel() for p in self.trainer.params)
        # Sharded parameters (tp, FSDP) count locally here; the frozen base is what tells LoRA apart.
        return efficiency.flops_per_token(
            config, seq_len, trainable_params=None if trainable == total else trainable, head_outputs=head_outputs
        )

    def eval_loss(self, batches: list[dict[str, torch.Tensor]]) -> float:
        """Token-mean cross-entropy over the batches' label tokens (collective)."""
        return self.trainer.eval_loss(batches)
