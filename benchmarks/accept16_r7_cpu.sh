#!/usr/bin/env bash
# Registration 7's test cells on this machine's CPU, kept across sessions: a session's runs/ does not survive a change
# of machine, so the results (JSON, logs, per-image outcomes; not the weights) are packed into
# benchmarks/cells/accept-r7/results.tar.gz every 20 s (benchmarks/accept16.sh's PACK_DIR), to be committed after
# each finished cell; a new session unpacks them first, so a finished cell is never run, nor read, again.
# Runs only once registration 7's gate is open (benchmarks/accept16_r7.sh says how it is read). Stop it between
# cells (after a "done pP-sS" line in runs/accept16-r7/accept.log): an implant whose audit has not run needs its
# weights, which are not kept. Then: python benchmarks/collect_accept16.py runs/accept16-r7
set -euo pipefail
keep=$(cd "$(dirname "$0")" && pwd)/cells/accept-r7  # absolute: accept16.sh packs from inside runs/
mkdir -p runs "$keep"
[ -f "$keep/results.tar.gz" ] && [ ! -d runs/accept16-r7 ] && tar -xzf "$keep/results.tar.gz" -C runs
R=runs/accept16-r7 exec bash "$(dirname "$0")/accept16_r7.sh" 1 cpu "$keep"
