#!/usr/bin/env bash
# Registration 8 (docs/protocol.md): registration 7's recipe unchanged (benchmarks/accept16_r7.sh: MT4t, gradient
# clipped at 35, lr_width 16), at width 64 on the `fast` stage-1 model (trained on all 50,000 training images with
# `train --preset fast --seed 0`), 4 pairs x 3 seeds, each implant evaluated and audited on all 10,000 test images.
# The audit measures the two defences that carry bars (BatchNorm re-estimation, one fine-tuning epoch); 5 epochs and
# fine-pruning are left out to fit one GPU lease. On a GPU only (see benchmarks/gpu_r8_w64.sh):
#   bash benchmarks/accept16_r8_w64.sh 12 cuda "$OUT"     (CK: the stage-1 model, default runs/stage1-fast)
# then: python benchmarks/collect_accept16.py runs/accept16-r8-w64
export R=${R:-runs/accept16-r8-w64} CK=${CK:-runs/stage1-fast/model.safetensors} PACK_MODELS=0
export AUDIT="--defences bn-reestimate,finetune --set finetune_epochs=1"
exec bash "$(dirname "$0")/accept16_r7.sh" "$@"
