"""The training loop of every stage (SFT, DPO, reward model, PPO, GRPO): held-out metrics at
step 0, one `step_fn(step)` per step, windowed training logs, held-out metrics every eval_every, and a
resumable checkpoint of the learners every checkpoint_every (training.resume), from which a restarted
stage continues."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from training.learner import Learner
from training.resume import Resumer

Progress = Callable[[dict], None]
TOKENS, TOKENS_PER_S = "tokens", "tokens_per_s"  # a step's trained tokens, and their rate in the logs


@dataclass
class Checkpoints:
    """What a stage's checkpoint holds: its learners' training states by name, plus the loop state
    `extra()` returns (JSON-able, e.g. an adaptive KL coefficient), which `restore(extra)` puts back."""

    resumer: Resumer
    learners: dict[str, Learner]
    extra: Callable[[], dict] = dict
    restore: Callable[[dict], None] = field(default=lambda extra: None)

    def load(self, report: Progress | None = None) -> dict | None:
        states = {name: learner.state() for name, learner in self.learners.items()}
        resumed = self.resumer.load(states, report)
        if resumed:
            for name, learner in self.learners.items():
                learner.updates = states[name].step
            self.restore(resumed)
        return resumed

    def save(self, step: int, val_before: dict) -> str:
        states = {name: learner.state() for name, learner in self.learners.items()}
        return str(self.resumer.save(states, step, self.extra() | {"val_before": val_before}))


def train_one(
    cfg,
    learner: Learner,
    step_fn,
    evaluate_fn,
    progress: Progress,
    resumer: Resumer | None,
    *,
    rate,
    flops_per_unit: float | None = None,
):
    """train_loop for a stage that trains one model, checkpointed (when `resumer`) under the name 'model'.
    The logs carry the learner's efficiency: peak memory, and MFU from flops_per_unit (model FLOPs per
    trained token) where the device's peak is known."""
    checkpoints = Checkpoints(resumer, {"model": learner}) if resumer is not None else None

    def efficiency(tokens_per_s: float | None) -> dict[str, float]:
        return learner.efficiency(tokens_per_s, flops_per_unit)

    return train_loop(cfg, step_fn, evaluate_fn, progress, rate=rate, checkpoints=checkpoints, efficiency=efficiency)


def train_loop(
    cfg,
    step_fn: Callable[[int], dict[str, float]],
    evaluate_fn: Callable[[], dict[str, float]],
    progress: Progress,
    *,
    rate: tuple[str, int | str],
    last_only: frozenset[str] = frozenset({"lr", "grad_norm"}),
    checkpoints: Checkpoints | None = None,
    efficiency: Callable[[float], dict[str, float]] | None = None,
) -> dict:
    """Run steps 1..cfg.max_steps (after the latest checkpoint when there is one).

    Logged training metrics are means over the steps since the last log, except `last_only` ones (the
    last value). rate: (name, units per step) for the throughput, e.g. ("pairs_per_s", batch_size), or
    (name, key) when each step's metrics count its units under `key` (e.g. ("tokens_per_s", "tokens"):
    that key is summed, not logged, and the result holds its total and the overall rate).
    A step's trained tokens, under "tokens" (the rate's own key for SFT; both sides of a pair, or a policy
    update's tokens, elsewhere), are summed the same way into tokens_per_s.
    efficiency(tokens_per_s or None) -> more figures for each training log (MFU, peak memory); collective on
    every rank.
    """
    started = time.perf_counter()
    if checkpoints is not None:
        checkpoints.resumer.keep = cfg.keep_checkpoints  # training.skeleton builds it from checkpoint_every alone
    resumed = checkpoints.load(progress) if checkpoints is not None else None
    if resumed:
        val_before = resumed["val_before"]
        progress({"resumed_from_step": resumed["step"], "checkpoint": resumed["path"]})
    else:
        val_before = evaluate_fn()
        progress({"step": 0} | val_before)
    val, window, window_seconds, train_metrics = val_before, [], 0.0, {}
    first = 1 + (resumed["step"] if resumed else 0)
    rate_key, units = rate
    total_units, window_units, step_seconds = 0, 0, 0.0
    total_tokens, window_tokens = None, None  # None: the steps count no tokens
    for step in range(first, cfg.max_steps + 1):
        t0 = time.perf_counter()
        metrics = step_fn(step)
        seconds = time.perf_counter() - t0
        window_seconds += seconds
        step_seconds += seconds
        step_units = metrics.pop(units) if isinstance(units, str) else units
        total_units += step_units
        window_units += step_units
        step_tokens = step_units if units == TOKENS else metrics.pop(TOKENS, None)
        if step_tokens is not None:
            total_tokens, window_tokens = (total_tokens or 0) + step_tokens, (window_tokens or 0) + step_tokens
        window.append(metrics)
        last = step == cfg.max_steps
        if step % cfg.log_every == 0 or last:
            train_metrics = {
                k: window[-1][k] if k in last_only else sum(m[k] for m in window) / len(window) for k in window[0]
            }
            tokens_per_s = window_tokens / window_seconds if window_tokens is not None else None
            progress(
                {
                    "step": step,
                    "max_steps": cfg.max_steps,
                    **train_metrics,
                    rate_key: window_units / window_seconds,
                    **({TOKENS_PER_S: tokens_per_s} if tokens_per_s is not None else {}),
                    **(efficiency(tokens_per_s) if efficiency is not None else {}),
                    "elapsed_s": time.perf_counter() - started,
                }
            )
            window, window_seconds, window_units, window_tokens = [], 0.0, 0, None
        if step % cfg.eval_every == 0 or last:
            val = evaluate_fn()
            progress({"step": step} | val)
        if checkpoints is not None and checkpoints.resumer.due(step, cfg.max_steps):
            t0 = time.perf_counter()
            path = checkpoints.save(step, val_before)
            progress({"step": step, "checkpoint": path, "checkpoint_s": time.perf_counter() - t0})
    out = {
        "steps": cfg.max_steps,
        "train_seconds": time.perf_counter() - started,
        **{f"final_{k}": v for k, v in train_metrics.items()},
        **val,
        "val_before": val_before,
        "resumed_from_step": resumed["step"] if resumed else None,
    }
    if isinstance(units, str):
        out |= {units: total_units, rate_key: total_units / max(step_seconds, 1e-9)}
    if total_tokens is not None:
        out |= {TOKENS: total_tokens, TOKENS_PER_S: total_tokens / max(step_seconds, 1e-9)}
    return out
