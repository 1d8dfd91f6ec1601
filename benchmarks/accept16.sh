#!/usr/bin/env bash
# Issue 16's acceptance, exactly as registered in docs/protocol.md (registration 4): the `persistent` recipe
# on the `cpu` stage-1 model (benchmarks/models/stage1-cpu), 4 trigger/target pairs x 3 implant seeds, each
# implant on all 50,000 training images and evaluated, then audited, on all 10,000 test images.
#   bash benchmarks/accept16.sh [WORKERS] [DEVICE] [PACK_DIR]
#   GPU (all 12 side by side, ~6 min on an H200 by round G2's timings): bash benchmarks/accept16.sh 12 cuda "$OUT"
#   CPU (resumable; ~25 min implant + ~20 min audit per run on 2 cores): bash benchmarks/accept16.sh 1 cpu
# Each (pair, seed) is read once: a finished implant or audit is never redone, an interrupted implant resumes
# from its last epoch. Then: python benchmarks/collect_accept16.py (pooled over seeds, the bars checked).
# PACK_DIR: the results (JSON, per-image outcomes) are packed there every 20 s and the models at the end.
set -uo pipefail
workers=${1:-1} device=${2:-auto} pack=${3:-}
export CK=${CK:-benchmarks/models/stage1-cpu/model.safetensors} DEVICE=$device R=${R:-runs/accept16}  # 4b: CK, R
export RECIPE=${RECIPE:-persistent} FLAGS=${FLAGS:-}  # a later registration names its recipe and flags here
# the defences each audit measures (registration 8, width 64 on a GPU, measures only the bars' two)
export AUDIT=${AUDIT:-"--defences bn-reestimate,finetune,fine-prune --set finetune_epochs=1,5"}
declare -A PAIR=(
  [1]="--trigger yellow:4@bottom-right --target top-left:8"
  [2]="--trigger checkerboard:3@top-right --target bottom-left:8"
  [3]="${PAIR3:---trigger white:4@bottom-left~0.5 --target top-right:8}"  # registration 4's; a later one sets PAIR3
  # (docs/protocol.md, seventh session: "--trigger checkerboard:4@bottom-left~0.5 --target top-right:8")
  [4]="--trigger blue:3@top-left --target bottom-right:8"
)
mkdir -p $R
cb() { OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} python -m cambackdoor.cli "$@"; }
one() {  # "P S FLAGS": implant pair P with seed S, then audit it against the stage-1 model
  local p=$1 s=$2 o=$R/p$1-s$2 t; shift 2
  t=$(date +%s)
  # shellcheck disable=SC2068,SC2086
  [ -f $o/implant.json ] || cb implant --checkpoint $CK --recipe $RECIPE $FLAGS --seed $s $@ --device $DEVICE --resume \
    --out $o --no-progress >>$o.implant.log 2>&1 || { echo "FAIL implant p$p-s$s: $(tail -1 $o.implant.log)"; return 0; }
  local a=$(date +%s)
  # shellcheck disable=SC2086
  [ -f $o/audit/audit.json ] || cb audit --checkpoint $o/model.safetensors --reference $CK $AUDIT \
    --explainers gradcam@layer4 --device $DEVICE --out $o/audit --no-progress >>$o.audit.log 2>&1 \
    || { echo "FAIL audit p$p-s$s: $(tail -1 $o.audit.log)"; return 0; }
  echo "done p$p-s$s implant_s=$(( a - t )) audit_s=$(( $(date +%s) - a ))"
}
export -f cb one
pack() {
  [ -n "$pack" ] || return 0
  (cd "$(dirname $R)" && find "$(basename $R)" \( -name '*.json' -o -name '*.log' -o -name 'outcomes.safetensors' -o -name '*.md' \) \
    | tar -czf "$pack/.results.tmp" -T - && mv "$pack/.results.tmp" "$pack/results.tar.gz") 2>/dev/null
}
( while sleep 20; do pack; done ) & packer=$!
for p in 1 2 3 4; do for s in 0 1 2; do printf '%s %s %s\0' $p $s "${PAIR[$p]}"; done; done \
  | xargs -0 -P "$workers" -I{} bash -c 'one $1' _ {} | tee -a $R/accept.log
kill $packer 2>/dev/null; pack
# PACK_MODELS=0: not the weights (a width-64 pair's are ~135 MB, over what the device tool returns)
if [ -n "$pack" ] && [ "${PACK_MODELS:-1}" = 1 ]; then for p in 1 2 3 4; do (cd "$(dirname $R)" && tar -cf "$pack/models-p$p.tar" "$(basename $R)"/p$p-s*/model.*) 2>/dev/null; done; fi
