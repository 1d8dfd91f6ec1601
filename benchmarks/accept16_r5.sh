#!/usr/bin/env bash
# Registration 5 (docs/protocol.md): the MT4t recipe on the `cpu` stage-1 model, 4 pairs x 3 seeds, each implant
# on all 50,000 training images and evaluated, then audited, on all 10,000 test images; the runs go to
# runs/accept16-r5/. Everything else is benchmarks/accept16.sh's (same arguments):
#   bash benchmarks/accept16_r5.sh 12 cuda "$OUT"     (GPU, all 12 side by side)
#   bash benchmarks/accept16_r5.sh 1 cpu              (CPU, resumable, ~9 h on 2 cores)
# then: python benchmarks/collect_accept16.py runs/accept16-r5
# MT4t: `persistent` with these flags, as held-out round G10 (benchmarks/gpu_queue_g10_w16.txt) ran it.
export R=${R:-runs/accept16-r5} RECIPE=persistent
export FLAGS="--set repair_distill_weight=5 --set trigger_feature_weight=0 --set decoy_form=trigger \
--set decoy_fraction=0.5 --set lr_width=16 --set clean_share_weight=50 --set repair_share_cap=0.45 \
--set distill_temperature=4 --set trigger_distill_temperature=4"
export PAIR3="--trigger checkerboard:4@bottom-left~0.5 --target top-right:8"  # pair 3 since the seventh session
exec bash "$(dirname "$0")/accept16.sh" "$@"
