# shellcheck shell=bash
# Host-side helpers for guest tests that serve container images: free ports, Debian's docker-registry with a
# test config, the release dpu-agent, dpuctl. Sourced by tests/guest/containerd.sh (bash, set -euo pipefail).
# State lives in files under a work directory, so host_check (a subshell) sees what guest_prepare started.

ih_say() { printf '%s: %s\n' "${IH_NAME:-image-host}" "$*" >&2; }

# Free TCP ports on 127.0.0.1, distinct from each other.
ih_free_ports() { # count
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

ih_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ih_target_dir() {
	local dir=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
	[[ $dir == /* ]] || dir=$REPO_ROOT/$dir
	printf '%s\n' "$dir"
}

# A registry config in WORK/registry.yml: anonymous, filesystem storage in WORK/registry, deletes allowed.
# (Debian's packaged config turns on htpasswd auth.)
ih_registry_config() { # work port
	mkdir -p "$1/registry"
	cat >"$1/registry.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $1/registry
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$2
YML
}

ih_registry_start() { # work port
	docker-registry serve "$1/registry.yml" </dev/null >>"$1/registry.log" 2>&1 &
	printf '%s\n' "$!" >"$1/registry.pid"
	local deadline=$((SECONDS + 30))
	until ih_port_open "$2"; do
		if ! kill -0 "$(cat "$1/registry.pid")" 2>/dev/null || ((SECONDS >= deadline)); then
			ih_say "FAIL: docker-registry does not serve on 127.0.0.1:$2; its log:"
			tail -n 20 "$1/registry.log" >&2
			return 1
		fi
		sleep 0.1
	done
}

ih_registry_stop() { # work port
	local pid _
	pid=$(cat "$1/registry.pid" 2>/dev/null) || return 0
	[[ -n $pid ]] || return 0
	kill -TERM "$pid" 2>/dev/null || true
	for _ in {1..100}; do
		ih_port_open "$2" || break
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
	: >"$1/registry.pid"
}

ih_agent_alive() { # work
	local pid
	pid=$(cat "$1/agent.pid" 2>/dev/null) || return 1
	[[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && [[ $(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null) != Z ]]
}

ih_agent_tail() { # work
	[[ -f $1/agent.log ]] || return 0
	printf -- '---- last 30 lines of the agent log ----\n' >&2
	tail -n 30 "$1/agent.log" >&2
	printf -- '---- end of agent log ----\n' >&2
}

# Starts the release agent with WORK/agent.toml (log appended to WORK/agent.log) and waits until it serves.
ih_agent_start() { # work
	local agent
	agent=$(ih_target_dir)/release/dpu-agent
	RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 "$agent" --config "$1/agent.toml" </dev/null >>"$1/agent.log" 2>&1 &
	printf '%s\n' "$!" >"$1/agent.pid"
	local deadline=$((SECONDS + ${DPU_GUEST_AGENT_TIMEOUT:-60})) served
	served=$(grep -c 'serving the control API' "$1/agent.log" || true)
	served=$((served + 1))
	until (($(grep -c 'serving the control API' "$1/agent.log" || true) >= served)); do
		if ! ih_agent_alive "$1" || ((SECONDS >= deadline)); then
			ih_say "FAIL: dpu-agent did not serve its control API"
			ih_agent_tail "$1"
			return 1
		fi
		sleep 0.2
	done
}

# Stops the agent (SIGTERM, then SIGKILL after 10 s).
ih_agent_stop() { # work
	local pid _
	pid=$(cat "$1/agent.pid" 2>/dev/null) || return 0
	[[ -n $pid ]] || return 0
	kill -TERM "$pid" 2>/dev/null || true
	for _ in {1..100}; do
		ih_agent_alive "$1" || break
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	: >"$1/agent.pid"
}

# ih_dpuctl WORK [--timeout S] ARGS...: dpuctl against the agent with the options in WORK/dpuctl.args (one per
# line); its stdout is ours, the command and any stderr go to stderr.
ih_dpuctl() {
	local work=$1 limit=${DPU_GUEST_DPUCTL_TIMEOUT:-60} rc=0
	shift
	if [[ $1 == --timeout ]]; then
		limit=$2
		shift 2
	fi
	local -a opts
	mapfile -t opts <"$work/dpuctl.args"
	ih_say "dpuctl $*"
	env -u DPUCTL_CA -u DPUCTL_CERT -u DPUCTL_KEY -u DPUCTL_ADDR timeout "$limit" \
		"$(ih_target_dir)/release/dpuctl" "${opts[@]}" "$@" 2>"$work/dpuctl.err" || rc=$?
	sed 's/^/  | /' "$work/dpuctl.err" >&2
	if ((rc != 0)); then
		ih_say "FAIL: dpuctl $* failed (status $rc)"
		ih_agent_tail "$work"
		return 1
	fi
}

# A CA, a server certificate for the agent (SAN 127.0.0.1 and 10.0.2.2, the host as the guest sees it) and a
# client certificate with the agent's operator role (OU=operator), EC P-256, in DIR: ca.pem, agent.pem,
# agent-key.pem, host.pem, host-key.pem.
ih_api_certs() { # dir
	local dir=$1 name
	mkdir -p "$dir"
	openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/ca-key.pem" 2>/dev/null
	openssl req -x509 -new -key "$dir/ca-key.pem" -subj "/O=dpu-agent-test/CN=API test CA" -days 2 -sha256 \
		-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
		-out "$dir/ca.pem" 2>/dev/null
	for name in agent host; do
		openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/$name-key.pem" 2>/dev/null
		openssl req -new -key "$dir/$name-key.pem" -subj "/O=dpu-agent-test/OU=operator/CN=$name" -out "$dir/$name.csr" 2>/dev/null
		printf '%s\n' "basicConstraints = critical, CA:FALSE" "keyUsage = critical, digitalSignature" \
			"extendedKeyUsage = serverAuth, clientAuth" \
			"subjectAltName = DNS:$name, IP:127.0.0.1, IP:10.0.2.2" >"$dir/$name.ext"
		openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" -CAcreateserial \
			-days 2 -sha256 -extfile "$dir/$name.ext" -out "$dir/$name.pem" 2>/dev/null
		rm -f "$dir/$name.csr" "$dir/$name.ext"
	done
	rm -f "$dir"/*.srl
}
