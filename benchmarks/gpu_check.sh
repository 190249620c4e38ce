#!/usr/bin/env bash
# The GPU paths once each, for a machine with one CUDA GPU (about 5 minutes); not run in CI.
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1) train.strategy=fsdp with bf16 on CUDA for the gpt2-small config, a few steps (1 process under
#    torchrun: FSDP2 on one GPU); 2) the same config under DDP with bf16; 3) CUDA decode from the
#    FSDP run's consolidated checkpoint; 4) int8 and int4 quantized, decoded on CUDA.
set -euo pipefail
OUT=${1:-${OUT:-/tmp/llmcli-gpu-check}}
PY=${PYTHON:-python}
mkdir -p "$OUT"
STEPS=(train.max_steps=20 train.eval_interval=20 train.eval_batches=2 train.log_interval=5 train.mixed_precision=bf16)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -m torch.distributed.run --nproc_per_node 1 -m llmcli train -c configs/gpt2-small.yaml --out "$OUT/fsdp" \
    --overwrite train.strategy=fsdp "${STEPS[@]}" 2>&1 | tee "$OUT/train-fsdp.log"
$PY -m llmcli train -c configs/gpt2-small.yaml --out "$OUT/ddp" --overwrite "${STEPS[@]}" 2>&1 | tee "$OUT/train-ddp.log"
$PY -m llmcli generate "$OUT/fsdp" "ROMEO:" --max-new-tokens 64 --device cuda --seed 1 2>&1 | tee "$OUT/generate.log"
for method in int8 int4; do
    $PY -m llmcli quantize "$OUT/fsdp" --method $method --out "$OUT/fsdp-$method" 2>&1 | tee "$OUT/quantize-$method.log"
    $PY -m llmcli generate "$OUT/fsdp-$method" "ROMEO:" --max-new-tokens 64 --device cuda --seed 1 \
        2>&1 | tee "$OUT/generate-$method.log"
done
