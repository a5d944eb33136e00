#!/usr/bin/env bash
# Fabric rule-install benchmark (not a test): in the arm64 QEMU guest (the host kernel has no cls_flower),
# install N flower rules (default 10000) through the agent's netlink backend and the same rules with
# iproute2's `tc -batch` in the same run, then time a reconcile pass over the unchanged rules (it must write
# nothing). Prints a Markdown table. TCG emulation: the figures are relative only, never absolute speeds.
#
#   bench/fabric.sh [RULES]
set -euo pipefail
cd "$(dirname "$0")/.."
rules=${1:-10000}
export DPU_FABRIC_BENCH=1 DPU_FABRIC_BENCH_RULES=$rules DPU_GUEST_TIMEOUT=${DPU_GUEST_TIMEOUT:-1200}
tests/guest.sh fabric >&2
log=${DPU_CACHE:-$HOME/.cache/dpu-agent}/guest-logs/fabric.log
grep -a '^bench: ' "$log" | tr -d '\r' | sed 's/^bench: //'
