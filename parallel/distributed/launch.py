"""Run a function on N local ranks: forked after the parent's imports, gloo process group, results back.

Forking after `import torch, transformers` skips each rank's ~4 s of imports. The parent must not have
started a process group before calling `launch`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import socket
import traceback
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank: int, world_size: int, port: int, queue, args, threads: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Without a barrier gloo sometimes aborts a rank that exits while a peer still talks to it.
        dist.barrier()
        dist.destroy_process_group()
        queue.put((rank, True, result))
    except BaseException:  # report any failure to the parent instead of hanging it
        queue.put((rank, False, traceback.format_exc()))


def launch(
    fn: Callable[..., Any], world_size: int, *args, timeout: float = 300.0, threads_per_rank: int = 1
) -> list[Any]:
    """fn(rank, world_size, *args) on world_size forked ranks; returns the results in rank order.

    fn's result must be picklable. Raises RuntimeError with the first failing rank's traceback.
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, port, queue, args, threads_per_rank), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failed = True
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = queue.get(timeout=timeout)
            except queue_mod.Empty:
                raise RuntimeError(
                    f"ranks {sorted(set(range(world_size)) - set(results))} of {world_size} "
                    f"sent no result within {timeout:.0f} s"
                ) from None
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            results[rank] = value
        failed = False
    finally:
        for p in procs:
            p.join(timeout=1 if failed else 30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
