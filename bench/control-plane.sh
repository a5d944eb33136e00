#!/usr/bin/env bash
# Builds the release binaries and runs the control-plane benchmark (prints a Markdown table).
#   bench/control-plane.sh [RUNS]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
target=${CARGO_TARGET_DIR:-$repo/target}
cargo build --locked --release --bin dpu-agent --bin dpuctl >&2
cross/build.sh musl >&2
venv=$(tests/interop/venv.sh)
"$venv/bin/python" bench/control_plane.py --runs "${1:-20}" \
    --agent "$target/release/dpu-agent" \
    --aarch64-agent "$target/aarch64-unknown-linux-musl/dist/dpu-agent" \
    --aarch64-dpuctl "$target/aarch64-unknown-linux-musl/dist/dpuctl"
