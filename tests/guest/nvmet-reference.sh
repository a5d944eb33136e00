# Reference peer for the NVMe/TCP initiator checks: inside one amd64 guest,
# configure the kernel's own NVMe/TCP target (nvmet) through configfs and run
# the same guest-side checks as nvme-initiator.sh (tests/guest/lib/nvme-checks.sh)
# against it over 127.0.0.1. It proves the check script; it must pass.
#
# Target: subsystem nqn.2026-11.io.dpu-agent:guest-test (model "dpu-agent test",
# serial DPU0001), only the fixed host NQN allowed, namespace 1 on a 256 MiB
# memory-backed null_blk device, I/O port 127.0.0.1:4420 and a second port
# 127.0.0.1:8009 used for discovery (like the agent's separate discovery
# listener). For the async-event step the guest adds namespace 2 (64 MiB)
# itself through configfs.
#
# DPU_NVME_TRACE=1 also records the commands nvmet receives from the kernel
# initiator (nvmet_req_init/complete trace events) while it discovers and
# connects, idles for DPU_NVME_TRACE_IDLE seconds (default 12: keep-alives),
# and handles the namespace-added event, and prints them as `nvmet-trace:`.
# shellcheck shell=bash disable=SC2034 # variables are read by tests/guest.sh

# shellcheck source=lib/nvme-common.sh
source "$REPO_ROOT/tests/guest/lib/nvme-common.sh"

GUEST_MODULES+=(nvmet-tcp null_blk)
GUEST_TIMEOUT=600

guest_script() {
	nvme_checks_script \
		NVME_TRADDR=127.0.0.1 NVME_TRSVCID=4420 NVME_DISC_TRSVCID=8009 \
		"NVME_TRACE=${DPU_NVME_TRACE:-0}" "NVME_TRACE_IDLE=${DPU_NVME_TRACE_IDLE:-12}"
	cat <<'GUEST'

# ---- nvmet-reference driver ----
NVMET=/sys/kernel/config/nvmet

# nullb_create NAME SIZE_MIB: a memory-backed null_blk disk; prints its /dev path.
nullb_create() {
	_d=/sys/kernel/config/nullb/$1
	mkdir "$_d" || return 1
	echo "$2" >"$_d/size" || return 1
	echo 1 >"$_d/memory_backed" || return 1
	echo 1 >"$_d/power" || return 1
	# The disk is named after the configfs directory (older kernels: nullb<index>).
	_dev=/dev/$1
	[ -e "/sys/block/$1" ] || _dev=/dev/nullb$(cat "$_d/index")
	_i=0
	until [ -b "$_dev" ]; do
		_i=$((_i + 1))
		if [ "$_i" -gt 50 ]; then
			echo "null_blk $1: no block device $_dev; /sys/block has:" /sys/block/* >&2
			return 1
		fi
		sleep 0.1
	done
	echo "$_dev"
}

nvmet_namespace() { # NSID DEVICE
	_ns=$NVMET/subsystems/$NVME_SUBNQN/namespaces/$1
	mkdir "$_ns" && printf '%s' "$2" >"$_ns/device_path" && echo 1 >"$_ns/enable"
}

nvmet_port() { # ID PORT
	_p=$NVMET/ports/$1
	mkdir "$_p" &&
		echo tcp >"$_p/addr_trtype" &&
		echo ipv4 >"$_p/addr_adrfam" &&
		echo 127.0.0.1 >"$_p/addr_traddr" &&
		echo "$2" >"$_p/addr_trsvcid" &&
		ln -s "$NVMET/subsystems/$NVME_SUBNQN" "$_p/subsystems/$NVME_SUBNQN"
}

nvmet_setup() {
	grep -q ' /sys/kernel/config ' /proc/mounts || mount -t configfs none /sys/kernel/config || return 1
	[ -d $NVMET ] || { echo "no $NVMET"; return 1; }
	[ -d /sys/kernel/config/nullb ] || { echo "no null_blk configfs"; return 1; }
	NS1_DEV=$(nullb_create nullb-ns1 256) || { echo "cannot create the namespace 1 null_blk disk"; return 1; }
	_s=$NVMET/subsystems/$NVME_SUBNQN
	mkdir "$NVMET/hosts/$NVME_HOSTNQN" "$_s" || return 1
	echo 0 >"$_s/attr_allow_any_host" || return 1
	ln -s "$NVMET/hosts/$NVME_HOSTNQN" "$_s/allowed_hosts/$NVME_HOSTNQN" || return 1
	if [ -e "$_s/attr_model" ]; then echo "$NVME_MODEL" >"$_s/attr_model" || return 1; fi
	if [ -e "$_s/attr_serial" ]; then echo "$NVME_SERIAL" >"$_s/attr_serial" || return 1; fi
	nvmet_namespace 1 "$NS1_DEV" || return 1
	nvmet_port 1 4420 && nvmet_port 2 8009 || return 1
	if ! guest_wait_listen 4420 10 || ! guest_wait_listen 8009 10; then
		echo "nvmet is not listening on 4420 and 8009"
		return 1
	fi
	echo "nvmet: $NVME_SUBNQN on 127.0.0.1:4420 (+ :8009), namespace 1 = $NS1_DEV," \
		"model '$(cat "$_s/attr_model" 2>/dev/null)', serial '$(cat "$_s/attr_serial" 2>/dev/null)'"
}

# Step 7: the guest is its own target, so it adds namespace 2 here.
nvme_on_add_namespace() {
	trace_on
	_dev=$(nullb_create nullb-ns2 64) || return 1
	nvmet_namespace 2 "$_dev" || return 1
	nvme_log "nvmet: namespace 2 = $_dev enabled"
}

# DPU_NVME_TRACE=1: record what nvmet receives (nvmet_req_init/complete trace
# events) during discover + connect (+ an idle period, for keep-alives) and
# during the namespace-added async event; fio traffic is not traced.
TRACE=/sys/kernel/tracing
trace_on() {
	[ "$NVME_TRACE" = 1 ] || return 0
	echo >$TRACE/trace
	echo 1 >$TRACE/tracing_on
}
trace_dump() { # title
	[ "$NVME_TRACE" = 1 ] || return 0
	echo 0 >$TRACE/tracing_on
	echo "nvmet-trace: ---- $1 ----"
	grep -v '^#' $TRACE/trace | sed 's/^ *//; s/^/nvmet-trace: /'
	echo "nvmet-trace: ---- end ----"
	echo >$TRACE/trace
}
trace_setup() {
	grep -q " $TRACE " /proc/mounts || mount -t tracefs nodev $TRACE || return 1
	echo 8192 >$TRACE/buffer_size_kb
	echo 1 >$TRACE/events/nvmet/nvmet_req_init/enable &&
		echo 1 >$TRACE/events/nvmet/nvmet_req_complete/enable && trace_on
}
nvme_on_connected() {
	[ "$NVME_TRACE" = 1 ] || return 0
	nvme_log "tracing an idle connection for ${NVME_TRACE_IDLE}s (keep-alives)"
	sleep "$NVME_TRACE_IDLE"
	trace_dump "commands nvmet received: discover, connect, nvme list/id-ctrl/id-ns/list-ns, ${NVME_TRACE_IDLE}s idle"
}
nvme_on_namespace_added() {
	sleep 1
	trace_dump "commands nvmet received around the namespace-attribute-changed event"
}

for m in nvmet nvmet_tcp nvme_tcp null_blk ext4; do
	guest_module_loaded "$m" || guest_fail "module $m is not loaded"
done
nvmet_setup || guest_fail "nvmet configfs setup failed"
if [ "$NVME_TRACE" = 1 ]; then trace_setup || guest_fail "cannot enable nvmet tracing"; fi
nvme_checks_run
GUEST
}
