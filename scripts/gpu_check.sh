#!/usr/bin/env bash
# GPU acceptance check, for a person with a CUDA machine (<= 10 minutes). Prints a table: GPU/CUDA/NCCL; a
# GPT-2-small pretrain for 30 steps on one GPU (tokens/s, MFU, peak memory, first step with compilation); with
# >= 2 GPUs, DDP vs one GPU (loss equality, scaling efficiency) and FSDP on a ~1.3B model (memory, tokens/s);
# engine decode tokens/s at batch 1/16/64 in bf16; one PPO rollout's generation on 1 vs N GPUs. Without CUDA it
# says so and exits 0, claiming nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"

GPUS="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
if [ "$GPUS" -eq 0 ]; then
    echo "gpu_check: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')); nothing checked."
    exit 0
fi
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
CHECK=(timeout 300 "$PY" benchmarks/gpu_check.py)
TORCHRUN=(timeout 300 "$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" benchmarks/gpu_check.py)

echo "| check | result |"
echo "|---|---|"
"$PY" benchmarks/gpu_check.py info
"${CHECK[@]}" pretrain "$OUT/one" small ddp
if [ "$GPUS" -ge 2 ]; then
    "${TORCHRUN[@]}" pretrain "$OUT/ddp" small ddp
    "$PY" benchmarks/gpu_check.py compare "$OUT/one" "$OUT/ddp" "$GPUS"
    "${TORCHRUN[@]}" pretrain "$OUT/fsdp" 1.3b fsdp
else
    echo "| DDP / FSDP | skipped: one GPU |"
fi
"${CHECK[@]}" decode
"${CHECK[@]}" rollout "$OUT"
if [ "$GPUS" -ge 2 ]; then
    "${TORCHRUN[@]}" rollout "$OUT"
fi
