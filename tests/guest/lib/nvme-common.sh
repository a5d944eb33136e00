# Host-side definitions shared by the NVMe/TCP initiator tests
# (tests/guest/nvmet-reference.sh, tests/guest/nvme-initiator.sh), sourced by
# them from tests/guest.sh: the amd64 guest image with the real nvme-cli, fio
# and e2fsprogs from the host, the fixed host identities, and
# nvme_checks_script, which prints the shared guest-side checks
# (tests/guest/lib/nvme-checks.sh) with their parameters.
#
# Overridable from the environment (defaults sized for TCG, 5-12x slower than
# native):
#   DPU_NVME_FIO_RAND_SIZE   4K random write+verify size      (default 64M)
#   DPU_NVME_FIO_SEQ_SIZE    128K sequential write+verify size (default 128M)
#   DPU_NVME_FIO_DIGEST_SIZE fio size with digests on          (default 16M)
#   DPU_NVME_CMD_TIMEOUT     seconds per guest command          (default 300)
#   DPU_NVME_DEV_TIMEOUT     seconds for a namespace to appear  (default 60)
#   DPU_NVME_AEN_TIMEOUT     seconds for namespace 2 after the add (default 60)
# shellcheck shell=bash disable=SC2034 # variables are read by tests/guest.sh

GUEST_ARCH=amd64
# nvme-tcp pulls in nvme-fabrics and nvme-core; crc32c for the digests and for
# ext4's metadata checksums (both ask the crypto API for "crc32c").
GUEST_MODULES=(nvme-tcp crc32c_generic ext4)
GUEST_BINARIES=(nvme fio mkfs.ext4 e2fsck)
GUEST_HOST_PACKAGES=(nvme-cli fio e2fsprogs)
GUEST_FILES=()
# mke2fs reads its defaults from here (it has built-in ones if it is missing).
[[ ! -f /etc/mke2fs.conf ]] || GUEST_FILES+=(/etc/mke2fs.conf:/etc/mke2fs.conf)
# The image carries ~90 MB of host programs and libraries (fio links ceph,
# gluster, rdma...), unpacked into guest RAM.
GUEST_MEMORY=1536
GUEST_SMP=2

# Fixed identities: the allowed host and one that is not on the allow list.
# Distinct host IDs too: newer kernels refuse one host ID under two NQNs.
NVME_HOSTID=5d0c8a52-6f1e-4b7a-9c3d-2e8f1a6b4c70
NVME_HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:$NVME_HOSTID
NVME_BAD_HOSTID=9b7e3f10-2c4d-4e5f-8a6b-7c8d9e0f1a2b
NVME_BAD_HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:$NVME_BAD_HOSTID
NVME_SUBNQN=nqn.2026-11.io.dpu-agent:guest-test
NVME_SERIAL=DPU0001
NVME_MODEL="dpu-agent test"

nvme_sq() { # single-quote a value for sh
	printf "'%s'" "${1//\'/\'\\\'\'}"
}

# nvme_checks_script KEY=VALUE...: print parameter assignments (defaults, then
# the given ones) followed by the shared guest-side checks.
nvme_checks_script() {
	local kv
	local -a params=(
		"NVME_SUBNQN=$NVME_SUBNQN"
		"NVME_MODEL=$NVME_MODEL"
		"NVME_SERIAL=$NVME_SERIAL"
		"NVME_HOSTNQN=$NVME_HOSTNQN"
		"NVME_HOSTID=$NVME_HOSTID"
		"NVME_BAD_HOSTNQN=$NVME_BAD_HOSTNQN"
		"NVME_BAD_HOSTID=$NVME_BAD_HOSTID"
		"NVME_NS1_BYTES=268435456"
		"NVME_NS2_BYTES=67108864"
		"NVME_FIO_RAND_SIZE=${DPU_NVME_FIO_RAND_SIZE:-64M}"
		"NVME_FIO_SEQ_SIZE=${DPU_NVME_FIO_SEQ_SIZE:-128M}"
		"NVME_FIO_DIGEST_SIZE=${DPU_NVME_FIO_DIGEST_SIZE:-16M}"
		"NVME_CMD_TIMEOUT=${DPU_NVME_CMD_TIMEOUT:-300}"
		"NVME_DEV_TIMEOUT=${DPU_NVME_DEV_TIMEOUT:-60}"
		"NVME_AEN_TIMEOUT=${DPU_NVME_AEN_TIMEOUT:-60}"
		"$@"
	)
	printf '# parameters (tests/guest/lib/nvme-common.sh)\n'
	for kv in "${params[@]}"; do
		[[ $kv =~ ^NVME_[A-Z0-9_]+= ]] || {
			printf 'nvme: bad parameter %q\n' "$kv" >&2
			return 1
		}
		printf '%s=%s\n' "${kv%%=*}" "$(nvme_sq "${kv#*=}")"
	done
	cat "$REPO_ROOT/tests/guest/lib/nvme-sysfs.sh" "$REPO_ROOT/tests/guest/lib/nvme-checks.sh"
}
