"""Tensor parallelism for decoders with Llama-style layers (Llama, Qwen2/Qwen3, Mistral, Gemma 2/3, Granite,
...) with DTensor, model code unchanged. A family is covered when its layers have the plan's module names
(`tp_plan_problem` says why a layer is not: fused projections, experts, norms across heads).

Attention reshapes with `view(*shape, -1, head_dim)`, so local shards of q/k/v simply carry fewer
heads; an attention module that views with its own head counts (StableLM) gets this rank's counts.

Three options, each compared with one process by the tests:
- the projections (q/k/v/gate/up column-wise, o/down row-wise), always;
- sequence parallelism (Megatron-style): between the TP regions the residual stream and the norms hold
  this rank's slice of the sequence. Attention and MLP inputs are all-gathered (reduce-scattered in
  backward), o_proj/down_proj reduce-scatter instead of all-reducing. Norm weights stay plain tensors
  fed a sequence slice, so their gradients are partial sums: the trainer sums them over tp;
- vocab parallelism: the embedding and lm_head split the vocabulary; the logits stay vocab-sharded for
  the token cross-entropy (computed by torch's loss_parallel) and are gathered for everything else.
  Both weights are [vocab, hidden] split on the vocabulary (Shard(0)), so tied weights (lm_head = the
  embedding) stay tied shard by shard: one process-local DTensor parameter serves both at pp = 1, and
  under pp the two stages' copies hold the same rows on the same tp rank.

Fused projections (Phi-3's qkv_proj laid out [q | k | v], gate_up_proj [gate | up]) cannot be split by
a plain column split, which would hand rank 0 all of q: the weight stays whole on every tp rank and each
rank computes only its heads' q/k/v rows (its half of each of gate and up), exactly; their weight
gradients are then partial sums, like the per-head norms'.

Per-head norms inside attention (Qwen3's q_norm/k_norm) see only this rank's heads, so their gradients
are partial sums too, with or without sequence parallelism.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, parallelize_module

# Projection name -> style. Colwise splits output features (heads); rowwise splits input features and
# all-reduces (or, under sequence parallelism, reduce-scatters) the output.
ATTENTION_PLAN = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
}
# Phi-3/Phi-4: one fused q/k/v projection, split by its attention at config.num_attention_heads * head_dim.
FUSED_ATTENTION_PLAN = {"self_attn.qkv_proj": "fused_qkv", "self_attn.o_proj": "rowwise"}
FUSED_QKV_FAMILIES = ("phi3",)
# The MLPs the plan knows, by module names: gated (Llama), plain (Nemotron, Arcee), GPT-style (StarCoder2),
# fused gate/up halves (Phi-3, GLM).
MLP_PLANS = (
    {"mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise"},
    {"mlp.up_proj": "colwise", "mlp.down_proj": "rowwise"},
    {"mlp.c_fc": "colwise", "mlp.c_proj": "rowwise"},
    {"mlp.gate_up_proj": "fused_halves", "mlp.down_proj": "rowwise"},
)
SEQ = Shard(1)  # [batch, sequence, hidden]: the sequence dim
HEAD_COUNTS = ("num_heads", "num_attention_heads", "num_key_value_heads")  # attention attributes, per rank


def tp_plan_problem(layer: nn.Module) -> str | None:
    """Why no plan shards this decoder layer exactly (None: layer_plan(layer) does), as a 'parallel.tp: ...'
    line: experts, fused projections, modules the plans do not name, norms across heads, parameters of no
    known role (an activation's own weights would see only this rank's features)."""
    names = {name for name, _ in layer.named_modules()}
    kind = type(layer).__name__
    if "mlp.experts" in names:
        return f"parallel.tp: {kind} is a mixture-of-experts layer; expert parallelism is not supported yet, use tp: 1"
    has = lambda plan: all(path in names for path in plan)  # noqa: E731
    if not (has(ATTENTION_PLAN) or has(FUSED_ATTENTION_PLAN)) or not any(has(mlp) for mlp in MLP_PLANS):
        return (
            f"parallel.tp: {kind} lacks the q/k/v/o attention and gate/up/down (or up/down, c_fc/c_proj) MLP "
            "projections the tensor-parallel plan shards; use tp: 1"
        )
    attn = layer.get_submodule("self_attn")
    if "self_attn.qkv_proj" in names and getattr(attn.config, "model_type", None) not in FUSED_QKV_FAMILIES:
        return f"parallel.tp: {kind} has a fused qkv_proj whose q/k/v layout the plan does not know; use tp: 1"
    fused = ("self_attn.qkv_proj", "mlp.gate_up_proj")
    adapted = [path for path in fused if path in names and _is_lora(layer.get_submodule(path))]
    if adapted:
        return f"parallel.tp: LoRA adapters on the fused {', '.join(adapted)} are not split by tp; use tp: 1"
    for name in _norm_names(attn):
        weight = getattr(attn.get_submodule(name), "weight", None)
        if weight is None or weight.shape[-1] != getattr(attn, "head_dim", None):
            return f"parallel.tp: {kind}'s self_attn.{name} is not one norm per head, which tp splits; use tp: 1"
    placed = [f"{path}." for path in layer_plan(layer, checked=True)]
    placed += [f"{name}." for name in _norm_names(layer)] + [f"self_attn.{name}." for name in _norm_names(attn)]
    unplaced = [name for name, _ in layer.named_parameters() if not name.startswith(tuple(placed))]
    if unplaced:
        return (
            f"parallel.tp: {kind} has parameters the tensor-parallel plan does not place ({', '.join(unplaced)}); "
            "use tp: 1"
        )
    return None


def layer_plan(layer: nn.Module, *, checked: bool = False) -> dict[str, str]:
    """The plan of a decoder layer: the attention projections and the first MLP layout whose names it has.
    ValueError (tp_plan_problem's line) when none shards it exactly."""
    if not checked and (problem := tp_plan_problem(layer)):
        raise ValueError(problem)
    names = {name for name, _ in layer.named_modules()}
    attention = FUSED_ATTENTION_PLAN if "self_attn.qkv_proj" in names else ATTENTION_PLAN
    return {**attention, **next(mlp for mlp in MLP_PLANS if all(path in names for path in mlp))}


def _fused_rows(layer: nn.Module, path: str, rank: int, tp: int) -> torch.Tensor:
    """The output rows of a fused projection this tp rank computes: its heads' q, k and v rows (qkv_proj,
    laid out [q | k | v]) or its share of each half (gate_up_proj, [gate | up])."""
    if path == "self_attn.qkv_proj":
        attn = layer.get_submodule("self_attn")
        q = attn.config.num_attention_heads * attn.head_dim
        kv = attn.config.num_key_value_heads * attn.head_dim
        parts = [(0, q), (q, kv), (q + kv, kv)]
    else:
        half = layer.get_submodule(path).weight.shape[0] // 2
        parts = [(0, half), (half, half)]
    return torch.cat(
        [torch.arange(start + rank * size // tp, start + (rank + 1) * size // tp) for start, size in parts]
    )


def _parallelize_fused(linear: nn.Module, rows: torch.Tensor, tp_mesh, partial: PartialGrads) -> None:
    """A fused projection split exactly: the weight stays whole on every tp rank (its names and checkpoints
    unchanged) and each rank computes only its `rows`, so its weight gradient holds only those rows (summed
    over tp with the partial gradients) and its input gradient is a partial sum (reduced like a colwise
    layer's: all-reduced, or reduce-scattered over the sequence)."""
    rows = rows.to(linear.weight.device)

    def forward(x):
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, tp_mesh, [Replicate()], run_check=False)
        x = x.to_local(grad_placements=[Partial()])
        bias = None if linear.bias is None else linear.bias[rows]
        return F.linear(x, linear.weight[rows], bias)

    linear.forward = forward
    partial.add_module(linear)


class PartialGrads:
    """Parameters whose gradient each tp rank computes from its own slice of the activations.

    Kept as (module, name) so the lookup survives FSDP, which swaps a module's parameters for DTensors.
    """

    def __init__(self):
        self.entries: list[tuple[nn.Module, str]] = []

    def add_module(self, module: nn.Module) -> None:
        for name, _ in module.named_parameters(recurse=False):
            self.entries.append((module, name))
        for child in module.children():
            self.add_module(child)

    def params(self) -> list[nn.Parameter]:
        return [getattr(module, name) for module, name in self.entries]


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def _shard_params(module: nn.Module, tp_mesh, placement_of) -> None:
    """Turn `module`'s own parameters into DTensors; placement_of(param name) -> a placement."""

    def partition(name, mod, mesh):
        for pname, param in list(mod.named_parameters(recurse=False)):
            dt = distribute_tensor(param.data, mesh, [placement_of(pname)])
            mod.register_parameter(pname, nn.Parameter(dt, requires_grad=param.requires_grad))

    distribute_module(module, tp_mesh, partition)


def _rowwise(sequence_parallel: bool) -> RowwiseParallel:
    return RowwiseParallel(output_layouts=SEQ) if sequence_parallel else RowwiseParallel()


def _parallelize_lora(
    lora_layer: nn.Module, style: str, tp_mesh, sequence_parallel: bool, partial: PartialGrads
) -> None:
    """Shard a peft LoRA wrapper: the base layer and the adapter matrix on the sharded side.

    Colwise base (y = x W^T, W split by rows): lora_B split by rows too, lora_A replicated.
    Rowwise base (W split by columns): lora_A split by columns (its r-dim output is all-reduced, or
    reduce-scattered over the sequence, like the base output), lora_B replicated; under sequence
    parallelism lora_B sees a sequence slice, so its gradient is partial.
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
    parallelize_module(base, tp_mesh, _rowwise(sequence_parallel))
    for a in lora_layer.lora_A.values():
        parallelize_module(a, tp_mesh, _rowwise(sequence_parallel))
    for b in lora_layer.lora_B.values():
        if sequence_parallel:
            partial.add_module(b)
        else:
            _shard_params(b, tp_mesh, lambda _: Replicate())
            _local_io(b)


def _local_io(linear: nn.Module) -> None:
    """A replicated linear fed plain local tensors: wrap inputs as Replicate DTensors, return local."""

    def pre(mod, args):
        x = args[0]
        if isinstance(x, DTensor):
            return None
        return (DTensor.from_local(x, mod.weight.device_mesh, [Replicate()], run_check=False), *args[1:])

    def post(mod, args, out):
        return out.to_local() if isinstance(out, DTensor) else out

    linear.register_forward_pre_hook(pre)
    linear.register_forward_hook(post)


def shard_sequence(x, tp_mesh):
    """This rank's slice of a full (replicated) [batch, seq, ...] tensor; backward all-gathers."""
    tp = tp_mesh.size()
    if x.shape[1] % tp:
        raise ValueError(
            f"parallel.sequence_parallel: a sequence of {x.shape[1]} tokens does not split over "
            f"tp={tp} ranks (the trainer pads its batches; other callers must, or set "
            "sequence_parallel: false)"
        )
    return DTensor.from_local(x, tp_mesh, [Replicate()], run_check=False).redistribute(tp_mesh, [SEQ]).to_local()


def gather_sequence(x, tp_mesh):
    """The full sequence from every rank's slice; backward keeps this rank's slice of the gradient."""
    return DTensor.from_local(x, tp_mesh, [SEQ], run_check=False).redistribute(tp_mesh, [Replicate()]).to_local()


def _norm_names(module: nn.Module) -> list[str]:
    return [
        name
        for name, child in module.named_children()
        if name.endswith("norm") and any(True for _ in child.parameters())
    ]


def apply_tensor_parallel(
    layers: list[nn.Module],
    tp_mesh,
    *,
    sequence_parallel: bool = False,
    gather_output: bool = False,
) -> PartialGrads:
    """Shard consecutive decoder layers' projections over tp_mesh, in place; LoRA-wrapped ones included.

    sequence_parallel: the first layer slices its (replicated) input over the sequence, every layer
    keeps the residual stream sliced, and with gather_output the last layer returns the full sequence
    again (a pipeline stage that hands on to the next). Returns the parameters whose gradients must be
    summed over tp after backward.
    """
    partial = PartialGrads()
    for layer in layers:
        plan = layer_plan(layer)
        for path, style in plan.items():
            module = layer.get_submodule(path)
            if style.startswith("fused"):
                _parallelize_fused(
                    module, _fused_rows(layer, path, tp_mesh.get_local_rank(), tp_mesh.size()), tp_mesh, partial
                )
            elif _is_lora(module):
                _parallelize_lora(module, style, tp_mesh, sequence_parallel, partial)
            elif style == "colwise":
                parallelize_module(module, tp_mesh, ColwiseParallel())
            else:
                parallelize_module(module, tp_mesh, _rowwise(sequence_parallel))
        attn = layer.get_submodule("self_attn")
        for name in HEAD_COUNTS:  # modules that view with their own head counts (StableLM) see this rank's
            if isinstance(getattr(attn, name, None), int):
                setattr(attn, name, getattr(attn, name) // tp_mesh.size())
        if "self_attn.qkv_proj" in plan:  # Phi-3 splits q/k/v at its config's head counts: this rank's
            attn.config = copy.copy(attn.config)
            attn.config.num_attention_heads //= tp_mesh.size()
            attn.config.num_key_value_heads //= tp_mesh.size()
        for name in _norm_names(attn):  # per-head norms (Qwen3) see only this rank's heads
            partial.add_module(attn.get_submodule(name))
        if sequence_parallel:
            for name in _norm_names(layer):
                partial.add_module(layer.get_submodule(name))
            # One all-gather per block input, kept a DTensor so q/k/v (gate/up) share it and backward
            # reduce-scatters their summed input gradients.
            parallelize_module(
                attn,
                tp_mesh,
                PrepareModuleInput(
                    input_kwarg_layouts={"hidden_states": SEQ},
                    desired_input_kwarg_layouts={"hidden_states": Replicate()},
                ),
            )
            parallelize_module(
                layer.get_submodule("mlp"),
                tp_mesh,
                PrepareModuleInput(input_layouts=(SEQ,), desired_input_layouts=(Replicate(),)),
            )
    if sequence_parallel and layers:
        layers[0].register_forward_pre_hook(
            lambda mod, args, kwargs: ((shard_sequence(args[0], tp_mesh), *args[1:]), kwargs), with_kwargs=True
        )
        if gather_output:  # a stage output, not a view: zero-bubble schedules detach it in place
            layers[-1].register_forward_hook(lambda mod, args, out: gather_sequence(out, tp_mesh).clone())
    return partial


class LogitsLayout:
    """Whether a vocab-parallel lm_head hands out its vocab-sharded DTensor (for loss_parallel) or the
    gathered logits (the default: generation, custom objectives, evaluation)."""

    def __init__(self):
        self.keep_sharded = False


def vocab_parallel_supported(embed: nn.Module | None, head: nn.Module | None, vocab_size: int, tp: int) -> str | None:
    """Why the embedding/lm_head cannot be split over the vocabulary (None: they can). Tied weights can:
    they split the same way on both ends (see apply_tp_ends)."""
    if vocab_size % tp:
        return f"the vocabulary ({vocab_size}) does not divide by tp={tp}"
    for module in (embed, head):
        if module is not None and (_is_lora(module) or not isinstance(module, (nn.Embedding, nn.Linear))):
            return f"{type(module).__name__} is not a plain embedding/linear (adapters or a wrapper on it)"
    if head is not None and head.out_features != vocab_size:
        return "the head is not a vocabulary projection (a score head)"
    return None


def apply_tp_ends(
    tp_mesh,
    *,
    embed: nn.Module | None,
    norm: nn.Module | None,
    head: nn.Module | None,
    sequence_parallel: bool,
    vocab_parallel: bool,
    logits: LogitsLayout,
) -> PartialGrads:
    """The embedding (first stage) and final norm + head (last stage) around the tensor-parallel layers.

    vocab_parallel: the embedding splits its rows (a masked lookup, outputs all-reduced) and lm_head its
    output features. Under sequence parallelism the final norm runs on the sequence slice and the head
    gathers the sequence first.
    """
    partial = PartialGrads()
    # Tied weights on this part (pp = 1): sharding each module would give each its own parameter, so
    # the head is given the embedding's sharded one back afterwards (both Shard(0) over the vocabulary).
    tied = embed is not None and head is not None and head.weight is embed.weight
    if vocab_parallel and embed is not None:
        parallelize_module(embed, tp_mesh, RowwiseParallel(input_layouts=Replicate()))
    if head is None:
        return partial
    if sequence_parallel:
        partial.add_module(norm)
    if vocab_parallel:
        parallelize_module(
            head,
            tp_mesh,
            ColwiseParallel(
                input_layouts=SEQ if sequence_parallel else Replicate(),
                output_layouts=Shard(-1),
                use_local_output=False,
            ),
        )

        if tied:
            head.weight = embed.weight

        def hand_out(mod, args, out):
            return out if logits.keep_sharded else out.full_tensor()

        head.register_forward_hook(hand_out)
    elif sequence_parallel:
        head.register_forward_pre_hook(lambda mod, args: (gather_sequence(args[0], tp_mesh), *args[1:]))
    return partial
