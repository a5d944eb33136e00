#!/usr/bin/env bash
# One entry point for the DPU (aarch64) builds.
#
#   cross/build.sh          static dpu-agent and dpuctl for aarch64-unknown-linux-musl (the DPU image), built with
#                           the `dist` profile (the release build linked for size: see Cargo.toml)
#   cross/build.sh gnu      release build for aarch64-unknown-linux-gnu
#   cross/build.sh test     the workspace's tests for aarch64-unknown-linux-gnu, run under qemu-aarch64
#   cross/build.sh clippy   clippy -D warnings for aarch64-unknown-linux-gnu
#
# Binaries land in ${CARGO_TARGET_DIR:-target}/<triple>/dist/ (musl) or <triple>/release/ (gnu).
set -euo pipefail
cd "$(dirname "$0")/.."
cross/deps.sh

mode=${1:-musl}
case "$mode" in
    musl)
        cargo build --locked --profile dist --target aarch64-unknown-linux-musl --bin dpu-agent --bin dpuctl
        bin="${CARGO_TARGET_DIR:-target}/aarch64-unknown-linux-musl/dist/dpu-agent"
        echo "cross: $(file -b "$bin" 2>/dev/null | cut -d, -f1-2) $(stat -c %s "$bin") bytes: $bin" >&2
        ;;
    gnu)
        cargo build --locked --release --target aarch64-unknown-linux-gnu --bin dpu-agent --bin dpuctl
        ;;
    test)
        # Tests that start the agent binary run it through the same emulator cargo uses for the tests.
        DPU_TEST_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu" \
            cargo test --locked --target aarch64-unknown-linux-gnu
        ;;
    clippy)
        cargo clippy --locked --target aarch64-unknown-linux-gnu --all-targets -- -D warnings
        ;;
    *)
        echo "usage: cross/build.sh [musl|gnu|test|clippy]" >&2
        exit 2
        ;;
esac
