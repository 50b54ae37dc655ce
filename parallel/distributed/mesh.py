"""Parallel degrees for one run and the DeviceMesh (the layout rules live in parallel.layout).

The mesh always has the four named axes (pp, dp_replicate, dp_shard, tp), size-1 axes included, so
code never branches on which axes exist; `dp` is the flattened (dp_replicate, dp_shard) axis.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallel.dims import ParallelConfig
from parallel.layout import world_mismatch

AXES = ("pp", "dp_replicate", "dp_shard", "tp")


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
            raise ValueError(world_mismatch(cfg, world_size))
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
