#!/usr/bin/env bash
# Issue 16 round G4 on a GPU (the device tool), held-out images only: the width-64 queue (after training the
# `fast` stage-1 model with --holdout 5000, ~20 s on an H200) and the width-16 queue side by side, 12 runs,
# each audited for BN re-estimation and one fine-tuning epoch.
#   bash benchmarks/gpu_g4.sh OUT_DIR(absolute)     G=g4b or G=g5: that round's queues (gpu_queue_$G_w16/_w64.txt)
#   W16, W64: workers per queue (6); DEADLINE16: no width-16 run starts after this many seconds (600)
# Unpack OUT_DIR/w64/results.tar.gz and OUT_DIR/w16/results.tar.gz into runs/$G/ here (runs/g4 for G4), then:
#   python benchmarks/collect_tune16.py runs/g4/w64 (and runs/g4/w16)
set -uo pipefail
out=$1 ck=runs/stage1-fast-holdout
g=${G:-g4}; mkdir -p runs/$g "$out/w64" "$out/w16"
export AUDIT_FT=1
R=runs/$g/w16 bash benchmarks/gpu_tune16.sh benchmarks/gpu_queue_${G:-g4}_w16.txt "$out/w16" ${W16:-6} ${DEADLINE16:-600} & w16=$!
[ -f $ck/model.safetensors ] || python -m cambackdoor.cli train --preset fast --holdout 5000 --device cuda --out $ck \
  --no-progress > $ck.log 2>&1 || { echo "FAIL stage 1: $(tail -1 $ck.log)"; wait $w16; exit 1; }
cp $ck/*.json $ck/metrics.jsonl "$out/w64/" 2>/dev/null
R=runs/$g/w64 HCK=$ck/model.safetensors bash benchmarks/gpu_tune16.sh benchmarks/gpu_queue_${G:-g4}_w64.txt "$out/w64" ${W64:-6} 600
wait $w16
