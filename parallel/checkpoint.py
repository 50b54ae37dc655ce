"""Hugging Face checkpoints of a trained model: a full model directory or a peft adapter directory.

Both hold the tokenizer and `hpcft_checkpoint.json` ({"mode", "base_model_dir"}), so a checkpoint
can be loaded without knowing how it was trained. A model trained under a multi-process layout is
first gathered into one full state dict on rank 0 (`gather_full_state_dict`) and saved from there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

MANIFEST = "hpcft_checkpoint.json"


def save_checkpoint(model, tokenizer, out_dir: Path, *, base_model_dir: Path, mode: str) -> Path:
    """Write the model (full) or adapter (lora, qlora) with its tokenizer; returns out_dir."""
    if mode not in ("full", "lora", "qlora"):
        raise ValueError(f"checkpoint mode must be 'full', 'lora' or 'qlora', not {mode!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # peft's save_pretrained writes only the adapter weights and adapter_config.json.
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    manifest = {"mode": mode, "base_model_dir": str(Path(base_model_dir).resolve())}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def read_manifest(checkpoint_dir: Path) -> dict:
    path = Path(checkpoint_dir) / MANIFEST
    if not path.exists():
        raise ValueError(f"{checkpoint_dir} is not an hpcft checkpoint (no {MANIFEST})")
    return json.loads(path.read_text())


def load_checkpoint(checkpoint_dir: Path, base_model_dir: Path | None = None):
    """The trained model in fp32 on CPU, in eval mode: a plain model (full) or base + adapter unmerged (lora;
    qlora adapters go on the full-precision base, as QLoRA adapters are merged for serving).

    base_model_dir overrides the manifest's path, for a run directory that has moved.
    """
    from transformers import AutoModelForCausalLM

    manifest = read_manifest(checkpoint_dir)
    if manifest["mode"] == "full":
        return AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()
    from peft import PeftModel

    base_dir = Path(base_model_dir or manifest["base_model_dir"])
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, checkpoint_dir).eval()


def gather_full_state_dict(trainer) -> dict[str, torch.Tensor] | None:
    """The whole model's unsharded state dict on CPU at global rank 0, None elsewhere (collective).

    Pipeline stage modules keep the global parameter names, so the stages' dicts merge by key.
    Tensors are un-sharded one at a time and kept only by each stage's first rank, so no rank ever
    holds a second full copy of its stage on the accelerator (full_state_dict=True would).
    A tied weight is returned once, under the embedding's name (engine.rebuild_model ties lm_head to it);
    under pp the last stage's copy is checked to equal the first stage's.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor

    if hasattr(trainer, "full_state_dict"):  # another engine's own gathering (parallel.deepspeed_engine)
        return trainer.full_state_dict()
    mesh = trainer.mesh
    leader = all(mesh[axis].get_local_rank() == 0 for axis in ("dp_replicate", "dp_shard", "tp"))
    state = {}
    for part in trainer.parts:
        for name, value in get_model_state_dict(part).items():
            if isinstance(value, DTensor):
                value = value.full_tensor()  # collective over the part's dp/tp mesh
            if leader:
                state[name] = value.detach().to("cpu", copy=True)
    if trainer.dims.pp > 1 and leader:
        # The stages' first ranks form one pp group, and global rank 0 is its first member.
        group = mesh["pp"].get_group()
        stages = [None] * trainer.dims.pp if dist.get_rank() == 0 else None
        dist.gather_object(state, stages, dst=dist.get_global_rank(group, 0), group=group)
        if stages is not None:
            state = {name: value for stage in stages for name, value in stage.items()}
    from parallel.engine import is_leader

    if not is_leader():
        return None
    return _drop_tied_alias(state, getattr(trainer, "tied_names", None))


TIED_COPY_TOLERANCE = 1e-6


def _drop_tied_alias(state: dict[str, torch.Tensor], names: tuple[str, str] | None) -> dict[str, torch.Tensor]:
    """`state` with a tied lm_head's weight dropped, after checking it equals the embedding's (under pp two
    stages trained a copy each; summed gradients keep them equal, so a difference is a bug)."""
    if names is None or names[1] not in state:
        return state
    embed, head = names
    diff = float((state[embed].float() - state[head].float()).abs().max())
    if diff > TIED_COPY_TOLERANCE:
        raise RuntimeError(
            f"tied weights: the last pipeline stage's {head} differs from {embed} by {diff:.3g}; "
            "the copies were not trained alike"
        )
    return {k: v for k, v in state.items() if k != head}
