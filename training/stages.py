"""What the orchestrator and the planner need to know about each training-stage kind, in one table.

A recipe's `stages:` run in order. Policy stages (sft, dpo, simpo, orpo, kto, ppo, grpo) each start from the
previous policy stage's output (the base model for the first); the last policy stage is what export, eval
and the gate see. A reward_model stage starts from the policy before it and serves the PPO/GRPO stages after it.

Everything kind-specific that recipe validation (check_stages), `hpcft plan` (plan_memory, stage_layout)
and the jobs (runner, reward model) use is a field of the kind's StageKind row; the code below the table
reads only the row, never the kind's name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import Any, Callable

Stage = Any  # one of training.config's stage models


@dataclass(frozen=True)
class StageKind:
    policy: bool  # trains the policy (exported, evaluated, gated) rather than a reward model
    # rows it reads: "chat" (SFT rows), "preference" (pairs), "unpaired" (KTO rows), "prompts" (chat or pairs)
    data: str
    runner: str  # "module:function" with run_x(cfg, *, model_dir, data_dir, out_dir, parallel, seed, ...)
    pipeline: bool  # runs under pipeline stages (pp > 1); False: data, ZeRO and tensor parallelism only
    # (field, units, grad_accum): the global batch of one optimizer update, in `unit`s, as the stage field
    # it comes from names it, and the accumulation steps it is split into
    update_batch: Callable[[Stage], tuple[str, int, int]]
    unit: str  # what update_batch counts, in messages: sequences, pairs, rollouts, responses
    rows_per_unit: int  # model rows (sequences through the model) per unit: 2 for a pair (chosen + rejected)
    seq_len: Callable[[Stage], int]  # tokens per row
    loss_vocab_parallel: bool  # its loss runs on vocab-sharded logits under tp (token CE, DPO log-probs)
    frozen: Callable[[Stage], tuple[str, ...]]  # frozen models held whole on each rank ("reference", ...)
    trained_models: int = 1  # models of the policy's size it trains (PPO: the policy and its critic)
    uses_reward_model: bool = False  # gets reward_model_dir= (the latest reward_model stage before it)
    samples: bool = False  # generates with the trained model (no sequence parallelism: decoding is token by token)
    score_head: bool = False  # trains a scalar head, not the vocabulary: vocab parallelism off unless set
    # problems of the stage's own fields under a layout, as '<field>: message' lines (relative to the stage)
    stage_problems: Callable[[Stage, Any], list[str]] = lambda stage, parallel: []

    def load_runner(self) -> Callable[..., dict]:
        module, name = self.runner.split(":")
        return getattr(importlib.import_module(module), name)


def _accumulated(stage) -> tuple[str, int, int]:
    return "batch_size", stage.batch_size, stage.grad_accum


def _no_frozen(stage) -> tuple[str, ...]:
    return ()


def _rl_frozen(stage, reference: bool) -> tuple[str, ...]:
    """PPO/GRPO: the reference (full fine-tuning; LoRA's reference is the policy with its adapters off) and
    the reward model (unless a rule scores), both on CPU between forwards with offload_frozen."""
    if stage.offload_frozen:
        return ()
    return (("reference",) if reference and stage.mode == "full" else ()) + (
        () if stage.reward_fn else ("reward model",)
    )


def _dpo_precompute(stage, parallel) -> list[str]:
    if parallel.world_size > 1 and not stage.precompute_reference:
        return [
            "precompute_reference: must be true under several processes (the "
            "reference log-probs are computed before the model is laid out)"
        ]
    return []


def _row_stage(**facts) -> StageKind:
    """A kind that trains on fixed-length rows of its data (seq_len tokens each), batch_size units per optimizer
    step accumulated over grad_accum; it runs under every layout, pipeline stages included."""
    return StageKind(pipeline=True, update_batch=_accumulated, seq_len=lambda s: s.seq_len, **facts)


def _sampling_stage(**facts) -> StageKind:
    """A policy kind that samples responses to prompts and trains on them (rows of prompt + response, one
    per unit), scored by a reward model or a rule; dp, ZeRO and tp only, no sequence parallelism."""
    return StageKind(
        policy=True,
        data="prompts",
        pipeline=False,
        rows_per_unit=1,
        seq_len=lambda s: s.max_prompt_len + s.max_new_tokens,
        loss_vocab_parallel=False,
        uses_reward_model=True,
        samples=True,
        **facts,
    )


# How to add a stage kind: its config model in training/config.py (a StageConfig subclass with
# `kind: Literal["<kind>"]`, added to the TrainStage union), its runner module (run_<kind>: setup through
# learner.Learner, training.loop.train_loop, skeleton.StageRun to finish), and one row here that answers
# every StageKind field without a default (no fact is guessed for a kind the table does not know: kind_of
# raises).
KINDS: dict[str, StageKind] = {
    "sft": _row_stage(
        policy=True,
        data="chat",
        runner="training.sft:run_sft",
        unit="sequences",
        rows_per_unit=1,
        loss_vocab_parallel=True,
        frozen=_no_frozen,
    ),
    "dpo": _row_stage(
        policy=True,
        data="preference",
        runner="training.dpo:run_dpo",
        unit="pairs",
        rows_per_unit=2,
        loss_vocab_parallel=True,
        # full fine-tuning holds a reference copy unless its log-probs are precomputed (then it is freed)
        frozen=lambda s: ("reference",) if s.mode == "full" and not s.precompute_reference else (),
        stage_problems=_dpo_precompute,
    ),
    # reference-free: the policy's own mean log-probs, no frozen model
    "simpo": _row_stage(
        policy=True,
        data="preference",
        runner="training.reference_free:run_simpo",
        unit="pairs",
        rows_per_unit=2,
        loss_vocab_parallel=True,
        frozen=_no_frozen,
    ),
    "orpo": _row_stage(
        policy=True,
        data="preference",
        runner="training.reference_free:run_orpo",
        unit="pairs",
        rows_per_unit=2,
        loss_vocab_parallel=True,
        frozen=_no_frozen,
    ),
    # unpaired rows, each with a mismatched row for the KL estimate (scored without gradient)
    "kto": _row_stage(
        policy=True,
        data="unpaired",
        runner="training.kto:run_kto",
        unit="rows",
        rows_per_unit=1,
        loss_vocab_parallel=True,
        frozen=lambda s: ("reference",) if s.mode == "full" and not s.precompute_reference else (),
        stage_problems=_dpo_precompute,
    ),
    "reward_model": _row_stage(
        policy=False,
        data="preference",
        runner="training.reward:run_reward_model",
        unit="pairs",
        rows_per_unit=2,
        loss_vocab_parallel=False,
        frozen=_no_frozen,
        score_head=True,
    ),
    "ppo": _sampling_stage(
        runner="training.ppo:run_ppo",
        update_batch=lambda s: ("mini_batch_size", s.mini_batch_size, 1),
        unit="rollouts",
        frozen=lambda s: _rl_frozen(s, reference=True),
        trained_models=2,  # a critic of the policy's size (an estimate: its value head is small)
    ),
    "grpo": _sampling_stage(
        runner="training.grpo:run_grpo",
        update_batch=lambda s: (
            ("mini_batch_size", s.mini_batch_size, 1)
            if s.mini_batch_size
            else ("batch_size x group_size", s.batch_size * s.group_size, 1)
        ),
        unit="responses",
        frozen=lambda s: _rl_frozen(s, reference=s.beta > 0),  # beta = 0 drops the reference
    ),
}


def kind_of(stage_or_kind) -> StageKind:
    """The table row of a stage (or a kind name); a kind the table does not know is an error."""
    name = stage_or_kind if isinstance(stage_or_kind, str) else stage_or_kind.kind
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(
            f"unknown training stage kind {name!r}; known kinds: {', '.join(KINDS)} (add a row to "
            "training.stages.KINDS)"
        ) from None


def stage_layout(stage, parallel):
    """The layout a stage's engine actually runs (what `hpcft plan` estimates): sequence parallelism off in
    stages that sample, vocab parallelism off for a score head, unless set explicitly."""
    kind = kind_of(stage)
    if kind.samples:
        parallel = sampling_layout(parallel)
    if kind.score_head and parallel.vocab_parallel is None:
        parallel = parallel.model_copy(update={"vocab_parallel": False})
    return parallel


def sampling_layout(parallel):
    """The layout of a stage that samples from its model: sequence parallelism off unless asked for
    (which recipe validation refuses)."""
    if parallel.sequence_parallel is None:
        return parallel.model_copy(update={"sequence_parallel": False})
    return parallel


def previous(stages: list, index: int, *, policy: bool):
    """The latest stage before stages[index] that is (policy=True) or is not (False) a policy stage."""
    for stage in reversed(stages[:index]):
        if kind_of(stage).policy == policy:
            return stage
    return None


def last_policy(stages: list):
    return previous(stages, len(stages), policy=True)


def needs_reward_model(stage) -> bool:
    """PPO/GRPO score with a reward model unless the stage names a rule-based reward function."""
    return kind_of(stage).uses_reward_model and not getattr(stage, "reward_fn", None)


GENERATED_KINDS = {"tiny-tasks": "chat", "tiny-preferences": "preference", "tiny-unpaired": "unpaired"}
ROWS = {  # row kind -> (how a message names its rows, a generated source that gives them)
    "chat": ("chat rows", "tiny-tasks"),
    "preference": ("preference rows ({prompt, chosen, rejected})", "tiny-preferences"),
    "unpaired": ("unpaired rows ({prompt, completion, label})", "tiny-unpaired"),
}


def _source_kinds(data) -> set[str]:
    """Row kinds the data section can produce: generated sets are known; files in `auto` may hold either."""
    kinds = set()
    for src in data.sources:
        if src.synthesize is not None:
            kinds.add("chat")
        elif src.generate:
            kinds.add(GENERATED_KINDS[src.generate])
        elif src.format in ("preference", "unpaired"):
            kinds.add(src.format)
        elif src.format == "auto":
            kinds |= {"chat", "preference", "unpaired"}
        else:
            kinds.add("chat")
    return kinds


def stage_optimizer(stage) -> str:
    """The optimizer whose rules the stage's layout obeys: PPO's critic has one of its own, and an 8-bit
    one of either brings the 8-bit rules."""
    optims = (stage.optim, getattr(stage, "critic_optim", stage.optim))
    return next((o.optimizer for o in optims if o.optimizer != "adamw"), "adamw")


def stage_layout_problems(stage, parallel, *, world: int | None = None, model_config=None) -> list[str]:
    """parallel.layout.layout_problems for one stage: its mode, its kind's pipeline rule and batch split."""
    from parallel.layout import layout_problems

    kind = kind_of(stage)
    field, units, grad_accum = kind.update_batch(stage)
    optimizer = stage_optimizer(stage)
    return layout_problems(
        parallel,
        mode=stage.mode,
        world=world,
        model_config=model_config,
        pipeline=kind.pipeline,
        batch_rows=units,
        grad_accum=grad_accum,
        unit=kind.unit,
        stage=stage.kind,
        batch_field=field,
        optimizer=optimizer,
    )


def check_stage_layout(stage, parallel, *, world: int, model_config=None) -> None:
    """What a stage runner checks once at start-up, before loading data: the layout against the `world`
    processes running and the model (a HF config), the kind's pipeline and batch-split rules, and the
    kind's own rules (dpo: precompute_reference under several processes). Raises ValueError('; '-joined)."""
    problems = stage_layout_problems(stage, parallel, world=world, model_config=model_config)
    problems += kind_of(stage).stage_problems(stage, parallel)
    if problems:
        raise ValueError("; ".join(problems))


def deepspeed_problems(stages: list, parallel, user: dict, where: str) -> list[str]:
    """A user's ds_config (parallel.deepspeed_config, read into `user`) against each stage's batch, optimizer
    and clipping and the layout's ZeRO stage: the keys hpcft owns that disagree (parallel.deepspeed_config)."""
    from parallel.deepspeed_config import Owned, conflicts

    problems = []
    for i, stage in enumerate(stages):
        _, units, grad_accum = kind_of(stage).update_batch(stage)
        accum = parallel.microbatches * grad_accum
        split = parallel.dp * accum
        optim = stage.optim
        owned = Owned(
            train_batch_size=units,
            micro_batch=units // split if units % split == 0 else None,
            grad_accum=accum,
            lr=optim.lr,
            betas=tuple(optim.betas),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            grad_clip=optim.grad_clip,
            # bf16 is the GPU default under `auto`: only an explicit fp32/bf16 is checked here
            bf16=parallel.mixed_precision == "bf16" if parallel.mixed_precision != "auto" else None,
            zero=parallel.zero,
            stage=f"stages.{i}",
        )
        for line in conflicts(user, owned, where=where):
            if line not in problems:
                problems.append(line)
    return problems


def check_stages(recipe, model_config=None) -> list[str]:
    """Problems with the order, data and layout of the recipe's stages, as 'field: message' lines.

    model_config: the base model's config.json (a dict), when it can be read, for the model-shape rules.
    """
    problems = []
    stages, parallel = recipe.stages, recipe.parallel
    if last_policy(stages) is None:
        *some, last = [name for name, kind in KINDS.items() if kind.policy]
        problems.append(f"stages: no policy stage ({', '.join(some)} or {last}); export, eval and the gate need one")
    available = _source_kinds(recipe.data)
    for i, stage in enumerate(stages):
        kind = kind_of(stage)
        # what the engine would refuse at start-up (no world yet: the processes are not started)
        for line in stage_layout_problems(stage, parallel, model_config=model_config):
            if line not in problems:
                problems.append(line)
        problems += [f"stages.{i}.{line}" for line in kind.stage_problems(stage, parallel)]
        if kind.samples and parallel.tp > 1 and parallel.sequence_parallel:
            problems.append(
                f"stages.{i}: the {stage.kind} stage samples from the model token by token, which "
                "sequence parallelism cannot split; set parallel.sequence_parallel: false (or leave "
                "it unset: it is then off for this stage)"
            )
        wanted = {"prompts": {"chat", "preference"}}.get(kind.data, {kind.data})
        if not wanted & available:
            rows, generated = ROWS["chat" if kind.data == "prompts" else kind.data]
            given = " and ".join(ROWS[k][0] for k in sorted(available)) or "no rows"
            problems.append(
                f"stages.{i}: the {stage.kind} stage reads {rows}, but the data.sources give only {given} "
                f"(e.g. generate: {generated})"
            )
        if needs_reward_model(stage) and previous(stages, i, policy=False) is None:
            problems.append(
                f"stages.{i}: the {stage.kind} stage scores responses with a reward model, but no "
                "reward_model stage comes before it; add one or set reward_fn"
            )
    return problems


def packs(stage, parallel) -> bool:
    """Whether the stage packs the examples of a step into rows (its `packing` field, SFT): not under
    pipeline stages (pp > 1), which take no position_ids to keep packed documents apart."""
    return bool(getattr(stage, "packing", False)) and parallel.pp == 1


def split_rows(stage, manifest: dict) -> int | None:
    """The train rows a stage reads according to the data stage's manifest.json (None: not in it): chat
    rows, preference pairs, or prompts (chat rows, else the pairs' prompts, as hpc.jobs hands them)."""
    chat = (manifest.get("splits") or {}).get("train")
    pairs = ((manifest.get("preference") or {}).get("splits") or {}).get("train")
    data = kind_of(stage).data
    if data == "chat":
        return chat
    if data in ("preference", "unpaired"):
        return ((manifest.get(data) or {}).get("splits") or {}).get("train")
    return chat or pairs


def plan_lines(stage, parallel, train_rows: int | None = None) -> list[str]:
    """What `hpcft plan` says of a stage's steps and rows: its step count when num_epochs sets it
    (estimated from train_rows, the manifest's count, when the data stage has run) and whether it packs."""
    from training.batching import steps_for_epochs

    lines = []
    if stage.num_epochs is not None:
        epochs = f"num_epochs {stage.num_epochs:g}"
        per_epoch = train_rows // stage.batch_size if train_rows is not None else None
        if per_epoch is None:
            lines.append(f"{epochs} (steps computed from the train split at stage start)")
        elif per_epoch == 0:
            lines.append(f"{epochs}: the {train_rows} train rows do not fill one batch of {stage.batch_size}")
        else:
            lines.append(
                f"{epochs}: about {steps_for_epochs(stage.num_epochs, per_epoch)} steps ({per_epoch} per epoch "
                f"from the {train_rows} train rows in the data manifest; exact at stage start, after rows "
                "that cannot train are dropped and with data.sources weights)"
            )
    if hasattr(stage, "packing"):
        if packs(stage, parallel):
            lines.append(f"packing on: a step's sequences in rows of at most {stage.seq_len} tokens")
        elif stage.packing:
            lines.append("packing off under pipeline stages (pp > 1), which take no position_ids")
    return lines


def plan_memory(stage, parallel, model_config: dict, dtype_bytes: int = 2):
    """Per-rank memory of a training stage (parallel.planner.MemoryEstimate): the trained model(s) under
    the layout, plus the frozen models the stage holds whole on each rank (fp32). A kind that trains a
    second model of the policy's size (PPO's critic) counts its trained parts that many times.
    """
    from parallel.planner import estimate_memory, num_params

    kind = kind_of(stage)
    _, units, grad_accum = kind.update_batch(stage)
    rows = units * kind.rows_per_unit / (grad_accum * parallel.dp * parallel.microbatches)
    est = estimate_memory(
        model_config,
        stage_layout(stage, parallel),
        mode=stage.mode,
        seq_len=kind.seq_len(stage),
        micro_batch=max(1, int(rows)),
        dtype_bytes=dtype_bytes,
        lora_r=stage.lora.r,
        loss_parallel=kind.loss_vocab_parallel,
        token_loss=stage.kind == "sft",
    )
    n = kind.trained_models
    # bitsandbytes' 8-bit AdamW: two 1-byte moments (+ a block scale per 256 values) instead of two fp32 ones
    optimizer_bytes = est.optimizer // 4 if stage.optim.optimizer != "adamw" else est.optimizer
    est = replace(
        est,
        params=n * est.params,
        gathered=n * est.gathered,
        grads=n * est.grads,
        optimizer=n * optimizer_bytes,
        activations=n * est.activations,
    )
    return replace(est, frozen=len(kind.frozen(stage)) * num_params(model_config) * 4)


def plan_deepspeed_memory(stage, parallel, model_config: dict, *, bf16: bool = True):
    """(with the recipe's offload, with none): parallel.deepspeed_plan estimates of a stage under
    parallel.engine: deepspeed, accelerator and host bytes per rank."""
    from parallel import deepspeed_plan
    from parallel.planner import num_params

    native = plan_memory(stage, parallel, model_config, dtype_bytes=2 if bf16 else 4)
    total = num_params(model_config)
    trainable = total
    if stage.mode != "full":
        from parallel.planner import Shape, _layer_lora_params

        shape = Shape.from_config(model_config)
        trainable = shape.layers * _layer_lora_params(shape, 1, stage.lora.r, stage.lora.target_modules)
    n = kind_of(stage).trained_models
    off = parallel.offload
    common = dict(total_params=n * total, trainable_params=n * trainable, zero=parallel.zero, dp=parallel.dp, bf16=bf16)
    with_offload = deepspeed_plan.estimate(
        native,
        offload_optimizer=off.optimizer if off else "none",
        offload_params=off.params if off else "none",
        **common,
    )
    return with_offload, deepspeed_plan.estimate(native, **common)


def stage_defaults(stage, parallel, model_config: dict | None, device_type: str, device_bytes: int | None = None):
    """parallel.defaults.resolve_defaults for one stage (its mode, optimizer, whether it samples) on
    `device_type`; with model_config and device_bytes the planner's per-rank memory of the stage decides
    whether activation checkpointing is needed."""
    from parallel.defaults import resolve_defaults

    per_rank = None
    if model_config is not None:
        bf16 = parallel.mixed_precision != "fp32"

        def per_rank(layout) -> int:
            if layout.engine == "deepspeed":
                return plan_deepspeed_memory(stage, layout, model_config, bf16=bf16)[0].gpu.total
            return plan_memory(stage, layout, model_config, dtype_bytes=2 if bf16 else 4).total

    return resolve_defaults(
        parallel,
        device_type,
        mode=stage.mode,
        optimizer=stage_optimizer(stage),
        samples=kind_of(stage).samples,
        device_bytes=device_bytes,
        per_rank_bytes=per_rank,
    )
