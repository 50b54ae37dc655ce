"""Typed configuration of training stages (entries of a recipe's `stages:` list)."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from parallel.dims import LoraConfig, QuantConfig

__all__ = [
    "NAME_PATTERN",
    "check_name",
    "LoraConfig",
    "QuantConfig",
    "OptimConfig",
    "StageConfig",
    "SFTStage",
    "DPOStage",
    "SimPOStage",
    "ORPOStage",
    "KTOStage",
    "RewardModelStage",
    "PPOStage",
    "GRPOStage",
    "TrainStage",
]


# Names that become a directory (a recipe's, a stage's under <workdir>/stages/): one plain path component,
# never '.', '..', absolute or with a separator. hpc/recipe.py uses it for the recipe name; eval/tasks.py
# keeps the same pattern for task names (a test keeps them equal).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def check_name(value: str) -> str:
    """`value` when it matches NAME_PATTERN; else a ValueError saying what a name may hold."""
    if not re.fullmatch(NAME_PATTERN, value):
        raise ValueError(
            f"{value!r} is not a valid name: use letters, digits, '_', '.' and '-', starting with a letter "
            "or digit (it names a directory of the run)"
        )
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimConfig(_Section):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay of 2-D and larger weights (not 1-D)")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw",
        description="adamw_8bit: bitsandbytes' AdamW with block-wise 8-bit states (tensors of 4096+ elements); "
        "paged_adamw_8bit: the same with states in CUDA unified memory, paged out under memory pressure "
        "(on CPU it runs as adamw_8bit); the 8-bit ones run in one process, under dp and ZeRO-1, not under "
        "ZeRO-2/3",
    )
    lr_scheduler: Literal["cosine_with_min_lr", "cosine", "linear", "constant", "wsd"] = Field(
        "cosine_with_min_lr",
        description="the LR after warmup: cosine_with_min_lr to min_lr_ratio at the last step; cosine and "
        "linear to 0 (transformers' curves); constant; wsd: constant, then a cosine decay over the last "
        "decay_steps (or decay_ratio x the updates) to min_lr_ratio",
    )
    warmup_steps: int = Field(20, ge=0, description="optimizer updates of linear warmup to the peak lr")
    min_lr_ratio: float | None = Field(
        None,
        ge=0,
        le=1,
        description="the floor of cosine_with_min_lr and wsd, as a fraction of lr (unset: 0.1 for "
        "cosine_with_min_lr, 0 for wsd)",
    )
    decay_ratio: float | None = Field(
        None, gt=0, le=1, description="wsd: the fraction of the updates that decays (unset: 0.1)"
    )
    decay_steps: int | None = Field(None, ge=1, description="wsd: the updates that decay (instead of decay_ratio)")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")

    # Fields of one schedule are None unless set, so a recipe naming them for another is refused (also when
    # a run directory's resolved recipe, every field written out, is read back).
    @model_validator(mode="after")
    def _fields_of_the_schedule(self) -> "OptimConfig":
        if self.min_lr_ratio is not None and self.lr_scheduler not in ("cosine_with_min_lr", "wsd"):
            raise ValueError(f"min_lr_ratio applies to lr_scheduler cosine_with_min_lr or wsd, not {self.lr_scheduler}")
        wsd_fields = [name for name in ("decay_ratio", "decay_steps") if getattr(self, name) is not None]
        if wsd_fields and self.lr_scheduler != "wsd":
            raise ValueError(f"{' and '.join(wsd_fields)} apply to lr_scheduler wsd, not {self.lr_scheduler}")
        if len(wsd_fields) == 2:
            raise ValueError("decay_ratio and decay_steps are both set; set one of them")
        return self

    @property
    def lr_floor(self) -> float:
        """The schedule's final lr as a fraction of lr: min_lr_ratio, else 0.1 (cosine_with_min_lr) or 0."""
        if self.min_lr_ratio is not None:
            return self.min_lr_ratio
        return 0.1 if self.lr_scheduler == "cosine_with_min_lr" else 0.0

    def decay_updates(self, num_updates: int) -> int:
        """wsd: how many of num_updates optimizer updates decay."""
        if self.decay_steps is not None:
            return self.decay_steps
        return max(1, round((self.decay_ratio if self.decay_ratio is not None else 0.1) * num_updates))


Mode = Literal["full", "lora", "qlora"]
Count = Annotated[int, Field(ge=1)]  # steps, rows, "every N steps": at least 1
SeqLen = Annotated[int, Field(ge=8)]


def _checkpoint_every(default: int = 100):
    return Field(
        default,
        ge=0,
        description="save a resumable training state every N steps (0: never); a "
        "restarted stage (requeued, preempted, crashed) resumes from the latest, under any layout",
    )


class StageConfig(_Section):
    """The fields every training stage has. A kind redeclares one only to give it its own default or
    description (its `kind` and `name`, its optimizer's learning rate, what its batch counts, ...)."""

    kind: str
    name: str
    mode: Mode = Field("full", description="qlora: LoRA on a 4-bit base (bitsandbytes)")
    lora: LoraConfig = LoraConfig()
    quant: QuantConfig = QuantConfig()
    optim: OptimConfig = OptimConfig()
    max_steps: Count = 200
    num_epochs: float | None = Field(
        None,
        gt=0,
        description="train for this many passes over the training data instead of max_steps (setting both "
        "is an error): max_steps = ceil(num_epochs x the steps of one epoch), computed at stage start from the "
        "loaded train split (an epoch: its rows // batch_size steps; with data.sources weights, the rows of "
        "the weighted sources)",
    )
    batch_size: Count = 16
    eval_every: Count = 50
    log_every: Count = 10
    checkpoint_every: int = _checkpoint_every()
    keep_checkpoints: int = Field(
        2,
        ge=1,
        description="how many complete resumable states to keep (the newest); an older one is deleted only "
        "after a newer one is complete, and a damaged newest one is skipped for the next older",
    )
    seed: int | None = Field(None, description="defaults to the recipe seed")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        # names <workdir>/stages/<name>/ (progress, logs, resume state): it must not lead elsewhere
        return check_name(v)

    @model_validator(mode="after")
    def _steps_or_epochs(self):
        if self.num_epochs is not None and "max_steps" in self.model_fields_set:
            raise ValueError(
                "max_steps and num_epochs are both set; set one of them (num_epochs computes max_steps "
                "from the train split at stage start)"
            )
        return self


class _AccumulatingStage(StageConfig):
    """Stages that train on fixed-length rows, one optimizer step accumulated over grad_accum micro-steps."""

    _unit: ClassVar[str] = "sequences"  # what batch_size counts, in messages

    grad_accum: Count = 1
    seq_len: SeqLen = 128

    @model_validator(mode="after")
    def _batch_divides(self):
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum} ({self._unit})"
            )
        return self


class SFTStage(_AccumulatingStage):
    kind: Literal["sft"] = "sft"
    name: str = "sft"
    max_steps: Count = 300
    batch_size: Count = Field(16, description="sequences per optimizer step (global)")
    packing: bool = Field(
        False,
        description="the examples of a step's batch are packed into rows of at most seq_len tokens (documents "
        "kept apart: attention and labels never cross them); the same examples per step as without packing, "
        "so the loss is the same token mean, with less padding. Off under pipeline parallelism (pp > 1), "
        "whose stages take no position_ids; `hpcft plan` and the stage's result say whether it applied. Off by "
        "default: batches are already length-bucketed (1.22 computed tokens per real token on a long-tailed "
        "mix, 1.19 packed), and a packed row's attention runs over the whole row on sdpa (bench/packing.py: "
        "0.82x label tokens/s on CPU)",
    )
    eval_every: Count = Field(50, description="validation loss every N steps")


class DPOStage(_AccumulatingStage):
    """Direct preference optimisation on {prompt, chosen, rejected} rows against a frozen reference."""

    _unit: ClassVar[str] = "pairs"

    kind: Literal["dpo"] = "dpo"
    name: str = "dpo"
    mode: Mode = Field(
        "full", description="lora/qlora: the reference is the model with adapters disabled, so no second copy is held"
    )
    optim: OptimConfig = OptimConfig(lr=5e-6, warmup_steps=10)
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid",
        description="sigmoid: DPO (with label_smoothing: cDPO); ipo: squared distance of the log-ratio gap to "
        "1/(2 beta); hinge: SLiC, relu(1 - beta x gap); robust: DPO unbiased under label noise label_smoothing",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="assumed label noise of the sigmoid (conservative DPO) and robust losses"
    )
    rpo_alpha: float = Field(
        0.0,
        ge=0,
        description="weight of the chosen side's per-token NLL added to the "
        "loss (RPO): keeps the chosen answers' likelihood from sinking with the rejected",
    )
    precompute_reference: bool = Field(
        False,
        description="reference log-probs computed once before "
        "training (no reference forward per step; the full copy is freed)",
    )
    batch_size: Count = Field(16, description="preference pairs per optimizer step (global)")
    seq_len: SeqLen = Field(256, description="tokens of prompt + response, each side of a pair")
    eval_every: Count = Field(50, description="held-out preference accuracy every N steps")

    @model_validator(mode="after")
    def _smoothing_is_sigmoid(self) -> "DPOStage":
        if self.loss_type in ("ipo", "hinge") and self.label_smoothing:
            raise ValueError(f"label_smoothing applies to the sigmoid and robust losses only, not {self.loss_type}")
        return self


class _ReferenceFreeStage(_AccumulatingStage):
    """Preference optimisation on {prompt, chosen, rejected} rows from the policy's own length-normalised
    log-probs: no reference model is loaded or run."""

    _unit: ClassVar[str] = "pairs"

    optim: OptimConfig = OptimConfig(lr=5e-6, warmup_steps=10)
    batch_size: Count = Field(16, description="preference pairs per optimizer step (global)")
    seq_len: SeqLen = Field(256, description="tokens of prompt + response, each side of a pair")
    eval_every: Count = Field(50, description="held-out preference accuracy every N steps")


class SimPOStage(_ReferenceFreeStage):
    """SimPO: -log sigmoid(beta x (mean log-prob of chosen - of rejected) - gamma), reference-free."""

    kind: Literal["simpo"] = "simpo"
    name: str = "simpo"
    beta: float = Field(2.0, gt=0, description="scale of the length-normalised log-prob rewards")
    gamma: float = Field(0.5, ge=0, description="target margin between the chosen and rejected rewards")


class ORPOStage(_ReferenceFreeStage):
    """ORPO: the chosen side's SFT loss plus beta x the odds-ratio loss, reference-free."""

    kind: Literal["orpo"] = "orpo"
    name: str = "orpo"
    beta: float = Field(
        0.1,
        gt=0,
        description="weight of the odds-ratio term against the chosen side's NLL (the paper's lambda, TRL's beta)",
    )


class KTOStage(_AccumulatingStage):
    """KTO on unpaired {prompt, completion, label} rows against a frozen reference: desirable completions
    pushed above, undesirable ones below, the reference point z0 (the batch's KL estimate)."""

    _unit: ClassVar[str] = "rows"

    kind: Literal["kto"] = "kto"
    name: str = "kto"
    mode: Mode = Field(
        "full", description="lora/qlora: the reference is the model with adapters disabled, so no second copy is held"
    )
    optim: OptimConfig = OptimConfig(lr=5e-6, warmup_steps=10)
    beta: float = Field(
        0.1, gt=0, description="scale of the log-ratio rewards, the strength of the pull to the reference"
    )
    desirable_weight: float = Field(
        1.0,
        gt=0,
        description="lambda_D: weight of a desirable row's loss; with undesirable_weight, keep "
        "desirable_weight x desirable rows / (undesirable_weight x undesirable rows) in [1, 4/3] (the KTO paper)",
    )
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U: weight of an undesirable row's loss")
    precompute_reference: bool = Field(
        False,
        description="reference log-probs of every row and its mismatched row computed once before training "
        "(no reference forward per step; the full copy is freed)",
    )
    batch_size: Count = Field(16, description="unpaired rows per optimizer step (global)")
    seq_len: SeqLen = Field(256, description="tokens of prompt + completion")
    eval_every: Count = Field(50, description="held-out KTO loss and rewards every N steps")


class RewardModelStage(_AccumulatingStage):
    """A scalar reward head on the LM trained with the Bradley-Terry loss on preference rows."""

    _unit: ClassVar[str] = "pairs"

    kind: Literal["reward_model"] = "reward_model"
    name: str = "reward_model"
    mode: Mode = Field(
        "full", description="qlora: LoRA on a 4-bit base (bitsandbytes), the score head trained in full precision"
    )
    optim: OptimConfig = OptimConfig(lr=1e-4, warmup_steps=10)
    batch_size: Count = Field(16, description="preference pairs per optimizer step (global)")
    seq_len: SeqLen = 256
    eval_every: Count = Field(50, description="held-out pairwise accuracy every N steps")


class _RLStage(StageConfig):
    """Fields PPO and GRPO share: the policy, sampling, the clipped update and the reward."""

    mode: Mode = Field(
        "full",
        description="lora/qlora (4-bit base, bitsandbytes): the reference is the policy with adapters "
        "disabled, so no second copy is held; PPO's critic is quantized alike",
    )
    optim: OptimConfig = Field(
        OptimConfig(lr=1e-6, warmup_steps=0, min_lr_ratio=1.0),
        description="the policy's optimizer; warmup_steps and the schedule count "
        "optimizer updates (ppo_epochs x mini-batches per step)",
    )
    max_steps: Count = Field(100, description="rollout batches (each followed by ppo_epochs of updates)")
    ppo_epochs: Count = Field(1, description="passes over each rollout batch")
    clip_eps: float = Field(0.2, gt=0, description="policy ratio clip range")
    max_prompt_len: SeqLen = Field(
        256, description="prompt tokens (with the chat template); longer prompts are skipped and counted"
    )
    max_new_tokens: Count = Field(64, description="response tokens sampled per prompt")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; log-probs are taken at it too")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    reward_fn: str | None = Field(
        None,
        description="rule reward 'package.module:function' called as "
        "fn(prompt_messages, response, reference) -> float, e.g. "
        "'training.rewards:exact_match'; None scores with the reward model the "
        "stage is given (reward_model_dir)",
    )
    offload_frozen: bool = Field(
        False,
        description="keep the reference and reward models on CPU, moving them "
        "to the accelerator only for their forward passes",
    )
    eval_every: Count = Field(10, description="held-out greedy reward / exact match every N steps (and at step 0)")
    checkpoint_every: int = _checkpoint_every(20)
    eval_prompts: Count = Field(128, description="validation prompts scored per evaluation (the first N)")
    log_every: Count = 1

    @model_validator(mode="after")
    def _reward_fn_imports(self) -> "_RLStage":
        if self.reward_fn is not None:
            from training.rewards import load_reward_fn

            try:
                load_reward_fn(self.reward_fn)
            except ValueError as err:
                raise ValueError(f"reward_fn: {err}") from None
        return self


class PPOStage(_RLStage):
    """PPO with a critic, a per-token KL penalty against a frozen reference, and GAE advantages."""

    kind: Literal["ppo"] = "ppo"
    name: str = "ppo"
    critic_optim: OptimConfig = Field(
        OptimConfig(lr=1e-5, warmup_steps=0, min_lr_ratio=1.0),
        description="the critic's optimizer, stepped with the policy's",
    )
    critic_init: Literal["auto", "reward_model", "policy"] = Field(
        "auto",
        description="the critic's starting weights: auto = the reward model when the stage is given one "
        "(even with reward_fn set), else the policy with a fresh value head",
    )
    batch_size: Count = Field(64, description="prompts sampled per rollout batch (one response each)")
    mini_batch_size: Count = Field(16, description="rollouts per optimizer update")
    kl_coef: float = Field(0.05, ge=0, description="initial coefficient of the per-token KL penalty")
    adaptive_kl: bool = Field(False, description="adapt kl_coef towards kl_target (proportional controller)")
    kl_target: float = Field(6.0, gt=0, description="target KL (nats per response) of the adaptive controller")
    kl_horizon: Count = Field(10000, description="adaptive controller horizon, in rollouts")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    value_clip_eps: float = Field(0.2, gt=0, description="value clip range around the rollout's values")
    whiten_advantages: bool = True

    @model_validator(mode="after")
    def _batches_divide(self) -> "PPOStage":
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of mini_batch_size {self.mini_batch_size}"
            )
        return self


class GRPOStage(_RLStage):
    """GRPO: group-relative advantages over several samples per prompt, no critic, k3 KL to the reference."""

    kind: Literal["grpo"] = "grpo"
    name: str = "grpo"
    batch_size: Count = Field(16, description="prompts per rollout batch")
    group_size: int = Field(8, ge=2, description="responses sampled per prompt")
    mini_batch_size: int | None = Field(
        None,
        ge=1,
        description="responses per optimizer update; batch_size "
        "x group_size must be a multiple of it; None: all of them (one "
        "update per epoch)",
    )
    beta: float = Field(
        0.04, ge=0, description="coefficient of the k3 KL estimate in the loss; 0 drops the reference model"
    )
    scale_rewards: bool = Field(True, description="divide each group's centred rewards by its std")

    @model_validator(mode="after")
    def _batches_divide(self) -> "GRPOStage":
        responses = self.batch_size * self.group_size
        if self.mini_batch_size is not None and responses % self.mini_batch_size:
            raise ValueError(
                f"batch_size x group_size = {responses} responses must be a multiple of "
                f"mini_batch_size {self.mini_batch_size}"
            )
        return self


# One entry of a recipe's `stages:` list, chosen by its `kind`.
TrainStage = Annotated[
    Union[SFTStage, DPOStage, SimPOStage, ORPOStage, KTOStage, RewardModelStage, PPOStage, GRPOStage],
    Field(discriminator="kind"),
]
