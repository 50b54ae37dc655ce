"""`auto` in parallel.compile, parallel.activation_checkpointing and parallel.fused_optimizer, resolved per
device by one function (`resolve_defaults`): the stage's start, the Trainer and `hpcft plan` all call it.

The rules pick only choices that leave the numbers unchanged beyond rounding, and take the faster one where
it was measured: on CPU by `python -m bench.defaults` (README "Defaults"), on CUDA from the documented
baseline (../shared/notes/gpu-baseline.md: whole-model compile 1.22x tokens/s at 0.71x memory on an H200;
fused AdamW is what HF Trainer's bf16 path uses) until `python -m bench.defaults --device cuda` measures them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from parallel.dims import ParallelConfig

AUTO = "auto"
FIELDS = ("compile", "activation_checkpointing", "fused_optimizer")
CHECKPOINTING = ("none", "selective", "full")  # least recompute first
HEADROOM = 0.9  # the share of device memory a stage may plan to use (planner.memory_warnings' default)


@dataclass(frozen=True)
class Defaults:
    """A config with no `auto` left, and why each `auto` field got its value."""

    config: ParallelConfig
    why: dict[str, str]

    def used(self) -> dict:
        """The values the run used, for its result.json and MLflow params."""
        return {name: getattr(self.config, name) for name in FIELDS}

    def lines(self) -> list[str]:
        """One line per field that was `auto`, e.g. `compile: auto -> off (cpu: ...)`."""
        return [f"{name}: auto -> {_show(getattr(self.config, name))} ({why})" for name, why in self.why.items()]


def _show(value) -> str:
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else str(value)


def resolve_defaults(
    cfg: ParallelConfig,
    device_type: str,
    *,
    mode: str = "full",
    optimizer: str = "adamw",
    samples: bool = False,
    device_bytes: int | None = None,
    per_rank_bytes: Callable[[ParallelConfig], int] | None = None,
) -> Defaults:
    """`cfg` with every `auto` field resolved for `device_type` ("cuda", "cpu", "meta"); explicit values stay.

    mode: full | lora | qlora. optimizer: optim.optimizer (fused applies to torch's AdamW). samples: the stage
    generates from its model (ppo, grpo). device_bytes and per_rank_bytes (the planner's per-rank estimate
    of a layout): activation checkpointing is switched on only when the stage would not fit without it.
    Idempotent: a resolved config comes back unchanged."""
    why: dict[str, str] = {}
    update: dict = {}
    if cfg.compile == AUTO:
        update["compile"], why["compile"] = _compile(cfg, device_type, mode, samples)
    if cfg.fused_optimizer == AUTO:
        update["fused_optimizer"], why["fused_optimizer"] = _fused(cfg, device_type, optimizer)
    if cfg.activation_checkpointing == AUTO:
        resolved = cfg.model_copy(update=update)
        update["activation_checkpointing"], why["activation_checkpointing"] = _checkpointing(
            resolved, device_type, device_bytes, per_rank_bytes
        )
    return Defaults(cfg.model_copy(update=update) if update else cfg, why)


def _compile(cfg: ParallelConfig, device_type: str, mode: str, samples: bool) -> tuple[bool, str]:
    if device_type != "cuda":
        return False, f"{device_type}: inductor's CPU code generation costs minutes, steady steps gain little"
    if cfg.engine != "native":
        return False, "compiled blocks run on parallel.engine: native"
    if cfg.tp > 1:
        return False, "tensor-parallel blocks are not compiled (parallel.layout refuses it)"
    if mode == "qlora":
        return False, "bitsandbytes 4-bit layers break the compiled graph"
    if samples:
        return False, "a stage that samples runs its blocks at every sequence length"
    return True, "cuda: per-block torch.compile, HF+compile measured 1.22x tokens/s at 0.71x memory on H200"


def _fused(cfg: ParallelConfig, device_type: str, optimizer: str) -> tuple[bool, str]:
    if device_type != "cuda":
        # Faster on CPU too (bench.defaults), but not bitwise the default kernel: a 4-step reward-model
        # run (tests/training/test_golden.py) moves 2e-4, so CPU runs keep the default's numbers.
        return False, f"{device_type}: faster, but not bitwise the default kernel (the golden losses would move)"
    if optimizer != "adamw":
        return False, f"optim.optimizer {optimizer} has its own kernels"
    if cfg.engine != "native":
        return False, "DeepSpeed builds its own AdamW (fused on CUDA)"
    if cfg.zero >= 2 or cfg.tp > 1:
        return False, "sharded parameters (ZeRO-2/3, tp) are DTensors, which take torch's default kernel"
    return True, "cuda, plain tensors: the fused AdamW kernel (what HF Trainer's bf16 path uses)"


def _checkpointing(
    cfg: ParallelConfig,
    device_type: str,
    device_bytes: int | None,
    per_rank_bytes: Callable[[ParallelConfig], int] | None,
) -> tuple[str, str]:
    if device_type != "cuda":
        return "none", f"{device_type}: recomputing costs time and host memory is not the limit"
    if device_bytes is None or per_rank_bytes is None:
        return "none", "cuda: no memory estimate to say it does not fit"
    limit = HEADROOM * device_bytes
    for mode in CHECKPOINTING:
        need = per_rank_bytes(cfg.model_copy(update={"activation_checkpointing": mode}))
        if need <= limit:
            fits = f"planned {need / 2**30:.1f} GiB per rank fits {HEADROOM:.0%} of {device_bytes / 2**30:.0f} GiB"
            return mode, fits if mode == "none" else f"{fits} only with it"
    return "full", f"planned {need / 2**30:.1f} GiB per rank exceeds the device even with full recompute"
