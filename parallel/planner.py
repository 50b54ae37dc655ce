"""Per-rank memory estimate of a training layout, from the model's config.json alone (no torch).

The model follows what parallel/distributed does on a Llama-family decoder:
- weights: fp32 master copies (4 bytes; 0.5 for a 4-bit QLoRA base), counted tensor by tensor as the
  engine holds them (`stage_tensors`): split by pp (contiguous layer ranges, embedding on the first stage,
  norm + lm_head on the last; interleaved schedules hold two stages per rank; a tied lm_head is one tensor
  with the embedding at pp = 1 and a trained copy on the last stage under pp) and tp (the seven
  projections and their biases, LoRA's sharded side, and under vocab parallelism the embedding and lm_head;
  norms stay replicated; tp rank 0 holds the largest torch.chunk piece), each tensor's dim 0 sharded over
  dp_shard under ZeRO-2/3 (FSDP2 pads every rank to the first piece's size). parallel/dryrun.py checks
  these counts against the real layout of Llama-3 8B/70B and Qwen2.5 72B at up to 512 ranks.
- gathered: FSDP's unsharded compute copies (dtype_bytes each): the whole stage under ZeRO-2
  (kept from forward to backward); under ZeRO-3 the root group (embedding, norm, lm_head; FSDP2 does
  not reshard the root after forward) plus two layers (current + prefetched).
- grads: fp32 for trainable weights, shaped like their shards (ZeRO-1 reduces them whole).
- optimizer: AdamW's two fp32 moments per trainable shard; under ZeRO-1 each tensor's state lives on the
  one dp rank partition_params gives it (largest first, to the least loaded rank): the largest share counts.
- activations: saved tensors per token and layer (dtype_bytes each), see `_layer_activation_elems`,
  times the micro-batches a pipeline rank holds in flight (GPipe: all; 1F1B and, approximately, the
  interleaved schedules: pp - rank), plus the last stage's logits (compute dtype + fp32 copy + fp32
  log-softmax kept for backward; split by tp under vocab parallelism). Sequence parallelism splits the
  residual stream and norms by tp; the all-gathered attention/MLP inputs the projections keep stay whole.
Not modelled: allocator fragmentation, communication buffers, the CUDA context (leave headroom).
"""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass

from parallel.dims import ParallelConfig
from parallel.layout import INTERLEAVED, MODES, is_tied, num_virtual_stages

GIB = 1024**3
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # the rest are rowwise under TP


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a HF Llama/Qwen2/Mistral config.json."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2 always; Llama/Qwen3 with attention_bias)
    o_bias: bool
    mlp_bias: bool
    head_norms: bool  # Qwen3's per-head q_norm / k_norm (head_dim each)

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        heads = config["num_attention_heads"]
        model_type = config.get("model_type", "llama")
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            vocab=config["vocab_size"],
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            tied=is_tied(config),  # class defaults included, as the layout check reads it
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(config.get("mlp_bias", False)),
            head_norms=model_type == "qwen3",
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def projection(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[name]

    def bias(self, name: str) -> bool:
        if name in ("q_proj", "k_proj", "v_proj"):
            return self.qkv_bias
        return self.o_bias if name == "o_proj" else self.mlp_bias


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the most loaded rank."""

    params: int
    gathered: int
    grads: int
    optimizer: int
    activations: int
    pp_rank: int  # the pipeline rank these numbers are for
    frozen: int = 0  # models that are never trained (reference, reward model) held on the rank

    @property
    def total(self) -> int:
        return self.params + self.gathered + self.grads + self.optimizer + self.activations + self.frozen

    def gib(self) -> dict[str, float]:
        parts = {k: v for k, v in asdict(self).items() if k != "pp_rank"}
        return {k: round(v / GIB, 3) for k, v in (parts | {"total": self.total}).items()}


def num_params(config: dict) -> int:
    """Parameters of the whole model (no LoRA), as the HF model counts them."""
    outer, layer, num_layers = stage_tensors(Shape.from_config(config), ParallelConfig(), 0)
    return sum(_numel(t.shape) for t in outer) + num_layers * sum(_numel(t.shape) for t in layer)


@dataclass(frozen=True)
class Tensor:
    """One parameter as a rank holds it after the tp split (before any ZeRO sharding)."""

    shape: tuple[int, ...]
    trainable: bool


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _split(size: int, ways: int) -> int:
    """The first (largest) of `ways` torch.chunk pieces of `size`: what DTensor's Shard gives tp rank 0,
    and what FSDP2 allocates on every dp_shard rank (it pads the shorter last pieces to this size)."""
    return -(-size // ways)


def _layer_tensors(shape: Shape, tp: int, mode: str, lora_r: int, lora_targets) -> list[Tensor]:
    """One decoder layer on tp rank 0: projections split (colwise by output rows, rowwise by input
    columns) with their biases (a rowwise bias whole), LoRA A / B as the TP plan splits them (the base
    layer's sharded side), norms whole."""
    full = mode == "full"
    tensors = []
    for name in PROJECTIONS:
        fan_in, fan_out = shape.projection(name)
        colwise = name in COLWISE
        tensors.append(Tensor((_split(fan_out, tp), fan_in) if colwise else (fan_out, _split(fan_in, tp)), full))
        if shape.bias(name):
            tensors.append(Tensor((_split(fan_out, tp) if colwise else fan_out,), full))
        if not full and (lora_targets == "all-linear" or name in lora_targets):
            tensors.append(Tensor((lora_r, fan_in) if colwise else (lora_r, _split(fan_in, tp)), True))
            tensors.append(Tensor((_split(fan_out, tp), lora_r) if colwise else (fan_out, lora_r), True))
    norms = [shape.hidden] * 2 + ([shape.head_dim] * 2 if shape.head_norms else [])
    return tensors + [Tensor((n,), full) for n in norms]


def stage_tensors(
    shape: Shape, parallel: ParallelConfig, pp_rank: int, mode: str = "full", lora_r: int = 8, lora_targets="all-linear"
) -> tuple[list[Tensor], list[Tensor], int]:
    """(embedding / norm / lm_head tensors, one layer's tensors, number of layers) held by `pp_rank` on
    tp rank 0. Interleaved schedules give a pp rank two stages (r and r + pp) of 2 x pp."""
    num_stages = num_virtual_stages(parallel)
    held = stage_ids(pp_rank, parallel.pp, parallel.pp_schedule)
    first, last = 0 in held, num_stages - 1 in held
    vocab_split = parallel.tp if tp_options(shape, parallel)[1] else 1
    rows = _split(shape.vocab, vocab_split)
    full = mode == "full"
    outer = [Tensor((rows, shape.hidden), full)] if first else []
    if last:
        outer.append(Tensor((shape.hidden,), full))
        # Under pp a tied lm_head is a copy of the embedding on the last stage (trained, its gradients summed
        # with the first stage's); only where one rank holds both ends (pp = 1) is it the same tensor.
        if not (shape.tied and first):
            outer.append(Tensor((rows, shape.hidden), full))
    layers = split_layers(shape.layers, num_stages)
    layer = _layer_tensors(shape, parallel.tp, mode, lora_r, lora_targets)
    return outer, layer, sum(layers[s] for s in held)


def stage_ids(pp_rank: int, pp: int, schedule: str) -> list[int]:
    """Pipeline stages one pp rank holds, as parallel.distributed.pipeline.stage_ids assigns them."""
    if schedule in INTERLEAVED and pp > 1:
        return [pp_rank, pp_rank + pp]
    return [pp_rank]


def zero1_loads(numels: list[int], num_ranks: int) -> list[int]:
    """Elements each dp rank owns under ZeRO-1, by parallel.distributed.zero.partition_params' rule
    (largest first, each to the least loaded rank, the lowest index among equals)."""
    heap = [(0, rank) for rank in range(num_ranks)]
    for numel in sorted(numels, reverse=True):
        load, rank = heapq.heappop(heap)
        heapq.heappush(heap, (load + numel, rank))
    loads = [0] * num_ranks
    for load, rank in heap:
        loads[rank] = load
    return loads


@dataclass(frozen=True)
class ModelState:
    """Bytes of weights, gradients and optimizer state on one rank, and the unsharded compute copies."""

    params: int
    grads: int
    optimizer: int
    gathered: int = 0


def model_state(
    shape: Shape,
    parallel: ParallelConfig,
    pp_rank: int,
    *,
    dp_rank: int | None = None,
    mode: str = "full",
    dtype_bytes: int = 2,
    lora_r: int = 8,
    lora_targets="all-linear",
) -> tuple[ModelState, int]:
    """(the state of one rank of `pp_rank` with tp rank 0 and dp_shard rank 0, its number of layers).
    dp_rank: the data-parallel rank whose ZeRO-1 optimizer share to count (None: the largest share)."""
    outer, layer, num_layers = stage_tensors(shape, parallel, pp_rank, mode, lora_r, lora_targets)
    tensors = outer + layer * num_layers
    fsdp = parallel.dp_shard if parallel.zero >= 2 else 1

    def held(t: Tensor) -> int:  # FSDP2 shards every tensor's dim 0
        return _split(t.shape[0], fsdp) * _numel(t.shape[1:])

    trainable = [t for t in tensors if t.trainable]
    base_bytes = 0.5 if mode == "qlora" else 4
    params = int(sum(held(t) * (4 if t.trainable else base_bytes) for t in tensors))
    grads = sum(held(t) for t in trainable) * 4
    if parallel.zero == 1:
        loads = zero1_loads([_numel(t.shape) for t in trainable], parallel.dp)
        optimizer = 8 * (max(loads) if dp_rank is None else loads[dp_rank])
    else:
        optimizer = 8 * sum(held(t) for t in trainable)
    gathered = 0
    if parallel.zero == 2:
        gathered = sum(_numel(t.shape) for t in tensors) * dtype_bytes
    elif parallel.zero == 3:  # the root group, current + prefetched layer
        gathered = sum(_numel(t.shape) for t in outer + 2 * layer) * dtype_bytes
    return ModelState(params, grads, optimizer, gathered), num_layers


def split_layers(num_layers: int, num_stages: int) -> list[int]:
    """Layers per pipeline stage, as parallel.distributed.pipeline.split_layers cuts them."""
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


def _layer_activation_elems(
    shape: Shape, tp: int, checkpointing: str, sequence_parallel: bool = False
) -> tuple[int, int]:
    """(elements saved per token per layer, extra elements per token while one layer recomputes).

    No checkpointing: layer input, both norm outputs, the post-attention residual (4 x hidden,
    replicated under TP; under sequence parallelism the two block inputs the projections keep are
    all-gathered, the layer input and residual split by tp) and, split by tp, q/k/v projections,
    rotated q/k, attention output, and the MLP's gate, up, SiLU(gate) and product.
    """
    h = shape.hidden
    split = (3 * shape.q_dim + 3 * shape.kv_dim + 4 * shape.intermediate) // tp
    whole = 2 * h + 2 * h // tp if sequence_parallel else 4 * h
    full = whole + split
    if checkpointing == "full":
        return (h // tp if sequence_parallel else h), full  # only layer inputs; one layer rebuilt at a time
    if checkpointing == "selective":
        # Matmul and attention outputs are kept (q, k, v, attention, o, gate, up, down); the rest recomputed.
        saved = (2 * h + h // tp if sequence_parallel else 3 * h) + (
            2 * shape.q_dim + 2 * shape.kv_dim + 2 * shape.intermediate
        ) // tp
        return saved, full - saved
    return full, 0


def tp_options(shape: Shape, parallel: ParallelConfig) -> tuple[bool, bool]:
    """(sequence parallel, vocab parallel) as the engine resolves them (unset: on where possible)."""
    if parallel.tp == 1:
        return False, False
    vocab_ok = shape.vocab % parallel.tp == 0  # tied weights split alike on both ends
    return parallel.sequence_parallel is not False, parallel.vocab_parallel is not False and vocab_ok


def _in_flight(parallel: ParallelConfig, pp_rank: int) -> int:
    if parallel.pp == 1:
        return 1
    if parallel.pp_schedule == "gpipe":
        return parallel.microbatches
    return min(parallel.microbatches, parallel.pp - pp_rank)


def estimate_memory(
    model_config: dict,
    parallel: ParallelConfig,
    *,
    mode: str = "full",
    seq_len: int,
    micro_batch: int,
    dtype_bytes: int = 2,
    lora_r: int = 8,
    lora_targets: list[str] | str = "all-linear",
    loss_parallel: bool = True,
    token_loss: bool = True,
) -> MemoryEstimate:
    """Per-rank bytes of the most loaded pipeline rank.

    model_config: the model's config.json as a dict. mode: full | lora | qlora. micro_batch: sequences
    per forward on one rank (batch_size / (dp x microbatches x grad_accum)). dtype_bytes: the compute
    dtype (2 for bf16, 4 for fp32). loss_parallel: the stage's loss runs on vocab-sharded logits (token
    cross-entropy at pp = 1); other losses gather the logits whole. token_loss: the loss is the token
    cross-entropy, which parallel.loss_chunk_tokens computes chunk by chunk (only a chunk's logits held).
    """
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not one of {list(MODES)}")
    shape = Shape.from_config(model_config)
    # chunked_ce.logits_transformed's rule (this module imports no torch): any soft-capping, a scale not 1
    transforms = any(
        model_config.get(k) is not None if k.endswith("softcapping") else model_config.get(k) not in (None, 1, 1.0)
        for k in LOGIT_TRANSFORMS
    )
    per_rank = [
        _rank_estimate(
            shape,
            parallel,
            r,
            mode,
            seq_len,
            micro_batch,
            dtype_bytes,
            lora_r,
            lora_targets,
            loss_parallel,
            token_loss,
            transforms,
        )
        for r in range(parallel.pp)
    ]
    return max(per_rank, key=lambda e: e.total)


def _loss_chunk(shape: Shape, parallel: ParallelConfig, tokens: int, token_loss: bool, transforms: bool) -> int:
    """Tokens per chunk of the chunked token loss (parallel.chunked_ce) where the Trainer uses it (0: the
    whole logits): parallel.loss_chunk_tokens not 0, the token loss, a plain vocabulary head, the native
    engine (any layout)."""
    if not token_loss or parallel.loss_chunk_tokens == 0 or transforms or parallel.engine != "native":
        return 0
    if parallel.loss_chunk_tokens:
        return min(parallel.loss_chunk_tokens, tokens)
    target = max(1024, -(-tokens * shape.hidden // shape.vocab))  # chunked_ce.auto_chunk_tokens
    return min(1 << (target - 1).bit_length(), tokens)


# Config attributes of families whose logits are not the plain head projection (chunked_ce's list).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _rank_estimate(
    shape: Shape,
    parallel: ParallelConfig,
    pp_rank: int,
    mode: str,
    seq_len: int,
    micro_batch: int,
    dtype_bytes: int,
    lora_r: int,
    lora_targets,
    loss_parallel: bool,
    token_loss: bool = False,
    config_transforms: bool = False,
) -> MemoryEstimate:
    state, num_layers = model_state(
        shape, parallel, pp_rank, mode=mode, dtype_bytes=dtype_bytes, lora_r=lora_r, lora_targets=lora_targets
    )
    sequence_parallel, vocab_parallel = tp_options(shape, parallel)
    saved, recompute = _layer_activation_elems(shape, parallel.tp, parallel.activation_checkpointing, sequence_parallel)
    tokens = micro_batch * seq_len
    activations = (_in_flight(parallel, pp_rank) * num_layers * saved + recompute) * tokens * dtype_bytes
    if pp_rank == parallel.pp - 1:
        chunk = _loss_chunk(shape, parallel, tokens, token_loss, config_transforms)
        if chunk:
            # One chunk's logits (compute dtype + fp32) on this rank's vocabulary slice, the fp32 hidden-state
            # gradient, bf16 copies of the hidden states and the head weight, and under ZeRO-2/3 the fp32
            # head gradient beside FSDP's shard (at ZeRO <= 1 it becomes the counted gradient).
            vocab = shape.vocab // (parallel.tp if vocab_parallel else 1)
            cast = (tokens + vocab) * shape.hidden * dtype_bytes if dtype_bytes < 4 else 0
            head_grad = vocab * shape.hidden * 4 if parallel.zero >= 2 and mode == "full" else 0
            activations += chunk * vocab * (dtype_bytes + 4) + tokens * shape.hidden * 4 + cast + head_grad
        else:
            sharded_logits = loss_parallel and parallel.pp == 1
            vocab = shape.vocab // (parallel.tp if vocab_parallel and sharded_logits else 1)
            activations += tokens * vocab * (dtype_bytes + 8)
    return MemoryEstimate(
        params=state.params,
        gathered=state.gathered,
        grads=state.grads,
        optimizer=state.optimizer,
        activations=activations,
        pp_rank=pp_rank,
    )


ADVICE = {
    "params": "shard weights with parallel.zero: 3 over dp_shard, or split them with tp / pp",
    "gathered": "ZeRO-2 keeps the stage unsharded through backward; use parallel.zero: 3",
    "grads": "shard gradients with parallel.zero: 2 or 3 over dp_shard, or train LoRA adapters (mode: lora)",
    "optimizer": "shard optimizer state with parallel.zero (1 over dp, 2/3 over dp_shard), or use mode: lora",
    "activations": "lower the micro-batch (grad_accum, parallel.microbatches), seq_len, or set "
    "parallel.activation_checkpointing",
    "frozen": "keep the frozen reference and reward models on CPU between their forwards (offload_frozen: "
    "true), precompute DPO's reference log-probs, or use mode: lora (the reference is the policy "
    "with its adapters off)",
}


def memory_warnings(estimate: MemoryEstimate, gpu_bytes: int, *, headroom: float = 0.9) -> list[str]:
    """Warnings when the estimate exceeds `headroom` of one GPU's memory (empty when it fits)."""
    limit = gpu_bytes * headroom
    if estimate.total <= limit:
        return []
    gib = estimate.gib()
    largest = max(ADVICE, key=lambda k: getattr(estimate, k))
    breakdown = ", ".join(f"{k} {gib[k]:.1f}" for k in ADVICE)
    return [
        f"parallel: about {gib['total']:.1f} GiB per rank (pp rank {estimate.pp_rank}: {breakdown} GiB) "
        f"exceeds {headroom:.0%} of {gpu_bytes / GIB:.0f} GiB GPU memory; the largest part is {largest}: "
        f"{ADVICE[largest]}"
    ]
