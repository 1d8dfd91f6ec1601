#!/usr/bin/env bash
# Registration 7's gate on the CPU (docs/protocol.md): the 12 held-out cells of round G12 (MT4t + grad_clip=35,
# pairs 1-4 x seeds 0-2) as benchmarks/stage2.sh tune16 runs them, one at a time, on 2 cores alone ~7.5 min a cell
# with AVX-512 (implant ~340 s, audit ~90 s; twenty-first session), ~30 min without; the test set is not read.
# A session's runs/ does not survive a change of machine, so each finished cell's small files (implant.json with its
# config and log; audit.json, audit.md, outcomes.safetensors; not the weights) are kept in benchmarks/cells/r7/NAME/,
# to be committed; a kept cell is not run again. The gate reads the kept folder:
#   cd benchmarks && PYTHONPATH=../src python gate16.py cells/r7 --rule r7 --prefix c-t4tc35-
# Usage: bash benchmarks/gate16_r7_cpu.sh [pP-sS ...]   the cells named run first, then the rest (seed 0 of
# every pair, then seeds 1 and 2); the order changes nothing the gate reads: it needs all 12.
set -euo pipefail
MT4T="--recipe persistent --set repair_distill_weight=5 --set trigger_feature_weight=0 --set decoy_form=trigger \
--set decoy_fraction=0.5 --set lr_width=16 --set clean_share_weight=50 --set repair_share_cap=0.45 \
--set distill_temperature=4 --set trigger_distill_temperature=4 --set grad_clip=35"
declare -A PAIR=([1]="" [2]="--trigger checkerboard:3@top-right --target bottom-left:8"
  [3]="--trigger checkerboard:4@bottom-left~0.5 --target top-right:8" [4]="--trigger blue:3@top-left --target bottom-right:8")
KEEP=$(dirname "$0")/cells/r7
for c in "$@"; do [[ $c =~ ^p[1-4]-s[0-2]$ ]] || { echo "gate16_r7_cpu: '$c' is not a cell; name cells as p1-s0 ... p4-s2"; exit 2; }; done
mkdir -p runs $KEEP
for c in "$@" p{1,2,3,4}-s0 p{1,2,3,4}-s1 p{1,2,3,4}-s2; do
  name=c-t4tc35-$c p=${c:1:1} s=${c:4:1} out=runs/tune16/c-t4tc35-$c
  if [ -f $KEEP/$name/collapsed.txt ]; then echo "$name collapsed: a miss (registration 7); the gate is shut"; exit 3; fi
  [ -f $KEEP/$name/audit/audit.json ] && continue
  if ! bash "$(dirname "$0")/stage2.sh" tune16 "$name|$MT4T ${PAIR[$p]} --seed $s" >> runs/$name.log 2>&1; then
    # a collapse counts as a miss and is not rerun (registration 7): keep the guard's message, then stop
    if grep -q "collapsed to chance" runs/$name.log; then
      mkdir -p $KEEP/$name && grep "collapsed to chance" runs/$name.log > $KEEP/$name/collapsed.txt
      cp $out/implant.json $KEEP/$name/ 2>/dev/null || true
      echo "$name collapsed: a miss (registration 7); the gate is shut"; exit 3
    fi
    echo "$name failed (runs/$name.log); run again to resume"; exit 1
  fi
  tmp=$KEEP/.$name.tmp; rm -rf $tmp; mkdir -p $tmp/audit
  cp $out/implant.json $tmp/
  cp $out/audit/audit.json $out/audit/audit.md $out/audit/outcomes.safetensors $tmp/audit/
  rm -rf $KEEP/$name; mv $tmp $KEEP/$name  # whole or not at all
done
