"""What the orchestrator needs to know about each training-stage kind, in one table.

A recipe's `stages:` run in order. Policy stages (sft, dpo, ppo, grpo) each start from the previous policy
stage's output (the base model for the first); the last policy stage is what export, eval and the gate
see. A reward_model stage starts from the policy before it and serves the PPO/GRPO stages after it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class StageKind:
    policy: bool  # trains the policy (exported, evaluated, gated) rather than a reward model
    data: str  # rows it reads: "chat" (SFT rows), "preference" (pairs), "prompts" (chat or preference rows)
    layouts: str  # "all" layouts of the engine, "no_pp" (dp, ZeRO, tp: not pipeline stages), or "single"
    runner: str  # "module:function" with run_x(cfg, *, model_dir, data_dir, out_dir, parallel, seed, ...)
    uses_reward_model: bool = False  # gets reward_model_dir= (the latest reward_model stage before it)
    samples: bool = False  # generates with the trained model (no sequence parallelism: decoding is token by token)

    def load_runner(self) -> Callable[..., dict]:
        module, name = self.runner.split(":")
        return getattr(importlib.import_module(module), name)


KINDS: dict[str, StageKind] = {
    "sft": StageKind(policy=True, data="chat", layouts="all", runner="training.sft:run_sft"),
    "dpo": StageKind(policy=True, data="preference", layouts="all", runner="training.dpo:run_dpo"),
    "reward_model": StageKind(
        policy=False, data="preference", layouts="all", runner="training.reward:run_reward_model"
    ),
    "ppo": StageKind(
        policy=True,
        data="prompts",
        layouts="no_pp",
        runner="training.ppo:run_ppo",
        uses_reward_model=True,
        samples=True,
    ),
    "grpo": StageKind(
        policy=True,
        data="prompts",
        layouts="no_pp",
        runner="training.grpo:run_grpo",
        uses_reward_model=True,
        samples=True,
    ),
}


def stage_layout(stage, parallel):
    """The layout a stage's engine actually runs (what `hpcft plan` estimates): sequence parallelism off in
    stages that sample, vocab parallelism off for the reward model's score head, unless set explicitly."""
    if KINDS[stage.kind].samples:
        parallel = sampling_layout(parallel)
    if stage.kind == "reward_model" and parallel.vocab_parallel is None:
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
        if KINDS[stage.kind].policy == policy:
            return stage
    return None


def last_policy(stages: list):
    return previous(stages, len(stages), policy=True)


def needs_reward_model(stage) -> bool:
    """PPO/GRPO score with a reward model unless the stage names a rule-based reward function."""
    return KINDS[stage.kind].uses_reward_model and not getattr(stage, "reward_fn", None)


def _source_kinds(data) -> set[str]:
    """Row kinds the data section can produce: generated sets are known; files in `auto` may hold either."""
    kinds = set()
    for src in data.sources:
        if src.generate:
            kinds.add("preference" if src.generate == "tiny-preferences" else "chat")
        elif src.format == "preference":
            kinds.add("preference")
        elif src.format == "auto":
            kinds |= {"chat", "preference"}
        else:
            kinds.add("chat")
    return kinds


def check_stages(recipe) -> list[str]:
    """Problems with the order, data and layout of the recipe's stages, as 'field: message' lines."""
    problems = []
    stages, world = recipe.stages, recipe.parallel.world_size
    if last_policy(stages) is None:
        problems.append("stages: no policy stage (sft, dpo, ppo or grpo); export, eval and the gate need one")
    available = _source_kinds(recipe.data)
    for i, stage in enumerate(stages):
        kind = KINDS[stage.kind]
        if world > 1:  # what the engine would refuse at start-up: ZeRO without dp, 4-bit under tp, ...
            from parallel.distributed.mesh import check_layout

            for line in check_layout(recipe.parallel, getattr(stage, "mode", "full")):
                if line not in problems:
                    problems.append(line)
        if world > 1 and kind.layouts == "single":
            problems.append(
                f"stages.{i}: the {stage.kind} stage runs in one process for now, but parallel asks "
                f"for world size {world}; set parallel.dp_replicate = dp_shard = pp = tp = 1"
            )
        if recipe.parallel.pp > 1 and kind.layouts == "no_pp":
            problems.append(
                f"stages.{i}: the {stage.kind} stage trains under data, ZeRO and tensor parallelism, "
                "not pipeline stages yet; set parallel.pp = 1"
            )
        if kind.samples and recipe.parallel.tp > 1 and recipe.parallel.sequence_parallel:
            problems.append(
                f"stages.{i}: the {stage.kind} stage samples from the model token by token, which "
                "sequence parallelism cannot split; set parallel.sequence_parallel: false (or leave "
                "it unset: it is then off for this stage)"
            )
        if world > 1 and stage.kind == "dpo" and not stage.precompute_reference:
            problems.append(
                f"stages.{i}.precompute_reference: must be true under several processes (the "
                "reference log-probs are computed before the model is laid out)"
            )
        wanted = {"chat": {"chat"}, "preference": {"preference"}, "prompts": {"chat", "preference"}}[kind.data]
        if not wanted & available:
            rows = "preference rows ({prompt, chosen, rejected})" if kind.data == "preference" else "chat rows"
            problems.append(
                f"stages.{i}: the {stage.kind} stage reads {rows}, but no data.sources entry gives "
                f"them (e.g. generate: {'tiny-preferences' if kind.data == 'preference' else 'tiny-tasks'})"
            )
        if needs_reward_model(stage) and previous(stages, i, policy=False) is None:
            problems.append(
                f"stages.{i}: the {stage.kind} stage scores responses with a reward model, but no "
                "reward_model stage comes before it; add one or set reward_fn"
            )
    return problems


def plan_memory(stage, parallel, model_config: dict, dtype_bytes: int = 2):
    """Per-rank memory of a training stage (parallel.planner.MemoryEstimate): the trained model(s) under
    the layout, plus the frozen models the stage holds whole on each rank (fp32). PPO trains a critic of
    the policy's size as well, so its trained parts count twice (an estimate: the critic's head is small).
    """
    from dataclasses import replace

    from parallel.planner import estimate_memory, num_params

    split = parallel.dp * parallel.microbatches
    if stage.kind in ("ppo", "grpo"):
        rows = (stage.mini_batch_size or stage.batch_size * stage.group_size) / split
        seq_len = stage.max_prompt_len + stage.max_new_tokens
    else:
        rows = stage.batch_size * (2 if stage.kind in ("dpo", "reward_model") else 1) / (stage.grad_accum * split)
        seq_len = stage.seq_len
    layout = stage_layout(stage, parallel)
    est = estimate_memory(
        model_config,
        layout,
        mode=stage.mode,
        seq_len=seq_len,
        micro_batch=max(1, int(rows)),
        dtype_bytes=dtype_bytes,
        lora_r=stage.lora.r,
        loss_parallel=stage.kind in ("sft", "dpo"),
    )
    whole = num_params(model_config) * 4
    frozen = 0
    if stage.kind == "dpo" and stage.mode == "full" and not stage.precompute_reference:
        frozen = whole  # the reference copy
    if stage.kind in ("ppo", "grpo") and not stage.offload_frozen:
        if stage.mode == "full" and (stage.kind == "ppo" or stage.beta > 0):
            frozen += whole  # the reference copy
        if not stage.reward_fn:
            frozen += whole  # the reward model (usually the same backbone)
    if stage.kind == "ppo":
        est = replace(
            est,
            params=2 * est.params,
            gathered=2 * est.gathered,
            grads=2 * est.grads,
            optimizer=2 * est.optimizer,
            activations=2 * est.activations,
        )
    return replace(est, frozen=frozen)
