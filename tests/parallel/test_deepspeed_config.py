"""parallel.engine: deepspeed without starting DeepSpeed: the ds_config merge (owned keys from the recipe,
conflicts named, "auto" filled, the rest passed through), the layouts refused at validation, and the
accelerator/host memory plan with and without offload."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from parallel import deepspeed_config as dsc
from parallel import deepspeed_plan
from parallel.dims import OffloadConfig, ParallelConfig
from parallel.layout import layout_problems
from parallel.planner import estimate_memory, num_params

ROOT = Path(__file__).resolve().parents[2]

OWNED = dsc.Owned(
    train_batch_size=32,
    micro_batch=8,
    grad_accum=2,
    lr=1e-3,
    betas=(0.9, 0.95),
    eps=1e-8,
    weight_decay=0.1,
    grad_clip=1.0,
    bf16=True,
    zero=2,
    stage="stages.0",
)


def test_owned_keys_come_from_the_recipe_and_the_rest_passes_through():
    user = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.95], "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto"}},
        "bf16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": 2,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
        },
        "communication_data_type": "fp32",
    }
    config = dsc.build(OWNED, user=user, hidden_size=1000)
    assert config["train_micro_batch_size_per_gpu"] == 8 and config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 1.0 and config["bf16"] == {"enabled": True}
    assert "optimizer" not in config and "scheduler" not in config  # hpcft builds AdamW and sets the lr
    zero = config["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert zero["reduce_bucket_size"] == 1_000_000  # hidden^2, as the HF integration fills it
    assert zero["stage3_prefetch_bucket_size"] == 900_000 and zero["stage3_param_persistence_threshold"] == 10_000
    assert config["communication_data_type"] == "fp32"


@pytest.mark.parametrize(
    "user, named",
    [
        ({"train_micro_batch_size_per_gpu": 4}, ["train_micro_batch_size_per_gpu is 4", "stages.0.batch_size"]),
        ({"gradient_accumulation_steps": 8}, ["gradient_accumulation_steps is 8", "stages.0.grad_accum"]),
        ({"gradient_clipping": 0.5}, ["gradient_clipping is 0.5", "stages.0.optim.grad_clip"]),
        ({"optimizer": {"type": "Lamb", "params": {}}}, ['optimizer.type is "Lamb"', "AdamW"]),
        ({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}, ['optimizer.type is "Adam"']),
        (
            {"optimizer": {"type": "AdamW", "params": {"lr": 2e-5}}},
            ["optimizer.params.lr is 2e-05", "stages.0.optim.lr"],
        ),
        (
            {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}},
            ["scheduler.params.warmup_num_steps"],
        ),
        ({"bf16": {"enabled": False}}, ["bf16.enabled is false", "parallel.mixed_precision"]),
        ({"fp16": {"enabled": True}}, ["fp16 in", "parallel.mixed_precision"]),
        ({"zero_optimization": {"stage": 3}}, ["zero_optimization.stage is 3", "parallel.zero"]),
        ({"zero_optimization": {"sub_group_size": "auto"}}, ['zero_optimization.sub_group_size is "auto"']),
        ({"tensor_parallel": {"autotp_size": 2}}, ["tensor_parallel in", "parallel.tp"]),
        ({"steps_per_print": "auto"}, ['steps_per_print is "auto"']),
    ],
)
def test_a_conflicting_owned_key_names_the_file_key_and_the_recipe_field(user, named):
    with pytest.raises(dsc.DeepSpeedConfigError) as err:
        dsc.build(OWNED, user=user, where="ds.json")
    message = str(err.value)
    assert message.startswith("parallel.deepspeed_config: ") and "ds.json" in message
    for words in named:
        assert words in message, message


def test_offload_from_the_recipe_and_from_the_file():
    off = OffloadConfig(optimizer="cpu", params="nvme", nvme_path="/nvme")
    config = dsc.build(OWNED.__class__(**{**OWNED.__dict__, "zero": 3}), offload=off)
    assert dsc.offloaded(config) == ("cpu", "nvme")
    assert config["zero_optimization"]["offload_param"]["nvme_path"] == "/nvme"
    # the file's own offload section passes through, its extra keys kept under the recipe's device
    user = {"zero_optimization": {"offload_optimizer": {"device": "cpu", "ratio": 0.5}}}
    config = dsc.build(OWNED, user=user, offload=OffloadConfig(optimizer="cpu"))
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "ratio": 0.5, "pin_memory": True}
    assert dsc.offloaded(dsc.build(OWNED, user=user)) == ("cpu", "none")
    with pytest.raises(dsc.DeepSpeedConfigError, match='offload_optimizer.device is "nvme"'):
        dsc.build(
            OWNED,
            user={"zero_optimization": {"offload_optimizer": {"device": "nvme"}}},
            offload=OffloadConfig(optimizer="cpu"),
        )


@pytest.mark.parametrize(
    "fields, mode, words",
    [
        (dict(pp=2, microbatches=2), "full", "parallel.pp: the deepspeed engine runs data-parallel layouts"),
        (dict(tp=2), "full", "parallel.tp: the deepspeed engine"),
        (dict(dp_replicate=2), "full", "parallel.dp_replicate"),
        (dict(compile=True), "full", "parallel.compile"),
        (dict(), "qlora", "mode: qlora"),
        (
            dict(zero=0, offload=OffloadConfig(optimizer="cpu")),
            "full",
            "parallel.offload.optimizer: ZeRO-Offload needs",
        ),
        (dict(zero=2, offload=OffloadConfig(params="cpu")), "full", "parallel.offload.params: parameter offload needs"),
        (dict(zero=3, offload=OffloadConfig(params="nvme")), "full", "parallel.offload.nvme_path"),
    ],
)
def test_layouts_deepspeed_cannot_run_are_refused_naming_the_field(fields, mode, words):
    cfg = ParallelConfig(engine="deepspeed", **fields)
    assert any(words in line for line in layout_problems(cfg, mode=mode)), layout_problems(cfg, mode=mode)


def test_deepspeed_only_fields_need_the_engine_and_one_rank_may_run_zero3():
    problems = layout_problems(ParallelConfig(offload=OffloadConfig(optimizer="cpu"), zero=1, dp_shard=2))
    assert any(line.startswith("parallel.offload: offloading") for line in problems)
    assert any(
        line.startswith("parallel.deepspeed_config")
        for line in layout_problems(ParallelConfig(deepspeed_config="ds.json"))
    )
    # one GPU + offload, a model larger than its memory: ZeRO-3 on one rank is DeepSpeed's use case
    assert (
        layout_problems(
            ParallelConfig(engine="deepspeed", zero=3, offload=OffloadConfig(optimizer="cpu", params="cpu"))
        )
        == []
    )


LLAMA_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}


def test_the_memory_plan_moves_optimizer_and_weights_to_the_host():
    P = num_params(LLAMA_8B)
    assert 8.0e9 < P < 8.1e9
    cfg = ParallelConfig(engine="deepspeed", dp_shard=8, zero=3)
    native = estimate_memory(LLAMA_8B, cfg, seq_len=2048, micro_batch=1)
    plain = deepspeed_plan.estimate(native, total_params=P, trainable_params=P, zero=3, dp=8, bf16=True)
    assert plain.host == 0
    assert plain.gpu.params == P * 2 // 8 and plain.gpu.grads == P * 2 // 8
    assert plain.gpu.optimizer == P * 12 // 8  # fp32 master + two moments
    off = deepspeed_plan.estimate(
        native,
        total_params=P,
        trainable_params=P,
        zero=3,
        dp=8,
        bf16=True,
        offload_optimizer="cpu",
        offload_params="cpu",
    )
    assert off.gpu.optimizer == 0 and off.gpu.params == 0 and off.gpu.grads == 0
    assert off.host == P * 16 // 8 + P * 2 // 8
    assert off.gpu.total < plain.gpu.total - (P * 12 // 8)  # optimizer state alone: ~11 GiB per rank gone
    assert off.gpu.activations == plain.gpu.activations == native.activations


def test_validate_reads_the_users_ds_config_and_plan_shows_gpu_and_host(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"gradient_clipping": 0.3, "zero_optimization": {"stage": "auto", "overlap_comm": True}}))
    recipe = ROOT / "recipes" / "tiny-sft.yaml"
    base = [sys.executable, "-m", "hpc.cli"]
    sets = ["--set", "parallel.engine=deepspeed", "--set", "parallel.dp_shard=2", "--set", "parallel.zero=3"]
    sets += ["--set", f"parallel.deepspeed_config={ds}"]
    out = subprocess.run([*base, "validate", str(recipe), *sets], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert "parallel.deepspeed_config: gradient_clipping is 0.3" in out.stderr and "Traceback" not in out.stderr
    ds.write_text(json.dumps({"gradient_clipping": "auto", "zero_optimization": {"overlap_comm": True}}))
    sets += ["--set", "parallel.offload.optimizer=cpu"]
    out = subprocess.run([*base, "plan", str(recipe), *sets], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "deepspeed ZeRO-3, offload optimizer cpu, params none: GPU per rank" in out.stdout
    assert "deepspeed ZeRO-3, without offload: GPU per rank" in out.stdout and "host per rank" in out.stdout


def test_8bit_optimizers_stay_on_the_native_engine():
    problems = layout_problems(ParallelConfig(engine="deepspeed", dp_shard=2, zero=2), optimizer="adamw_8bit")
    assert len(problems) == 1 and problems[0].startswith("optim.optimizer: adamw_8bit runs on parallel.engine: native")
