"""What the stage jobs hand MLflow, as plain data: result facts vs metrics, the data funnel, the dataset input,
and the layout / Slurm lineage tags (the e2e test reads them back from a real run)."""

import json

import pytest

from eval import lineage
from hpc import jobs


class Recorder:
    """A Tracker's two logging calls, recorded."""

    def __init__(self):
        self.params, self.metrics = {}, {}

    def log_params(self, run_id, params):
        self.params |= params

    def log_metrics(self, run_id, metrics, step=None):
        self.metrics |= metrics


def test_results_split_into_metrics_and_facts():
    rec = Recorder()
    result = {"final_loss": 0.5, "seed": 1234, "world_size": 2, "total_params": 10, "val_before": {"val_loss": 2.0}}
    result |= {"mode": "full", "packing": False, "data": {"train": {"rows": 5}}, "tokens_per_s": 100}
    jobs.log_result(rec, "run", result, "final.")
    assert rec.metrics == {"final.final_loss": 0.5, "final.val_before/val_loss": 2.0, "final.tokens_per_s": 100}
    assert rec.params["result"] == {
        "seed": 1234,
        "world_size": 2,
        "total_params": 10,
        "mode": "full",
        "packing": False,
        "data": {"train": {"rows": 5}},
    }


def test_funnel_metrics_per_step_in_order():
    steps = {
        "pii": {"in": 10, "kept": 10, "rejected": 0, "reasons": {}, "replaced": {"email": 3}},
        "exact_dedup": {"in": 10, "kept": 7, "rejected": 3, "reasons": {"exact_duplicate": 3, "odd:name": 0}},
    }
    (pii, kept_pii), (dedup, kept_dedup) = jobs.funnel_metrics(steps, "preference/")
    assert pii == {
        "preference/funnel/pii/in": 10,
        "preference/funnel/pii/kept": 10,
        "preference/funnel/pii/rejected": 0,
    }
    assert dedup["preference/funnel/exact_dedup/reasons/exact_duplicate"] == 3
    assert "preference/funnel/exact_dedup/reasons/odd_name" in dedup  # a key MLflow takes
    assert (kept_pii, kept_dedup) == (10, 7)


def test_score_metrics_are_the_filters_percentiles_not_their_histograms():
    import numpy as np

    from data_tools.quality import distribution

    perplexity = {"in": 5, "kept": 4, "scores": distribution(np.array([2.0, 4.0, 8.0, 16.0, 900.0]), True)}
    steps = {"pii": {"in": 5, "kept": 5}, "perplexity": perplexity | {"bounds": [2.5, 300.0]}}
    steps["language"] = {"in": 5, "scores": distribution(np.array([0.9, 0.99]), False), "languages": {"en": 2}}
    metrics = jobs.score_metrics(steps, "preference/")
    assert metrics["preference/scores/perplexity/p50"] == 8.0 and metrics["preference/scores/perplexity/count"] == 5
    assert metrics["preference/scores/perplexity/upper_bound"] == 300.0
    assert metrics["preference/scores/language/mean"] == pytest.approx(0.945)
    assert {k.rsplit("/", 1)[1] for k in metrics if "/perplexity/" in k} == {
        "count",
        "mean",
        "p5",
        "p25",
        "p50",
        "p75",
        "p95",
        "lower_bound",
        "upper_bound",
    }


def test_dataset_input_digest_fits_mlflow_and_profile_keeps_the_hash(tmp_path):
    from hpc.recipe import load_recipe
    from tests.conftest import TINY_RECIPE

    manifest = {"manifest_hash": "f" * 64, "splits": {"train": 8, "validation": 1, "test": 1}}
    manifest["preference"] = {"splits": {"train": 4, "validation": 0, "test": 0}}
    d = jobs.data_input(load_recipe(TINY_RECIPE), tmp_path, manifest)
    assert d["name"] == "tiny-sft-data" and d["digest"] == "f" * 36 and d["source"] == str(tmp_path)
    assert d["profile"]["manifest_hash"] == "f" * 64 and d["profile"]["num_rows"] == 14
    assert d["profile"]["preference_splits"]["train"] == 4


def test_layout_and_slurm_job_tags():
    parallel = {"dp_replicate": 1, "dp_shard": 2, "tp": 2, "pp": 1, "zero": 3, "microbatches": 4, "compile": False}
    tags = lineage.layout_tags(parallel)
    assert tags[lineage.LAYOUT] == "dp_replicate=1,dp_shard=2,tp=2,pp=1,zero=3,microbatches=4"
    assert json.loads(tags[lineage.LAYOUT_JSON]) == parallel
    jobs_meta = {"data": {"job_id": "7", "job_ids": ["7_0", "7_1"]}, "sft": {"job_id": "8", "job_ids": ["8"]}}
    assert json.loads(lineage.slurm_job_tags(jobs_meta)[lineage.SLURM_JOB_IDS]) == {
        "data": ["7_0", "7_1"],
        "sft": ["8"],
    }
    assert lineage.slurm_job_tags(None) == {}
