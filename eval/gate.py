"""The promotion gate: a pure decision over '<task>/<metric>' scores. Every metric is higher-is-better."""

from __future__ import annotations

from dataclasses import dataclass, field

from eval.config import EvalConfig, GateConfig

_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # one line per check, pass or fail
    checks: list[dict] = field(default_factory=list)  # {"check", "metric", "value", "required", "passed"}


def primary_metric(cfg: GateConfig) -> str | None:
    """The metric the base comparison uses: cfg.primary_metric, else the first threshold key."""
    return cfg.primary_metric or next(iter(cfg.thresholds), None)


def decide(
    candidate: dict[str, float], base: dict[str, float] | None, champion: dict[str, float] | None, cfg: GateConfig
) -> Verdict:
    """Pass when every threshold is met, nothing regresses beyond cfg.max_regression against the champion,
    and the primary metric beats the base model by cfg.min_gain_over_base."""
    checks = _threshold_checks(candidate, cfg)
    if champion:
        checks += _regression_checks(candidate, champion, cfg.max_regression)
    if base is not None:
        checks.append(_base_check(candidate, base, cfg))
    return Verdict(passed=all(c["passed"] for c in checks), reasons=[_reason(c) for c in checks], checks=checks)


def _threshold_checks(candidate: dict[str, float], cfg: GateConfig) -> list[dict]:
    return [_check("threshold", key, candidate.get(key), threshold) for key, threshold in cfg.thresholds.items()]


def _regression_checks(candidate: dict[str, float], champion: dict[str, float], max_regression: float) -> list[dict]:
    return [
        _check("no_regression", key, candidate[key], champion[key] - max_regression, reference=champion[key])
        for key in sorted(candidate.keys() & champion.keys())
    ]


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
    return _check("beats_base", key, candidate.get(key), base[key] + cfg.min_gain_over_base, reference=base[key])


def _check(name: str, metric: str, value: float | None, required: float | None, reference: float | None = None) -> dict:
    # The tolerance keeps a score exactly at a bound (0.9 - 0.02 vs 0.88) from failing on rounding.
    passed = value is not None and required is not None and value >= required - _TOLERANCE
    return {
        "check": name,
        "metric": metric,
        "value": value,
        "required": required,
        "reference": reference,
        "passed": passed,
    }


def _reason(check: dict) -> str:
    status = "PASS" if check["passed"] else "FAIL"
    metric, value, required = check["metric"], check["value"], check["required"]
    if value is None:
        return f"{status} {check['check']}: {metric} missing from the candidate's scores"
    if required is None:
        return f"{status} {check['check']}: {metric} = {value:.4f}, {check.get('note', 'no reference')}"
    relation = ">=" if check["passed"] else "<"
    if check["check"] == "threshold":
        detail = f"threshold {required:.4f}"
    elif check["check"] == "no_regression":
        detail = f"champion {check['reference']:.4f} - allowed drop {check['reference'] - required:.4f}"
    else:
        detail = f"base {check['reference']:.4f} + required gain {required - check['reference']:.4f}"
    return f"{status} {check['check']}: {metric} = {value:.4f} {relation} {required:.4f} ({detail})"


def check_config(gate: GateConfig, eval_cfg: EvalConfig, task_labels: list[str]) -> list[str]:
    """Problems, as 'gate.<field>: message' lines, to report when a recipe is loaded rather than after eval.

    `task_labels` are the names metrics are keyed by (the `label` of each eval task, eval/tasks.py). A metric
    is checked against what its task reports when that is known offline (the built-in held-out tasks); an
    lm-eval or YAML task's metrics are known only once it ran, so any metric name is accepted under its label.
    """
    reported = {t.label: t.metrics for t in eval_cfg.tasks}
    problems = []
    keys = [(f"gate.thresholds.{k}", k) for k in gate.thresholds]
    if gate.primary_metric:
        keys.append(("gate.primary_metric", gate.primary_metric))
    for where, key in keys:
        task, sep, metric = key.rpartition("/")
        if not sep or not task or not metric:
            problems.append(f"{where}: expected '<task>/<metric>', e.g. 'heldout_exact/exact_match'")
        elif task not in task_labels:
            problems.append(f"{where}: task {task!r} is not among eval.tasks ({', '.join(task_labels)})")
        elif reported.get(task) is not None and metric not in reported[task]:
            problems.append(
                f"{where}: task {task!r} reports no metric {metric!r}; it reports {', '.join(reported[task])}"
            )
    if eval_cfg.include_base and primary_metric(gate) is None:
        problems.append(
            "gate.primary_metric: eval.include_base compares with the base model on one "
            "metric; set gate.primary_metric or a threshold (or eval.include_base: false)"
        )
    return problems
