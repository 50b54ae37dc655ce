import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from parallel import engine  # noqa: E402
from parallel.dims import ParallelConfig  # noqa: E402
from parallel.tiny import build_tiny_model, build_tokenizer  # noqa: E402
from parallel.trainer import LocalMesh  # noqa: E402
from training.config import LoraConfig, OptimConfig  # noqa: E402
from training.data import build_examples, collate  # noqa: E402
from training.learner import Learner  # noqa: E402

FP32 = ParallelConfig(mixed_precision="fp32")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model("micro-llama", tmp_path_factory.mktemp("micro"), seed=0)


@pytest.fixture(scope="module")
def examples():
    # Different prompt and answer lengths, so micro-batches pad differently and hold unequal label counts.
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Reverse the word: " + "abcdefgh"[: 3 + i % 5] * (1 + i % 3)},
                {"role": "assistant", "content": "zyxwvuts"[: 1 + (i * 3) % 8]},
            ]
        }
        for i in range(8)
    ]
    return build_examples(rows, build_tokenizer(), seq_len=128)[0]


OPTIM = OptimConfig(lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, grad_clip=1.0)


def _trainer(model_dir, parallel=FP32, grad_accum=1, lora=None, optim=OPTIM):
    """The one-process Trainer (a mesh of ones) over the micro model, seeded alike."""
    torch.manual_seed(0)
    mode = "full" if lora is None else "lora"
    return engine.build_trainer(model_dir, parallel, mode=mode, optim=optim, lora=lora, grad_accum=grad_accum)


def _grads(model_dir, batch, **kwargs):
    trainer = _trainer(model_dir, **kwargs)
    loss = trainer.forward_backward(batch)
    return loss, {n: p.grad.clone() for n, p in trainer.parts[0].named_parameters()}


def test_one_process_is_a_mesh_of_ones(model_dir):
    trainer = _trainer(model_dir)
    assert isinstance(trainer.mesh, LocalMesh) and trainer.dims.world_size == 1
    assert trainer.whole_model is trainer.parts[0] and len(trainer.parts) == 1


def test_grad_accumulation_matches_one_batch(model_dir, examples):
    pad = build_tokenizer().pad_token_id
    batch = collate(examples, pad)
    loss1, g1 = _grads(model_dir, batch)
    loss4, g4 = _grads(model_dir, batch, grad_accum=4)
    assert abs(loss1 - loss4) < 1e-6
    worst = max(float((g1[k] - g4[k]).abs().max()) for k in g1)
    assert worst < 1e-6
    # A mean of micro-batch means would weight tokens differently: make sure the data can tell.
    counts = [int((c[:, 1:] != -100).sum()) for c in batch["labels"].chunk(4)]
    assert len(set(counts)) > 1


def test_one_process_runs_pipeline_microbatches_and_selective_checkpointing(model_dir, examples):
    """One process is the same trainer as every layout, so what it supports there works here too."""
    batch = collate(examples, build_tokenizer().pad_token_id)
    loss1, g1 = _grads(model_dir, batch)
    layout = ParallelConfig(mixed_precision="fp32", microbatches=2, activation_checkpointing="selective")
    loss2, g2 = _grads(model_dir, batch, parallel=layout)
    assert abs(loss1 - loss2) < 1e-6
    assert max(float((g1[k] - g2[k]).abs().max()) for k in g1) < 1e-6


def test_schedule_warms_up_then_decays_to_min():
    f = [engine.lr_factor(s, warmup_steps=10, max_steps=100, min_lr_ratio=0.1) for s in range(100)]
    assert f[0] == pytest.approx(1 / 11) and f[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:11]))  # linear rise
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay
    assert f[99] == pytest.approx(0.1)
    assert f[10 + 89 // 2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))
    assert engine.lr_factor(5, warmup_steps=0, max_steps=1, min_lr_ratio=0.0) == 0.0


def test_schedule_drives_the_trainers_lr(model_dir, examples):
    optim = OptimConfig(
        lr=1.0, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, grad_clip=1.0, warmup_steps=2, min_lr_ratio=0.5
    )
    learner = Learner(_trainer(model_dir, optim=optim), optim, num_updates=6)
    # Norms (1-D) get no weight decay.
    assert [g["weight_decay"] for g in learner.trainer.optimizers[0].param_groups] == [0.1, 0.0]
    batch = collate(examples[:2], build_tokenizer().pad_token_id)
    lrs = []
    for _ in range(6):
        learner.update(batch)
        lrs.append(learner.trainer.optimizers[0].param_groups[0]["lr"])
    assert lrs == pytest.approx(
        [1 / 3, 2 / 3, 1.0, 0.5 + 0.25 * (1 + math.cos(math.pi / 3)), 0.5 + 0.25 * (1 + math.cos(2 * math.pi / 3)), 0.5]
    )


def test_lora_trains_only_adapters(model_dir, examples):
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    trainer = _trainer(model_dir, lora=lora, grad_accum=2)
    model = trainer.parts[0]
    trainable, total = engine.count_params(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and trainable < total / 5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = collate(examples, build_tokenizer().pad_token_id)
    for _ in range(3):
        metrics = engine.train_step(trainer, batch, lr=1e-2)
    assert metrics.grad_norm > 0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(names)
    assert any("lora_B" in n for n in changed)  # B starts at zero; it must move for LoRA to learn


def test_clipping_bounds_the_update_norm(model_dir, examples):
    trainer = _trainer(
        model_dir, optim=OptimConfig(lr=1.0, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, grad_clip=0.01)
    )
    model = trainer.parts[0]
    trainer.optimizers = [torch.optim.SGD(model.parameters(), lr=1.0)]
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    metrics = engine.train_step(trainer, collate(examples, 3), lr=1.0)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert metrics.grad_norm > 0.01  # the pre-clip norm is reported
    assert float((after - before).norm()) == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize(
    "layout, field",
    [
        (dict(dp_shard=2), "parallel:"),
        (dict(tp=2), "parallel:"),
        (dict(zero=1), "parallel.zero"),
        (dict(zero=3), "parallel.zero"),
    ],
)
def test_unsupported_layouts_name_the_field(layout, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        engine.check_layout(ParallelConfig(**layout))


def test_cpu_runs_fp32_by_default():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    assert engine.build_runtime(ParallelConfig()).autocast_dtype is None
    assert engine.build_runtime(ParallelConfig(mixed_precision="bf16")).autocast_dtype == torch.bfloat16
