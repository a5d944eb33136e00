#!/usr/bin/env bash
# Installs what cross-building and running aarch64 binaries needs, idempotently: Debian's aarch64 GCC (linker
# and C compiler for both targets), arm64 glibc for qemu-user, qemu-aarch64, and the rustup targets that
# rust-toolchain.toml lists.
set -euo pipefail

need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
[ -e /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 ] || need+=(libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
    echo "cross: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

installed=$(rustup target list --installed)
for target in aarch64-unknown-linux-gnu aarch64-unknown-linux-musl; do
    grep -qx "$target" <<<"$installed" || rustup target add "$target"
done
