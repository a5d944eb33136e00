#!/usr/bin/env bash
# Ensures the Python venv with the independent gRPC peers (grpcio, grpcio-reflection) and prints its path.
# Reinstalls only when requirements.txt changes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${DPU_CACHE:-$HOME/.cache/dpu-agent}/venv
if ! cmp -s "$here/requirements.txt" "$venv/requirements.txt" 2>/dev/null; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt" >&2
    cp "$here/requirements.txt" "$venv/requirements.txt"
fi
echo "$venv"
