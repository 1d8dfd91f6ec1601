#!/usr/bin/env bash
# Issue-14 audit benchmark on the cpu stage-1 model and its default implant (run benchmarks/stage1.sh and
# benchmarks/stage2.sh pair1 first). One at a time, alone on the machine (the wall time is a claim):
#   bash benchmarks/audit.sh implant|stage1
set -euo pipefail
R=runs/cpu
CK=$R/stage1/model.safetensors
timed() { local name=$1; shift; local s=$(date +%s); "$@"; echo "$name wall_s=$(( $(date +%s) - s ))" | tee -a $R/walltimes.txt; }
case "${1:-implant}" in
  implant)
    # the default battery plus the 5-epoch fine-tuning row (4 more epochs, ~2 min each on the AMD EPYC)
    timed audit-implant cambackdoor audit --checkpoint $R/implant-default/model.safetensors --reference $CK \
      --set finetune_epochs=1,5 --out $R/implant-default/audit --no-progress ;;
  stage1)
    # the control: the clean model audited against the attack it does not carry (the default battery)
    timed audit-stage1 cambackdoor audit --checkpoint $CK --reference $CK --trigger yellow:4@bottom-right \
      --target top-left:8 --out $R/stage1/audit --no-progress ;;
esac
