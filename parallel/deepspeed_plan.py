"""Per-rank memory of a DeepSpeed layout (parallel.engine: deepspeed), on the accelerator and on the host,
with and without offload; activations as parallel.planner models them (the same model code runs).

What DeepSpeed holds, per rank, for P parameters of which T train, w bytes per weight (2 under bf16, 4 in
fp32) and dp data-parallel ranks:
- weights: P x w, split over dp at ZeRO-3; ZeRO-3 also holds the gathered working set (the planner's:
  the unsharded ends plus two layers);
- master weights: T x 4 in fp32 under bf16 (the fp32 weights are their own master), split over dp at ZeRO >= 1;
- gradients: T x w, split over dp at ZeRO >= 2;
- Adam moments: T x 8, split over dp at ZeRO >= 1.
offload.optimizer moves the master weights, the moments and an fp32 gradient partition (T x 16 / dp) to
the host, the gradients leaving the accelerator bucket by bucket as they are reduced; offload.params
(ZeRO-3) moves the weight shards (P x w / dp) there too. Not modelled: pinned staging buffers, DeepSpeed's
bucket sizes (reduce_bucket_size, prefetch), NVMe swap buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from parallel.planner import MemoryEstimate


@dataclass(frozen=True)
class DeepSpeedEstimate:
    gpu: MemoryEstimate
    host: int  # bytes of host memory (or NVMe) per rank for what was offloaded


def estimate(
    native: MemoryEstimate,
    *,
    total_params: int,
    trainable_params: int,
    zero: int,
    dp: int,
    bf16: bool,
    offload_optimizer: str = "none",
    offload_params: str = "none",
) -> DeepSpeedEstimate:
    """DeepSpeed's per-rank bytes, from the native estimate of the same model and layout (its activations,
    frozen models and ZeRO-3 working set)."""
    w = 2 if bf16 else 4
    P, T = total_params, trainable_params
    opt_split = dp if zero >= 1 else 1
    weights = P * w // (dp if zero == 3 else 1)
    master = (T * 4 if bf16 else 0) // opt_split
    grads = T * w // (dp if zero >= 2 else 1)
    moments = T * 8 // opt_split
    gathered = native.gathered * w // 2 if zero == 3 else 0
    host = 0
    if offload_optimizer != "none":
        host += (T * 4 + T * 8 + T * 4) // opt_split  # master, moments, fp32 gradient partition
        # gradients leave the accelerator bucket by bucket as they are reduced (bucket sizes not modelled)
        master = moments = grads = 0
    if offload_params != "none":
        host += weights
        weights = 0
    gpu = replace(native, params=weights, gathered=gathered, grads=grads, optimizer=master + moments)
    return DeepSpeedEstimate(gpu=gpu, host=host)
