"""Which resumable training state a restarted stage may use: the same stage config and inputs, any layout."""

from pathlib import Path
from types import SimpleNamespace

from hpc.jobs import _keep_resume_state
from hpc.plan import build_plan
from hpc.recipe import load_recipe
from tests.conftest import TINY_RECIPE


def _sft(overrides):
    return {s.name: s for s in build_plan(load_recipe(TINY_RECIPE, overrides))}["sft"]


def test_resume_key_ignores_the_layout_but_not_the_stage():
    base = _sft([])
    other_layout = _sft(["parallel.dp_shard=2", "parallel.zero=1"])
    assert other_layout.input_hash != base.input_hash  # the stage reruns ...
    assert other_layout.resume_key == base.resume_key  # ... and may resume what the other layout saved
    assert _sft(["stages.0.max_steps=7"]).resume_key != base.resume_key
    assert _sft(["data.sources.0.num_rows=123"]).resume_key != base.resume_key  # other data upstream


def _ctx(out_dir: Path, key: str, events: list):
    return SimpleNamespace(out_dir=out_dir, leader=True, spec=SimpleNamespace(resume_key=key), progress=events.append)


def test_resume_state_is_kept_only_for_the_same_key(tmp_path):
    events = []
    _keep_resume_state(_ctx(tmp_path, "a", events))
    (tmp_path / "resume" / "latest").write_text("step-00000010\n")
    _keep_resume_state(_ctx(tmp_path, "a", events))  # the same stage restarted: kept
    assert (tmp_path / "resume" / "latest").is_file() and events == []
    _keep_resume_state(_ctx(tmp_path, "b", events))  # the stage changed: discarded, said so
    assert not (tmp_path / "resume" / "latest").exists()
    assert (tmp_path / "resume" / "key").read_text().strip() == "b"
    assert events == [{"resume": "discarded", "reason": "stage config or inputs changed"}]


def test_a_source_weight_retrains_without_re_tokenizing():
    def plan(overrides):
        return {s.name: s for s in build_plan(load_recipe(TINY_RECIPE, overrides))}

    base, weighted = plan([]), plan(["data.sources.0.weight=2"])
    assert weighted["data"].input_hash == base["data"].input_hash  # the token store stays valid
    assert weighted["sft"].input_hash != base["sft"].input_hash
    assert weighted["sft"].resume_key != base["sft"].resume_key
    assert plan(["data.sources.0.weight=3"])["sft"].input_hash != weighted["sft"].input_hash
