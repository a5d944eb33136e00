# IPsec tunnels against a peer configured by hand with iproute2's `ip xfrm`, in an amd64 guest whose kernel has
# xfrm, ESP and the AEADs (the host's has no ESP algorithms).
#
# Topology in the guest: the agent's side is the root namespace (outer 192.168.77.1 on veth0, inner 10.1.0.1);
# the peer is namespace `peer` (outer 192.168.77.2 on veth1, inner 10.2.0.1). Keys are 36 random bytes each
# (AES-256-GCM + salt, RFC 4106), made on the host, imported with `dpuctl crypto key create --hex`, and given to
# the peer's `ip xfrm state add … aead 'rfc4106(gcm(aes))' 0x… 128` as hex.
#
# Checks:
#   refusals    require-hardware on veth0 (no esp-hw-offload) and a key of the wrong algorithm: FAILED_PRECONDITION
#   programmed  `ip xfrm state` / `ip xfrm policy` (iproute2 as the independent reader) show the agent's two states
#               and three policies with request id 0xd9…; the tunnel's status is ready, placed in software, saying why
#   traffic     ping and iperf3 between 10.1.0.1 and 10.2.0.1 through the tunnel; the peer's kernel counts ESP
#               packets decrypted on its inbound state and encrypted on its outbound one
#   metrics     dpu_ipsec_sa_packets for both directions of the tunnel
#   drift       the agent's outbound state deleted with `ip xfrm state delete` comes back (drift_seconds = 2), and
#               traffic flows again
#   rekey       `dpuctl crypto tunnel update` to new SPIs and keys during a ping every 0.2 s: no packet lost, the
#               replaced states carry the kernel's expiry and are gone after the overlap, the new ones carry
#               the traffic
#   keys        neither key's hex appears in the data directory, the agent's log or the API's answers
#   delete      deleting the tunnel leaves no state or policy of the agent's, and traffic stops
#
# Builds `cargo build --locked --release --bin dpu-agent --bin dpuctl` unless DPU_GUEST_NO_BUILD=1.
# shellcheck shell=bash disable=SC2034 # variables are read by tests/guest.sh

GUEST_ARCH=amd64
# ESP in tunnel mode with rfc4106(gcm(aes)); seqiv makes its IVs from a salt drawn from the kernel's stdrng
# (drbg). The guest has no module loader for requests.
GUEST_MODULES=(veth xfrm_user esp4 gcm ghash_generic ctr seqiv drbg)
GUEST_HOST_PACKAGES=(iproute2 iperf3)
GUEST_MEMORY=1024
GUEST_TIMEOUT=300
# The agent binary changes with every build; the keys are new every run.
GUEST_CACHE_IMAGE=0

# shellcheck source=tests/guest/lib/image-host.sh
source "$REPO_ROOT/tests/guest/lib/image-host.sh"
IH_NAME=ipsec

IPSEC_BIN=$(ih_target_dir)/release
# iproute2's ip by its full path: busybox has an `ip` applet without xfrm or netns.
IPSEC_IP=$(PATH=/usr/sbin:/usr/bin:/sbin:/bin command -v ip)
GUEST_BINARIES=("$IPSEC_BIN/dpu-agent" "$IPSEC_BIN/dpuctl" "$IPSEC_IP" iperf3)
GUEST_FILES=()

guest_prepare() {
	if [[ ${DPU_GUEST_NO_BUILD:-0} != 1 ]]; then
		ih_say "building dpu-agent and dpuctl (release)"
		(cd "$REPO_ROOT" && cargo build --locked --release --bin dpu-agent --bin dpuctl) >&2 || return 1
	fi
	local name
	for name in out in out2 in2; do
		head -c 36 /dev/urandom | od -An -v -tx1 | tr -d ' \n' >"$GUEST_WORK/key-$name.hex"
	done
	head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n' >"$GUEST_WORK/key-gcm.hex"
	cat >"$GUEST_WORK/agent.toml" <<'TOML'
data_dir = "/var/lib/dpu-agent"

[api]
listen = "127.0.0.1:50051"

[admin]
listen = "127.0.0.1:9100"

[reconcile]
drift_seconds = 2
TOML
	GUEST_FILES+=("$GUEST_WORK/agent.toml:/etc/ipsec/agent.toml" "$GUEST_WORK/key-out.hex:/etc/ipsec/key-out.hex"
		"$GUEST_WORK/key-in.hex:/etc/ipsec/key-in.hex" "$GUEST_WORK/key-gcm.hex:/etc/ipsec/key-gcm.hex"
		"$GUEST_WORK/key-out2.hex:/etc/ipsec/key-out2.hex" "$GUEST_WORK/key-in2.hex:/etc/ipsec/key-in2.hex")
}

guest_script() {
	printf 'BIN=%s\nIP=%s\n' "$IPSEC_BIN" "$IPSEC_IP"
	cat <<'GUEST'
export IP
# iproute2 for this script and for the `sh -c` checks below (which see $IP, not this function).
ip() { "$IP" "$@"; }
STEP=setup
say() { echo "ipsec: $*"; }
fail() {
	say "FAIL [$STEP]: $*"
	ip xfrm state 2>&1 | sed 's/^/xfrm state: /'
	ip xfrm policy 2>&1 | sed 's/^/xfrm policy: /'
	tail -n 40 /tmp/agent.log | sed 's/^/agent: /'
	dpuctl --json crypto tunnel list 2>&1 | sed 's/^/tunnels: /'
	guest_fail "[$STEP] $*"
}
step() { STEP=$1; echo "GUEST-STEP: $1"; }
dpuctl() { "$BIN/dpuctl" --addr http://127.0.0.1:50051 "$@"; }
KEY_OUT=$(cat /etc/ipsec/key-out.hex)
KEY_IN=$(cat /etc/ipsec/key-in.hex)
KEY_OUT2=$(cat /etc/ipsec/key-out2.hex)
KEY_IN2=$(cat /etc/ipsec/key-in2.hex)
# ping through the tunnel from the agent's inner address; 0 when an answer came back.
through() { ping -c "${1:-2}" -W 2 -I 10.1.0.1 10.2.0.1 >/tmp/ping.txt 2>&1; }
wait_for() { # seconds, command...: polls every 0.2 s
	_n=$(($1 * 5))
	shift
	while ! "$@"; do
		_n=$((_n - 1))
		[ "$_n" -gt 0 ] || return 1
		sleep 0.2
	done
}

step topology
ip link set lo up
ip link add veth0 type veth peer name veth1 || fail "veth"
ip netns add peer || fail "ip netns add"
ip link set veth1 netns peer
ip addr add 192.168.77.1/24 dev veth0
ip link set veth0 up
ip addr add 10.1.0.1/32 dev lo
ip -n peer link set lo up
ip -n peer addr add 192.168.77.2/24 dev veth1
ip -n peer link set veth1 up
ip -n peer addr add 10.2.0.1/32 dev lo
ip route add 10.2.0.0/24 via 192.168.77.2 src 10.1.0.1
ip -n peer route add 10.1.0.0/24 via 192.168.77.1 src 10.2.0.1
through 1 || fail "no plain connectivity before the tunnel: $(cat /tmp/ping.txt)"

step agent
mkdir -p /var/lib/dpu-agent
RUST_LOG=${AGENT_LOG:-info,dpu_fabric::ipsec=debug} NO_COLOR=1 "$BIN/dpu-agent" --config /etc/ipsec/agent.toml </dev/null >/tmp/agent.log 2>&1 &
wait_for 30 grep -q "serving the control API" /tmp/agent.log || fail "the agent did not serve within 30 s"
dpuctl crypto key create k-out --algorithm aes-256-gcm-esp --hex --material-file /etc/ipsec/key-out.hex >/tmp/api.txt \
	|| fail "importing k-out"
dpuctl crypto key create k-in --algorithm aes-256-gcm-esp --hex --material-file /etc/ipsec/key-in.hex >>/tmp/api.txt \
	|| fail "importing k-in"
dpuctl crypto key create k-gcm --algorithm aes-256-gcm --hex --material-file /etc/ipsec/key-gcm.hex >>/tmp/api.txt \
	|| fail "importing k-gcm"
TUNNEL="--local 192.168.77.1 --remote 192.168.77.2 --local-subnet 10.1.0.0/24 --remote-subnet 10.2.0.0/24
	--spi-out 0x1001 --spi-in 0x1002"

step refusals
# shellcheck disable=SC2086 # TUNNEL is a list of options
if dpuctl crypto tunnel create hw $TUNNEL --key-out k-out --key-in k-in --device veth0 --policy require-hardware \
	>/tmp/refusal.txt 2>&1; then
	fail "a require-hardware tunnel on veth0 (no esp-hw-offload) was accepted"
fi
grep -q "FailedPrecondition" /tmp/refusal.txt && grep -q "esp-hw-offload" /tmp/refusal.txt \
	|| fail "the refusal does not say FailedPrecondition and esp-hw-offload: $(cat /tmp/refusal.txt)"
say "ok: $(cat /tmp/refusal.txt)"
# shellcheck disable=SC2086
if dpuctl crypto tunnel create wrong $TUNNEL --key-out k-gcm --key-in k-in >/tmp/refusal.txt 2>&1; then
	fail "a tunnel with an aes-256-gcm (not ESP) key was accepted"
fi
grep -q "FailedPrecondition" /tmp/refusal.txt && grep -q "aes-256-gcm-esp" /tmp/refusal.txt \
	|| fail "the wrong-key refusal does not name the ESP algorithms: $(cat /tmp/refusal.txt)"
say "ok: $(cat /tmp/refusal.txt)"

step programmed
# shellcheck disable=SC2086
dpuctl crypto tunnel create east $TUNNEL --key-out k-out --key-in k-in >>/tmp/api.txt || fail "creating the tunnel"
wait_for 10 sh -c '[ "$("$IP" xfrm state | grep -c "proto esp spi 0x0000100[12]")" -eq 2 ]' \
	|| fail "the agent's two ESP states are not in the kernel"
wait_for 10 sh -c '[ "$("$IP" xfrm policy | grep -c "tmpl src")" -ge 3 ]' || fail "the agent's three policies are not in the kernel"
ip xfrm state | sed 's/^/xfrm state: /' | grep -v "aead\|enc \|auth" || true
ip xfrm policy | sed 's/^/xfrm policy: /'
ip xfrm state | grep -q "aead rfc4106(gcm(aes)) 0x$KEY_OUT 128" || fail "the outbound state does not carry k-out"
ip xfrm policy | grep -q "src 10.1.0.0/24 dst 10.2.0.0/24" || fail "no outbound policy for 10.1.0.0/24 → 10.2.0.0/24"
ip xfrm policy | grep -q "dir fwd" || fail "no fwd policy"
dpuctl --json crypto tunnel get east >/tmp/tunnel.json || fail "dpuctl crypto tunnel get"
cat /tmp/tunnel.json >>/tmp/api.txt
grep -q '"state": *"ready"' /tmp/tunnel.json || fail "the tunnel is not ready: $(cat /tmp/tunnel.json)"
grep -q '"hardware": *false' /tmp/tunnel.json && grep -q "no offload device" /tmp/tunnel.json \
	|| fail "the tunnel does not say it runs in software and why: $(cat /tmp/tunnel.json)"
say "ok: programmed; $(tr -d '\n' </tmp/tunnel.json | sed 's/  */ /g')"

step peer
ip -n peer xfrm state add src 192.168.77.1 dst 192.168.77.2 proto esp spi 0x1001 reqid 7 mode tunnel \
	aead 'rfc4106(gcm(aes))' "0x$KEY_OUT" 128 || fail "peer: state in"
ip -n peer xfrm state add src 192.168.77.2 dst 192.168.77.1 proto esp spi 0x1002 reqid 7 mode tunnel \
	aead 'rfc4106(gcm(aes))' "0x$KEY_IN" 128 || fail "peer: state out"
ip -n peer xfrm policy add src 10.2.0.0/24 dst 10.1.0.0/24 dir out \
	tmpl src 192.168.77.2 dst 192.168.77.1 proto esp reqid 7 mode tunnel || fail "peer: policy out"
for dir in in fwd; do
	ip -n peer xfrm policy add src 10.1.0.0/24 dst 10.2.0.0/24 dir "$dir" \
		tmpl src 192.168.77.1 dst 192.168.77.2 proto esp reqid 7 mode tunnel || fail "peer: policy $dir"
done

step traffic
through 3 || fail "no ping through the tunnel: $(cat /tmp/ping.txt)"
ip netns exec peer iperf3 -s -1 -B 10.2.0.1 >/tmp/iperf-server.txt 2>&1 &
sleep 1
iperf3 -c 10.2.0.1 -B 10.1.0.1 -t 2 >/tmp/iperf.txt 2>&1 || fail "iperf3 through the tunnel: $(tail -n 5 /tmp/iperf.txt)"
grep -E "sender|receiver" /tmp/iperf.txt | sed 's/^/iperf3: /'
ip -n peer -s xfrm state >/tmp/peer-states.txt
sed 's/^/peer: /' /tmp/peer-states.txt | grep -v "aead"
# Each state's "lifetime current" block ends with "<bytes>(bytes), <packets>(packets)".
packets=$(grep -o '[0-9]*(packets)' /tmp/peer-states.txt | tr -d '(packets)')
n=0
for p in $packets; do [ "$p" -gt 0 ] && n=$((n + 1)); done
[ "$n" -ge 2 ] || fail "the peer's kernel did not count ESP on both of its states: $packets"
say "ok: ping and iperf3 through ESP; the peer's states counted packets $(echo $packets)"

step metrics
wget -qO /tmp/metrics.txt http://127.0.0.1:9100/metrics || fail "admin /metrics"
grep '^dpu_ipsec_sa' /tmp/metrics.txt | sed 's/^/metrics: /'
for dir in out in; do
	grep -q "^dpu_ipsec_sa_packets{tunnel=\"east\",direction=\"$dir\".*} [1-9]" /tmp/metrics.txt \
		|| fail "no packets counted for direction $dir"
done

step drift
ip xfrm state delete src 192.168.77.1 dst 192.168.77.2 proto esp spi 0x1001 || fail "deleting the outbound state"
! through 1 || fail "traffic flowed without the outbound state"
wait_for 15 sh -c '"$IP" xfrm state | grep -q "spi 0x00001001"' || fail "the deleted state did not come back"
through 2 || fail "no traffic after the state came back: $(cat /tmp/ping.txt)"
say "ok: the deleted outbound state was restored by the agent"

step rekey
# New SPIs and keys while a ping runs every 0.2 s. The order loses nothing: the peer first accepts the new
# outbound SPI, the agent then adds its new states (its outbound switches at once, the old states retire after
# the overlap), and only then does the peer send with its new key.
dpuctl crypto key create k-out2 --algorithm aes-256-gcm-esp --hex --material-file /etc/ipsec/key-out2.hex >>/tmp/api.txt \
	|| fail "importing k-out2"
dpuctl crypto key create k-in2 --algorithm aes-256-gcm-esp --hex --material-file /etc/ipsec/key-in2.hex >>/tmp/api.txt \
	|| fail "importing k-in2"
ping -i 0.2 -c 50 -W 2 -I 10.1.0.1 10.2.0.1 >/tmp/ping-rekey.txt 2>&1 &
pinger=$!
sleep 1
ip -n peer xfrm state add src 192.168.77.1 dst 192.168.77.2 proto esp spi 0x2001 reqid 7 mode tunnel \
	aead 'rfc4106(gcm(aes))' "0x$KEY_OUT2" 128 || fail "peer: new state in"
dpuctl crypto tunnel update east --spi-out 0x2001 --spi-in 0x2002 --key-out k-out2 --key-in k-in2 \
	--overlap-seconds 6 >>/tmp/api.txt || fail "dpuctl crypto tunnel update"
wait_for 10 sh -c '"$IP" xfrm state | grep -q "spi 0x00002002"' || fail "the new inbound state did not appear"
ip -n peer xfrm state add src 192.168.77.2 dst 192.168.77.1 proto esp spi 0x2002 reqid 7 mode tunnel \
	aead 'rfc4106(gcm(aes))' "0x$KEY_IN2" 128 || fail "peer: new state out"
ip -s xfrm state | grep -A12 "spi 0x00001001" | grep "expire add" | sed 's/^/retiring: /'
ip -s xfrm state | grep -A12 "spi 0x00001001" | grep -q "expire add: soft 0(sec), hard [1-9]" \
	|| fail "the replaced outbound state carries no expiry"
wait_for 20 sh -c '! "$IP" xfrm state | grep -q "spi 0x0000100[12]"' || fail "the replaced states did not retire"
wait "$pinger"
tail -n 2 /tmp/ping-rekey.txt | sed 's/^/ping: /'
grep -q " 0% packet loss" /tmp/ping-rekey.txt || fail "packets were lost during the rekey"
new=$(ip -n peer -s xfrm state | grep -A14 "spi 0x00002001" | grep -o '[0-9]*(packets)' | tr -d '(packets)')
[ "${new:-0}" -gt 0 ] || fail "the peer's new inbound state counted no packets"
[ "$(ip xfrm state | grep -c "spi 0x0000200[12]")" -eq 2 ] || fail "the new states are not both in place"
say "ok: rekeyed to SPIs 0x2001/0x2002 with no packet lost; the old states retired after the overlap"

step keys
for k in "$KEY_OUT" "$KEY_IN" "$KEY_OUT2" "$KEY_IN2"; do
	if grep -rqai "$k" /var/lib/dpu-agent /tmp/agent.log /tmp/api.txt; then
		fail "a key's hex shows in the data directory, the log or an API answer"
	fi
done
say "ok: no key material in the data directory, the log or the API's answers"

step delete
dpuctl crypto tunnel delete east >/dev/null || fail "deleting the tunnel"
wait_for 10 sh -c '! "$IP" xfrm state | grep -q "spi 0x0000[12]00[12]"' || fail "the agent's states stayed"
wait_for 10 sh -c '[ "$("$IP" xfrm policy | grep -c "tmpl src")" -eq 0 ]' || fail "the agent's policies stayed"
! through 1 || fail "traffic still flows with the tunnel deleted on this side"
say "ok: deleting the tunnel removed its states and policies"
echo "IPSEC: PASS"
GUEST
}
