"""Step batching (training.batching): determinism, epochs, source mixing, packing, num_epochs."""

from collections import Counter

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from data_tools.config import DataConfig
from parallel.trainer import IGNORE_INDEX, num_label_tokens
from training.batching import (
    EpochBatches,
    collate_packed,
    epoch_batches,
    mix_shares,
    pack_rows,
    resolve_max_steps,
    steps_for_epochs,
)
from training.config import DPOStage, GRPOStage, SFTStage


def _lengths(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, 120, size=n)


# --- EpochBatches: the batch of a step is a function of (data, seed, step) --------------------------------


def test_same_step_same_batch_in_any_order_and_after_a_restart():
    lengths = _lengths(500)
    a = EpochBatches(lengths, 8, seed=3)
    forward = [a(s) for s in range(200)]  # 3+ epochs
    b = EpochBatches(lengths, 8, seed=3)  # a "resumed" run asks for late steps first, then earlier ones
    assert [b(s) for s in reversed(range(200))][::-1] == forward
    assert EpochBatches(list(lengths), 8, seed=3)(150) == forward[150]  # lists work like arrays
    assert EpochBatches(lengths, 8, seed=4)(0) != forward[0]
    assert all(isinstance(i, int) for i in forward[0]) and all(len(b) == 8 for b in forward)


def test_every_example_once_per_epoch_without_weights():
    lengths = _lengths(203)
    batches = EpochBatches(lengths, 8, seed=1, sources=np.arange(203) % 3)  # sources alone change nothing
    assert batches.batches_per_epoch == 25 and batches.examples_per_epoch == 203
    for epoch in range(3):
        seen = [i for s in range(epoch * 25, (epoch + 1) * 25) for i in batches(s)]
        assert len(seen) == len(set(seen)) == 200  # the 3 left over are dropped, at random
    dropped = [set(range(203)) - {i for s in range(e * 25, (e + 1) * 25) for i in batches(s)} for e in range(3)]
    assert len({frozenset(d) for d in dropped}) > 1
    assert batches(0) == EpochBatches(lengths, 8, seed=1)(0)


def test_batches_are_length_bucketed_and_epochs_differ():
    lengths = [(i * 37) % 101 for i in range(200)]
    a = epoch_batches(200, lengths, 8, seed=3, epoch=0)
    assert a == epoch_batches(200, lengths, 8, seed=3, epoch=0)
    assert a != epoch_batches(200, lengths, 8, seed=3, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(200))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    assert spread < 20


def test_batch_size_larger_than_the_data_is_refused():
    with pytest.raises(ValueError, match="batch_size 21 is larger than the 20 training pairs"):
        EpochBatches(_lengths(20), 21, seed=0, unit="training pairs")


# --- mixing -------------------------------------------------------------------------------------------------


def test_shares_add_up_to_the_rows_of_the_weighted_sources():
    assert mix_shares({0: 10, 1: 10, 2: 10}, {0: 1, 1: 1, 2: 1}) == {0: 10, 1: 10, 2: 10}
    assert mix_shares({0: 100, 1: 5}, {0: 1, 1: 1}) == {0: 53, 1: 52}  # 52.5 each: the tie to source 0
    assert mix_shares({0: 7, 1: 7, 2: 7}, {0: 1, 1: 1, 2: 1}) == {0: 7, 1: 7, 2: 7}
    shares = mix_shares({0: 1000, 1: 1, 2: 33}, {0: 0.2, 1: 0.3, 2: 0.5})
    assert sum(shares.values()) == 1034 and shares == {0: 207, 1: 310, 2: 517}
    assert mix_shares({0: 50, 1: 30}, {0: 0, 1: 2}) == {0: 0, 1: 30}  # weight 0: left out, N = 30


def test_share_errors_name_the_weight():
    with pytest.raises(ValueError, match=r"data.sources.1.weight: .*no training examples"):
        mix_shares({0: 5}, {0: 1, 1: 1})
    with pytest.raises(ValueError, match=r"data.sources.1.weight: .*no weight"):
        mix_shares({0: 5, 1: 5}, {0: 1})
    with pytest.raises(ValueError, match="every weight is 0"):
        mix_shares({0: 5, 1: 5}, {0: 0, 1: 0})


def test_weighted_epochs_hold_exact_shares_and_cycle_through_each_source():
    sources = np.array([0] * 300 + [1] * 20 + [2] * 80)
    lengths = _lengths(400)
    batches = EpochBatches(lengths, 10, seed=5, sources=sources, weights={0: 1.0, 1: 1.0, 2: 2.0})
    assert batches.shares == {0: 100, 1: 100, 2: 200} and batches.batches_per_epoch == 40
    rows = {s: np.flatnonzero(sources == s) for s in range(3)}
    per_source_draws = {s: [] for s in range(3)}
    for epoch in range(3):
        items = batches.epoch_items(epoch)
        assert Counter(sources[items].tolist()) == {0: 100, 1: 100, 2: 200}  # exact per epoch
        for s in range(3):
            per_source_draws[s] += [i for i in items.tolist() if sources[i] == s]
        seen = [i for step in range(epoch * 40, (epoch + 1) * 40) for i in batches(step)]
        assert sorted(seen) == sorted(items.tolist())  # 400 per epoch: nothing to drop
    # source 1 (20 rows, 100 per epoch): every row exactly 5 times per epoch
    assert set(Counter(i for i in batches.epoch_items(0).tolist() if sources[i] == 1).values()) == {5}
    # source 0 (300 rows, 100 per epoch): three epochs see every row once, in different subsets
    assert sorted(per_source_draws[0]) == rows[0].tolist()
    # source 2 (80 rows, 200 per epoch): 600 draws = 7.5 passes, each row 7 or 8 times
    assert set(Counter(per_source_draws[2]).values()) == {7, 8}


def test_mixing_proportions_over_many_epochs_and_weight_zero_excluded():
    rng = np.random.default_rng(0)
    sources = rng.integers(0, 3, size=997)
    batches = EpochBatches(_lengths(997), 16, seed=9, sources=sources, weights={0: 3.0, 1: 1.0, 2: 0.0})
    n = int((sources != 2).sum())
    assert batches.examples_per_epoch == n
    drawn = Counter()
    for step in range(20 * batches.batches_per_epoch):
        drawn.update(sources[batches(step)].tolist())
    assert drawn[2] == 0
    assert abs(drawn[0] / (drawn[0] + drawn[1]) - 0.75) < 0.01


def test_weights_need_sources():
    with pytest.raises(ValueError, match="sources="):
        EpochBatches(_lengths(10), 2, seed=0, weights={0: 1.0})
    with pytest.raises(ValueError, match="one source index per item"):
        EpochBatches(_lengths(10), 2, seed=0, sources=np.zeros(9, dtype=int), weights={0: 1.0})


def _data(*weights):
    return DataConfig(sources=[{"generate": "tiny-tasks", "weight": w} for w in weights])


def test_weight_validator():
    assert _data(None, None).source_weights() is None
    assert _data(1, 0.5).source_weights() == {0: 1.0, 1: 0.5}
    assert _data(0, 2).source_weights() == {0: 0.0, 1: 2.0}
    with pytest.raises(ValidationError, match=r"sources.1.weight is set but sources.0.weight is not"):
        _data(None, 1)
    with pytest.raises(ValidationError, match=r"sources.0.weight: every source has weight 0"):
        _data(0, 0)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        _data(-1, 1)


# --- packing ------------------------------------------------------------------------------------------------


class _Ex:
    def __init__(self, n: int, seed: int):
        g = np.random.default_rng(seed)
        self.input_ids = g.integers(3, 200, size=n)
        self.labels = np.where(g.random(n) < 0.5, self.input_ids, IGNORE_INDEX)


def _unpacked_label_tokens(examples) -> int:
    return sum(int((np.asarray(ex.labels[1:]) != IGNORE_INDEX).sum()) for ex in examples)


@pytest.mark.parametrize("multiple", [1, 2, 4, 8])
def test_packed_rows_fit_hold_every_example_once_and_split_evenly(multiple):
    rng = np.random.default_rng(multiple)
    for trial in range(30):
        lengths = rng.integers(1, 64, size=int(rng.integers(1, 40))).tolist()
        rows = pack_rows(lengths, 64, multiple)
        assert len(rows) % multiple == 0
        assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        first_fit_floor = -(-sum(lengths) // 64)
        assert len(rows) <= max(multiple, -(-(first_fit_floor * 2) // multiple) * multiple)
        assert pack_rows(lengths, 64, multiple) == rows


def test_packing_is_tight_where_it_can_be():
    assert len(pack_rows([32] * 8, 64)) == 4
    assert pack_rows([40, 30, 20, 10], 60) == [[0, 3], [1, 2]]  # balanced: 50 + 50
    rows = pack_rows([60, 50], 64, multiple=4)  # two examples, four rows: two stay empty
    assert sorted(len(r) for r in rows) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([65], 64)


def test_collate_packed_keeps_documents_apart():
    examples = [_Ex(n, i) for i, n in enumerate([30, 7, 19, 44, 12, 3, 25])]
    batch = collate_packed(examples, pad_id=0, seq_len=64, multiple=4)
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert ids.shape[0] % 4 == 0 and ids.shape[1] <= 64
    assert num_label_tokens(labels) == _unpacked_label_tokens(examples)
    found = []
    for r in range(ids.shape[0]):
        starts = [c for c in range(ids.shape[1]) if pos[r, c] == 0] + [ids.shape[1]]
        for a, b in zip(starts, starts[1:]):
            assert pos[r, a:b].tolist() == list(range(b - a))  # positions restart per document
            assert labels[r, a] == IGNORE_INDEX  # never predicted from the previous document
            match = [k for k, ex in enumerate(examples) if len(ex.input_ids) == b - a]
            match = [k for k in match if ids[r, a:b].tolist() == ex_ids(examples[k])]
            if match:
                k = match[0]
                found.append(k)
                assert labels[r, a + 1 : b].tolist() == examples[k].labels[1:].tolist()
            else:  # padding after the last document
                assert (ids[r, a:b] == 0).all() and (labels[r, a:b] == IGNORE_INDEX).all()
    assert sorted(found) == list(range(len(examples)))


def ex_ids(ex):
    return ex.input_ids.tolist()


# --- the key property: packing changes neither the loss nor the gradients ---------------------------------


def _batches(model_dir, seq_len: int, batch_size: int, multiple: int):
    from tests.training.sft_helpers import task_rows
    from training.data import build_examples, chat_tokenizer, collate

    tokenizer, pad_id = chat_tokenizer(model_dir, "SFT renders chat rows")
    examples, _ = build_examples(task_rows(tokenizer, batch_size, seed=3), tokenizer, seq_len)
    return collate(examples, pad_id), collate_packed(examples, pad_id, seq_len, multiple)


def _loss_and_grads(model, batch):
    from parallel.trainer import model_inputs, summed_ce

    model.zero_grad()
    logits = model(**model_inputs(batch)).logits
    loss = summed_ce(logits, batch["labels"]) / num_label_tokens(batch["labels"])
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_unpacked(model_dir, attn):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)
    model.config.use_cache = False
    plain, packed = _batches(model_dir, seq_len=96, batch_size=12, multiple=2)
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]  # several documents share a row
    assert packed["input_ids"].numel() < plain["input_ids"].numel()
    loss_a, grads_a = _loss_and_grads(model, plain)
    loss_b, grads_b = _loss_and_grads(model, packed)
    assert abs(loss_a - loss_b) < 1e-5
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_rows_without_position_ids_would_leak(model_dir):
    """The guard the test above relies on: the same packed rows with plain positions give another loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False  # as the Trainer runs it (with a cache, transformers does not unpack)
    plain, packed = _batches(model_dir, seq_len=96, batch_size=12, multiple=1)
    leaky = {k: v for k, v in packed.items() if k != "position_ids"}
    assert abs(_loss_and_grads(model, plain)[0] - _loss_and_grads(model, leaky)[0]) > 1e-4


def test_packed_step_through_the_trainer_equals_unpacked(model_dir):
    """One optimizer step of the one-process Trainer (grad_accum 2: rows split in micro-batches)."""
    from parallel import engine
    from parallel.dims import ParallelConfig
    from training.config import OptimConfig

    plain, packed = _batches(model_dir, seq_len=96, batch_size=12, multiple=2)
    results = []
    for batch in (plain, packed):
        torch.manual_seed(0)
        trainer = engine.build_trainer(model_dir, ParallelConfig(), mode="full", optim=OptimConfig(), grad_accum=2)
        metrics = engine.train_step(trainer, batch, lr=1e-3)
        params = {n: p.detach().clone() for n, p in trainer.parts[0].named_parameters()}
        results.append((metrics.loss, float(metrics.grad_norm), metrics.num_label_tokens, params))
    (loss_a, norm_a, labels_a, params_a), (loss_b, norm_b, labels_b, params_b) = results
    assert labels_a == labels_b
    assert abs(loss_a - loss_b) < 1e-5 and abs(norm_a - norm_b) < 1e-5
    for name, p in params_a.items():
        torch.testing.assert_close(params_b[name], p, atol=1e-5, rtol=1e-4, msg=name)


# --- num_epochs ------------------------------------------------------------------------------------------


def test_steps_for_epochs():
    assert steps_for_epochs(1, 30) == 30
    assert steps_for_epochs(0.1, 30) == 3  # 3.0000000000000004 is 3 steps
    assert steps_for_epochs(2.5, 7) == 18
    assert steps_for_epochs(0.01, 7) == 1


def test_num_epochs_resolves_max_steps_and_excludes_it():
    cfg = SFTStage(num_epochs=1.5, batch_size=8)
    batches = EpochBatches(_lengths(100), 8, seed=0)
    resolved = resolve_max_steps(cfg, batches.batches_per_epoch)
    assert resolved.max_steps == 18 and resolved.num_epochs == 1.5 and cfg.max_steps == 300
    plain = SFTStage(max_steps=7)
    assert resolve_max_steps(plain, 12) is plain
    for stage in (SFTStage, DPOStage, GRPOStage):
        with pytest.raises(ValidationError, match="max_steps and num_epochs are both set"):
            stage(max_steps=5, num_epochs=1)
    with pytest.raises(ValidationError, match="greater than 0"):
        SFTStage(num_epochs=0)


def test_plan_lines_give_steps_from_the_manifest_and_packing():
    from parallel.dims import ParallelConfig
    from training.stages import plan_lines, split_rows

    manifest = {"splits": {"train": 1000}, "preference": {"splits": {"train": 300}}}
    sft = SFTStage(num_epochs=2.5, batch_size=32, seq_len=96, packing=True)
    assert split_rows(sft, manifest) == 1000 and split_rows(DPOStage(), manifest) == 300
    assert split_rows(GRPOStage(), {"splits": {"train": 0}, "preference": {"splits": {"train": 300}}}) == 300
    assert split_rows(sft, {}) is None
    lines = plan_lines(sft, ParallelConfig(), 1000)
    assert lines[0].startswith("num_epochs 2.5: about 78 steps (31 per epoch from the 1000 train rows")
    assert lines[1] == "packing on: a step's sequences in rows of at most 96 tokens"
    assert plan_lines(sft, ParallelConfig(), None)[0] == (
        "num_epochs 2.5 (steps computed from the train split at stage start)"
    )
    assert plan_lines(sft, ParallelConfig(pp=2, microbatches=2))[1].startswith("packing off under pipeline")
    assert plan_lines(SFTStage(), ParallelConfig()) == []  # off by default: nothing to say
    assert plan_lines(DPOStage(), ParallelConfig()) == []
