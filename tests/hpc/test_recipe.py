import subprocess

import pytest
import yaml

from hpc.plan import build_plan, downstream_of
from hpc.recipe import RecipeError, apply_overrides, load_recipe
from tests.conftest import ROOT, TINY_RECIPE


def write(tmp_path, **changes):
    raw = yaml.safe_load(TINY_RECIPE.read_text())
    for k, v in changes.items():
        apply_overrides(raw, [f"{k}={v}"])
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def problems(path, overrides=()):
    with pytest.raises(RecipeError) as e:
        load_recipe(path, list(overrides))
    return e.value.problems


def test_tiny_recipe_is_valid():
    r = load_recipe(TINY_RECIPE)
    assert r.stages[0].kind == "sft" and r.tracking.registered_model == "tiny-sft"


def test_overrides_change_typed_values():
    r = load_recipe(TINY_RECIPE, ["stages.0.max_steps=7", "stages.0.mode=lora", "eval.limit=null"])
    assert r.stages[0].max_steps == 7 and r.stages[0].mode == "lora" and r.eval.limit is None


def test_unknown_key_names_the_field_and_allowed_keys(tmp_path):
    out = problems(write(tmp_path, **{"stages.0.bogus": 1}))
    assert len(out) == 1
    assert out[0].startswith("stages.0.bogus: unknown key; allowed:") and "max_steps" in out[0]


def test_every_problem_listed_once_per_line(tmp_path):
    out = problems(
        write(
            tmp_path,
            **{
                "stages.0.mode": "int8",
                "stages.0.max_steps": -1,
                "data.splits.validation": 0.6,
                "data.splits.test": 0.5,
            },
        )
    )
    assert any(p.startswith("stages.0.mode:") and "'lora' or 'qlora'" in p for p in out)
    assert any(p.startswith("stages.0.max_steps:") for p in out)
    assert any(p.startswith("data.splits:") for p in out)


def test_wrong_type_and_missing_section(tmp_path):
    raw = yaml.safe_load(TINY_RECIPE.read_text())
    del raw["tracking"]
    raw["stages"][0]["batch_size"] = "lots"
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(raw))
    out = problems(p)
    assert "tracking: required field is missing" in out
    assert any(p.startswith("stages.0.batch_size:") and "integer" in p for p in out)


def test_missing_files_layout_and_offline_tasks(tmp_path):
    out = problems(
        TINY_RECIPE,
        [
            "model={path: /nonexistent/model}",
            "data.sources.0={path: missing.jsonl}",
            "eval.tasks=[mmlu, heldout_exact]",
        ],
    )
    assert any(p.startswith("model.path:") for p in out)
    assert any(p.startswith("data.sources.0.path: no such file") for p in out)
    assert any(p.startswith("eval.tasks.0:") and "mmlu" in p for p in out)
    out = problems(TINY_RECIPE, ["parallel.tp=4", "parallel.pp=9"])
    assert any("parallel.tp" in p and "KV heads" in p for p in out)
    assert any("parallel.pp" in p for p in out)


def test_bad_override_syntax():
    assert "expected KEY=VALUE" in problems(TINY_RECIPE, ["stages.0.max_steps"])[0]
    assert "not an index" in problems(TINY_RECIPE, ["stages.5.max_steps=3"])[0]


def test_cli_bad_recipe_exits_2_without_traceback(tmp_path, hpcft_cmd):
    bad = write(tmp_path, **{"stages.0.bogus": 1, "parallel.tp": 4})
    for args in (
        ["validate", str(bad)],
        ["run", str(bad), "--workdir", str(tmp_path / "w")],
        ["plan", str(bad)],
        ["validate", str(tmp_path / "nope.yaml")],
    ):
        p = subprocess.run(hpcft_cmd + args, capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr + p.stdout
        assert p.stderr.startswith("error: recipe")
    assert not (tmp_path / "w").exists()  # nothing was started


def test_plan_hashes_chain_downstream():
    a = {s.name: s for s in build_plan(load_recipe(TINY_RECIPE))}
    b = {s.name: s for s in build_plan(load_recipe(TINY_RECIPE, ["stages.0.max_steps=5"]))}
    changed = {n for n in a if a[n].input_hash != b[n].input_hash}
    assert changed == {"sft", "export", "eval", "gate"}
    assert changed == downstream_of(list(a.values()), "sft")
    assert a["eval"].elements == (
        "heldout_exact@candidate",
        "heldout_exact@base",
        "heldout_mc@candidate",
        "heldout_mc@base",
    )


def test_cli_plan_shows_stages(hpcft_cmd):
    p = subprocess.run(
        hpcft_cmd + ["plan", str(TINY_RECIPE), "--workdir", "/nonexistent-dir"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"COLUMNS": "200", **__import__("os").environ},
    )
    assert p.returncode == 0, p.stderr
    for name in ("model", "data", "sft", "export", "eval", "gate", "array of 4", "memory per rank (GiB)"):
        assert name in p.stdout
    tight = subprocess.run(
        hpcft_cmd + ["plan", str(TINY_RECIPE), "--gpu-mem-gb", "0.001"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"COLUMNS": "300", **__import__("os").environ},
    )
    assert tight.returncode == 0 and "parallel:" in tight.stdout and "at 0.001 GiB per GPU" in tight.stdout


DPO_RECIPE = ROOT / "recipes" / "tiny-dpo.yaml"


def test_alignment_recipe_is_valid_and_chains_stages():
    r = load_recipe(DPO_RECIPE)
    assert [s.kind for s in r.stages] == ["sft", "dpo"]
    plan = {s.name: s for s in build_plan(r)}
    assert plan["dpo"].depends_on == ("model", "sft") and plan["export"].depends_on == ("model", "dpo")


def test_stage_order_data_and_layout_problems_name_the_stage():
    assert load_recipe(DPO_RECIPE, ["parallel.dp_shard=2", "parallel.zero=3"]).parallel.world_size == 2
    # what the engine would refuse at start-up is refused before anything runs
    assert problems(DPO_RECIPE, ["parallel.pp=2"])[0].startswith("parallel.microbatches: 1 micro-batches")
    assert load_recipe(DPO_RECIPE, ["parallel.pp=2", "parallel.microbatches=2"]).parallel.pp == 2
    out = problems(
        DPO_RECIPE,
        [
            "parallel.pp=2",
            "parallel.microbatches=2",
            "stages.1={kind: grpo, reward_fn: 'training.rewards:exact_match'}",
        ],
    )
    assert out == [
        "parallel.pp: the grpo stage trains under data, ZeRO and tensor parallelism, not pipeline stages "
        "yet; set pp = 1"
    ]
    out = problems(DPO_RECIPE, ["parallel.tp=2", "stages.1.mode=qlora"])
    assert out == [
        "parallel.tp: 4-bit quantized (QLoRA) base weights cannot be tensor-sharded; use tp: 1 and "
        "scale with dp_replicate/dp_shard"
    ]
    out = problems(DPO_RECIPE, ["parallel.tp=2", "stages.1.precompute_reference=false"])
    assert out == [
        "stages.1.precompute_reference: must be true under several processes (the reference "
        "log-probs are computed before the model is laid out)"
    ]
    out = problems(
        DPO_RECIPE,
        [
            "parallel.tp=2",
            "parallel.sequence_parallel=true",
            "stages.1={kind: grpo, reward_fn: 'training.rewards:exact_match'}",
        ],
    )
    assert out == [
        "stages.1: the grpo stage samples from the model token by token, which sequence parallelism "
        "cannot split; set parallel.sequence_parallel: false (or leave it unset: it is then off for "
        "this stage)"
    ]
    assert load_recipe(
        DPO_RECIPE, ["parallel.tp=2", "stages.1={kind: grpo, reward_fn: 'training.rewards:exact_match'}"]
    )
    out = problems(
        DPO_RECIPE, ["parallel.tp=2", "stages.1={kind: grpo, mode: qlora, reward_fn: 'training.rewards:exact_match'}"]
    )
    assert out == [
        "parallel.tp: 4-bit quantized (QLoRA) base weights cannot be tensor-sharded; use tp: 1 and "
        "scale with dp_replicate/dp_shard"
    ]
    out = problems(DPO_RECIPE, ["parallel.tp=8", "parallel.vocab_parallel=true"])
    assert (
        "parallel.vocab_parallel: the vocabulary (260) does not divide by tp=8; leave vocab_parallel unset or false"
        in out
    )
    assert not any("vocab_parallel" in p for p in problems(DPO_RECIPE, ["parallel.tp=8"]))
    out = problems(DPO_RECIPE, ["data.sources=[{generate: tiny-tasks}]"])
    assert len(out) == 1 and out[0].startswith("stages.1: the dpo stage reads preference rows")
    out = problems(DPO_RECIPE, ["stages=[{kind: reward_model}]"])
    assert out[0].startswith("stages: no policy stage")
    out = problems(DPO_RECIPE, ["stages.1={kind: dpo, max_stpes: 3}"])
    assert out[0].startswith("stages.1.max_stpes: unknown key; allowed:") and "beta" in out[0]


def test_plan_memory_counts_each_stage_kinds_models(hpcft_cmd):
    from parallel.tiny import TINY_CONFIGS
    from training.stages import plan_memory

    r = load_recipe(ROOT / "recipes" / "tiny-rlhf.yaml")
    config = {**TINY_CONFIGS["tiny-llama"], "vocab_size": 300}
    sft, rm, ppo = (plan_memory(s, r.parallel, config) for s in r.stages)
    assert sft.frozen == rm.frozen == 0
    # PPO: a critic as large as the policy, a reference copy and the reward model held whole
    assert ppo.frozen == 2 * plan_memory(r.stages[0], r.parallel, config).params
    assert ppo.optimizer == 2 * sft.optimizer
    light = r.stages[2].model_copy(update={"offload_frozen": True})
    assert plan_memory(light, r.parallel, config).frozen == 0
    p = subprocess.run(
        hpcft_cmd + ["plan", str(ROOT / "recipes" / "tiny-rlhf.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**__import__("os").environ, "COLUMNS": "200"},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("memory per rank (GiB)") == 3 and "frozen" in p.stdout
    p = subprocess.run(
        hpcft_cmd + ["plan", str(ROOT / "recipes" / "tiny-rlhf.yaml"), "--set", "parallel.tp=2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**__import__("os").environ, "COLUMNS": "200"},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    # sft: both; the reward model's score head keeps the vocabulary whole; ppo samples token by token
    assert [line.split("tensor parallel 2: ")[1] for line in p.stdout.splitlines() if "tensor parallel 2:" in line] == [
        "sequence parallel on, vocab parallel on",
        "sequence parallel on, vocab parallel off",
        "sequence parallel off, vocab parallel on",
    ]


def test_recipe_validation_refuses_what_the_engine_refuses_at_start_up():
    # one layout check (parallel.layout) for recipe validation and the engine: ZeRO needs data-parallel
    # ranks in any world, interleaved pipeline stages count twice per pp rank, batches split into dp ranks
    assert problems(TINY_RECIPE, ["parallel.zero=1"])[0].startswith("parallel.zero: ZeRO-1 shards optimizer state")
    out = problems(TINY_RECIPE, ["parallel.pp=4", "parallel.microbatches=4", "parallel.pp_schedule=interleaved_1f1b"])
    assert out == ["parallel.pp: 8 pipeline stages (interleaved_1f1b) but the model has only 4 layers"]
    out = problems(DPO_RECIPE, ["parallel.dp_shard=3"])
    assert [line.split(":")[0] for line in out] == ["stages (sft).batch_size", "stages (dpo).batch_size"]


def test_eval_tasks_are_typed_shorthand_resolves_against_the_recipe_and_errors_name_the_field(tmp_path, hpcft_cmd):
    from hpc.plan import eval_elements
    from hpc.recipe import parse_recipe

    (tmp_path / "my_tasks").mkdir()
    (tmp_path / "my_tasks" / "say.yaml").write_text("task: my_say\ndataset_path: json\n")
    path = write(tmp_path, **{"eval.tasks": "[heldout_mc, 'yaml:my_tasks:my_say']", "eval.include_base": "false"})
    r = load_recipe(path, ["gate.thresholds={my_say/exact_match: 0.1}"])
    heldout, yaml_task = r.eval.tasks
    assert (heldout.heldout, yaml_task.yaml_dir, yaml_task.label) == ("mc", str(tmp_path / "my_tasks"), "my_say")
    # The snapshot keeps the shorthand (absolute now) and parses back to the same recipe anywhere.
    dumped = r.model_dump(mode="json")
    assert dumped["eval"]["tasks"] == ["heldout_mc", f"yaml:{tmp_path / 'my_tasks'}:my_say"]
    assert parse_recipe(dumped) == r
    elements = eval_elements(r)
    assert [(e.task, e.model) for e in elements] == [(heldout, "candidate"), (yaml_task, "candidate")]
    assert {s.name: s for s in build_plan(r)}["eval"].elements == tuple(e.key for e in elements)
    assert elements[1].key == f"yaml:{tmp_path / 'my_tasks'}:my_say@candidate"

    out = problems(TINY_RECIPE, ["eval.tasks=[heldout_mc, 'yaml:nodir', {yaml_dir: d}, {heldout: mc, bogus: 1}]"])
    assert out[0] == "eval.tasks.1: 'yaml:nodir': expected 'yaml:<dir>:<task>'"
    assert "eval.tasks.2.task: required field is missing" in out
    assert "eval.tasks.3.bogus: unknown key; allowed: heldout" in out
    bad = write(tmp_path, **{"eval.tasks": "[heldout_mc, 'yaml:nodir']"})
    p = subprocess.run(hpcft_cmd + ["validate", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "eval.tasks.1: 'yaml:nodir'" in p.stderr


# issue 15, recipes and CLI: every mistake is one 'field.path: message' line and exit 2, nothing silent


def cli(capsys, *argv):
    """`hpcft argv...` in this process: (exit code, stderr); the CLI must not raise."""
    from hpc.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_recipe_root_that_is_no_mapping_is_one_line_with_or_without_overrides(tmp_path, capsys):
    for text, what in (("- a\n- b\n", "not a list"), ("3\n", "not the int 3"), ("just words\n", "not the str")):
        path = tmp_path / "r.yaml"
        path.write_text(text)
        for overrides in ([], ["--set", "stages.0.max_steps=1"], ["--set", "a.b=1"]):
            code, err = cli(capsys, "validate", path, *overrides)
            assert code == 2, (text, overrides)
            assert err.splitlines()[1].startswith("  <recipe>: the file must hold a YAML mapping of sections (name, ")
            assert what in err and len(err.splitlines()) == 2, err


def test_set_value_that_is_not_yaml_is_one_line(capsys):
    code, err = cli(capsys, "validate", TINY_RECIPE, "--set", "stages.0.max_steps=[1", "--set", "eval.limit={a")
    assert code == 2
    assert err.splitlines()[1:] == [
        "  --set stages.0.max_steps: the value '[1' is not valid YAML (expected ',' or ']', but got '<stream end>' "
        "while parsing a flow sequence at line 1, column 3); quote it to set a string",
        "  --set eval.limit: the value '{a' is not valid YAML (expected ',' or '}', but got '<stream end>' "
        "while parsing a flow mapping at line 1, column 3); quote it to set a string",
    ]
    assert "a field name is empty" in problems(TINY_RECIPE, ["stages..max_steps=3"])[0]


def test_recipe_path_that_is_a_directory_and_sources_that_match_nothing(tmp_path, capsys):
    code, err = cli(capsys, "validate", tmp_path)
    assert code == 2 and f"<recipe>: {tmp_path} is a directory; give the recipe's YAML file" in err
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "a.txt").write_text("x")
    out = problems(
        write(
            tmp_path,
            **{"data.sources": "[{path: 'rows/*.jsonl'}, {path: rows}, {path: 'rows/*.txt'}, {path: no.jsonl}]"},
        )
    )
    assert out == [
        f"data.sources.0.path: the pattern rows/*.jsonl matched no files (in {tmp_path / 'rows'})",
        "data.sources.1.path: rows is a directory; give a file or a pattern such as dir/*.jsonl",
        "data.sources.3.path: no such file: no.jsonl",
    ]


def test_gate_metrics_must_be_ones_the_eval_tasks_report(tmp_path):
    out = problems(TINY_RECIPE, ["gate.thresholds={heldout_exact/em: 0.5, heldout_mc/acc_norm: 0.3}"])
    assert out == [
        "gate.thresholds.heldout_exact/em: task 'heldout_exact' reports no metric 'em'; it reports exact_match"
    ]
    out = problems(TINY_RECIPE, ["gate.primary_metric=heldout_mc/exact_match"])
    assert out == ["gate.primary_metric: task 'heldout_mc' reports no metric 'exact_match'; it reports acc, acc_norm"]
    # a user's lm-eval YAML task reports what its definition computes: any metric under its label, no other label
    (tmp_path / "my_tasks").mkdir()
    (tmp_path / "my_tasks" / "say.yaml").write_text("task: my_say\ndataset_path: json\n")
    path = write(tmp_path, **{"eval.tasks": "[heldout_exact, 'yaml:my_tasks:my_say']"})
    assert load_recipe(path, ["gate.thresholds={my_say/bleu: 0.1, heldout_exact/exact_match: 0.5}"])
    out = problems(path, ["gate.thresholds={other/bleu: 0.1}"])
    assert out == ["gate.thresholds.other/bleu: task 'other' is not among eval.tasks (heldout_exact, my_say)"]


def test_executor_stages_keys_are_checked_by_validate(capsys):
    out = problems(TINY_RECIPE, ["executor.stages={sftt: {partition: gpu}, eval: {mem_gb: 8}, sft: {nodes: 1}}"])
    assert out == [
        "executor.stages.sftt: no stage or stage kind of that name; allowed: data, eval, export, gate, model, sft"
    ]
    assert load_recipe(DPO_RECIPE, ["executor.stages={dpo: {nodes: 1}, sft: {nodes: 1}, data: {}}"])
    code, err = cli(capsys, "validate", TINY_RECIPE, "--set", "executor.stages={nope: {}}")
    assert code == 2 and "  executor.stages.nope: no stage or stage kind of that name" in err


def test_schema_errors_do_not_hide_the_other_problems(tmp_path):
    out = problems(
        TINY_RECIPE,
        [
            "stages.0.bogus=1",  # schema: unknown key (dropped for the checks)
            "stages.0.batch_size=lots",  # schema: wrong type (the layout check must not judge its default)
            "tracking=3",  # schema: a section that does not validate at all
            "parallel.tp=4",  # layout (needs stages, parallel, data, model)
            "parallel.dp_shard=3",
            "data.sources.0={path: 'missing/*.jsonl'}",  # filesystem
            "gate.thresholds={heldout_exact/em: 0.5}",  # gate metric
            "executor.stages={nope: {}}",  # executor key
        ],
    )
    schema = [
        "stages.0.batch_size: Input should be a valid integer, unable to parse string as an integer",
        "stages.0.bogus: unknown key; allowed: ",
        "tracking: Input should be a valid dictionary or instance of TrackingConfig",
    ]
    assert [line[: len(want)] for line, want in zip(out, schema)] == schema  # schema errors first
    rest = out[len(schema) :]
    assert any(line.startswith("parallel.tp: 4 must divide the model's 4 attention heads") for line in rest)
    assert not any("batch_size" in line for line in rest), rest  # about the default 16, not the recipe's value
    assert (
        f"data.sources.0.path: the pattern missing/*.jsonl matched no files (in {ROOT / 'recipes' / 'missing'})" in rest
    )
    assert any(
        line.startswith("gate.thresholds.heldout_exact/em: task 'heldout_exact' reports no metric") for line in rest
    )
    assert any(line.startswith("executor.stages.nope:") for line in rest)
    # an independent section's problems still show when another section cannot be checked at all
    out = problems(TINY_RECIPE, ["stages=3", "eval.tasks=[mmlu_nope_task]", "model={path: /nonexistent}"])
    assert out[0] == "stages: Input should be a valid list"
    assert "model.path: /nonexistent is not a Hugging Face model directory (no config.json)" in out
    assert any(line.startswith("eval.tasks.0: 'mmlu_nope_task' is neither") for line in out)
    # and an override that cannot be applied does not hide the recipe's own problems
    out = problems(TINY_RECIPE, ["stages.0.max_steps=[1", "stages.0.mode=int8", "parallel.tp=4"])
    assert out[0].startswith("--set stages.0.max_steps: the value '[1' is not valid YAML")
    assert out[1].startswith("stages.0.mode: Input should be")
    assert out[2].startswith("parallel.tp: 4 must divide")
    # a dropped value's default never speaks for the recipe: no line judges it, in its section or another
    assert problems(TINY_RECIPE, ["eval.tasks=3", "gate.thresholds={my_say/acc: 0.1}"]) == [
        "eval.tasks: Input should be a valid list"
    ]
    assert problems(DPO_RECIPE, ["stages.1={kind: grpo, reward_fn: 3}"]) == [
        "stages.1.reward_fn: Input should be a valid string"
    ]  # not 'the grpo stage scores responses with a reward model, but no reward_model stage comes before it'
    out = problems(DPO_RECIPE, ["stages.0.name='../x'", "stages.1.name=sft", "executor.stages={sft: {}}"])
    assert len(out) == 1 and out[0].startswith("stages.0.name: '../x' is not a valid name")


def test_stage_and_task_names_are_plain_directory_names():
    from eval.tasks import TASK_NAME_PATTERN
    from hpc.recipe import PIPELINE_STAGES
    from training.config import NAME_PATTERN
    from training.stages import KINDS

    assert TASK_NAME_PATTERN == NAME_PATTERN
    for bad in ("../../../x", "/tmp/x", "a/b", "..", ".hidden", ""):
        for kind in KINDS:  # every stage schema
            out = problems(DPO_RECIPE, [f"stages.1={{kind: {kind}, name: '{bad}'}}"])
            assert any(line.startswith(f"stages.1.name: {bad!r} is not a valid name") for line in out), (kind, out)
        assert problems(TINY_RECIPE, [f"name='{bad}'"])[0].startswith(f"name: {bad!r} is not a valid name")
    out = problems(TINY_RECIPE, ["eval.tasks=['../../x', 'yaml:d:a/b', {lm_eval: /abs}]"])
    assert out[0].startswith("eval.tasks.0.lm_eval: '../../x' is not a valid task name")
    assert any(line.startswith("eval.tasks.1") and "'a/b'" in line for line in out), out
    assert out[-1].startswith("eval.tasks.2.lm_eval: '/abs' is not a valid task name")
    out = problems(DPO_RECIPE, ["stages.1.name=sft"])
    assert out == ["stages.1.name: 'sft' is already the name of stages.0"]
    out = problems(TINY_RECIPE, ["stages.0.name=eval"])
    assert out == [
        f"stages.0.name: 'eval' is the name of a pipeline stage ({', '.join(PIPELINE_STAGES)}); choose another"
    ]


def test_yaml_task_directories_are_normalised(tmp_path):
    from hpc.plan import eval_elements

    (tmp_path / "my_tasks").mkdir()
    (tmp_path / "my_tasks" / "say.yaml").write_text("task: my_say\ndataset_path: json\n")
    deep = "/".join([".."] * 12) + str(tmp_path / "my_tasks")  # climbs to / and back down
    for spec in (deep, "./x/../my_tasks"):
        path = write(tmp_path, **{"eval.tasks": f"['yaml:{spec}:my_say']"})
        r = load_recipe(path, ["gate.thresholds={my_say/acc: 0.1}"])
        assert r.eval.tasks[0].yaml_dir == str(tmp_path / "my_tasks")
        assert ".." not in eval_elements(r)[0].key
    # two tasks of one label would write one element directory and mix their scores
    out = problems(path, ["eval.tasks=[heldout_exact, heldout_mc, heldout_exact]"])
    assert out == ["eval.tasks.2: a second task labelled 'heldout_exact' (eval.tasks.0)"]
