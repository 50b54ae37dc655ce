"""Training efficiency figures: model FLOPs per token, the device's bf16 peak, MFU, and peak memory.

FLOPs per token (the PaLM convention): a matmul weight costs 2 FLOPs per token forward and 4 backward
(input and weight gradients), so 6 N for the N weights of the decoder's matmuls plus the LM head (the
embedding lookup is no matmul; a tied head still is one). A frozen weight (LoRA's base) has no weight
gradient: 4 per token. Attention adds 12 x layers x hidden x seq (QK^T and AV, forward and backward, the
causal half not discounted), as in ../shared/notes/gpu-baseline.md. A frozen model that only scores (a
reference or reward model) runs the forward third: 2 per weight and 4 x layers x hidden x seq.
"""

from __future__ import annotations

import resource
import sys

import torch

# bf16 dense tensor-core peaks (datasheets, no sparsity), keyed by a substring of
# torch.cuda.get_device_name; the first match wins, so more specific names come first.
PEAK_BF16_FLOPS = {
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,  # 40 GB and 80 GB, SXM and PCIe
    "L40S": 362e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,  # with fp32 accumulation
    "MI300X": 1307e12,
    "MI250X": 191.5e12,  # per GCD: torch sees each of the package's two dies as one device
}


def peak_flops(device_name: str) -> float | None:
    """The bf16 dense peak FLOP/s of a device named like torch.cuda.get_device_name; None when unknown."""
    for key, flops in PEAK_BF16_FLOPS.items():
        if key.lower() in device_name.lower():
            return flops
    return None


def device_peak_flops(device: torch.device) -> float | None:
    """Peak of this process's device; None on CPU (no meaningful peak) or an unlisted GPU."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device))


def matmul_params(config, head_outputs: int | None = None) -> int:
    """Weights of a Llama-family decoder's matmuls per token (projections of every layer + the head: the LM
    head's vocab_size outputs, or head_outputs, e.g. 1 for a reward model's or critic's scalar score)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    attention = h * q + 2 * h * kv + q * h
    mlp = 3 * h * config.intermediate_size
    head = config.vocab_size if head_outputs is None else head_outputs
    return layers * (attention + mlp) + head * h


def flops_per_token(
    config,
    seq_len: int,
    *,
    trainable_params: int | None = None,
    forward_only: bool = False,
    head_outputs: int | None = None,
) -> float:
    """Training FLOPs per token of a Llama-family model at `seq_len`. trainable_params: None for full
    fine-tuning; else the adapters' parameter count (LoRA), the base weights then frozen. forward_only: a
    frozen model's forward pass alone (a reference or reward model scoring). head_outputs: see matmul_params."""
    n = matmul_params(config, head_outputs)
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    if forward_only:
        return 2 * n + attention // 3
    if trainable_params is None:
        return 6 * n + attention
    return 4 * n + 6 * trainable_params + attention


def mfu(tokens_per_s: float, flops_per_tok: float, peak: float | None, num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' summed peak; None without a peak."""
    if not peak:
        return None
    return tokens_per_s * flops_per_tok / (peak * num_devices)


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory so far: allocated device memory on a GPU, else the resident set high-water."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
