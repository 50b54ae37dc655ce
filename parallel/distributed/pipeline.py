"""Pipeline parallelism: split a decoder (Llama-style layers) into stage modules and run a pipeline schedule.

A stage module runs what the model's own forward runs around its layers, read from the config: one
attention mask per layer type (full or sliding-window: Gemma 2/3, Mistral), rotary embeddings per layer
type (Gemma 3), Granite's embedding multiplier, and the logit transforms after the head (Granite's
logits_scaling, Gemma's final soft-capping). Whatever else a family adds is refused by parallel.layout.

A stage module re-registers the model's own submodules under their original paths
(`model.layers.5...`, or `base_model.model.model.layers.5...` under peft), so parameter names are the
global ones on every stage and checkpoints taken under different layouts share one key space.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.tensor import DTensor

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
}
MULTI_STAGE = ("interleaved_1f1b", "zero_bubble")


def find_decoder(model: nn.Module) -> tuple[str, nn.Module, str, nn.Module]:
    """(path, module) of the decoder (has embed_tokens + layers) and of its head (lm_head, or the score
    head of a sequence-classification model), in HF or peft models."""
    decoder = head = None
    for name, module in model.named_modules():
        if (
            decoder is None
            and hasattr(module, "embed_tokens")
            and isinstance(getattr(module, "layers", None), nn.ModuleList)
        ):
            decoder = (name, module)
        if head is None and name.split(".")[-1] in ("lm_head", "score"):
            head = (name, module)
    if decoder is None or head is None:
        raise ValueError(f"{type(model).__name__} is not a Llama-family causal LM (no embed_tokens/layers/lm_head)")
    return (*decoder, *head)


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous layer ranges per stage, sizes differing by at most one (earlier stages get the extra).

    The first stage also embeds and the last also runs norm + lm_head; at tiny sizes the layers dominate.
    """
    base, extra = divmod(num_layers, num_stages)
    bounds, start = [], 0
    for s in range(num_stages):
        size = base + (1 if s < extra else 0)
        bounds.append(range(start, start + size))
        start += size
    return bounds


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    node = root
    for name in parents:
        if name not in node._modules:
            node.add_module(name, nn.Module())
        node = node._modules[name]
    node.add_module(leaf, module)


class StageModule(nn.Module):
    """Layers [first..last] of the decoder, plus the embedding on stage 0 and norm + lm_head on the last."""

    def __init__(self, model: nn.Module, layer_ids: range, *, is_first: bool, is_last: bool):
        super().__init__()
        dec_path, decoder, head_path, head = find_decoder(model)
        prefix = f"{dec_path}." if dec_path else ""
        self.config = decoder.config
        self.is_first, self.is_last = is_first, is_last
        layers = nn.ModuleDict({str(i): decoder.layers[i] for i in layer_ids})
        _attach(self, prefix + "layers", layers)
        _attach(self, prefix + "rotary_emb", decoder.rotary_emb)
        if is_first:
            _attach(self, prefix + "embed_tokens", decoder.embed_tokens)
        if is_last:
            _attach(self, prefix + "norm", decoder.norm)
            _attach(self, head_path, head)
        # Plain references for forward, kept out of the module tree so names are not duplicated.
        self.__dict__["_parts"] = (decoder.embed_tokens, layers, decoder.rotary_emb, decoder.norm, head)
        self.layer_ids = list(layer_ids)

    @property
    def layers(self) -> list[nn.Module]:
        return list(self._parts[1].values())

    def forward(self, x, attention_mask=None):
        embed, layers, rotary, norm, head = self._parts
        config = self.config
        hidden = embed(x) if self.is_first else x
        if self.is_first and getattr(config, "embedding_multiplier", None) not in (None, 1, 1.0):
            hidden = hidden * config.embedding_multiplier
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        types = {i: layer_type(config, i) for i in self.layer_ids}
        masks = attention_masks(config, hidden, attention_mask, position_ids, set(types.values()))
        per_type = "layer_type" in inspect.signature(rotary.forward).parameters
        rope = {t: rotary(hidden, position_ids, t) if per_type else rotary(hidden, position_ids) for t in masks}
        for i, layer in zip(self.layer_ids, layers.values()):
            hidden = layer(
                hidden, attention_mask=masks[types[i]], position_embeddings=rope[types[i]], position_ids=position_ids
            )
        if self.is_last:
            hidden = transform_logits(config, head(norm(hidden)))
        return hidden


def layer_type(config, index: int) -> str:
    """The attention of layer `index` as its model's forward picks it: config.layer_types, else sliding-window
    in every layer when config.sliding_window is set (Mistral, Mixtral, Phi-3), else full."""
    types = getattr(config, "layer_types", None)
    if types:
        return types[index]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


def attention_masks(config, hidden, attention_mask, position_ids, types: set[str]) -> dict:
    """One mask per layer type, built like the model's own forward builds it."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    kwargs = dict(
        config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, position_ids=position_ids
    )
    return {t: makers[t](**kwargs) for t in sorted(types)}


def transform_logits(config, logits):
    """What the causal LM's forward does to lm_head's output: Granite's division by logits_scaling, Gemma's
    final soft-capping (tanh(logits / cap) * cap)."""
    scaling = getattr(config, "logits_scaling", None)
    if scaling not in (None, 1, 1.0):
        logits = logits / scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def stage_ids(pp_rank: int, pp: int, schedule: str) -> list[int]:
    """Global stage indices this pp rank holds: one, or two in loop order (r, r + pp) for interleaved."""
    if schedule in MULTI_STAGE and pp > 1:
        return [pp_rank, pp_rank + pp]
    return [pp_rank]


def build_stage_modules(model: nn.Module, pp_rank: int, pp: int, schedule: str) -> list[StageModule]:
    """The stage modules of this pp rank, cut from the full model (which is not usable afterwards)."""
    _, decoder, _, _ = find_decoder(model)
    num_stages = pp * (2 if schedule in MULTI_STAGE and pp > 1 else 1)
    ranges = split_layers(len(decoder.layers), num_stages)
    return [
        StageModule(model, ranges[s], is_first=s == 0, is_last=s == num_stages - 1)
        for s in stage_ids(pp_rank, pp, schedule)
    ]


def build_schedule(
    stage_modules: list[StageModule],
    pp_rank: int,
    pp: int,
    schedule: str,
    *,
    microbatches: int,
    loss_fn,
    pp_group,
    device,
):
    """A torch.distributed.pipelining schedule over this rank's stages.

    Gradients are not rescaled by the schedule (scale_grads=False): loss_fn already divides by the
    global label-token count.
    """
    ids = stage_ids(pp_rank, pp, schedule)
    num_stages = pp * len(ids)
    stages = [PipelineStage(mod, sid, num_stages, device, group=pp_group) for mod, sid in zip(stage_modules, ids)]
    cls = SCHEDULES[schedule]
    if schedule in MULTI_STAGE:
        return cls(stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)


def tied_names(model: nn.Module) -> tuple[str, str] | None:
    """(embedding weight name, lm_head weight name) when lm_head's weight is the input embedding's (tied
    embeddings), else None. Read on the whole model, before it is cut into stages."""
    dec_path, decoder, head_path, head = find_decoder(model)
    if getattr(head, "weight", None) is None or head.weight is not decoder.embed_tokens.weight:
        return None
    return f"{dec_path + '.' if dec_path else ''}embed_tokens.weight", f"{head_path}.weight"


class TiedCopies:
    """Tied embeddings under pp, as Megatron trains them: the first stage holds the embedding, the last
    stage lm_head, each a copy of the one shared weight (equal at the start: every rank loads the same
    model). Their gradients are summed over a group of {first stage rank, last stage rank} per (dp, tp)
    coordinate before clipping and the optimizer step, so both copies take the same updates and stay equal.
    Under ZeRO-2/3 the gradients are DTensor shards, split the same way on both stages: their local shards
    are summed. The last stage's copy is left out of the gradient norm (the first stage counts it).

    At pp = 1 (or when the shared weight is frozen, as under LoRA) there is nothing to do: `group` is None.
    """

    def __init__(self, param: nn.Parameter | None = None, group=None, counted_elsewhere: bool = False):
        self.param, self.group, self.counted_elsewhere = param, group, counted_elsewhere

    @classmethod
    def build(cls, names: tuple[str, str] | None, trainable: bool, parts: list[nn.Module], mesh, pp: int):
        """This rank's copy and group (collective over the whole world when pp > 2: new process groups).
        names: tied_names(model); trainable: whether the shared weight trains (the same on every rank)."""
        if names is None or pp == 1 or not trainable:  # frozen (LoRA): the copies stay equal untouched
            return cls()
        group = _ends_group(mesh, pp)
        for part in parts:
            params = dict(part.named_parameters())
            for i, name in enumerate(names):
                if name in params:
                    return cls(params[name], group, counted_elsewhere=i == 1)
        return cls()  # a middle stage

    def sum_grads(self) -> None:
        """Sum the two copies' gradients (their local shards), in place, on both ends."""
        if self.group is None:
            return
        from parallel.distributed.zero import allreduce_grads

        grad = self.param.grad
        if grad is None:
            raise RuntimeError("tied weights: this stage's copy got no gradient")
        if isinstance(grad, DTensor) and tuple(grad.placements) != tuple(self.param.placements):
            # A vocab-parallel embedding's gradient comes back replicated over tp while lm_head's is
            # vocab-sharded like the weights: take this rank's shard (a local slice, no communication).
            self.param.grad = grad.redistribute(self.param.device_mesh, self.param.placements)
        allreduce_grads([self.param], self.group)


def _ends_group(mesh, pp: int):
    """The process group of this rank's (dp, tp) coordinate on the first and the last pipeline stage."""
    if pp == 2:
        return mesh["pp"].get_group()
    import torch.distributed as dist

    ranks = mesh.mesh.reshape(pp, -1)
    mine = None
    for j in range(ranks.shape[1]):  # every rank creates every group, in the same order
        ends = [int(ranks[0, j]), int(ranks[-1, j])]
        group = dist.new_group(ends)
        if dist.get_rank() in ends:
            mine = group
    return mine
