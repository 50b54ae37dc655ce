"""ZeRO over the data-parallel axes.

ZeRO-0/1 keep parameters and gradients replicated: gradients are summed over `dp` in one flat
all-reduce; ZeRO-1 also gives each dp rank the optimizer (and its state) for a disjoint subset of
parameters and broadcasts the updated values from their owners. ZeRO-2/3 are FSDP2 `fully_shard`
over dp_shard (hybrid: over (dp_replicate, dp_shard)), resharding after forward only for ZeRO-3.

Every path SUMS gradients over dp: each rank's loss is already divided by the global label count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def mixed_precision_policy(mixed_precision: str, device_type: str) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on GPU (unless fp32 is asked for); fp32 on CPU."""
    if device_type == "cuda" and mixed_precision != "fp32":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(part: nn.Module, layers: list[nn.Module], mesh, *, zero: int, mp_policy: MixedPrecisionPolicy) -> None:
    """Shard each decoder layer, then the rest of `part` (embedding, norm, lm_head) as the root group."""
    reshard = zero == 3
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp_policy)
    fully_shard(part, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp_policy)
    for module in part.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def allreduce_grads(params: list[nn.Parameter], group) -> None:
    """Sum the (local shards of the) gradients over `group` in one flat buffer per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            g = _local(p.grad)
            by_dtype.setdefault(g.dtype, []).append(g)
    for grads in by_dtype.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


def partition_params(params: list[nn.Parameter], num_ranks: int) -> list[int]:
    """Owner rank of each parameter: greedy by size, largest first, so ranks hold similar state."""
    owners = [0] * len(params)
    load = [0] * num_ranks
    for i in sorted(range(len(params)), key=lambda i: -_local(params[i]).numel()):
        owner = min(range(num_ranks), key=load.__getitem__)
        owners[i] = owner
        load[owner] += _local(params[i]).numel()
    return owners


@torch.no_grad()
def broadcast_params(params: list[nn.Parameter], owners: list[int], group) -> None:
    """Copy every parameter's updated value from its owner to the other ranks of `group`."""
    for owner in sorted(set(owners)):
        tensors = [_local(p.data) for p, o in zip(params, owners) if o == owner]
        flat = _flatten_dense_tensors(tensors)
        dist.broadcast(flat, group=group, group_src=owner)
        for t, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
            t.copy_(synced)
