"""What PPO and GRPO share beyond prompts (prompts.py), sampling (sampling.py) and frozen models
(frozen.py): the clipped policy objective, log-probs through the engine's layout, evaluation, the loop's
mini-batches and the stage's finish."""

from __future__ import annotations

from typing import Iterator

import torch

from parallel.trainer import Objective
from training.frozen import Reference, RewardScorer, score
from training.learner import Learner
from training.losses import entropy_from_logits, kl_penalty, masked_mean, ppo_policy_loss
from training.prompts import Prompt
from training.rewards import exact_match
from training.sampling import Rollout, Sampler, end_ids, gather_logprobs, rows_response_logits
from training.skeleton import adapters
from training.stages import sampling_layout

# ---- sampling and scoring through the engine's layout ---------------------------------------------------


class ClippedPolicyObjective(Objective):
    """The clipped surrogate (+ kl_beta x the k3 KL to `ref_logprobs`) per response token, as an engine
    Objective: units are the mini-batch's response tokens, so the loss is their mean over the whole
    mini-batch whatever the layout. `advantages` per row (GRPO) or per token (PPO)."""

    def __init__(self, *, clip_eps: float, temperature: float, kl_beta: float = 0.0):
        self.clip_eps, self.temperature, self.kl_beta = clip_eps, temperature, kl_beta

    def count(self, batch):
        return int(batch["response_mask"].sum())

    def __call__(self, logits, rows):
        mask = rows["response_mask"]
        logits = rows_response_logits(logits, rows, self.temperature)
        logprobs = gather_logprobs(logits, rows["response_ids"])
        advantages = rows["advantages"]
        advantages = advantages.unsqueeze(1).expand_as(logprobs) if advantages.dim() == 1 else advantages
        policy = ppo_policy_loss(logprobs, rows["old_logprobs"], advantages, mask, clip_eps=self.clip_eps)
        kl = (
            masked_mean(kl_penalty(logprobs, rows["ref_logprobs"], "k3"), mask)
            if self.kl_beta > 0
            else torch.zeros((), device=logprobs.device)
        )
        n = mask.sum()  # masked means x tokens = sums, so the engine's division gives the global token mean
        loss = policy.loss + self.kl_beta * kl
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits), mask)
        stats = {
            "loss": loss.detach() * n,
            "policy_loss": policy.loss.detach() * n,
            "kl": kl.detach() * n,
            "clip_fraction": policy.clip_fraction * n,
            "approx_kl": policy.approx_kl * n,
            "entropy": entropy * n,
        }
        return loss * n, stats


def response_logprobs_of(
    learner: Learner, rows: dict[str, torch.Tensor], temperature: float, adapters: bool = True
) -> torch.Tensor:
    """[B, T] log-probs of the response tokens of `rows` (see rollout_rows) under the learner's policy
    (adapters=False: the LoRA reference, the same model with its adapters off), on CPU."""

    def fn(logits, local):
        return gather_logprobs(rows_response_logits(logits, local, temperature), local["response_ids"])

    return learner.rows(rows, fn, None if adapters else learner.model.disable_adapter())


def reference_logprobs(
    reference: Reference, learner: Learner, rollout: Rollout, rows: dict[str, torch.Tensor], temperature: float
) -> torch.Tensor:
    """[B, T] reference log-probs on CPU: the frozen full copy (held whole on every rank), or the learner's
    policy with its LoRA adapters off (through the layout)."""
    if reference.frozen is not None:
        return reference.logprobs(rollout, temperature).cpu()
    return response_logprobs_of(learner, rows, temperature, adapters=False)


# ---- evaluation and the loop --------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    policy, prompts: list[Prompt], sampler: Sampler, reward: RewardScorer, *, max_new_tokens: int, batch_size: int
) -> dict[str, float]:
    """Greedy responses to held-out prompts: mean reward, exact match (rows with a reference), length."""
    rewards, hits, lengths, ended = [], [], [], []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        rollout, texts = sampler(policy, chunk, max_new_tokens=max_new_tokens, greedy=True)
        rewards += score(reward, chunk, texts).tolist()
        hits += [exact_match(p.messages, t, p.reference) for p, t in zip(chunk, texts) if p.reference is not None]
        lengths += rollout.lengths.tolist()
        ended += rollout.ended.tolist()
    out = {
        "val_reward": sum(rewards) / len(rewards),
        "val_response_length": sum(lengths) / len(lengths),
        "val_eos_rate": sum(ended) / len(ended),
    }
    if hits:
        out["val_exact_match"] = sum(hits) / len(hits)
    return out


# Training metrics logged as their last value (not the window's mean).
LAST_ONLY = frozenset({"lr", "critic_lr", "kl_coef", "grad_norm", "critic_grad_norm"})


def minibatches(num_rows: int, size: int, epochs: int) -> Iterator[torch.Tensor]:
    """Row indices of each update: a fresh shuffle per epoch, cut into `size` rows."""
    for _ in range(epochs):
        yield from torch.randperm(num_rows).split(size)


def build_policy(cfg, model_dir, parallel, num_updates: int) -> Learner:
    """The policy a sampling stage trains, laid out with sequence parallelism off (decoding goes token by
    token), with its LoRA/QLoRA adapters per the stage's mode."""
    lora, quant = adapters(cfg)
    return Learner.build(
        model_dir,
        sampling_layout(parallel),
        mode=cfg.mode,
        optim=cfg.optim,
        num_updates=num_updates,
        lora=lora,
        quant=quant,
    )


def policy_sampler(data, policy, runtime, parallel) -> Sampler:
    """Sampling from `policy` (PromptData's tokenizer); synced across ranks when the layout has several."""
    return Sampler(
        data.tokenizer, data.pad_id, end_ids(data.tokenizer, policy), runtime, synced=parallel.world_size > 1
    )


def finish_policy_run(run, session, result: dict, **facts) -> dict:
    """The policy gathered from its layout (collective) and, on rank 0, saved as out_dir/checkpoint/ with
    out_dir/result.json (the loop's result, the reward source, `facts` and the run's facts); every rank
    returns rank 0's result."""
    return run.finish(
        session.policy_learner,
        result,
        save=run.save_causal_lm(session.tokenizer),
        data_stats=session.data_stats,
        device=session.runtime.device,
        reward=session.reward_source,
        **facts,
    )
