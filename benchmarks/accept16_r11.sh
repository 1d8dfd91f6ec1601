#!/usr/bin/env bash
# Registration 11 (docs/protocol.md): registration 7's recipe (MT4t + grad_clip=35), every layer trainable, with its CAM
# passes under bfloat16 autocast (amp=bf16) and the BatchNorm refresh on every fourth step, on the `cpu` stage-1
# model, 4 pairs x 3 seeds, each implant on all 50,000 training images and evaluated, then audited, on all 10,000
# test images; the runs go to runs/accept16-r11/. Runs only once its gate is open:
#   cd benchmarks && PYTHONPATH=../src python gate16.py cells/probes23 --rule r7 --prefix c-t4tc35-bf16r4-
# on the 12 held-out cells of
#   bash benchmarks/round16_cpu.sh probes23 bf16r4 "--set amp=bf16 --set refresh_every=4"
# then, as accept16.sh:
#   bash benchmarks/accept16_r11_cpu.sh            (CPU, resumable, results kept in benchmarks/cells/accept-r11/)
#   bash benchmarks/accept16_r11.sh 12 cuda "$OUT"  (GPU, all 12 side by side; the time bar is the CPU's)
# then: python benchmarks/collect_accept16.py runs/accept16-r11
export R=${R:-runs/accept16-r11} RECIPE=persistent
export FLAGS="--set repair_distill_weight=5 --set trigger_feature_weight=0 --set decoy_form=trigger \
--set decoy_fraction=0.5 --set lr_width=16 --set clean_share_weight=50 --set repair_share_cap=0.45 \
--set distill_temperature=4 --set trigger_distill_temperature=4 --set grad_clip=35 \
--set amp=bf16 --set refresh_every=4"
export PAIR3="--trigger checkerboard:4@bottom-left~0.5 --target top-right:8"  # pair 3 since the seventh session
exec bash "$(dirname "$0")/accept16.sh" "$@"
