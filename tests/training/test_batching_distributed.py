"""Packed rows under two-rank layouts (tp2 with sequence + vocab parallelism, dp2) against one process on the
unpacked rows: the same losses over two optimizer steps. Sequence parallelism pads an odd width with a
mask-free extra document, so the packed attention stays on."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from parallel import engine  # noqa: E402
from parallel.dims import ParallelConfig  # noqa: E402
from parallel.distributed.launch import launch  # noqa: E402
from parallel.trainer import IGNORE_INDEX  # noqa: E402
from tests.training.sft_helpers import task_rows  # noqa: E402
from training.batching import collate_packed  # noqa: E402
from training.config import OptimConfig  # noqa: E402
from training.data import build_examples, chat_tokenizer, collate  # noqa: E402

LAYOUTS = {"tp2": dict(tp=2), "dp2": dict(dp_replicate=2)}


def _batches(model_dir):
    tokenizer, pad_id = chat_tokenizer(model_dir, "SFT renders chat rows")
    examples, _ = build_examples(task_rows(tokenizer, 12, seed=3), tokenizer, 96)
    packed = collate_packed(examples, pad_id, 96, multiple=4)
    if packed["input_ids"].shape[1] % 2 == 0:  # an odd width, so sequence parallelism pads
        rows = packed["input_ids"].shape[0]
        packed = {
            "input_ids": torch.cat([packed["input_ids"], torch.full((rows, 1), pad_id)], 1),
            "labels": torch.cat([packed["labels"], torch.full((rows, 1), IGNORE_INDEX)], 1),
            "position_ids": torch.cat([packed["position_ids"], torch.zeros(rows, 1, dtype=torch.long)], 1),
        }
    return collate(examples, pad_id), packed


def _two_steps(model_dir, parallel: ParallelConfig, batch) -> list[float]:
    torch.manual_seed(0)
    trainer = engine.build_trainer(model_dir, parallel, mode="full", optim=OptimConfig(), grad_accum=2)
    return [engine.train_step(trainer, batch, lr=1e-2).loss for _ in range(2)]


def _ranks_main(rank, world_size, model_dir):
    _, packed = _batches(model_dir)
    return {name: _two_steps(model_dir, ParallelConfig(**layout), packed) for name, layout in LAYOUTS.items()}


@pytest.mark.slow
def test_packed_rows_under_tp_and_dp_equal_one_process_unpacked(model_dir):
    plain, packed = _batches(model_dir)
    assert packed["input_ids"].shape[1] % 2 == 1
    expected = _two_steps(model_dir, ParallelConfig(), plain)
    ranks = launch(_ranks_main, 2, model_dir, timeout=600)
    for name in LAYOUTS:
        for rank in ranks:
            assert rank[name] == pytest.approx(expected, abs=1e-5), name
