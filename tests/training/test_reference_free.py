"""SimPO and ORPO stages: no reference model, the logged losses against the closed forms on the policy's
own log-probs, outputs, recipe validation; learning on the tiny task (slow)."""

import math
import os

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from parallel.dims import ParallelConfig  # noqa: E402
from parallel.engine import load_model  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.training.preference_helpers import sft_start_model, write_preference_data  # noqa: E402
from training.config import ORPOStage, SimPOStage  # noqa: E402
from training.preference import collate_pairs  # noqa: E402
from training.reference_free import run_orpo, run_simpo, setup  # noqa: E402
from training.stages import kind_of  # noqa: E402

SHORT = dict(max_steps=2, batch_size=8, grad_accum=2, seq_len=64, log_every=1, eval_every=2)
STAGES = {"simpo": (SimPOStage, run_simpo), "orpo": (ORPOStage, run_orpo)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_preference_data(tmp_path_factory.mktemp("pref"), num_train=40, num_val=10)


def _run(kind, model_dir, data_dir, out_dir, **fields):
    cls, run = STAGES[kind]
    events = []
    cfg = cls(**{**SHORT, "optim": {"lr": 5e-3, "warmup_steps": 0}, **fields})
    result = run(
        cfg,
        model_dir=model_dir,
        data_dir=data_dir,
        out_dir=out_dir,
        parallel=ParallelConfig(),
        seed=0,
        progress=events.append,
    )
    return cfg, result, [e for e in events if "max_steps" in e]


def _closed_form(kind, cfg, chosen, rejected):
    """The per-pair loss from mean log-probs, written out with math (not training.losses)."""
    if kind == "simpo":
        return [math.log1p(math.exp(-(cfg.beta * (c - r) - cfg.gamma))) for c, r in zip(chosen, rejected)]

    def log_odds(m):
        return m - math.log1p(-math.exp(m))

    return [-c + cfg.beta * math.log1p(math.exp(-(log_odds(c) - log_odds(r)))) for c, r in zip(chosen, rejected)]


def _mean_logps(model, pairs, pad_id):
    """[pairs] mean response-token log-probs of each side, from a plain forward of the model."""
    batch = collate_pairs(pairs, pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    token = torch.gather(logp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    mean = (token.sum(1) / mask.sum(1)).tolist()
    return mean[0::2], mean[1::2]


@pytest.mark.parametrize("kind", ["simpo", "orpo"])
def test_first_losses_are_the_closed_form_and_no_reference_is_held(model_dir, data_dir, tmp_path, kind):
    cfg, result, train = _run(kind, model_dir, data_dir, tmp_path)
    assert kind_of(cfg).frozen(cfg) == ()  # the planner counts no frozen copy
    s = setup(cfg, model_dir, data_dir, ParallelConfig(), seed=0)
    assert not hasattr(s, "reference") and not hasattr(s, "val_ref")
    model = load_model(model_dir, None, None).eval()  # the starting weights, as at step 1 and before training
    chosen, rejected = _mean_logps(model, s.val_pairs, s.pad_id)
    want = _closed_form(kind, cfg, chosen, rejected)
    assert result["val_before"]["val_loss"] == pytest.approx(sum(want) / len(want), rel=1e-5)
    assert result["val_before"]["val_accuracy"] == pytest.approx(
        sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)
    )
    first = [s.train_pairs[i] for i in s.batches(0)]
    chosen, rejected = _mean_logps(model, first, s.pad_id)
    want = _closed_form(kind, cfg, chosen, rejected)
    assert train[0]["loss"] == pytest.approx(sum(want) / len(want), rel=1e-5)  # both micro-batches, pair mean
    if kind == "orpo":
        assert train[0]["chosen_nll"] == pytest.approx(-sum(chosen) / len(chosen), rel=1e-5)
    assert [e["step"] for e in train] == [1, 2] and train[1]["loss"] != pytest.approx(train[0]["loss"], abs=1e-4)
    assert result["steps"] == 2 and (tmp_path / "checkpoint" / "model.safetensors").exists()
    # Efficiency (training.loop): the trained tokens are both sides of every pair; no MFU on CPU.
    sides = [
        side for n in range(2) for i in s.batches(n) for side in (s.train_pairs[i].chosen, s.train_pairs[i].rejected)
    ]
    assert result["tokens"] == sum(len(side.input_ids) for side in sides)
    assert all(e["tokens_per_s"] > 0 and 0 < e["peak_mem_gib"] < 64 and "mfu" not in e for e in train)


def test_orpo_lora_saves_adapters(model_dir, data_dir, tmp_path):
    _, result, _ = _run("orpo", model_dir, data_dir, tmp_path, mode="lora", lora={"r": 4})
    assert (tmp_path / "checkpoint" / "adapter_model.safetensors").exists()
    assert 0 < result["trainable_params"] < result["total_params"] / 5


def test_recipe_fields_and_errors(tmp_path, capsys):
    from hpc.cli import main
    from hpc.recipe import load_recipe

    raw = yaml.safe_load((ROOT / "recipes" / "tiny-dpo.yaml").read_text())
    raw["stages"][1:] = [{"kind": "simpo", "gamma": 1.0}, {"kind": "orpo", "beta": 0.2}]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    stages = load_recipe(path).stages
    assert [(type(s), s.name, s.beta) for s in stages[1:]] == [(SimPOStage, "simpo", 2.0), (ORPOStage, "orpo", 0.2)]
    raw["stages"][1:] = [
        {"kind": "simpo", "gamma": -1.0},
        {"kind": "orpo", "beta": 0.0},
        {"kind": "orpo", "name": "o2", "gamma": 1.0},
        {"kind": "dpo", "loss_type": "robust", "label_smoothing": 0.5},
    ]
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for line in ("stages.1.gamma: ", "stages.2.beta: ", "stages.3.gamma: unknown key", "stages.4.label_smoothing: "):
        assert f"\n  {line}" in err, err


# Measured: from tiny-llama after 300 SFT steps (the DPO learning test's start), these 40 SimPO steps lift
# held-out accuracy (mean log-probs, the method's own reward) 0.789 -> 0.828, the summed log-prob margin
# 1.64 -> 2.10 nats and lower the loss 0.683 -> 0.640 (189 validation pairs; the stage took 44 s on 2 CPU
# cores at load 3, 63 s at load 6). ORPO (beta 0.5, the same 40 steps) lowered the chosen NLL 0.62 -> 0.60
# but left the preference where it was (accuracy 0.789 -> 0.789); a higher lr (5e-4, 1e-3) made SimPO worse.
LEARN = dict(
    max_steps=40,
    batch_size=16,
    seq_len=96,
    eval_every=40,
    log_every=10,
    beta=2.0,
    gamma=0.5,
    optim={"lr": 2e-4, "warmup_steps": 5},
)


@pytest.mark.slow
def test_simpo_raises_heldout_preference_accuracy(tmp_path_factory, tmp_path):
    start = sft_start_model(tmp_path_factory.mktemp("start"))
    data = write_preference_data(tmp_path / "pref", num_train=1000, num_val=200)
    result = run_simpo(
        SimPOStage(**LEARN),
        model_dir=start,
        data_dir=data,
        out_dir=tmp_path / "simpo",
        parallel=ParallelConfig(),
        seed=0,
    )
    before = result["val_before"]
    assert 0.6 < before["val_accuracy"] < 0.95, before  # partly right after SFT: room to learn
    assert result["val_accuracy"] >= before["val_accuracy"] + 0.025, result
    assert result["val_logp_margin"] >= before["val_logp_margin"] + 0.3, result
    assert result["val_loss"] < before["val_loss"] - 0.02, result
