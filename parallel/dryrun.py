"""Layouts at real scale without the hardware: build a model on the meta device, lay it out with the
engine's own `parallelize` for one rank of a fake world (torch's fake process group: no peers, no
communication) and compare the weights, gradients and optimizer state that rank holds with what
parallel.planner plans for it, byte for byte.

What is measured on the rank: every parameter's local shard (DTensor local shapes; a pipeline rank's
stage modules), in its dtype; a gradient per trainable shard in the same dtype (no backward runs here: that
is what the Trainer holds after backward, which tests/parallel/test_dryrun_measured.py checks on real
ranks); AdamW's state after one step on zero gradients (exp_avg, exp_avg_sq; the 4-byte step
counters are not counted), built as the Trainer builds its optimizers (ZeRO-1: only the parameters
partition_params gives this dp rank). The ranks checked are tp rank 0 and dp rank 0 of the first, a middle
and the last pipeline stage: they hold the largest torch.chunk pieces, the size FSDP2 pads every rank to.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from parallel.dims import LoraConfig, ParallelConfig
from parallel.planner import ModelState, Shape, model_state

# config.json values of the published checkpoints (meta-llama/Meta-Llama-3-8B, -70B, Qwen/Qwen2.5-72B).
SHAPES: dict[str, dict] = {
    "llama-3-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        hidden_act="silu",
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        attention_bias=False,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-3-70b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        hidden_act="silu",
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        attention_bias=False,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "qwen2.5-72b": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=8192,
        intermediate_size=29568,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        hidden_act="silu",
        max_position_embeddings=131072,
        max_window_layers=80,
        sliding_window=131072,
        use_sliding_window=False,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151643,
    ),
}


def load_config(model: str | Path) -> dict:
    """A named shape (SHAPES) or a model directory's config.json."""
    if str(model) in SHAPES:
        return dict(SHAPES[str(model)])
    path = Path(model).expanduser() / "config.json"
    if not path.is_file():
        raise ValueError(f"--dry-run-layout: {model} is neither a named shape {sorted(SHAPES)} nor a model dir")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class RankCheck:
    """Planned against actual bytes on one rank."""

    kind: str  # first | middle | last pipeline stage, or "all" at pp = 1
    rank: int
    pp_rank: int
    planned: ModelState
    actual: ModelState

    @property
    def ok(self) -> bool:
        return all(getattr(self.planned, k) == getattr(self.actual, k) for k in ("params", "grads", "optimizer"))


def ranks_to_check(parallel: ParallelConfig) -> list[tuple[str, int, int]]:
    """(kind, global rank, pp rank) of tp rank 0, dp rank 0 on the first, a middle and the last stage.
    The mesh is (pp, dp_replicate, dp_shard, tp), row-major: a pp rank's ranks are one contiguous block."""
    block = parallel.dp * parallel.tp
    if parallel.pp == 1:
        return [("all", 0, 0)]
    kinds = [("first", 0)] + ([("middle", parallel.pp // 2)] if parallel.pp > 2 else []) + [("last", parallel.pp - 1)]
    return [(kind, pp_rank * block, pp_rank) for kind, pp_rank in kinds]


@contextmanager
def fake_world(rank: int, world_size: int):
    """torch.distributed initialised as `rank` of a fake world of `world_size` (collectives do nothing)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a dry run needs a process without a torch.distributed world (run it in a fresh one)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def meta_model(config: dict, mode: str = "full", lora: LoraConfig | None = None):
    """The HF causal LM of `config` on the meta device, fp32 like the engine's master weights (LoRA-wrapped
    for modes lora / qlora: the 4-bit base itself cannot be built on meta, its shapes can)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "dtype")}
    hf_config = AutoConfig.for_model(values.pop("model_type", "llama"), **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    if mode == "full":
        return model
    from parallel.engine import apply_lora

    return apply_lora(model, lora or LoraConfig())


def actual_state(
    config: dict, parallel: ParallelConfig, rank: int, *, mode: str, lora: LoraConfig | None
) -> ModelState:
    """What `rank` holds after the engine's parallelize, and AdamW's state after one step."""
    import torch
    from torch.distributed.tensor import DTensor

    from parallel.distributed import zero as zero_mod
    from parallel.distributed.mesh import dp_rank
    from parallel.trainer import build_adamw, build_mesh, parallelize

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    def nbytes(tensors) -> int:
        return sum(local(t).numel() * local(t).element_size() for t in tensors)

    with fake_world(rank, parallel.world_size):
        mesh = build_mesh(parallel, parallel.world_size)
        layout = parallelize(meta_model(config, mode, lora), parallel, mesh, torch.device("meta"))
        params = [p for part in layout.parts for p in part.parameters()]
        trainable = [p for p in params if p.requires_grad]
        if parallel.zero == 1:  # as Trainer._build_optimizers: this dp rank's share
            owners = zero_mod.partition_params(trainable, parallel.dp)
            owned = [p for p, owner in zip(trainable, owners) if owner == dp_rank(mesh)]
        else:
            owned = trainable
        for p in trainable:
            p.grad = torch.zeros_like(p)
        optimizer = build_adamw(owned, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
        state = []
        if optimizer is not None:
            optimizer.step()
            state = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
        return ModelState(params=nbytes(params), grads=nbytes(p.grad for p in trainable), optimizer=nbytes(state))


def dry_run(
    config: dict, parallel: ParallelConfig, *, mode: str = "full", lora: LoraConfig | None = None
) -> list[RankCheck]:
    """Planned against actual state on the ranks of ranks_to_check. ValueError: the engine refuses the
    layout (the layout check's message, as a training run would stop with it)."""
    from parallel.layout import check_layout

    if mode == "qlora":
        raise ValueError("mode: a 4-bit (QLoRA) base cannot be built on the meta device; dry-run mode lora instead")
    check_layout(parallel, mode=mode, world=parallel.world_size, model_config=config)
    lora = lora or LoraConfig()
    shape = Shape.from_config(config)
    checks = []
    for kind, rank, pp_rank in ranks_to_check(parallel):
        planned, _ = model_state(
            shape, parallel, pp_rank, dp_rank=0, mode=mode, lora_r=lora.r, lora_targets=lora.target_modules
        )
        actual = actual_state(config, parallel, rank, mode=mode, lora=lora)
        checks.append(RankCheck(kind, rank, pp_rank, planned, actual))
    return checks


def describe(parallel: ParallelConfig) -> str:
    return (
        f"dp_replicate={parallel.dp_replicate} dp_shard={parallel.dp_shard} pp={parallel.pp} tp={parallel.tp} "
        f"zero={parallel.zero} ({parallel.world_size} ranks)"
    )


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"


def table(checks: list[RankCheck]) -> list[str]:
    """One line per rank kind: planned / actual size of params, grads and optimizer state, and OK or MISMATCH
    (with the byte differences)."""
    lines = [f"{'stage':<7}{'rank':>6}{'pp':>4}  {'params':^23}  {'grads':^23}  {'optimizer':^23}"]
    for c in checks:
        cells = []
        for key in ("params", "grads", "optimizer"):
            p, a = getattr(c.planned, key), getattr(c.actual, key)
            cells.append(f"{_size(p):>11}/{_size(a):<11}")
        verdict = (
            "OK"
            if c.ok
            else "MISMATCH "
            + ", ".join(
                f"{k} {getattr(c.planned, k) - getattr(c.actual, k):+d} B"
                for k in ("params", "grads", "optimizer")
                if getattr(c.planned, k) != getattr(c.actual, k)
            )
        )
        lines.append(f"{c.kind:<7}{c.rank:>6}{c.pp_rank:>4}  {'  '.join(cells)}  {verdict}")
    return lines
