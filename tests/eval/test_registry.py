"""Registry actions against a real MLflow sqlite store (creating its tables takes ~10 s, hence slow)."""

import itertools

import pytest

from eval import lineage, registry
from eval.config import GateConfig
from eval.gate import Verdict, decide

pytestmark = pytest.mark.slow
EXACT = "heldout_exact/exact_match"
_names = itertools.count()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("eval-tests", artifact_location=str(root / "artifacts"))
    return client, experiment


@pytest.fixture
def client(store):
    return store[0]


@pytest.fixture
def run_id(store):
    client, experiment = store
    return client.create_run(experiment).info.run_id


@pytest.fixture
def name():
    return f"model-{next(_names)}"  # one registered model per test, in the shared store


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    return tmp_path


def _lineage(model_dir):
    return {
        lineage.RECIPE_HASH: "abc123",
        lineage.GIT_COMMIT: "unknown",
        lineage.DATA_MANIFEST_HASH: "d" * 64,
        lineage.BASE_MODEL_HASH: lineage.hash_dir(model_dir),
    }


def _register(client, name, model_dir, run_id, score, passed):
    verdict = Verdict(passed=passed, reasons=[f"{'PASS' if passed else 'FAIL'} threshold: x"], checks=[])
    scores = {EXACT: score, "heldout_mc/acc": 0.25}
    return registry.register_candidate(client, name, model_dir, run_id, scores, verdict, _lineage(model_dir))


def test_register_passed_version(client, name, model_dir, run_id):
    cfg = GateConfig(thresholds={EXACT: 0.5})
    verdict = decide({EXACT: 0.9375}, None, None, cfg)
    version = registry.register_candidate(
        client, name, model_dir, run_id, {EXACT: 0.9375}, verdict, _lineage(model_dir)
    )
    assert version == "1"
    mv = client.get_model_version(name, version)
    assert mv.source == f"runs:/{run_id}/model" and mv.run_id == run_id
    assert mv.tags["gate"] == "passed" and mv.tags["gate.reasons"] == "\n".join(verdict.reasons)
    for key, value in _lineage(model_dir).items():
        assert mv.tags[key] == value
    assert registry.scores_of(mv.tags) == {EXACT: 0.9375}
    assert client.get_model_version_by_alias(name, "staging").version in (1, "1")
    assert {f.path for f in client.list_artifacts(run_id, "model")} == {"model/config.json", "model/model.safetensors"}


def test_register_rejected_version_gets_no_alias(client, name, model_dir, run_id):
    assert _register(client, name, model_dir, run_id, 0.9, passed=True) == "1"
    assert _register(client, name, model_dir, run_id, 0.1, passed=False) == "2"
    rejected = client.get_model_version(name, "2")
    assert rejected.tags["gate"] == "rejected" and rejected.tags["gate.reasons"].startswith("FAIL")
    # staging stays on the last version that passed
    assert str(client.get_model_version_by_alias(name, "staging").version) == "1"
    # the second registration under the same run reuses the uploaded model
    assert len(client.list_artifacts(run_id, "model")) == 2


def test_promotion_moves_champion_and_previous_champion(client, name, model_dir, run_id):
    for score in (0.5, 0.7, 0.9):
        _register(client, name, model_dir, run_id, score, passed=True)
    assert registry.champion_scores(client, name) is None
    assert registry.promote(client, name, "1") is None
    assert registry.champion_scores(client, name) == ("1", {EXACT: 0.5, "heldout_mc/acc": 0.25})
    assert registry.promote(client, name, 3) == "1"
    version, scores = registry.champion_scores(client, name)
    assert version == "3" and scores[EXACT] == 0.9
    assert str(client.get_model_version_by_alias(name, "previous_champion").version) == "1"
    # promoting the champion again changes nothing
    assert registry.promote(client, name, "3") is None
    assert str(client.get_model_version_by_alias(name, "previous_champion").version) == "1"


def test_promoting_a_rejected_version_needs_force(client, name, model_dir, run_id):
    _register(client, name, model_dir, run_id, 0.1, passed=False)
    with pytest.raises(ValueError, match="did not pass the gate"):
        registry.promote(client, name, "1")
    registry.promote(client, name, "1", force=True, reason="known issue, accepted")
    assert registry.champion_scores(client, name)[0] == "1"


def test_list_versions(client, name, model_dir, run_id):
    assert registry.list_versions(client, name) == []
    for score, passed in ((0.5, True), (0.2, False), (0.8, True)):
        _register(client, name, model_dir, run_id, score, passed)
    registry.promote(client, name, "1")
    rows = registry.list_versions(client, name)
    assert [r["version"] for r in rows] == ["1", "2", "3"]
    assert [r["aliases"] for r in rows] == [["champion"], [], ["staging"]]
    assert [r["gate"] for r in rows] == ["passed", "rejected", "passed"]
    assert [r["scores"][EXACT] for r in rows] == [0.5, 0.2, 0.8]
    assert rows[0]["tags"][lineage.RECIPE_HASH] == "abc123"


def test_tag_keys_are_made_valid(client, name, model_dir, run_id):
    assert registry.tag_key("score.my:task/acc,none") == "score.my_task/acc_none"
    assert registry.tag_key("score.a//b/./c/") == "score.a/b/c"
    verdict = Verdict(passed=False, reasons=[], checks=[])
    version = registry.register_candidate(
        client, name, model_dir, run_id, {"my:task/acc": 0.5}, verdict, {"hpcft.odd:key": "v"}
    )
    tags = client.get_model_version(name, version).tags
    assert tags["score.my_task/acc"] == "0.5" and tags["hpcft.odd_key"] == "v"


def test_missing_model_dir_is_a_user_error(client, name, tmp_path, run_id):
    with pytest.raises(ValueError, match="does not exist"):
        registry.register_candidate(
            client, name, tmp_path / "nope", run_id, {EXACT: 0.5}, Verdict(passed=True), {lineage.RECIPE_HASH: "abc"}
        )


def test_cli_registry_of_a_missing_model_or_version_is_one_line(client, name, model_dir, run_id, capsys):
    # `hpcft registry` against this sqlite store: a model or version that is not there is a user's mistake,
    # one line and exit 2 (it was an MlflowException traceback for promote, an empty table for list)
    from hpc.cli import main

    uri = client.tracking_uri
    _register(client, name, model_dir, run_id, 0.9, passed=True)
    capsys.readouterr()
    for argv, line in (
        (["promote", name, "7"], f"registry promote: {name} has no version '7'; versions: 1"),
        (["promote", name, "x"], f"registry promote: {name} has no version 'x'; versions: 1"),
        (["promote", "no-such-model", "1"], "registry promote: no registered model 'no-such-model'; registered: "),
        (["list", "no-such-model"], "registry list: no registered model 'no-such-model'; registered: "),
    ):
        assert main(["registry", *argv, "--uri", uri, *(["--comment", "ok"] if argv[0] == "promote" else [])]) == 2
        out = capsys.readouterr()
        assert (
            out.err.startswith(f"hpcft: error: {line}")
            and out.err.count("\n") == 1
            and "Traceback" not in out.err
            and out.out == ""
        ), (argv, out.err)
    assert name in out.err  # the registered models are named
    assert registry.champion_scores(client, name) is None  # nothing moved
    assert main(["registry", "promote", name, "1", "--comment", "ok", "--uri", uri]) == 0
    assert main(["registry", "list", name, "--uri", uri]) == 0
    # a store that does not exist is not created empty
    missing = model_dir / "none.db"
    assert main(["registry", "list", name, "--uri", f"sqlite:///{missing}"]) == 2
    assert "registry: no MLflow store at" in capsys.readouterr().err and not missing.exists()
