"""What every training stage does around its loop, in one place: start (the stage's seed, the clock) and
finish (gather the trained model from the layout, rebuild it as a plain model on rank 0, save it, write
result.json with the run's facts, drop the resume state, hand every rank rank 0's result)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from parallel import engine
from parallel.checkpoint import gather_full_state_dict, save_checkpoint
from parallel.defaults import Defaults
from training.resume import Resumer
from training.resume import discard as discard_resume

Progress = Callable[[dict], None]


def check_stage(cfg, parallel, model_dir: Path) -> None:
    """The stage's one start-up check, before any data is read: its layout against the processes running
    and the model's shape, and its kind's batch-split and own rules (training.stages.check_stage_layout)."""
    from transformers import AutoConfig

    from training.stages import check_stage_layout

    check_stage_layout(
        cfg, parallel, world=engine.process_world_size(), model_config=AutoConfig.from_pretrained(model_dir)
    )


def resolve_parallel(cfg, parallel, model_dir: Path):
    """The stage's layout with its `auto` fields resolved for this process's device (parallel.defaults); on
    a GPU the planner's per-rank memory of the stage against the GPU's decides activation checkpointing."""
    from training.stages import stage_defaults

    if not torch.cuda.is_available():
        return stage_defaults(cfg, parallel, None, "cpu")
    from parallel.planner import Shape

    config = json.loads((Path(model_dir) / "config.json").read_text())
    try:
        Shape.from_config(config)
    except KeyError:  # a family whose config the planner cannot read: no estimate, no checkpointing
        config = None
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return stage_defaults(cfg, parallel, config, "cuda", total)


def adapters(cfg):
    """(lora, quant) configs of a stage's mode: (None, None) for full fine-tuning, (lora, None) for LoRA."""
    return (None if cfg.mode == "full" else cfg.lora), (cfg.quant if cfg.mode == "qlora" else None)


@dataclass
class StageRun:
    """One run of a training stage: its seed (the stage's own, else the recipe's; torch seeded with it),
    output directory, progress callback and resume checkpoints, and when it started."""

    cfg: object
    model_dir: Path
    data_dir: Path
    out_dir: Path
    parallel: object
    seed: int
    progress: Progress
    started: float
    reward_model_dir: Path | None = None
    source_weights: dict[int, float] | None = None  # data.sources.<i>.weight, for stages that mix sources
    defaults: Defaults | None = None  # how `parallel`'s auto fields were resolved (parallel.defaults)

    @classmethod
    def start(
        cls,
        cfg,
        *,
        model_dir: Path,
        data_dir: Path,
        out_dir: Path,
        parallel,
        seed: int,
        progress: Progress | None = None,
        reward_model_dir: Path | None = None,
        source_weights: dict[int, float] | None = None,
    ) -> "StageRun":
        """The arguments every stage runner takes (training.stages KINDS runner): where the stage starts
        (model_dir), reads (data_dir) and writes (out_dir), its layout, the recipe seed, a progress
        callback, for the stages that score with one, the reward model's directory, and the recipe's source
        weights (data.sources.<i>.weight; None: every row once per epoch) for the stages that mix."""
        seed = cfg.seed if cfg.seed is not None else seed
        torch.manual_seed(seed)
        defaults = resolve_parallel(cfg, parallel, model_dir)
        return cls(
            cfg,
            Path(model_dir),
            Path(data_dir),
            Path(out_dir),
            defaults.config,
            seed,
            progress or (lambda event: None),
            time.perf_counter(),
            Path(reward_model_dir) if reward_model_dir is not None else None,
            dict(source_weights) if source_weights else None,
            defaults,
        )

    def resumer(self) -> Resumer:
        return Resumer(self.out_dir, self.cfg.checkpoint_every)

    def rebuild_causal_lm(self, state: dict):
        """A plain (or peft, adapters on the full-precision base) causal LM holding a gathered state."""
        return engine.rebuild_model(
            self.model_dir, state, adapters(self.cfg)[0], adapters_only=self.cfg.mode == "qlora"
        )

    def save_causal_lm(self, tokenizer) -> Callable:
        def save(model):
            save_checkpoint(
                model, tokenizer, self.out_dir / "checkpoint", base_model_dir=self.model_dir, mode=self.cfg.mode
            )

        return save

    def finish(
        self,
        learner,
        result: dict,
        *,
        save: Callable,
        data_stats: dict,
        device,
        rebuild: Callable | None = None,
        **facts,
    ) -> dict:
        """Gather the learner's model (collective), and on rank 0 rebuild it (`rebuild(state)`, default: the
        causal LM), `save(model)` it, write result.json (the loop's `result`, `facts`, the run's facts) and
        drop the resume state; every rank returns rank 0's result."""
        state = gather_full_state_dict(learner.trainer)
        if state is not None:
            model = (rebuild or self.rebuild_causal_lm)(state)
            save(model)
            trainable, total = engine.count_params(model)
            result.update(
                mode=self.cfg.mode,
                seed=self.seed,
                **facts,
                seconds=time.perf_counter() - self.started,
                trainable_params=trainable,
                total_params=total,
                device=str(device),
                world_size=self.parallel.world_size,
                engine=self.parallel.engine,
                parallel_used=self.defaults.used(),
                parallel_auto=dict(self.defaults.why),
                data={name: vars(stats) for name, stats in data_stats.items()},
            )
            (self.out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
            discard_resume(self.out_dir)  # the stage is complete: nothing to resume
        return engine.from_rank0(result)
