"""Rendezvous for multi-process jobs: derive the torch.distributed world from Slurm or submitit's local
executor, agree on it before training, and fail with a clear message (never hang) when ranks disagree."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import zlib
from dataclasses import asdict, dataclass


class RendezvousError(RuntimeError):
    pass


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    job_id: str

    def export(self) -> None:
        os.environ.update(
            RANK=str(self.rank),
            LOCAL_RANK=str(self.local_rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            GROUP_RANK=str(self.node_rank),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def job_port(job_id: str, base: int = 20000, span: int = 30000) -> int:
    """A port unique to the job (stable across its ranks), so concurrent jobs on a node do not clash."""
    return base + zlib.crc32(str(job_id).encode()) % span


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list, e.g. 'node[3-5,9]' -> 'node3', via scontrol when present."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rng = head.split("[", 1)
        return prefix + rng.rstrip("]").split(",")[0].split("-")[0]
    return head


def from_env(env: dict | None = None) -> World:
    """World from SLURM_* (srun/sbatch, submitit on Slurm) or SUBMITIT_LOCAL_* (local executor).

    Global rank is SLURM_PROCID (not SLURM_NODEID, which is the node index); the master is the first
    host of the job's node list, never 'localhost', so every node dials the same address.
    """
    env = dict(os.environ if env is None else env)
    if "SLURM_PROCID" in env and "SLURM_JOB_ID" in env:
        world = int(env.get("SLURM_NTASKS", "1"))
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        job = env.get("SLURM_ARRAY_JOB_ID", env["SLURM_JOB_ID"])
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else job_port(env["SLURM_JOB_ID"])
        return World(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            world_size=world,
            local_world_size=max(1, world // nodes),
            node_rank=int(env.get("SLURM_NODEID", "0")),
            num_nodes=nodes,
            master_addr=first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost"))),
            master_port=port,
            job_id=job,
        )
    if "SUBMITIT_LOCAL_GLOBALID" in env:
        world = int(env.get("SUBMITIT_LOCAL_NTASKS", "1"))
        job = env.get("SUBMITIT_LOCAL_JOB_ID", "0")
        return World(
            rank=int(env["SUBMITIT_LOCAL_GLOBALID"]),
            local_rank=int(env["SUBMITIT_LOCAL_LOCALID"]),
            world_size=world,
            local_world_size=world,
            node_rank=0,
            num_nodes=1,
            master_addr="127.0.0.1",
            master_port=int(env.get("MASTER_PORT", job_port(job))),
            job_id=job,
        )
    return World(0, 0, 1, 1, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT", 29500)), "local")


def init_distributed(world: World, timeout_s: int = 300) -> str:
    """Start the process group (nccl on GPU, gloo on CPU) and check that every rank sees the same world."""
    import torch
    import torch.distributed as dist

    world.export()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    try:
        dist.init_process_group(
            backend,
            rank=world.rank,
            world_size=world.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            init_method=f"tcp://{world.master_addr}:{world.master_port}",
        )
    except Exception as err:  # noqa: BLE001 - re-raised with what the user needs to check
        raise RendezvousError(
            f"rank {world.rank}/{world.world_size} on {socket.gethostname()} could not join "
            f"{world.master_addr}:{world.master_port} within {timeout_s}s ({type(err).__name__}: {err}); "
            "check that the master host resolves and the port is reachable from every node"
        ) from None
    check_agreement(world)
    return backend


def check_agreement(world: World) -> None:
    import torch.distributed as dist

    mine = asdict(world) | {"host": socket.gethostname()}
    views: list = [None] * world.world_size
    dist.all_gather_object(views, mine)
    keys = ("world_size", "master_addr", "master_port", "job_id", "num_nodes")
    for key in keys:
        values = {v[key] for v in views}
        if len(values) > 1:
            raise RendezvousError(f"ranks disagree on {key}: {sorted(map(str, values))}")
    ranks = sorted(v["rank"] for v in views)
    if ranks != list(range(world.world_size)):
        raise RendezvousError(f"ranks are not 0..{world.world_size - 1}: {ranks}")
