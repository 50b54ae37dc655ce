"""The KTO stage: mismatched rows, the logged and held-out losses against the closed form on plain forwards
of the reference and the trained policy, outputs; learning on the tiny task (slow)."""

import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from parallel.dims import ParallelConfig  # noqa: E402
from parallel.engine import load_model  # noqa: E402
from tests.training.preference_helpers import sft_start_model, write_unpaired_data  # noqa: E402
from training.config import KTOStage  # noqa: E402
from training.data import collate  # noqa: E402
from training.kto import run_kto, setup  # noqa: E402
from training.losses import IGNORE_INDEX  # noqa: E402
from training.preference import build_pairs  # noqa: E402
from training.stages import kind_of  # noqa: E402

SHORT = dict(max_steps=2, batch_size=8, grad_accum=2, seq_len=64, log_every=1, eval_every=2, beta=0.5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_unpaired_data(tmp_path_factory.mktemp("kto"), num_train=40, num_val=10)


def _summed_logps(model, examples, pad_id) -> list[float]:
    """Summed label-token log-probs of each example, from a plain forward of the model."""
    batch = collate(examples, pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    token = torch.gather(logp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return token.sum(1).tolist()


def _closed_form(cfg, policy, reference, policy_kl, reference_kl, desirable) -> float:
    """The KTO loss written out with math (not training.losses)."""
    z0 = max(0.0, sum(p - r for p, r in zip(policy_kl, reference_kl)) / len(policy_kl))
    losses = []
    for p, r, good in zip(policy, reference, desirable):
        gain = (p - r - z0) if good else (z0 - (p - r))
        weight = cfg.desirable_weight if good else cfg.undesirable_weight
        losses.append(weight * (1 - 1 / (1 + math.exp(-cfg.beta * gain))))
    return sum(losses) / len(losses)


def test_mismatched_rows_pair_each_prompt_with_the_next_completion(model_dir, data_dir):
    s = setup(KTOStage(**SHORT), model_dir, data_dir, ParallelConfig(), seed=0)
    rows = s.val_rows
    for i in range(len(rows)):
        row, mismatched, following = rows[i].chosen, rows[i].rejected, rows[(i + 1) % len(rows)].chosen
        start = int(np.argmax(np.asarray(row.labels) != IGNORE_INDEX))
        next_start = int(np.argmax(np.asarray(following.labels) != IGNORE_INDEX))
        assert list(mismatched.input_ids[:start]) == list(row.input_ids[:start])  # this row's prompt
        assert list(mismatched.input_ids[start:]) == list(following.input_ids[next_start:])  # the next completion
        assert list(mismatched.labels[start:]) == list(following.labels[next_start:])
        assert set(np.asarray(mismatched.labels[:start]).tolist()) == {IGNORE_INDEX}
    assert 0 < rows.desirable.sum() < len(rows)


def test_losses_are_the_closed_form_with_the_reference_per_step(model_dir, data_dir, tmp_path):
    cfg = KTOStage(**SHORT, desirable_weight=1.5, undesirable_weight=0.75, optim={"lr": 5e-3, "warmup_steps": 0})
    events = []
    result = run_kto(
        cfg,
        model_dir=model_dir,
        data_dir=data_dir,
        out_dir=tmp_path,
        parallel=ParallelConfig(),
        seed=0,
        progress=events.append,
    )
    assert kind_of(cfg).frozen(cfg) == ("reference",) and not cfg.precompute_reference
    train = [e for e in events if "loss" in e and "max_steps" in e]
    # step 1: the policy is the reference, every log-ratio 0 and z0 = 0: a row loses weight x 1/2
    first = train[0]
    want = (1.5 * first["desirable_share"] + 0.75 * (1 - first["desirable_share"])) / 2
    assert first["loss"] == pytest.approx(want, rel=1e-5) and first["kl"] == pytest.approx(0.0, abs=1e-5)
    s = setup(cfg, model_dir, data_dir, ParallelConfig(), seed=0)
    reference = load_model(model_dir, None, None).eval()
    trained = load_model(tmp_path / "checkpoint", None, None).eval()
    rows = [s.val_rows[i] for i in range(len(s.val_rows))]
    args = [
        _summed_logps(model, [getattr(p, side) for p in rows], s.pad_id)
        for side in ("chosen", "rejected")
        for model in (trained, reference)
    ]
    policy, ref, policy_kl, ref_kl = args
    assert max(abs(a - b) for a, b in zip(policy, ref)) > 1e-3  # training moved the policy
    want = _closed_form(cfg, policy, ref, policy_kl, ref_kl, s.val_rows.desirable.tolist())
    assert result["val_loss"] == pytest.approx(want, rel=1e-4)
    assert result["val_before"]["val_loss"] == pytest.approx(
        _closed_form(cfg, ref, ref, ref_kl, ref_kl, s.val_rows.desirable.tolist()), rel=1e-5
    )
    assert (tmp_path / "result.json").is_file() and result["desirable_weight"] == 1.5
    assert result["data"]["train"]["pairs"] == len(s.train_rows)


# Measured 2026-12-06 on tiny-llama after 300 SFT steps (the DPO learning test's start), 1000 tiny pairs
# unpaired for training, the 180 clean held-out pairs of the DPO test: 40 KTO steps raised the mean
# per-token log-prob margin chosen - rejected 0.447 -> 0.580, the held-out reward margin (desirable -
# undesirable rows) 0 -> 0.25 and the share of pairs with a positive margin only 0.789 -> 0.806. Longer
# runs lowered that share (60 steps: 0.76; beta 0.1: 0.73; beta 1: 0.76; lr 5e-4: 0.68) while the margins
# kept rising: both kinds of completion lose likelihood, the undesirable ones more.
LEARN = dict(
    max_steps=40,
    batch_size=16,
    seq_len=96,
    eval_every=40,
    log_every=20,
    beta=0.5,
    precompute_reference=True,
    optim={"lr": 2e-4, "warmup_steps": 10},
)


def _pair_margins(model, pairs, pad_id) -> torch.Tensor:
    """Mean label-token log-prob of chosen minus rejected, per held-out pair."""
    chosen = _summed_logps(model, [p.chosen for p in pairs], pad_id)
    rejected = _summed_logps(model, [p.rejected for p in pairs], pad_id)
    tokens = [[int((np.asarray(ex.labels[1:]) != IGNORE_INDEX).sum()) for ex in (p.chosen, p.rejected)] for p in pairs]
    return torch.tensor([c / n_c - r / n_r for c, r, (n_c, n_r) in zip(chosen, rejected, tokens)])


@pytest.mark.slow
def test_kto_raises_heldout_preference_margin(tmp_path_factory, tmp_path):
    from transformers import AutoTokenizer

    from data_tools.synth import generate_tiny_preferences

    start = sft_start_model(tmp_path_factory.mktemp("start"))
    data = write_unpaired_data(tmp_path / "kto", num_train=1000, num_val=200)
    result = run_kto(
        KTOStage(**LEARN), model_dir=start, data_dir=data, out_dir=tmp_path / "kto", parallel=ParallelConfig(), seed=0
    )
    tokenizer = AutoTokenizer.from_pretrained(start)
    # the held-out pairs the validation rows came from (the DPO learning test's held-out set)
    pairs, _ = build_pairs(generate_tiny_preferences(200, 10_000), tokenizer, LEARN["seq_len"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    before = _pair_margins(load_model(start, None, None).eval(), pairs, pad_id)
    after = _pair_margins(load_model(tmp_path / "kto" / "checkpoint", None, None).eval(), pairs, pad_id)
    accuracy = (float((before > 0).float().mean()), float((after > 0).float().mean()))
    print(f"held-out pair accuracy {accuracy}, mean margin {float(before.mean()):.3f} -> {float(after.mean()):.3f}")
    print(result["val_before"], {k: v for k, v in result.items() if k.startswith("val_")})
    # the chosen answers gained on the rejected ones on average; accuracy barely moves (LEARN's comment)
    assert float(after.mean()) > float(before.mean()) + 0.08, accuracy
    assert accuracy[1] >= accuracy[0] - 0.03, accuracy  # no collapse (measured 0.789 -> 0.806 on 180 pairs)
    assert result["val_reward_margin"] > result["val_before"]["val_reward_margin"] + 0.15, result
    assert result["val_loss"] < result["val_before"]["val_loss"] - 0.01, result


def test_recipe_checks_name_the_field_and_both_row_kinds():
    from hpc.recipe import RecipeError, load_recipe
    from tests.conftest import ROOT

    dpo_recipe = ROOT / "recipes" / "tiny-dpo.yaml"
    kto = "stages.1={kind: kto, precompute_reference: true, desirable_weight: 1.2}"
    unpaired = "data.sources=[{generate: tiny-tasks}, {generate: tiny-unpaired}]"
    recipe = load_recipe(dpo_recipe, [kto, unpaired])
    assert recipe.stages[1].kind == "kto" and recipe.stages[1].desirable_weight == 1.2

    def problems(overrides):
        with pytest.raises(RecipeError) as err:
            load_recipe(dpo_recipe, overrides)
        return err.value.problems

    assert problems([kto, unpaired, "stages.1.undesirable_weight=0"]) == [
        "stages.1.undesirable_weight: Input should be greater than 0"
    ]
    (line,) = problems([kto])  # the recipe's sources give chat rows and pairs
    assert line.startswith("stages.1: the kto stage reads unpaired rows") and "preference rows" in line
    (line,) = problems([unpaired])  # its dpo stage
    assert line.startswith("stages.1: the dpo stage reads preference rows") and "unpaired rows" in line
    assert problems([kto, unpaired, "stages.1.precompute_reference=false", "parallel.dp_shard=2"]) == [
        "stages.1.precompute_reference: must be true under several processes (the reference log-probs are "
        "computed before the model is laid out)"
    ]
