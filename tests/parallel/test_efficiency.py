"""FLOPs per token against a hand count, the device peak table, MFU and the live figures of an SFT run."""

import pytest
import torch
from transformers import LlamaConfig

from parallel.efficiency import PEAK_BF16_FLOPS, device_peak_flops, flops_per_token, matmul_params, mfu, peak_flops

TINY = LlamaConfig(
    vocab_size=100,
    hidden_size=16,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


def test_flops_per_token_by_hand():
    # Per layer: q 16x16, k and v 16x8 each (2 kv heads of 4 dims), o 16x16, gate/up/down 16x40.
    per_layer = 256 + 128 + 128 + 256 + 3 * 640
    assert matmul_params(TINY) == 2 * per_layer + 100 * 16  # + the (tied) head's matmul, not the lookup
    n = 2 * 2688 + 1600
    assert flops_per_token(TINY, 32) == 6 * n + 12 * 2 * 16 * 32
    # LoRA: the frozen base has no weight gradient (4 per weight), the adapters the full 6.
    assert flops_per_token(TINY, 32, trainable_params=500) == 4 * n + 6 * 500 + 12 * 2 * 16 * 32


def test_forward_only_and_scalar_head_flops_by_hand():
    """A frozen reference or reward model scoring: 2 per weight and QK^T + AV forward (4 x layers x hidden x seq);
    a reward model's or critic's score head has 1 output instead of the vocabulary."""
    n = 2 * 2688 + 1600
    assert flops_per_token(TINY, 32, forward_only=True) == 2 * n + 4 * 2 * 16 * 32
    assert matmul_params(TINY, head_outputs=1) == 2 * 2688 + 16
    assert flops_per_token(TINY, 32, head_outputs=1) == 6 * (2 * 2688 + 16) + 12 * 2 * 16 * 32
    assert flops_per_token(TINY, 32, forward_only=True, head_outputs=1) == 2 * (2 * 2688 + 16) + 4 * 2 * 16 * 32
    # DPO with the reference in the step: one training pass and one forward = 8 per weight.
    both = flops_per_token(TINY, 32) + flops_per_token(TINY, 32, forward_only=True)
    assert both == 8 * n + 16 * 2 * 16 * 32


def test_llama_1b_matches_the_gpu_baseline_note():
    """../shared/notes/gpu-baseline.md: 8.22 GFLOP/token for full fine-tuning of the Llama-3.2-1B shape."""
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    assert flops_per_token(config, 2048) / 1e9 == pytest.approx(8.22, abs=0.005)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A10G", 70e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
        ("AMD Instinct MI250X", 191.5e12),
        ("AMD Instinct MI300X", 1307e12),
        ("NVIDIA T4", None),
    ],
)
def test_peak_table_lookup(name, peak):
    assert peak_flops(name) == peak


def test_cpu_reports_no_peak_and_mfu_needs_one():
    assert device_peak_flops(torch.device("cpu")) is None
    assert mfu(1000.0, 1e9, None) is None
    assert mfu(50_000.0, 8.22e9, PEAK_BF16_FLOPS["H200"], num_devices=2) == pytest.approx(50_000 * 8.22e9 / 1978e12)
