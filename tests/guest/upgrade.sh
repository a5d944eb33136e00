# Upgrades under load: the agent is replaced three times while h2load drives HTTP through its mesh proxy and the
# Linux kernel's NVMe/TCP initiator in an amd64 guest writes and verifies one of its namespaces with fio.
#
# Host side (guest_prepare): nginx as the upstream, the release dpu-agent (plaintext API on loopback, mesh
# poll off so the guest keeps its core) with a mesh listener routing to nginx, and a 128 MiB file volume
# exported as nsid 1 of one subsystem.
#
# Guest (amd64; nvme-cli, fio; modules nvme-tcp): `nvme connect --reconnect-delay 1 --ctrl-loss-tmo 60`, then
# fio 4K random writes with crc32c verification interleaved (verify_backlog) at iodepth 8 on the raw namespace for
# UPGRADE_SECONDS, logging every completion's latency. It prints fio's error count, the bytes written and verified,
# and each stall (completions slower than 200 ms, grouped): the I/O pause of each upgrade.
#
# host_check, once fio runs: h2load for the same time over HTTP/1.1 keep-alive (2 connections) and h2c (2
# connections, 4 streams each), in rounds of about 3 s (upgrade_load), and, 12 s apart, three upgrades:
#   1. SIGHUP (what `systemctl reload` sends): the agent starts its binary with --takeover;
#   2. a new process started by hand with --takeover;
#   3. SIGHUP again.
# Each one must end with the old process gone and the new one serving the same sockets (ss); the log's
# takeover_ms is printed. At the end (upgrade_load_ok): every request h2load sent was answered with a 2xx and none
# was left unanswered, fio 0 errors with every written byte verified, the namespace's volume still ready and a new
# API write accepted (the store moved with the agent). The pauses are printed.
#
# Builds `cargo build --locked --release --bin dpu-agent --bin dpuctl` unless DPU_GUEST_NO_BUILD=1.
# Environment: UPGRADE_SECONDS (fio and h2load duration, default 60), RUST_LOG (agent, default info).
# shellcheck shell=bash disable=SC2034 # variables are read by tests/guest.sh

GUEST_ARCH=amd64
GUEST_MODULES=(nvme-tcp crc32c_generic)
GUEST_BINARIES=(nvme fio)
GUEST_HOST_PACKAGES=(nvme-cli fio nghttp2-client nginx-light)
GUEST_FILES=()
GUEST_MEMORY=1024
GUEST_TIMEOUT=600
# The guest script carries this run's port numbers.
GUEST_CACHE_IMAGE=0

# shellcheck source=tests/guest/lib/image-host.sh
source "$REPO_ROOT/tests/guest/lib/image-host.sh"
IH_NAME=upgrade

UPGRADE_NQN=nqn.2026-12.io.dpu-agent:upgrade
UPGRADE_SECONDS=${UPGRADE_SECONDS:-60}
UPGRADE_API_PORT=""
UPGRADE_ADMIN_PORT=""
UPGRADE_IO_PORT=""
UPGRADE_HTTP_PORT=""
UPGRADE_NGINX_PORT=""

guest_prepare() {
	if [[ ${DPU_GUEST_NO_BUILD:-0} != 1 ]]; then
		ih_say "building dpu-agent and dpuctl (release)"
		(cd "$REPO_ROOT" && cargo build --locked --release --bin dpu-agent --bin dpuctl) >&2 || return 1
	fi
	read -r UPGRADE_API_PORT UPGRADE_ADMIN_PORT UPGRADE_IO_PORT UPGRADE_HTTP_PORT UPGRADE_NGINX_PORT \
		<<<"$(ih_free_ports 5)"
	mkdir -p "$GUEST_WORK/data" "$GUEST_WORK/nginx"
	cat >"$GUEST_WORK/nginx.conf" <<NGINX
worker_processes 1;
pid $GUEST_WORK/nginx/nginx.pid;
error_log $GUEST_WORK/nginx/error.log;
events { worker_connections 1024; }
http {
	access_log off;
	client_body_temp_path $GUEST_WORK/nginx/body;
	server { listen 127.0.0.1:$UPGRADE_NGINX_PORT; keepalive_requests 1000000; location / { return 200 "upstream ok\n"; } }
}
NGINX
	nginx -c "$GUEST_WORK/nginx.conf" || {
		ih_say "FAIL: nginx did not start"
		return 1
	}
	cat >"$GUEST_WORK/agent.toml" <<TOML
data_dir = "$GUEST_WORK/data"

[api]
listen = "127.0.0.1:$UPGRADE_API_PORT"

[admin]
listen = "127.0.0.1:$UPGRADE_ADMIN_PORT"

[mesh]
poll = "off"
TOML
	cat >"$GUEST_WORK/mesh.json" <<JSON
{
  "clusters": { "web": { "protocol": "http1", "endpoints": [{ "address": "127.0.0.1:$UPGRADE_NGINX_PORT" }] } },
  "route_tables": { "web": { "virtual_hosts": [{ "name": "web", "domains": ["*"], "routes": [
    { "name": "all", "match": { "path": { "kind": "prefix", "value": "/" } },
      "action": { "kind": "forward", "clusters": [{ "cluster": "web" }], "timeout_ms": 15000 } } ] }] } },
  "listeners": { "web": { "address": "127.0.0.1:$UPGRADE_HTTP_PORT",
    "default": { "kind": "http", "route_table": "web", "codec": "auto" } } }
}
JSON
	printf '%s\n' --addr "http://127.0.0.1:$UPGRADE_API_PORT" >"$GUEST_WORK/dpuctl.args"
	ih_agent_start "$GUEST_WORK" || return 1
	ih_dpuctl "$GUEST_WORK" mesh apply -f "$GUEST_WORK/mesh.json" >&2 || return 1
	truncate -s 128M "$GUEST_WORK/vol.img"
	ih_dpuctl "$GUEST_WORK" storage volume create vol --file "$GUEST_WORK/vol.img" --size 128MiB >&2 || return 1
	ih_dpuctl "$GUEST_WORK" storage subsystem create up --nqn "$UPGRADE_NQN" --allow-any-host >&2 || return 1
	ih_dpuctl "$GUEST_WORK" storage namespace create up n1 --volume vol --nsid 1 >&2 || return 1
	ih_dpuctl "$GUEST_WORK" storage listener create up tcp --address "127.0.0.1:$UPGRADE_IO_PORT" >&2 || return 1
	local code
	code=$(curl -s -o /dev/null -w '%{http_code}' --retry 20 --retry-connrefused --retry-delay 0 \
		"http://127.0.0.1:$UPGRADE_HTTP_PORT/") || true
	[[ $code == 200 ]] || {
		ih_say "FAIL: the proxy answered $code before any upgrade"
		return 1
	}
}

guest_script() {
	printf 'IO_PORT=%s\nNVME_SUBNQN=%s\nSECONDS_UNDER_LOAD=%s\n' "$UPGRADE_IO_PORT" "$UPGRADE_NQN" "$UPGRADE_SECONDS"
	cat "$REPO_ROOT/tests/guest/lib/nvme-sysfs.sh"
	cat <<'GUEST'
say() { echo "upgrade: $*"; }
fail() {
	say "FAIL: $*"
	dmesg | grep -iE 'nvme|I/O error' | tail -n 20 | sed 's/^/kernel: /'
	guest_fail "$*"
}
guest_ready
nvme connect -t tcp -a 10.0.2.2 -s "$IO_PORT" -n "$NVME_SUBNQN" --reconnect-delay 1 --ctrl-loss-tmo 60 >/dev/null \
	|| fail "nvme connect"
_left=300
until dev=$(nvme_ns_dev 1); do
	_left=$((_left - 1))
	[ "$_left" -gt 0 ] || fail "namespace 1 did not appear"
	sleep 0.1
done
echo "GUEST-STEP: fio"
fio --name=upgrade --filename="$dev" --size=64M --rw=randwrite --bs=4k --ioengine=libaio --iodepth=8 --direct=1 \
	--verify=crc32c --verify_backlog=64 --verify_fatal=1 --time_based --runtime="$SECONDS_UNDER_LOAD" \
	--write_lat_log=/tmp/lat --log_avg_msec=0 --output-format=json --output=/tmp/fio.json >/tmp/fio.out 2>&1
rc=$?
cat /tmp/fio.out
dmesg | grep -iE 'nvme' | tail -n 12 | sed 's/^/kernel: /'
# Stalls: completions slower than 200 ms, grouped when less than 3 s apart (the clat log is in ns).
awk -F', *' '
	function flush() { if (n) printf "PAUSE at=%.1fs longest=%dms completions=%d\n", start / 1000, worst / 1e6, n; n = 0; worst = 0 }
	$2 > 200000000 { if (n && $1 - last > 3000) flush(); if (!n) start = $1; n++; last = $1; if ($2 > worst) worst = $2 }
	{ if ($2 > max) max = $2 }
	END { flush(); printf "MAX-LATENCY %dms\n", max / 1e6 }' /tmp/lat_clat.1.log
[ "$rc" -eq 0 ] || fail "fio exited with $rc"
echo "FIO-JSON-BEGIN"
cat /tmp/fio.json
echo "FIO-JSON-END"
nvme disconnect -n "$NVME_SUBNQN" >/dev/null || fail "nvme disconnect"
echo "UPGRADE-GUEST: DONE"
sleep 3600
GUEST
}

# The pid of the process now serving the API port.
upgrade_serving_pid() {
	ss -Htlnp "sport = :$UPGRADE_API_PORT" | grep -o 'pid=[0-9]*' | sort -u | cut -d= -f2
}

# upgrade_one N how: replaces the agent and waits until only the new process serves.
upgrade_one() {
	local n=$1 how=$2 old new deadline before
	old=$(cat "$GUEST_WORK/agent.pid")
	before=$(grep -c 'took over from the previous agent process' "$GUEST_WORK/agent.log" || true)
	case "$how" in
	sighup) kill -HUP "$old" ;;
	takeover)
		RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 "$(ih_target_dir)/release/dpu-agent" --config "$GUEST_WORK/agent.toml" \
			--takeover </dev/null >>"$GUEST_WORK/agent.log" 2>&1 &
		;;
	esac
	deadline=$((SECONDS + 60))
	while kill -0 "$old" 2>/dev/null && [[ $(awk '{ print $3 }' "/proc/$old/stat" 2>/dev/null) != Z ]]; do
		((SECONDS < deadline)) || {
			ih_say "FAIL: upgrade $n ($how): process $old still runs after 60 s"
			ih_agent_tail "$GUEST_WORK"
			return 1
		}
		sleep 0.1
	done
	(($(grep -c 'took over from the previous agent process' "$GUEST_WORK/agent.log" || true) > before)) || {
		ih_say "FAIL: upgrade $n ($how): no process took over"
		ih_agent_tail "$GUEST_WORK"
		return 1
	}
	new=$(upgrade_serving_pid)
	[[ -n $new && $new != "$old" && $new != *$'\n'* ]] || {
		ih_say "FAIL: upgrade $n ($how): the API port is served by '${new//$'\n'/ }', not one new process"
		return 1
	}
	printf '%s\n' "$new" >"$GUEST_WORK/agent.pid"
	local ms
	ms=$(grep 'took over from the previous agent process' "$GUEST_WORK/agent.log" | tail -n 1 \
		| grep -o 'takeover_ms=[0-9.]*' | cut -d= -f2)
	ih_say "upgrade $n ($how): process $old → $new, the new one served ${ms%.*} ms after it started"
}

# h2load's own summary cannot show a lost request: its totals count finished requests only, and a request
# abandoned with its connection is dropped from them. And h2load opens no new HTTP/2 connection after a GOAWAY:
# its clients end there. So it runs in rounds, each with --log-file (one line per finished request: start in µs,
# status or -1, latency), and upgrade_load_ok counts from those: requests started but never finished (the summary's
# started − done), and failed ones. A request with status -1 and start 0 never left h2load: it was queued when a
# GOAWAY arrived, and RFC 9113 (6.8) forbids sending it on that connection; h2load does not retry it elsewhere
# (as a browser, gRPC or Envoy does), so it is reported, not failed.
upgrade_load() { # name seconds url h2load-args…
	local name=$1 end=$((SECONDS + $2)) url=$3 k=0 budget=10000 rate
	shift 3
	while ((SECONDS < end)); do
		k=$((k + 1))
		h2load -n "$budget" "$@" --log-file="$GUEST_WORK/$name-$k.tsv" "$url" >"$GUEST_WORK/$name-$k.log" 2>&1
		# About 3 s per round at the rate the last one saw.
		rate=$(grep -oE '[0-9]+(\.[0-9]+)? req/s' "$GUEST_WORK/$name-$k.log" | cut -d' ' -f1 | cut -d. -f1)
		rate=${rate:-0}
		budget=$((rate * 3 > 1000 ? rate * 3 : 1000))
	done
}

upgrade_load_ok() { # name label min-goaways
	local summary
	summary=$(python3 - "$GUEST_WORK" "$1" "$3" <<'PY'
import glob, re, sys
work, name, min_cut = sys.argv[1], sys.argv[2], int(sys.argv[3])
logs = sorted(glob.glob(f"{work}/{name}-*.log"), key=lambda p: int(re.search(r"-(\d+)\.log$", p).group(1)))
sent = ok = unsent = cut = 0
problems = []
for log in logs:
    text = open(log).read()
    m = re.search(r"^requests: \d+ total, (\d+) started, (\d+) done", text, re.M)
    if not m:
        problems.append(f"{log}: h2load printed no totals")
        continue
    started, done = int(m.group(1)), int(m.group(2))
    cut += text.count("Process Request Failure")  # h2load's line when a GOAWAY ends one of its clients
    lines = [l.split("\t") for l in open(log[:-4] + ".tsv").read().splitlines() if l]
    if started != done:
        problems.append(f"{log}: {started - done} request(s) sent and never answered")
    if len(lines) != done:
        problems.append(f"{log}: {len(lines)} logged requests for {done} finished")
    for start, status, _ in lines:
        if status == "-1" and start == "0":
            unsent += 1
        elif len(status) == 3 and status.startswith("2"):
            sent += 1
            ok += 1
        else:
            sent += 1
            problems.append(f"{log}: a request ended with status {status}")
print(f"{len(logs)} rounds, {sent} requests sent, {ok} answered 2xx, {unsent} queued by h2load as a GOAWAY "
      f"arrived and never sent, {cut} connection(s) ended by a GOAWAY")
for p in problems[:10]:
    print(f"  {p}")
if problems or sent == 0 or cut < min_cut:
    sys.exit(1)
PY
	)
	local rc=$?
	ih_say "h2load $2: $summary"
	if ((rc != 0)); then
		ih_say "FAIL: h2load $2: requests failed or went unanswered across the upgrades (or fewer than $3 connections ended by a GOAWAY)"
		return 1
	fi
}

host_check() {
	local done_lines=0 lines line started=0 pauses=()
	while :; do
		if ! ih_agent_alive "$GUEST_WORK"; then
			ih_say "FAIL: no dpu-agent runs"
			ih_agent_tail "$GUEST_WORK"
			return 1
		fi
		lines=$(wc -l <"$GUEST_LOG")
		if ((lines > done_lines)); then
			while IFS= read -r line; do
				line=${line%$'\r'}
				case "$line" in
				"GUEST-STEP: fio")
					ih_say "guest: fio runs for ${UPGRADE_SECONDS} s; h2load and three upgrades start"
					local url="http://127.0.0.1:$UPGRADE_HTTP_PORT/"
					upgrade_load h1 "$UPGRADE_SECONDS" "$url" -c 2 -m 1 --h1 &
					local h1=$!
					upgrade_load h2c "$UPGRADE_SECONDS" "$url" -c 2 -m 4 &
					local h2c=$!
					local n how
					n=0
					for how in sighup takeover sighup; do
						n=$((n + 1))
						sleep 12
						upgrade_one "$n" "$how" || return 1
					done
					wait "$h1" "$h2c"
					upgrade_load_ok h1 "HTTP/1.1" 0 || return 1
					# Each upgrade ends the h2c connections of the process it replaces with a GOAWAY: two per upgrade,
					# fewer when a round began during a hand-over and its clients reached both processes.
					upgrade_load_ok h2c "h2c" 3 || return 1
					started=1
					;;
				"PAUSE "*)
					pauses+=("${line#PAUSE }")
					ih_say "guest: NVMe I/O pause: ${line#PAUSE }"
					;;
				"MAX-LATENCY "*) ih_say "guest: $line" ;;
				"upgrade: FAIL"* | "GUEST-RESULT: "*)
					ih_say "guest: $line"
					ih_agent_tail "$GUEST_WORK"
					return 1
					;;
				"UPGRADE-GUEST: DONE")
					((started)) || {
						ih_say "FAIL: the guest finished before the upgrades"
						return 1
					}
					sed -n '/^FIO-JSON-BEGIN/,/^FIO-JSON-END/p' "$GUEST_LOG" | sed '1d;$d' | tr -d '\r' \
						>"$GUEST_WORK/fio.json"
					python3 - "$GUEST_WORK/fio.json" <<'PY' || return 1
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
written, verified = job["write"]["io_bytes"], job["read"]["io_bytes"]
print(f"upgrade: fio error={job['error']} written={written >> 20} MiB verified={verified >> 20} MiB "
      f"write clat max={job['write']['clat_ns']['max'] / 1e6:.0f} ms", file=sys.stderr)
# verify_backlog reads back every written block but the last backlog's worth.
sys.exit(0 if job["error"] == 0 and written > 0 and verified >= written - 64 * 4096 * 8 else 1)
PY
					((${#pauses[@]} >= 1)) || ih_say "note: no completion took longer than 200 ms"
					ih_dpuctl "$GUEST_WORK" --json storage volume get vol >"$GUEST_WORK/vol.json" || return 1
					grep -q '"ready"' "$GUEST_WORK/vol.json" || {
						ih_say "FAIL: the volume is not ready after the upgrades: $(cat "$GUEST_WORK/vol.json")"
						return 1
					}
					ih_dpuctl "$GUEST_WORK" storage volume create after --malloc --size 1MiB >&2 || return 1
					ih_say "PASS: 3 upgrades under load; ${#pauses[@]} NVMe pause(s): ${pauses[*]:-none}"
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
	ih_agent_stop "$GUEST_WORK"
	[[ -f $GUEST_WORK/nginx/nginx.pid ]] && kill "$(cat "$GUEST_WORK/nginx/nginx.pid")" 2>/dev/null
	if [[ -f $GUEST_WORK/agent.log ]]; then
		cp "$GUEST_WORK/agent.log" "${GUEST_LOG%.log}.agent.log" && ih_say "agent log: ${GUEST_LOG%.log}.agent.log"
	fi
	return 0
}
