"""GRPO: group-relative policy optimisation, PPO without a critic.

Each step samples group_size responses per prompt and scores them; a response's advantage is its score
minus its group's mean (divided by the group's std with scale_rewards), the same at every token. The
loss is the clipped surrogate (token mean over the mini-batch) plus beta x the k3 estimate of
KL(policy || reference) at the sampled tokens. beta = 0 drops the reference model entirely.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from parallel import engine
from parallel.dims import ParallelConfig
from recipes.config import GRPOStage
from recipes.losses import entropy_from_logits, grpo_advantages, kl_penalty, masked_mean, ppo_policy_loss
from recipes.preference import check_single_process, optimizer_step
from recipes.rollout import (Progress, Prompt, PromptBatches, PromptStats, Reference, RewardScorer, Sampler,
                             build_reward, check_reward_source, end_ids, evaluate, gather_logprobs,
                             load_prompts, minibatches, response_logits, response_logprobs, save_policy_run, score,
                             train_loop, update_schedule)


@dataclass
class Session:
    """Everything the loop needs, built once by `setup`."""

    policy: torch.nn.Module
    reference: Reference | None  # None when beta is 0
    reward: RewardScorer
    reward_source: str
    tokenizer: object
    sampler: Sampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    runtime: engine.Runtime
    train_prompts: list[Prompt]
    batches: PromptBatches
    val_prompts: list[Prompt]
    data_stats: dict[str, PromptStats]


def mini_batch_size(cfg: GRPOStage) -> int:
    return cfg.mini_batch_size or cfg.batch_size * cfg.group_size


def run_grpo(cfg: GRPOStage, *, model_dir: Path, data_dir: Path, out_dir: Path, parallel: ParallelConfig,
             seed: int, reward_model_dir: Path | None = None, progress: Progress | None = None) -> dict:
    """Train, evaluate, write out_dir/checkpoint/ (the policy) and out_dir/result.json; returns the result."""
    started = time.perf_counter()
    seed = cfg.seed if cfg.seed is not None else seed
    torch.manual_seed(seed)
    session = setup(cfg, Path(model_dir), Path(data_dir), parallel, seed, reward_model_dir)
    result = train(cfg, session, progress or (lambda event: None))
    return save_policy_run(cfg, session, result, model_dir=model_dir, out_dir=out_dir, started=started, seed=seed,
                           group_size=cfg.group_size, beta=cfg.beta)


def setup(cfg: GRPOStage, model_dir: Path, data_dir: Path, parallel: ParallelConfig, seed: int,
          reward_model_dir: Path | None = None) -> Session:
    from transformers import AutoTokenizer

    check_single_process(parallel, "grpo")
    engine.check_layout(parallel)
    check_reward_source(cfg.reward_fn, reward_model_dir, "grpo")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise ValueError(f"model {model_dir}: the tokenizer has no chat template; GRPO renders prompts with it")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_prompts, train_stats = load_prompts(data_dir / "train.jsonl", tokenizer, cfg.max_prompt_len)
    val_prompts, val_stats = load_prompts(data_dir / "validation.jsonl", tokenizer, cfg.max_prompt_len)
    batches = PromptBatches(train_prompts, cfg.batch_size, seed)

    runtime = engine.build_runtime(parallel)
    lora = None if cfg.mode == "full" else cfg.lora.model_dump()
    policy = engine.build_model(model_dir, parallel, runtime, lora=lora)
    reference = Reference(policy, model_dir, cfg.mode, runtime, cfg.offload_frozen) if cfg.beta > 0 else None
    reward, reward_source = build_reward(cfg.reward_fn, reward_model_dir, "grpo", runtime, cfg.offload_frozen)
    opt = cfg.optim
    optimizer = engine.build_optimizer(policy, lr=opt.lr, weight_decay=opt.weight_decay, betas=opt.betas,
                                       eps=opt.eps, runtime=runtime)
    num_updates = cfg.max_steps * cfg.ppo_epochs * (cfg.batch_size * cfg.group_size // mini_batch_size(cfg))
    sampler = Sampler(tokenizer, pad_id, end_ids(tokenizer, policy), runtime)
    return Session(policy, reference, reward, reward_source, tokenizer, sampler, optimizer,
                   update_schedule(optimizer, opt, num_updates), runtime, train_prompts, batches,
                   val_prompts[:cfg.eval_prompts], {"train": train_stats, "validation": val_stats})


def grpo_step(cfg: GRPOStage, s: Session, step: int) -> dict[str, float]:
    """Sample group_size responses per prompt, score them, then ppo_epochs of mini-batch updates."""
    prompts = [s.train_prompts[i] for i in s.batches(step - 1) for _ in range(cfg.group_size)]  # groups contiguous
    rollout, texts = s.sampler(s.policy, prompts, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, top_p=cfg.top_p)
    scores = score(s.reward, prompts, texts)
    # Per sequence, broadcast over its tokens by the loss.
    advantages = grpo_advantages(scores, cfg.group_size, scale=cfg.scale_rewards).to(s.runtime.device)
    mask = rollout.response_mask.to(s.runtime.device).float()
    with torch.no_grad():
        old_logprobs = response_logprobs(s.policy, rollout, s.runtime, cfg.temperature)
        ref_logprobs = s.reference.logprobs(rollout, cfg.temperature) if s.reference is not None else None

    names = ("loss", "policy_loss", "kl", "clip_fraction", "approx_kl", "entropy")
    totals, updates = dict.fromkeys(names, 0.0), 0
    lr = s.optimizer.param_groups[0]["lr"]
    for index in minibatches(len(prompts), mini_batch_size(cfg), cfg.ppo_epochs):
        batch, device_index = rollout.select(index), index.to(s.runtime.device)
        batch_mask = mask[device_index]
        logits = response_logits(s.policy, batch, s.runtime, cfg.temperature)
        logprobs = gather_logprobs(logits, batch.response_ids)
        batch_advantages = advantages[device_index].unsqueeze(1).expand_as(logprobs)
        policy = ppo_policy_loss(logprobs, old_logprobs[device_index], batch_advantages, batch_mask,
                                 clip_eps=cfg.clip_eps)
        kl = torch.zeros((), device=logprobs.device)
        if ref_logprobs is not None:
            kl = masked_mean(kl_penalty(logprobs, ref_logprobs[device_index], "k3"), batch_mask)
        loss = policy.loss + cfg.beta * kl
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = optimizer_step(s.policy, s.optimizer, s.scheduler, cfg.optim.grad_clip)
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits), batch_mask)
        for key, value in zip(names, (loss, policy.loss, kl, policy.clip_fraction, policy.approx_kl, entropy)):
            totals[key] += float(value.detach())
        updates += 1

    groups = scores.view(-1, cfg.group_size)
    return {"score": float(scores.mean()), "score_std": float(groups.std(dim=1).mean()),
            # Groups whose responses all scored the same give no learning signal.
            "zero_std_fraction": float((groups.std(dim=1) == 0).float().mean()),
            **{k: v / updates for k, v in totals.items()},
            "response_length": float(rollout.lengths.float().mean()),
            "eos_rate": float(rollout.ended.float().mean()), "lr": lr, "grad_norm": grad_norm}


def train(cfg: GRPOStage, s: Session, progress: Progress) -> dict:
    def evaluate_fn():
        return evaluate(s.policy, s.val_prompts, s.sampler, s.reward, max_new_tokens=cfg.max_new_tokens,
                        batch_size=cfg.batch_size * cfg.group_size)

    return train_loop(cfg, lambda step: grpo_step(cfg, s, step), evaluate_fn, progress,
                      cfg.batch_size * cfg.group_size)
