#!/usr/bin/env bash
# hpcft against plain transformers/peft on one GPU, one command: bench/gpu.sh [--dry-run] [OUT.json]
#
# Runs bench.sft_vs_hf on the Llama-3.2-1B shape (random weights, batch 8 x 2048 tokens, 12 steps, 3 warm-up):
#   full fine-tuning: HF Trainer eager, HF Trainer + torch.compile, hpcft, hpcft + per-block compile
#   LoRA r=16 all-linear: HF Trainer + peft, hpcft
# each arm in a fresh process (about 6-8 minutes on one H100/H200), then bench.defaults on the same shape at
# batch 4 (per-block compile, selective/full activation checkpointing and fused AdamW against the baseline:
# the CUDA rules of parallel.defaults, about 3 minutes), and writes one JSON (default bench-gpu.json): per
# arm tokens/s, MFU, peak memory, step times and losses, the hpcft/HF ratios, and the defaults' measurements.
# --dry-run: the same script on CPU with a tiny shape and without the compile arms (7 min at load 12), to
# check the script before a GPU is lent. PYTHON picks the interpreter (default .venv/bin/python, else
# python3); it needs torch, transformers, peft, accelerate, pydantic and numpy (not mlflow, datatrove or lm-eval).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DRY=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1
    shift
fi
OUT=${1:-bench-gpu.json}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if [ "$DRY" = 1 ]; then
    SIZE=(--shape small --vocab 2048 --steps 3 --warmup 1 --batch-size 2 --seq-len 64 --threads 2)
    FULL_ARMS=hf,hpcft
    DEFAULTS=(--device cpu --vocab 2048 --steps 3 --warmup 1 --batch-size 2 --seq-len 64 --threads 2 --repeat 1
        --arms base,ac-selective,ac-full,fused,optim)
else
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: no GPU (use --dry-run)")'
    SIZE=(--shape llama-1b --steps 12 --warmup 3)
    FULL_ARMS=hf,hf-compile,hpcft,hpcft-compile
    DEFAULTS=(--device cuda --shape llama-1b --batch-size 4 --steps 8 --warmup 3 --repeat 1)
fi

echo "== full fine-tuning"
"$PY" -m bench.sft_vs_hf "${SIZE[@]}" --arms "$FULL_ARMS" --json "$TMP/full.json"
echo "== LoRA"
"$PY" -m bench.sft_vs_hf "${SIZE[@]}" --lora --arms hf,hpcft --json "$TMP/lora.json"

echo "== defaults (parallel.defaults' rules on this device)"
"$PY" -m bench.defaults "${DEFAULTS[@]}" --json "$TMP/defaults.json"

"$PY" - "$TMP/full.json" "$TMP/lora.json" "$OUT" "$TMP/defaults.json" <<'PYEOF'
import json, sys

full, lora = (json.load(open(p)) for p in sys.argv[1:3])
arms = {f"full/{k}": v for k, v in full["arms"].items()} | {f"lora/{k}": v for k, v in lora["arms"].items()}
ratios = {}
for mode in ("full", "lora"):
    ours = arms[f"{mode}/hpcft"]
    for base in ("hf", "hf-compile"):
        if f"{mode}/{base}" in arms:
            ratios[f"{mode}: hpcft/{base} tokens/s"] = ours["tokens_per_s"] / arms[f"{mode}/{base}"]["tokens_per_s"]
            ratios[f"{mode}: hpcft/{base} peak memory"] = ours["peak_mem_bytes"] / arms[f"{mode}/{base}"]["peak_mem_bytes"]
out = {"spec": full["spec"], "device": arms["full/hf"]["device"], "arms": arms, "ratios": ratios}
out["defaults"] = json.load(open(sys.argv[4]))
json.dump(out, open(sys.argv[3], "w"), indent=1)
for name, r in arms.items():
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    print(f"{name:20s} {r['tokens_per_s']:10,.0f} tok/s  MFU {mfu:>6s}  peak {r['peak_mem_bytes'] / 2**30:6.2f} GiB")
for name, value in ratios.items():
    print(f"{name:40s} {value:.2f}")
print(f"wrote {sys.argv[3]}")
PYEOF
