#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what it needs (idempotently), then
#   1. cargo fmt --check, clippy -D warnings (x86_64 and aarch64)
#   2. host unit and system tests
#   3. aarch64 unit tests under qemu-aarch64 (io_uring is ENOSYS there; the code must cope)
#   4. the static aarch64 release build (the DPU binary) and the host release build
#   5. the Debian packages (arm64 for the DPU, amd64): contents, lintian, systemd-analyze verify of the unit,
#      dpkg install, upgrade and purge in a throwaway root
#   6. independent peers against the agent: Python grpcio + reflection, openssl, curl
#   7. every fuzz target for a few seconds (cargo-fuzz, nightly)
#   8. QEMU guests: boot smoke tests, the arm64 agent test, the Linux NVMe/TCP initiator against the target,
#      the fabric, lazily loaded images mounted by the guest kernel (images/test-image.sh builds the image once)
#   9. where pkg-config finds an installed SPDK: the SPDK crates (clippy, tests) and the guest initiator against
#      the SPDK engine; otherwise a loud SKIPPED line (ffi/README.md)
# Set DPU_SKIP_GUEST=1 to skip step 8 on a machine without QEMU time to spare.
set -euo pipefail
cd "$(dirname "$0")/.."
export DPU_CACHE=${DPU_CACHE:-$HOME/.cache/dpu-agent}
# Builds are reused across runs on the same machine; an empty cache works too.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$DPU_CACHE/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

step() { printf '\n=== %s (%ss)\n' "$*" "$SECONDS"; }

step "dependencies"
need=()
# erofs-utils, docker-registry, skopeo and umoci: the lazy image tests (a real registry and real OCI tools);
# lintian and man-db: the package checks.
for pkg in build-essential pkg-config curl openssl python3-venv python3-cryptography file erofs-utils docker-registry skopeo umoci lintian man-db; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v rustup >/dev/null || { echo "rustup is required (https://rustup.rs)"; exit 1; }
rustup component add rustfmt clippy >/dev/null 2>&1 || true
cross/deps.sh
images/deps.sh
tests/mesh/deps.sh
host/deps.sh

step "format"
cargo fmt --all -- --check

step "clippy x86_64"
cargo clippy --locked --all-targets -- -D warnings

step "clippy aarch64"
cross/build.sh clippy

step "host tests"
cargo test --locked

step "aarch64 tests under qemu-aarch64"
cross/build.sh test

step "aarch64 static build (dist profile)"
cross/build.sh musl
size=$(stat -c %s "$CARGO_TARGET_DIR/aarch64-unknown-linux-musl/dist/dpu-agent")
file -b "$CARGO_TARGET_DIR/aarch64-unknown-linux-musl/dist/dpu-agent" | grep -q "statically linked"
echo "static aarch64 dpu-agent: $size bytes"
# The agent ships inside DPU firmware images with a 15 MB budget.
((size <= 15000000)) || { echo "static aarch64 dpu-agent: $size bytes is over the 15,000,000-byte budget"; exit 1; }

step "host release build"
cargo build --locked --release --bin dpu-agent --bin dpuctl --bin dpu-snapshotter

step "packages: arm64 and amd64 .deb"
for arch in arm64 amd64; do
    # From the two builds above, never another.
    deb=$(DPU_DEB_NO_BUILD=1 cross/deb.sh "$arch")
    cross/check-deb.sh "$deb"
done

step "interop: grpcio, openssl, curl"
DPU_PROFILE=release tests/interop.sh

step "mesh interop: curl, h2load, grpcio, Envoy (mTLS both ways)"
DPU_PROFILE=release tests/mesh-interop.sh

step "fuzz smoke: every target for ${DPU_FUZZ_SECONDS:-10}s"
fuzz/run.sh "${DPU_FUZZ_SECONDS:-10}"

if [ "${DPU_SKIP_GUEST:-0}" != 1 ]; then
    for t in boot-arm64 boot-amd64 arm64-agent nvme-initiator fabric lazy-image containerd crypt-volume ktls ipsec upgrade deb-systemd; do
        step "guest: $t"
        # Every binary the guests need was built above.
        DPU_GUEST_NO_BUILD=1 tests/guest.sh "$t"
    done
fi

# SPDK is in no package registry: its tests run where an SPDK is installed (ffi/README.md), found with
# pkg-config (SPDK_DIR names a prefix), and are skipped loudly elsewhere.
spdk_pkgconfig="${SPDK_DIR:+$SPDK_DIR/lib/pkgconfig:}${PKG_CONFIG_PATH:-}"
if PKG_CONFIG_PATH=$spdk_pkgconfig pkg-config --exists spdk_event_nvmf spdk_env_dpdk 2>/dev/null; then
    step "spdk: bindings, runtime bridge, storage engine"
    # bindgen reads SPDK's headers through libclang.
    if ! dpkg -s libclang-dev >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libclang-dev >/dev/null
    fi
    cargo clippy --locked -p dpu-spdk-sys -p dpu-spdk -p dpu-storage -p dpu-agent --features dpu-agent/spdk \
        --all-targets -- -D warnings
    cargo test --locked -p dpu-spdk -p dpu-storage --features dpu-storage/spdk --test runtime --test spdk
    if [ "${DPU_SKIP_GUEST:-0}" != 1 ]; then
        step "guest: spdk-engine"
        tests/guest.sh spdk-engine
    fi
else
    printf '\n%s\n%s\n%s\n' "**********************************************************************" \
        "SKIPPED: spdk (SPDK not installed: pkg-config finds no spdk_event_nvmf; see ffi/README.md)" \
        "**********************************************************************"
fi

step "all tests passed"
