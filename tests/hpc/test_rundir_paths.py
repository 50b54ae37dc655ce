"""Paths built from user input stay inside the run directory (issue 15): stage names, eval element keys,
`hpcft logs STAGE`; a run directory's broken recipe snapshot is one line, not a traceback."""

import pytest

from hpc.plan import StageSpec, build_plan
from hpc.recipe import RecipeError, load_recipe
from hpc.rundir import RunDir
from tests.conftest import TINY_RECIPE


@pytest.fixture
def run_dir(tmp_path):
    rd = RunDir(tmp_path / "runs" / "w")
    rd.write_recipe(load_recipe(TINY_RECIPE))
    rd.update_meta(run_id="r1")
    return rd


def cli(capsys, *argv):
    from hpc.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out


def test_stage_and_element_dirs_never_leave_the_run(tmp_path):
    rd = RunDir(tmp_path / "w")
    assert rd.stage_dir("sft") == rd.root / "stages" / "sft"
    for bad in ("../../../x", "/etc", "a/b", "..", ".", ""):
        with pytest.raises(RecipeError) as e:
            rd.stage_dir(bad)
        assert e.value.problems[0].startswith(f"stage: {bad!r} is not a stage name"), e.value.problems
    assert rd.inside("stages/a/../b") == rd.root / "stages" / "b"
    for bad in ("/etc/passwd", "../w2/x", "stages/../../x"):
        with pytest.raises(RecipeError, match="leads outside"):
            rd.inside(bad, "logs")
    spec = StageSpec("eval", "eval", (), None, "h", ("yaml:/a/b:t@candidate", "yaml:/a/../../../../x:t@base"))
    assert rd.element_dir(spec, 0) == rd.root / "stages" / "eval" / "yaml:" / "a" / "b:t@candidate"
    with pytest.raises(RecipeError, match="^eval element: .* leads outside"):
        rd.element_dir(spec, 1)


def test_logs_of_a_stage_name_that_leaves_the_run_prints_nothing(run_dir, capsys):
    # stages/../../secret is beside the run directory: `hpcft logs` printed whatever log it found there
    (run_dir.root / "stages" / "model").mkdir(parents=True)  # a run that has started
    secret = run_dir.root.parent / "secret" / "logs" / "1"
    secret.mkdir(parents=True)
    (secret / "j_0_log.err").write_text("SECRET\n")
    stages = ", ".join(s.name for s in build_plan(run_dir.load_recipe()))
    for stage in ("../../secret", str(run_dir.root.parent / "secret")):
        code, out = cli(capsys, "logs", stage, "--workdir", run_dir.root)
        assert code == 2 and "SECRET" not in out.out + out.err
        assert f"  stage: {stage!r} is not a stage of the run in {run_dir.root} ({stages})" in out.err
    code, out = cli(capsys, "logs", "sft", "--workdir", run_dir.root, "--element", "-1")
    assert code == 2 and "  --element: -1 is negative; the first is 0" in out.err
    logs = run_dir.stage_dir("sft") / "logs" / "7"
    logs.mkdir(parents=True)
    (logs / "7_0_log.err").write_text("training...\n")
    code, out = cli(capsys, "logs", "sft", "--workdir", run_dir.root)
    assert code == 0 and out.out.endswith("training...\n")


def test_a_run_whose_recipe_snapshot_is_broken_is_one_line(run_dir, capsys):
    run_dir.recipe_path.write_text("stages: [1\n")
    code, out = cli(capsys, "status", run_dir.root)
    assert code == 2 and f"  workdir: the run's recipe {run_dir.recipe_path} is not valid YAML" in out.err
    run_dir.recipe_path.write_text("- a\n")
    code, out = cli(capsys, "logs", "sft", "--workdir", run_dir.root)
    assert code == 2 and f"  workdir: {run_dir.recipe_path}: <recipe>: the file must hold a YAML mapping" in out.err
