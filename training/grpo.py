"""GRPO: group-relative policy optimisation, PPO without a critic.

Each step samples group_size responses per prompt and scores them; a response's advantage is its score
minus its group's mean (divided by the group's std with scale_rewards), the same at every token. The
loss is the clipped surrogate (token mean over the mini-batch) plus beta x the k3 estimate of
KL(policy || reference) at the sampled tokens. beta = 0 drops the reference model entirely.

Under torch.distributed (dp, ZeRO 0-3, tp; not pp) the policy is laid out by the engine's
Trainer: each dp rank samples its share of the rollouts (tp ranks of a dp group draw the same
samples; generation keeps the ranks in lockstep), the responses are gathered so every rank holds the
whole batch, advantages are computed over it, and each update is one Trainer step on the
global mini-batch with the loss as a token mean over the whole mini-batch, as in one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from parallel import engine
from parallel.dims import ParallelConfig
from training.batching import resolve_max_steps
from training.config import GRPOStage
from training.data import EpochBatches
from training.frozen import Reference, RewardScorer, build_reward, check_reward_source, reward_flops_per_token, score
from training.learner import Learner
from training.loop import Checkpoints, train_loop
from training.losses import grpo_advantages
from training.prompts import Prompt, PromptStats, load_prompt_data
from training.resume import Resumer
from training.rollout import (
    LAST_ONLY,
    ClippedPolicyObjective,
    build_policy,
    evaluate,
    finish_policy_run,
    minibatches,
    policy_sampler,
    reference_logprobs,
    response_logprobs_of,
)
from training.sampling import Sampler, rollout_rows, sample_rollouts
from training.skeleton import Progress, StageRun, check_stage


@dataclass
class Session:
    """Everything the loop needs, built once by `setup`."""

    cfg: GRPOStage  # the stage's config, max_steps resolved when num_epochs sets it
    policy_learner: Learner  # the policy and its updates, in one process or laid out over the ranks
    reference: Reference | None  # None when beta is 0
    reward: RewardScorer
    reward_source: str
    tokenizer: object
    sampler: Sampler
    runtime: engine.Runtime
    train_prompts: list[Prompt]
    batches: EpochBatches
    val_prompts: list[Prompt]
    data_stats: dict[str, PromptStats]
    seed: int = 0

    @property
    def policy(self):
        return self.policy_learner.model


def mini_batch_size(cfg: GRPOStage) -> int:
    return cfg.mini_batch_size or cfg.batch_size * cfg.group_size


def GRPOObjective(cfg: GRPOStage) -> ClippedPolicyObjective:
    """Clipped surrogate + beta x k3 KL per response token (a response's advantage at all its tokens)."""
    return ClippedPolicyObjective(clip_eps=cfg.clip_eps, temperature=cfg.temperature, kl_beta=cfg.beta)


def run_grpo(cfg: GRPOStage, **where) -> dict:
    """Train, evaluate, write out_dir/checkpoint/ (the policy) and out_dir/result.json; returns the result.
    where: the runner arguments every stage takes (training.skeleton.StageRun.start)."""
    run = StageRun.start(cfg, **where)
    session = setup(cfg, run.model_dir, run.data_dir, run.parallel, run.seed, run.reward_model_dir)
    result = train(session.cfg, session, run.progress, run.resumer())
    return finish_policy_run(run, session, result, group_size=cfg.group_size, beta=cfg.beta)


def setup(
    cfg: GRPOStage,
    model_dir: Path,
    data_dir: Path,
    parallel: ParallelConfig,
    seed: int,
    reward_model_dir: Path | None = None,
) -> Session:
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    check_stage(cfg, parallel, model_dir)
    check_reward_source(cfg.reward_fn, reward_model_dir, "grpo")
    data = load_prompt_data(cfg, model_dir, data_dir, seed)
    cfg = resolve_max_steps(cfg, data.batches.batches_per_epoch)
    runtime = engine.build_runtime(parallel)
    reward, reward_source = build_reward(cfg.reward_fn, reward_model_dir, "grpo", runtime, cfg.offload_frozen)
    num_updates = cfg.max_steps * cfg.ppo_epochs * (cfg.batch_size * cfg.group_size // mini_batch_size(cfg))
    learner = build_policy(cfg, model_dir, parallel, num_updates)
    policy = learner.model
    reference = Reference(policy, model_dir, cfg.mode, runtime, cfg.offload_frozen) if cfg.beta > 0 else None
    return Session(
        cfg,
        learner,
        reference,
        reward,
        reward_source,
        data.tokenizer,
        policy_sampler(data, policy, runtime, parallel),
        runtime,
        data.train,
        data.batches,
        data.validation,
        data.stats,
        seed,
    )


def grpo_step(cfg: GRPOStage, s: Session, step: int) -> dict[str, float]:
    """Sample group_size responses per prompt, score them, then ppo_epochs of mini-batch updates."""
    prompts = [s.train_prompts[i] for i in s.batches(step - 1) for _ in range(cfg.group_size)]  # groups contiguous
    t0 = time.perf_counter()
    rollout, texts = sample_rollouts(cfg, s, prompts, step)
    generation_s = time.perf_counter() - t0
    scores = score(s.reward, prompts, texts)
    rows = rollout_rows(rollout)
    # Per sequence, broadcast over its tokens by the loss.
    rows["advantages"] = grpo_advantages(scores, cfg.group_size, scale=cfg.scale_rewards)
    rows["old_logprobs"] = response_logprobs_of(s.policy_learner, rows, cfg.temperature)
    rows["ref_logprobs"] = (
        reference_logprobs(s.reference, s.policy_learner, rollout, rows, cfg.temperature)
        if s.reference is not None
        else torch.zeros_like(rows["old_logprobs"])
    )

    objective = GRPOObjective(cfg)
    totals, updates, tokens = {}, 0, 0
    for index in minibatches(len(prompts), mini_batch_size(cfg), cfg.ppo_epochs):
        stats, lr, grad_norm = s.policy_learner.update({k: v[index] for k, v in rows.items()}, objective)
        tokens += s.policy_learner.metrics.num_tokens
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value
        updates += 1

    groups = scores.view(-1, cfg.group_size)
    return {
        "score": float(scores.mean()),
        "score_std": float(groups.std(dim=1).mean()),
        # Groups whose responses all scored the same give no learning signal.
        "zero_std_fraction": float((groups.std(dim=1) == 0).float().mean()),
        **{k: v / updates for k, v in totals.items()},
        "response_length": float(rollout.lengths.float().mean()),
        "eos_rate": float(rollout.ended.float().mean()),
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": tokens,  # trained by the updates (prompt + response, every epoch)
        "generation_tokens_per_s": float(rollout.lengths.sum()) / max(generation_s, 1e-9),
    }


def flops_per_token(cfg: GRPOStage, s: Session) -> float:
    """Model FLOPs per token an update trains: the policy's forward and backward, plus the forwards that
    score each rollout token once (old log-probs, the reference's when beta > 0, a reward model), spread over
    the ppo_epochs updates of it. Sampling's FLOPs are not counted (decoding is timed apart)."""
    seq = cfg.max_prompt_len + cfg.max_new_tokens
    policy = s.policy_learner
    forwards = 1 + (s.reference is not None)
    scoring = forwards * policy.flops_per_token(seq, forward_only=True) + reward_flops_per_token(s.reward, seq)
    return policy.flops_per_token(seq) + scoring / cfg.ppo_epochs


def train(cfg: GRPOStage, s: Session, progress: Progress, resumer: Resumer | None = None) -> dict:
    def evaluate_fn():
        return evaluate(
            s.policy,
            s.val_prompts,
            s.sampler,
            s.reward,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size * cfg.group_size,
        )

    checkpoints = None if resumer is None else Checkpoints(resumer, {"policy": s.policy_learner})
    flops = flops_per_token(cfg, s)
    return train_loop(
        cfg,
        lambda step: grpo_step(cfg, s, step),
        evaluate_fn,
        progress,
        rate=("rollouts_per_s", cfg.batch_size * cfg.group_size),
        last_only=LAST_ONLY,
        checkpoints=checkpoints,
        efficiency=lambda tokens_per_s: s.policy_learner.efficiency(tokens_per_s, flops),
    )
