"""Review, approval, history and rollback on a real MLflow sqlite store; the HTML report in a real headless
chromium. The store's tables take ~10 s to create, hence the slow marks."""

import itertools
import json
import shutil
import subprocess

import pytest

from eval import registry, review
from tests.eval.review_helpers import EXACT, MC, URI_PASSWORD, register, tiny_model_dir, write_run_dir

_names = itertools.count()
GOOD = dict(lr=0.001, answers=["5", "9", "18", "6"], mc_right=[True, True, True, False], rejected_dups=10)
WORSE = dict(lr=1e-9, answers=["5", "", "7", "<b>x</b>"], mc_right=[True, False, False, False], rejected_dups=12)


def test_bootstrap_stderr_matches_the_binomial_formula():
    values = [1.0] * 30 + [0.0] * 70
    assert review.bootstrap_stderr(values) == review.bootstrap_stderr(values)  # fixed seed
    assert review.bootstrap_stderr(values) == pytest.approx((0.3 * 0.7 / 100) ** 0.5, rel=0.1)
    assert review.bootstrap_stderr([0.5] * 10) == 0.0


def test_champion_stack_walks_back_over_rollbacks():
    events = [("promote", "1"), ("promote", "2"), ("force_promote", "3"), ("rollback", "2"), ("promote", "4")]
    stack = registry.champion_stack([{"event": e, "version": v} for e, v in events])
    assert stack == ["1", "2", "4"]
    assert registry.champion_stack([{"event": "rollback", "version": "1"}]) == []


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("review")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("review-tests", artifact_location=str(root / "artifacts"))
    return client, experiment, root, tiny_model_dir(root / "model")


@pytest.fixture
def versions(store, tmp_path):
    """A fresh model name with v1 (good, passed) and v2 (worse, rejected by the gate)."""
    client, experiment, _root, model_dir = store
    name = f"reviewed-{next(_names)}"
    v1 = register(client, experiment, name, write_run_dir(tmp_path / "good", **GOOD), model_dir, passed=True)
    v2 = register(client, experiment, name, write_run_dir(tmp_path / "worse", **WORSE), model_dir, passed=False)
    return client, name, v1, v2


def _aliases(client, name):
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def _state(client, name):
    model = client.get_registered_model(name)
    tags = {v: client.get_model_version(name, v).tags for v in ("1", "2")}
    return dict(model.aliases), dict(model.tags), tags


@pytest.mark.slow
def test_force_rules_and_approval_tags(versions):
    client, name, v1, v2 = versions
    registry.promote(client, name, v1, approver="ann", comment="good enough")
    before = _state(client, name)
    with pytest.raises(ValueError, match="did not pass the gate"):
        registry.promote(client, name, v2, approver="bob", comment="c")
    with pytest.raises(ValueError, match="needs a reason"):
        registry.promote(client, name, v2, force=True, approver="bob", comment="c")
    assert _state(client, name) == before  # refused: nothing written
    tags = client.get_model_version(name, v1).tags
    assert tags["approval.approver"] == "ann" and tags["approval.comment"] == "good enough"
    assert tags["approval.forced"] == "false" and tags["approval.time"].endswith("+00:00")
    assert registry.promote(client, name, v2, force=True, reason="hotfix", approver="bob", comment="c") == v1
    tags = client.get_model_version(name, v2).tags
    assert tags["approval.forced"] == "true" and tags["approval.force_reason"] == "hotfix"
    last = registry.history(client, name)[-1]
    assert (last["event"], last["version"], last["from"], last["reason"]) == ("force_promote", v2, v1, "hotfix")


@pytest.mark.slow
def test_history_is_append_only_and_rollbacks_walk_back(store, tmp_path):
    client, experiment, _root, model_dir = store
    name = f"walk-{next(_names)}"
    for i in range(3):
        register(client, experiment, name, write_run_dir(tmp_path / f"r{i}", **GOOD), model_dir, passed=True)
        registry.promote(client, name, str(i + 1), approver=f"a{i}", comment=f"c{i}")
    first_six = {k: v for k, v in client.get_registered_model(name).tags.items() if k.startswith("history.")}
    assert sorted(first_six) == [f"history.{i:06d}" for i in range(1, 7)]  # register, promote, ...
    assert registry.rollback(client, name, reason="regressed", approver="ops") == "2"
    aliases = _aliases(client, name)
    assert (aliases["champion"], aliases["previous_champion"]) == ("2", "1")
    assert registry.rollback(client, name, reason="again", approver="ops") == "1"
    aliases = _aliases(client, name)
    assert aliases["champion"] == "1" and "previous_champion" not in aliases
    with pytest.raises(ValueError, match="nothing to roll back to"):
        registry.rollback(client, name, reason="once more")
    entries = registry.history(client, name)
    assert [e["event"] for e in entries[:6]] == ["register", "promote"] * 3
    assert [(e["event"], e["version"], e.get("from")) for e in entries if e["event"] != "register"] == [
        ("promote", "1", None),
        ("promote", "2", "1"),
        ("promote", "3", "2"),
        ("rollback", "2", "3"),
        ("rollback", "1", "2"),
    ]
    tags = client.get_registered_model(name).tags
    assert all(tags[k] == v for k, v in first_six.items())  # earlier entries never rewritten
    # a promotion after the walk back makes the walked-back-to champion the previous one again
    registry.promote(client, name, "3", approver="a", comment="fixed")
    assert _aliases(client, name)["previous_champion"] == "1"


@pytest.mark.slow
def test_review_against_the_champion_and_the_html_in_a_browser(versions, tmp_path):
    client, name, v1, v2 = versions
    registry.promote(client, name, v1, approver="ann", comment="ok")
    rv = review.review(client, name, v2, samples=4)
    assert (rv.reference.version, rv.reference_alias, rv.gate) == (v1, "champion", "rejected")
    rows = {r.metric: r for r in rv.scores}
    assert rows[EXACT].candidate == 0.25 and rows[EXACT].reference == 0.75 and rows[EXACT].delta == -0.5
    assert rows[EXACT].err_source == "bootstrap over 4 examples" and rows[EXACT].candidate_err > 0
    assert rows[MC].err_source == "lm-eval stderr" and rows[MC].candidate_err == 0.125
    assert rv.gate_reasons == [f"FAIL threshold: {EXACT} = 0.2500 >= 0.5000"]
    assert "-    optim: {lr: 0.001}\n" in rv.recipe_diff and "+    optim: {lr: 1e-09}\n" in rv.recipe_diff
    manifest = {key: (a, b) for key, a, b in rv.manifest}
    assert manifest["rows train"] == ("88", "90")
    assert manifest["rejected exact_dedup/exact_duplicate"] == ("12", "10")
    assert [(e.prompt, e.candidate, e.reference) for e in rv.examples[:3]] == [
        ("<user>Add 2 and 3.<assistant>", "5", "5"),
        ("<user>Which is larger, 4 or 9?<assistant>", "", "9"),
        ("<user>Compute 3 times 6.<assistant>", "7", "18"),
    ]
    lineage = {key: (a, b) for key, a, b in rv.lineage}
    assert lineage["hpcft.base_model"] == ("tiny-llama", "tiny-llama")
    assert lineage["layout (recipe)"] == ("dp_shard=1 tp=1", "dp_shard=1 tp=1")

    text = review.render_html(rv)
    assert "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt;" in text  # an answer is text, not markup
    assert "<script" not in text and " src=" not in text and "<link" not in text  # nothing to load
    assert URI_PASSWORD not in text and "alice:***@" in text
    assert review.log_html(client, rv, text) == f"review/review-v{v2}-vs-v{v1}.html"
    run_id = client.get_model_version(name, v2).run_id
    assert [f.path for f in client.list_artifacts(run_id, "review")] == [f"review/review-v{v2}-vs-v{v1}.html"]

    html_path = tmp_path / "review.html"
    html_path.write_text(text)
    shot, dom = _chromium(html_path, tmp_path)
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2000)
    colours = image.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # rendered text and tables, not one flat page
    for needle in (f"Review: {name} v{v2} vs v{v1} (champion)", "0.250", "0.750", "-0.500", "± 0.125", "rejected"):
        assert needle in dom, needle


def _chromium(html_path, tmp_path):
    """Screenshot and DOM of `html_path` in headless chromium. Missing chromium fails (CI installs it)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is not installed (apt-get install chromium; .ci/run does)"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1280,2000",
    ]
    shot = tmp_path / "review.png"
    url = html_path.resolve().as_uri()
    subprocess.run([binary, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    dom = subprocess.run([binary, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True)
    assert shot.is_file() and shot.stat().st_size > 10_000
    return shot, dom.stdout


@pytest.mark.slow
def test_review_reads_mlflow_artifacts_when_the_run_dir_is_gone(versions, tmp_path):
    client, name, v1, v2 = versions
    for version, folder in ((v1, "good"), (v2, "worse")):
        mv = client.get_model_version(name, version)
        src = tmp_path / folder
        client.log_artifact(mv.run_id, str(src / "recipe.yaml"))
        client.log_artifact(mv.run_id, str(src / "stages/data/manifest.json"), "data")
        if version == v2:  # v1's eval samples were never logged: its answers are "not available"
            client.log_artifacts(mv.run_id, str(src / "stages/eval"), "eval")
            shutil.rmtree(src)
        else:  # v1's directory was reused by a rerun with another recipe: its files are not v1's any more
            (src / "run.json").write_text(json.dumps({"recipe_hash": "another-recipe"}))
    rv = review.review(client, name, v2, against=v1, samples=2)
    assert rv.candidate.found_in == f"MLflow artifacts of run {client.get_model_version(name, v2).run_id}"
    assert rv.recipe_diff and {k: (a, b) for k, a, b in rv.manifest}["rows train"] == ("88", "90")
    assert [e.candidate for e in rv.examples] == ["5", ""] and rv.examples[0].reference is None
    assert f"v{v1}: per-example eval samples not available" in rv.notes
    assert f"v{v1}: {tmp_path / 'good'} now holds another run (recipe hash differs); using MLflow artifacts" in rv.notes
    alone = review.review(client, name, v1)  # no champion: the candidate alone
    assert alone.reference is None and f"{name} has no champion: the candidate is reviewed alone" in alone.notes


@pytest.mark.slow
def test_cli_promote_needs_a_comment_and_a_forced_one_a_reason(versions, capsys):
    from hpc.cli import main

    client, name, v1, v2 = versions
    uri = client.tracking_uri
    for argv, line in (
        (["promote", name, v1], "registry promote: --comment is required (why this version is promoted)"),
        (["promote", name, v2, "--comment", "x", "--force"], "registry promote: --force needs --reason"),
        (["promote", name, v2, "--comment", "x"], f"registry promote: {name} version {v2} did not pass the gate"),
        (["rollback", name, "--reason", "r"], f"registry rollback: nothing to roll back to: {name} has no champion"),
    ):
        assert main(["registry", *argv, "--uri", uri]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"hpcft: error: {line}") and len(err.strip().splitlines()) == 1, err
    assert "champion" not in client.get_registered_model(name).aliases
    assert main(["registry", "promote", name, v1, "--comment", "first", "--uri", uri]) == 0
    capsys.readouterr()
    assert main(["registry", "history", name, "--json", "--uri", uri]) == 0
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["event"], e["version"], e.get("gate")) for e in entries] == [
        ("register", v1, "passed"),
        ("register", v2, "rejected"),
        ("promote", v1, None),
    ]
    assert entries[1]["comment"].startswith("FAIL threshold") and entries[2]["comment"] == "first"
    assert entries[2]["approver"]
