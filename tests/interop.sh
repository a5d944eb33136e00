#!/usr/bin/env bash
# Runs independent clients against a real dpu-agent on loopback: Python grpcio with server reflection (plaintext
# and mTLS as operator and as viewer), a client without a certificate (must be refused at TLS), and curl against
# the admin listener. Expects host binaries in ${CARGO_TARGET_DIR:-target}/debug (cargo build).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${CARGO_TARGET_DIR:-$repo/target}/${DPU_PROFILE:-debug}
venv=$("$repo/tests/interop/venv.sh")
command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends curl >/dev/null; }

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_agent NAME ARGS... : starts an agent, waits until it serves, sets $port and $admin_port.
start_agent() {
    local name=$1; shift
    port=$(free_port); admin_port=$(free_port)
    "$bin/dpu-agent" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin_port" "$@" \
        >"$work/$name.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        grep -q "serving the control API" "$work/$name.log" && return 0
        sleep 0.1
    done
    echo "FAIL: agent $name did not start:"; cat "$work/$name.log"; exit 1
}

py=$venv/bin/python
client=$repo/tests/interop/grpc_client.py
arch=$(uname -m)

echo "== plaintext on loopback (grpcio + reflection)"
start_agent plain --data-dir "$work/plain"
"$py" "$client" --addr "127.0.0.1:$port" --expect-arch "$arch"
echo "== admin listener (curl)"
curl -fsS "http://127.0.0.1:$admin_port/metrics" | grep -q '^dpu_api_requests_total{method="/dpu.v1.AgentService/GetAgentInfo"'
curl -fsS "http://127.0.0.1:$admin_port/readyz" | grep -qx ready
echo "metrics and readiness served"

echo "== WatchEvents (grpcio): resume after a dropped stream and across an upgrade (SIGHUP)"
start_agent watch --data-dir "$work/watch"
watch_pid=${pids[-1]}
"$py" "$repo/tests/interop/watch_client.py" --addr "127.0.0.1:$port" --upgrade-pid "$watch_pid"
# The process that took over is a child of the one started here, not in pids: stop whoever serves the port.
for pid in $(ss -Htlnp "sport = :$port" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
    kill "$pid" 2>/dev/null || true
done

echo "== mTLS (grpcio): operator, viewer, no certificate"
"$bin/dpu-agent" certs --out "$work/pki" 2>/dev/null
cat >"$work/tls.toml" <<TOML
data_dir = "tls-data"
[api.tls]
cert = "pki/server.pem"
key = "pki/server-key.pem"
client_ca = "pki/ca.pem"
TOML
start_agent tls --config "$work/tls.toml"
"$py" "$client" --addr "127.0.0.1:$port" --ca "$work/pki/ca.pem" \
    --cert "$work/pki/operator.pem" --key "$work/pki/operator-key.pem" --expect-arch "$arch"
"$py" "$client" --addr "127.0.0.1:$port" --ca "$work/pki/ca.pem" \
    --cert "$work/pki/viewer.pem" --key "$work/pki/viewer-key.pem" --expect-viewer
GRPC_VERBOSITY=NONE "$py" "$client" --addr "127.0.0.1:$port" --ca "$work/pki/ca.pem" --expect-refused
echo "== openssl s_client without a certificate"
# TLS 1.3 sends the server's verdict on the client certificate after the handshake: keep reading for a second.
out=$( (sleep 1) | openssl s_client -connect "127.0.0.1:$port" -CAfile "$work/pki/ca.pem" -alpn h2 2>&1 || true)
if ! grep -q "alert certificate required" <<<"$out"; then
    echo "FAIL: the server did not refuse a TLS client without a certificate:"; echo "$out"; exit 1
fi
echo "refused at TLS: alert certificate required"

echo "== dpuctl as viewer"
"$bin/dpuctl" --addr "https://127.0.0.1:$port" --server-name localhost --ca "$work/pki/ca.pem" \
    --cert "$work/pki/viewer.pem" --key "$work/pki/viewer-key.pem" --json info >"$work/info.json"
"$py" -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["arch"]==sys.argv[2], d' "$work/info.json" "$arch"
if "$bin/dpuctl" --addr "https://127.0.0.1:$port" --server-name localhost --ca "$work/pki/ca.pem" \
    --cert "$work/pki/viewer.pem" --key "$work/pki/viewer-key.pem" settings set --log-filter debug 2>"$work/denied"; then
    echo "FAIL: viewer changed settings"; exit 1
fi
grep -q PermissionDenied "$work/denied" && cat "$work/denied"
echo "interop: PASS"
