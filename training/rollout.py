"""What PPO and GRPO share: prompts, sampling, response log-probs, frozen models, rewards, evaluation, the loop.

Tensor layout of a rollout: the prompts are left-padded to one width P (so every response starts at
column P and generation continues from the right edge), the responses right-padded to width T. A
response ends at its first end-of-sequence token, which is part of the response (the policy chose to
stop); positions after it are padding and masked. Position ids always count real tokens only, in
generation and in every training forward, so a left-padded prompt is seen exactly as an unpadded one.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from parallel import engine
from parallel.trainer import Objective
from training.data import EpochBatches, read_jsonl
from training.learner import Learner
from training.losses import entropy_from_logits, kl_penalty, masked_mean, ppo_policy_loss
from training.rewards import RuleReward, exact_match

Progress = Callable[[dict], None]
RewardScorer = Callable[[list[list[dict]], list[str], list["str | None"]], list[float]]
ROLES = ("system", "user", "assistant")


# ---- prompts ------------------------------------------------------------------------------------------


class PromptRowError(ValueError):
    """A row that cannot become a prompt; `reason` is a short label for the counts."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Prompt:
    messages: list[dict]  # the chat turns the response answers
    reference: str | None  # the dataset's answer, when the row has one
    input_ids: list[int]  # messages rendered with the chat template and its generation prompt


@dataclass
class PromptStats:
    rows: int = 0
    prompts: int = 0
    with_reference: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count


def _messages(value: object, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise PromptRowError(f"bad_{key}")
    for m in value:
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise PromptRowError(f"bad_{key}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _split_last_answer(messages: list[dict]) -> tuple[list[dict], str | None]:
    """(turns before the last assistant turn, its content); a conversation with no answer is all prompt."""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        return messages, None
    return messages[: answers[-1]], messages[answers[-1]]["content"]


def parse_prompt_row(row: object) -> tuple[list[dict], str | None]:
    """(prompt messages, reference answer or None) of one row; raises PromptRowError.

    Chat rows {"messages": [...]}: the prompt is every turn before the last assistant turn, the
    reference that turn's content (no assistant turn: the whole conversation is the prompt).
    Preference rows {"prompt": str | messages, "chosen": str | messages, ...}: the reference is the
    chosen answer. Prompt-only rows {"prompt": ..., "reference": str (optional)} are accepted too.
    """
    if not isinstance(row, dict):
        raise PromptRowError("not_an_object")
    reference = None
    if "messages" in row:
        prompt, reference = _split_last_answer(_messages(row["messages"], "messages"))
    elif "prompt" in row:
        if isinstance(row["prompt"], str):
            if not row["prompt"].strip():
                raise PromptRowError("empty_prompt")
            prompt = [{"role": "user", "content": row["prompt"]}]
        else:
            prompt = _messages(row["prompt"], "prompt")
        chosen = row.get("chosen", row.get("reference"))
        if isinstance(chosen, str):
            reference = chosen
        elif chosen is not None:
            _, reference = _split_last_answer(_messages(chosen, "chosen"))
    else:
        raise PromptRowError("no_prompt")
    if not prompt or prompt[-1]["role"] == "assistant":
        raise PromptRowError("no_prompt_turn")
    if reference is not None and not reference.strip():
        raise PromptRowError("empty_reference")
    return prompt, reference


def build_prompts(rows: list, tokenizer, max_prompt_len: int) -> tuple[list[Prompt], PromptStats]:
    """Tokenised prompts of the usable rows, and counts of the rows left out (by reason)."""
    prompts, reasons = [], Counter()
    for row in rows:
        try:
            messages, reference = parse_prompt_row(row)
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception:  # a template may refuse e.g. a role order; that row is unusable, not fatal
                raise PromptRowError("template_error") from None
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > max_prompt_len:
                raise PromptRowError("prompt_too_long")
        except PromptRowError as err:
            reasons[err.reason] += 1
            continue
        prompts.append(Prompt(messages, reference, list(ids)))
    stats = PromptStats(
        rows=len(rows),
        prompts=len(prompts),
        with_reference=sum(p.reference is not None for p in prompts),
        rejected=dict(sorted(reasons.items())),
    )
    return prompts, stats


def load_prompts(path: Path, tokenizer, max_prompt_len: int) -> tuple[list[Prompt], PromptStats]:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"prompt split {path} does not exist; run the data stage first")
    prompts, stats = build_prompts(read_jsonl(path), tokenizer, max_prompt_len)
    if not prompts:
        raise ValueError(
            f"{path}: no usable prompt out of {stats.rows} rows (rejected: {stats.rejected}); "
            "rows are {'messages': [...]} or {'prompt': ..., 'chosen': ...}"
        )
    return prompts, stats


def prompt_batches(prompts: list[Prompt], batch_size: int, seed: int) -> EpochBatches:
    """Global batches of prompt indices by step (prompts of similar length together)."""
    return EpochBatches([len(p.input_ids) for p in prompts], batch_size, seed, "training prompts")


# ---- sampling -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    prompt_ids: torch.Tensor  # [B, P], left-padded
    prompt_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, T], pad after the end
    response_mask: torch.Tensor  # [B, T], 1 on response tokens (the final EOS included)
    ended: torch.Tensor  # [B] bool, the response stopped at an EOS (not at max_new_tokens)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)

    def select(self, index: torch.Tensor) -> "Rollout":
        """The rows `index`, in that order."""
        return Rollout(
            *(t[index] for t in (self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask, self.ended))
        )


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one left-padded [B, max_len] batch and its attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def mask_after_eos(response_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of the tokens up to and including each row's first EOS [B, T], whether the row has one [B])."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))
    eos_before = is_eos.long().cumsum(1) - is_eos.long()  # EOS tokens strictly before each position
    return (eos_before == 0).long(), is_eos.any(1)


def end_ids(tokenizer, model) -> list[int]:
    """Token ids that end a response: the tokenizer's EOS (ChatML: the turn end) and the model's own."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if not ids:
        raise ValueError("the tokenizer and the model define no EOS token; responses would never end")
    return sorted(ids)


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eos_ids: list[int],
    max_new_tokens: int,
    runtime: engine.Runtime,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    synced: bool = False,
) -> Rollout:
    """Responses to a batch of prompts with HF generate and its KV cache (left padding, eval mode).

    synced: the model is laid out over several ranks (FSDP, TP); every rank keeps stepping until all
    are done, so their collectives stay in lockstep (HF's synced_gpus)."""
    ids, mask = left_pad(prompts, pad_id)
    options = (
        dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    )  # top_k=0: no top-k cut
    was_training = model.training
    model.eval()
    with runtime.autocast():
        out = model.generate(
            input_ids=ids.to(runtime.device),
            attention_mask=mask.to(runtime.device),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            use_cache=True,
            synced_gpus=synced,
            **options,
        )
    model.train(was_training)
    response = out[:, ids.shape[1] :].cpu()
    response_mask, ended = mask_after_eos(response, eos_ids)
    response = response.masked_fill(response_mask == 0, pad_id)
    return Rollout(ids, mask, response, response_mask, ended)


def rollout_from_tokens(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int, eos_ids: list[int]
) -> Rollout:
    """A Rollout from token lists (responses up to and including their EOS when they have one)."""
    ids, mask = left_pad(prompts, pad_id)
    width = max(1, max(len(r) for r in responses))
    response = torch.full((len(responses), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), width), dtype=torch.long)
    for row, tokens in enumerate(responses):
        response[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        response_mask[row, : len(tokens)] = 1
    ended = torch.tensor([bool(r) and r[-1] in eos_ids for r in responses])
    return Rollout(ids, mask, response, response_mask, ended)


def response_tokens(rollout: Rollout) -> list[list[int]]:
    """Each response's tokens (its EOS included), as lists."""
    return [ids[: int(n)].tolist() for ids, n in zip(rollout.response_ids, rollout.lengths)]


def rollout_rows(rollout: Rollout) -> dict[str, torch.Tensor]:
    """A rollout as per-row tensors for the engine (prompt + response, with position ids past the padding)."""
    mask = rollout.attention_mask
    return {
        "input_ids": rollout.input_ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
        "response_ids": rollout.response_ids,
        "response_mask": rollout.response_mask.float(),
    }


def rows_response_logits(logits: torch.Tensor, rows: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """The logits that predict each response token of `rows` (see rollout_rows), scaled by temperature."""
    width = rows["input_ids"].shape[1] - rows["response_ids"].shape[1]
    return logits[:, width - 1 : -1].float() / temperature


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """Each response's text up to (not including) its EOS; special tokens inside it are kept visible."""
    texts = []
    for ids, mask, ended in zip(rollout.response_ids, rollout.response_mask, rollout.ended):
        n = int(mask.sum()) - int(ended)
        texts.append(tokenizer.decode(ids[:n].tolist(), skip_special_tokens=False))
    return texts


def forward(model, rollout: Rollout, runtime: engine.Runtime, **kwargs):
    """The model on prompt + response with position ids that skip the left padding."""
    ids, mask = rollout.input_ids.to(runtime.device), rollout.attention_mask.to(runtime.device)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with runtime.autocast():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False, **kwargs)


def response_logits(model, rollout: Rollout, runtime: engine.Runtime, temperature: float) -> torch.Tensor:
    """[B, T, vocab] fp32 logits that predict each response token, scaled by the sampling temperature."""
    logits = forward(model, rollout, runtime).logits
    width = rollout.prompt_ids.shape[1]
    # Position t predicts token t + 1: the last prompt position predicts the first response token.
    return logits[:, width - 1 : -1].float() / temperature


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at `tokens`, [B, T]."""
    return torch.gather(F.log_softmax(logits, dim=-1), 2, tokens.to(logits.device).unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def response_logprobs(model, rollout: Rollout, runtime: engine.Runtime, temperature: float) -> torch.Tensor:
    """Log-probs of the sampled response tokens under `model` (eval mode, no grad), [B, T] on the device."""
    was_training = model.training
    model.eval()
    logits = response_logits(model, rollout, runtime, temperature)
    model.train(was_training)
    return gather_logprobs(logits, rollout.response_ids)


# ---- frozen models ------------------------------------------------------------------------------------


class Frozen:
    """A model that is never trained; with offload it lives on CPU and visits the device per forward."""

    def __init__(self, model, runtime: engine.Runtime, offload: bool):
        self.runtime, self.offload = runtime, offload
        self.model = model.eval().requires_grad_(False).to("cpu" if offload else runtime.device)

    @contextmanager
    def on_device(self) -> Iterator[torch.nn.Module]:
        if self.offload:
            self.model.to(self.runtime.device)
        try:
            yield self.model
        finally:
            if self.offload:
                self.model.to("cpu")
                if self.runtime.device.type == "cuda":
                    torch.cuda.empty_cache()


class Reference:
    """The starting policy's log-probs: a frozen copy loaded from model_dir (full), or the policy with its
    LoRA adapters disabled (lora: no second model is held)."""

    def __init__(self, policy, model_dir: Path, mode: str, runtime: engine.Runtime, offload: bool):
        self.policy, self.runtime = policy, runtime
        self.frozen = Frozen(engine.load_model(model_dir), runtime, offload) if mode == "full" else None

    @torch.no_grad()
    def logprobs(self, rollout: Rollout, temperature: float) -> torch.Tensor:
        if self.frozen is not None:
            with self.frozen.on_device() as model:
                return response_logprobs(model, rollout, self.runtime, temperature)
        with self.policy.disable_adapter():
            return response_logprobs(self.policy, rollout, self.runtime, temperature)


class RewardModel:
    """Scores prompt + response, rendered with the reward model's own chat template, at the last token."""

    def __init__(self, model_dir: Path, runtime: engine.Runtime, offload: bool, batch_size: int = 64):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if not self.tokenizer.chat_template:
            raise ValueError(f"reward model {model_dir}: the tokenizer has no chat template to render responses")
        self.tokenizer.padding_side = "right"
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
        if model.config.num_labels != 1:
            raise ValueError(
                f"reward model {model_dir} has {model.config.num_labels} outputs; a scalar head "
                "(num_labels=1, e.g. from a reward_model stage) is needed"
            )
        if model.config.pad_token_id is None:  # needed to find each row's last real token
            pad_id = self.tokenizer.pad_token_id
            model.config.pad_token_id = pad_id if pad_id is not None else self.tokenizer.eos_token_id
        self.model_dir, self.batch_size = Path(model_dir), batch_size
        self.frozen = Frozen(model, runtime, offload)
        self.runtime = runtime

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], responses: list[str], references: list[str | None]) -> list[float]:
        texts = [
            self.tokenizer.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False)
            for p, r in zip(prompts, responses, strict=True)
        ]
        scores = []
        with self.frozen.on_device() as model:
            for lo in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[lo : lo + self.batch_size], add_special_tokens=False, padding=True, return_tensors="pt"
                )
                with self.runtime.autocast():
                    logits = model(
                        input_ids=enc["input_ids"].to(self.runtime.device),
                        attention_mask=enc["attention_mask"].to(self.runtime.device),
                    ).logits
                scores += logits.float().squeeze(-1).cpu().tolist()
        return scores


def check_reward_source(reward_fn: str | None, reward_model_dir: Path | None, stage: str) -> None:
    """Fail before any model is loaded when the stage's reward cannot be built."""
    if reward_fn is None and reward_model_dir is None:
        raise ValueError(
            f"the {stage} stage scores responses with a reward model (reward_fn is not set) but "
            "no reward model directory was given; add a reward_model stage before it or set "
            "reward_fn, e.g. 'training.rewards:exact_match'"
        )
    if reward_model_dir is not None and not Path(reward_model_dir).is_dir():
        raise ValueError(f"reward model directory {reward_model_dir} does not exist")


def build_reward(
    reward_fn: str | None, reward_model_dir: Path | None, stage: str, runtime: engine.Runtime, offload: bool
) -> tuple[RewardScorer, str]:
    """The stage's scorer and a description of it: the rule function, else the reward model."""
    check_reward_source(reward_fn, reward_model_dir, stage)
    if reward_fn is not None:
        return RuleReward(reward_fn), f"function:{reward_fn}"
    return RewardModel(Path(reward_model_dir), runtime, offload), f"model:{Path(reward_model_dir).resolve()}"


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


def sample_rollouts(cfg, s, prompts: list[Prompt], step: int):
    """(rollout, texts) for every prompt, from session `s` (policy, sampler, tokenizer, seed, and the
    Trainer `s.policy_learner.trainer`). One rank samples every prompt with the running generator.
    Several ranks: each dp rank samples a contiguous share (its tp ranks alike, seeded by dp rank), then
    all ranks gather the responses in prompt order."""
    trainer = s.policy_learner.trainer
    if trainer.dims.world_size == 1:
        return s.sampler(
            s.policy, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p
        )
    import torch.distributed as dist

    from parallel.distributed.mesh import dp_mesh, dp_rank

    dp, rank = trainer.dims.dp, dp_rank(trainer.mesh)
    share = len(prompts) // dp
    torch.manual_seed(s.seed * 100_003 + step * 1_009 + rank)
    mine, _ = s.sampler(
        s.policy,
        prompts[rank * share : (rank + 1) * share],
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
    )
    gathered = [None] * dp
    dist.all_gather_object(gathered, response_tokens(mine), group=dp_mesh(trainer.mesh).get_group())
    torch.manual_seed(s.seed * 100_003 + step)  # every rank draws the same mini-batch order below
    rollout = rollout_from_tokens(
        [p.input_ids for p in prompts], [r for part in gathered for r in part], s.sampler.pad_id, s.sampler.eos_ids
    )
    return rollout, decode_responses(s.tokenizer, rollout)


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


@dataclass
class Sampler:
    """What sampling needs besides the model; built once per stage."""

    tokenizer: object
    pad_id: int
    eos_ids: list[int]
    runtime: engine.Runtime
    synced: bool = False  # the policy is laid out over several ranks (see `sample`)

    def __call__(
        self,
        model,
        prompts: list[Prompt],
        *,
        max_new_tokens: int,
        greedy: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> tuple[Rollout, list[str]]:
        rollout = sample(
            model,
            [p.input_ids for p in prompts],
            pad_id=self.pad_id,
            eos_ids=self.eos_ids,
            max_new_tokens=max_new_tokens,
            runtime=self.runtime,
            greedy=greedy,
            temperature=temperature,
            top_p=top_p,
            synced=self.synced,
        )
        return rollout, decode_responses(self.tokenizer, rollout)


def score(reward: RewardScorer, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
    return torch.tensor(
        reward([p.messages for p in prompts], responses, [p.reference for p in prompts]), dtype=torch.float32
    )


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
