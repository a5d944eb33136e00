# shellcheck shell=sh
# Guest-side NVMe/TCP initiator checks, shared by tests/guest/nvmet-reference.sh
# (against the guest kernel's own nvmet target) and tests/guest/nvme-initiator.sh
# (against dpu-agent's target on the host). Runs in the guest under busybox sh
# with /guest/lib.sh loaded; tests/guest/lib/nvme-common.sh prints the
# parameters below in front of this file, and the test appends its driver,
# which calls nvme_checks_run.
#
# Parameters (shell variables):
#   NVME_TRADDR NVME_TRSVCID     target address and I/O port
#   NVME_DISC_TRSVCID            discovery port (on NVME_TRADDR)
#   NVME_SUBNQN                  subsystem NQN
#   NVME_MODEL NVME_SERIAL       expected Identify Controller MN / SN
#   NVME_HOSTNQN NVME_HOSTID     the allowed host
#   NVME_BAD_HOSTNQN NVME_BAD_HOSTID  a host that is not allowed
#   NVME_NS1_BYTES NVME_NS2_BYTES     expected namespace sizes (empty: no check)
#   NVME_FIO_RAND_SIZE NVME_FIO_SEQ_SIZE NVME_FIO_DIGEST_SIZE  fio sizes
#   NVME_CMD_TIMEOUT             seconds for one nvme/fio/mkfs command
#   NVME_DEV_TIMEOUT             seconds for a controller/namespace to appear or go
#   NVME_AEN_TIMEOUT             seconds for namespace 2 to appear after the marker
#
# Console protocol (read by the host side):
#   GUEST-STEP: <name>           a step starts; `add-namespace` asks for
#                                namespace 2 to be added while connected
#   nvme-check: FAIL [<step>]: <message>   a check failed (then GUEST-RESULT: FAIL)
#   NVME-CHECKS: PASS            every step passed
#
# Hooks the driver may define: nvme_on_connected (after the first connect),
# nvme_on_add_namespace (after the add-namespace marker; the reference target
# adds namespace 2 itself there), nvme_on_namespace_added (namespace 2 is up).

NVME_STEP=setup
NVME_T0=0
NVME_SUMMARY=""

nvme_now() { # centiseconds since boot
	awk '{ printf "%d\n", $1 * 100 }' /proc/uptime
}

nvme_log() { echo "nvme-check: $*"; }

nvme_kernel_log() { # print and clear new kernel messages
	dmesg -c 2>/dev/null | grep -E 'nvme|nvmet|null_blk|EXT4|crc32c|tcp' | sed 's/^/kernel: /' || true
}

nvme_fail() {
	echo "nvme-check: FAIL [$NVME_STEP]: $*"
	echo "nvme-check: ---- diagnostics ----"
	for _c in /sys/class/nvme/nvme*; do
		[ -e "$_c/state" ] || continue
		echo "nvme-check: $(basename "$_c"): state=$(cat "$_c/state") subsysnqn=$(cat "$_c/subsysnqn" 2>/dev/null) address=$(cat "$_c/address" 2>/dev/null)"
	done
	nvme_kernel_log
	guest_fail "[$NVME_STEP] $*"
}

nvme_step_end() {
	[ "$NVME_T0" -gt 0 ] || return 0
	_cs=$(($(nvme_now) - NVME_T0))
	_t=$(printf '%d.%02d' $((_cs / 100)) $((_cs % 100)))
	nvme_kernel_log
	nvme_log "ok: $NVME_STEP (${_t}s)"
	NVME_SUMMARY="$NVME_SUMMARY $NVME_STEP=${_t}s"
	NVME_T0=0
}

nvme_step() {
	nvme_step_end
	NVME_STEP=$1
	NVME_T0=$(nvme_now)
	echo "GUEST-STEP: $1"
}

nvme_hook() { # name: run nvme_on_<name> if the driver defined it
	if type "nvme_on_$1" >/dev/null 2>&1; then
		"nvme_on_$1" || nvme_fail "hook nvme_on_$1 failed"
	fi
}

# nvme_run DESCRIPTION CMD...: run with a timeout, print the output; returns
# the command's status and leaves its output in /tmp/nvme-out.
nvme_run() {
	_desc=$1
	shift
	nvme_log "\$ $*"
	_rc=0
	timeout "$NVME_CMD_TIMEOUT" "$@" >/tmp/nvme-out 2>&1 || _rc=$?
	sed 's/^/  | /' /tmp/nvme-out
	if [ "$_rc" -ne 0 ]; then
		[ "$_rc" -ne 143 ] || _desc="$_desc (timed out after ${NVME_CMD_TIMEOUT}s)"
		nvme_log "$_desc: exit status $_rc"
	fi
	return "$_rc"
}

nvme_must() { # DESCRIPTION CMD...: nvme_run, fail the step on error
	_d=$1
	nvme_run "$@" || nvme_fail "$_d failed (exit status $_rc)"
}

# nvme_ctrls, nvme_live_ctrl and nvme_ns_dev come from tests/guest/lib/nvme-sysfs.sh, printed in front.

nvme_ns_count() { # namespaces of NVME_SUBNQN with a block device
	_k=0
	for _i in 1 2 3 4 5 6 7 8; do
		nvme_ns_dev "$_i" >/dev/null && _k=$((_k + 1))
	done
	echo "$_k"
}

nvme_wait_ns() { # NSID SECONDS: wait for the namespace's block device; prints it
	_left=$(($2 * 10))
	while [ "$_left" -gt 0 ]; do
		if nvme_ns_dev "$1"; then
			return 0
		fi
		_left=$((_left - 1))
		sleep 0.1
	done
	return 1
}

nvme_dev_bytes() { # /dev/NAME
	echo $(($(cat "/sys/block/$(basename "$1")/size") * 512))
}

nvme_check_size() { # DEV EXPECTED_BYTES
	[ -n "$2" ] || return 0
	_b=$(nvme_dev_bytes "$1")
	[ "$_b" = "$2" ] || nvme_fail "$1 has $_b bytes, expected $2"
	nvme_log "$1: $_b bytes"
}

nvme_show_ctrl() { # nvmeN: what the kernel negotiated
	_p=/sys/class/nvme/$1
	for _a in transport address state cntlid subsysnqn model serial firmware_rev queue_count sqsize kato \
		ctrl_loss_tmo reconnect_delay fast_io_fail_tmo numa_node hostnqn hostid; do
		[ -r "$_p/$_a" ] && nvme_log "$1 $_a: $(cat "$_p/$_a" 2>/dev/null)"
	done
	return 0
}

# nvme_connect EXTRA_ARGS...: connect NVME_SUBNQN as the allowed host and wait
# for namespace 1; sets NVME_CTRL and NVME_DEV.
nvme_connect() {
	nvme_must "nvme connect" nvme connect -t tcp -a "$NVME_TRADDR" -s "$NVME_TRSVCID" -n "$NVME_SUBNQN" \
		--hostnqn "$NVME_HOSTNQN" --hostid "$NVME_HOSTID" "$@"
	NVME_CTRL=$(nvme_live_ctrl) || nvme_fail "nvme connect succeeded but no live controller for $NVME_SUBNQN"
	NVME_DEV=$(nvme_wait_ns 1 "$NVME_DEV_TIMEOUT") \
		|| nvme_fail "no block device for namespace 1 after ${NVME_DEV_TIMEOUT}s (controller $NVME_CTRL)"
	nvme_log "connected: controller $NVME_CTRL, namespace 1 is $NVME_DEV"
}

nvme_disconnect() {
	nvme_must "nvme disconnect" nvme disconnect -n "$NVME_SUBNQN"
	_left=$((NVME_DEV_TIMEOUT * 10))
	while [ -n "$(nvme_ctrls)" ]; do
		_left=$((_left - 1))
		[ "$_left" -gt 0 ] || nvme_fail "controllers still present ${NVME_DEV_TIMEOUT}s after disconnect: $(nvme_ctrls)"
		sleep 0.1
	done
	nvme_log "disconnected"
}

# nvme_fio NAME DEV fio-args...: a verifying fio job; fails the step on any
# error or verify failure.
nvme_fio() {
	_name=$1
	_dev=$2
	shift 2
	nvme_run "fio $_name" fio --name="$_name" --filename="$_dev" --ioengine=libaio --direct=1 \
		--verify=crc32c --do_verify=1 --verify_fatal=1 --verify_dump=0 --exitall_on_error=1 \
		--group_reporting=1 "$@" || nvme_fail "fio $_name failed (exit status $_rc)"
	grep -q 'err= 0' /tmp/nvme-out || nvme_fail "fio $_name reported an error"
	if grep -qi 'verify.*\(fail\|bad\|mismatch\)' /tmp/nvme-out; then
		nvme_fail "fio $_name reported a verify failure"
	fi
}

nvme_checks_setup() {
	[ -e /etc/mtab ] || ln -s /proc/self/mounts /etc/mtab
	mkdir -p /mnt/nvme
	for _p in nvme fio mkfs.ext4 e2fsck; do
		command -v "$_p" >/dev/null 2>&1 || nvme_fail "$_p is not in the image"
	done
	[ -e /dev/nvme-fabrics ] || nvme_fail "/dev/nvme-fabrics is missing (nvme-tcp not loaded?)"
	nvme_log "nvme-cli: $(nvme version 2>&1 | tr '\n' ' ')"
	nvme_log "fio: $(fio --version 2>&1)"
	nvme_log "target $NVME_TRADDR:$NVME_TRSVCID (discovery :$NVME_DISC_TRSVCID), subsystem $NVME_SUBNQN"
	dmesg -c >/dev/null 2>&1 || true
}

# 1. Discovery lists the subsystem.
nvme_check_discover() {
	nvme_step discover
	nvme_must "nvme discover" nvme discover -t tcp -a "$NVME_TRADDR" -s "$NVME_DISC_TRSVCID" \
		--hostnqn "$NVME_HOSTNQN" --hostid "$NVME_HOSTID"
	awk -v nqn="$NVME_SUBNQN" '$1 == "subnqn:" && $2 == nqn { f = 1 } END { exit !f }' /tmp/nvme-out \
		|| nvme_fail "the discovery log does not list $NVME_SUBNQN"
	[ -z "$(nvme_ctrls)" ] || nvme_fail "discovery left a controller for $NVME_SUBNQN behind"
}

# 2. Connect; model and serial as configured.
nvme_check_connect() {
	nvme_step connect
	nvme_connect
	nvme_show_ctrl "$NVME_CTRL"
	nvme_check_size "$NVME_DEV" "$NVME_NS1_BYTES"
	# The kernel prints the space-padded Identify fields as they are.
	_m=$(sed 's/ *$//' "/sys/class/nvme/$NVME_CTRL/model")
	_s=$(sed 's/ *$//' "/sys/class/nvme/$NVME_CTRL/serial")
	[ "$_m" = "$NVME_MODEL" ] || nvme_fail "sysfs model is '$_m', expected '$NVME_MODEL'"
	[ "$_s" = "$NVME_SERIAL" ] || nvme_fail "sysfs serial is '$_s', expected '$NVME_SERIAL'"
	nvme_must "nvme list" nvme list
	grep -F "$NVME_DEV" /tmp/nvme-out | grep -F "$NVME_SERIAL" | grep -qF "$NVME_MODEL" \
		|| nvme_fail "nvme list shows no $NVME_DEV line with serial '$NVME_SERIAL' and model '$NVME_MODEL'"
	nvme_must "nvme id-ctrl" nvme id-ctrl "/dev/$NVME_CTRL"
	_m=$(sed -n 's/^mn *: \(.*\)$/\1/p' /tmp/nvme-out | sed 's/ *$//')
	_s=$(sed -n 's/^sn *: \(.*\)$/\1/p' /tmp/nvme-out | sed 's/ *$//')
	_n=$(sed -n 's/^subnqn *: \(.*\)$/\1/p' /tmp/nvme-out | sed 's/ *$//')
	[ "$_m" = "$NVME_MODEL" ] || nvme_fail "id-ctrl mn is '$_m', expected '$NVME_MODEL'"
	[ "$_s" = "$NVME_SERIAL" ] || nvme_fail "id-ctrl sn is '$_s', expected '$NVME_SERIAL'"
	[ "$_n" = "$NVME_SUBNQN" ] || nvme_fail "id-ctrl subnqn is '$_n', expected '$NVME_SUBNQN'"
	nvme_must "nvme id-ns" nvme id-ns "/dev/$NVME_CTRL" -n 1
	nvme_must "nvme list-ns" nvme list-ns "/dev/$NVME_CTRL"
	nvme_hook connected
}

# 3. ext4: write files, remount, verify checksums, fsck.
nvme_check_filesystem() {
	nvme_step filesystem
	nvme_must mkfs.ext4 mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 "$NVME_DEV"
	mount -t ext4 "$NVME_DEV" /mnt/nvme || nvme_fail "mount $NVME_DEV failed"
	mkdir -p /mnt/nvme/small
	for _sz in 0 1 511 4096 65537 1048576 3145728 8388627; do
		head -c "$_sz" /dev/urandom >"/mnt/nvme/file-$_sz" || nvme_fail "writing file-$_sz failed"
	done
	for _i in $(seq 1 64); do
		head -c $((_i * 97)) /dev/urandom >"/mnt/nvme/small/f$_i" || nvme_fail "writing small/f$_i failed"
	done
	(cd /mnt/nvme && find . -type f | sort | xargs sha256sum) >/tmp/nvme-sums || nvme_fail "sha256sum failed"
	nvme_log "wrote $(wc -l </tmp/nvme-sums) files, $(du -sk /mnt/nvme | cut -f1) KiB"
	sync
	umount /mnt/nvme || nvme_fail "umount failed"
	echo 3 >/proc/sys/vm/drop_caches
	nvme_must "e2fsck" e2fsck -f -n "$NVME_DEV"
	mount -t ext4 "$NVME_DEV" /mnt/nvme || nvme_fail "second mount of $NVME_DEV failed"
	(cd /mnt/nvme && sha256sum -c -s /tmp/nvme-sums) || {
		(cd /mnt/nvme && sha256sum -c /tmp/nvme-sums) | grep -v ': OK$' | head -20
		nvme_fail "file checksums differ after remount"
	}
	nvme_log "all $(wc -l </tmp/nvme-sums) checksums match after remount"
	umount /mnt/nvme || nvme_fail "second umount failed"
}

# 4. fio with verify: 4K random writes QD16, 128K sequential writes QD16.
nvme_check_fio() {
	nvme_step fio-randwrite-4k
	nvme_fio randwrite-4k "$NVME_DEV" --rw=randwrite --bs=4k --iodepth=16 --size="$NVME_FIO_RAND_SIZE"
	nvme_step fio-write-128k
	nvme_fio write-128k "$NVME_DEV" --rw=write --bs=128k --iodepth=16 --size="$NVME_FIO_SEQ_SIZE"
}

# 5. Disconnect; reconnect with header and data digests, short fio, disconnect.
nvme_check_digests() {
	nvme_step disconnect
	nvme_disconnect
	nvme_step digests
	nvme_connect --hdr-digest --data-digest
	nvme_show_ctrl "$NVME_CTRL" | grep -E ' (queue_count|sqsize|kato):'
	nvme_fio digest-randwrite-4k "$NVME_DEV" --rw=randwrite --bs=4k --iodepth=16 --size="$NVME_FIO_DIGEST_SIZE"
	nvme_fio digest-write-128k "$NVME_DEV" --rw=write --bs=128k --iodepth=16 --size="$NVME_FIO_DIGEST_SIZE"
	nvme_disconnect
}

# 6. A host NQN off the allow list is refused; the allowed one still connects.
nvme_check_host_acl() {
	nvme_step host-not-allowed
	if nvme_run "nvme connect (host not allowed)" nvme connect -t tcp -a "$NVME_TRADDR" -s "$NVME_TRSVCID" \
		-n "$NVME_SUBNQN" --hostnqn "$NVME_BAD_HOSTNQN" --hostid "$NVME_BAD_HOSTID"; then
		nvme_fail "connecting as $NVME_BAD_HOSTNQN succeeded; the subsystem must only admit $NVME_HOSTNQN"
	fi
	[ -z "$(nvme_ctrls)" ] || nvme_fail "a controller exists after the refused connect: $(nvme_ctrls)"
	nvme_log "refused as expected"
	nvme_step host-allowed
	nvme_connect
}

# 7. Namespace added while connected: the async event makes namespace 2 appear.
nvme_check_aen() {
	nvme_step aen
	[ "$(nvme_ns_count)" = 1 ] || nvme_fail "expected 1 namespace before the add, found $(nvme_ns_count)"
	nvme_must "nvme list-ns" nvme list-ns "/dev/$NVME_CTRL"
	nvme_log "asking for namespace 2 (waiting up to ${NVME_AEN_TIMEOUT}s)"
	echo "GUEST-STEP: add-namespace"
	nvme_hook add_namespace
	_t=$(nvme_now)
	_dev2=$(nvme_wait_ns 2 "$NVME_AEN_TIMEOUT") \
		|| nvme_fail "namespace 2 did not appear within ${NVME_AEN_TIMEOUT}s of the add-namespace marker (async event or rescan missing?)"
	_cs=$(($(nvme_now) - _t))
	nvme_log "namespace 2 is $_dev2 after $((_cs / 100)).$((_cs % 100 / 10))s"
	nvme_hook namespace_added
	nvme_check_size "$_dev2" "$NVME_NS2_BYTES"
	nvme_must "nvme list-ns" nvme list-ns "/dev/$NVME_CTRL"
	grep -Eq '^\[ *1\]:0x2$' /tmp/nvme-out || nvme_fail "nvme list-ns does not show nsid 2"
	nvme_fio ns2-randwrite-4k "$_dev2" --rw=randwrite --bs=4k --iodepth=16 --size=4M
	_dev1=$(nvme_ns_dev 1) || nvme_fail "namespace 1 vanished after namespace 2 was added"
	nvme_log "namespace 1 is still $_dev1"
	nvme_step final-disconnect
	nvme_disconnect
}

nvme_checks_run() {
	nvme_checks_setup
	nvme_check_discover
	nvme_check_connect
	nvme_check_filesystem
	nvme_check_fio
	nvme_check_digests
	nvme_check_host_acl
	nvme_check_aen
	nvme_step_end
	nvme_log "steps:$NVME_SUMMARY"
	echo "NVME-CHECKS: PASS"
}
