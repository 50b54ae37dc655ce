"""Human side-by-side (eval/human.py): blinded pairs, a scripted rater, verdicts on the version, the gate."""

import csv
import json
import re
import shutil

import pytest

from eval import human, lineage, registry
from eval.config import GateConfig
from eval.gate import decide_with_human
from tests.eval.test_heldout import _rows, _write_rows


def test_human_tally_wilson_and_unblinding(tmp_path):
    examples = [{"id": str(i), "messages": [{"role": "user", "content": f"q{i} <b>&"}]} for i in range(6)]
    key = human.write_pairs(tmp_path, examples, [f"ours {i}" for i in range(6)], ["theirs"] * 6, {"name": "m"}, 3)
    pairs = list(csv.DictReader(open(tmp_path / "pairs.csv")))
    assert len(pairs) == 6 and set(key["candidate_side"].values()) == {"A", "B"}  # sides shuffled
    for p in pairs:  # the pair file has no model ids; the key says where the candidate is
        ours = p["answer_a"] if key["candidate_side"][p["pair_id"]] == "A" else p["answer_b"]
        assert ours.startswith("ours") and "m" not in p["pair_id"]
    form = (tmp_path / "form.html").read_text()
    assert "new Blob(" in form and form.count('type="radio"') == 18 and "q0 &lt;b&gt;&amp;" in form
    assert not re.search(r"(src|href)=\"?https?:", form) and "<link" not in form  # self-contained
    side = key["candidate_side"]
    rows = [
        (pid, side[pid] if i < 3 else "tie" if i < 5 else "AB".replace(side[pid], "")) for i, pid in enumerate(side)
    ]
    (tmp_path / "v.csv").write_text("pair_id,verdict\n" + "".join(f"{p},{v}\n" for p, v in rows))
    verdicts, problems = human.read_verdicts(tmp_path / "v.csv", key)
    assert problems == [] and [v["outcome"] for v in verdicts] == ["win"] * 3 + ["tie"] * 2 + ["loss"]
    scores = human.tally({}, verdicts)
    assert scores["human/win_rate"] == pytest.approx(4 / 6) and scores["human/n"] == 6
    assert scores["human/win_rate_low"] < 4 / 6 < scores["human/win_rate_high"]
    (tmp_path / "bad.csv").write_text("pair_id,verdict\nnope,A\n" + f"{rows[0][0]},maybe\n")
    _, problems = human.read_verdicts(tmp_path / "bad.csv", key)
    assert "not in set" in problems[0] and "not one of A, B, tie" in problems[1]


def test_human_gate_waits_for_verdicts():
    cfg = GateConfig(thresholds={"human/win_rate": 0.6, "j/score": 3}, require_human=True, min_human_verdicts=4)
    verdict, status = decide_with_human({"j/score": 4}, None, None, cfg, human_verdicts=2)
    assert status == "pending_review" and not verdict.passed and "2 of 4" in verdict.reasons[-1]
    assert decide_with_human({"j/score": 2}, None, None, cfg, human_verdicts=0)[1] == "rejected"
    verdict, status = decide_with_human({"j/score": 4, "human/win_rate": 0.75}, None, None, cfg, human_verdicts=4)
    assert status == "passed" and any("human/win_rate = 0.7500" in r for r in verdict.reasons)
    assert decide_with_human({"j/score": 4, "human/win_rate": 0.5}, None, None, cfg, human_verdicts=4)[1] == "rejected"


@pytest.mark.slow
def test_human_export_fill_import_then_gate(tmp_path, hpcft_cmd):
    """blind-pairs -> a scripted rater fills the CSV the form downloads -> import-verdicts -> the gate decides."""
    from mlflow import MlflowClient

    from hpc.cli import main
    from parallel.tiny import build_tiny_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("human", artifact_location=str(tmp_path / "artifacts"))
    cfg = GateConfig(thresholds={"human/win_rate": 0.6}, require_human=True, min_human_verdicts=4)
    for version, seed in (("1", 0), ("2", 1)):
        run_dir = tmp_path / f"run{version}"
        build_tiny_model("micro-llama", run_dir / "stages/export/model", seed)
        _write_rows(run_dir / "stages/data", _rows(8))
        run_id = client.create_run(experiment).info.run_id
        verdict, status = decide_with_human({}, None, None, cfg) if version == "2" else (None, "passed")
        verdict = verdict or decide_with_human({}, None, None, GateConfig())[0]
        registry.register_candidate(
            client, "sbs", run_dir / "stages/export/model", run_id, {}, verdict, {lineage.RUN_DIR: str(run_dir)}
        )
        if version == "2":
            registry.await_human_review(client, "sbs", "2", cfg, status)
    registry.promote(client, "sbs", "1")
    assert client.get_model_version("sbs", "2").tags["gate"] == "pending_review"

    out = tmp_path / "pairs"
    argv = ["registry", "blind-pairs", "sbs", "2", "--uri", uri, "--out", str(out), "--n", "6", "--max-new-tokens", "4"]
    assert main(argv) == 0
    key = json.loads((out / "key.json").read_text())
    assert key["reference_version"] == "1" and len(key["candidate_side"]) == 6
    # the rater: prefers the candidate on 3 pairs, ties 1 (the first file); then 2 more wins (a second file)
    side = key["candidate_side"]
    ids = list(side)
    (tmp_path / "v1.csv").write_text(
        "pair_id,verdict,rater\n" + "".join(f"{i},{side[i]},ann\n" for i in ids[:2]) + f"{ids[2]},tie,ann\n"
    )
    (tmp_path / "v2.csv").write_text("pair_id,verdict,rater\n" + "".join(f"{i},{side[i]},bo\n" for i in ids[3:5]))
    imports = ["registry", "import-verdicts", "--name", "sbs", "--version", "2", "--uri", uri]
    assert main([imports[0], imports[1], str(tmp_path / "v1.csv"), *imports[2:]]) == 0
    tags = client.get_model_version("sbs", "2").tags
    assert tags["gate"] == "pending_review" and tags["human/n"] == "3.0"  # 3 of 4 verdicts
    assert main([imports[0], imports[1], str(tmp_path / "v2.csv"), *imports[2:]]) == 0
    tags = client.get_model_version("sbs", "2").tags
    assert float(tags["score.human/win_rate"]) == pytest.approx(4.5 / 5) and tags["human.raters"] == "ann,bo"
    assert tags["gate"] == "passed" and "human/win_rate = 0.9000 >= 0.6000" in tags["gate.reasons"]
    assert str(client.get_model_version_by_alias("sbs", "staging").version) == "2"
    run = client.get_run(client.get_model_version("sbs", "2").run_id)
    assert run.data.metrics["human/win_rate"] == pytest.approx(0.9)
    assert main([imports[0], imports[1], str(tmp_path / "v2.csv"), *imports[2:]]) == 2  # the same file twice

    # the pairwise judge's reference: the champion's exported model, else its logged 'model' artifact
    version, local = registry.champion_model_dir(client, "sbs", tmp_path / "download")
    assert (version, local) == ("1", tmp_path / "run1/stages/export/model")
    shutil.rmtree(tmp_path / "run1/stages/export")
    version, downloaded = registry.champion_model_dir(client, "sbs", tmp_path / "download")
    assert downloaded.is_relative_to(tmp_path / "download") and (downloaded / "config.json").is_file()
