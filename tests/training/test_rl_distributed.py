"""GRPO and PPO under multi-process layouts (dp with ZeRO 0-3, tp) against one process.

Engine level: one GRPO (policy) update's and one PPO critic update's loss and every gradient on fixed
left-padded rollouts equal one process's under dp2 ZeRO-0, dp2 ZeRO-3 and tp2. Sampling: greedy
generation through the laid-out policy (tp2; dp2 ZeRO-3 with a different number of prompts per rank, so
the ranks must stay in lockstep) gives one process's tokens. Stage level: run_grpo and run_ppo train under
dp2 ZeRO-3 and LoRA tp2 (PPO's critic from a reward model in one), every rank returns the same result,
and the checkpoint exports. One forked launch runs everything.
"""

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from parallel.dims import ParallelConfig  # noqa: E402
from parallel.distributed.launch import launch  # noqa: E402
from parallel.distributed.mesh import ParallelDims  # noqa: E402
from parallel.engine import Runtime  # noqa: E402
from parallel.export import export_hf  # noqa: E402
from parallel.tiny import build_tokenizer  # noqa: E402
from parallel.trainer import Trainer, model_inputs  # noqa: E402
from tests.parallel.distributed.harness import MODEL, build_model, full_grads  # noqa: E402
from tests.training.rl_helpers import write_reward_model  # noqa: E402
from tests.training.sft_helpers import write_task_data  # noqa: E402
from training.config import GRPOStage, PPOStage  # noqa: E402
from training.grpo import GRPOObjective, run_grpo  # noqa: E402
from training.ppo import TokenValues, ValueObjective, run_ppo  # noqa: E402
from training.sampling import (  # noqa: E402
    gather_logprobs,
    response_tokens,
    rollout_from_tokens,
    rollout_rows,
    rows_response_logits,
    sample,
)
from training.stages import sampling_layout  # noqa: E402

CFG = GRPOStage(reward_fn="training.rewards:exact_match", beta=0.1, clip_eps=0.2, temperature=0.9)
LAYOUTS = {"dp2-zero0": dict(dp_replicate=2), "dp2-zero3": dict(dp_shard=2, zero=3), "tp2": dict(tp=2)}
CPU = Runtime(torch.device("cpu"), None)
PAD, EOS = MODEL["pad_token_id"], [2]
STAGE = dict(
    max_steps=2,
    batch_size=4,
    group_size=4,
    mini_batch_size=8,
    max_new_tokens=6,
    eval_every=2,
    eval_prompts=8,
    reward_fn="tests.training.rl_helpers:reward_length",
    optim={"lr": 1e-3, "warmup_steps": 0},
)


def _prompts(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(4, MODEL["vocab_size"], (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(n)
    ]


def _rows():
    """Fixed rollouts (left-padded prompts of several lengths, responses with and without EOS) and the
    fields an update reads; old log-probs from the initial model, nudged so some ratios clip."""
    gen = torch.Generator().manual_seed(7)
    prompts = _prompts(8, 1)
    responses = [
        torch.randint(4, MODEL["vocab_size"], (int(n),), generator=gen).tolist() + ([EOS[0]] if n % 2 else [])
        for n in torch.randint(2, 7, (8,), generator=gen)
    ]
    rows = rollout_rows(rollout_from_tokens(prompts, responses, PAD, EOS))
    with torch.no_grad():
        logits = build_model("full")(**model_inputs(rows)).logits
        logprobs = gather_logprobs(rows_response_logits(logits, rows, CFG.temperature), rows["response_ids"])
    rows["old_logprobs"] = logprobs + 0.3 * torch.randn(logprobs.shape, generator=gen)
    rows["ref_logprobs"] = logprobs + 0.2 * torch.randn(logprobs.shape, generator=gen)
    rows["advantages"] = torch.randn(8, generator=gen)
    return rows


PPO_STAGE = dict(STAGE, batch_size=8, mini_batch_size=4)
del PPO_STAGE["group_size"]


def _critic():
    """A fresh per-token value model on the harness decoder (what PPO's critic is)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(3)
    return TokenValues(LlamaForSequenceClassification(LlamaConfig(**MODEL, num_labels=1)))


def _value_rows():
    rows, gen = _rows(), torch.Generator().manual_seed(11)
    rows["old_values"] = torch.randn(rows["response_ids"].shape, generator=gen) * 0.5
    rows["returns"] = torch.randn(rows["response_ids"].shape, generator=gen)
    return rows


CASES = {
    "grpo": (lambda: build_model("full"), _rows, lambda: GRPOObjective(CFG)),
    "ppo-critic": (_critic, _value_rows, lambda: ValueObjective(0.2)),
}


def _one_process(case):
    build, make_rows, make_objective = CASES[case]
    model, rows, objective = build(), make_rows(), make_objective()
    summed, _ = objective(model(**model_inputs(rows)).logits, rows)
    (summed / objective.count(rows)).backward()
    return float(summed) / objective.count(rows), {n: p.grad.clone() for n, p in model.named_parameters()}


def _ranks_main(rank, world_size, model_dir, data_dir, out_root):
    from parallel.distributed import zero as zero_mod
    from parallel.distributed.mesh import dp_mesh, dp_rank

    out = {"grads": {}, "generated": {}}
    for name, layout in LAYOUTS.items():
        cfg = ParallelConfig(**layout)
        for case, (build, make_rows, make_objective) in CASES.items():
            mesh = ParallelDims.from_config(cfg, world_size).build_mesh("cpu")
            trainer = Trainer(build(), cfg, mesh)
            loss = trainer.forward_backward(make_rows(), make_objective())
            if cfg.zero <= 1 and trainer.dims.dp > 1:
                zero_mod.allreduce_grads(trainer.params, dp_mesh(trainer.mesh).get_group())
            grads = {n: g.detach().numpy().copy() for n, g in full_grads(trainer).items()}
            out["grads"][(name, case)] = (trainer._global_loss(loss), grads)
        gen_cfg = sampling_layout(cfg)  # decoding token by token: no sequence parallelism
        trainer = Trainer(build_model("full"), gen_cfg, ParallelDims.from_config(cfg, world_size).build_mesh("cpu"))
        if name != "dp2-zero0":  # generation through sharded weights
            share = _prompts(5, 2)[:2] if dp_rank(trainer.mesh) == 0 and trainer.dims.dp > 1 else _prompts(5, 2)
            if trainer.dims.dp > 1 and dp_rank(trainer.mesh) == 1:
                share = _prompts(5, 2)[2:]
            rollout = sample(
                trainer.parts[0],
                share,
                pad_id=PAD,
                eos_ids=EOS,
                max_new_tokens=8,
                runtime=CPU,
                greedy=True,
                synced=True,
            )
            out["generated"][name] = (share, response_tokens(rollout))
    for name, layout, mode in (
        ("grpo-dp2-zero3", dict(dp_shard=2, zero=3), "full"),
        ("grpo-tp2-lora", dict(tp=2), "lora"),
        ("grpo-deepspeed-zero3", dict(engine="deepspeed", dp_shard=2, zero=3), "full"),
    ):
        result = run_grpo(
            GRPOStage(**STAGE, mode=mode),
            model_dir=model_dir,
            data_dir=data_dir,
            out_dir=out_root / name,
            parallel=ParallelConfig(**layout),
            seed=0,
        )
        out[name] = json.loads(json.dumps(result))
    reward_dir = write_reward_model(model_dir, out_root / "rm") if rank == 0 else out_root / "rm"
    import torch.distributed as dist

    dist.barrier()
    for name, layout, mode, rm in (
        ("ppo-dp2-zero3-rm", dict(dp_shard=2, zero=3), "full", reward_dir),
        ("ppo-tp2-lora", dict(tp=2), "lora", None),
        ("ppo-deepspeed-zero2-rm", dict(engine="deepspeed", dp_shard=2, zero=2), "full", reward_dir),
    ):
        stage = PPOStage(**{**PPO_STAGE, "reward_fn": None if rm else PPO_STAGE["reward_fn"]}, mode=mode)
        result = run_ppo(
            stage,
            model_dir=model_dir,
            data_dir=data_dir,
            out_dir=out_root / name,
            parallel=ParallelConfig(**layout),
            seed=0,
            reward_model_dir=rm,
        )
        out[name] = json.loads(json.dumps(result))
    return out


@pytest.fixture(scope="module")
def ranks(model_dir, tmp_path_factory):
    data_dir = write_task_data(tmp_path_factory.mktemp("task"), build_tokenizer(), num_train=40, num_val=8)
    root = tmp_path_factory.mktemp("ranks")
    return root, launch(_ranks_main, 2, model_dir, data_dir, root, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_update_loss_and_every_gradient_match_one_process(ranks, layout, case):
    ref_loss, ref_grads = _one_process(case)
    for out in ranks[1]:
        loss, grads = out["grads"][(layout, case)]
        assert loss == pytest.approx(ref_loss, abs=1e-6)
        assert sorted(grads) == sorted(ref_grads)
        worst = max(
            float((torch.from_numpy(grads[n]) - ref_grads[n]).abs().max()) / max(float(ref_grads[n].abs().max()), 1e-12)
            for n in ref_grads
        )
        assert worst < 1e-4, f"{layout}: max relative gradient difference {worst:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["dp2-zero3", "tp2"])
def test_greedy_generation_through_sharded_weights_matches_one_process(ranks, layout):
    model = build_model("full").eval()
    for out in ranks[1]:
        prompts, tokens = out["generated"][layout]
        expected = response_tokens(
            sample(model, prompts, pad_id=PAD, eos_ids=EOS, max_new_tokens=8, runtime=CPU, greedy=True)
        )
        assert tokens == expected


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "grpo-dp2-zero3",
        "grpo-tp2-lora",
        "ppo-dp2-zero3-rm",
        "ppo-tp2-lora",
        "grpo-deepspeed-zero3",
        "ppo-deepspeed-zero2-rm",
    ],
)
def test_stage_trains_under_the_layout(ranks, model_dir, name, tmp_path):
    root, results = ranks
    assert results[0][name] == results[1][name], "every rank returns rank 0's result"
    result = results[0][name]
    assert result["world_size"] == 2 and result["steps"] == 2
    keys = (
        ("final_loss", "final_kl", "final_score", "final_clip_fraction")
        if name.startswith("grpo")
        else ("final_policy_loss", "final_value_loss", "final_kl", "final_score", "final_entropy")
    )
    for key in keys + ("val_reward",):
        assert isinstance(result[key], float), key
    if name.endswith("-rm"):
        assert result["critic_init"] == "reward_model" and result["reward"].startswith("model:")
    assert export_hf(model_dir, root / name / "checkpoint", tmp_path / "export")["max_abs_logit_diff"] < 1e-4


def _zero_x_tp(rank, world_size, model_dir, data_dir, out_root):
    layout = ParallelConfig(dp_shard=2, zero=3, tp=2)
    grpo = run_grpo(
        GRPOStage(**STAGE), model_dir=model_dir, data_dir=data_dir, out_dir=out_root / "grpo", parallel=layout, seed=0
    )
    ppo = run_ppo(
        PPOStage(**PPO_STAGE), model_dir=model_dir, data_dir=data_dir, out_dir=out_root / "ppo", parallel=layout, seed=0
    )
    return json.loads(json.dumps({"grpo": grpo, "ppo": ppo}))


@pytest.mark.slow
def test_grpo_and_ppo_train_under_zero3_x_tp2_on_four_ranks(model_dir, tmp_path):
    data_dir = write_task_data(tmp_path / "task", build_tokenizer(), num_train=40, num_val=8)
    results = launch(_zero_x_tp, 4, model_dir, data_dir, tmp_path / "out", timeout=900)
    assert all(r == results[0] for r in results), "every rank returns rank 0's result"
    for name in ("grpo", "ppo"):
        assert results[0][name]["world_size"] == 4 and results[0][name]["steps"] == 2
        assert (
            export_hf(model_dir, tmp_path / "out" / name / "checkpoint", tmp_path / f"export-{name}")["merged"] is False
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    "deepspeed, native", [("grpo-deepspeed-zero3", "grpo-dp2-zero3"), ("ppo-deepspeed-zero2-rm", "ppo-dp2-zero3-rm")]
)
def test_deepspeed_trains_like_the_native_engine(ranks, deepspeed, native):
    """The same seed, prompts, samples and global-batch losses on both engines (fp32: agreement to rounding)."""
    got, want = ranks[1][0][deepspeed], ranks[1][0][native]
    assert got["engine"] == "deepspeed" and want["engine"] == "native"
    for key, value in want.items():
        timing = key.endswith(("_per_s", "_gib", "mfu"))  # speed and memory differ by engine; numbers must not
        if key.startswith(("final_", "val_")) and isinstance(value, float) and not timing:
            assert got[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
