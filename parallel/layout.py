"""The one layout check: can a training run use this parallel layout? Problems come back as
'parallel.<field>: message' lines (stage fields as 'stages (<kind>).<field>'), so recipe validation and
the engine at start-up refuse the same layouts with the same words.

Callers pass what they know:
- recipe validation (training.stages.check_stages, once per stage): world=None (no process is running
  yet), the stage's mode, the base model's config.json when it can be read, whether the stage kind can
  run pipeline stages, and its batch per optimizer update;
- the engine, once, when a stage lays its model out: world = the processes actually running, and the
  model's HF config.

Rules, in the order they are reported: world size (only when `world` is known); degrees and schedule;
a 4-bit (QLoRA) base; the model's shape; the stage kind (pipeline); the batch split.
"""

from __future__ import annotations

from typing import Any

from parallel.dims import ParallelConfig

MODES = ("full", "lora", "qlora")
INTERLEAVED = ("interleaved_1f1b", "zero_bubble")  # schedules that hold two stages per pp rank


def layout_problems(
    parallel: ParallelConfig,
    *,
    mode: str = "full",
    world: int | None = None,
    model_config: Any = None,
    pipeline: bool = True,
    batch_rows: int | None = None,
    grad_accum: int = 1,
    unit: str = "sequences",
    stage: str | None = None,
    batch_field: str = "batch_size",
    optimizer: str = "adamw",
) -> list[str]:
    """Problems of `parallel` for one training run, as 'parallel.<field>: message' lines (empty: fine).

    mode: full | lora | qlora. world: the number of processes actually running (None: not known yet, as
    in recipe validation; the world-size rules are skipped). model_config: the model's HF config (an
    object or the config.json dict) for the model-shape rules. pipeline: False for stage kinds that cannot
    run under pp > 1. batch_rows: the global batch per optimizer update, in `unit`s (sequences, pairs,
    ...), checked to split into dp x parallel.microbatches x grad_accum equal micro-batches. stage: the
    stage kind the stage-dependent messages name; batch_field: the stage field batch_rows comes from.
    optimizer: the stage's optim.optimizer (the 8-bit ones step plain tensors only).
    """
    if mode not in MODES:
        return [f"mode: {mode!r} is not one of {list(MODES)}"]
    problems = world_problems(parallel, world) if world is not None else []
    problems += _degree_problems(parallel)
    problems += engine_problems(parallel, mode)
    if mode == "qlora":
        problems += _quantized_problems(parallel)
    if optimizer != "adamw":
        problems += _8bit_optimizer_problems(parallel, optimizer)
        if parallel.fused_optimizer is True:
            problems.append(f"parallel.fused_optimizer: fuses torch's AdamW, not optim.optimizer {optimizer}")
    if model_config is not None:
        problems += model_problems(parallel, model_config)
    if not pipeline and parallel.pp > 1:
        problems.append(
            f"parallel.pp: {_the(stage)} trains under data, ZeRO and tensor parallelism, not pipeline "
            "stages yet; set pp = 1"
        )
    if batch_rows is not None:
        problems += _split_problems(parallel, batch_rows, grad_accum, unit, stage, batch_field)
    return problems


def check_layout(parallel: ParallelConfig, **kwargs) -> None:
    """Raise ValueError('; '.join(problems)) for the layout_problems(parallel, **kwargs) found."""
    problems = layout_problems(parallel, **kwargs)
    if problems:
        raise ValueError("; ".join(problems))


def _the(stage: str | None) -> str:
    return f"the {stage} stage" if stage else "this stage"


# --- world size: what the processes started can run (the engine knows `world`; recipe validation not) --


def world_problems(parallel: ParallelConfig, world: int) -> list[str]:
    """The layout's degrees against the `world` processes started."""
    if parallel.world_size > 1 and world == 1:
        return [
            f"parallel: world size {parallel.world_size} (dp_replicate={parallel.dp_replicate}, "
            f"dp_shard={parallel.dp_shard}, pp={parallel.pp}, tp={parallel.tp}) needs {parallel.world_size} "
            "processes, but torch.distributed is not initialised in this one; run the stage with the local "
            "or slurm executor, which starts one task per rank"
        ]
    if parallel.world_size != world:
        return [world_mismatch(parallel, world)]
    return []


def world_mismatch(parallel: ParallelConfig, world: int) -> str:
    return (
        f"parallel: dp_replicate={parallel.dp_replicate} x dp_shard={parallel.dp_shard} x pp={parallel.pp} x "
        f"tp={parallel.tp} = {parallel.world_size}, but {world} processes were started"
    )


# --- degrees and schedule: the layout alone ----------------------------------------------------------


def _degree_problems(cfg: ParallelConfig) -> list[str]:
    problems = []
    # DeepSpeed runs ZeRO on one rank too (one GPU + offload: a model larger than its memory).
    native = cfg.engine == "native"
    if native and cfg.zero >= 2 and cfg.dp_shard == 1:
        problems.append(
            f"parallel.zero: ZeRO-{cfg.zero} shards parameters over parallel.dp_shard, "
            "which is 1 (raise dp_shard or use zero 0/1)"
        )
    if native and cfg.zero == 1 and cfg.dp == 1:
        problems.append(
            "parallel.zero: ZeRO-1 shards optimizer state over data-parallel ranks, but "
            "dp_replicate x dp_shard is 1 (use zero: 0)"
        )
    if cfg.pp > 1 and cfg.microbatches < cfg.pp:
        problems.append(
            f"parallel.microbatches: {cfg.microbatches} micro-batches cannot fill "
            f"{cfg.pp} pipeline stages (use at least {cfg.pp})"
        )
    if cfg.pp > 1 and cfg.pp_schedule in INTERLEAVED and cfg.microbatches % cfg.pp:
        problems.append(
            f"parallel.microbatches: the {cfg.pp_schedule} schedule needs a multiple of "
            f"parallel.pp ({cfg.pp}), got {cfg.microbatches}"
        )
    if cfg.compile is True and cfg.tp > 1:
        problems.append(
            "parallel.compile: torch.compile of tensor-parallel blocks fails in backward (or, with "
            "sequence parallelism, gives wrong gradients) on this torch; use compile: false with tp > 1"
        )
    if native and cfg.fused_optimizer is True and (cfg.zero >= 2 or cfg.tp > 1):
        problems.append(
            "parallel.fused_optimizer: the fused AdamW steps plain tensors; ZeRO-2/3 and tp shard parameters "
            "as DTensors (use fused_optimizer: auto or false)"
        )
    return problems


# --- the engine: native, or DeepSpeed for data-parallel layouts ------------------------------------------


def engine_problems(cfg: ParallelConfig, mode: str = "full") -> list[str]:
    """What parallel.engine: deepspeed cannot run, and the DeepSpeed-only fields without it."""
    if cfg.engine == "native":
        problems = []
        if cfg.offload is not None and (cfg.offload.optimizer != "none" or cfg.offload.params != "none"):
            problems.append(
                "parallel.offload: offloading to the host or NVMe runs on DeepSpeed; set parallel.engine: deepspeed "
                "(the native engine keeps everything on the accelerator and shards it with zero 1-3)"
            )
        if cfg.deepspeed_config is not None:
            problems.append("parallel.deepspeed_config: a ds_config is read only with parallel.engine: deepspeed")
        return problems
    native = "; use parallel.engine: native for it"
    problems = []
    if cfg.pp > 1:
        problems.append(
            "parallel.pp: the deepspeed engine runs data-parallel layouts (dp_shard x ZeRO 0-3); DeepSpeed's "
            "pipeline engine cannot combine with ZeRO-2/3" + native
        )
    if cfg.tp > 1:
        problems.append("parallel.tp: the deepspeed engine runs data-parallel layouts (dp_shard x ZeRO 0-3)" + native)
    if cfg.dp_replicate > 1:
        problems.append(
            "parallel.dp_replicate: the deepspeed engine shards over all data-parallel ranks; put them in "
            "dp_shard (or use parallel.engine: native for HSDP)"
        )
    if cfg.compile is True:
        problems.append("parallel.compile: compiled blocks run on parallel.engine: native")
    if cfg.fused_optimizer is True:
        problems.append("parallel.fused_optimizer: DeepSpeed builds its own optimizer; use parallel.engine: native")
    if cfg.loss_chunk_tokens:
        problems.append("parallel.loss_chunk_tokens: the chunked token loss runs on parallel.engine: native")
    if mode == "qlora":
        problems.append(
            "mode: qlora (a 4-bit bitsandbytes base) runs on parallel.engine: native; use mode: lora under DeepSpeed"
        )
    off = cfg.offload
    if off is not None:
        if off.optimizer != "none" and cfg.zero == 0:
            problems.append(
                "parallel.offload.optimizer: ZeRO-Offload needs parallel.zero 1, 2 or 3 (it offloads the "
                "partitioned optimizer state)"
            )
        if off.params != "none" and cfg.zero != 3:
            problems.append("parallel.offload.params: parameter offload needs parallel.zero: 3")
        if "nvme" in (off.optimizer, off.params) and not off.nvme_path:
            problems.append("parallel.offload.nvme_path: offloading to nvme needs a directory on a local NVMe disk")
    return problems


# --- a 4-bit quantized base (mode: qlora) -------------------------------------------------------------


def _quantized_problems(cfg: ParallelConfig) -> list[str]:
    problems = []
    if cfg.tp > 1:
        problems.append(
            "parallel.tp: 4-bit quantized (QLoRA) base weights cannot be tensor-sharded; "
            "use tp: 1 and scale with dp_replicate/dp_shard"
        )
    if cfg.pp > 1:
        problems.append(
            "parallel.pp: pipeline stages of a 4-bit quantized (QLoRA) base are not supported "
            "yet; use pp: 1 and scale with dp_replicate/dp_shard"
        )
    if cfg.zero >= 2:
        problems.append(
            "parallel.zero: 4-bit quantized (QLoRA) base weights cannot be sharded by FSDP here; use zero 0 or 1"
        )
    return problems


def _8bit_optimizer_problems(cfg: ParallelConfig, optimizer: str) -> list[str]:
    # bitsandbytes' 8-bit kernels take plain tensors; FSDP and tp parameters are DTensors.
    refused = f"optim.optimizer {optimizer} (bitsandbytes) steps plain tensors, not the DTensor parameters of"
    if cfg.engine == "deepspeed":
        return [
            f"optim.optimizer: {optimizer} runs on parallel.engine: native; DeepSpeed steps hpcft's AdamW (its "
            "CPU Adam when parallel.offload.optimizer moves the state to the host, which saves more GPU memory)"
        ]
    problems = []
    if cfg.zero >= 2:
        problems.append(f"parallel.zero: {refused} ZeRO-{cfg.zero}; use zero 0 or 1, or optim.optimizer adamw")
    if cfg.tp > 1:
        problems.append(f"parallel.tp: {refused} tensor parallelism; use tp 1, or optim.optimizer adamw")
    return problems


# --- the model's shape ---------------------------------------------------------------------------------


def num_virtual_stages(cfg: ParallelConfig) -> int:
    """Pipeline stages in total: interleaved schedules hold two stages per pp rank."""
    if cfg.pp == 1:
        return 1
    return cfg.pp * (2 if cfg.pp_schedule in INTERLEAVED else 1)


SHAPE_KEYS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")
# What pipeline stages reproduce (layer types: full or sliding-window attention) or cannot (the others).
STAGE_KEYS = ("layer_types", "use_bidirectional_attention", "logit_scale", "output_multiplier_scale")
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # expert counts across families
PP_LAYER_TYPES = ("full_attention", "sliding_attention")
# model_type -> what the tensor-parallel plan (parallel.distributed.tensor_parallel) cannot split exactly;
# the engine finds the same, and any family not named here, from the layers' modules (tp_plan_problem).
_NORMS = "q/k norms across all heads, which tp would split"
NO_TP = {  # (Phi-3's fused projections are split exactly: tensor_parallel._parallelize_fused)
    "olmo2": _NORMS,
    "olmo3": _NORMS,
    "apertus": "an activation with its own weights, which would see only this rank's features",
}


def resolve_model_config(model_config: Any) -> Any:
    """The model config the shape rules read, the same in recipe validation (config.json as a dict) and in
    the job (a HF config object): a dict missing one of SHAPE_KEYS is completed with its model_type's HF
    config class defaults, as AutoConfig.from_pretrained does in the job (Gemma's classes default to
    tie_word_embeddings true and its config.json files leave the key out: read raw, a tied model looked
    untied). A composite config (a `text_config` inside) stands for its text decoder."""
    if not isinstance(model_config, dict):
        return getattr(model_config, "text_config", None) or model_config
    if "num_hidden_layers" not in model_config and isinstance(model_config.get("text_config"), dict):
        model_config = model_config["text_config"]
    model_type = model_config.get("model_type")
    if not model_type or all(key in model_config for key in SHAPE_KEYS):
        return model_config
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        config = CONFIG_MAPPING[model_type].from_dict(model_config)
    except Exception:  # an unknown model_type or a config its class refuses: the raw values
        return model_config
    return {**model_config, **{key: getattr(config, key, None) for key in (*SHAPE_KEYS, *STAGE_KEYS, *MOE_KEYS)}}


def _config_value(model_config: Any, key: str, default=None):
    if isinstance(model_config, dict):
        value = model_config.get(key)
    else:
        value = getattr(model_config, key, None)
    return default if value is None else value


def is_tied(model_config: Any) -> bool:
    """Whether the model's lm_head is its input embedding's weight (tie_word_embeddings, class defaults
    included: see resolve_model_config)."""
    return bool(_config_value(resolve_model_config(model_config), "tie_word_embeddings", False))


def model_problems(cfg: ParallelConfig, model_config: Any) -> list[str]:
    """Problems of a layout for one model (a HF config object or its config.json dict): heads and KV heads
    split by tp, layers enough for the pipeline stages, a vocabulary split by tp.

    Tied embeddings (lm_head = the input embedding) train under every layout: under pp the first and the
    last stage each hold a copy whose gradients the trainer sums, under vocab parallelism both ends split
    the vocabulary alike."""
    model_config = resolve_model_config(model_config)
    layers = _config_value(model_config, "num_hidden_layers")
    heads = _config_value(model_config, "num_attention_heads")
    kv_heads = _config_value(model_config, "num_key_value_heads", heads)
    vocab = _config_value(model_config, "vocab_size")
    problems = []
    if cfg.tp > 1 and cfg.vocab_parallel and vocab and vocab % cfg.tp:
        problems.append(
            f"parallel.vocab_parallel: the vocabulary ({vocab}) does not divide by "
            f"tp={cfg.tp}; leave vocab_parallel unset or false"
        )
    if heads and (kv_heads % cfg.tp or heads % cfg.tp):
        problems.append(
            f"parallel.tp: {cfg.tp} must divide the model's {heads} attention heads and {kv_heads} KV heads"
        )
    experts = max((_config_value(model_config, key, 0) for key in MOE_KEYS), default=0)
    if experts > 1:
        return problems + [
            f"parallel.{axis}: the model is a mixture of experts ({experts} experts); expert parallelism is "
            f"not supported yet, so it trains with experts unsplit under data parallelism and ZeRO: set {axis}: 1"
            for axis in ("tp", "pp")
            if getattr(cfg, axis) > 1
        ]
    why = NO_TP.get(_config_value(model_config, "model_type"))
    if cfg.tp > 1 and why:
        problems.append(f"parallel.tp: the model has {why}; use tp: 1 (pp and ZeRO work)")
    stages = num_virtual_stages(cfg)
    if layers and stages > layers:
        problems.append(
            f"parallel.pp: {stages} pipeline stages ({cfg.pp_schedule}) but the model has only {layers} layers"
        )
    if cfg.pp > 1:
        problems += _stage_problems(model_config)
    return problems


def _stage_problems(model_config: Any) -> list[str]:
    """What pipeline stages (parallel.distributed.pipeline.StageModule: the model's layers between its
    embedding and its head, with the masks, rotary embeddings and logit transforms it knows) would silently
    compute differently from the model's own forward."""
    skipped = []
    other_types = sorted(set(_config_value(model_config, "layer_types") or ()) - set(PP_LAYER_TYPES))
    if other_types:
        skipped.append(f"its {', '.join(other_types)} layers")
    if _config_value(model_config, "use_bidirectional_attention"):
        skipped.append("its bidirectional attention")
    for key in ("logit_scale", "output_multiplier_scale"):
        if _config_value(model_config, key, 1) not in (1, 1.0):
            skipped.append(f"its {key}")
    if not skipped:
        return []
    return [f"parallel.pp: pipeline stages would skip {' and '.join(skipped)}; use pp: 1"]


# --- the batch: every dp rank runs microbatches x grad_accum equal micro-batches of whole units -------


def _split_problems(
    cfg: ParallelConfig, rows: int, grad_accum: int, unit: str, stage: str | None, field: str
) -> list[str]:
    parts = cfg.dp * cfg.microbatches * grad_accum
    if rows % parts == 0:
        return []
    where = f"stages ({stage}).{field}" if stage else field
    return [
        f"{where}: {rows} {unit} do not split into dp={cfg.dp} x parallel.microbatches={cfg.microbatches} "
        f"x grad_accum={grad_accum} equal micro-batches; use a multiple of {parts}"
    ]
