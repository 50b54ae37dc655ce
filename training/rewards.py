"""Rule-based rewards for PPO and GRPO, and how a stage names one: "package.module:function".

A reward function scores one sampled response:

    fn(prompt: list[dict], response: str, reference: str | None) -> float

`prompt` is the chat messages the response answers, `response` the decoded text up to (not including)
the end-of-turn token, `reference` the dataset's answer when the row has one (None otherwise).
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Callable

RewardFn = Callable[[list[dict], str, "str | None"], float]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def exact_match(prompt: list[dict], response: str, reference: str | None) -> float:
    """1.0 when the stripped response equals the stripped reference, else 0.0 (0.0 without a reference)."""
    if reference is None:
        return 0.0
    return float(response.strip() == reference.strip())


def first_number_match(prompt: list[dict], response: str, reference: str | None) -> float:
    """1.0 when the first number in the response equals the reference's first number, else 0.0.

    Lenient answer checking for arithmetic-style tasks: "The answer is 12." matches reference "12".
    """
    if reference is None:
        return 0.0
    got, want = _NUMBER.search(response), _NUMBER.search(reference)
    return float(got is not None and want is not None and float(got.group()) == float(want.group()))


MOVED_MODULES = {"recipes.rewards": "training.rewards"}


def load_reward_fn(spec: str) -> RewardFn:
    """Import the callable named "package.module:function"; a ValueError says what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r} is not of the form 'package.module:function'")
    # The training stages lived in the `recipes` package before it was renamed `training`; recipes written
    # then keep working.
    module_name = MOVED_MODULES.get(module_name, module_name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r} of {spec!r}: {err}") from err
    fn = module
    for part in attr.split("."):  # "module:Class.method" works too
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"{spec!r} is not callable")
    return fn


class RuleReward:
    """Scores a batch of responses with a rule function; a non-numeric or non-finite score is an error."""

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = load_reward_fn(spec)

    def __call__(self, prompts: list[list[dict]], responses: list[str], references: list[str | None]) -> list[float]:
        scores = []
        for prompt, response, reference in zip(prompts, responses, references, strict=True):
            value = self.fn(prompt, response, reference)
            try:
                score = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"reward function {self.spec} returned {value!r}, not a number") from None
            if not math.isfinite(score):
                raise ValueError(f"reward function {self.spec} returned {score} for response {response!r}")
            scores.append(score)
        return scores
