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


# ---------------------------------------------------------------- a gate that knows uncertainty


def _examples(rate: float, n: int = 40, shift: int = 0) -> dict[str, float]:
    """Per-example 0/1 values with mean `rate` (the ones first, rotated by `shift`)."""
    ones = round(rate * n)
    values = [1.0 if i < ones else 0.0 for i in range(n)]
    return {str(i): values[(i + shift) % n] for i in range(n)}


def test_small_regression_passes_significance_fails_point():
    """0.90 -> 0.85 over 40 examples: beyond the allowed drop of 0.02, but well inside its interval."""
    from eval.gate import Evidence

    evidence = Evidence({EXACT: _examples(0.85, shift=3)}, {EXACT: _examples(0.90)})
    point = decide({EXACT: 0.85}, None, {EXACT: 0.90}, GateConfig(max_regression=0.02), evidence)
    assert not point.passed
    sig_cfg = GateConfig(max_regression=0.02, regression_test="significance", significance=0.05)
    sig = decide({EXACT: 0.85}, None, {EXACT: 0.90}, sig_cfg, evidence)
    assert sig.passed
    check = _checks(sig, "no_regression")[0]
    low, high = check["interval"]
    assert low < -0.02 < high and "paired bootstrap over 40 examples" in sig.reasons[0]
    assert "0.8500 vs champion 0.9000" in sig.reasons[0] and "95% interval [" in sig.reasons[0]
    assert "0.8500 < 0.8800" in point.reasons[0]


def test_significant_regression_still_fails_with_interval():
    from eval.gate import Evidence

    cfg = GateConfig(max_regression=0.02, regression_test="significance")
    evidence = Evidence({EXACT: _examples(0.30)}, {EXACT: _examples(0.90)})
    verdict = decide({EXACT: 0.30}, None, {EXACT: 0.90}, cfg, evidence)
    assert not verdict.passed and "is significant" in verdict.reasons[0]
    assert _checks(verdict, "no_regression")[0]["interval"][1] < -0.02


def test_significance_from_stderrs_and_point_fallback():
    cfg = GateConfig(max_regression=0.0, regression_test="significance")
    # judge-style scores carry their own '<metric>_stderr', which is never compared itself
    cand = {"judge/score": 3.8, "judge/score_stderr": 0.2}
    champ = {"judge/score": 4.0, "judge/score_stderr": 0.2}
    verdict = decide(cand, None, champ, cfg)
    assert verdict.passed and "normal interval from the standard errors" in verdict.reasons[0]
    assert [c["metric"] for c in verdict.checks] == ["judge/score"]
    tight = decide({**cand, "judge/score_stderr": 0.01}, None, {**champ, "judge/score_stderr": 0.01}, cfg)
    assert not tight.passed
    bare = decide({"judge/score": 3.8}, None, {"judge/score": 4.0}, cfg)
    assert not bare.passed and "point estimate" in bare.reasons[0]


def test_lower_is_better_metrics():
    cfg = GateConfig(thresholds={"judge/unparsed_rate": 0.1}, lower_is_better=["judge/unparsed_rate"])
    assert decide({"judge/unparsed_rate": 0.05}, None, None, cfg).passed
    bad = decide({"judge/unparsed_rate": 0.2}, None, None, cfg)
    assert not bad.passed and "0.2000 > 0.1000" in bad.reasons[0] and "lower is better" in bad.reasons[0]
    cfg = GateConfig(lower_is_better=["ppl/word_perplexity"], max_regression=0.5)
    assert decide({"ppl/word_perplexity": 10.4}, None, {"ppl/word_perplexity": 10.0}, cfg).passed
    worse = decide({"ppl/word_perplexity": 10.6}, None, {"ppl/word_perplexity": 10.0}, cfg)
    assert not worse.passed and "champion 10.0000 + allowed drop 0.5000" in worse.reasons[0]


def test_per_example_values_from_samples_and_judge_files(tmp_path):
    import json

    from eval.evidence import run_values, stderrs

    exact = tmp_path / "stages/eval/heldout_exact@candidate"
    exact.mkdir(parents=True)
    (exact / "result.json").write_text(json.dumps({"task": "heldout_exact", "model": "candidate", "scores": {}}))
    rows = [  # lm-eval's samples.jsonl rows: the metric names in 'metrics', their values beside them
        {"doc_id": i, "doc": {"id": f"r{i}"}, "filter": "none", "metrics": ["exact_match"], "exact_match": i % 2}
        for i in range(4)
    ]
    (exact / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    judged = tmp_path / "stages/eval/judge@candidate"
    judged.mkdir()
    (judged / "result.json").write_text(json.dumps({"task": "judge", "model": "candidate", "scores": {}}))
    verdicts = [{"id": "r0", "order": o, "score": s} for o, s in (("candidate_first", 1.0), ("reference_first", 0.5))]
    (judged / "judge.jsonl").write_text("".join(json.dumps(v) + "\n" for v in verdicts))
    values = run_values(tmp_path)
    assert values == {
        "heldout_exact/exact_match": {"r0": 0.0, "r1": 1.0, "r2": 0.0, "r3": 1.0},
        "judge/win_rate": {"r0": 0.75},
    }
    assert stderrs(values) == {"heldout_exact/exact_match": pytest.approx(0.5 / 2 * (4 / 3) ** 0.5)}
