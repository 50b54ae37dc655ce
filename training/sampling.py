"""Sampling from the policy and reading its log-probs back.

Tensor layout of a rollout: the prompts are left-padded to one width P (so every response starts at
column P and generation continues from the right edge), the responses right-padded to width T. A
response ends at its first end-of-sequence token, which is part of the response (the policy chose to
stop); positions after it are padding and masked. Position ids always count real tokens only, in
generation and in every training forward, so a left-padded prompt is seen exactly as an unpadded one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parallel import engine
from training.prompts import Prompt


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
