#!/usr/bin/env bash
# Stage-1 benchmark: trains the given preset (default cpu) on the shipped data and records wall time.
# Usage: bash benchmarks/stage1.sh [preset] [out_dir]
set -euo pipefail
preset=${1:-cpu}
out=${2:-runs/$preset/stage1}
start=$(date +%s)
cambackdoor train --preset "$preset" --out "$out" --no-progress
end=$(date +%s)
echo "{\"preset\": \"$preset\", \"wall_s\": $((end - start)), \"machine\": \"$(nproc) cores, $(uname -m)\", \"date\": \"$(date -u +%F)\"}" | tee "$out/benchmark.json"
