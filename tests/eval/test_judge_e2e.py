"""The tiny recipe, cut small, with two judge tasks (pairwise + rubric) against a real 127.0.0.1 server:
scores in MLflow and in the gate's reasons, verdicts in judge.jsonl."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY_RECIPE
from tests.eval.judge_server import JudgeServer, answer_rated, answers_shown

pytestmark = pytest.mark.slow

SMALL = [
    "data.sources.0.num_rows=300",
    "data.tasks=1",
    "stages.0.max_steps=10",
    "stages.0.eval_every=10",
    "eval.include_base=false",
    "gate.thresholds={judge/win_rate: 0.0, rubric/score: 1.0}",
]


def rule(messages, count):
    """Pairwise: the shorter answer wins (tie when equal); rubric: 5 for an empty answer, else 1 + 4/length."""
    if "Answer A:" in messages[-1]["content"]:
        a, b = answers_shown(messages)
        return "tie" if len(a) == len(b) else "A" if len(a) < len(b) else "B"
    return str(1 + min(4, 40 // max(1, len(answer_rated(messages)))))


def test_judge_tiny_recipe_end_to_end(tmp_path):
    from mlflow.tracking import MlflowClient

    workdir = tmp_path / "run"
    with JudgeServer(rule) as server:
        endpoint = f"endpoint: {{base_url: '{server.base_url}', model: rule}}, limit: 3, max_new_tokens: 8"
        tasks = f"eval.tasks=[{{judge: {{mode: pairwise, {endpoint}}}}}, {{judge: {{name: rubric, {endpoint}}}}}]"
        sets = [arg for item in [*SMALL, tasks] for arg in ("--set", item)]
        cmd = [sys.executable, "-m", "hpc.cli", "run", str(TINY_RECIPE), "--workdir", str(workdir), *sets]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert server.requests == 3 * 2 + 3 * 4  # 3 prompts: both orders pairwise, 4 default criteria
    gate = json.loads((workdir / "stages/gate/result.json").read_text())
    reasons = "\n".join(gate["reasons"])
    assert "judge/win_rate = " in reasons and "rubric/score = " in reasons
    records = [json.loads(line) for line in (workdir / "stages/eval/judge@candidate/judge.jsonl").open()]
    assert len(records) == 6 and {r["reference"] for r in records} == {"base"}  # no champion yet
    assert all(r["parsed"] in ("A", "B", "tie") and r["raw"] for r in records)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("tiny-sft", gate["version"])
    assert float(version.tags["score.judge/win_rate"]) == gate["scores"]["candidate"]["judge/win_rate"]
    assert "stderr.rubric/score" in version.tags  # from judge.jsonl, for a later gate's significance test
    meta = json.loads((workdir / "run.json").read_text())
    metrics = client.get_run(meta["child_runs"]["eval"]).data.metrics
    assert {"candidate/judge/win_rate", "candidate/rubric/score", "candidate/rubric/unparsed"} <= set(metrics)
