#!/usr/bin/env bash
# GPU benchmark and smoke test (issue 17), for a machine with a CUDA GPU; never run by CI.
#   PYTHONPATH=src CAMBACKDOOR_DATA=/path/to/cifar10-jpeg.zip bash benchmarks/gpu.sh [out_dir]
# 1. every command once on CUDA with tiny settings (exit codes checked by set -e);
# 2. the `fast` preset end to end (`run`), timed from the shell; 3. the `paper` preset's stage 1.
# Figures (device, torch version, date) go to docs/results.md by hand, with this script's output.
set -euo pipefail
out=${1:-runs/gpu}
cb() { python -m cambackdoor.cli "$@"; }
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name())"
mkdir -p "$out"
# 1. smoke: each command on CUDA
cb train --preset fast --epochs 1 --device cuda --out "$out/smoke/stage1" --overwrite --no-progress
cb evaluate --checkpoint "$out/smoke/stage1/model.safetensors" --device cuda --limit 1000 --no-progress
cb implant --checkpoint "$out/smoke/stage1/model.safetensors" --epochs 1 --device cuda --limit 1000 \
  --out "$out/smoke/implant" --overwrite --no-progress
cb audit --checkpoint "$out/smoke/implant/model.safetensors" --reference "$out/smoke/stage1/model.safetensors" \
  --device cuda --limit 1000 --pixel-limit 100 --set finetune_epochs=1 --out "$out/smoke/audit" --no-progress
cb sweep --checkpoint "$out/smoke/stage1/model.safetensors" --grid lambda=1,2 --epochs 1 --limit 1000 --device cuda \
  --out "$out/smoke/sweep" --no-progress
cb run --preset fast --epochs 1 --implant-epochs 1 --limit 1000 --device cuda --out "$out/smoke/run" --no-progress
cb figures "$out/smoke/run"
# 2. the fast preset end to end
[ -e "$out/fast" ] && { echo "$out/fast exists; remove it for a timed run" >&2; exit 1; }
start=$(date +%s)
cb run --preset fast --device cuda --out "$out/fast" --no-progress
echo "{\"command\": \"cambackdoor run --preset fast\", \"wall_s\": $(( $(date +%s) - start )), \"date\": \"$(date -u +%F)\"}" \
  | tee "$out/fast/benchmark.json"
# 3. the paper preset's stage 1 (the report: 91.48 %)
start=$(date +%s)
cb train --preset paper --device cuda --out "$out/paper/stage1" --overwrite --no-progress
echo "paper stage 1 wall_s=$(( $(date +%s) - start ))"
