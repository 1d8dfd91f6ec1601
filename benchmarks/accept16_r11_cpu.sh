#!/usr/bin/env bash
# Registration 11's test cells on this machine's CPU, kept across sessions (as benchmarks/accept16_r7_cpu.sh): the
# results (JSON, logs, per-image outcomes; not the weights) are packed into benchmarks/cells/accept-r11/results.tar.gz
# every 20 s, to be committed after each finished cell; a new session unpacks them first, so a finished cell is never
# run, nor read, again. Runs only once registration 10's gate is open (benchmarks/accept16_r11.sh). Stop it between
# cells (after a "done pP-sS" line in runs/accept16-r11/accept.log). Then:
#   python benchmarks/collect_accept16.py runs/accept16-r11
set -euo pipefail
keep=$(cd "$(dirname "$0")" && pwd)/cells/accept-r11  # absolute: accept16.sh packs from inside runs/
mkdir -p runs "$keep"
[ -f "$keep/results.tar.gz" ] && [ ! -d runs/accept16-r11 ] && tar -xzf "$keep/results.tar.gz" -C runs
R=runs/accept16-r11 exec bash "$(dirname "$0")/accept16_r11.sh" 1 cpu "$keep"
