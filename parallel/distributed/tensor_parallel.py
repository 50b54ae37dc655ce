"""Tensor parallelism for Llama-family decoders (Llama, Qwen2, Mistral) with DTensor, model code unchanged.

Attention reshapes with `view(*shape, -1, head_dim)`, so local shards of q/k/v simply carry fewer
heads and nothing in the attention module needs adjusting. Embedding, norms and lm_head stay
replicated (plain tensors); their gradients come out identical on every tp rank.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

# Projection name -> style. Colwise splits output features (heads); rowwise splits input features and
# all-reduces the output.
LLAMA_PLAN = {
    "self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise",
}


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def _shard_params(module: nn.Module, tp_mesh, placement_of) -> None:
    """Turn `module`'s own parameters into DTensors; placement_of(param name) -> a placement."""
    def partition(name, mod, mesh):
        for pname, param in list(mod.named_parameters(recurse=False)):
            dt = distribute_tensor(param.data, mesh, [placement_of(pname)])
            mod.register_parameter(pname, nn.Parameter(dt, requires_grad=param.requires_grad))
    distribute_module(module, tp_mesh, partition)


def _parallelize_lora(lora_layer: nn.Module, style: str, tp_mesh) -> None:
    """Shard a peft LoRA wrapper: the base layer and the adapter matrix on the sharded side.

    Colwise base (y = x W^T, W split by rows): lora_B split by rows too, lora_A replicated.
    Rowwise base (W split by columns): lora_A split by columns (its r-dim output is all-reduced, like
    the base output), lora_B replicated.
    """
    base = lora_layer.base_layer
    if style == "colwise":
        parallelize_module(base, tp_mesh, ColwiseParallel())
        for b in lora_layer.lora_B.values():
            parallelize_module(b, tp_mesh, ColwiseParallel())
        for a in lora_layer.lora_A.values():
            _shard_params(a, tp_mesh, lambda _: Replicate())
            _local_io(a)
        return
    # Rowwise: x arrives sharded on its last dim (the previous colwise layer kept it local).
    parallelize_module(base, tp_mesh, RowwiseParallel())
    for a in lora_layer.lora_A.values():
        parallelize_module(a, tp_mesh, RowwiseParallel())
    for b in lora_layer.lora_B.values():
        _shard_params(b, tp_mesh, lambda _: Replicate())
        _local_io(b)


def _local_io(linear: nn.Module) -> None:
    """A replicated linear fed plain local tensors: wrap inputs as Replicate DTensors, return local."""
    from torch.distributed.tensor import DTensor

    def pre(mod, args):
        x = args[0]
        if isinstance(x, DTensor):
            return None
        return (DTensor.from_local(x, mod.weight.device_mesh, [Replicate()], run_check=False), *args[1:])

    def post(mod, args, out):
        return out.to_local() if isinstance(out, DTensor) else out
    linear.register_forward_pre_hook(pre)
    linear.register_forward_hook(post)


def apply_tensor_parallel(layers: list[nn.Module], tp_mesh, plan: dict[str, str] = LLAMA_PLAN) -> None:
    """Shard every decoder layer's projections over tp_mesh, in place; LoRA-wrapped ones included."""
    for layer in layers:
        for path, style in plan.items():
            module = layer.get_submodule(path)
            if _is_lora(module):
                _parallelize_lora(module, style, tp_mesh)
            else:
                parallelize_module(module, tp_mesh, ColwiseParallel() if style == "colwise" else RowwiseParallel())
