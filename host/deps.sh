#!/usr/bin/env bash
# Installs the peers of host/tests/containerd.rs (idempotent): Debian's containerd 1.6 and runc, umoci and
# skopeo to build the test image, and a static busybox to put in it (busybox-static replaces Debian's dynamic
# busybox package where that is installed).
set -euo pipefail
need=()
for pkg in containerd runc umoci skopeo busybox-static; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
