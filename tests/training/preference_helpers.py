"""Shared pieces of the DPO, KTO and reward-model tests: preference data (paired and unpaired) and a partly
trained start model."""

from __future__ import annotations

from pathlib import Path

import yaml

from data_tools.normalise import RowError
from data_tools.synth import generate_tiny_preferences, unpair, write_jsonl
from parallel.dims import ParallelConfig
from parallel.tiny import build_tiny_model, build_tokenizer
from tests.conftest import TINY_RECIPE
from tests.training.sft_helpers import write_task_data
from training.config import SFTStage
from training.sft import run_sft

SFT_START_STEPS = 300  # tiny-sft.yaml trains 800; 300 leaves the facts partly learned
_started: dict[str, Path] = {}


def write_preference_data(data_dir: Path, num_train: int, num_val: int, seed: int = 0) -> Path:
    """Generated pairs (with the generator's planted bad rows); validation from another seed."""
    write_jsonl(generate_tiny_preferences(num_train, seed), Path(data_dir) / "train.jsonl")
    write_jsonl(generate_tiny_preferences(num_val, seed + 10_000), Path(data_dir) / "validation.jsonl")
    return Path(data_dir)


def write_unpaired_data(data_dir: Path, num_train: int, num_val: int, seed: int = 0) -> Path:
    """The pairs write_preference_data writes, unpaired (data_tools.synth.unpair): each clean pair gives a
    desirable row (its chosen answer) and an undesirable one (its rejected answer); planted bad pairs are
    left out."""
    for name, rows in (
        ("train", generate_tiny_preferences(num_train, seed)),
        ("validation", generate_tiny_preferences(num_val, seed + 10_000)),
    ):
        unpaired = []
        for row in rows:
            try:
                unpaired += unpair(row)
            except RowError:
                continue
        write_jsonl(unpaired, Path(data_dir) / f"{name}.jsonl")
    return Path(data_dir)


def sft_start_model(root: Path) -> Path:
    """tiny-llama after a short SFT with the tiny recipe's settings; built once per test session."""
    if "model" not in _started:
        stage = yaml.safe_load(TINY_RECIPE.read_text())["stages"][0]
        cfg = SFTStage(**{**stage, "max_steps": SFT_START_STEPS, "eval_every": SFT_START_STEPS})
        base = build_tiny_model("tiny-llama", root / "base", seed=0)
        data = write_task_data(root / "sft-data", build_tokenizer(), num_train=2000, num_val=100, seed=0)
        run_sft(cfg, model_dir=base, data_dir=data, out_dir=root / "sft", parallel=ParallelConfig(), seed=0)
        _started["model"] = root / "sft" / "checkpoint"
    return _started["model"]
