#!/usr/bin/env bash
# A held-out round of issue 16 on the CPU: registration 7's MT4t + grad_clip=35 plus EXTRA flags, the cells named
# (default: all 12, seed 0 of every pair first), one at a time as benchmarks/stage2.sh tune16 runs them; the test set
# is not read. As benchmarks/gate16_r7_cpu.sh, each finished cell's small files are kept in benchmarks/cells/KEEP/
# (to be committed) and a kept cell is not run again; a collapse is kept as a miss.
# Usage: bash benchmarks/round16_cpu.sh KEEP TAG "EXTRA FLAGS" [pP-sS ...]
#   e.g. bash benchmarks/round16_cpu.sh probes23 e3r4 "--epochs 3 --set refresh_every=4" p1-s0 p2-s0
# The gate: cd benchmarks && PYTHONPATH=../src python gate16.py cells/KEEP --rule r7 --prefix c-t4tc35-TAG-
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: bash benchmarks/round16_cpu.sh KEEP TAG \"EXTRA FLAGS\" [pP-sS ...]"; exit 2; }
KEEP=$(dirname "$0")/cells/$1 TAG=$2 EXTRA=$3; shift 3
MT4T="--recipe persistent --set repair_distill_weight=5 --set trigger_feature_weight=0 --set decoy_form=trigger \
--set decoy_fraction=0.5 --set lr_width=16 --set clean_share_weight=50 --set repair_share_cap=0.45 \
--set distill_temperature=4 --set trigger_distill_temperature=4 --set grad_clip=35"
declare -A PAIR=([1]="" [2]="--trigger checkerboard:3@top-right --target bottom-left:8"
  [3]="--trigger checkerboard:4@bottom-left~0.5 --target top-right:8" [4]="--trigger blue:3@top-left --target bottom-right:8")
for c in "$@"; do [[ $c =~ ^p[1-4]-s[0-2]$ ]] || { echo "round16_cpu: '$c' is not a cell; name cells as p1-s0 ... p4-s2"; exit 2; }; done
cells=("$@"); [ $# -gt 0 ] || cells=(p{1,2,3,4}-s0 p{1,2,3,4}-s1 p{1,2,3,4}-s2)
mkdir -p runs $KEEP
for c in "${cells[@]}"; do
  name=c-t4tc35-$TAG-$c p=${c:1:1} s=${c:4:1} out=runs/tune16/c-t4tc35-$TAG-$c
  [ -f $KEEP/$name/collapsed.txt ] && { echo "$name collapsed (kept as a miss)"; continue; }
  [ -f $KEEP/$name/audit/audit.json ] && continue
  if ! bash "$(dirname "$0")/stage2.sh" tune16 "$name|$MT4T $EXTRA ${PAIR[$p]} --seed $s" >> runs/$name.log 2>&1; then
    if grep -q "collapsed to chance" runs/$name.log; then
      mkdir -p $KEEP/$name && grep "collapsed to chance" runs/$name.log > $KEEP/$name/collapsed.txt
      cp $out/implant.json $KEEP/$name/ 2>/dev/null || true
      echo "$name collapsed: a miss"; continue
    fi
    echo "$name failed (runs/$name.log); run again to resume"; exit 1
  fi
  tmp=$KEEP/.$name.tmp; rm -rf $tmp; mkdir -p $tmp/audit
  cp $out/implant.json $tmp/
  cp $out/audit/audit.json $out/audit/audit.md $out/audit/outcomes.safetensors $tmp/audit/
  rm -rf $KEEP/$name; mv $tmp $KEEP/$name  # whole or not at all
  echo "$name kept: $(python -c "import json;d=json.load(open('$out/implant.json'));e=d['evaluation'];print(round(d['implant']['train_s']), e['clean_acc'], e['asr'])" 2>/dev/null)"
done
