#!/usr/bin/env bash
# Issue-6 acceptance: the README's main command, end to end in one uninterrupted run, timed from the
# shell (process start, data loading and every stage included). Usage: bash benchmarks/pipeline.sh [out_dir]
# Start from an empty out_dir, or it measures only the stages that are not done yet.
set -euo pipefail
out=${1:-runs/cpu-e2e}
[ -e "$out" ] && { echo "$out exists; remove it or pass another directory" >&2; exit 1; }
start=$(date +%s)
cambackdoor run --preset cpu --out "$out" --no-progress
end=$(date +%s)
echo "{\"command\": \"cambackdoor run --preset cpu --out $out\", \"wall_s\": $((end - start)), \"machine\": \"$(nproc) cores, $(uname -m)\", \"date\": \"$(date -u +%F)\"}" | tee "$out/benchmark.json"
