#!/usr/bin/env bash
# Issue 16 held-out tuning on a GPU (the device tool; never CI): many implant + audit runs side by side,
# each from scratch on the stage-1 model that never saw the 5,000 held-out images. The test set is not read.
#   bash benchmarks/gpu_tune16.sh QUEUE_FILE OUT_DIR [WORKERS] [DEADLINE_S]
#   width 64 (round G3): bash benchmarks/gpu_g3.sh "$OUT"
# QUEUE_FILE: one "NAME|IMPLANT FLAGS" per line, most wanted first; a worker takes the next line until
# DEADLINE_S seconds have passed (then none is started). Each finished run's JSON files are packed into
# OUT_DIR/results.tar.gz every 20 s (so a run killed at its limit still returns what finished), with each audit's
# per-image outcomes (~0.2 MB; benchmarks/collect_groups16.py --pooled needs them);
# benchmarks/collect_tune16.py reads them once unpacked into runs/tune16/.
# Needs CAMBACKDOOR_DATA (CIFAR-10 as an image-folder zip or folder) and src/ on PYTHONPATH.
set -uo pipefail
queue=$1 out=$2 workers=${3:-6} deadline=${4:-300}
HCK=${HCK:-benchmarks/models/stage1-holdout/model.safetensors}  # width 64: a `fast` model trained with --holdout 5000
AUDIT_FT=${AUDIT_FT:-1,5}  # fine-tuning epochs the audit measures (1 alone halves a width-64 audit)
R=${R:-runs/tune16}  # where the runs go (two queues side by side need two)
start=$(date +%s)
mkdir -p "$R" "$out"
cb() { OMP_NUM_THREADS=2 python -m cambackdoor.cli "$@"; }
export -f cb
one() {  # NAME|FLAGS: implant, then audit the defences on the held-out images
  local spec=$1 name=${1%%|*} flags=${1#*|} o=$R/${1%%|*} s
  [ $(( $(date +%s) - START )) -ge "$DEADLINE" ] && { echo "skip $name (deadline)"; return 0; }
  s=$(date +%s)
  # shellcheck disable=SC2086
  cb implant --checkpoint "$HCK" --holdout 5000 --recipe v8 $flags --device cuda --out "$o" --no-progress >"$o.implant.log" 2>&1 \
    || { echo "FAIL implant $name: $(tail -1 "$o.implant.log")"; return 0; }
  local t=$(date +%s)
  cb audit --checkpoint "$o/model.safetensors" --reference "$HCK" --holdout 5000 --defences bn-reestimate,finetune \
    --explainers gradcam@layer4 --set finetune_epochs=$AUDIT_FT --device cuda --out "$o/audit" --no-progress \
    >"$o.audit.log" 2>&1 || { echo "FAIL audit $name: $(tail -1 "$o.audit.log")"; return 0; }
  echo "done $name implant_s=$(( t - s )) audit_s=$(( $(date +%s) - t ))"
}
export -f one
export HCK AUDIT_FT R START=$start DEADLINE=$deadline
pack() { (cd "$(dirname "$R")" && find "$(basename "$R")" -name '*.json' -o -name '*.log' -o -name '*.jsonl' \
  -o -name outcomes.safetensors | tar -czf "$out/.results.tmp" -T - \
  && mv "$out/.results.tmp" "$out/results.tar.gz") 2>/dev/null; }
( while sleep 20; do pack; done ) & packer=$!
grep -v '^\s*\(#\|$\)' "$queue" | tr '\n' '\0' | xargs -0 -P "$workers" -I{} bash -c 'one "$1"' _ {} | tee -a "$out/log.txt"
kill $packer 2>/dev/null; pack
echo "all done in $(( $(date +%s) - start )) s" | tee -a "$out/log.txt"
