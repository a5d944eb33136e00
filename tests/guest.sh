#!/usr/bin/env bash
# Run one QEMU guest test: tests/guest.sh <test-name>   (tests/guest.sh --list)
#
# Installs what the harness needs (images/deps.sh), fetches Debian's current
# guest kernel (images/fetch-kernel.sh), builds the test's initramfs
# (images/build-initramfs.sh), boots it under QEMU with a watchdog, and exits 0
# only when the test passes. The serial console goes to
# ${DPU_CACHE:-$HOME/.cache/dpu-agent}/guest-logs/<test-name>.log.
#
# A test is tests/guest/<test-name>.sh, sourced by this script (bash, with
# `set -euo pipefail`). It may define:
#
#   GUEST_ARCH=arm64|amd64    required: guest architecture
#   GUEST_MODULES=(...)       kernel modules to load at boot (dependencies are
#                             resolved; virtio-net/virtio-rng are always added)
#   GUEST_FILES=(SRC:DST ...) host files/directories to copy into the image
#   GUEST_BINARIES=(PROG ...) host programs (names found with `command -v`, or
#                             absolute paths) copied into the image at their
#                             host paths with every library `ldd` lists and the
#                             dynamic loader; only when GUEST_ARCH is the host's
#                             architecture (amd64 guests on an x86_64 host)
#   GUEST_HOST_PACKAGES=(PKG ...) Debian packages the test needs on the host
#                             (e.g. the ones providing GUEST_BINARIES);
#                             installed by images/deps.sh when missing
#   GUEST_PORTS=(PORT ...)    guest TCP ports to forward from a free port on the
#                             host's 127.0.0.1 (see guest_host_port)
#   GUEST_TIMEOUT=SECONDS     watchdog for the whole boot, default 180
#   GUEST_MEMORY=MIB          guest memory, default 1024
#   GUEST_SMP=N               guest CPUs, default 1
#   GUEST_CACHE_IMAGE=0|1     reuse identical images from the cache (default 1;
#                             set 0 when the image changes on every run)
#
#   guest_script()            required: print the guest-side script (busybox
#                             sh) on stdout. It runs as /guest/run.sh after
#                             /init has mounted the usual filesystems, loaded
#                             the modules and configured eth0 (10.0.2.15/24,
#                             gateway 10.0.2.2 = the host's loopback). Helpers
#                             from /guest/lib.sh are already defined:
#                             guest_ready, guest_fail MSG,
#                             guest_wait_listen PORT [SECONDS],
#                             guest_module_loaded NAME.
#   guest_prepare()           optional: host-side setup before the image is
#                             built (build binaries, generate certificates,
#                             append to GUEST_FILES).
#   host_check()              optional: host-side check, started once the
#                             guest prints GUEST-READY (guest_ready); the guest
#                             must then stay up (e.g. `wait` on its service).
#   guest_cleanup()           optional: host-side teardown, e.g. stop a server
#                             that guest_prepare started. Runs once when the run
#                             ends for any reason (pass, fail, watchdog,
#                             interrupt) after QEMU and host_check are stopped
#                             and before GUEST_WORK is removed, provided the
#                             run got as far as guest_prepare. Runs in the
#                             harness's shell without errexit, so it can
#                             `wait` for background jobs of guest_prepare;
#                             it must not `exit`. A failure is only logged.
#
# Result: with host_check, the test passes when the guest reached GUEST-READY
# and host_check returned 0; QEMU is then stopped. Without it, the test passes
# when the guest script exits 0, i.e. the console shows `GUEST-RESULT: PASS`.
# A test that outlives its watchdog fails; QEMU is killed and the log's tail is
# printed.
#
# In guest_prepare and host_check these are set: GUEST_TEST, GUEST_WORK (a
# private temporary directory, removed afterwards), GUEST_LOG, GUEST_RELEASE
# (uname -r of the guest kernel), GUEST_KERNEL_DIR, REPO_ROOT; and
# `guest_host_port PORT` prints the host port forwarded to guest PORT.
# Test files must not define other functions starting with guest_ or harness_.
#
# Environment:
#   DPU_CACHE              cache root (kernels, busybox, images, logs)
#   DPU_GUEST_TIMEOUT      overrides GUEST_TIMEOUT
#   DPU_GUEST_ACCEL=tcg    never try KVM (KVM is only used when the guest
#                          matches the host architecture, /dev/kvm is usable,
#                          vmx/svm is in /proc/cpuinfo and the nested "PVM"
#                          module kvm_pvm is not loaded)
#   DPU_GUEST_TAIL=N       lines of console log printed on failure (default 60)
#   DPU_GUEST_KEEP=1       keep GUEST_WORK for inspection
#
# Exit status: 0 pass, 1 fail, 2 usage or setup error, 124 watchdog timeout.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT
readonly TESTS_DIR=$REPO_ROOT/tests/guest
readonly IMAGES_DIR=$REPO_ROOT/images
readonly CACHE_ROOT=${DPU_CACHE:-$HOME/.cache/dpu-agent}

harness_log() { printf 'guest: %s\n' "$*" >&2; }
harness_die() {
	printf 'guest: error: %s\n' "$*" >&2
	exit 2
}

harness_usage() {
	sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
	exit 2
}

harness_list() {
	local f
	for f in "$TESTS_DIR"/*.sh; do
		[[ -e $f ]] || continue
		basename "$f" .sh
	done
}

# ---- state shared with cleanup ---------------------------------------------
QEMU_PID=""
CHECK_PID=""
HARNESS_PHASE=""  # set while test code runs under errexit in this shell
HARNESS_CLEANUP_PENDING=0  # guest_cleanup still to run
GUEST_WORK=""
declare -A HARNESS_PORTS=()

harness_stop() { # pid: stop a process group started under `set -m`
	local pid=$1 _
	[[ -n $pid ]] || return 0
	kill -0 "$pid" 2>/dev/null || return 0
	kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
	for _ in {1..50}; do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL -- "-$pid" 2>/dev/null || true
	{ wait "$pid"; } 2>/dev/null || true
}

harness_cleanup() {
	harness_stop "$CHECK_PID"
	harness_stop "$QEMU_PID"
	CHECK_PID=""
	QEMU_PID=""
	if ((HARNESS_CLEANUP_PENDING)); then
		HARNESS_CLEANUP_PENDING=0
		local rc=0
		guest_cleanup || rc=$?
		((rc == 0)) || harness_log "warning: guest_cleanup failed (status $rc)"
	fi
	if [[ -n $GUEST_WORK && -d $GUEST_WORK ]]; then
		if [[ ${DPU_GUEST_KEEP:-0} == 1 ]]; then
			harness_log "kept work directory $GUEST_WORK"
		else
			rm -rf "$GUEST_WORK"
		fi
	fi
}

harness_on_exit() {
	local rc=$?
	harness_cleanup
	if ((rc != 0)) && [[ -n $HARNESS_PHASE ]]; then
		harness_log "error: $HARNESS_PHASE failed (status $rc)"
		exit 2
	fi
}

trap harness_on_exit EXIT
trap 'harness_log "interrupted"; exit 130' INT TERM

# ---- helpers for test files --------------------------------------------------
guest_host_port() {
	local port=${HARNESS_PORTS[$1]:-}
	[[ -n $port ]] || {
		printf 'guest: error: guest port %s is not in GUEST_PORTS\n' "$1" >&2
		return 1
	}
	printf '%s\n' "$port"
}

# ---- machine -----------------------------------------------------------------
harness_free_port() {
	python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# Echo "kvm" only when it is known to be safe here, else "tcg".
harness_accel() {
	local guest_arch=$1 host_arch
	case "$(uname -m)" in
	x86_64) host_arch=amd64 ;;
	aarch64) host_arch=arm64 ;;
	*) host_arch=unknown ;;
	esac
	if [[ ${DPU_GUEST_ACCEL:-auto} == tcg || $guest_arch != "$host_arch" ]] \
		|| [[ -e /sys/module/kvm_pvm ]] \
		|| ! grep -qwE 'vmx|svm' /proc/cpuinfo \
		|| [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
		echo tcg
	else
		echo kvm
	fi
}

harness_elapsed() { # start_ms
	local now
	now=$(date +%s%3N)
	printf '%d.%01d s' $(((now - $1) / 1000)) $((((now - $1) % 1000) / 100))
}

harness_fail() { # status message
	harness_log "FAIL $GUEST_TEST: $2"
	if [[ -f $GUEST_LOG ]]; then
		printf -- '---- last %s lines of %s ----\n' "${DPU_GUEST_TAIL:-60}" "$GUEST_LOG" >&2
		tail -n "${DPU_GUEST_TAIL:-60}" "$GUEST_LOG" >&2
		printf -- '---- end of console log ----\n' >&2
	fi
	exit "$1"
}

main() {
	(($# == 1)) || harness_usage
	case "$1" in
	-h | --help) harness_usage ;;
	--list)
		harness_list
		return 0
		;;
	esac
	GUEST_TEST=$1
	[[ $GUEST_TEST =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || harness_die "invalid test name '$GUEST_TEST'"
	local test_file=$TESTS_DIR/$GUEST_TEST.sh
	[[ -f $test_file ]] || harness_die "no test '$GUEST_TEST' (no $test_file); available: $(harness_list | tr '\n' ' ')"

	GUEST_ARCH=""
	GUEST_MODULES=()
	GUEST_FILES=()
	GUEST_BINARIES=()
	GUEST_HOST_PACKAGES=()
	GUEST_PORTS=()
	GUEST_TIMEOUT=180
	GUEST_MEMORY=1024
	GUEST_SMP=1
	GUEST_CACHE_IMAGE=1
	# shellcheck source=/dev/null
	source "$test_file"
	case "$GUEST_ARCH" in
	arm64 | amd64) ;;
	*) harness_die "$test_file: GUEST_ARCH must be arm64 or amd64 (got '$GUEST_ARCH')" ;;
	esac
	declare -F guest_script >/dev/null || harness_die "$test_file: guest_script() is not defined"
	local timeout=${DPU_GUEST_TIMEOUT:-$GUEST_TIMEOUT}
	[[ $timeout =~ ^[1-9][0-9]*$ ]] || harness_die "invalid timeout '$timeout'"
	local has_check=0
	declare -F host_check >/dev/null && has_check=1
	if ((${#GUEST_BINARIES[@]})); then
		local host_arch
		host_arch=$(dpkg --print-architecture)
		[[ $GUEST_ARCH == "$host_arch" ]] \
			|| harness_die "$test_file: GUEST_BINARIES copies host programs, so GUEST_ARCH must be the host's architecture ($host_arch), not $GUEST_ARCH"
	fi

	local t0
	t0=$(date +%s%3N)
	GUEST_LOG=$CACHE_ROOT/guest-logs/$GUEST_TEST.log
	mkdir -p "$CACHE_ROOT/guest-logs"
	rm -f "$GUEST_LOG"
	GUEST_WORK=$(mktemp -d "${TMPDIR:-/tmp}/guest-$GUEST_TEST.XXXXXX")
	export GUEST_TEST GUEST_WORK GUEST_LOG REPO_ROOT

	local -a deps=()
	local p
	for p in "${GUEST_HOST_PACKAGES[@]}"; do deps+=(--package "$p"); done
	"$IMAGES_DIR/deps.sh" "${deps[@]}" "$GUEST_ARCH"
	GUEST_KERNEL_DIR=$("$IMAGES_DIR/fetch-kernel.sh" "$GUEST_ARCH")
	local RELEASE="" KERNEL=""
	# shellcheck source=/dev/null
	source "$GUEST_KERNEL_DIR/env"
	GUEST_RELEASE=$RELEASE
	export GUEST_KERNEL_DIR GUEST_RELEASE

	# Test code runs under errexit: a failing command ends the run (status 2).
	declare -F guest_cleanup >/dev/null && HARNESS_CLEANUP_PENDING=1
	if declare -F guest_prepare >/dev/null; then
		harness_log "preparing $GUEST_TEST"
		HARNESS_PHASE=guest_prepare
		guest_prepare
	fi
	HARNESS_PHASE=guest_script
	guest_script >"$GUEST_WORK/run.sh"
	HARNESS_PHASE=""
	local -a build=(--arch "$GUEST_ARCH" --kernel "$GUEST_KERNEL_DIR" --script "$GUEST_WORK/run.sh")
	local m f
	for m in "${GUEST_MODULES[@]}"; do build+=(--module "$m"); done
	for f in "${GUEST_FILES[@]}"; do build+=(--file "$f"); done
	for f in "${GUEST_BINARIES[@]}"; do build+=(--binary "$f"); done
	if [[ $GUEST_CACHE_IMAGE == 0 ]]; then
		build+=(--out "$GUEST_WORK/initramfs.cpio")
	fi
	local initramfs
	initramfs=$("$IMAGES_DIR/build-initramfs.sh" "${build[@]}") || harness_die "initramfs build failed"
	local t_ready
	t_ready=$(harness_elapsed "$t0")

	# Network, with the requested port forwards.
	local netdev=user,id=n0 port hp
	for port in "${GUEST_PORTS[@]}"; do
		[[ $port =~ ^[0-9]+$ ]] || harness_die "GUEST_PORTS entry '$port' is not a port number"
		hp=$(harness_free_port)
		HARNESS_PORTS[$port]=$hp
		netdev+=",hostfwd=tcp:127.0.0.1:$hp-:$port"
		harness_log "forwarding 127.0.0.1:$hp -> guest:$port"
	done

	local accel qemu console
	local -a cpu
	accel=$(harness_accel "$GUEST_ARCH")
	case "$GUEST_ARCH" in
	arm64)
		qemu="qemu-system-aarch64"
		console=ttyAMA0
		cpu=(-M virt -cpu cortex-a72)
		;;
	amd64)
		qemu="qemu-system-x86_64"
		console=ttyS0
		if [[ $accel == kvm ]]; then cpu=(-cpu host); else cpu=(-cpu max); fi
		;;
	esac
	local -a cmd=(
		"$qemu" "${cpu[@]}" -accel "$accel" -m "$GUEST_MEMORY" -smp "$GUEST_SMP"
		-nographic -no-reboot
		-kernel "$KERNEL" -initrd "$initramfs"
		-append "console=$console panic=-1 quiet"
		-netdev "$netdev" -device "virtio-net-pci,netdev=n0,romfile="
		-device virtio-rng-pci
	)
	{
		printf '#'
		printf ' %q' "${cmd[@]}"
		printf '\n'
	} >"$GUEST_LOG"
	harness_log "booting $GUEST_TEST ($GUEST_ARCH, $accel, kernel $GUEST_RELEASE, watchdog ${timeout}s)"
	harness_log "console log: $GUEST_LOG"

	# Own process groups, so the watchdog can stop whole trees.
	set -m
	"${cmd[@]}" </dev/null >>"$GUEST_LOG" 2>&1 &
	QEMU_PID=$!
	set +m

	local t_boot deadline=$((SECONDS + timeout))
	t_boot=$(date +%s%3N)
	local ready=0 result="" check_rc="" reason=""
	while :; do
		if ((ready == 0)) && grep -aq 'GUEST-READY' "$GUEST_LOG"; then
			ready=1
			harness_log "guest ready after $(harness_elapsed "$t_boot")"
			if ((has_check)); then
				set -m
				(host_check) &
				CHECK_PID=$!
				set +m
			fi
		fi
		if [[ -z $result ]] && grep -aq 'GUEST-RESULT: ' "$GUEST_LOG"; then
			result=$(grep -a -m1 -o 'GUEST-RESULT: .*' "$GUEST_LOG" | tr -d '\r')
		fi
		if ((has_check)) && [[ -n $CHECK_PID ]] && ! kill -0 "$CHECK_PID" 2>/dev/null; then
			check_rc=0
			wait "$CHECK_PID" || check_rc=$?
			CHECK_PID=""
			break
		fi
		if ! kill -0 "$QEMU_PID" 2>/dev/null; then
			# QEMU ended by itself: guest powered off, kernel panic or QEMU error.
			wait "$QEMU_PID" 2>/dev/null || true
			QEMU_PID=""
			[[ -n $result ]] || result=$(grep -a -m1 -o 'GUEST-RESULT: .*' "$GUEST_LOG" | tr -d '\r' || true)
			if ((has_check)) && ((ready == 0)); then
				reason="guest stopped before GUEST-READY (${result:-no result marker})"
			elif ((has_check)) && [[ -n $CHECK_PID ]]; then
				# host_check may be reading the guest's last words: it gets 30 s to finish on its own.
				local _
				for _ in {1..300}; do
					kill -0 "$CHECK_PID" 2>/dev/null || break
					sleep 0.1
				done
				if kill -0 "$CHECK_PID" 2>/dev/null; then
					reason="guest stopped while host_check was running (${result:-no result marker})"
				else
					check_rc=0
					wait "$CHECK_PID" || check_rc=$?
					CHECK_PID=""
				fi
			fi
			break
		fi
		if ((!has_check)) && [[ -n $result ]]; then
			# Give the guest a moment to power off, then stop it regardless.
			local _
			for _ in {1..50}; do
				kill -0 "$QEMU_PID" 2>/dev/null || break
				sleep 0.1
			done
			break
		fi
		if ((has_check)) && ((ready == 0)) && [[ -n $result ]]; then
			reason="guest finished before GUEST-READY ($result)"
			break
		fi
		if ((SECONDS >= deadline)); then
			harness_cleanup
			harness_fail 124 "watchdog: no result after ${timeout}s (ready=$ready); QEMU killed"
		fi
		sleep 0.2
	done
	harness_stop "$CHECK_PID"
	harness_stop "$QEMU_PID"
	CHECK_PID=""
	QEMU_PID=""

	local timing
	timing="image ready in $t_ready, guest ran $(harness_elapsed "$t_boot"), total $(harness_elapsed "$t0")"
	[[ -z $reason ]] || harness_fail 1 "$reason"
	if ((has_check)); then
		[[ -n $check_rc ]] || harness_fail 1 "guest stopped before host_check finished (ready=$ready${result:+, $result})"
		((check_rc == 0)) || harness_fail 1 "host_check failed with status $check_rc"
	else
		[[ -n $result ]] || harness_fail 1 "no GUEST-RESULT marker on the console (QEMU error or kernel panic?)"
		[[ $result == "GUEST-RESULT: PASS" ]] || harness_fail 1 "$result"
	fi
	harness_log "PASS $GUEST_TEST ($timing)"
	harness_log "console log: $GUEST_LOG"
}

main "$@"
