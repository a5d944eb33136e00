# The Linux kernel's NVMe/TCP initiator against dpu-agent's NVMe/TCP target.
#
# Host side: starts the host build of dpu-agent (plaintext API on loopback)
# with a [storage] section, configures it with dpuctl (two malloc volumes,
# subsystem nqn.2026-11.io.dpu-agent:guest-test with serial DPU0001, model
# "dpu-agent test" and one allowed host, namespace 1 = vol1 (256 MiB), a TCP
# listener), then boots an amd64 guest that runs the shared initiator checks
# (tests/guest/lib/nvme-checks.sh: discover, connect, ext4, fio verify,
# digests, host allow list, namespace-added async event) against 10.0.2.2,
# which QEMU user networking maps to the host's 127.0.0.1.
#
# Choreography: the guest prints GUEST-READY, then `GUEST-STEP: <name>` per
# step. host_check follows the console log; on `GUEST-STEP: add-namespace` it
# runs `dpuctl storage namespace create sub1 ns2 --volume vol2` while the
# guest stays connected and waits for namespace 2 (DPU_NVME_AEN_TIMEOUT). The
# test passes when the guest prints `NVME-CHECKS: PASS` (the guest then idles
# until QEMU is stopped); a guest failure (`nvme-check: FAIL [...]`,
# GUEST-RESULT: FAIL), a dpuctl failure or the agent exiting fails it.
# guest_cleanup stops the agent; its log is kept next to the console log as
# <name>.agent.log.
#
# tests/guest/nvmet-reference.sh runs the same checks against the kernel's own
# target and must pass: when this test fails and the reference passes, look
# at the target.
#
# Builds `cargo build --locked --release --bin dpu-agent --bin dpuctl` unless
# DPU_GUEST_NO_BUILD=1 (then uses ${CARGO_TARGET_DIR:-<repo>/target}/release).
#
# tests/guest/spdk-engine.sh runs this test with NVME_ENGINE=spdk: the agent
# is built with the `spdk` feature (debug profile) and started with
# [storage.spdk]; the subsystem has engine spdk, so SPDK's NVMe-oF target in
# the agent serves it. Namespace 1 is then an SPDK malloc bdev (the volume
# created with --spdk-create malloc), namespace 2 one of the agent's file
# volumes through the Rust bdev module, which also gets the ext4 check. The
# discovery step is left out (SPDK's discovery service is not configured).
# Environment: DPU_NVME_AGENT_TIMEOUT (s to wait for the agent to serve, 60),
# DPU_NVME_DPUCTL_TIMEOUT (s per dpuctl call, 60), RUST_LOG (agent, default
# info), and the DPU_NVME_* sizes and timeouts of tests/guest/lib/nvme-common.sh.
# shellcheck shell=bash disable=SC2034 # variables are read by tests/guest.sh

# shellcheck source=lib/nvme-common.sh
source "$REPO_ROOT/tests/guest/lib/nvme-common.sh"

GUEST_TIMEOUT=600
# The guest script carries this run's port numbers.
GUEST_CACHE_IMAGE=0

NVME_AGENT_PID=""
NVME_ENGINE=${NVME_ENGINE:-native}
NVME_API_PORT=""
NVME_IO_PORT=""
NVME_DISC_PORT=""

nvme_target_dir() {
	local dir=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
	[[ $dir == /* ]] || dir=$REPO_ROOT/$dir
	printf '%s\n' "$dir"
}

nvme_say() { printf 'nvme-initiator(%s): %s\n' "$NVME_ENGINE" "$*" >&2; }

# The profile the binaries come from: SPDK's engine is built in debug (the
# release build of the suite stays free of SPDK).
nvme_profile() { if [[ $NVME_ENGINE == spdk ]]; then echo debug; else echo release; fi; }

nvme_agent_log() { printf '%s\n' "${GUEST_LOG%.log}.agent.log"; }

nvme_agent_tail() {
	[[ -f $GUEST_WORK/agent.log ]] || return 0
	printf -- '---- last 30 lines of the agent log (%s) ----\n' "$(nvme_agent_log)" >&2
	tail -n 30 "$GUEST_WORK/agent.log" >&2
	printf -- '---- end of agent log ----\n' >&2
}

# Free TCP ports on 127.0.0.1, distinct from each other.
nvme_free_ports() { # count
	python3 - "$1" <<'PY'
import socket
import sys

socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# nvme_dpuctl ARGS...: run dpuctl against the agent; on failure say which
# command failed and why.
nvme_dpuctl() {
	local out rc=0
	local -a cmd=("$(nvme_target_dir)/$(nvme_profile)/dpuctl" --addr "http://127.0.0.1:$NVME_API_PORT" "$@")
	nvme_say "dpuctl $*"
	out=$(env -u DPUCTL_CA -u DPUCTL_CERT -u DPUCTL_KEY -u DPUCTL_ADDR \
		timeout "${DPU_NVME_DPUCTL_TIMEOUT:-60}" "${cmd[@]}" 2>&1) || rc=$?
	[[ -z $out ]] || printf '%s\n' "$out" | sed 's/^/  | /' >&2
	if ((rc != 0)); then
		((rc != 124)) || out="timed out after ${DPU_NVME_DPUCTL_TIMEOUT:-60}s; $out"
		nvme_say "FAIL: dpuctl $* failed (status $rc): ${out:-no output}"
		nvme_agent_tail
		return 1
	fi
}

nvme_agent_alive() {
	[[ -n $NVME_AGENT_PID ]] && kill -0 "$NVME_AGENT_PID" 2>/dev/null
}

guest_prepare() {
	local target agent dpuctl
	target=$(nvme_target_dir)
	agent=$target/$(nvme_profile)/dpu-agent
	dpuctl=$target/$(nvme_profile)/dpuctl
	local -a build=(--release)
	[[ $NVME_ENGINE != spdk ]] || build=(--features dpu-agent/spdk)
	if [[ ${DPU_GUEST_NO_BUILD:-0} != 1 ]]; then
		nvme_say "building host dpu-agent and dpuctl (${build[*]})"
		(cd "$REPO_ROOT" && cargo build --locked "${build[@]}" --bin dpu-agent --bin dpuctl) >&2 || return 1
	fi
	local f
	for f in "$agent" "$dpuctl"; do
		[[ -x $f ]] || {
			nvme_say "FAIL: $(basename "$f") not found at $f (build it, or unset DPU_GUEST_NO_BUILD)"
			return 1
		}
	done

	local api admin
	read -r api admin NVME_DISC_PORT NVME_IO_PORT <<<"$(nvme_free_ports 4)"
	NVME_API_PORT=$api
	mkdir -p "$GUEST_WORK/data"
	cat >"$GUEST_WORK/agent.toml" <<TOML
data_dir = "$GUEST_WORK/data"

[api]
listen = "127.0.0.1:$api"

[admin]
listen = "127.0.0.1:$admin"

[storage]
discovery_listen = "127.0.0.1:$NVME_DISC_PORT"
TOML
	if [[ $NVME_ENGINE == spdk ]]; then
		# SPDK polls its core all the time: give it the second CPU, leave the first to QEMU.
		cat >>"$GUEST_WORK/agent.toml" <<TOML

[storage.spdk]
cores = "${DPU_SPDK_CORES:-0x2}"
mem_size_mib = 1024
TOML
	fi
	nvme_say "starting $agent (API :$api, admin :$admin, discovery :$NVME_DISC_PORT; I/O listener will be :$NVME_IO_PORT)"
	RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 "$agent" --config "$GUEST_WORK/agent.toml" \
		</dev/null >"$GUEST_WORK/agent.log" 2>&1 &
	NVME_AGENT_PID=$!

	local deadline=$((SECONDS + ${DPU_NVME_AGENT_TIMEOUT:-60}))
	until grep -q 'serving the control API' "$GUEST_WORK/agent.log"; do
		if ! nvme_agent_alive; then
			local rc=0
			wait "$NVME_AGENT_PID" || rc=$?
			NVME_AGENT_PID=""
			nvme_say "FAIL: dpu-agent exited with status $rc before serving the control API"
			nvme_agent_tail
			return 1
		fi
		if ((SECONDS >= deadline)); then
			nvme_say "FAIL: dpu-agent did not log 'serving the control API' within ${DPU_NVME_AGENT_TIMEOUT:-60}s"
			nvme_agent_tail
			return 1
		fi
		sleep 0.2
	done
	nvme_say "dpu-agent is serving (pid $NVME_AGENT_PID)"

	if [[ $NVME_ENGINE == spdk ]]; then
		nvme_dpuctl storage volume create vol1 --spdk-bdev Malloc1 --spdk-create malloc --size 256MiB || return 1
		nvme_dpuctl storage volume create vol2 --file "$GUEST_WORK/vol2.img" --size 64MiB || return 1
	else
		nvme_dpuctl storage volume create vol1 --malloc --size 256MiB || return 1
		nvme_dpuctl storage volume create vol2 --malloc --size 64MiB || return 1
	fi
	nvme_dpuctl storage subsystem create sub1 --nqn "$NVME_SUBNQN" --serial "$NVME_SERIAL" \
		--model "$NVME_MODEL" --host "$NVME_HOSTNQN" --engine "$NVME_ENGINE" || return 1
	nvme_dpuctl storage namespace create sub1 ns1 --volume vol1 || return 1
	nvme_dpuctl storage listener create sub1 tcp --address "127.0.0.1:$NVME_IO_PORT" || return 1
	nvme_say "target configured: $NVME_SUBNQN on 127.0.0.1:$NVME_IO_PORT (guest: 10.0.2.2:$NVME_IO_PORT)"
}

guest_script() {
	nvme_checks_script NVME_TRADDR=10.0.2.2 "NVME_TRSVCID=$NVME_IO_PORT" "NVME_DISC_TRSVCID=$NVME_DISC_PORT" \
		"NVME_ENGINE=$NVME_ENGINE"
	cat <<'GUEST'

# ---- nvme-initiator driver ----
for m in nvme_tcp nvme_fabrics ext4; do
	guest_module_loaded "$m" || guest_fail "module $m is not loaded"
done
if [ "$NVME_ENGINE" = spdk ]; then
	# SPDK's target has no discovery service here; namespace 2 (the agent's file volume through the Rust
	# bdev module) gets the filesystem check too.
	nvme_check_discover() { nvme_log "discovery skipped: SPDK engine"; }
	nvme_on_namespace_added() {
		_dev1_saved=$NVME_DEV
		NVME_DEV=$_dev2
		nvme_check_filesystem
		NVME_DEV=$_dev1_saved
		nvme_step aen
	}
fi
guest_ready
nvme_checks_run
# host_check ends the test when it sees the marker above; stay up until then.
sleep 3600
GUEST
}

host_check() {
	local done_lines=0 lines line added=0
	while :; do
		if ! nvme_agent_alive; then
			nvme_say "FAIL: dpu-agent exited while the guest was running"
			nvme_agent_tail
			return 1
		fi
		# Complete console lines not seen yet (wc -l skips a partial last line).
		lines=$(wc -l <"$GUEST_LOG")
		if ((lines > done_lines)); then
			while IFS= read -r line; do
				line=${line%$'\r'}
				case "$line" in
				"GUEST-STEP: add-namespace")
					if ((added == 0)); then
						added=1
						nvme_say "guest asks for namespace 2"
						nvme_dpuctl storage namespace create sub1 ns2 --volume vol2 || return 1
					fi
					;;
				"GUEST-STEP: "*) nvme_say "guest step: ${line#GUEST-STEP: }" ;;
				"nvme-check: FAIL"* | "guest: FAIL"* | "GUEST-RESULT: "*)
					nvme_say "guest: $line"
					nvme_agent_tail
					return 1
					;;
				"NVME-CHECKS: PASS")
					nvme_say "all guest checks passed"
					return 0
					;;
				esac
			done < <(sed -n "$((done_lines + 1)),${lines}p" "$GUEST_LOG")
			done_lines=$lines
		fi
		sleep 0.5
	done
}

guest_cleanup() {
	if [[ -n $NVME_AGENT_PID ]]; then
		if kill -0 "$NVME_AGENT_PID" 2>/dev/null; then
			kill -TERM "$NVME_AGENT_PID" 2>/dev/null
			local _
			for _ in {1..100}; do
				kill -0 "$NVME_AGENT_PID" 2>/dev/null || break
				# A zombie still answers kill -0: reap it.
				if [[ $(awk '{ print $3 }' "/proc/$NVME_AGENT_PID/stat" 2>/dev/null) == Z ]]; then break; fi
				sleep 0.1
			done
			kill -KILL "$NVME_AGENT_PID" 2>/dev/null
		fi
		wait "$NVME_AGENT_PID" 2>/dev/null
		NVME_AGENT_PID=""
	fi
	if [[ -f $GUEST_WORK/agent.log ]]; then
		cp "$GUEST_WORK/agent.log" "$(nvme_agent_log)" && nvme_say "agent log: $(nvme_agent_log)"
	fi
	return 0
}
