# The Linux kernel's NVMe/TCP initiator against SPDK's NVMe-oF target inside
# dpu-agent (a subsystem with engine spdk): the checks of nvme-initiator.sh
# (connect, identify, ext4, fio verify, digests, host allow list, namespace
# added while connected) on namespace 1 = an SPDK malloc bdev and namespace 2 =
# one of the agent's file volumes served through the Rust bdev module.
#
# Needs an installed SPDK (ffi/README.md): the agent is built with the `spdk`
# feature. tests/all.sh runs it only when pkg-config finds SPDK.
# shellcheck shell=bash disable=SC2034 # variables are read by tests/guest.sh

NVME_ENGINE=spdk
# shellcheck source=nvme-initiator.sh
source "$REPO_ROOT/tests/guest/nvme-initiator.sh"
