"""The whole SFT stage on a tied model under pp2 against one process: the stage's start-up layout check
(the model's config.json), per-step losses and grad norms, validation loss, the gathered checkpoint and
its export (tie_word_embeddings kept, the same logits)."""

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from parallel.dims import ParallelConfig  # noqa: E402
from parallel.distributed.launch import launch  # noqa: E402
from tests.parallel.distributed import harness as H  # noqa: E402

pytestmark = pytest.mark.slow

STAGE = dict(
    max_steps=4,
    batch_size=8,
    grad_accum=2,
    seq_len=48,
    log_every=1,
    eval_every=2,
    optim={"lr": 5e-3, "warmup_steps": 1},
)


def _sft(rank, world_size, model_dir, data_dir, out_dir, parallel):
    from training.config import SFTStage
    from training.sft import run_sft

    events = []
    result = run_sft(
        SFTStage(**STAGE, mode="full"),
        model_dir=model_dir,
        data_dir=data_dir,
        out_dir=out_dir,
        parallel=ParallelConfig(**parallel),
        seed=0,
        progress=events.append,
    )
    train = [(e["step"], e["loss"], e["grad_norm"]) for e in events if "loss" in e]
    val = [(e["step"], e["val_loss"]) for e in events if "val_loss" in e]
    return result, train, val


def test_tied_sft_under_pp_trains_and_exports_like_one_process(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from parallel.checkpoint import load_checkpoint
    from parallel.export import export_hf, max_logit_diff, probe_batch
    from parallel.tiny import build_tokenizer
    from tests.training.sft_helpers import write_task_data

    model_dir = tmp_path / "model"
    tokenizer = build_tokenizer()
    H.build_model("full", tied=True).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data_dir = write_task_data(tmp_path / "data", tokenizer, num_train=32, num_val=10)

    one = launch(_sft, 1, model_dir, data_dir, tmp_path / "one", dict(), timeout=600)[0]
    pp = launch(_sft, 2, model_dir, data_dir, tmp_path / "pp2", dict(pp=2, microbatches=2), timeout=600)
    for result, train, val in pp:
        assert [t[0] for t in train] == [1, 2, 3, 4] and [v[0] for v in val] == [0, 2, 4]
        assert max(abs(a[1] - b[1]) for a, b in zip(train, one[1])) < 1e-5
        assert [t[2] for t in train] == pytest.approx([t[2] for t in one[1]], rel=1e-5)
        assert max(abs(a[1] - b[1]) for a, b in zip(val, one[2])) < 1e-5
        assert (result["total_params"], result["trainable_params"]) == (
            one[0]["total_params"],
            one[0]["trainable_params"],
        )  # the shared weight counted once

    export = export_hf(model_dir, tmp_path / "pp2" / "checkpoint", tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["tie_word_embeddings"] is True
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    reference = load_checkpoint(tmp_path / "one" / "checkpoint")
    diff = max_logit_diff(reference, exported, probe_batch(tokenizer))
    print(f"tied sft pp2: export check {export['max_abs_logit_diff']:.2e}, logits vs one process {diff:.2e}")
    assert diff < 1e-4
