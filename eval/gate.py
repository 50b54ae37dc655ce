"""The promotion gate: a pure decision over '<task>/<metric>' scores. Metrics are higher-is-better unless
listed in gate.lower_is_better; '<metric>_stderr' keys are uncertainties, never compared themselves.

The no-regression check against the champion compares point estimates (gate.regression_test: point), or
(significance) fails only when the whole (1 - gate.significance) interval of the difference lies below the
allowed drop: a paired bootstrap over examples when both sides' per-example values are given (Evidence),
else a normal interval from the two standard errors, else the point comparison with a note.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from statistics import NormalDist

from eval.config import EvalConfig, GateConfig

_TOLERANCE = 1e-9
STDERR_SUFFIX = "_stderr"


@dataclass(frozen=True)
class Evidence:
    """What the significance test can use beyond the scores: per-example values {metric: {example id: value}}
    and standard errors {metric: stderr} of the candidate and the champion."""

    candidate_examples: dict[str, dict[str, float]] = field(default_factory=dict)
    champion_examples: dict[str, dict[str, float]] = field(default_factory=dict)
    candidate_stderr: dict[str, float] = field(default_factory=dict)
    champion_stderr: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # one line per check, pass or fail
    checks: list[dict] = field(default_factory=list)  # {"check", "metric", "value", "required", "passed"}


def primary_metric(cfg: GateConfig) -> str | None:
    """The metric the base comparison uses: cfg.primary_metric, else the first threshold key."""
    return cfg.primary_metric or next(iter(cfg.thresholds), None)


def decide(
    candidate: dict[str, float],
    base: dict[str, float] | None,
    champion: dict[str, float] | None,
    cfg: GateConfig,
    evidence: Evidence | None = None,
) -> Verdict:
    """Pass when every threshold is met, nothing regresses beyond cfg.max_regression against the champion
    (significantly, in significance mode), and the primary metric beats the base model by cfg.min_gain_over_base."""
    checks = _threshold_checks(candidate, cfg)
    if champion:
        checks += _regression_checks(candidate, champion, cfg, evidence or Evidence())
    if base is not None:
        checks.append(_base_check(candidate, base, cfg))
    return Verdict(passed=all(c["passed"] for c in checks), reasons=[_reason(c) for c in checks], checks=checks)


HUMAN_PREFIX = "human/"  # side-by-side scores (eval/human.py): thresholds only, never compared with the champion


def decide_with_human(
    candidate: dict[str, float],
    base: dict[str, float] | None,
    champion: dict[str, float] | None,
    cfg: GateConfig,
    evidence: Evidence | None = None,
    human_verdicts: int = 0,
) -> tuple[Verdict, str]:
    """(verdict, status): 'passed' | 'rejected', or 'pending_review' while gate.require_human waits for
    gate.min_human_verdicts and everything else passed (the verdict then does not pass)."""
    if not cfg.require_human or human_verdicts >= cfg.min_human_verdicts:
        verdict = decide(candidate, base, champion, cfg, evidence)
        return verdict, "passed" if verdict.passed else "rejected"
    rest = cfg.model_copy(update={"thresholds": {k: v for k, v in cfg.thresholds.items() if not _is_human(k)}})
    verdict = decide(candidate, base, champion, rest, evidence)
    waiting = {
        "check": "human_review",
        "metric": "human/n",
        "value": float(human_verdicts),
        "required": float(cfg.min_human_verdicts),
        "reference": None,
        "passed": False,
        "sign": 1,
    }
    reason = f"PENDING human_review: {human_verdicts} of {cfg.min_human_verdicts} side-by-side verdicts recorded"
    pending = Verdict(False, [*verdict.reasons, reason], [*verdict.checks, waiting])
    return pending, "pending_review" if verdict.passed else "rejected"


def _is_human(key: str) -> bool:
    return key.startswith(HUMAN_PREFIX)


def _sign(key: str, cfg: GateConfig) -> int:
    return -1 if key in cfg.lower_is_better else 1


def _threshold_checks(candidate: dict[str, float], cfg: GateConfig) -> list[dict]:
    return [
        _check("threshold", key, candidate.get(key), threshold, sign=_sign(key, cfg))
        for key, threshold in cfg.thresholds.items()
    ]


def _regression_checks(
    candidate: dict[str, float], champion: dict[str, float], cfg: GateConfig, evidence: Evidence
) -> list[dict]:
    checks = []
    for key in sorted(candidate.keys() & champion.keys()):
        if key.endswith(STDERR_SUFFIX) or _is_human(key):
            continue
        sign = _sign(key, cfg)
        check = _check(
            "no_regression", key, candidate[key], champion[key] - sign * cfg.max_regression, champion[key], sign
        )
        if cfg.regression_test == "significance":
            check = _significance(check, candidate, champion, cfg, evidence)
        checks.append(check)
    return checks


def _significance(check: dict, candidate: dict, champion: dict, cfg: GateConfig, evidence: Evidence) -> dict:
    """The check decided by the interval of the (sign-adjusted) difference candidate - champion."""
    key, sign = check["metric"], check["sign"]
    ours, theirs = evidence.candidate_examples.get(key, {}), evidence.champion_examples.get(key, {})
    shared = sorted(ours.keys() & theirs.keys())
    se_ours = evidence.candidate_stderr.get(key, candidate.get(key + STDERR_SUFFIX))
    se_theirs = evidence.champion_stderr.get(key, champion.get(key + STDERR_SUFFIX))
    if len(shared) >= 2:
        diffs = [sign * (ours[i] - theirs[i]) for i in shared]
        low, high = _bootstrap_interval(diffs, cfg.significance, cfg.bootstrap_samples)
        method = f"paired bootstrap over {len(shared)} examples"
    elif se_ours is not None and se_theirs is not None and not math.isnan(se_ours + se_theirs):
        delta = sign * (check["value"] - check["reference"])
        half = NormalDist().inv_cdf(1 - cfg.significance / 2) * math.hypot(se_ours, se_theirs)
        low, high = delta - half, delta + half
        method = "normal interval from the standard errors"
    else:
        return {**check, "note": "no per-example values or standard errors: point estimate"}
    passed = high >= -cfg.max_regression - _TOLERANCE
    return {**check, "passed": passed, "interval": (low, high), "method": method, "level": 1 - cfg.significance}


def _bootstrap_interval(diffs: list[float], alpha: float, samples: int) -> tuple[float, float]:
    """Percentile interval of the mean difference; seeded, so the same scores give the same verdict."""
    rng = random.Random(0)
    n = len(diffs)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(samples))
    return means[int(alpha / 2 * (samples - 1))], means[math.ceil((1 - alpha / 2) * (samples - 1))]


def _base_check(candidate: dict[str, float], base: dict[str, float], cfg: GateConfig) -> dict:
    key = primary_metric(cfg)
    if key is None:
        # A silent skip would let any model through; the recipe check (check_config) catches this first.
        raise ValueError("gate: comparing with the base model needs gate.primary_metric or a threshold")
    if key not in base:
        return {
            **_check("beats_base", key, candidate.get(key), None),
            "passed": False,
            "note": "base model has no score for it",
        }
    sign = _sign(key, cfg)
    required = base[key] + sign * cfg.min_gain_over_base
    return _check("beats_base", key, candidate.get(key), required, reference=base[key], sign=sign)


def _check(
    name: str,
    metric: str,
    value: float | None,
    required: float | None,
    reference: float | None = None,
    sign: int = 1,
) -> dict:
    # The tolerance keeps a score exactly at a bound (0.9 - 0.02 vs 0.88) from failing on rounding.
    passed = value is not None and required is not None and sign * value >= sign * required - _TOLERANCE
    return {
        "check": name,
        "metric": metric,
        "value": value,
        "required": required,
        "reference": reference,
        "passed": passed,
        "sign": sign,
    }


def _reason(check: dict) -> str:
    status = "PASS" if check["passed"] else "FAIL"
    metric, value, required = check["metric"], check["value"], check["required"]
    if value is None:
        return f"{status} {check['check']}: {metric} missing from the candidate's scores"
    if required is None:
        return f"{status} {check['check']}: {metric} = {value:.4f}, {check.get('note', 'no reference')}"
    if "interval" in check:
        return _interval_reason(status, check)
    lower = check.get("sign", 1) < 0
    meets = value <= required + _TOLERANCE if lower else value >= required - _TOLERANCE
    relation = ("<=" if meets else ">") if lower else (">=" if meets else "<")
    # signed, in the metric's direction: a negative min_gain_over_base shows as a negative gain
    gain = check.get("sign", 1) * (required - check["reference"]) if check["reference"] is not None else 0.0
    if check["check"] == "threshold":
        detail = f"threshold {required:.4f}" + (", lower is better" if lower else "")
    elif check["check"] == "no_regression":
        detail = f"champion {check['reference']:.4f} {'+' if lower else '-'} allowed drop {-gain:.4f}"
    else:
        detail = f"base {check['reference']:.4f} {'-' if lower else '+'} required gain {gain:.4f}"
    note = f"; {check['note']}" if check.get("note") else ""
    return f"{status} {check['check']}: {metric} = {value:.4f} {relation} {required:.4f} ({detail}{note})"


def _interval_reason(status: str, check: dict) -> str:
    low, high = check["interval"]
    allowed = abs(check["reference"] - check["required"])
    better = "lower" if check["sign"] < 0 else "higher"
    verdict = "not significant" if check["passed"] else "significant"
    return (
        f"{status} no_regression: {check['metric']} = {check['value']:.4f} vs champion {check['reference']:.4f}, "
        f"difference ({better} is better) {check['sign'] * (check['value'] - check['reference']):+.4f}, "
        f"{check['level']:.0%} interval [{low:+.4f}, {high:+.4f}] ({check['method']}); "
        f"a regression beyond {allowed:.4f} is {verdict}"
    )


def check_config(gate: GateConfig, eval_cfg: EvalConfig, task_labels: list[str]) -> list[str]:
    """Problems, as 'gate.<field>: message' lines, to report when a recipe is loaded rather than after eval.

    `task_labels` are the names metrics are keyed by (the `label` of each eval task, eval/tasks.py). A metric
    is checked against what its task reports when that is known offline (the built-in held-out tasks); an
    lm-eval or YAML task's metrics are known only once it ran, so any metric name is accepted under its label.
    """
    reported = {t.label: t.metrics for t in eval_cfg.tasks}
    problems = []
    keys = [(f"gate.thresholds.{k}", k) for k in gate.thresholds]
    keys += [(f"gate.lower_is_better.{i}", k) for i, k in enumerate(gate.lower_is_better)]
    if gate.primary_metric:
        keys.append(("gate.primary_metric", gate.primary_metric))
    for where, key in keys:
        task, sep, metric = key.rpartition("/")
        if not sep or not task or not metric:
            problems.append(f"{where}: expected '<task>/<metric>', e.g. 'heldout_exact/exact_match'")
        elif task not in task_labels and not (gate.require_human and sep and key.startswith(HUMAN_PREFIX)):
            problems.append(f"{where}: task {task!r} is not among eval.tasks ({', '.join(task_labels)})")
        elif reported.get(task) is not None and metric not in reported[task]:
            problems.append(
                f"{where}: task {task!r} reports no metric {metric!r}; it reports {', '.join(reported[task])}"
            )
    primary = primary_metric(gate)
    off_base = {t.label for t in eval_cfg.tasks if not t.on_base}
    if eval_cfg.include_base and primary and primary.rpartition("/")[0] in off_base:
        problems.append(
            f"gate.primary_metric: {primary!r} is not measured on the base model (a pairwise judge compares "
            "with a reference); name another metric, or set eval.include_base: false"
        )
    if eval_cfg.include_base and primary_metric(gate) is None:
        problems.append(
            "gate.primary_metric: eval.include_base compares with the base model on one "
            "metric; set gate.primary_metric or a threshold (or eval.include_base: false)"
        )
    return problems
