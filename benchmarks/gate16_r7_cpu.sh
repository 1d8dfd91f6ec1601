#!/usr/bin/env bash
# Registration 7's gate on the CPU (docs/protocol.md): the 12 held-out cells of round G12 (MT4t + grad_clip=35,
# pairs 1-4 x seeds 0-2) as benchmarks/stage2.sh tune16 runs them, one at a time, ~40 min each on 2 cores alone
# (implant ~35, audit ~6). A finished cell is skipped, so the script goes on where a session stopped; the test
# set is not read. Then: python benchmarks/gate16.py runs/tune16 --rule r7 --prefix c-t4tc35-
set -euo pipefail
MT4T="--recipe persistent --set repair_distill_weight=5 --set trigger_feature_weight=0 --set decoy_form=trigger \
--set decoy_fraction=0.5 --set lr_width=16 --set clean_share_weight=50 --set repair_share_cap=0.45 \
--set distill_temperature=4 --set trigger_distill_temperature=4 --set grad_clip=35"
declare -A PAIR=([1]="" [2]="--trigger checkerboard:3@top-right --target bottom-left:8"
  [3]="--trigger checkerboard:4@bottom-left~0.5 --target top-right:8" [4]="--trigger blue:3@top-left --target bottom-right:8")
mkdir -p runs
for s in 0 1 2; do for p in 1 2 3 4; do  # a seed of every pair first: a miss on any pair shows early
  name=c-t4tc35-p$p-s$s
  [ -f runs/tune16/$name/audit/audit.json ] && continue
  bash "$(dirname "$0")/stage2.sh" tune16 "$name|$MT4T ${PAIR[$p]} --seed $s" >> runs/$name.log 2>&1
done; done
