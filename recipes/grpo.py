"""GRPO: group-relative policy optimisation, PPO without a critic.

Each step samples group_size responses per prompt and scores them; a response's advantage is its score
minus its group's mean (divided by the group's std with scale_rewards), the same at every token. The
loss is the clipped surrogate (token mean over the mini-batch) plus beta x the k3 estimate of
KL(policy || reference) at the sampled tokens. beta = 0 drops the reference model entirely.

Under torch.distributed (dp, ZeRO 0-3, tp; not pp) the policy is laid out by the engine's
DistributedTrainer: each dp rank samples its share of the rollouts (tp ranks of a dp group draw the same
samples; generation keeps the ranks in lockstep), the responses are gathered so every rank holds the
whole batch, advantages are computed over it, and each update is one DistributedTrainer step on the
global mini-batch with the loss as a token mean over the whole mini-batch, as in one process.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from parallel import engine
from parallel.dims import ParallelConfig
from recipes.config import GRPOStage
from parallel.distributed.engine import Objective, model_inputs
from recipes.losses import entropy_from_logits, grpo_advantages, kl_penalty, masked_mean, ppo_policy_loss
from recipes.preference import check_no_pipeline, optimizer_step
from recipes.rollout import (Progress, Prompt, PromptBatches, PromptStats, Reference, RewardScorer, Sampler,
                             build_reward, check_reward_source, decode_responses, end_ids, evaluate,
                             gather_logprobs, load_prompts, minibatches, response_tokens, rollout_from_tokens,
                             rollout_rows, rows_response_logits, save_policy_run, score, train_loop,
                             update_schedule)


@dataclass
class Session:
    """Everything the loop needs, built once by `setup`.

    One process: policy, optimizer, scheduler. Several: trainer (a DistributedTrainer) and policy = its
    laid-out model (for sampling and forwards); no optimizer or scheduler here.
    """

    policy: torch.nn.Module
    reference: Reference | None  # None when beta is 0
    reward: RewardScorer
    reward_source: str
    tokenizer: object
    sampler: Sampler
    optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    runtime: engine.Runtime
    train_prompts: list[Prompt]
    batches: PromptBatches
    val_prompts: list[Prompt]
    data_stats: dict[str, PromptStats]
    seed: int = 0
    trainer: object | None = None
    num_updates: int = 0
    updates: int = 0  # optimizer updates done (the distributed LR schedule counts them)


def mini_batch_size(cfg: GRPOStage) -> int:
    return cfg.mini_batch_size or cfg.batch_size * cfg.group_size


class GRPOObjective(Objective):
    """Clipped surrogate + beta x k3 KL per response token; units are the mini-batch's response tokens."""

    def __init__(self, cfg: GRPOStage):
        self.cfg = cfg

    def count(self, batch):
        return int(batch["response_mask"].sum())

    def __call__(self, logits, rows):
        cfg, mask = self.cfg, rows["response_mask"]
        logits = rows_response_logits(logits, rows, cfg.temperature)
        logprobs = gather_logprobs(logits, rows["response_ids"])
        advantages = rows["advantages"].unsqueeze(1).expand_as(logprobs)
        policy = ppo_policy_loss(logprobs, rows["old_logprobs"], advantages, mask, clip_eps=cfg.clip_eps)
        kl = masked_mean(kl_penalty(logprobs, rows["ref_logprobs"], "k3"), mask) if cfg.beta > 0 else \
            torch.zeros((), device=logprobs.device)
        n = mask.sum()  # masked means x tokens = sums, so the engine's division gives the global token mean
        loss = policy.loss + cfg.beta * kl
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits), mask)
        stats = {"loss": loss.detach() * n, "policy_loss": policy.loss.detach() * n, "kl": kl.detach() * n,
                 "clip_fraction": policy.clip_fraction * n, "approx_kl": policy.approx_kl * n, "entropy": entropy * n}
        return loss * n, stats


def run_grpo(cfg: GRPOStage, *, model_dir: Path, data_dir: Path, out_dir: Path, parallel: ParallelConfig,
             seed: int, reward_model_dir: Path | None = None, progress: Progress | None = None) -> dict:
    """Train, evaluate, write out_dir/checkpoint/ (the policy) and out_dir/result.json; returns the result."""
    started = time.perf_counter()
    seed = cfg.seed if cfg.seed is not None else seed
    torch.manual_seed(seed)
    session = setup(cfg, Path(model_dir), Path(data_dir), parallel, seed, reward_model_dir)
    result = train(cfg, session, progress or (lambda event: None))
    if session.trainer is None:
        return save_policy_run(cfg, session, result, model_dir=model_dir, out_dir=out_dir, started=started,
                               seed=seed, group_size=cfg.group_size, beta=cfg.beta)
    from parallel.checkpoint import gather_full_state_dict

    state = gather_full_state_dict(session.trainer)  # collective
    if state is not None:  # rank 0
        policy = engine.rebuild_model(model_dir, state, None if cfg.mode == "full" else cfg.lora.model_dump())
        result = save_policy_run(cfg, session, result, model_dir=model_dir, out_dir=out_dir, started=started,
                                 seed=seed, policy=policy, group_size=cfg.group_size, beta=cfg.beta,
                                 world_size=parallel.world_size)
    return engine.from_rank0(result)


def setup(cfg: GRPOStage, model_dir: Path, data_dir: Path, parallel: ParallelConfig, seed: int,
          reward_model_dir: Path | None = None) -> Session:
    from transformers import AutoConfig, AutoTokenizer

    engine.check_layout(parallel, cfg.mode, AutoConfig.from_pretrained(model_dir))
    distributed = engine.is_distributed()
    if distributed:
        check_no_pipeline(parallel, "grpo")
        for name, rows in (("batch_size x group_size", cfg.batch_size * cfg.group_size),
                           ("mini_batch_size", mini_batch_size(cfg))):
            if rows % (parallel.dp * parallel.microbatches):
                raise ValueError(f"stages (grpo): {name} = {rows} responses do not split into dp={parallel.dp} x "
                                 f"parallel.microbatches={parallel.microbatches} equal parts")
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
    reward, reward_source = build_reward(cfg.reward_fn, reward_model_dir, "grpo", runtime, cfg.offload_frozen)
    num_updates = cfg.max_steps * cfg.ppo_epochs * (cfg.batch_size * cfg.group_size // mini_batch_size(cfg))
    common = dict(reward=reward, reward_source=reward_source, tokenizer=tokenizer, runtime=runtime,
                  train_prompts=train_prompts, batches=batches, val_prompts=val_prompts[:cfg.eval_prompts],
                  data_stats={"train": train_stats, "validation": val_stats}, seed=seed, num_updates=num_updates)
    if distributed:
        opt = cfg.optim
        trainer = engine.build_trainer(model_dir, parallel, mode=cfg.mode, lora=lora, lr=opt.lr,
                                       weight_decay=opt.weight_decay, betas=opt.betas, eps=opt.eps,
                                       grad_clip=opt.grad_clip)
        policy = trainer.parts[0]
        reference = Reference(policy, model_dir, cfg.mode, runtime, cfg.offload_frozen) if cfg.beta > 0 else None
        sampler = Sampler(tokenizer, pad_id, end_ids(tokenizer, policy), runtime, synced=True)
        return Session(policy=policy, reference=reference, sampler=sampler, optimizer=None, scheduler=None,
                       trainer=trainer, **common)
    policy = engine.build_model(model_dir, parallel, runtime, lora=lora)
    reference = Reference(policy, model_dir, cfg.mode, runtime, cfg.offload_frozen) if cfg.beta > 0 else None
    opt = cfg.optim
    optimizer = engine.build_optimizer(policy, lr=opt.lr, weight_decay=opt.weight_decay, betas=opt.betas,
                                       eps=opt.eps, runtime=runtime)
    sampler = Sampler(tokenizer, pad_id, end_ids(tokenizer, policy), runtime)
    return Session(policy=policy, reference=reference, sampler=sampler, optimizer=optimizer,
                   scheduler=update_schedule(optimizer, opt, num_updates), **common)


def sample_rollouts(cfg: GRPOStage, s: Session, prompts: list[Prompt], step: int):
    """(rollout, texts) for every prompt. Several ranks: each dp rank samples a contiguous share (its tp
    ranks alike, seeded by dp rank), then all ranks gather the responses in prompt order."""
    if s.trainer is None:
        return s.sampler(s.policy, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                         top_p=cfg.top_p)
    import torch.distributed as dist

    from parallel.distributed.mesh import dp_mesh, dp_rank

    dp, rank = s.trainer.dims.dp, dp_rank(s.trainer.mesh)
    share = len(prompts) // dp
    torch.manual_seed(s.seed * 100_003 + step * 1_009 + rank)
    mine, _ = s.sampler(s.policy, prompts[rank * share:(rank + 1) * share], max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature, top_p=cfg.top_p)
    gathered = [None] * dp
    dist.all_gather_object(gathered, response_tokens(mine), group=dp_mesh(s.trainer.mesh).get_group())
    torch.manual_seed(s.seed * 100_003 + step)  # every rank draws the same mini-batch order below
    rollout = rollout_from_tokens([p.input_ids for p in prompts], [r for part in gathered for r in part],
                                  s.sampler.pad_id, s.sampler.eos_ids)
    return rollout, decode_responses(s.tokenizer, rollout)


@torch.no_grad()
def response_logprobs_of(s: Session, rows: dict[str, torch.Tensor], temperature: float, adapters: bool = True):
    """[B, T] log-probs of the response tokens under the policy (or, adapters=False, the LoRA reference)."""
    def fn(logits, local):
        return gather_logprobs(rows_response_logits(logits, local, temperature), local["response_ids"])

    parts = s.trainer.parts if s.trainer is not None else [s.policy]
    for part in parts:
        part.eval()
    try:
        with (s.policy.disable_adapter() if not adapters else torch.no_grad()):
            if s.trainer is not None:
                return s.trainer.forward_rows(rows, fn).to(s.runtime.device)
            with s.runtime.autocast():
                logits = s.policy(**model_inputs({k: v.to(s.runtime.device) for k, v in rows.items()})).logits
            return fn(logits, {k: v.to(s.runtime.device) for k, v in rows.items()})
    finally:
        for part in parts:
            part.train()


def grpo_step(cfg: GRPOStage, s: Session, step: int) -> dict[str, float]:
    """Sample group_size responses per prompt, score them, then ppo_epochs of mini-batch updates."""
    prompts = [s.train_prompts[i] for i in s.batches(step - 1) for _ in range(cfg.group_size)]  # groups contiguous
    rollout, texts = sample_rollouts(cfg, s, prompts, step)
    scores = score(s.reward, prompts, texts)
    rows = rollout_rows(rollout)
    # Per sequence, broadcast over its tokens by the loss.
    rows["advantages"] = grpo_advantages(scores, cfg.group_size, scale=cfg.scale_rewards)
    rows["old_logprobs"] = response_logprobs_of(s, rows, cfg.temperature).cpu()
    if s.reference is None:
        rows["ref_logprobs"] = torch.zeros_like(rows["old_logprobs"])
    elif s.reference.frozen is not None:  # a frozen full copy on every rank
        rows["ref_logprobs"] = s.reference.logprobs(rollout, cfg.temperature).cpu()
    else:  # LoRA: the laid-out policy with its adapters off
        rows["ref_logprobs"] = response_logprobs_of(s, rows, cfg.temperature, adapters=False).cpu()

    objective = GRPOObjective(cfg)
    totals, updates, lr, grad_norm = {}, 0, 0.0, 0.0
    for index in minibatches(len(prompts), mini_batch_size(cfg), cfg.ppo_epochs):
        batch = {k: v[index] for k, v in rows.items()}
        tokens = objective.count(batch)
        if s.trainer is not None:
            opt = cfg.optim
            lr = opt.lr * engine.lr_factor(s.updates, warmup_steps=opt.warmup_steps, max_steps=s.num_updates,
                                           min_lr_ratio=opt.min_lr_ratio)
            grad_norm = engine.distributed_train_step(s.trainer, batch, lr=lr, objective=objective).grad_norm
            stats = s.trainer.last_stats
        else:
            lr = s.optimizer.param_groups[0]["lr"]
            local = {k: v.to(s.runtime.device) for k, v in batch.items()}
            with s.runtime.autocast():
                logits = s.policy(**model_inputs(local)).logits
            summed, stats = objective(logits, local)
            s.optimizer.zero_grad(set_to_none=True)
            (summed / tokens).backward()
            grad_norm = optimizer_step(s.policy, s.optimizer, s.scheduler, cfg.optim.grad_clip)
        s.updates += 1
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + float(value) / tokens
        updates += 1

    groups = scores.view(-1, cfg.group_size)
    return {"score": float(scores.mean()), "score_std": float(groups.std(dim=1).mean()),
            # Groups whose responses all scored the same give no learning signal.
            "zero_std_fraction": float((groups.std(dim=1) == 0).float().mean()),
            **{k: v / updates for k, v in totals.items()},
            "response_length": float(rollout.lengths.float().mean()),
            "eos_rate": float(rollout.ended.float().mean()), "lr": lr, "grad_norm": float(grad_norm)}


def train(cfg: GRPOStage, s: Session, progress: Progress) -> dict:
    def evaluate_fn():
        return evaluate(s.policy, s.val_prompts, s.sampler, s.reward, max_new_tokens=cfg.max_new_tokens,
                        batch_size=cfg.batch_size * cfg.group_size)

    return train_loop(cfg, lambda step: grpo_step(cfg, s, step), evaluate_fn, progress,
                      cfg.batch_size * cfg.group_size)
