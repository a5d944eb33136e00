# The fabric data path against the real kernel: the static aarch64 dpu-agent in an arm64 guest (the kernel
# has cls_flower and the tc actions; the host's does not) owns a simulated eSwitch and is driven with the
# aarch64 dpuctl inside the guest over loopback.
#
# Simulated switch: representors pf0vf1..3 are veths whose peers are eth0 of pods in network namespaces
# pod1..3; the uplink p0 is a veth to a second simulated host (namespace hostb) with a pod on VLAN 100
# (p0b.100) and, over the underlay 192.168.50.0/24 on the same link, a VXLAN endpoint for VNI 5000 (vx5000,
# reached through the agent's collect-metadata device vxlan0); the proxy's capture device proxy0 leads to
# namespace proxy, which owns a service address.
#
#   pod1  pf0vf1  VLAN 100  direct   10.100.0.1
#   pod2  pf0vf2  VLAN 100  mesh     10.100.0.2   TCP :8080 steered to the proxy, 100 Mbit/s police
#   pod3  pf0vf3  VLAN 200  direct   10.100.0.3   same subnet, other network: must reach nobody
#   pod4  pf0vf4  VNI 5000  direct   10.200.0.4
#   pod5  pf0vf5  VLAN 100  direct   10.100.0.5   (attached in the service step)
#   hostb p0b.100           remote   10.100.0.101
#   hostb vx5000            remote   10.200.0.101  (VXLAN, VTEP 192.168.50.2; this host is 192.168.50.1)
#   proxy cap0              listener 10.100.0.250:8080
#
# Inventory: the agent asks devlink (generic netlink) first; this kernel has no driver that registers devlink
# ports (Debian's arm64 6.1 kernel is built without netdevsim), so iproute2's `devlink port show` lists none and
# the agent must say it fell back to sysfs after a successful, empty devlink dump. The [fabric] mapping file
# (relative to agent.toml) names the netdev of port pf0vf7.
#
# Checks, each with ping/nc and with iproute2's `tc -s filter show` as an independent reader of the kernel:
# refusals (unknown VF, duplicate MAC), pod↔pod on the host, pod↔pod across hosts (VLAN on the uplink and
# VXLAN with tunnel_key set/unset),
# VLAN isolation, mesh steering to the listener with the skbedit mark, rate-limit police, a ClusterIP service
# (10.96.0.10:80 TCP on VLAN 100, backends pod2 and pod5 answering their own names through busybox nc, reached
# by pod1 through the service gateway MAC) balanced over both backends, an unready backend getting no new
# connections, client-IP affinity, the ct actions' counters and the kernel's conntrack table, a pass over an
# unchanged fabric writes nothing, a rule deleted behind the agent's back is restored, detach removes the
# rules and the connectivity.
#
# Builds (incremental): cross/build.sh for the aarch64 musl agent and dpuctl. DPU_GUEST_NO_BUILD=1 uses the
# binaries already in the target directory. DPU_FABRIC_BENCH=1 runs bench/fabric.sh's benchmark instead
# (tests/guest/lib/fabric-bench.sh).
# shellcheck shell=bash disable=SC2034 # variables are read by tests/guest.sh

GUEST_ARCH=arm64
# crc32c_generic before act_ct: conntrack's libcrc32c needs the crc32c algorithm (a soft dependency that
# modules.dep does not list).
GUEST_MODULES=(veth 8021q vxlan sch_ingress cls_flower act_mirred act_vlan act_gact act_skbedit act_police
	act_tunnel_key crc32c_generic act_ct act_pedit)
GUEST_TIMEOUT=300
GUEST_MEMORY=1024
# The agent binary changes with every build.
GUEST_CACHE_IMAGE=0

# shellcheck source=tests/guest/lib/fabric-iproute2.sh
source "$REPO_ROOT/tests/guest/lib/fabric-iproute2.sh"
# shellcheck source=tests/guest/lib/fabric-bench.sh
source "$REPO_ROOT/tests/guest/lib/fabric-bench.sh"

fabric_target_dir() {
	local dir=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
	[[ $dir == /* ]] || dir=$REPO_ROOT/$dir
	printf '%s\n' "$dir"
}

guest_prepare() {
	local target bin tree
	target=$(fabric_target_dir)/aarch64-unknown-linux-musl/dist
	if [[ ${DPU_GUEST_NO_BUILD:-0} != 1 ]]; then
		printf 'fabric: building the static aarch64 agent and dpuctl (cross/build.sh)\n' >&2
		(cd "$REPO_ROOT" && bash cross/build.sh) >&2 || return 1
	fi
	for bin in dpu-agent dpuctl; do
		[[ -f $target/$bin ]] || {
			printf 'fabric: %s not found at %s\n' "$bin" "$target/$bin" >&2
			return 1
		}
	done
	tree=$(fabric_iproute2_tree) || return 1
	if [[ ${DPU_FABRIC_BENCH:-0} == 1 ]]; then
		fabric_bench_prepare "$target" || return 1
	fi
	cat >"$GUEST_WORK/agent.toml" <<'TOML'
data_dir = "/var/lib/dpu-agent"

[api]
listen = "127.0.0.1:50051"

[admin]
listen = "127.0.0.1:9100"

[reconcile]
drift_seconds = 2

[fabric]
inventory = "auto"
mapping = "ports.json"
TOML
	printf '{"pf0vf7": "mapped7"}\n' >"$GUEST_WORK/ports.json"
	GUEST_FILES+=(
		"$target/dpu-agent:/usr/bin/dpu-agent"
		"$target/dpuctl:/usr/bin/dpuctl"
		"$GUEST_WORK/agent.toml:/etc/dpu-agent/agent.toml"
		"$GUEST_WORK/ports.json:/etc/dpu-agent/ports.json"
		"$tree:/opt/iproute2"
		"$tree/lib/ld-linux-aarch64.so.1:/lib/ld-linux-aarch64.so.1"
	)
}

guest_script() {
	if [[ ${DPU_FABRIC_BENCH:-0} == 1 ]]; then
		fabric_bench_script
		return
	fi
	cat <<'GUEST'
STEP=setup
step() { STEP=$1; echo "GUEST-STEP: $1"; }
fail() {
	echo "fabric: FAIL [$STEP]: $*"
	echo "fabric: ---- agent log (tail) ----"
	tail -n 40 /tmp/agent.log 2>/dev/null
	guest_fail "[$STEP] $*"
}
ipr() { LD_LIBRARY_PATH=/opt/iproute2/lib /opt/iproute2/ip "$@"; }
tcr() { LD_LIBRARY_PATH=/opt/iproute2/lib /opt/iproute2/tc "$@"; }
devl() { LD_LIBRARY_PATH=/opt/iproute2/lib /opt/iproute2/devlink "$@"; }
ctl() { dpuctl --addr http://127.0.0.1:50051 --timeout 60 "$@"; }
in_ns() { ns=$1; shift; ipr netns exec "$ns" "$@"; }
reaches() { in_ns "$1" ping -c 1 -W 2 "$2" >/dev/null 2>&1 || in_ns "$1" ping -c 2 -W 2 "$2" >/dev/null 2>&1; }
must_reach() { reaches "$1" "$2" || fail "$1 cannot reach $2"; echo "fabric: ok: $1 reaches $2"; }
must_not_reach() { ! in_ns "$1" ping -c 2 -W 1 "$2" >/dev/null 2>&1 || fail "$1 reaches $2 across networks"; echo "fabric: ok: $1 does not reach $2"; }
flowers() { tcr filter show dev "$1" ingress | grep -c 'flower chain 0 handle' || true; }
metric() { wget -qO- http://127.0.0.1:9100/metrics | sed -n "s/^[a-z_]*reconcile_$1{subsystem=\"fabric\"} \([0-9]*\).*/\1/p"; }
wait_for() { # SECONDS DESCRIPTION COMMAND...
	_left=$(($1 * 2)); _what=$2; shift 2
	until "$@"; do
		_left=$((_left - 1))
		[ "$_left" -gt 0 ] || fail "timed out waiting for $_what"
		sleep 0.5
	done
}
ready() { ctl --json fabric show "$1" | grep '"state": "ready"' >/dev/null; }

step topology
chmod 0755 /usr/bin/dpu-agent /usr/bin/dpuctl
mkdir -p /run/netns /var/lib/dpu-agent
for n in 1 2 3 4 5; do
	ipr netns add pod$n
	ipr link add pf0vf$n type veth peer name eth0 netns pod$n
	ipr link set pf0vf$n up
	ipr -n pod$n link set eth0 address 02:00:00:00:00:0$n
	ipr -n pod$n link set lo up
	ipr -n pod$n link set eth0 up
done
for n in 1 2 3 5; do ipr -n pod$n addr add 10.100.0.$n/24 dev eth0; done
ipr -n pod4 addr add 10.200.0.4/24 dev eth0
ipr netns add hostb
ipr link add p0 type veth peer name p0b netns hostb
ipr link set p0 up
ipr -n hostb link set p0b up
ipr -n hostb link add link p0b name p0b.100 type vlan id 100
ipr -n hostb link set p0b.100 address 02:00:00:00:01:01
ipr -n hostb link set p0b.100 up
ipr -n hostb addr add 10.100.0.101/24 dev p0b.100
# VXLAN underlay on the same link, untagged.
ipr addr add 192.168.50.1/24 dev p0
ipr -n hostb addr add 192.168.50.2/24 dev p0b
# vxlan0, the collect-metadata VXLAN device, is created by the agent (fabric set --vxlan-device).
ipr -n hostb link add vx5000 type vxlan id 5000 local 192.168.50.2 remote 192.168.50.1 dstport 4789 dev p0b
ipr -n hostb link set vx5000 address 02:00:00:00:01:05
ipr -n hostb link set vx5000 up
ipr -n hostb addr add 10.200.0.101/24 dev vx5000
ipr netns add proxy
ipr link add proxy0 type veth peer name cap0 netns proxy
ipr link set proxy0 up
ipr -n proxy link set cap0 address 02:00:00:00:02:50
ipr -n proxy link set cap0 up
ipr -n proxy addr add 10.100.0.250/24 dev cap0
ipr -n proxy neigh add 10.100.0.2 lladdr 02:00:00:00:00:02 dev cap0 nud permanent
ipr -n pod2 neigh add 10.100.0.250 lladdr 02:00:00:00:02:50 dev eth0 nud permanent
ipr link add mapped7 type veth peer name mapped7p
must_not_reach pod1 10.100.0.2

step agent
export RUST_LOG="${RUST_LOG:-info}" NO_COLOR=1
dpu-agent --config /etc/dpu-agent/agent.toml >/tmp/agent.log 2>&1 &
agent=$!
guest_wait_listen 50051 120 || fail "dpu-agent is not listening on :50051"
ctl fabric ports
for p in p0 pf0vf1 pf0vf2 pf0vf3 pf0vf4; do
	ctl --json fabric ports | grep -q "\"port\": \"$p\"" || fail "port $p is not in the inventory"
done

step inventory
# iproute2's devlink reads the same generic netlink family as the agent.
devl dev show >/tmp/devlink-devs 2>&1 || fail "devlink dev show: $(cat /tmp/devlink-devs)"
devl port show >/tmp/devlink-ports 2>&1 || fail "devlink port show: $(cat /tmp/devlink-ports)"
echo "fabric: devlink dev show: $(wc -l </tmp/devlink-devs) device(s);" \
	"devlink port show: $(wc -l </tmp/devlink-ports) port(s)"
[ ! -s /tmp/devlink-ports ] \
	|| fail "this kernel has devlink ports; the inventory check expects none: $(cat /tmp/devlink-ports)"
grep 'fabric port inventory source' /tmp/agent.log || fail "the agent did not log its inventory source"
grep 'fabric port inventory source' /tmp/agent.log | grep 'sysfs' \
	| grep -q 'devlink reports no eSwitch port with a netdev' \
	|| fail "the agent did not fall back to sysfs after an empty devlink dump"
ctl --json fabric ports >/tmp/ports.json
for p in p0 pf0vf1 pf0vf2 pf0vf3 pf0vf4; do
	tr -d '\n ' </tmp/ports.json | grep -q "\"port\":\"$p\",\"source\":\"netdev_name\"" \
		|| fail "port $p is not reported from its netdev name: $(cat /tmp/ports.json)"
done
tr -d '\n ' </tmp/ports.json | grep -q '"netdev":"mapped7","number":7,"pf":0,"port":"pf0vf7","source":"mapping"' \
	|| fail "the [fabric] mapping file's pf0vf7 -> mapped7 is not in the inventory: $(cat /tmp/ports.json)"
echo "fabric: ok: devlink has no ports here; sysfs inventory with port-named netdevs and the mapping file"

step attach
ctl fabric set --uplink p0 --capture-device proxy0 --vxlan-device vxlan0 --vtep 192.168.50.1 \
	--vxlan-peer 192.168.50.2
wait_for 30 "the agent to create vxlan0" sh -c "LD_LIBRARY_PATH=/opt/iproute2/lib /opt/iproute2/ip -d link show vxlan0 >/tmp/vxlan0 2>&1"
cat /tmp/vxlan0
grep -q 'vxlan external' /tmp/vxlan0 && grep -q 'dstport 4789' /tmp/vxlan0 && grep -q 'nolearning' /tmp/vxlan0 \
	|| fail "vxlan0 is not an external, non-learning VXLAN device on UDP 4789: $(cat /tmp/vxlan0)"
grep -q '[<,]UP[,>]' /tmp/vxlan0 || fail "vxlan0 is not up: $(cat /tmp/vxlan0)"
echo "fabric: ok: the agent created vxlan0 (external, nolearning, dstport 4789, up)"
ctl fabric attach pod1 --port pf0vf1 --mac 02:00:00:00:00:01 --ip 10.100.0.1/24 --vlan 100 \
	--spiffe-id spiffe://cluster.local/ns/default/sa/pod1
ctl fabric attach pod2 --port pf0vf2 --mac 02:00:00:00:00:02 --ip 10.100.0.2/24 --vlan 100 \
	--mode mesh --service-port 8080 --rate-limit-bps 100000000 --spiffe-id spiffe://cluster.local/ns/default/sa/pod2
ctl fabric attach pod3 --port pf0vf3 --mac 02:00:00:00:00:03 --ip 10.100.0.3/24 --vlan 200
ctl fabric attach pod4 --port pf0vf4 --mac 02:00:00:00:00:04 --ip 10.200.0.4/24 --vni 5000
if ctl fabric attach ghost --port pf0vf9 --mac 02:00:00:00:00:09 --ip 10.100.0.9/24 --vlan 100 2>/tmp/err; then
	fail "attaching an absent VF succeeded"
fi
grep -q NotFound /tmp/err || fail "absent VF: $(cat /tmp/err)"
if ctl fabric attach dup --port pf0vf3 --mac 02:00:00:00:00:01 --ip 10.100.0.9/24 --vlan 100 2>/tmp/err; then
	fail "a duplicate MAC was accepted"
fi
grep -q AlreadyExists /tmp/err || fail "duplicate MAC: $(cat /tmp/err)"
for a in pod1 pod2 pod3 pod4; do
	wait_for 30 "attachments/$a ready" ready "$a"
done
ctl fabric show pod2
ctl --json fabric show pod2 | grep -q '"mark": [1-9]' || fail "pod2 has no packet mark"
echo "fabric: tc -s filter show dev pf0vf2 ingress"
tcr -s filter show dev pf0vf2 ingress
[ "$(flowers pf0vf1)" -ge 4 ] || fail "pf0vf1 has $(flowers pf0vf1) flower rules"
[ "$(flowers p0)" -ge 3 ] || fail "p0 has $(flowers p0) flower rules"
tcr filter show dev pf0vf2 ingress | grep -q 'skip_hw' || fail "veth rules must be software-only (skip_hw)"
tcr filter show dev pf0vf2 ingress | grep -q 'not_in_hw' || fail "the kernel does not report not_in_hw"
tcr filter show dev pf0vf2 ingress | grep -q 'police' || fail "no police action on pf0vf2"
tcr filter show dev pf0vf2 ingress | grep -q 'skbedit' || fail "no skbedit mark on pf0vf2"

step forwarding
must_reach pod1 10.100.0.2
must_reach pod2 10.100.0.1
must_reach pod1 10.100.0.101
must_reach pod2 10.100.0.101
tcr -s filter show dev p0 ingress | grep -q 'Sent [1-9]' || fail "no packets counted on the uplink's rules"

step vxlan
must_reach pod4 10.200.0.101
echo "fabric: tc -s filter show dev vxlan0 ingress"
tcr -s filter show dev vxlan0 ingress
tcr filter show dev vxlan0 ingress | grep -q 'enc_key_id 5000' || fail "no VNI 5000 rule on vxlan0"
tcr filter show dev pf0vf4 ingress | grep -q 'tunnel_key' || fail "no tunnel_key set on pf0vf4"
tcr -s filter show dev vxlan0 ingress | grep -q 'Sent [1-9]' || fail "no packets counted on vxlan0's rules"

step isolation
must_not_reach pod3 10.100.0.1
must_not_reach pod3 10.100.0.101
must_not_reach pod1 10.100.0.3

step steering
rm -f /tmp/steered
in_ns proxy nc -l -p 8080 >/tmp/steered &
listener=$!
sleep 1
echo "steered-hello" | in_ns pod2 nc -w 5 10.100.0.250 8080 || fail "pod2 could not connect to 10.100.0.250:8080"
wait_for 10 "the listener to receive the steered connection" grep -q steered-hello /tmp/steered
kill "$listener" 2>/dev/null || true
echo "fabric: ok: pod2 TCP :8080 reached the proxy's listener"
tcr -s filter show dev pf0vf2 ingress | grep -B3 -A20 'dst_port 8080' | grep -q 'Sent [1-9]' \
	|| fail "the steering rule counted no packets"

step service
# Backends: pod2 and pod5 answer every connection on :80 with their own name.
ctl fabric attach pod5 --port pf0vf5 --mac 02:00:00:00:00:05 --ip 10.100.0.5/24 --vlan 100
wait_for 30 "attachments/pod5 ready" ready pod5
for n in 2 5; do
	printf '#!/bin/sh\necho pod%s\n' "$n" >/tmp/answer$n
	chmod 0755 /tmp/answer$n
	in_ns pod$n nc -ll -p 80 -e /tmp/answer$n &
done
# pod1 reaches the service range through an on-link gateway whose neighbour entry is the fabric's gateway MAC.
gw_mac=$(ctl --json fabric get | sed -n 's/.*"service_gateway_mac": "\([0-9a-f:]*\)".*/\1/p')
[ -n "$gw_mac" ] || fail "GetFabric reports no service_gateway_mac"
ipr -n pod1 neigh add 10.100.0.254 lladdr "$gw_mac" dev eth0 nud permanent
ipr -n pod1 route add 10.96.0.0/12 via 10.100.0.254 dev eth0
if ctl fabric service-create bad --vip fd00::10 --port 80 --vlan 100 --backend 10.100.0.2:80 2>/tmp/err; then
	fail "an IPv6 VIP was accepted"
fi
grep -q 'InvalidArgument' /tmp/err && grep -q 'service.vip' /tmp/err || fail "IPv6 VIP: $(cat /tmp/err)"
ctl fabric service-create web --vip 10.96.0.10 --port 80 --vlan 100 --backend 10.100.0.2:80 \
	--backend 10.100.0.5:80
if ctl fabric service-create web2 --vip 10.96.0.10 --port 80 --vlan 100 --backend 10.100.0.5:80 2>/tmp/err; then
	fail "a second service with the same VIP:port was accepted"
fi
grep -q AlreadyExists /tmp/err || fail "duplicate VIP: $(cat /tmp/err)"
svc_converged() { # the service's current generation is reconciled and ready
	_j=$(ctl --json fabric service-get web | tr -d ' \n')
	_g=$(echo "$_j" | sed -n 's/.*[{,]"generation":\([0-9]*\).*/\1/p')
	echo "$_j" | grep -q "\"observed_generation\":$_g[,}]" && echo "$_j" | grep -q '"state":"ready"'
}
wait_for 30 "services/web ready" svc_converged
ask() { # COUNT: connections from pod1 to the VIP, one answer per line
	_i=0
	while [ "$_i" -lt "$1" ]; do
		in_ns pod1 nc -w 3 10.96.0.10 80 </dev/null || echo "no-answer"
		_i=$((_i + 1))
	done
}
ask 20 >/tmp/answers
echo "fabric: 20 connections to 10.96.0.10:80: pod2 $(grep -c pod2 /tmp/answers), pod5 $(grep -c pod5 /tmp/answers)," \
	"unanswered $(grep -c no-answer /tmp/answers)"
[ "$(grep -c -e pod2 -e pod5 /tmp/answers)" -eq 20 ] || fail "not every connection was answered: $(cat /tmp/answers)"
grep -q pod2 /tmp/answers && grep -q pod5 /tmp/answers || fail "connections were not balanced: $(sort /tmp/answers | uniq -c)"
echo "fabric: tc -s filter show dev pf0vf1 ingress (service rules)"
tcr -s filter show dev pf0vf1 ingress | grep -A12 -E 'pref (31|41|51) ' | head -60
ct_counted() { # DEV: some ct action on DEV counted packets (iproute2 as the reader)
	tcr -s filter show dev "$1" ingress \
		| awk '/action order [0-9]+: ct /{ct=1} ct && /Sent [1-9]/{found=1} /^filter/{ct=0} END{exit !found}'
}
ct_counted pf0vf1 || fail "no ct action on pf0vf1 counted packets"
ct_counted pf0vf2 || fail "no ct action on the backend pf0vf2 counted replies"
tcr filter show dev pf0vf1 ingress | grep -q 'pedit' || fail "no pedit action on pf0vf1"
if [ -r /proc/net/nf_conntrack ]; then
	grep 'dport=80' /proc/net/nf_conntrack | head -3
	grep -q 'dst=10.96.0.10.*dport=80.*src=10.100.0.[25] ' /proc/net/nf_conntrack \
		|| fail "no DNATed connection in /proc/net/nf_conntrack"
fi
echo "fabric: ok: 10.96.0.10:80 balanced over pod2 and pod5"

ctl fabric service-update web --backend 10.100.0.2:80:unready --backend 10.100.0.5:80
wait_for 30 "services/web ready after the update" svc_converged
ask 10 >/tmp/answers
[ "$(grep -c pod5 /tmp/answers)" -eq 10 ] || fail "pod2 is unready but connections went elsewhere: $(sort /tmp/answers | uniq -c)"
echo "fabric: ok: pod2 unready: 10 of 10 new connections to pod5"

ctl fabric service-update web --backend 10.100.0.2:80 --backend 10.100.0.5:80 --affinity client-ip
wait_for 30 "services/web ready with client-IP affinity" svc_converged
ask 10 >/tmp/answers
[ "$(sort -u /tmp/answers | wc -l)" -eq 1 ] || fail "client-IP affinity: one client reached $(sort /tmp/answers | uniq -c)"
grep -q -e pod2 -e pod5 /tmp/answers || fail "client-IP affinity: unanswered: $(cat /tmp/answers)"
echo "fabric: ok: client-IP affinity: 10 of 10 connections to $(head -1 /tmp/answers)"
ctl fabric service-list
ctl fabric service-create ghost --vip 10.96.0.11 --port 80 --vlan 100 --backend 10.100.0.77:80
wait_for 30 "services/ghost reports its unserved backend" sh -c \
	"dpuctl --addr http://127.0.0.1:50051 --json fabric service-get ghost | grep '10.100.0.77:80 are no pod' >/dev/null"
ctl fabric service-delete ghost

step no-op
sleep 3
passes=$(metric passes); changes=$(metric changes)
sleep 5
[ "$(metric passes)" -gt "$passes" ] || fail "no reconcile pass ran in 5 s (drift_seconds = 2)"
[ "$(metric changes)" = "$changes" ] || fail "passes over an unchanged fabric changed $changes -> $(metric changes)"
echo "fabric: ok: $(($(metric passes) - passes)) passes over an unchanged fabric changed nothing"

step drift
before=$(flowers pf0vf1)
tcr filter del dev pf0vf1 ingress pref 60
[ "$(flowers pf0vf1)" -lt "$before" ] || fail "deleting pref 60 removed nothing"
wait_for 20 "the deleted rule to come back" sh -c "[ \"\$(LD_LIBRARY_PATH=/opt/iproute2/lib /opt/iproute2/tc filter show dev pf0vf1 ingress | grep -c 'flower chain 0 handle')\" -eq $before ]"
tcr filter show dev pf0vf1 ingress pref 60
must_reach pod1 10.100.0.2

step detach
ctl fabric detach pod1
wait_for 20 "pf0vf1's rules to go" sh -c "[ \"\$(LD_LIBRARY_PATH=/opt/iproute2/lib /opt/iproute2/tc filter show dev pf0vf1 ingress | grep -c 'flower chain 0 handle')\" -eq 0 ]"
must_not_reach pod2 10.100.0.1
must_reach pod2 10.100.0.101
ctl fabric stats

step stop
kill "$agent" 2>/dev/null || true
wait "$agent" 2>/dev/null || true
echo "fabric: all checks passed"
GUEST
}
