"""Alignment losses as pure functions on tensors: DPO and its variants (IPO, hinge, robust, cDPO), KTO on
unpaired rows, the reference-free SimPO and ORPO, Bradley-Terry, and the PPO/GRPO pieces.

Conventions: `logits` are [batch, time, vocab] from a causal LM; `labels` are aligned with the inputs
(IGNORE_INDEX where no log-prob is taken) and shifted here, so position t's logits score token t+1.
Per-token tensors passed to the RL helpers are already aligned with each other: [batch, time] with a
0/1 `mask` of the positions that count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parallel.trainer import IGNORE_INDEX  # the engine's label padding value


@dataclass(frozen=True)
class PreferenceLoss:
    loss: torch.Tensor  # scalar mean over pairs (differentiable)
    chosen_rewards: torch.Tensor  # [batch], detached
    rejected_rewards: torch.Tensor  # [batch], detached
    margin: torch.Tensor  # scalar mean(chosen - rejected)
    accuracy: torch.Tensor  # scalar fraction of pairs with chosen > rejected (ties count as wrong)


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next label token and the mask of label positions, both [batch, time - 1].

    Vocab-sharded logits (a DTensor from a vocab-parallel lm_head, inside torch's loss_parallel context)
    are never gathered: the log-prob is minus the per-token cross-entropy, which loss_parallel computes
    from the shards."""
    from torch.distributed.tensor import DTensor

    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != ignore_index
    # Gather at a valid index everywhere, then zero the ignored positions.
    safe = targets.masked_fill(~mask, 0)
    if isinstance(logits, DTensor):
        nll = F.cross_entropy(logits.flatten(0, 1), safe.flatten(), reduction="none")
        logp = -nll.to_local().view_as(safe)  # replicated over tp: every rank holds every value
    else:
        logp = torch.gather(F.log_softmax(logits, dim=-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of the label tokens' log-probs per sequence, [batch]."""
    logp, _ = token_logprobs(logits, labels, ignore_index)
    return logp.sum(-1)


def mean_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean of the label tokens' log-probs per sequence (length-normalised), [batch]; 0 for no label."""
    logp, mask = token_logprobs(logits, labels, ignore_index)
    return logp.sum(-1) / mask.sum(-1).clamp(min=1)


def _preference(loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> PreferenceLoss:
    chosen, rejected = chosen.detach(), rejected.detach()
    return PreferenceLoss(
        loss=loss.mean(),
        chosen_rewards=chosen,
        rejected_rewards=rejected,
        margin=(chosen - rejected).mean(),
        accuracy=(chosen > rejected).float().mean(),
    )


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO on sequence log-probs [batch]; implicit rewards are beta * (policy - reference).

    h is the log-ratio difference (chosen minus rejected), eps = label_smoothing:
    sigmoid: -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h); eps > 0 is conservative DPO
      (cDPO: labels flipped with probability eps).
    robust: ((1 - eps) * -logsigmoid(beta * h) + eps * logsigmoid(-beta * h)) / (1 - 2 eps), an unbiased
      estimate of the clean loss under label noise eps (Chowdhury et al., 2024).
    hinge: relu(1 - beta * h) (SLiC), which stops pushing once beta * h reaches 1.
    ipo: (h - 1 / (2 * beta))^2, which stops pushing once the gap reaches its target.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        loss = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        loss = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        loss = F.relu(1 - beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; use one of {', '.join(DPO_LOSS_TYPES)}")
    return _preference(loss, beta * chosen_ratio, beta * rejected_ratio)


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, beta: float, gamma: float) -> PreferenceLoss:
    """SimPO (Meng et al., 2024) on length-normalised log-probs [batch] (a response's mean per-token
    log-prob): -logsigmoid(beta * chosen - beta * rejected - gamma). No reference model: the rewards are
    beta * the mean log-probs, gamma the target margin between them."""
    loss = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return _preference(loss, beta * chosen, beta * rejected)


@dataclass(frozen=True)
class KTOLoss:
    loss: torch.Tensor  # scalar weighted mean over rows (differentiable)
    rewards: torch.Tensor  # [rows] beta * (policy - reference), detached
    reference_point: torch.Tensor  # scalar z0 the rewards were compared with (detached)


def kto_reference_point(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean(policy_kl - ref_kl)), detached: an estimate of
    KL(policy || reference) from sequence log-probs [rows] of mismatched (prompt, completion) rows.

    It is a mean over the whole global batch, so every data-parallel rank (and every micro-batch) must be
    handed all of the batch's mismatched rows, not its share (the KTO stage scores them through
    Learner.rows, which gathers over dp); z0 then does not depend on the layout."""
    diff = (policy_kl - ref_kl).detach().double()
    return (diff.sum() / max(diff.numel(), 1)).clamp(min=0).to(policy_kl.dtype)


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    reference_point: torch.Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLoss:
    """KTO (Ethayarajh et al., 2024) on sequence log-probs [rows] of unpaired rows, `desirable` [rows] bool.

    With r = policy - reference and z0 the reference point (kto_reference_point, no gradient):
    desirable rows lose desirable_weight * (1 - sigmoid(beta * (r - z0))), undesirable rows
    undesirable_weight * (1 - sigmoid(beta * (z0 - r))); the loss is the mean over all rows."""
    ratio = policy - reference
    z0 = torch.as_tensor(reference_point, dtype=ratio.dtype, device=ratio.device).detach()
    desirable = desirable.bool()
    gain = torch.where(desirable, ratio - z0, z0 - ratio)
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(ratio.dtype)
    loss = weight * (1 - torch.sigmoid(beta * gain))
    return KTOLoss(loss=loss.mean(), rewards=(beta * ratio).detach(), reference_point=z0)


@dataclass(frozen=True)
class OddsRatioLoss(PreferenceLoss):
    nll: torch.Tensor  # scalar mean over pairs of the chosen side's per-token NLL (detached)
    log_odds: torch.Tensor  # scalar mean log odds ratio, chosen over rejected (detached)


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of p = exp(mean_logp), a response's geometric-mean token probability."""
    # p = 1 exactly would make the odds infinite; a mean log-prob is < 0 for any LM that is not certain.
    mean_logp = mean_logp.clamp(max=-1e-6)
    return mean_logp - torch.log(-torch.expm1(mean_logp))


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, beta: float) -> OddsRatioLoss:
    """ORPO (Hong et al., 2024) on mean per-token log-probs [batch]: the chosen side's NLL plus
    beta * -logsigmoid(log odds(chosen) - log odds(rejected)) (beta is the paper's lambda). No reference
    model; the reported rewards are the mean log-probs themselves."""
    ratio = log_odds(chosen) - log_odds(rejected)
    nll = -chosen
    out = _preference(nll - beta * F.logsigmoid(ratio), chosen, rejected)
    return OddsRatioLoss(**vars(out), nll=nll.detach().mean(), log_odds=ratio.detach().mean())


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> PreferenceLoss:
    """Reward-model loss -logsigmoid(r_chosen - r_rejected - margin) on scalar rewards [batch]."""
    return _preference(-F.logsigmoid(chosen - rejected - margin), chosen, rejected)


# ---- PPO / GRPO ---------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance of the masked entries."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Scale masked entries to unit variance (and zero mean unless shift_mean is False); others become 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over [batch, time]; returns (advantages, returns).

    A masked position is terminal: it contributes no value to the step before it and no advantage,
    so a right-padded response ends at its last unmasked token (masked prompt positions, before the
    response, see zeros and are zeroed).
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    num_steps = values.size(1)
    for t in reversed(range(num_steps)):
        next_mask = mask[:, t + 1] if t + 1 < num_steps else torch.zeros_like(running)
        next_value = values[:, t + 1] * next_mask if t + 1 < num_steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * next_mask * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


@dataclass(frozen=True)
class PolicyLoss:
    loss: torch.Tensor
    clip_fraction: torch.Tensor  # share of tokens where the clipped objective was the active one
    approx_kl: torch.Tensor  # k3 estimate of KL(old || new) over the tokens


def ppo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, clip_eps: float
) -> PolicyLoss:
    """Clipped surrogate: mean over tokens of max(-A * r, -A * clip(r, 1 - eps, 1 + eps))."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(ratio - 1 - log_ratio, mask)
    return PolicyLoss(loss, clip_fraction, approx_kl)


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * mean of max(unclipped, clipped) squared error, values clipped to old +- eps; (loss, clip fraction)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        # Only where the value left the clip range: inside it the clipped and unclipped errors differ by
        # rounding alone (old + (v - old) != v in the last bit), which would count at random.
        active = ((values - old_values).abs() > clip_eps) & (clipped > unclipped)
        clip_fraction = masked_mean(active.float(), mask)
    return loss, clip_fraction


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    k1 = log p - log q (unbiased, can be negative); k3 = q/p - 1 - log(q/p) (unbiased, always >= 0).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dimension: logsumexp(z) - sum(softmax(z) * z)."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(-1)


def grpo_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages for rewards [num_prompts * group_size], grouped contiguously per prompt.

    Each reward minus its group's mean, divided by the group's (sample) std + eps when scale is set;
    a group whose rewards are all equal gets zero advantage.
    """
    if group_size < 2:
        raise ValueError(f"GRPO needs at least 2 samples per prompt, not {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)
