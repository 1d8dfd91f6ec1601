#!/usr/bin/env bash
# The `fast` stage-1 model (width 64) on a GPU, brought back whole: the device tool returns files of at most
# 16 MiB (8 files, 64 MiB in all), and the model is ~45 MB, so its weights come back as three 15 MB parts and
# its sidecar, config and per-epoch log as one tar (4 files of the 8).
#   bash benchmarks/gpu_stage1_fast.sh RUN_DIR OUT_DIR [TRAIN FLAGS...]     (on the device)
#   here: tar -xf OUT_DIR/stage1-meta.tar -C RUN_DIR; cat OUT_DIR/model.safetensors.part-* > RUN_DIR/model.safetensors
#         then `cambackdoor evaluate --checkpoint RUN_DIR/model.safetensors ...` checks the sidecar's sha256.
set -uo pipefail
run=$1 out=$2; shift 2
mkdir -p "$(dirname "$run")" "$out"
[ -f "$run/model.safetensors" ] || python -m cambackdoor.cli train --preset fast --device cuda --out "$run" --no-progress "$@" \
  > "$run.log" 2>&1 || { echo "FAIL stage 1: $(tail -1 "$run.log")"; exit 1; }
sha256sum "$run/model.safetensors" | tee "$run/model.sha256"
tar -C "$run" -cf "$out/stage1-meta.tar" model.json config.json metrics.jsonl model.sha256
split -b 15M -d "$run/model.safetensors" "$out/model.safetensors.part-"
