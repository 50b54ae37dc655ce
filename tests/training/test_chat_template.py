"""A base model (a tokenizer without a chat template) trained in a named format: the data stage renders the
rows with it and records it in the manifest, SFT trains and saves the model with it, and `hpcft chat` /
`generate` render with it."""

import hashlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoTokenizer  # noqa: E402

from data_tools.config import DataConfig  # noqa: E402
from data_tools.splits import read_split  # noqa: E402
from data_tools.stage import run_data  # noqa: E402
from data_tools.templates import NAMED  # noqa: E402
from hpc.commands import chat_template, until_stop  # noqa: E402
from parallel.dims import ParallelConfig  # noqa: E402
from parallel.tiny import build_tiny_model  # noqa: E402
from training.config import SFTStage  # noqa: E402
from training.sft import run_sft  # noqa: E402


def test_a_base_model_trains_in_the_chosen_template(tmp_path):
    base = build_tiny_model("micro-llama", tmp_path / "base", seed=0)
    (base / "chat_template.jinja").unlink()  # a base model's tokenizer: no template of its own
    assert AutoTokenizer.from_pretrained(base).chat_template is None
    run_dir = tmp_path / "run"
    data_dir = run_dir / "stages" / "data"
    cfg = DataConfig(sources=[{"generate": "tiny-tasks", "num_rows": 60}], tasks=1, format={"chat_template": "llama3"})
    manifest = run_data(cfg, base, data_dir, base_dir=tmp_path)
    template = NAMED["llama3"]
    assert manifest["tokenizer"]["chat_template"] == "llama3"
    assert manifest["tokenizer"]["chat_template_sha256"] == hashlib.sha256(template.encode()).hexdigest()
    assert all(
        r["text"].startswith("<|start_header_id|>user<|end_header_id|>\n\n") for r in read_split(data_dir, "train")
    )

    out = run_dir / "stages" / "sft"
    stage = SFTStage(max_steps=2, batch_size=4, seq_len=256, eval_every=2, log_every=1, checkpoint_every=0)
    result = run_sft(stage, model_dir=base, data_dir=data_dir, out_dir=out, parallel=ParallelConfig(), seed=0)
    assert result["steps"] == 2 and result["val_loss"] > 0
    assert AutoTokenizer.from_pretrained(out / "checkpoint").chat_template == template
    assert chat_template(out / "checkpoint", None) == template  # a model directory alone
    assert chat_template(base, run_dir) == template  # a run: the data stage's choice


def test_answers_end_before_the_stop_token():
    # a marker the tokenizer has no special token for stops generation at its first token, which (with the
    # padding after it) is no part of the answer
    assert until_stop([55, 56, 9, 3, 3], [9, 2]) == [55, 56]
    assert until_stop([55, 56], [9]) == [55, 56] and until_stop([9], [9]) == []
