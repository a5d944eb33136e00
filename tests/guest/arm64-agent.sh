# The agent on its real architecture: boot the static aarch64 dpu-agent in an
# arm64 guest with a development mTLS PKI, forward its gRPC port to the host,
# and check from the host with dpuctl that it answers `info` over mTLS and
# reports the guest's architecture and kernel.
#
# Builds (incremental): cross/build.sh for the aarch64 musl agent, and
# `cargo build --locked --release --bin dpu-agent --bin dpuctl` for the host tools.
# Set DPU_GUEST_NO_BUILD=1 to use binaries already in the target directory
# (${CARGO_TARGET_DIR:-<repo>/target}), e.g. when CI has built them earlier in
# the same run.
# shellcheck shell=bash disable=SC2034 # variables are read by tests/guest.sh

GUEST_ARCH=arm64
# What the DPU's kernel offers the agent; its `info` capabilities probe them.
GUEST_MODULES=(tls af_alg algif_hash algif_skcipher algif_aead cls_flower sch_ingress xfrm_user)
GUEST_PORTS=(50051)
GUEST_TIMEOUT=240
# Fresh certificates every run, so the image never repeats.
GUEST_CACHE_IMAGE=0

agent_target_dir() {
	local dir=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
	[[ $dir == /* ]] || dir=$REPO_ROOT/$dir
	printf '%s\n' "$dir"
}

agent_need_file() { # path description
	[[ -f $1 ]] || {
		printf 'arm64-agent: %s not found at %s\n' "$2" "$1" >&2
		return 1
	}
}

guest_prepare() {
	local target guest_bin host_agent dpuctl pki
	target=$(agent_target_dir)
	guest_bin=$target/aarch64-unknown-linux-musl/dist/dpu-agent
	host_agent=$target/release/dpu-agent
	dpuctl=$target/release/dpuctl

	if [[ ${DPU_GUEST_NO_BUILD:-0} != 1 ]]; then
		agent_need_file "$REPO_ROOT/cross/build.sh" "the aarch64 build script" || return 1
		printf 'arm64-agent: building the static aarch64 agent (cross/build.sh)\n' >&2
		(cd "$REPO_ROOT" && bash cross/build.sh) >&2 || return 1
		printf 'arm64-agent: building host dpu-agent and dpuctl\n' >&2
		(cd "$REPO_ROOT" && cargo build --locked --release --bin dpu-agent --bin dpuctl) >&2 || return 1
	fi
	agent_need_file "$guest_bin" "static aarch64 dpu-agent" || return 1
	agent_need_file "$host_agent" "host dpu-agent" || return 1
	agent_need_file "$dpuctl" "host dpuctl" || return 1

	pki=$GUEST_WORK/pki
	mkdir -p "$pki"
	"$host_agent" certs --out "$pki" --san 127.0.0.1 --san localhost >&2 || return 1
	local f
	for f in ca.pem server.pem server-key.pem viewer.pem viewer-key.pem; do
		agent_need_file "$pki/$f" "generated $f" || return 1
	done

	cat >"$GUEST_WORK/agent.toml" <<'TOML'
data_dir = "/var/lib/dpu-agent"

[api]
listen = "0.0.0.0:50051"

[api.tls]
cert = "/etc/dpu-agent/server.pem"
key = "/etc/dpu-agent/server-key.pem"
client_ca = "/etc/dpu-agent/ca.pem"

[admin]
listen = "0.0.0.0:9100"
TOML

	GUEST_FILES+=(
		"$guest_bin:/usr/bin/dpu-agent"
		"$GUEST_WORK/agent.toml:/etc/dpu-agent/agent.toml"
		"$pki/ca.pem:/etc/dpu-agent/ca.pem"
		"$pki/server.pem:/etc/dpu-agent/server.pem"
		"$pki/server-key.pem:/etc/dpu-agent/server-key.pem"
	)
}

guest_script() {
	cat <<'GUEST'
mkdir -p /var/lib/dpu-agent
chmod 0755 /usr/bin/dpu-agent
export RUST_LOG="${RUST_LOG:-info}" NO_COLOR=1
echo "guest: starting dpu-agent"
dpu-agent --config /etc/dpu-agent/agent.toml &
agent=$!
waited=0
until guest_wait_listen 50051 1; do
	if ! kill -0 "$agent" 2>/dev/null; then
		rc=0
		wait "$agent" || rc=$?
		guest_fail "dpu-agent exited with status $rc before listening on :50051"
	fi
	waited=$((waited + 1))
	[ "$waited" -lt 120 ] || guest_fail "dpu-agent is not listening on :50051 after 120 s"
done
echo "guest: dpu-agent is listening on :50051"
guest_ready
rc=0
wait "$agent" || rc=$?
echo "guest: dpu-agent exited with status $rc"
exit "$rc"
GUEST
}

host_check() {
	local port target pki out deadline=$((SECONDS + 60))
	port=$(guest_host_port 50051)
	target=$(agent_target_dir)
	pki=$GUEST_WORK/pki
	local -a dpuctl=(
		"$target/release/dpuctl" --addr "https://127.0.0.1:$port"
		--ca "$pki/ca.pem" --cert "$pki/viewer.pem" --key "$pki/viewer-key.pem"
		--json info
	)
	# TCG is slow: the first TLS handshake can take a while.
	until out=$(timeout 30 "${dpuctl[@]}" 2>"$GUEST_WORK/dpuctl.err"); do
		if ((SECONDS >= deadline)); then
			printf 'arm64-agent: dpuctl info kept failing for 60 s; last error:\n' >&2
			cat "$GUEST_WORK/dpuctl.err" >&2
			return 1
		fi
		sleep 2
	done
	printf 'arm64-agent: dpuctl info: %s\n' "$out" >&2
	python3 - "$GUEST_RELEASE" "$out" <<'PY'
import json
import sys

want_kernel, raw = sys.argv[1], sys.argv[2]
try:
    info = json.loads(raw)
except ValueError as e:
    sys.exit(f"arm64-agent: dpuctl output is not JSON: {e}")
if not isinstance(info, dict):
    sys.exit("arm64-agent: dpuctl output is not a JSON object")
errors = []
if info.get("arch") != "aarch64":
    errors.append(f"arch is {info.get('arch')!r}, want 'aarch64'")
if info.get("kernel") != want_kernel:
    errors.append(f"kernel is {info.get('kernel')!r}, want {want_kernel!r}")
if errors:
    sys.exit("arm64-agent: " + "; ".join(errors))
print(f"arm64-agent: agent reports {info['arch']} / {info['kernel']}", file=sys.stderr)
PY
}
