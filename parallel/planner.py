"""Per-rank memory estimate of a training layout, from the model's config.json alone (no torch).

The model follows what parallel/distributed does on a Llama-family decoder:
- weights: fp32 master copies (4 bytes; 0.5 for a 4-bit QLoRA base), split by pp (contiguous layer
  ranges, embedding on the first stage, norm + lm_head on the last; a tied lm_head is one tensor with the
  embedding at pp = 1 and a trained copy on the last stage under pp) and tp (the seven projections, and
  under vocab parallelism the embedding and lm_head; norms stay replicated), sharded over dp_shard under
  ZeRO-2/3 (FSDP2).
- gathered: FSDP's unsharded compute copies (dtype_bytes each): the whole stage under ZeRO-2
  (kept from forward to backward); under ZeRO-3 the root group (embedding, norm, lm_head; FSDP2 does
  not reshard the root after forward) plus two layers (current + prefetched).
- grads: fp32 for trainable weights; sharded over dp_shard under ZeRO-2/3 (ZeRO-1 reduces them whole).
- optimizer: AdamW's two fp32 moments; sharded over dp (ZeRO-1) or dp_shard (ZeRO-2/3).
- activations: saved tensors per token and layer (dtype_bytes each), see `_layer_activation_elems`,
  times the micro-batches a pipeline rank holds in flight (GPipe: all; 1F1B and, approximately, the
  interleaved schedules: pp - rank), plus the last stage's logits (compute dtype + fp32 copy + fp32
  log-softmax kept for backward; split by tp under vocab parallelism). Sequence parallelism splits the
  residual stream and norms by tp; the all-gathered attention/MLP inputs the projections keep stay whole.
Not modelled: allocator fragmentation, communication buffers, the CUDA context (leave headroom).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from parallel.dims import ParallelConfig
from parallel.layout import MODES, is_tied

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
    attention_bias: bool

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        heads = config["num_attention_heads"]
        return cls(
            vocab=config["vocab_size"],
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            tied=is_tied(config),  # class defaults included, as the layout check reads it
            attention_bias=bool(config.get("attention_bias", False)),
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

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden

    @property
    def head(self) -> int:
        """lm_head's own parameters in the whole model: none when it shares the embedding's weight."""
        return 0 if self.tied else self.vocab * self.hidden


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
    shape = Shape.from_config(config)
    return shape.embedding + shape.head + shape.hidden + shape.layers * _layer_params(shape, tp=1)


def _layer_params(shape: Shape, tp: int) -> int:
    """One decoder layer on one tp rank: projections split, two norms replicated."""
    weights = sum(i * o for i, o in map(shape.projection, PROJECTIONS)) // tp
    bias = (shape.q_dim + 2 * shape.kv_dim) // tp if shape.attention_bias else 0
    return weights + bias + 2 * shape.hidden


def _layer_lora_params(shape: Shape, tp: int, r: int, targets) -> int:
    """LoRA A (r x in) and B (out x r) of one layer on one tp rank: the base layer's sharded side is split."""
    total = 0
    for name in PROJECTIONS:
        if targets != "all-linear" and name not in targets:
            continue
        fan_in, fan_out = shape.projection(name)
        total += r * (fan_in + fan_out // tp) if name in COLWISE else r * (fan_in // tp + fan_out)
    return total


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
) -> MemoryEstimate:
    """Per-rank bytes of the most loaded pipeline rank.

    model_config: the model's config.json as a dict. mode: full | lora | qlora. micro_batch: sequences
    per forward on one rank (batch_size / (dp x microbatches x grad_accum)). dtype_bytes: the compute
    dtype (2 for bf16, 4 for fp32). loss_parallel: the stage's loss runs on vocab-sharded logits (token
    cross-entropy at pp = 1); other losses gather the logits whole.
    """
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not one of {list(MODES)}")
    shape = Shape.from_config(model_config)
    stages = split_layers(shape.layers, parallel.pp)
    per_rank = [
        _rank_estimate(
            shape, parallel, r, stages[r], mode, seq_len, micro_batch, dtype_bytes, lora_r, lora_targets, loss_parallel
        )
        for r in range(parallel.pp)
    ]
    return max(per_rank, key=lambda e: e.total)


def _rank_estimate(
    shape: Shape,
    parallel: ParallelConfig,
    pp_rank: int,
    num_layers: int,
    mode: str,
    seq_len: int,
    micro_batch: int,
    dtype_bytes: int,
    lora_r: int,
    lora_targets,
    loss_parallel: bool,
) -> MemoryEstimate:
    tp, first, last = parallel.tp, pp_rank == 0, pp_rank == parallel.pp - 1
    sequence_parallel, vocab_parallel = tp_options(shape, parallel)
    vocab_split = tp if vocab_parallel else 1
    layer = _layer_params(shape, tp)
    # Under pp a tied lm_head is a copy of the embedding on the last stage (trained, its gradients summed
    # with the first stage's); only where one rank holds both ends (pp = 1) is it the same tensor.
    head = shape.vocab * shape.hidden if shape.tied and not first else shape.head
    outer = (shape.embedding // vocab_split if first else 0) + ((shape.hidden + head // vocab_split) if last else 0)
    base = num_layers * layer + outer
    lora = 0 if mode == "full" else num_layers * _layer_lora_params(shape, tp, lora_r, lora_targets)
    trainable = base if mode == "full" else lora

    fsdp = parallel.dp_shard if parallel.zero >= 2 else 1
    optim_shards = {0: 1, 1: parallel.dp}.get(parallel.zero, parallel.dp_shard)
    base_bytes = 0.5 if mode == "qlora" else 4
    params = int(base * base_bytes + lora * 4) // fsdp
    gathered = 0
    if parallel.zero == 2:
        gathered = (base + lora) * dtype_bytes
    elif parallel.zero == 3:
        gathered = (outer + 2 * (layer + lora // max(num_layers, 1))) * dtype_bytes

    saved, recompute = _layer_activation_elems(shape, tp, parallel.activation_checkpointing, sequence_parallel)
    tokens = micro_batch * seq_len
    activations = (_in_flight(parallel, pp_rank) * num_layers * saved + recompute) * tokens * dtype_bytes
    if last:
        sharded_logits = loss_parallel and parallel.pp == 1
        activations += tokens * shape.vocab // (vocab_split if sharded_logits else 1) * (dtype_bytes + 8)
    return MemoryEstimate(
        params=params,
        gathered=gathered,
        grads=trainable * 4 // fsdp,
        optimizer=trainable * 8 // optim_shards,
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
