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
from recipes.config import PPOStage
from recipes.losses import entropy_from_logits, gae, masked_mean, ppo_policy_loss, ppo_value_loss, whiten
from recipes.preference import check_single_process, optimizer_step
from recipes.rollout import (Progress, Prompt, PromptBatches, PromptStats, Reference, RewardScorer, Rollout,
                             Sampler, build_reward, check_reward_source, end_ids, evaluate, forward,
                             gather_logprobs, load_prompts, minibatches, response_logits, response_logprobs, score,
                             save_policy_run, train_loop, update_schedule)


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


def build_critic(init_dir: Path, pad_id: int, parallel: ParallelConfig, runtime: engine.Runtime,
                 lora: dict | None = None):
    """A sequence-classification model (num_labels=1) used as a per-token value function.

    From a reward model the head is kept; from the policy's directory it is freshly initialised.
    """
    from transformers import AutoModelForSequenceClassification

    critic = AutoModelForSequenceClassification.from_pretrained(init_dir, num_labels=1, dtype=torch.float32)
    critic.config.pad_token_id = pad_id
    if not hasattr(critic, "score") or not hasattr(critic, critic.base_model_prefix):
        raise ValueError(f"critic from {init_dir}: {type(critic).__name__} has no `score` head over a backbone; "
                         "per-token values need one")
    if parallel.activation_checkpointing == "full":
        critic.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        # SEQ_CLS keeps the value head fully trainable (peft adds it to modules_to_save).
        config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                            target_modules=lora["target_modules"], task_type="SEQ_CLS")
        critic = get_peft_model(critic, config)
    return critic.to(runtime.device).train()


def token_values(critic, rollout: Rollout, runtime: engine.Runtime) -> torch.Tensor:
    """V(state before each response token), [B, T] fp32: the value head applied at every position."""
    inner = critic.get_base_model() if hasattr(critic, "get_base_model") else critic
    hidden = forward(getattr(inner, inner.base_model_prefix), rollout, runtime).last_hidden_state
    with runtime.autocast():
        values = inner.score(hidden).float().squeeze(-1)
    width = rollout.prompt_ids.shape[1]
    return values[:, width - 1:-1]


@dataclass
class Session:
    """Everything the loop needs, built once by `setup`."""

    policy: torch.nn.Module
    critic: torch.nn.Module
    reference: Reference
    reward: RewardScorer
    reward_source: str
    critic_init: str  # "reward_model" or "policy"
    tokenizer: object
    sampler: Sampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    critic_optimizer: torch.optim.Optimizer
    critic_scheduler: torch.optim.lr_scheduler.LRScheduler
    runtime: engine.Runtime
    train_prompts: list[Prompt]
    batches: PromptBatches
    val_prompts: list[Prompt]
    kl: KLController
    data_stats: dict[str, PromptStats]


def run_ppo(cfg: PPOStage, *, model_dir: Path, data_dir: Path, out_dir: Path, parallel: ParallelConfig,
            seed: int, reward_model_dir: Path | None = None, progress: Progress | None = None) -> dict:
    """Train, evaluate, write out_dir/checkpoint/ (the policy) and out_dir/result.json; returns the result."""
    started = time.perf_counter()
    seed = cfg.seed if cfg.seed is not None else seed
    torch.manual_seed(seed)
    session = setup(cfg, Path(model_dir), Path(data_dir), parallel, seed, reward_model_dir)
    result = train(cfg, session, progress or (lambda event: None))
    return save_policy_run(cfg, session, result, model_dir=model_dir, out_dir=out_dir, started=started, seed=seed,
                           critic_init=session.critic_init, final_kl_coef=session.kl.coef)


def _critic_init(cfg: PPOStage, reward_model_dir: Path | None) -> str:
    if cfg.critic_init == "auto":
        return "reward_model" if reward_model_dir is not None else "policy"
    if cfg.critic_init == "reward_model" and reward_model_dir is None:
        raise ValueError("critic_init is 'reward_model' but the ppo stage was given no reward model directory")
    return cfg.critic_init


def setup(cfg: PPOStage, model_dir: Path, data_dir: Path, parallel: ParallelConfig, seed: int,
          reward_model_dir: Path | None = None) -> Session:
    from transformers import AutoTokenizer

    check_single_process(parallel, "ppo")
    engine.check_layout(parallel)
    check_reward_source(cfg.reward_fn, reward_model_dir, "ppo")
    critic_init = _critic_init(cfg, reward_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise ValueError(f"model {model_dir}: the tokenizer has no chat template; PPO renders prompts with it")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if critic_init == "reward_model":
        # The critic reads the policy's token ids, so the reward model must share the vocabulary.
        if AutoTokenizer.from_pretrained(reward_model_dir).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"critic_init: the reward model {reward_model_dir} has another vocabulary than the "
                             "policy, so it cannot read the policy's tokens as a critic; use critic_init: policy")
    train_prompts, train_stats = load_prompts(data_dir / "train.jsonl", tokenizer, cfg.max_prompt_len)
    val_prompts, val_stats = load_prompts(data_dir / "validation.jsonl", tokenizer, cfg.max_prompt_len)
    batches = PromptBatches(train_prompts, cfg.batch_size, seed)

    runtime = engine.build_runtime(parallel)
    lora = None if cfg.mode == "full" else cfg.lora.model_dump()
    policy = engine.build_model(model_dir, parallel, runtime, lora=lora)
    reference = Reference(policy, model_dir, cfg.mode, runtime, cfg.offload_frozen)
    reward, reward_source = build_reward(cfg.reward_fn, reward_model_dir, "ppo", runtime, cfg.offload_frozen)
    critic = build_critic(reward_model_dir if critic_init == "reward_model" else model_dir, pad_id, parallel,
                          runtime, lora)

    num_updates = cfg.max_steps * cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
    optimizers = []
    for model, opt in ((policy, cfg.optim), (critic, cfg.critic_optim)):
        optimizer = engine.build_optimizer(model, lr=opt.lr, weight_decay=opt.weight_decay, betas=opt.betas,
                                           eps=opt.eps, runtime=runtime)
        optimizers += [optimizer, update_schedule(optimizer, opt, num_updates)]
    kl = KLController(cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None, cfg.kl_horizon)
    sampler = Sampler(tokenizer, pad_id, end_ids(tokenizer, policy), runtime)
    return Session(policy, critic, reference, reward, reward_source, critic_init, tokenizer, sampler, *optimizers,
                   runtime, train_prompts, batches, val_prompts[:cfg.eval_prompts], kl,
                   {"train": train_stats, "validation": val_stats})


def ppo_step(cfg: PPOStage, s: Session, step: int) -> dict[str, float]:
    """Sample and score a rollout batch, compute advantages, then ppo_epochs of mini-batch updates."""
    prompts = [s.train_prompts[i] for i in s.batches(step - 1)]
    rollout, texts = s.sampler(s.policy, prompts, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, top_p=cfg.top_p)
    scores = score(s.reward, prompts, texts).to(s.runtime.device)
    mask = rollout.response_mask.to(s.runtime.device).float()

    with torch.no_grad():
        old_logprobs = response_logprobs(s.policy, rollout, s.runtime, cfg.temperature)
        ref_logprobs = s.reference.logprobs(rollout, cfg.temperature)
        s.critic.eval()
        old_values = token_values(s.critic, rollout, s.runtime) * mask
        s.critic.train()
        # Per-token reward: the KL penalty everywhere, plus the sequence score at the last response token.
        kl = (old_logprobs - ref_logprobs) * mask
        rewards = -s.kl.coef * kl
        last = mask.sum(1).long() - 1  # every response has at least one token
        rewards[torch.arange(len(last), device=last.device), last] += scores
        advantages, returns = gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)

    names = ("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl", "entropy")
    totals, updates = dict.fromkeys(names, 0.0), 0
    lr, critic_lr = s.optimizer.param_groups[0]["lr"], s.critic_optimizer.param_groups[0]["lr"]
    for index in minibatches(len(prompts), cfg.mini_batch_size, cfg.ppo_epochs):
        batch, device_index = rollout.select(index), index.to(s.runtime.device)
        batch_mask = mask[device_index]
        logits = response_logits(s.policy, batch, s.runtime, cfg.temperature)
        policy = ppo_policy_loss(gather_logprobs(logits, batch.response_ids), old_logprobs[device_index],
                                 advantages[device_index], batch_mask, clip_eps=cfg.clip_eps)
        s.optimizer.zero_grad(set_to_none=True)
        policy.loss.backward()
        grad_norm = optimizer_step(s.policy, s.optimizer, s.scheduler, cfg.optim.grad_clip)

        values = token_values(s.critic, batch, s.runtime)
        value_loss, value_clip = ppo_value_loss(values, old_values[device_index], returns[device_index],
                                                batch_mask, clip_eps=cfg.value_clip_eps)
        s.critic_optimizer.zero_grad(set_to_none=True)
        value_loss.backward()
        critic_grad_norm = optimizer_step(s.critic, s.critic_optimizer, s.critic_scheduler,
                                          cfg.critic_optim.grad_clip)
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits), batch_mask)
        for key, value in zip(names, (policy.loss, value_loss, policy.clip_fraction, value_clip,
                                      policy.approx_kl, entropy)):
            totals[key] += float(value.detach())
        updates += 1

    sequence_kl = float(kl.sum(1).mean())
    coef = s.kl.coef
    s.kl.update(sequence_kl, len(prompts))
    return {"score": float(scores.mean()), "kl": sequence_kl, "kl_coef": coef,
            **{k: v / updates for k, v in totals.items()},
            "response_length": float(rollout.lengths.float().mean()),
            "eos_rate": float(rollout.ended.float().mean()),
            "lr": lr, "critic_lr": critic_lr, "grad_norm": grad_norm, "critic_grad_norm": critic_grad_norm}


def train(cfg: PPOStage, s: Session, progress: Progress) -> dict:
    def evaluate_fn():
        return evaluate(s.policy, s.val_prompts, s.sampler, s.reward, max_new_tokens=cfg.max_new_tokens,
                        batch_size=cfg.batch_size)

    return train_loop(cfg, lambda step: ppo_step(cfg, s, step), evaluate_fn, progress, cfg.batch_size)
