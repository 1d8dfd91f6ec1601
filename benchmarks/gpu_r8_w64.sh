#!/usr/bin/env bash
# Registration 8 on a GPU (docs/protocol.md), one device call carrying `.gpu` (the data; ignored by git):
#   bash benchmarks/gpu_r8_w64.sh "$OUT"
# Trains the `fast` stage-1 model (seed 0, all 50,000 training images; its weights come back as three 15 MB parts,
# benchmarks/gpu_stage1_fast.sh), then runs the 12 test-set cells side by side. Run again on the same warm machine,
# it skips what is finished and resumes a cut implant from its last epoch (a cut cell has read no test image).
# `.gpu` once, here (19 MB; the 62 MB zip is too near the device tool's 64 MiB): unzip -q ../shared/data/cifar10-jpeg.zip
#   -d /tmp/c && mkdir -p .gpu && tar -cJf .gpu/cifar.tar.xz -C /tmp/c train test
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_r8_w64.sh OUT}
mkdir -p /tmp/cifar "$out" && [ -n "$(ls /tmp/cifar)" ] || tar -xJf .gpu/cifar.tar.xz -C /tmp/cifar
export PYTHONPATH=$PWD/src CAMBACKDOOR_DATA=/tmp/cifar CAMBACKDOOR_CACHE=/tmp/cache PYTHONUNBUFFERED=1
s=$(date +%s)
bash benchmarks/gpu_stage1_fast.sh runs/stage1-fast "$out" --seed 0 || exit 1
echo "stage 1: $(( $(date +%s) - s )) s; $(tail -1 runs/stage1-fast/metrics.jsonl)"
bash benchmarks/accept16_r8_w64.sh 12 cuda "$out"
