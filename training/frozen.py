"""The frozen models of the sampling stages: the reference policy (a full copy, or the policy with its LoRA
adapters off), the reward model or rule reward, optionally kept on CPU between forward passes."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from parallel import efficiency, engine
from training.prompts import Prompt
from training.rewards import RuleReward
from training.sampling import Rollout, response_logprobs

RewardScorer = Callable[[list[list[dict]], list[str], list["str | None"]], list[float]]


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


def reward_flops_per_token(reward: RewardScorer, seq_len: int) -> float:
    """Forward FLOPs per token of the reward model scoring (parallel.efficiency); 0 for a rule function."""
    if not isinstance(reward, RewardModel):
        return 0.0
    return efficiency.flops_per_token(reward.frozen.model.config, seq_len, forward_only=True, head_outputs=1)


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


def score(reward: RewardScorer, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
    return torch.tensor(
        reward([p.messages for p in prompts], responses, [p.reference for p in prompts]), dtype=torch.float32
    )
