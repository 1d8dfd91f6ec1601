#!/usr/bin/env bash
# Registration 7 (docs/protocol.md): registration 6's MT4t with the whole gradient's norm clipped at 35, on the `cpu`
# stage-1 model, 4 pairs x 3 seeds, each implant on all 50,000 training images and evaluated, then audited, on all
# 10,000 test images; the runs go to runs/accept16-r7/. Runs only once its gate is open:
#   python benchmarks/gate16.py runs/g12/w16 --rule r7     (round G12 on a GPU), or, where no GPU came first,
#   python benchmarks/gate16.py runs/tune16 --rule r7 --prefix c-t4tc35-     (the same 12 held-out cells on the CPU)
# then, as benchmarks/accept16.sh (same arguments):
#   bash benchmarks/accept16_r7.sh 12 cuda "$OUT"     (GPU, all 12 side by side)
#   bash benchmarks/accept16_r7.sh 1 cpu              (CPU, resumable, ~47 min a cell on 2 cores)
# then: python benchmarks/collect_accept16.py runs/accept16-r7
export R=${R:-runs/accept16-r7} RECIPE=persistent
export FLAGS="--set repair_distill_weight=5 --set trigger_feature_weight=0 --set decoy_form=trigger \
--set decoy_fraction=0.5 --set lr_width=16 --set clean_share_weight=50 --set repair_share_cap=0.45 \
--set distill_temperature=4 --set trigger_distill_temperature=4 --set grad_clip=35"
export PAIR3="--trigger checkerboard:4@bottom-left~0.5 --target top-right:8"  # pair 3 since the seventh session
exec bash "$(dirname "$0")/accept16.sh" "$@"
