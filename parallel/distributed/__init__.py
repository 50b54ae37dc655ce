"""3-D parallel training (pipeline x data/ZeRO x tensor) of Llama-family HF models, full fine-tune or LoRA.

    dims = ParallelDims.from_config(cfg, world_size)        # ValueError naming parallel.<field>
    mesh = dims.build_mesh("cpu" | "cuda")                  # after init_process_group
    trainer = DistributedTrainer(model, cfg, mesh, mode="full" | "lora", lr=..., grad_clip=...)
    loss, grad_norm = trainer.train_step(global_batch)      # same global batch on every rank
    save_checkpoint(trainer, path, extra) / load_checkpoint(trainer, path)   # any layout -> any layout

`launch(fn, world_size, *args)` runs fn(rank, world_size, *args) on forked local gloo ranks.
"""

from parallel.distributed.checkpoint import load_checkpoint, save_checkpoint
from parallel.distributed.engine import DistributedTrainer, num_label_tokens, summed_ce
from parallel.distributed.launch import launch
from parallel.distributed.mesh import ParallelDims, check_layout, check_model_layout

__all__ = [
    "DistributedTrainer",
    "ParallelDims",
    "check_layout",
    "check_model_layout",
    "launch",
    "load_checkpoint",
    "num_label_tokens",
    "save_checkpoint",
    "summed_ce",
]
