#!/usr/bin/env bash
# Container cold-start benchmark (not a test): time until the test image's workload prints READY, and bytes
# fetched from the registry, for a full pull against the DPU's lazily loaded image, by hand and through
# containerd. Prints two Markdown tables.
#
#   bench/lazy-image.sh          (no arguments; the settings below come from the environment)
#
# The image is images/test-image.sh's (Debian 12 + Python, 4 layers, ~145 MiB compressed, ~350 MiB unpacked);
# the workload is `/usr/bin/python3 /app/start.py` (imports ~60 modules, reads its config and data files).
# Debian's docker-registry serves it on loopback behind nginx (its access log is the witness for the bytes
# fetched) behind an emulated link: a relay whose two directions each carry DPU_LAZY_MBIT (100) Mbit/s shared
# by all connections, plus DPU_LAZY_RTT_MS (0: loopback) of round-trip delay. nginx's `limit_rate` is not used
# because it limits each request on its own: skopeo's parallel layer downloads and the agent's concurrent
# chunk fetches would each get the full rate. Every variant's registry traffic crosses the same link.
#
# One amd64 QEMU guest (TCG) runs every variant in turn and the same steps each time: nvme connect to the
# agent's NVMe/TCP target on the host, mount the layers (EROFS, read-only), stack them with overlayfs (upper
# on tmpfs), chroot and run the workload, then unmount, disconnect and drop its caches. Per variant:
#
#   (a) full pull   natively on the host: `skopeo copy` from the registry to a local OCI layout (download,
#                   verify) + `umoci unpack` (decompress, extract); that is "prepare". The guest then starts
#                   from the unpacked rootfs, handed to it as one read-only EROFS namespace: an agent file
#                   volume holding `mkfs.erofs` of the rootfs. Building that image is NOT counted (it stands
#                   in for the host's local disk; its time is printed below the table).
#   (b) lazy, cold  the agent restarted with an empty chunk cache and trace replay off; prepare =
#                   `dpuctl image create --wait` + `dpuctl image export` (resolve manifest and chunk indexes).
#                   The agent records the start-up trace and stores it in the registry
#                   (DPU_LAZY_TRACE_WINDOW seconds after the first read, default 60).
#   (c) lazy, trace the same with the stored trace replayed as prefetch from `image create` on; "n/a" when the
#                   agent stores no trace (or DPU_LAZY_TRACE_WINDOW=0). The window must cover (b)'s start,
#                   or the trace is partial (the output warns).
#   (d) lazy, warm  the agent restarted with its cache kept (hot from (c)).
#
# containerd's own timings (Debian's containerd 1.6 and runc in the guest, with /var/lib on tmpfs; prepare =
# the pull command in the guest, start = `ctr run --rm` of the workload until it exits after READY):
#   (e) overlayfs   containerd's overlayfs snapshotter: `ctr images pull` through the link (download,
#                   verify, decompress, unpack, all in the guest)
#   (f) dpu, cold   dpu-snapshotter as proxy plugin `dpu`, the agent restarted with an empty chunk cache:
#                   `ctr-remote images rpull --snapshotter dpu`; the snapshotter asks the agent to find the
#                   converted image (converted during setup, as a platform converts at push time; the agent's
#                   convert finds every layer already converted), create it and export its layers, connects
#                   the initiator and mounts the layers
#   (g) dpu, warm   the same with the agent restarted and its cache kept (hot from (f))
#   After each, `ctr images rm --sync` removes image, snapshots and (dpu) the agent's image and namespaces; the
#   guest disconnects and drops its caches. DPU_LAZY_CONTAINERD=0 leaves (e)-(g) out.
#
# The variants run DPU_LAZY_RUNS times (default 3) in one guest boot; the tables show each variant's run
# with the median time to ready, the min–max range, and the median bytes. time to ready = prepare (host
# clock) + start (from the host's answer to the guest until the guest reports READY, host clock). fetched =
# response bytes of GETs in nginx's access log from the variant's start to its end (the next variant's start).
# The guest asks the host for each variant over HTTP (busybox wget to a small endpoint on the host, as in
# tests/guest/lazy-image.sh) and reports READY the same way. Run time here: ~2.5 min for one run (the first
# waits for the trace window), ~1.5 min per further run, plus ~2 min per run for (e)-(g) and the image build
# the first time.
# The guest is emulated: its CPU-bound start-up is ~5-12x slower than native while the link and the agent run
# at native speed, which flatters the lazy variants' fetch cost; compare variants, not absolute seconds.
#
# Environment: DPU_BENCH_NO_BUILD=1 uses the binaries already in ${CARGO_TARGET_DIR:-target}/release;
# DPU_LAZY_CHUNK converts with that chunk size (bytes); DPU_LAZY_READAHEAD_KB (32) is the guest's read_ahead_kb
# on the layer namespaces of (b)-(d) ((a)'s local disk keeps the kernel's default, 128); DPU_LAZY_SAVE_TRACE=FILE
# saves the stored start-up trace
# (with DPU_LAZY_CHUNK=4096, the input of dpu-image-chunks --trace).
# DPU_BENCH_KEEP=1 keeps the work directory (logs, console, nginx log); DPU_LAZY_RUNS, DPU_LAZY_MBIT,
# DPU_LAZY_RTT_MS, DPU_LAZY_TRACE_WINDOW; DPU_GUEST_TIMEOUT (s, the whole guest run, default 1800); RUST_LOG
# (agent, default info).
# Needs root (image build, umoci, mkfs.erofs of root-owned trees).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
target=${CARGO_TARGET_DIR:-$repo/target}
[[ $target == /* ]] || target=$repo/$target
bin=$target/release
mbit=${DPU_LAZY_MBIT:-100}
rtt_ms=${DPU_LAZY_RTT_MS:-0}
trace_window=${DPU_LAZY_TRACE_WINDOW:-60}
chunk=${DPU_LAZY_CHUNK:-}
readahead_kb=${DPU_LAZY_READAHEAD_KB:-32}
save_trace=${DPU_LAZY_SAVE_TRACE:-}
runs=${DPU_LAZY_RUNS:-3}
guest_timeout=${DPU_GUEST_TIMEOUT:-1800}
ctrd=${DPU_LAZY_CONTAINERD:-1}
nqn_img=nqn.2026-11.io.dpu-agent:bench-lazy-image
nqn_full=nqn.2026-11.io.dpu-agent:bench-full-image
hostid=7a1e5c3b-2d4f-4e6a-8b9c-0d1e2f3a4b5c
command_line="DPU_LAZY_RUNS=$runs DPU_LAZY_MBIT=$mbit DPU_LAZY_RTT_MS=$rtt_ms DPU_LAZY_TRACE_WINDOW=$trace_window"
[[ -z $chunk ]] || command_line+=" DPU_LAZY_CHUNK=$chunk"
command_line+=" DPU_LAZY_READAHEAD_KB=$readahead_kb"
[[ $ctrd == 1 ]] || command_line+=" DPU_LAZY_CONTAINERD=$ctrd"
command_line+=" bench/lazy-image.sh"

say() { printf 'bench/lazy-image: %s\n' "$*" >&2; }
die() {
	say "$*"
	exit 1
}

if (($#)); then
	sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
	exit 2
fi
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "DPU_LAZY_RUNS must be a positive number"
[[ $trace_window =~ ^[0-9]+$ ]] || die "DPU_LAZY_TRACE_WINDOW must be a number of seconds"
[[ $ctrd == [01] ]] || die "DPU_LAZY_CONTAINERD must be 0 or 1"
[[ $mbit =~ ^[0-9]+([.][0-9]+)?$ && $rtt_ms =~ ^[0-9]+([.][0-9]+)?$ ]] \
	|| die "DPU_LAZY_MBIT and DPU_LAZY_RTT_MS must be numbers"
[[ $(id -u) -eq 0 ]] || die "needs root (image build, umoci unpack, mkfs.erofs)"
packages=nvme-cli,nginx,mmdebstrap,umoci,skopeo,erofs-utils,docker-registry
binaries=(dpu-agent dpuctl)
if ((ctrd)); then
	packages+=,containerd,runc,stargz-snapshotter
	binaries+=(dpu-snapshotter)
fi
images/deps.sh --package "$packages" amd64
if [[ ${DPU_BENCH_NO_BUILD:-0} != 1 ]]; then
	cargo build --locked --release "${binaries[@]/#/--bin=}" >&2
fi
for b in "${binaries[@]}"; do
	[[ -x $bin/$b ]] || die "$bin/$b is missing (build it, or unset DPU_BENCH_NO_BUILD)"
done
image_dir=$(images/test-image.sh)
# shellcheck disable=SC2016 # expanded by the inner shell
image_var() { env -i bash -c 'source "$1" && printf "%s\n" "${!2}"' _ "$image_dir/env" "$1"; }
kernel_dir=$(images/fetch-kernel.sh amd64)
# shellcheck disable=SC2016 # expanded by the inner shell
kernel=$(env -i bash -c 'source "$1" && printf "%s\n" "$KERNEL"' _ "$kernel_dir/env")

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-lazy-image.XXXXXX")
pids=()
agent_pid=""
qemu_pid=""
ctl_pid=""
cleanup() {
	local pid
	for pid in "$qemu_pid" "$ctl_pid" "$agent_pid" "${pids[@]}"; do
		[[ -n $pid ]] || continue
		kill -TERM "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	if [[ ${DPU_BENCH_KEEP:-0} == 1 ]]; then say "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

read -r api_port reg_port ngx_port link_port io_port ctl_port <<<"$(
	python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)"
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port, pid, what
	local deadline=$((SECONDS + 60))
	until port_open "$1"; do
		kill -0 "$2" 2>/dev/null || die "$3 exited before listening on :$1"
		((SECONDS < deadline)) || die "$3 did not listen on :$1 within 60 s"
		sleep 0.1
	done
}
now_us() { printf '%s\n' "${EPOCHREALTIME//[!0-9]/}"; }
secs() { awk -v us="$1" 'BEGIN { printf "%.1f", us / 1e6 }'; }

# ---- registry, nginx (the witness), the link ---------------------------------------------------------------
mkdir -p "$work/registry" "$work/nginx"
cat >"$work/registry.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: 127.0.0.1:$reg_port
YML
docker-registry serve "$work/registry.yml" </dev/null >"$work/registry.log" 2>&1 &
pids+=($!)
wait_port "$reg_port" "${pids[-1]}" docker-registry

cat >"$work/nginx/nginx.conf" <<NGINX
user root;
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events {
    worker_connections 1024;
}
http {
    log_format link '\$msec \$request_method \$status \$body_bytes_sent "\$request_uri"';
    access_log $work/nginx/access.log link;
    client_max_body_size 0;
    client_body_temp_path $work/nginx/body;
    proxy_temp_path $work/nginx/proxy;
    fastcgi_temp_path $work/nginx/fastcgi;
    uwsgi_temp_path $work/nginx/uwsgi;
    scgi_temp_path $work/nginx/scgi;
    server {
        listen 127.0.0.1:$ngx_port;
        location / {
            proxy_pass http://127.0.0.1:$reg_port;
            proxy_http_version 1.1;
            proxy_set_header Host \$http_host;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }
    }
}
NGINX
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" </dev/null \
	>"$work/nginx/stdout.log" 2>&1 &
pids+=($!)
wait_port "$ngx_port" "${pids[-1]}" nginx

cat >"$work/link.py" <<'PY'
"""An emulated link in front of a TCP server: each direction carries MBIT Mbit/s shared by every connection (in
the order the bytes arrive) and delivers them RTT/2 later."""
import asyncio
import sys
import time

LISTEN, TARGET, MBIT, RTT_MS = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
RATE = MBIT * 1e6 / 8
DELAY = RTT_MS / 2000
STEP = 16384


class Direction:
    """The link's transmitter: bytes are sent in turn; an idle link banks up to BURST bytes of credit, so
    that scheduling jitter does not cost a single stream its rate."""

    BURST = 4 * STEP

    def __init__(self):
        self.free_at = time.monotonic()

    async def transmit(self, n):
        now = time.monotonic()
        self.free_at = max(now - self.BURST / RATE, self.free_at) + n / RATE
        if self.free_at > now:
            await asyncio.sleep(self.free_at - now)


async def pump(reader, writer, direction):
    queue = asyncio.Queue()

    async def deliver():
        while True:
            at, data = await queue.get()
            if data is None:
                break
            if at > time.monotonic():
                await asyncio.sleep(at - time.monotonic())
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    task = asyncio.create_task(deliver())
    try:
        while data := await reader.read(STEP):
            await direction.transmit(len(data))
            await queue.put((time.monotonic() + DELAY, data))
    except OSError:
        pass
    await queue.put((0, None))
    try:
        await task
    except OSError:
        pass


UP, DOWN = Direction(), Direction()


async def handle(client_r, client_w):
    try:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", TARGET)
    except OSError:
        client_w.close()
        return
    await asyncio.gather(pump(client_r, server_w, UP), pump(server_r, client_w, DOWN), return_exceptions=True)
    for w in (client_w, server_w):
        w.close()


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", LISTEN)
    async with server:
        await server.serve_forever()


asyncio.run(main())
PY
python3 "$work/link.py" "$link_port" "$ngx_port" "$mbit" "$rtt_ms" </dev/null >"$work/link.log" 2>&1 &
pids+=($!)
wait_port "$link_port" "${pids[-1]}" "the link relay"
say "registry :$reg_port ← nginx :$ngx_port ← link :$link_port ($mbit Mbit/s each way, RTT +${rtt_ms} ms)"

oci=$(image_var OCI_DIR)
tag=$(image_var OCI_TAG)
skopeo copy --quiet --dest-tls-verify=false "oci:$oci:$tag" "docker://127.0.0.1:$reg_port/app:1" >&2

# ---- the agent -----------------------------------------------------------------------------------------------
mkdir -p "$work/data"
agent_runs=0
start_agent() { # prefetch=true|false
	agent_runs=$((agent_runs + 1))
	agent_log=$work/agent-$agent_runs.log
	cat >"$work/agent.toml" <<TOML
data_dir = "$work/data"

[api]
listen = "127.0.0.1:$api_port"

[admin]
enabled = false

[images]
prefetch = $1
trace_window_seconds = $trace_window
TOML
	RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 "$bin/dpu-agent" --config "$work/agent.toml" \
		</dev/null >"$agent_log" 2>&1 &
	agent_pid=$!
	local deadline=$((SECONDS + 60))
	until grep -q 'serving the control API' "$agent_log" 2>/dev/null; do
		kill -0 "$agent_pid" 2>/dev/null || {
			tail -n 20 "$agent_log" >&2
			die "dpu-agent exited before serving"
		}
		((SECONDS < deadline)) || die "dpu-agent did not serve within 60 s"
		sleep 0.1
	done
}
stop_agent() {
	[[ -n $agent_pid ]] || return 0
	kill -TERM "$agent_pid" 2>/dev/null || true
	wait "$agent_pid" 2>/dev/null || true
	agent_pid=""
}
dpuctl() { "$bin/dpuctl" --addr "http://127.0.0.1:$api_port" --timeout 60 "$@"; }
# imageStatus field of `dpuctl --json image get app` (snake_case or camelCase keys).
# Copies the start-up trace the agent stored beside the image (a JSON blob of the artifact tagged
# sha256-<manifest hex>.trace) to FILE, for dpu-image-chunks.
save_stored_trace() { # file
	local manifest url
	manifest=$(image_status manifest_digest)
	url=http://127.0.0.1:$reg_port/v2/app
	curl -fsS -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
		"$url/manifests/sha256-${manifest#sha256:}.trace" \
		| python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][0]["digest"])' \
		| xargs -I{} curl -fsS -o "$1" "$url/blobs/{}"
	say "start-up trace saved to $1"
}

image_status() { # field...
	dpuctl --json image get app | python3 -c '
import json, re, sys
def snake(v):
    if isinstance(v, dict):
        return {re.sub(r"(?<!^)([A-Z])", r"_\1", k).lower(): snake(x) for k, x in v.items()}
    return [snake(x) for x in v] if isinstance(v, list) else v
s = snake(json.load(sys.stdin))["image_status"]
out = []
for field in sys.argv[1:]:
    v = s.get(field, "")
    out.append(" ".join(l["uuid"].lower() for l in v) if field == "layers" else str(v))
print(" ".join(out))' "$@"
}

# Wait until SUBSYSTEM's namespaces (COUNT) and listeners are ready: a host that connects earlier may miss a
# namespace published after its controller came up.
wait_ready() { # subsystem count
	local deadline=$((SECONDS + 60))
	until { dpuctl --json storage namespace list "$1"; dpuctl --json storage listener list "$1"; } 2>/dev/null \
		| python3 -c '
import json, sys
dec, text, docs = json.JSONDecoder(), sys.stdin.read(), []
while text.strip():
    doc, end = dec.raw_decode(text.lstrip())
    docs.append(doc)
    text = text.lstrip()[end:]
items = [x for d in docs for k in ("namespaces", "listeners") for x in d.get(k, [])]
ready = [x for x in items if (x.get("status") or {}).get("state") == "ready"]
namespaces = [x for x in docs[0].get("namespaces", [])] if docs else []
sys.exit(0 if len(namespaces) == int(sys.argv[1]) and len(ready) == len(items) else 1)' "$2"; do
		((SECONDS < deadline)) || die "subsystem $1: $2 namespaces and its listeners not ready within 60 s"
		sleep 0.2
	done
}

start_agent false
say "converting app:1 → app:1-lazy (setup, not measured)"
dpuctl image convert ${chunk:+--chunk-size "$chunk"} "127.0.0.1:$reg_port/app:1" "127.0.0.1:$reg_port/app:1-lazy" >/dev/null
dpuctl storage subsystem create img --nqn "$nqn_img" --allow-any-host >/dev/null
dpuctl storage listener create img tcp --address "127.0.0.1:$io_port" >/dev/null
lazy_ref=127.0.0.1:$link_port/app:1-lazy
ctrd_ref=10.0.2.2:$link_port/app:1

# ---- the guest -----------------------------------------------------------------------------------------------
cat >"$work/run.sh" <<GUEST
HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:$hostid
HOSTID=$hostid
IO_PORT=$io_port
CTL_PORT=$ctl_port
READAHEAD_KB=$readahead_kb
READY_RE='$(image_var READY_RE)'
START='$(image_var START_CMD)'
CTRD=$ctrd
API_PORT=$api_port
LINK_PORT=$link_port
IMG_NQN=$nqn_img
SNAPSHOTTER=$bin/dpu-snapshotter
GUEST
cat "$repo/tests/guest/lib/nvme-sysfs.sh" >>"$work/run.sh"
cat >>"$work/run.sh" <<'GUEST'
say() { echo "lazy-bench: $*"; }
fail() {
	say "FAIL: $*"
	for _c in /sys/class/nvme/nvme*; do
		[ -e "$_c/state" ] && say "$(basename "$_c"): state=$(cat "$_c/state") subsysnqn=$(cat "$_c/subsysnqn")"
	done
	say "block devices: $(cd /sys/block && echo *)"
	dmesg | tail -n 20 | sed 's/^/kernel: /'
	guest_fail "$*"
}
ctl() { # REQUEST: print the host's answer after "ok"; on no answer or an error answer say why and fail
	_tries=0
	while ! _ans=$(timeout 1800 wget -qO- "http://10.0.2.2:$CTL_PORT/$1" 2>/tmp/ctl.err); do
		_tries=$((_tries + 1))
		if [ "$_tries" -ge 120 ]; then
			echo "lazy-bench: no answer to $1 from the host: $(cat /tmp/ctl.err)" >&2
			return 1
		fi
		sleep 0.5
	done
	case "$_ans" in
	ok*) echo "${_ans#ok}" ;;
	*)
		echo "lazy-bench: the host answered $1 with: $_ans" >&2
		return 1
		;;
	esac
}
# containerd (for (e)-(g)) runs from boot on, as on a host: the image store on tmpfs, dpu-snapshotter as proxy
# plugin `dpu` with the agent's API (plaintext on the host's loopback) and the registry through the link.
if [ "$CTRD" = 1 ]; then
	mount -t cgroup2 none /sys/fs/cgroup || fail "mounting cgroup2"
	mkdir -p /var/lib /etc/containerd /etc/dpu-snapshotter /etc/nvme
	mount -t tmpfs -o size=2g tmpfs /var/lib || fail "tmpfs on /var/lib"
	echo "$HOSTNQN" >/etc/nvme/hostnqn
	echo "$HOSTID" >/etc/nvme/hostid
	cat >/etc/dpu-snapshotter/config.toml <<EOF
root = "/var/lib/dpu-snapshotter"

[dpu]
api = "http://10.0.2.2:$API_PORT"
subsystem = "img"
target_port = $IO_PORT
readahead_kb = $READAHEAD_KB

[dpu.registries]
"10.0.2.2:$LINK_PORT" = "127.0.0.1:$LINK_PORT"
EOF
	cat >/etc/containerd/config.toml <<EOF
version = 2
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[proxy_plugins.dpu]
  type = "snapshot"
  address = "/run/dpu-snapshotter/snapshotter.sock"
EOF
	"$SNAPSHOTTER" --config /etc/dpu-snapshotter/config.toml >/tmp/snapshotter.log 2>&1 &
	containerd --config /etc/containerd/config.toml >/tmp/containerd.log 2>&1 &
	_left=600
	until [ -S /run/dpu-snapshotter/snapshotter.sock ] && ctr version >/dev/null 2>&1; do
		_left=$((_left - 1))
		[ "$_left" -gt 0 ] || { tail -n 20 /tmp/snapshotter.log /tmp/containerd.log; fail "containerd or dpu-snapshotter did not start"; }
		sleep 0.1
	done
fi
# (e)-(g): pull with SNAPSHOTTER, report, run the workload to READY, report, remove everything.
ctrd_variant() { # variant snapshotter reference
	if [ "$2" = dpu ]; then
		set -- "$1" "$2" "$3" ctr-remote images rpull --plain-http --snapshotter dpu "$3"
	else
		set -- "$1" "$2" "$3" ctr images pull --plain-http --snapshotter "$2" "$3"
	fi
	_v=$1 _snap=$2 _ref=$3
	NVME_SUBNQN=$IMG_NQN
	shift 3
	"$@" >/tmp/pull.out 2>&1 || { tail -n 20 /tmp/pull.out /tmp/snapshotter.log; fail "$* failed in variant $_v"; }
	ctl "pulled/$_v" >/dev/null || fail "reporting the pull to the host failed"
	# --no-pivot: the guest's root is an initramfs, where runc cannot pivot_root.
	# shellcheck disable=SC2086 # the command line
	ctr run --rm --no-pivot --snapshotter "$_snap" "$_ref" "bench-$_v" $START >/tmp/start.out 2>&1 \
		|| { cat /tmp/start.out; fail "the workload failed in variant $_v"; }
	grep -qE "$READY_RE" /tmp/start.out || { cat /tmp/start.out; fail "no READY line in variant $_v"; }
	ctl "ready/$_v" >/dev/null || fail "reporting READY to the host failed"
	say "variant $_v: $(grep -E "$READY_RE" /tmp/start.out)"
	ctr images rm --sync "$_ref" >/dev/null || fail "ctr images rm in variant $_v"
	_left=600
	while [ -n "$(ctr snapshots --snapshotter "$_snap" ls | tail -n +2)" ] || [ -n "$(nvme_ns_devs)" ]; do
		_left=$((_left - 1))
		[ "$_left" -gt 0 ] || fail "snapshots or namespaces remain 60 s after removing the image in variant $_v"
		sleep 0.1
	done
	[ -z "$(ctr content ls -q)" ] || fail "content remains after removing the image in variant $_v"
	if [ -n "$(nvme_ctrls)" ]; then
		nvme disconnect -n "$IMG_NQN" >/dev/null || fail "nvme disconnect failed"
	fi
	sync
	echo 3 >/proc/sys/vm/drop_caches
}
while :; do
	ans=$(ctl next) || fail "asking the host for the next variant failed"
	# shellcheck disable=SC2086 # variant, NQN, namespace count, UUIDs; or variant, "containerd", snapshotter, reference
	set -- $ans
	[ "$1" = end ] && break
	if [ "$2" = containerd ]; then
		say "variant $1: containerd, $3 snapshotter"
		ctrd_variant "$1" "$3" "$4"
		continue
	fi
	V=$1 NVME_SUBNQN=$2 N=$3
	shift 3
	say "variant $V: $N namespaces"
	nvme connect -t tcp -a 10.0.2.2 -s "$IO_PORT" -n "$NVME_SUBNQN" --hostnqn "$HOSTNQN" --hostid "$HOSTID" >/dev/null \
		|| fail "nvme connect $NVME_SUBNQN failed"
	_left=600
	while [ "$(nvme_ns_devs | wc -l)" -lt "$N" ]; do
		_left=$((_left - 1))
		[ "$_left" -gt 0 ] || fail "$N namespaces of $NVME_SUBNQN did not appear"
		sleep 0.1
	done
	LOWER=""
	i=0
	if [ "$#" -eq 0 ]; then
		i=1
		mkdir -p /mnt/l1
		mount -t erofs -o ro "/dev/$(nvme_ns_devs)" /mnt/l1 || fail "mounting the rootfs image failed"
		LOWER=/mnt/l1
	fi
	for u in "$@"; do
		i=$((i + 1))
		dev=""
		for d in $(nvme_ns_devs); do [ "$(nvme_ns_uuid "$d")" = "$u" ] && dev=$d; done
		[ -n "$dev" ] || fail "no namespace with UUID $u"
		# As the host's snapshotter does for a lazily loaded layer: readahead no larger than what a start needs.
		echo "$READAHEAD_KB" >"/sys/block/$dev/queue/read_ahead_kb" || fail "setting read_ahead_kb of $dev failed"
		mkdir -p "/mnt/l$i"
		mount -t erofs -o ro "/dev/$dev" "/mnt/l$i" || fail "mounting layer $i failed"
		LOWER="/mnt/l$i${LOWER:+:$LOWER}"
	done
	mkdir -p /mnt/rw /mnt/root
	mount -t tmpfs -o size=256m tmpfs /mnt/rw
	mkdir -p /mnt/rw/upper /mnt/rw/work
	mount -t overlay overlay -o "lowerdir=$LOWER,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work" /mnt/root \
		|| fail "overlayfs failed"
	mkdir -p /mnt/root/proc /mnt/root/dev
	mount -t proc proc /mnt/root/proc
	mount -o bind /dev /mnt/root/dev
	# shellcheck disable=SC2086 # the command line
	chroot /mnt/root /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 $START \
		>/tmp/start.out 2>&1 || { cat /tmp/start.out; fail "the workload failed in variant $V"; }
	grep -qE "$READY_RE" /tmp/start.out || { cat /tmp/start.out; fail "no READY line in variant $V"; }
	ctl "ready/$V" >/dev/null || fail "reporting READY to the host failed"
	say "variant $V: $(grep -E "$READY_RE" /tmp/start.out)"
	for m in /mnt/root/dev /mnt/root/proc /mnt/root /mnt/rw; do umount "$m" || fail "umount $m"; done
	while [ "$i" -ge 1 ]; do
		umount "/mnt/l$i" || fail "umount /mnt/l$i"
		i=$((i - 1))
	done
	nvme disconnect -n "$NVME_SUBNQN" >/dev/null || fail "nvme disconnect failed"
	while [ -n "$(nvme_ns_devs)" ]; do sleep 0.1; done
	sync
	echo 3 >/proc/sys/vm/drop_caches
done
say "all variants done"
GUEST

guest_binaries=nvme
guest_memory=1536
if ((ctrd)); then
	guest_binaries+=",containerd,containerd-shim-runc-v2,runc,ctr,ctr-remote,$bin/dpu-snapshotter"
	guest_memory=4096 # the programs (~150 MiB) and (e)'s content and unpacked snapshots on tmpfs
fi
initramfs=$(images/build-initramfs.sh --arch amd64 --kernel "$kernel_dir" \
	--module crc32c_generic,nvme-tcp,erofs,overlay --binary "$guest_binaries" --script "$work/run.sh" \
	--out "$work/initramfs.cpio")

coproc CTL { exec python3 "$repo/tests/guest/lib/ctl.py" "$ctl_port"; }
# shellcheck disable=SC2153 # set by coproc
ctl_pid=$CTL_PID
ctl_in=${CTL[0]}
ctl_out=${CTL[1]}
if ! read -r -t 10 line <&"$ctl_in" || [[ $line != listening ]]; then
	die "the control endpoint did not start"
fi

accel=tcg
if [[ ${DPU_GUEST_ACCEL:-auto} != tcg && ! -e /sys/module/kvm_pvm && -r /dev/kvm && -w /dev/kvm ]] \
	&& grep -qwE 'vmx|svm' /proc/cpuinfo; then
	accel=kvm
fi
say "booting the guest ($accel; console: $work/console.log)"
qemu-system-x86_64 -cpu max -accel "$accel" -m "$guest_memory" -smp 1 -nographic -no-reboot \
	-kernel "$kernel" -initrd "$initramfs" -append "console=ttyS0 panic=-1 quiet" \
	-netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= -device virtio-rng-pci \
	</dev/null >"$work/console.log" 2>&1 &
qemu_pid=$!

# ---- the variants -------------------------------------------------------------------------------------------
log_lines() { wc -l <"$work/nginx/access.log" 2>/dev/null || echo 0; }
log_bytes() { # first-line last-line: response bytes of GETs in that part of the access log
	awk -v a="$1" -v b="$2" 'NR > a && NR <= b && $2 == "GET" { n += $4 } END { print n + 0 }' "$work/nginx/access.log"
}
: >"$work/results.tsv"
variants=()
for ((r = 0; r < runs; r++)); do
	variants+=(a b c d)
	((!ctrd)) || variants+=(e f g)
done
round=0
current=""
prep_us=0
answered_us=0
start_from_us=0
log_from=0
ready_us=0
mkfs_us=""
trace_chunks=""
trace_state=unknown # stored | none
prefetched=()
exported=0
full_ready=0

finish_variant() { # records the variant that just ended
	[[ -n $current ]] || return 0
	local bytes
	bytes=$(log_bytes "$log_from" "$(log_lines)")
	printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$current" "$prep_us" "$((ready_us - start_from_us))" "$bytes" \
		>>"$work/results.tsv"
	say "run $round ($current): prepare $(secs "$prep_us") s, start $(secs "$((ready_us - start_from_us))") s," \
		"$bytes bytes fetched"
}

unexport_image() {
	((exported)) || return 0
	dpuctl image unexport app --subsystem img >/dev/null
	dpuctl image delete app >/dev/null
	exported=0
}

prepare_lazy() { # variant prefetch wipe-cache
	unexport_image
	stop_agent
	[[ $3 == 0 ]] || rm -rf "$work/data/image-cache"
	start_agent "$2"
	wait_port "$io_port" "$agent_pid" "the agent's NVMe/TCP listener"
	log_from=$(log_lines)
	local t0
	t0=$(now_us)
	dpuctl image create app --ref "$lazy_ref" --wait 300 >/dev/null
	dpuctl image export app --subsystem img >/dev/null
	wait_ready img "$(image_status layers | wc -w)"
	prep_us=$(($(now_us) - t0))
	exported=1
	answer="ok $1 $nqn_img $(image_status layers | wc -w) $(image_status layers)"
}

# (b)'s agent records the start-up trace and stores it trace_window seconds after the first read; with
# prefetch off, an agent that finds a stored trace records none, so this waits only once.
wait_for_trace() {
	[[ $trace_state == unknown ]] || return 0
	if ((trace_window == 0)); then
		trace_state=none
		say "DPU_LAZY_TRACE_WINDOW=0: the agent stores no start-up trace, (c) is n/a"
		return 0
	fi
	say "waiting for the agent to store (b)'s start-up trace (window $trace_window s)"
	local deadline=$((SECONDS + trace_window + 90))
	until grep -q 'start-up trace stored' "$agent_log"; do
		if grep -q 'storing the start-up trace failed' "$agent_log" || ((SECONDS >= deadline)); then
			break
		fi
		sleep 1
	done
	if grep -q 'start-up trace stored' "$agent_log"; then
		trace_state=stored
		trace_chunks=$(grep -o 'start-up trace stored.*' "$agent_log" | grep -o 'chunks=[0-9]*' | head -n 1 | cut -d= -f2)
		[[ -z $save_trace ]] || save_stored_trace "$save_trace"
	else
		trace_state=none
		say "the agent stored no start-up trace: (c) is n/a"
	fi
}

next_variant() {
	finish_variant
	current=""
	local v t0 t1
	while ((${#variants[@]})); do
		v=${variants[0]}
		variants=("${variants[@]:1}")
		case $v in
		a)
			round=$((round + 1))
			say "run $round/$runs (a) full pull: skopeo copy + umoci unpack through the link"
			unexport_image
			rm -rf "$work/pulled" "$work/unpacked"
			log_from=$(log_lines)
			t0=$(now_us)
			skopeo copy --quiet --src-tls-verify=false "docker://127.0.0.1:$link_port/app:1" "oci:$work/pulled:app:1" >&2
			umoci unpack --image "$work/pulled:app:1" "$work/unpacked" >/dev/null
			prep_us=$(($(now_us) - t0))
			if ((!full_ready)); then
				t1=$(now_us)
				mkfs.erofs --quiet "$work/full.erofs" "$work/unpacked/rootfs" >&2
				mkfs_us=$(($(now_us) - t1))
				dpuctl storage volume create full --file "$work/full.erofs" \
					--size "$(stat -c %s "$work/full.erofs")" --block-size 4096 >/dev/null
				dpuctl storage subsystem create full --nqn "$nqn_full" --allow-any-host >/dev/null
				dpuctl storage namespace create full n1 --volume full >/dev/null
				dpuctl storage listener create full tcp --address "127.0.0.1:$io_port" >/dev/null
				full_ready=1
			fi
			wait_ready full 1
			answer="ok a $nqn_full 1"
			;;
		b)
			say "run $round/$runs (b) lazy, empty DPU cache, no trace replay"
			prepare_lazy b false 1
			;;
		c)
			wait_for_trace
			if [[ $trace_state != stored ]]; then
				printf '%s\tc\tn/a\t\t\n' "$round" >>"$work/results.tsv"
				continue
			fi
			say "run $round/$runs (c) lazy, empty DPU cache, the stored trace replayed as prefetch"
			prepare_lazy c true 1
			;;
		d)
			# Still (c)'s agent: how much of the trace it prefetched.
			[[ $trace_state != stored ]] || prefetched+=("$(image_status prefetched_chunks)")
			say "run $round/$runs (d) lazy, warm DPU cache (agent restarted, cache kept)"
			prepare_lazy d true 0
			;;
		e)
			say "run $round/$runs (e) containerd, overlayfs snapshotter: ctr images pull + ctr run"
			unexport_image
			log_from=$(log_lines)
			answer="ok e containerd overlayfs $ctrd_ref"
			;;
		f | g)
			unexport_image
			stop_agent
			if [[ $v == f ]]; then
				say "run $round/$runs (f) containerd, dpu-snapshotter, empty DPU cache: ctr-remote images rpull + ctr run"
				rm -rf "$work/data/image-cache"
			else
				say "run $round/$runs (g) containerd, dpu-snapshotter, warm DPU cache (agent restarted, cache kept)"
			fi
			start_agent false
			wait_port "$io_port" "$agent_pid" "the agent's NVMe/TCP listener"
			log_from=$(log_lines)
			answer="ok $v containerd dpu $ctrd_ref"
			;;
		esac
		current=$v
		return 0
	done
	answer="ok end"
}

deadline=$((SECONDS + guest_timeout))
done_guest=0
while :; do
	if ! kill -0 "$qemu_pid" 2>/dev/null; then
		wait "$qemu_pid" 2>/dev/null || true
		qemu_pid=""
		break
	fi
	((SECONDS < deadline)) || die "the guest did not finish within $guest_timeout s (console: $work/console.log)"
	rc=0
	read -r -t 1 req <&"$ctl_in" || rc=$?
	((rc > 128)) && continue
	((rc == 0)) || die "the control endpoint stopped"
	case $req in
	next) next_variant ;;
	pulled/*)
		start_from_us=$(now_us)
		prep_us=$((start_from_us - answered_us))
		answer="ok"
		;;
	ready/*)
		ready_us=$(now_us)
		answer="ok"
		;;
	*) answer="error unknown request $req" ;;
	esac
	if [[ $req == next && $current != "" ]]; then
		answered_us=$(now_us)
		start_from_us=$answered_us
	fi
	printf '%s\n' "$answer" >&"$ctl_out"
	[[ $answer != "ok end" ]] || done_guest=1
done
if ((!done_guest)) || ! grep -aq 'GUEST-RESULT: PASS' "$work/console.log"; then
	tail -n 40 "$work/console.log" >&2
	die "the guest failed (console: $work/console.log)"
fi
grep -a '^lazy-bench: ' "$work/console.log" | tr -d '\r' | sed 's/^/  guest: /' >&2

# ---- the table -----------------------------------------------------------------------------------------------
echo "$command_line — $(date -u '+%Y-%m-%d %H:%M UTC') — revision $(git -C "$repo" rev-parse --short HEAD)$(
	git -C "$repo" diff --quiet HEAD 2>/dev/null || echo ' (modified)')"
echo
echo "Image: $(image_var LAYERS) layers, $(awk -v b="$(image_var COMPRESSED_BYTES)" 'BEGIN { printf "%.0f", b / 1048576 }') MiB" \
	"compressed, $(awk -v b="$(image_var UNPACKED_BYTES)" 'BEGIN { printf "%.0f", b / 1048576 }') MiB unpacked;" \
	"link $mbit Mbit/s each way shared by all connections, RTT loopback + $rtt_ms ms; guest: QEMU TCG, 1 vCPU."
echo
python3 - "$work/results.tsv" <<'PY'
import statistics
import sys

names = {
    "a": "(a) full pull + unpack, then start",
    "b": "(b) lazy, empty DPU cache",
    "c": "(c) lazy, empty cache + start-up trace prefetch",
    "d": "(d) lazy, warm DPU cache",
    "e": "(e) containerd, overlayfs snapshotter, full pull",
    "f": "(f) containerd, dpu-snapshotter, empty DPU cache",
    "g": "(g) containerd, dpu-snapshotter, warm DPU cache",
}
runs = {}
for line in open(sys.argv[1]):
    if line.strip():
        r, v, p, s, b = line.rstrip("\n").split("\t")
        runs.setdefault(v, []).append(None if p == "n/a" else (int(p) / 1e6, int(s) / 1e6, int(b)))


def median_run(rows):
    """The run with the median time to ready, and the range of times."""
    rows = sorted(rows, key=lambda x: x[0] + x[1])
    return rows[(len(rows) - 1) // 2], rows[0][0] + rows[0][1], rows[-1][0] + rows[-1][1]


def table(variants, base_variant, prepare, start):
    base = base_bytes = None
    if runs.get(base_variant) and None not in runs[base_variant]:
        (p, s, b), _, _ = median_run(runs[base_variant])
        base, base_bytes = p + s, statistics.median(x[2] for x in runs[base_variant])
    print(f"| variant | {prepare} (s) | {start} (s) | time to ready (s) [min–max] | fetched from registry (MiB) "
          f"| time vs ({base_variant}) | bytes vs ({base_variant}) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        rows = runs.get(v)
        if not rows:
            continue
        if None in rows:
            print(f"| {names[v]} | n/a (no trace support) | | | | | |")
            continue
        (p, s, b), lo, hi = median_run(rows)
        fetched = statistics.median(x[2] for x in rows)
        spread = f" [{lo:.1f}–{hi:.1f}]" if len(rows) > 1 else ""
        ratio = f"{(p + s) / base:.2f}" if base else "-"
        bratio = f"{fetched / base_bytes:.3f}" if base_bytes else "-"
        print(f"| {names[v]} | {p:.1f} | {s:.1f} | {p + s:.1f}{spread} | {fetched / 1048576:.1f} | {ratio} | {bratio} |")


table("abcd", "a", "prepare", "start → READY")
if any(v in runs for v in "efg"):
    print()
    table("efg", "e", "pull", "ctr run → READY")
PY
echo
if ((runs > 1)); then
	echo "Median of $runs runs (the run with the median time to ready; fetched: median)."
else
	echo "One run (DPU_LAZY_RUNS=1)."
fi
echo "prepare: (a) skopeo copy + umoci unpack on the host; (b)-(d) dpuctl image create --wait + image export."
echo "start: nvme connect, mount, overlayfs, chroot python3 /app/start.py until READY, in the guest (host clock)."
if ((ctrd)); then
	echo "pull: (e) ctr images pull, (f)-(g) ctr-remote images rpull --snapshotter dpu, in the guest;" \
		"ctr run → READY: ctr run --rm of the workload until it exits after READY (host clock)."
fi
echo "fetched: response bytes in nginx's access log between the variant's start and its end."
[[ -z $mkfs_us ]] || echo "mkfs.erofs of the unpacked rootfs for (a)'s guest: $(secs "$mkfs_us") s, not counted."
if [[ $trace_state == stored ]] && awk -F'\t' -v w="$trace_window" '$2 == "b" && $4 / 1e6 > w { f = 1 } END { exit !f }' \
	"$work/results.tsv"; then
	echo "Warning: (b)'s start took longer than the trace window ($trace_window s): (c) replays a partial trace."
fi
[[ $trace_state != stored ]] \
	|| echo "(b) stored a start-up trace of ${trace_chunks:-?} chunks; (c) prefetched" \
		"$(printf '%s\n' "${prefetched[@]:-?}" | sort -u | paste -sd/) chunks (per run)."
