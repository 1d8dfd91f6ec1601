#!/usr/bin/env bash
# Issue 16 round G3 on a GPU (the device tool): width 64, held-out images only. Trains the `fast` stage-1
# model with the 5,000 held-out images kept out (~20 s on an H200), then the queue as in rounds G1-G2.
#   bash benchmarks/gpu_g3.sh OUT_DIR [WORKERS] [DEADLINE_S]
# Unpack OUT_DIR/results.tar.gz into runs/ here, then: python benchmarks/collect_tune16.py runs/tune16
set -uo pipefail
out=$1 workers=${2:-6} deadline=${3:-330}
ck=runs/stage1-fast-holdout; mkdir -p runs
[ -f $ck/model.safetensors ] || python -m cambackdoor.cli train --preset fast --holdout 5000 --device cuda --out $ck \
  --no-progress > $ck.log 2>&1 || { echo "FAIL stage 1: $(tail -1 $ck.log)"; exit 1; }
mkdir -p "$out" && cp $ck/*.json $ck/metrics.jsonl "$out/" 2>/dev/null
HCK=$ck/model.safetensors bash benchmarks/gpu_tune16.sh benchmarks/gpu_queue_g3.txt "$out" "$workers" "$deadline"
