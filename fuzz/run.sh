#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 30). Installs cargo-fuzz and the nightly toolchain if needed.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-30}
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
for target in $(cargo +nightly fuzz list); do
    echo "fuzz: $target for ${seconds}s"
    # Fails on the first crash; the reproducer lands in fuzz/artifacts/<target>/.
    cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 2>&1 | grep -E '^Done|ERROR|SUMMARY|panicked' \
        || { echo "fuzz: $target produced no summary"; exit 1; }
done
