"""Distributed checkpoints (torch.distributed.checkpoint) of a training state, resumable under any layout.

Keys are global parameter names (stage modules keep them), optimizer state is flattened per
parameter name, and DCP reshards on load, so a checkpoint saved at tp2 x dp2 loads at pp2 or in one
process (a Trainer over the mesh of ones) and back. Only trainable parameters are saved: frozen ones (a
LoRA/QLoRA base) come from the model directory on every start.
Also saved: the step count, every rank's RNG state (restored
per rank when the world size is the same, rank 0's otherwise), and a caller's JSON-able `extra` dict
(e.g. the data position).
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from parallel.engine import barrier, rank_and_world

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=True)
# Loading sets the trainable parameters only (DCP already failed on any of them missing from the checkpoint).
LOAD_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=True, strict=False)
EXTRA_FILE = "trainer_extra.json"


@contextmanager
def _quiet_single_process():
    """DCP warns on every one-process save/load that it assumes one process, which is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _state(trainer) -> tuple[list[dict], list[dict | None]]:
    models = [get_model_state_dict(part, options=OPTIONS) for part in trainer.parts]
    optims = [
        None if opt is None else get_optimizer_state_dict(part, opt, options=OPTIONS)
        for part, opt in zip(trainer.parts, trainer.optimizers)
    ]
    return models, optims


def _merged(models: list[dict], optims: list[dict | None], trainer) -> dict:
    """One DCP state dict; parts never share keys because names are global."""
    state = {"trainer": {"step": torch.tensor(trainer.step), "rng": torch.get_rng_state()}}
    for sd in models:
        state.update({f"model.{k}": v for k, v in sd.items()})
    for sd in optims:
        state.update({f"optim.{k}": v for k, v in (sd or {}).items()})
    return state


def _rng_file(path: Path, rank: int, world: int) -> Path:
    return path / "rng" / f"rank-{rank}-of-{world}.pt"


def save_checkpoint(trainer, path: Path, extra: dict | None = None) -> Path:
    """Collective under torch.distributed: every rank calls it with the same path."""
    path = Path(path)
    models, optims = _state(trainer)
    with _quiet_single_process():
        dcp.save(_merged(models, optims, trainer), checkpoint_id=str(path))
    rank, world = rank_and_world()
    # Each rank's own RNG (ranks that sampled different amounts of randomness differ), for an exact
    # continuation when the checkpoint resumes with the same number of ranks.
    _rng_file(path, rank, world).parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
        _rng_file(path, rank, world),
    )
    if rank == 0:
        (path / EXTRA_FILE).write_text(json.dumps(extra or {}))
    barrier()
    return path


def load_checkpoint(trainer, path: Path) -> dict:
    """Collective: restore model, optimizer, step and RNG in place; returns the saved `extra`."""
    path = Path(path)
    models, optims = _state(trainer)  # templates: DCP loads into them in place, resharding as needed
    state = _merged(models, optims, trainer)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path))
    for part, opt, model_sd, optim_sd in zip(trainer.parts, trainer.optimizers, models, optims):
        set_model_state_dict(part, {k: state[f"model.{k}"] for k in model_sd}, options=LOAD_OPTIONS)
        if opt is not None:
            set_optimizer_state_dict(part, opt, {k: state[f"optim.{k}"] for k in optim_sd}, options=LOAD_OPTIONS)
    trainer.step = int(state["trainer"]["step"])
    own = _rng_file(path, *rank_and_world())
    if own.is_file():  # same number of ranks: each its own RNG; otherwise rank 0's for all
        rng = torch.load(own, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        torch.set_rng_state(state["trainer"]["rng"])
    scheduler = getattr(trainer, "scheduler", None)
    if scheduler is not None:  # a step-indexed schedule (LambdaLR): put it, and the lrs, at the step
        scheduler.last_epoch = trainer.step - 1
        scheduler.step()
    return json.loads((path / EXTRA_FILE).read_text())
