"""The planner's per-rank memory against the CPU allocator's measured peak of a real training step
(bench/planner_vs_measured.py, one process; the bench also runs dp2 ZeRO-3 and tp2 x dp2)."""

from bench.planner_vs_measured import measure, planned, shape


def test_planner_within_15_percent_of_the_measured_peak():
    config = shape(vocab=8192, hidden=128, layers=2)
    allocator, rss = measure(config, {}, rows=4, seq=128)
    plan = planned(config, {}, rows=4, seq=128)
    assert abs(plan.total / allocator - 1) < 0.15, (plan.gib(), allocator)
    assert plan.activations > plan.params  # the step's activations, not only the state, are measured
    assert rss > allocator / 2  # the resident set saw the same step
