"""Parallel degrees for one run: validation against the world size and the model, and the DeviceMesh.

The mesh always has the four named axes (pp, dp_replicate, dp_shard, tp), size-1 axes included, so
code never branches on which axes exist; `dp` is the flattened (dp_replicate, dp_shard) axis.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallel.dims import ParallelConfig

AXES = ("pp", "dp_replicate", "dp_shard", "tp")
MODES = ("full", "lora", "qlora")


def check_layout(cfg: ParallelConfig, mode: str, quantized: bool = False) -> list[str]:
    """Problems with a layout for a training mode, as 'parallel.<field>: message' lines (empty: fine)."""
    if mode not in MODES:
        return [f"mode: {mode!r} is not one of {list(MODES)}"]
    problems = []
    quantized = quantized or mode == "qlora"
    if cfg.zero >= 2 and cfg.dp_shard == 1:
        problems.append(
            f"parallel.zero: ZeRO-{cfg.zero} shards parameters over parallel.dp_shard, "
            "which is 1 (raise dp_shard or use zero 0/1)"
        )
    if cfg.zero == 1 and cfg.dp == 1:
        problems.append(
            "parallel.zero: ZeRO-1 shards optimizer state over data-parallel ranks, but "
            "dp_replicate x dp_shard is 1 (use zero: 0)"
        )
    if cfg.pp > 1 and cfg.microbatches < cfg.pp:
        problems.append(
            f"parallel.microbatches: {cfg.microbatches} micro-batches cannot fill "
            f"{cfg.pp} pipeline stages (use at least {cfg.pp})"
        )
    if cfg.pp > 1 and cfg.pp_schedule in ("interleaved_1f1b", "zero_bubble") and cfg.microbatches % cfg.pp:
        problems.append(
            f"parallel.microbatches: the {cfg.pp_schedule} schedule needs a multiple of "
            f"parallel.pp ({cfg.pp}), got {cfg.microbatches}"
        )
    if cfg.compile and cfg.tp > 1:
        problems.append(
            "parallel.compile: torch.compile of tensor-parallel blocks fails in backward (or, with "
            "sequence parallelism, gives wrong gradients) on this torch; use compile: false with tp > 1"
        )
    if quantized and cfg.tp > 1:
        problems.append(
            "parallel.tp: 4-bit quantized (QLoRA) base weights cannot be tensor-sharded; "
            "use tp: 1 and scale with dp_replicate/dp_shard"
        )
    if quantized and cfg.pp > 1:
        problems.append(
            "parallel.pp: pipeline stages of a 4-bit quantized (QLoRA) base are not supported "
            "yet; use pp: 1 and scale with dp_replicate/dp_shard"
        )
    if quantized and cfg.zero >= 2:
        problems.append(
            "parallel.zero: 4-bit quantized (QLoRA) base weights cannot be sharded by FSDP here; use zero 0 or 1"
        )
    return problems


def num_virtual_stages(cfg: ParallelConfig) -> int:
    """Pipeline stages in total: interleaved schedules hold two stages per pp rank."""
    if cfg.pp == 1:
        return 1
    return cfg.pp * (2 if cfg.pp_schedule in ("interleaved_1f1b", "zero_bubble") else 1)


def check_model_layout(
    cfg: ParallelConfig, *, num_layers: int, num_heads: int, num_kv_heads: int, tied_embeddings: bool
) -> list[str]:
    """Problems of a layout for one model's shape."""
    problems = []
    if num_kv_heads % cfg.tp or num_heads % cfg.tp:
        problems.append(
            f"parallel.tp: {cfg.tp} must divide the model's {num_heads} attention heads and {num_kv_heads} KV heads"
        )
    stages = num_virtual_stages(cfg)
    if stages > num_layers:
        problems.append(
            f"parallel.pp: {stages} pipeline stages ({cfg.pp_schedule}) but the model has only {num_layers} layers"
        )
    if cfg.pp > 1 and tied_embeddings:
        problems.append(
            "parallel.pp: the model ties lm_head to the input embedding, which would live "
            "on two pipeline stages; use pp: 1"
        )
    return problems


@dataclass(frozen=True)
class ParallelDims:
    """Validated degrees of one run."""

    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        if cfg.world_size != world_size:
            raise ValueError(
                f"parallel: dp_replicate={cfg.dp_replicate} x dp_shard={cfg.dp_shard} x pp={cfg.pp} x "
                f"tp={cfg.tp} = {cfg.world_size}, but {world_size} processes were started"
            )
        return cls(cfg.pp, cfg.dp_replicate, cfg.dp_shard, cfg.tp)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    def build_mesh(self, device_type: str = "cpu"):
        """The 4-axis mesh (plus the flattened `dp` axis) over an initialised default process group."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.tp), mesh_dim_names=AXES)
        dp_mesh(mesh)
        return mesh


def dp_mesh(mesh):
    """The flattened (dp_replicate, dp_shard) axis; created once, then returned from the mesh's cache."""
    return mesh["dp_replicate", "dp_shard"]._flatten("dp")


def dp_rank(mesh) -> int:
    """This rank's index among data-parallel ranks: which slice of the global batch it takes."""
    return dp_mesh(mesh).get_local_rank()


def fsdp_mesh(mesh, dims: ParallelDims):
    """The mesh FSDP2 shards over: dp_shard, or (dp_replicate, dp_shard) for hybrid sharding."""
    if dims.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]
