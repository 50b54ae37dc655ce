"""Prompts of the sampling stages (PPO, GRPO): rows parsed from chat or preference splits, rendered with
the chat template, too-long ones skipped and counted, and their step-indexed batches."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_tools.splits import has_split, iter_split
from training.data import EpochBatches, chat_tokenizer

ROLES = ("system", "user", "assistant")


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


def load_prompts(data_dir: Path, name: str, tokenizer, max_prompt_len: int) -> tuple[list[Prompt], PromptStats]:
    """The prompts of split `name` of data_dir (`<name>.jsonl` or the data stage's `<name>/*.jsonl` shards)."""
    if not has_split(data_dir, name):
        raise ValueError(f"{data_dir}: the prompt split {name}.jsonl does not exist; run the data stage first")
    prompts, stats = build_prompts(list(iter_split(data_dir, name)), tokenizer, max_prompt_len)
    if not prompts:
        raise ValueError(
            f"{data_dir} ({name}): no usable prompt out of {stats.rows} rows (rejected: {stats.rejected}); "
            "rows are {'messages': [...]} or {'prompt': ..., 'chosen': ...}"
        )
    return prompts, stats


def prompt_batches(prompts: list[Prompt], batch_size: int, seed: int) -> EpochBatches:
    """Global batches of prompt indices by step (prompts of similar length together)."""
    return EpochBatches([len(p.input_ids) for p in prompts], batch_size, seed, "training prompts")


@dataclass
class PromptData:
    """What a sampling stage reads: the tokenizer, the training prompts and their step-indexed batches,
    the first `eval_prompts` validation prompts, and the counts of both splits."""

    tokenizer: object
    pad_id: int
    train: list[Prompt]
    batches: EpochBatches
    validation: list[Prompt]
    stats: dict[str, PromptStats]


def load_prompt_data(cfg, model_dir: Path, data_dir: Path, seed: int) -> PromptData:
    """The prompts of data_dir's train/validation splits for a PPO/GRPO stage config `cfg`."""
    tokenizer, pad_id = chat_tokenizer(model_dir, f"{cfg.kind.upper()} renders prompts", data_dir)
    train, train_stats = load_prompts(data_dir, "train", tokenizer, cfg.max_prompt_len)
    validation, val_stats = load_prompts(data_dir, "validation", tokenizer, cfg.max_prompt_len)
    return PromptData(
        tokenizer,
        pad_id,
        train,
        prompt_batches(train, cfg.batch_size, seed),
        validation[: cfg.eval_prompts],
        {"train": train_stats, "validation": val_stats},
    )
