"""MLflow system metrics around a training stage: sampled into the stage's run when asked, off on CPU by default."""

import time

import torch

from hpc.tracking import Tracker, system_metrics, wants_system_metrics


def test_system_metrics_sample_into_the_run_when_on(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracker.start_parent("hpcft", tmp_path / "artifacts", "run", {}, {})
    run_id = tracker.start_child(parent, "sft")
    with system_metrics(tracker, run_id, "on", interval=0.2) as monitor:
        assert monitor is not None
        time.sleep(0.8)
    metrics = tracker.client.get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    with system_metrics(tracker, run_id, "off") as monitor:
        assert monitor is None


def test_auto_means_cuda_present():
    assert wants_system_metrics("auto") == torch.cuda.is_available()
    assert wants_system_metrics("on") and not wants_system_metrics("off")
