"""parallel.defaults: `auto` resolves per device to the README's rules, explicit values stay, and a stage
left on `auto` trains to exactly the losses of the explicit values it resolves to (and records them)."""

import json

import pytest
import torch

from parallel.defaults import resolve_defaults
from parallel.dims import ParallelConfig
from parallel.layout import layout_problems
from training.config import SFTStage

CPU_RULES = {"compile": False, "activation_checkpointing": "none", "fused_optimizer": False}
SFT = dict(max_steps=3, batch_size=8, seq_len=48, log_every=1, eval_every=3, optim={"lr": 5e-3, "warmup_steps": 1})


def test_cpu_resolves_auto_to_the_plain_path_and_keeps_explicit_values():
    resolved = resolve_defaults(ParallelConfig(), "cpu")
    assert resolved.used() == CPU_RULES
    assert set(resolved.why) == set(CPU_RULES) and all(why.startswith("cpu") for why in resolved.why.values())
    assert resolve_defaults(resolved.config, "cpu").why == {}  # idempotent: nothing left to resolve
    explicit = ParallelConfig(compile=True, activation_checkpointing="selective", fused_optimizer=True)
    assert resolve_defaults(explicit, "cpu").config == explicit and resolve_defaults(explicit, "cuda").why == {}
    assert resolved.lines()[0].startswith("compile: auto -> off (cpu")
    with pytest.raises(ValueError, match="expected auto, true or false, got 'yes'"):
        ParallelConfig(fused_optimizer="yes")


@pytest.mark.parametrize(
    "fields, kwargs, compile_, fused",
    [
        ({}, {}, True, True),
        ({"tp": 2}, {}, False, False),  # parallel.layout refuses compile under tp; DTensors
        ({"dp_shard": 2, "zero": 3}, {}, True, False),
        ({"dp_shard": 2, "zero": 1}, {}, True, True),
        ({}, {"mode": "qlora"}, False, True),
        ({}, {"samples": True}, False, True),
        ({}, {"optimizer": "adamw_8bit"}, True, False),
        ({"engine": "deepspeed", "dp_shard": 2, "zero": 2}, {}, False, False),
    ],
)
def test_cuda_rules(fields, kwargs, compile_, fused):
    used = resolve_defaults(ParallelConfig(**fields), "cuda", **kwargs).used()
    assert (used["compile"], used["fused_optimizer"], used["activation_checkpointing"]) == (compile_, fused, "none")


def test_cuda_checkpointing_only_when_the_planner_says_the_stage_does_not_fit():
    """The real planner (training.stages.plan_memory) of an SFT stage of a 1B Llama shape on a GPU whose
    memory lies between the estimates with and without recompute."""
    from bench.sft_vs_hf import SHAPES
    from training.stages import plan_memory, stage_defaults

    config = dict(SHAPES["llama-1b"], model_type="llama")
    stage = SFTStage(batch_size=8, seq_len=2048)
    need = {
        mode: plan_memory(stage, ParallelConfig(activation_checkpointing=mode), config).total
        for mode in ("none", "selective", "full")
    }
    assert need["none"] > need["selective"] > need["full"]

    def on_gpu(device_bytes: int) -> str:
        return stage_defaults(stage, ParallelConfig(), config, "cuda", device_bytes).config.activation_checkpointing

    assert on_gpu(int(need["none"] / 0.9) + 1) == "none"
    assert on_gpu(int(need["selective"] / 0.9) + 1) == "selective"
    assert on_gpu(int(need["full"] / 0.9) + 1) == "full"
    assert on_gpu(int(need["full"] / 0.9) // 2) == "full"  # fits nowhere: the least memory (plan warns)
    explicit = ParallelConfig(activation_checkpointing="none")
    assert stage_defaults(stage, explicit, config, "cuda", 1).config.activation_checkpointing == "none"


def test_auto_fields_are_not_taken_for_on():
    """`auto` is truthy: the layout rules that refuse compile (tp, DeepSpeed) must not see it as true."""
    assert not layout_problems(ParallelConfig(tp=2), mode="full")
    assert not layout_problems(ParallelConfig(engine="deepspeed", dp_shard=2, zero=2), mode="full")
    refused = layout_problems(ParallelConfig(dp_shard=2, zero=3, fused_optimizer=True), mode="full")
    assert [p.split(":")[0] for p in refused] == ["parallel.fused_optimizer"]
    refused = layout_problems(ParallelConfig(fused_optimizer=True), mode="full", optimizer="adamw_8bit")
    assert [p.split(":")[0] for p in refused] == ["parallel.fused_optimizer"]


def test_trainer_resolves_auto_and_an_explicit_fused_optimizer_is_used():
    from transformers import LlamaConfig, LlamaForCausalLM

    from parallel.tiny import TINY_CONFIGS
    from parallel.trainer import LocalMesh, Trainer

    def trainer(cfg: ParallelConfig) -> Trainer:
        torch.manual_seed(0)
        config = LlamaConfig(**{k: v for k, v in TINY_CONFIGS["micro-llama"].items() if k != "model_type"})
        return Trainer(LlamaForCausalLM(config), cfg, LocalMesh())

    auto = trainer(ParallelConfig())
    assert {k: getattr(auto.cfg, k) for k in CPU_RULES} == CPU_RULES
    assert not auto.optimizers[0].defaults["fused"]
    assert trainer(ParallelConfig(fused_optimizer=True)).optimizers[0].defaults["fused"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from parallel.tiny import build_tiny_model, build_tokenizer
    from tests.training.sft_helpers import write_task_data

    root = tmp_path_factory.mktemp("defaults")
    model = build_tiny_model("micro-llama", root / "model", seed=0)
    return model, write_task_data(root / "chat", build_tokenizer(), num_train=24, num_val=8)


def _sft(dirs, out_dir, parallel: ParallelConfig) -> tuple[list[float], dict]:
    from training.sft import run_sft

    events = []
    run_sft(
        SFTStage(**SFT),
        model_dir=dirs[0],
        data_dir=dirs[1],
        out_dir=out_dir,
        parallel=parallel,
        seed=0,
        progress=events.append,
    )
    losses = [e["loss"] for e in events if "max_steps" in e] + [e["val_loss"] for e in events if "val_loss" in e]
    return losses, json.loads((out_dir / "result.json").read_text())


def test_sft_stage_on_auto_trains_as_its_resolved_values_and_records_them(dirs, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        auto_losses, auto = _sft(dirs, tmp_path / "auto", ParallelConfig())
        explicit_losses, explicit = _sft(dirs, tmp_path / "explicit", ParallelConfig(**CPU_RULES))
    finally:
        torch.set_num_threads(before)
    assert len(auto_losses) == 5 and auto_losses == explicit_losses  # bitwise: the same code path
    assert auto["parallel_used"] == explicit["parallel_used"] == CPU_RULES
    assert set(auto["parallel_auto"]) == set(CPU_RULES) and explicit["parallel_auto"] == {}


def test_plan_shows_each_stage_resolved_on_the_device_its_job_gets(tmp_path, capsys, monkeypatch):
    from hpc import cli
    from tests.conftest import TINY_RECIPE

    monkeypatch.setenv("COLUMNS", "400")
    plan = ["plan", str(TINY_RECIPE), "--workdir", str(tmp_path)]
    assert cli.main(plan + ["--set", "executor.kind=inline"]) == 0
    assert "compile: auto -> off (cpu" in capsys.readouterr().out
    gpu = ["--set", "executor.kind=slurm", "--set", "executor.slurm.gpus_per_node=1", "--gpu-mem-gb", "80"]
    assert cli.main(plan + gpu) == 0
    out = capsys.readouterr().out
    assert "compile: auto -> on (cuda" in out and "fused_optimizer: auto -> on (cuda" in out
    assert "activation_checkpointing: auto -> none (planned 0.1 GiB per rank fits 90% of 80 GiB)" in out
