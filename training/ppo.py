"""PPO for language models: setup, one rollout-and-update step you can read top to bottom, save.

Four models: the policy (trained), the critic (trained; the policy's backbone or the reward model's
with a scalar value head read at every position), the frozen reference and the reward (a frozen reward
model or a rule function). Each step samples one response per prompt, scores it, and turns the score
into per-token rewards: the score at the last response token minus kl_coef x (log pi - log pi_ref) at
every token. GAE gives advantages (whitened over the batch) and returns; then ppo_epochs passes of
mini-batch updates with the clipped policy and value losses. kl_coef is fixed or follows an adaptive
controller (Ziegler et al. 2019) towards kl_target nats per response.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from parallel import engine
from parallel.dims import ParallelConfig
from parallel.trainer import Objective, model_inputs
from training.batching import resolve_max_steps
from training.config import PPOStage
from training.data import EpochBatches
from training.frozen import Reference, RewardScorer, build_reward, check_reward_source, reward_flops_per_token, score
from training.learner import Learner
from training.loop import Checkpoints, train_loop
from training.losses import gae, ppo_value_loss, whiten
from training.prompts import Prompt, PromptStats, load_prompt_data
from training.resume import Resumer
from training.reward import build_reward_model
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
from training.sampling import Rollout, Sampler, rollout_rows, sample_rollouts
from training.skeleton import Progress, StageRun, adapters, check_stage
from training.stages import sampling_layout


class KLController:
    """The KL penalty coefficient: fixed, or adapted towards a target KL (nats per response).

    Adaptive: coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * rollouts / horizon, so the coefficient
    grows while the policy drifts further than the target and shrinks while it stays closer.
    """

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, num_rollouts: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.coef *= 1 + error * num_rollouts / self.horizon


class TokenValues(torch.nn.Module):
    """A sequence-classification model read at every position: `.logits` holds [B, L, 1] values. The
    engine lays it out like any decoder (its backbone's layers, the score head replicated)."""

    def __init__(self, critic):
        super().__init__()
        self.critic = critic

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        from transformers.modeling_outputs import TokenClassifierOutput

        inner = self.critic.get_base_model() if hasattr(self.critic, "get_base_model") else self.critic
        hidden = getattr(inner, inner.base_model_prefix)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return TokenClassifierOutput(logits=inner.score(hidden))


def response_values(values: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T] fp32 V(state before each response token) from TokenValues logits [B, L, 1]."""
    width = rows["input_ids"].shape[1] - rows["response_ids"].shape[1]
    return values.float().squeeze(-1)[:, width - 1 : -1]


class ValueObjective(Objective):
    """The clipped value loss per response token (token mean over the whole mini-batch)."""

    def __init__(self, clip_eps: float):
        self.clip_eps = clip_eps

    def count(self, batch):
        return int(batch["response_mask"].sum())

    def __call__(self, logits, rows):
        mask = rows["response_mask"]
        loss, clipped = ppo_value_loss(
            response_values(logits, rows), rows["old_values"], rows["returns"], mask, clip_eps=self.clip_eps
        )
        n = mask.sum()
        return loss * n, {"value_loss": loss.detach() * n, "value_clip_fraction": clipped * n}


def token_values(critic, rollout: Rollout, runtime: engine.Runtime) -> torch.Tensor:
    """V(state before each response token), [B, T] fp32: the value head applied at every position."""
    rows = {k: v.to(runtime.device) for k, v in rollout_rows(rollout).items()}
    with runtime.autocast():
        values = TokenValues(critic)(**model_inputs(rows)).logits
    return response_values(values, rows)


@dataclass
class Session:
    """Everything the loop needs, built once by `setup`."""

    cfg: PPOStage  # the stage's config, max_steps resolved when num_epochs sets it
    policy_learner: Learner  # the policy and its updates, in one process or laid out over the ranks
    critic_learner: Learner  # TokenValues over the critic, likewise
    reference: Reference
    reward: RewardScorer
    reward_source: str
    critic_init: str  # "reward_model" or "policy"
    tokenizer: object
    sampler: Sampler
    runtime: engine.Runtime
    train_prompts: list[Prompt]
    batches: EpochBatches
    val_prompts: list[Prompt]
    kl: KLController
    data_stats: dict[str, PromptStats]
    seed: int = 0

    @property
    def policy(self):
        return self.policy_learner.model

    @property
    def critic(self):
        return self.critic_learner.model.critic


def run_ppo(cfg: PPOStage, **where) -> dict:
    """Train, evaluate, write out_dir/checkpoint/ (the policy) and out_dir/result.json; returns the result.
    where: the runner arguments every stage takes (training.skeleton.StageRun.start)."""
    run = StageRun.start(cfg, **where)
    session = setup(cfg, run.model_dir, run.data_dir, run.parallel, run.seed, run.reward_model_dir)
    result = train(session.cfg, session, run.progress, run.resumer())
    return finish_policy_run(run, session, result, critic_init=session.critic_init, final_kl_coef=session.kl.coef)


def _critic_init(cfg: PPOStage, reward_model_dir: Path | None) -> str:
    if cfg.critic_init == "auto":
        return "reward_model" if reward_model_dir is not None else "policy"
    if cfg.critic_init == "reward_model" and reward_model_dir is None:
        raise ValueError("critic_init is 'reward_model' but the ppo stage was given no reward model directory")
    return cfg.critic_init


def setup(
    cfg: PPOStage,
    model_dir: Path,
    data_dir: Path,
    parallel: ParallelConfig,
    seed: int,
    reward_model_dir: Path | None = None,
) -> Session:
    from transformers import AutoTokenizer

    model_dir, data_dir = Path(model_dir), Path(data_dir)
    check_stage(cfg, parallel, model_dir)
    check_reward_source(cfg.reward_fn, reward_model_dir, "ppo")
    critic_init = _critic_init(cfg, reward_model_dir)
    data = load_prompt_data(cfg, model_dir, data_dir, seed)
    cfg = resolve_max_steps(cfg, data.batches.batches_per_epoch)
    if critic_init == "reward_model":
        # The critic reads the policy's token ids, so the reward model must share the vocabulary.
        if AutoTokenizer.from_pretrained(reward_model_dir).get_vocab() != data.tokenizer.get_vocab():
            raise ValueError(
                f"critic_init: the reward model {reward_model_dir} has another vocabulary than the "
                "policy, so it cannot read the policy's tokens as a critic; use critic_init: policy"
            )
    runtime = engine.build_runtime(parallel)
    reward, reward_source = build_reward(cfg.reward_fn, reward_model_dir, "ppo", runtime, cfg.offload_frozen)
    critic_dir = reward_model_dir if critic_init == "reward_model" else model_dir
    num_updates = cfg.max_steps * cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
    # The policy first, then the critic (each rank loads alike: same seed, same LoRA and head inits).
    policy_learner = build_policy(cfg, model_dir, parallel, num_updates)
    critic = TokenValues(build_reward_model(critic_dir, data.pad_id, *adapters(cfg), require_head=True))
    critic_learner = Learner.build(
        model_dir,
        sampling_layout(parallel),
        mode=cfg.mode,
        optim=cfg.critic_optim,
        num_updates=num_updates,
        model=critic,
    )
    policy = policy_learner.model
    reference = Reference(policy, model_dir, cfg.mode, runtime, cfg.offload_frozen)
    kl = KLController(cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None, cfg.kl_horizon)
    return Session(
        cfg,
        policy_learner,
        critic_learner,
        reference,
        reward,
        reward_source,
        critic_init,
        data.tokenizer,
        policy_sampler(data, policy, runtime, parallel),
        runtime,
        data.train,
        data.batches,
        data.validation,
        kl,
        data.stats,
        seed,
    )


def ppo_step(cfg: PPOStage, s: Session, step: int) -> dict[str, float]:
    """Sample and score a rollout batch, compute advantages, then ppo_epochs of mini-batch updates."""
    prompts = [s.train_prompts[i] for i in s.batches(step - 1)]
    t0 = time.perf_counter()
    rollout, texts = sample_rollouts(cfg, s, prompts, step)
    generation_s = time.perf_counter() - t0
    scores = score(s.reward, prompts, texts)
    rows = rollout_rows(rollout)
    mask = rows["response_mask"]

    with torch.no_grad():
        old_logprobs = response_logprobs_of(s.policy_learner, rows, cfg.temperature)
        ref_logprobs = reference_logprobs(s.reference, s.policy_learner, rollout, rows, cfg.temperature)
        old_values = s.critic_learner.rows(rows, response_values) * mask
        # Per-token reward: the KL penalty everywhere, plus the sequence score at the last response token.
        kl = (old_logprobs - ref_logprobs) * mask
        rewards = -s.kl.coef * kl
        last = mask.sum(1).long() - 1  # every response has at least one token
        rewards[torch.arange(len(last)), last] += scores
        advantages, returns = gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
    rows.update(old_logprobs=old_logprobs, old_values=old_values, advantages=advantages, returns=returns)

    policy_objective = ClippedPolicyObjective(clip_eps=cfg.clip_eps, temperature=cfg.temperature)
    value_objective = ValueObjective(cfg.value_clip_eps)
    totals, updates, tokens = {}, 0, 0
    for index in minibatches(len(prompts), cfg.mini_batch_size, cfg.ppo_epochs):
        batch = {k: v[index] for k, v in rows.items()}
        policy_stats, lr, grad_norm = s.policy_learner.update(batch, policy_objective)
        tokens += s.policy_learner.metrics.num_tokens
        value_stats, critic_lr, critic_grad_norm = s.critic_learner.update(batch, value_objective)
        for key, value in {**policy_stats, **value_stats}.items():
            totals[key] = totals.get(key, 0.0) + value
        updates += 1

    sequence_kl = float(kl.sum(1).mean())
    coef = s.kl.coef
    s.kl.update(sequence_kl, len(prompts))
    shown = ("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl", "entropy")
    return {
        "score": float(scores.mean()),
        "kl": sequence_kl,
        "kl_coef": coef,
        **{k: totals[k] / updates for k in shown},
        "response_length": float(rollout.lengths.float().mean()),
        "eos_rate": float(rollout.ended.float().mean()),
        "lr": lr,
        "critic_lr": critic_lr,
        "grad_norm": grad_norm,
        "critic_grad_norm": critic_grad_norm,
        "tokens": tokens,  # trained by the updates (prompt + response, every epoch)
        "generation_tokens_per_s": float(rollout.lengths.sum()) / max(generation_s, 1e-9),
    }


def flops_per_token(cfg: PPOStage, s: Session) -> float:
    """Model FLOPs per token an update trains: the policy's and the critic's forward and backward, plus the
    forwards that score each rollout token once (old log-probs, reference, values, reward model), spread over
    the ppo_epochs updates of it. Sampling's FLOPs are not counted (decoding is timed apart)."""
    seq = cfg.max_prompt_len + cfg.max_new_tokens
    policy, critic = s.policy_learner, s.critic_learner
    train = policy.flops_per_token(seq) + critic.flops_per_token(seq, head_outputs=1)
    scoring = (
        2 * policy.flops_per_token(seq, forward_only=True)  # old log-probs, and the reference's
        + critic.flops_per_token(seq, forward_only=True, head_outputs=1)
        + reward_flops_per_token(s.reward, seq)
    )
    return train + scoring / cfg.ppo_epochs


def train(cfg: PPOStage, s: Session, progress: Progress, resumer: Resumer | None = None) -> dict:
    def evaluate_fn():
        return evaluate(
            s.policy, s.val_prompts, s.sampler, s.reward, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size
        )

    checkpoints = (
        None
        if resumer is None
        else Checkpoints(
            resumer,
            {"policy": s.policy_learner, "critic": s.critic_learner},
            extra=lambda: {"kl_coef": s.kl.coef},
            restore=lambda extra: setattr(s.kl, "coef", extra["kl_coef"]),
        )
    )
    flops = flops_per_token(cfg, s)
    return train_loop(
        cfg,
        lambda step: ppo_step(cfg, s, step),
        evaluate_fn,
        progress,
        rate=("rollouts_per_s", cfg.batch_size),
        last_only=LAST_ONLY,
        checkpoints=checkpoints,
        efficiency=lambda tokens_per_s: s.policy_learner.efficiency(tokens_per_s, flops),
    )
