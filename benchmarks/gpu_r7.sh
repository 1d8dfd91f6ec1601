#!/usr/bin/env bash
# Registration 7 on a GPU (docs/protocol.md), in two device calls (each fits the 600-s limit), carrying `.gpu`
# (the data) and, for the second, `runs/g12` (the gate's cells):
#   bash benchmarks/gpu_r7.sh gate "$OUT"     round G12 (12 held-out cells, ~5 min on an H200), then the gate
#   (between them, here: mkdir -p runs/g12 && tar -xzf FILES_AT/results.tar.gz -C runs/g12, which gives runs/g12/w16)
#   bash benchmarks/gpu_r7.sh accept "$OUT"   the 12 test-set cells, refused unless the gate is open
# The gate is checked again in the second call, from the carried cells: the test set is read only behind it.
set -uo pipefail
phase=${1:?usage: bash benchmarks/gpu_r7.sh gate|accept OUT} out=${2:?usage: bash benchmarks/gpu_r7.sh gate|accept OUT}
mkdir -p /tmp/cifar "$out" && [ -n "$(ls /tmp/cifar)" ] || tar -xJf .gpu/cifar.tar.xz -C /tmp/cifar
export PYTHONPATH=$PWD/src CAMBACKDOOR_DATA=/tmp/cifar CAMBACKDOOR_CACHE=/tmp/cache PYTHONUNBUFFERED=1
gate() { (cd benchmarks && python gate16.py ../runs/g12/w16 --rule r7) | tee "$out/gate.txt"; return "${PIPESTATUS[0]}"; }
case $phase in
  gate)
    AUDIT_FT=1 R=runs/g12/w16 bash benchmarks/gpu_tune16.sh benchmarks/gpu_queue_g12_w16.txt "$out" 12 60
    gate ;;
  accept)
    gate || { echo "gpu_r7: the gate is not open (above); registration 7 reads no test image"; exit 3; }
    bash benchmarks/accept16_r7.sh 12 cuda "$out" ;;
  *) echo "gpu_r7: phase must be gate or accept"; exit 2 ;;
esac
