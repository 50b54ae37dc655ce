import pytest

from eval.config import EvalConfig, GateConfig
from eval.gate import check_config, decide, primary_metric

EXACT = "heldout_exact/exact_match"
MC = "heldout_mc/acc"


def _checks(verdict, name):
    return [c for c in verdict.checks if c["check"] == name]


def test_thresholds_pass_and_fail_with_numbers():
    cfg = GateConfig(thresholds={EXACT: 0.5, MC: 0.6})
    ok = decide({EXACT: 0.7, MC: 0.6}, None, None, cfg)
    assert ok.passed and len(ok.reasons) == 2 and all(r.startswith("PASS") for r in ok.reasons)
    bad = decide({EXACT: 0.4, MC: 0.9}, None, None, cfg)
    assert not bad.passed
    failed = [c for c in bad.checks if not c["passed"]]
    assert [c["metric"] for c in failed] == [EXACT]
    assert "FAIL threshold: heldout_exact/exact_match = 0.4000 < 0.5000" in bad.reasons[0]


def test_missing_metric_fails():
    verdict = decide({MC: 0.9}, None, None, GateConfig(thresholds={EXACT: 0.1}))
    assert not verdict.passed
    assert verdict.checks[0]["value"] is None and "missing" in verdict.reasons[0]


def test_no_checks_passes():
    verdict = decide({EXACT: 0.0}, None, None, GateConfig())
    assert verdict.passed and verdict.checks == []


@pytest.mark.parametrize(
    "candidate, passed", [(0.89, True), (0.88, True), (0.87, False), (0.8799, False), (0.95, True)]
)
def test_regression_vs_champion_margin(candidate, passed):
    cfg = GateConfig(max_regression=0.02)
    verdict = decide({EXACT: candidate, MC: 0.5}, None, {EXACT: 0.90, MC: 0.5}, cfg)
    assert verdict.passed is passed
    regressions = _checks(verdict, "no_regression")
    assert {c["metric"] for c in regressions} == {EXACT, MC}
    assert "champion 0.9000" in next(r for r in verdict.reasons if EXACT in r)


def test_regression_only_on_shared_metrics():
    verdict = decide({EXACT: 0.5}, None, {MC: 0.99, "other/acc": 0.9}, GateConfig())
    assert verdict.passed and _checks(verdict, "no_regression") == []


def test_beats_base_on_primary_metric():
    cfg = GateConfig(thresholds={EXACT: 0.0, MC: 0.0}, min_gain_over_base=0.05)
    assert primary_metric(cfg) == EXACT
    assert decide({EXACT: 0.30, MC: 0.1}, {EXACT: 0.25, MC: 0.9}, None, cfg).passed
    verdict = decide({EXACT: 0.29, MC: 0.1}, {EXACT: 0.25, MC: 0.0}, None, cfg)
    assert not verdict.passed
    (base_check,) = _checks(verdict, "beats_base")
    assert base_check["metric"] == EXACT and base_check["required"] == pytest.approx(0.30)
    assert "base 0.2500" in verdict.reasons[-1]


def test_explicit_primary_metric_and_missing_base_score():
    cfg = GateConfig(primary_metric=MC)
    assert decide({MC: 0.6}, {MC: 0.5}, None, cfg).passed
    assert not decide({MC: 0.4}, {MC: 0.5}, None, cfg).passed
    no_base_score = decide({MC: 0.6}, {EXACT: 0.1}, None, cfg)
    assert not no_base_score.passed and "base model has no score" in no_base_score.reasons[0]


def test_base_without_primary_metric_is_a_user_error():
    with pytest.raises(ValueError, match="primary_metric"):
        decide({EXACT: 1.0}, {EXACT: 0.0}, None, GateConfig())


def test_all_checks_combined():
    cfg = GateConfig(thresholds={EXACT: 0.5}, max_regression=0.01)
    verdict = decide({EXACT: 0.6}, {EXACT: 0.2}, {EXACT: 0.65}, cfg)
    assert [c["check"] for c in verdict.checks] == ["threshold", "no_regression", "beats_base"]
    assert [c["passed"] for c in verdict.checks] == [True, False, True] and not verdict.passed


def test_check_config():
    labels = ["heldout_exact", "heldout_mc"]
    assert check_config(GateConfig(thresholds={EXACT: 0.1}), EvalConfig(), labels) == []
    problems = check_config(GateConfig(thresholds={"nope/acc": 0.1, "flat": 0.2}), EvalConfig(), labels)
    assert problems[0].startswith("gate.thresholds.nope/acc: task 'nope'")
    assert problems[1].startswith("gate.thresholds.flat: expected '<task>/<metric>'")
    assert check_config(GateConfig(), EvalConfig(include_base=True), labels)[0].startswith("gate.primary_metric:")
    assert check_config(GateConfig(), EvalConfig(include_base=False), labels) == []
