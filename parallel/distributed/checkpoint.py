"""Distributed checkpoints (torch.distributed.checkpoint) of a training state, resumable under any layout.

Keys are global parameter names (stage modules keep them), optimizer state is flattened per
parameter name, and DCP reshards on load, so a checkpoint saved at tp2 x dp2 loads at pp2 or in one
process (a Trainer over the mesh of ones) and back. Only trainable parameters are saved: frozen ones (a
LoRA/QLoRA base) come from the model directory on every start. A tied weight (lm_head = the input
embedding) is stored once, under the embedding's name: under pp the last stage's copy (named lm_head) saves
to and loads from that key (with its optimizer state), and one process's state dict drops its alias.
Also saved: the step count, every rank's RNG state (restored
per rank when the world size is the same, rank 0's otherwise), and a caller's JSON-able `extra` dict
(e.g. the data position).
Every file is fsynced (DCP's own with sync_files, the RNG and extra files here) and so are the directories
holding them, so a step whose completion record (training.resume) says it is complete still is after a node
crash. A write that fails on any rank (a full disk) raises the same OSError on every rank.
"""

from __future__ import annotations

import errno
import io
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from parallel.engine import all_gather_object, from_rank0, rank_and_world

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=True)
# Loading sets the trainable parameters only (DCP already failed on any of them missing from the checkpoint).
LOAD_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=True, strict=False)
EXTRA_FILE = "trainer_extra.json"


class ResumeRefused(RuntimeError):
    """A checkpoint that is sound but cannot resume this run (e.g. another engine's layout); resuming stops
    with its one-line message instead of skipping to an older step."""


@contextmanager
def _quiet_single_process():
    """DCP warns on every one-process save/load that it assumes one process, which is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _state(trainer) -> tuple[list[dict], list[dict | None]]:
    """Each part's model and optimizer state dicts, keyed as stored (see _stored_key)."""
    models, optims, _ = _state_and_keys(trainer)
    return models, optims


def _state_and_keys(trainer) -> tuple[list[dict], list[dict | None], list[tuple[dict, dict]]]:
    """_state's dicts and, per part, {stored key: the part's own key} of its model and optimizer dicts."""
    names = getattr(trainer, "tied_names", None)
    models, optims, keys = [], [], []
    for part, opt in zip(trainer.parts, trainer.optimizers):
        model_sd, model_keys = _stored(get_model_state_dict(part, options=OPTIONS), names)
        optim_sd, optim_keys = (
            (None, {}) if opt is None else _stored(get_optimizer_state_dict(part, opt, options=OPTIONS), names)
        )
        models.append(model_sd)
        optims.append(optim_sd)
        keys.append((model_keys, optim_keys))
    return models, optims, keys


def _stored_key(key: str, names: tuple[str, str] | None) -> str:
    """A state dict key as stored: a tied lm_head's weight (model key, or the `state.<name>.<...>` and
    `param_groups.<name>.<...>` keys of a flattened optimizer state) under the embedding's name."""
    if names is None:
        return key
    embed, head = names
    if key == head:
        return embed
    for prefix in ("state.", "param_groups."):
        if key.startswith(prefix + head + "."):
            return prefix + embed + key[len(prefix + head) :]
    return key


def _stored(state: dict, names: tuple[str, str] | None) -> tuple[dict, dict]:
    """(`state` keyed as stored, {stored key: own key}); where one part holds both names of a tied weight
    (pp = 1) they are the one tensor, kept once."""
    out, own = {}, {}
    for key, value in state.items():
        stored = _stored_key(key, names)
        if stored not in out:
            out[stored], own[stored] = value, key
    return out, own


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


def write_rng(path: Path) -> Path:
    """This rank's CPU (and CUDA) RNG state under path/rng/, fsynced; returns the file (its directory's
    entry is the caller's to sync)."""
    rng_file = _rng_file(path, *rank_and_world())
    rng_file.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(
        {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
        buffer,
    )
    write_synced(rng_file, buffer.getvalue())
    return rng_file


def restore_rng(path: Path) -> bool:
    """Restore this rank's RNG from write_rng's file; False when there is none for this rank and world."""
    own = _rng_file(path, *rank_and_world())
    if not own.is_file():
        return False
    rng = torch.load(own, weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return True


def write_synced(path: Path, data: bytes) -> None:
    """Write a file and fsync it (its directory entry is the caller's: fsync_dir)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:  # a filesystem that cannot sync a directory (it then needs none)
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data` all at once (a temporary file renamed over it), durably."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_synced(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def failure(exc: BaseException) -> tuple[int | None, BaseException]:
    """(rank, exception) of what went wrong in a save or load: DCP reports its ranks' failures gathered in
    one CheckpointException (the same on every rank); the lowest rank's is the one returned."""
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, (first, _trace) = min(exc.failures.items(), key=lambda item: item[0])
        return rank, first
    return None, exc


def _os_cause(exc: BaseException | None) -> OSError | None:
    """The OSError an exception was raised from or while handling, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _probe_write(path: Path, nbytes: int = 1 << 20) -> OSError | None:
    """The OSError (ENOSPC, EDQUOT, EROFS, EIO, ...) writing one more fsynced MiB next to `path` gives, if
    any: what a failed save that did not say why ran into."""
    directory = next((p for p in [path, *path.parents] if p.is_dir()), None)
    if directory is None:
        return None
    probe = directory / f".write-probe-{os.getpid()}.tmp"
    try:
        write_synced(probe, os.urandom(nbytes))  # not zeros, which a compressing filesystem would not store
        return None
    except OSError as err:
        return err
    finally:
        probe.unlink(missing_ok=True)


def state_nbytes(trainer) -> int:
    """The bytes of the state save_checkpoint writes for `trainer` (global tensor sizes, as this rank sees
    them: under pp a rank sees its own stages only), to say what a save needs."""
    if hasattr(trainer, "state_nbytes"):  # another engine's own format (parallel.deepspeed_engine)
        return trainer.state_nbytes()
    models, optims = _state(trainer)
    return sum(
        v.numel() * v.element_size()
        for sd in [*models, *(o or {} for o in optims)]
        for v in sd.values()
        if isinstance(v, torch.Tensor)
    )


def save_checkpoint(trainer, path: Path, extra: dict | None = None) -> Path:
    """Collective under torch.distributed: every rank calls it with the same path. Every file written is
    fsynced, and so are the directories this rank wrote into. An OSError on any rank (e.g. ENOSPC) is
    raised on every rank, so they leave together."""
    if hasattr(trainer, "save_state"):  # another engine's own format (parallel.deepspeed_engine)
        return trainer.save_state(Path(path), extra)
    path = Path(path)
    models, optims = _state(trainer)
    try:
        with _quiet_single_process():
            dcp.save(_merged(models, optims, trainer), checkpoint_id=str(path))
    except CheckpointException as exc:  # raised on every rank, holding each failed rank's exception
        failed_rank, first = failure(exc)
        # torch.save's zip writer turns a full disk into "RuntimeError: ... unexpected pos"; the OSError is
        # only in its context, and only on the rank that failed (pickling drops it). Rank 0 looks there, or
        # else asks the filesystem itself, and every rank raises what it found, without DCP's pages of
        # every rank's traceback (one line of them stays as a note).
        found = first if isinstance(first, OSError) else None
        if found is None:
            found = from_rank0((_os_cause(first) or _probe_write(path)) if rank_and_world()[0] == 0 else None)
        if found is None:
            raise
        found.add_note(f"DCP save failed on rank {failed_rank}: {type(first).__name__}: {first}")
        raise found from None
    rank = rank_and_world()[0]
    error = None
    try:
        # Each rank's own RNG (ranks that sampled different amounts of randomness differ), for an exact
        # continuation when the checkpoint resumes with the same number of ranks.
        rng_file = write_rng(path)
        if rank == 0:
            write_synced(path / EXTRA_FILE, json.dumps(extra or {}).encode())
        fsync_dir(rng_file.parent)
        fsync_dir(path)  # this rank's DCP shards and, on rank 0, .metadata and the extra file
    except OSError as err:
        error = err
    errors = [e for e in all_gather_object(error) if e is not None]  # also the barrier before returning
    if errors:
        raise errors[0]
    return path


def load_checkpoint(trainer, path: Path) -> dict:
    """Collective: restore model, optimizer, step and RNG in place; returns the saved `extra`."""
    if hasattr(trainer, "load_state"):  # another engine's own format (parallel.deepspeed_engine)
        return trainer.load_state(Path(path))
    path = Path(path)
    # templates: DCP loads into them in place, resharding as needed
    models, optims, keys = _state_and_keys(trainer)
    state = _merged(models, optims, trainer)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path))
    for part, opt, model_sd, optim_sd, (model_keys, optim_keys) in zip(
        trainer.parts, trainer.optimizers, models, optims, keys
    ):
        set_model_state_dict(part, {model_keys[k]: state[f"model.{k}"] for k in model_sd}, options=LOAD_OPTIONS)
        if opt is not None:
            optim_state = {optim_keys[k]: state[f"optim.{k}"] for k in optim_sd}
            set_optimizer_state_dict(part, opt, optim_state, options=LOAD_OPTIONS)
    trainer.step = int(state["trainer"]["step"])
    if not restore_rng(path):  # same number of ranks: each its own RNG; otherwise rank 0's for all
        torch.set_rng_state(state["trainer"]["rng"])
    scheduler = getattr(trainer, "scheduler", None)
    if scheduler is not None:  # a step-indexed schedule (LambdaLR): put it, and the lrs, at the step
        scheduler.last_epoch = trainer.step - 1
        scheduler.step()
    return json.loads((path / EXTRA_FILE).read_text())
