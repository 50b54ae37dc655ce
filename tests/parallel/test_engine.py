import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from parallel import engine  # noqa: E402
from parallel.dims import ParallelConfig  # noqa: E402
from parallel.tiny import build_tiny_model, build_tokenizer  # noqa: E402
from training.data import build_examples, collate, micro_batches  # noqa: E402

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


def _grads(model_dir, micro):
    torch.manual_seed(0)
    runtime = engine.build_runtime(FP32)
    model = engine.build_model(model_dir, FP32, runtime)
    loss, num_labels = engine.forward_backward(model, micro, runtime)
    return loss, num_labels, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_grad_accumulation_matches_one_batch(model_dir, examples):
    pad = build_tokenizer().pad_token_id
    loss1, n1, g1 = _grads(model_dir, [collate(examples, pad)])
    loss4, n4, g4 = _grads(model_dir, micro_batches(examples, 4, pad))
    assert n1 == n4
    assert abs(loss1 - loss4) < 1e-6
    worst = max(float((g1[k] - g4[k]).abs().max()) for k in g1)
    assert worst < 1e-6
    # A mean of micro-batch means would weight tokens differently: make sure the data can tell.
    counts = [int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches(examples, 4, pad)]
    assert len(set(counts)) > 1


def test_schedule_warms_up_then_decays_to_min():
    f = [engine.lr_factor(s, warmup_steps=10, max_steps=100, min_lr_ratio=0.1) for s in range(100)]
    assert f[0] == pytest.approx(1 / 11) and f[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:11]))  # linear rise
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay
    assert f[99] == pytest.approx(0.1)
    assert f[10 + 89 // 2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))
    assert engine.lr_factor(5, warmup_steps=0, max_steps=1, min_lr_ratio=0.0) == 0.0


def test_scheduler_drives_optimizer_lr():
    runtime = engine.build_runtime(FP32)
    model = torch.nn.Linear(2, 2)
    opt = engine.build_optimizer(model, lr=1.0, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, runtime=runtime)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # bias gets no decay
    sched = engine.build_scheduler(opt, warmup_steps=2, max_steps=6, min_lr_ratio=0.5)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(
        [1 / 3, 2 / 3, 1.0, 0.5 + 0.25 * (1 + math.cos(math.pi / 3)), 0.5 + 0.25 * (1 + math.cos(2 * math.pi / 3)), 0.5]
    )


def test_lora_trains_only_adapters(model_dir, examples):
    runtime = engine.build_runtime(FP32)
    model = engine.build_model(
        model_dir, FP32, runtime, lora=dict(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    )
    trainable, total = engine.count_params(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and trainable < total / 5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = engine.build_optimizer(model, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, runtime=runtime)
    sched = engine.build_scheduler(opt, warmup_steps=0, max_steps=3, min_lr_ratio=1.0)
    batch = micro_batches(examples, 2, build_tokenizer().pad_token_id)
    for _ in range(3):
        metrics = engine.train_step(model, opt, sched, batch, runtime, grad_clip=1.0)
    assert metrics.grad_norm > 0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(names)
    assert any("lora_B" in n for n in changed)  # B starts at zero; it must move for LoRA to learn


def test_clipping_bounds_the_update_norm(model_dir, examples):
    runtime = engine.build_runtime(FP32)
    model = engine.build_model(model_dir, FP32, runtime)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    metrics = engine.train_step(model, opt, sched, [collate(examples, 3)], runtime, grad_clip=0.01)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert metrics.grad_norm > 0.01  # the pre-clip norm is reported
    assert float((after - before).norm()) == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize(
    "layout, field",
    [
        (dict(dp_shard=2), "parallel:"),
        (dict(tp=2), "parallel:"),
        (dict(zero=1), "parallel.zero"),
        (dict(microbatches=4), "parallel.microbatches"),
        (dict(activation_checkpointing="selective"), "parallel.activation_checkpointing"),
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
