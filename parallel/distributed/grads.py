"""Gradient norm and clipping by the true global norm over every parallel axis."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def _sharded_axes(grad: torch.Tensor) -> tuple[str, ...]:
    """Mesh axes a gradient is split over (its squared sum must be added up across them)."""
    if not isinstance(grad, DTensor):
        return ()
    assert not any(p.is_partial() for p in grad.placements), "gradients are reduced before clipping"
    names = grad.device_mesh.mesh_dim_names
    # Not isinstance(p, Shard): FSDP over TP uses _StridedShard, which is no Shard subclass.
    return tuple(sorted(names[i] for i, p in enumerate(grad.placements) if not p.is_replicate()))


def global_grad_norm(params: list[nn.Parameter], mesh, pp_group=None, counted_elsewhere=()) -> torch.Tensor:
    """L2 norm of all gradients of the model, whichever rank or shard holds them.

    Squared sums are grouped by the axes they are sharded over, reduced once per group, then summed
    over pipeline stages (which hold disjoint parameters, except the copies of a tied weight: the one
    on the last stage is passed in `counted_elsewhere` and left out). Replicated copies are counted once.
    """
    skip = {id(p) for p in counted_elsewhere}
    sums: dict[tuple[str, ...], torch.Tensor] = {}
    for p in params:
        if p.grad is None or id(p) in skip:
            continue
        local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        key = _sharded_axes(p.grad)
        sums[key] = sums.get(key, 0) + local.detach().double().pow(2).sum()
    # Every rank of a (dp, tp) group holds the same parameter kinds, so the keys agree across it;
    # reduce a fixed list of keys so that all ranks issue the same collectives in the same order.
    total = torch.zeros((), dtype=torch.float64)
    for key in _all_keys(mesh):
        value = torch.as_tensor(sums.get(key, 0.0), dtype=torch.float64).clone()
        for axis in key:
            if mesh[axis].size() > 1:
                dist.all_reduce(value, group=mesh[axis].get_group())
        total += value
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def _all_keys(mesh) -> list[tuple[str, ...]]:
    from itertools import combinations

    axes = sorted(n for n in mesh.mesh_dim_names if n != "pp")
    return [tuple(c) for r in range(len(axes) + 1) for c in combinations(axes, r)]


@torch.no_grad()
def clip_grads_(params: list[nn.Parameter], max_norm: float, mesh, pp_group=None, counted_elsewhere=()) -> float:
    """Scale gradients so their global norm is at most max_norm (<= 0: measure only); returns the norm.

    counted_elsewhere: parameters whose gradient is another rank's copy (a tied weight's copy on the last
    pipeline stage): scaled like the others, counted once in the norm (by the rank holding the original).

    Same coefficient as torch.nn.utils.clip_grad_norm_, so one process and any layout agree. Where every
    rank holds whole gradients (one process, data parallel with ZeRO 0/1) it is torch's own function.
    """
    whole = pp_group is None and not any(isinstance(p.grad, DTensor) for p in params)
    if whole:
        grads = [p for p in params if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf")))
    norm = global_grad_norm(params, mesh, pp_group, counted_elsewhere)
    if max_norm > 0:
        coef = float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return float(norm)
