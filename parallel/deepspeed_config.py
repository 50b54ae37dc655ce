"""The DeepSpeed config of a training run, from the recipe and, optionally, a user's ds_config JSON.

hpcft owns what decides a run's numerics and data: batch sizes, the optimizer and its hyperparameters, the
learning-rate schedule (hpcft sets the rate each update), precision, gradient clipping and the ZeRO stage.
Those come from the recipe; in a user's file each must be absent, "auto", or equal to the recipe's value, and
a different value is an error naming both (the recipe field and the file's key). Everything else in the file
(offload, bucket sizes, overlap, communication settings) passes through. "auto" means what it means in the
Hugging Face integration: hpcft's value for owned keys, and for the bucket sizes a size from the model's
hidden size (reduce_bucket_size h^2, stage3_prefetch_bucket_size 0.9 h^2,
stage3_param_persistence_threshold 10 h); an "auto" anywhere else is an error, since nothing would fill it.

No DeepSpeed import here: recipe validation uses it without the package's start-up cost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AUTO = "auto"
# Bucket sizes the HF integration derives from the model's hidden size when they are "auto".
SIZED = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}
# Parallelism DeepSpeed would run that hpcft lays out itself (or refuses) from parallel.*.
REFUSED = {
    "pipeline": "parallel.pp (pipeline parallelism runs on parallel.engine: native)",
    "tensor_parallel": "parallel.tp (tensor parallelism runs on parallel.engine: native)",
    "fp16": "parallel.mixed_precision (hpcft trains in bf16 or fp32; fp16 loss scaling is not offered)",
    "amp": "parallel.mixed_precision (hpcft trains in bf16 or fp32)",
}


@dataclass(frozen=True)
class Owned:
    """What the recipe decides for one training stage, in DeepSpeed's terms."""

    train_batch_size: int | None  # None: not known here (the check skips the batch keys)
    micro_batch: int | None
    grad_accum: int
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    grad_clip: float
    bf16: bool | None  # None: not known here (parallel.mixed_precision auto: bf16 on a GPU, fp32 on CPU)
    zero: int
    stage: str = "the stage"  # the recipe path of the stage's fields, e.g. "stages.sft"


class DeepSpeedConfigError(ValueError):
    """A user's ds_config that conflicts with the recipe or cannot be read (the message names both)."""


def read_user_config(path: str | Path) -> dict:
    """The JSON object in `path`; DeepSpeedConfigError naming parallel.deepspeed_config otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DeepSpeedConfigError(f"parallel.deepspeed_config: {path} does not exist") from None
    except (OSError, ValueError) as err:
        raise DeepSpeedConfigError(f"parallel.deepspeed_config: {path} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise DeepSpeedConfigError(f"parallel.deepspeed_config: {path} holds a {type(data).__name__}, not an object")
    return data


def _same(value: Any, ours: Any) -> bool:
    if isinstance(ours, float) or isinstance(value, float):
        try:
            return abs(float(value) - float(ours)) <= 1e-12 * max(1.0, abs(float(ours)))
        except (TypeError, ValueError):
            return False
    if isinstance(ours, tuple):
        return isinstance(value, (list, tuple)) and len(value) == len(ours) and all(map(_same, value, ours))
    return value == ours


def _enabled(section: Any) -> bool | str:
    if isinstance(section, dict):
        value = section.get("enabled", False)
        return value if value == AUTO else bool(value)
    return bool(section)


def conflicts(user: dict, owned: Owned, *, where: str = "ds_config") -> list[str]:
    """The owned keys of `user` that disagree with the recipe, as 'parallel.deepspeed_config: ...' lines."""
    out = []

    def clash(key: str, value: Any, field: str, ours: Any) -> None:
        out.append(
            f"parallel.deepspeed_config: {key} is {json.dumps(value)} in {where} but the recipe gives "
            f'{json.dumps(ours)} ({field}); remove it from the file or set it to "auto"'
        )

    def check(key: str, value: Any, field: str, ours: Any) -> None:
        if value != AUTO and ours is not None and not _same(value, ours):
            clash(key, value, field, ours)

    s = owned.stage
    check(
        "train_batch_size",
        user.get("train_batch_size", AUTO),
        f"{s}.batch_size",
        owned.train_batch_size,
    )
    check(
        "train_micro_batch_size_per_gpu",
        user.get("train_micro_batch_size_per_gpu", AUTO),
        f"{s}.batch_size / (data-parallel ranks x parallel.microbatches x {s}.grad_accum)",
        owned.micro_batch,
    )
    check(
        "gradient_accumulation_steps",
        user.get("gradient_accumulation_steps", AUTO),
        f"parallel.microbatches x {s}.grad_accum",
        owned.grad_accum,
    )
    check("gradient_clipping", user.get("gradient_clipping", AUTO), f"{s}.optim.grad_clip", owned.grad_clip)
    optimizer = user.get("optimizer")
    if isinstance(optimizer, dict):
        kind = str(optimizer.get("type", AUTO))
        params = optimizer.get("params") or {}
        decoupled = kind.lower() == "adamw" or (kind.lower() == "adam" and params.get("adam_w_mode", True) is True)
        if kind != AUTO and not decoupled:
            clash("optimizer.type", kind, "hpcft trains with AdamW (decoupled weight decay)", "AdamW")
        for key, field, ours in (
            ("lr", "optim.lr", owned.lr),
            ("betas", "optim.betas", owned.betas),
            ("eps", "optim.eps", owned.eps),
            ("weight_decay", "optim.weight_decay", owned.weight_decay),
        ):
            check(f"optimizer.params.{key}", params.get(key, AUTO), f"{s}.{field}", ours)
    scheduler = user.get("scheduler")
    if isinstance(scheduler, dict):
        concrete = {k: v for k, v in (scheduler.get("params") or {}).items() if v != AUTO}
        if concrete:
            key = sorted(concrete)[0]
            out.append(
                f"parallel.deepspeed_config: scheduler.params.{key} is {json.dumps(concrete[key])} in {where}, but "
                f"hpcft sets the learning rate each update from {s}.optim (lr, warmup_steps, min_lr_ratio); remove "
                'the scheduler from the file or set its params to "auto"'
            )
    bf16 = _enabled(user.get("bf16", user.get("bfloat16", {})))
    if owned.bf16 is not None and bf16 != AUTO and bf16 != owned.bf16 and ("bf16" in user or "bfloat16" in user):
        clash(
            "bf16.enabled",
            bf16,
            "parallel.mixed_precision (bf16 on a GPU unless fp32; fp32 on CPU unless bf16)",
            owned.bf16,
        )
    for key, field in REFUSED.items():
        section = user.get(key)
        if section is None or (key in ("fp16", "amp") and _enabled(section) in (False, AUTO)):
            continue
        if key in ("pipeline", "tensor_parallel") and isinstance(section, dict):
            size = section.get("autotp_size", section.get("tp_size", section.get("stages", 1)))
            if size in (1, AUTO, None):
                continue
        out.append(f"parallel.deepspeed_config: {key} in {where} is not taken; set {field}")
    zero = user.get("zero_optimization") or {}
    if isinstance(zero, dict):
        check("zero_optimization.stage", zero.get("stage", AUTO), "parallel.zero", owned.zero)
        for key, value in zero.items():
            if value == AUTO and key not in SIZED and key != "stage":
                out.append(
                    f'parallel.deepspeed_config: zero_optimization.{key} is "auto" in {where}, which only '
                    f"{', '.join(sorted(SIZED))} may be; give it a value"
                )
    for key, value in user.items():
        if value == AUTO and key not in (
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "gradient_clipping",
        ):
            out.append(f'parallel.deepspeed_config: {key} is "auto" in {where}, which nothing fills; give it a value')
    return out


def offload_section(device: str, nvme_path: str | None, *, pin_memory: bool = True) -> dict:
    section = {"device": device, "pin_memory": pin_memory}
    if device == "nvme":
        section["nvme_path"] = nvme_path
    return section


def build(
    owned: Owned,
    *,
    offload=None,
    user: dict | None = None,
    hidden_size: int | None = None,
    where: str = "ds_config",
) -> dict:
    """The DeepSpeed config: the user's pass-through keys, the recipe's owned values, the offload sections
    of parallel.offload, "auto" bucket sizes filled from hidden_size. DeepSpeedConfigError on a conflict.

    The optimizer is not in it: the engine hands DeepSpeed the optimizer it builds itself (AdamW, or
    DeepSpeed's CPU Adam when the optimizer state lives on the CPU), so weight-decay groups match native."""
    user = dict(user or {})
    problems = conflicts(user, owned, where=where)
    zero_user = dict(user.get("zero_optimization") or {})
    if offload is not None:
        for key, device in (("offload_optimizer", offload.optimizer), ("offload_param", offload.params)):
            if device == "none":
                continue
            mine = offload_section(device, offload.nvme_path, pin_memory=offload.pin_memory)
            theirs = zero_user.get(key)
            if isinstance(theirs, dict) and theirs.get("device", "none") not in ("none", device):
                problems.append(
                    f"parallel.deepspeed_config: zero_optimization.{key}.device is {json.dumps(theirs['device'])} "
                    f"in {where} but the recipe gives {json.dumps(device)} (parallel.offload); keep one of them"
                )
            zero_user[key] = {**(theirs if isinstance(theirs, dict) else {}), **mine}
    if problems:
        raise DeepSpeedConfigError("; ".join(problems))
    for key in ("optimizer", "scheduler", "fp16", "amp", "bfloat16"):
        user.pop(key, None)
    for key, size in SIZED.items():
        if zero_user.get(key) == AUTO:
            if hidden_size is None:
                zero_user.pop(key)
            else:
                zero_user[key] = size(hidden_size)
    zero_user["stage"] = owned.zero
    micro = owned.micro_batch or 1
    config = {
        **user,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": owned.grad_accum,
        "gradient_clipping": owned.grad_clip,
        "bf16": {"enabled": owned.bf16},
        "zero_optimization": zero_user,
    }
    config.pop("train_batch_size", None)  # DeepSpeed derives it from the two above and the world size
    config.setdefault("steps_per_print", 2**31 - 1)  # hpcft prints its own step lines
    config.setdefault("wall_clock_breakdown", False)
    return config


def offloaded(config: dict) -> tuple[str, str]:
    """(optimizer, params) offload devices of a built config ('none' when on the accelerator)."""
    zero = config.get("zero_optimization") or {}

    def device(key: str) -> str:
        section = zero.get(key)
        return str(section.get("device", "none")) if isinstance(section, dict) else "none"

    return device("offload_optimizer"), device("offload_param")
