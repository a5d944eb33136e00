# Lazy container images end to end: the Linux kernel mounts a container image's layers from dpu-agent's
# NVMe/TCP target, stacks them with overlayfs and starts the image's workload, while the agent fetches each
# block from the registry on first read; a registry outage fails uncached reads with EIO instead of hanging.
#
# Host side (guest_prepare):
#   - builds or reuses the test image (images/test-image.sh: Debian 12 with Python, 4 layers, the top one
#     deleting files of lower ones and replacing /app/config.yaml);
#   - starts Debian's docker-registry on a free loopback port with its own config (filesystem storage in
#     GUEST_WORK, no auth) and pushes the image with skopeo;
#   - starts the release dpu-agent with [images] fetch_deadline_ms = 3000 (DPU_LAZY_DEADLINE_MS), and with
#     trace replay, trace recording and background fill off, so that only the guest's reads fetch chunks;
#   - `dpuctl image convert` (the agent converts and pushes app:1-lazy), a subsystem allowing one host NQN
#     with a TCP listener, `dpuctl image create app --ref ... --wait`, `dpuctl image export app --subsystem`;
#   - reads the layers' namespace UUIDs, bottom layer first, from `dpuctl --json image get app`, and computes
#     from `umoci unpack` of the source image the SHA-256 of 50 files taken from every layer (the Python
#     interpreter, .py and .so files, /app) and of /app/assets/weights.bin (24 MiB that the workload never
#     reads).
#
# Guest (amd64, busybox + the host's nvme-cli; modules nvme-tcp, erofs (+ crc32c), overlay), steps printed as
# `GUEST-STEP: <name>`:
#   connect   nvme connect to 10.0.2.2 (the host's loopback); one namespace per layer appears; each is
#             matched to its layer by the UUID the kernel shows in sysfs (uuid, else nguid)
#   mount     each layer mounted read-only as EROFS, stacked with overlayfs (lowerdir = top … bottom, upper and
#             work on tmpfs); every deleted path is absent from the stack, has a whiteout in the top layer
#             and is still in a lower one; /app/config.yaml is the top layer's version
#   start     `chroot <root> /usr/bin/python3 /app/start.py` prints `READY <modules> config=2 …`
#   verify    the 50 checksums match (busybox sha256sum -c)
#   then GUEST-READY, and with host_check:
#   outage    the host stops the registry; reading the untouched file fails with EIO within
#             DPU_LAZY_EIO_LIMIT seconds (default 2 × the fetch deadline + 4 s): no hang, no controller reset
#   recovery  the host restarts the registry on the same port and storage; the same file now reads back with
#             the right checksum on the same controller, without reconnecting
#   teardown  unmount everything, nvme disconnect
#   Finally host_check checks the agent's view: it is up, it counted the failed reads, and it has cached
#   only part of the image; it returns that result, which decides the run (the harness then stops QEMU).
#   The guest prints `LAZY-IMAGE: PASS` and exits (`GUEST-RESULT: PASS`) if it gets there first.
#
# Coordination: once the guest prints GUEST-READY, host_check serves a small HTTP endpoint on a free loopback
# port (a Python http.server in a coprocess; the guest reaches it as 10.0.2.2:<port> with busybox wget). The
# guest asks, the host acts and answers one line, `ok …` or `error …`, only when it is done:
#   GET /registry-stop    stop the registry (answered once its port refuses connections)
#   GET /registry-start   start it again with the same config (answered once it accepts connections)
#   GET /done             final host-side checks; host_check returns their result (0 = pass)
# So no side sleeps or polls a log to learn what the other did. A guest failure prints `lazy-image: FAIL
# [<step>]: …` and ends the guest script, which fails the run (before GUEST-READY: "guest stopped before
# GUEST-READY"; after: "guest stopped while host_check was running"). guest_cleanup stops the agent, the
# registry and the endpoint; the agent's log is kept as <name>.agent.log next to the console log.
#
# Builds `cargo build --locked --release --bin dpu-agent --bin dpuctl` unless DPU_GUEST_NO_BUILD=1 (then uses
# ${CARGO_TARGET_DIR:-<repo>/target}/release). Needs root (image build, umoci unpack, the agent's converter).
# Environment: DPU_LAZY_DEADLINE_MS (agent fetch deadline, 3000), DPU_LAZY_EIO_LIMIT (s), DPU_LAZY_CMD_TIMEOUT
# (s per guest command, 600), DPU_LAZY_AGENT_TIMEOUT (s for the agent to serve, 60), DPU_LAZY_DPUCTL_TIMEOUT
# (s per dpuctl call, 60; the conversion gets 900), RUST_LOG (agent, default info), DPU_GUEST_TIMEOUT (600).
# shellcheck shell=bash disable=SC2034 # variables are read by tests/guest.sh

GUEST_ARCH=amd64
# erofs needs libcrc32c, whose crc32c implementation is only a soft dependency: load it first.
GUEST_MODULES=(crc32c_generic nvme-tcp erofs overlay)
GUEST_BINARIES=(nvme)
GUEST_HOST_PACKAGES=(nvme-cli mmdebstrap umoci skopeo erofs-utils docker-registry)
# Python, numpy and friends run from the stacked layers: the page cache holds what they read.
GUEST_MEMORY=1536
GUEST_SMP=1
GUEST_TIMEOUT=600
# The guest script carries this run's ports and UUIDs.
GUEST_CACHE_IMAGE=0

LAZY_NQN=nqn.2026-11.io.dpu-agent:lazy-image
LAZY_HOSTID=3f6c1d2e-8a4b-4c5d-9e7f-0a1b2c3d4e5f
LAZY_HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:$LAZY_HOSTID
LAZY_DEADLINE_MS=${DPU_LAZY_DEADLINE_MS:-3000}
LAZY_FILES=50

LAZY_AGENT_PID=""
LAZY_REGISTRY_PID=""
LAZY_API_PORT=""
LAZY_REG_PORT=""
LAZY_IO_PORT=""
LAZY_CTL_PORT=""
LAZY_UUIDS=""
LAZY_UNTOUCHED_SHA=""
LAZY_IMAGE_DIR=""

lazy_say() { printf 'lazy-image: %s\n' "$*" >&2; }

lazy_target_dir() {
	local dir=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
	[[ $dir == /* ]] || dir=$REPO_ROOT/$dir
	printf '%s\n' "$dir"
}

lazy_agent_log() { printf '%s\n' "${GUEST_LOG%.log}.agent.log"; }

lazy_agent_tail() {
	[[ -f $GUEST_WORK/agent.log ]] || return 0
	printf -- '---- last 30 lines of the agent log (%s) ----\n' "$(lazy_agent_log)" >&2
	tail -n 30 "$GUEST_WORK/agent.log" >&2
	printf -- '---- end of agent log ----\n' >&2
}

# A value from the test image's env file (read in a clean shell).
lazy_image_var() {
	# shellcheck disable=SC2016 # expanded by the inner shell
	env -i bash -c 'source "$1" && printf "%s\n" "${!2}"' _ "$LAZY_IMAGE_DIR/env" "$1"
}

# Free TCP ports on 127.0.0.1, distinct from each other.
lazy_free_ports() { # count
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

lazy_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# lazy_dpuctl [--timeout S] ARGS...: run dpuctl against the agent; its stdout is ours, the command and any
# stderr go to stderr; on failure say which command failed and why.
lazy_dpuctl() {
	local limit=${DPU_LAZY_DPUCTL_TIMEOUT:-60} rc=0
	if [[ $1 == --timeout ]]; then
		limit=$2
		shift 2
	fi
	lazy_say "dpuctl $*"
	env -u DPUCTL_CA -u DPUCTL_CERT -u DPUCTL_KEY -u DPUCTL_ADDR timeout "$limit" \
		"$(lazy_target_dir)/release/dpuctl" --addr "http://127.0.0.1:$LAZY_API_PORT" "$@" \
		2>"$GUEST_WORK/dpuctl.err" || rc=$?
	sed 's/^/  | /' "$GUEST_WORK/dpuctl.err" >&2
	if ((rc != 0)); then
		lazy_say "FAIL: dpuctl $* failed (status $rc$( ((rc != 124)) || printf ', timed out after %ss' "$limit"))"
		lazy_agent_tail
		return 1
	fi
}

# Wait until subsystem img has COUNT namespaces, all ready (published to the target).
lazy_wait_namespaces() { # count
	local deadline=$((SECONDS + 60))
	until env -u DPUCTL_CA -u DPUCTL_CERT -u DPUCTL_KEY -u DPUCTL_ADDR "$(lazy_target_dir)/release/dpuctl" \
		--addr "http://127.0.0.1:$LAZY_API_PORT" --json storage namespace list img 2>/dev/null | python3 -c '
import json, sys
ns = json.load(sys.stdin).get("namespaces", [])
ready = all((n.get("status") or {}).get("state") == "ready" for n in ns)
sys.exit(0 if ready and len(ns) == int(sys.argv[1]) else 1)' "$1"; do
		if ((SECONDS >= deadline)); then
			lazy_say "FAIL: subsystem img does not have $1 ready namespaces after 60 s"
			lazy_agent_tail
			return 1
		fi
		sleep 0.2
	done
}

lazy_agent_alive() {
	[[ -n $LAZY_AGENT_PID ]] && kill -0 "$LAZY_AGENT_PID" 2>/dev/null \
		&& [[ $(awk '{ print $3 }' "/proc/$LAZY_AGENT_PID/stat" 2>/dev/null) != Z ]]
}

# The registry runs from guest_prepare and, after an outage, from host_check: its pid is kept in a file.
lazy_registry_start() {
	docker-registry serve "$GUEST_WORK/registry.yml" </dev/null >>"$GUEST_WORK/registry.log" 2>&1 &
	printf '%s\n' "$!" >"$GUEST_WORK/registry.pid"
	local deadline=$((SECONDS + 30))
	until lazy_port_open "$LAZY_REG_PORT"; do
		if ! kill -0 "$(cat "$GUEST_WORK/registry.pid")" 2>/dev/null || ((SECONDS >= deadline)); then
			lazy_say "FAIL: docker-registry does not serve on 127.0.0.1:$LAZY_REG_PORT; its log:"
			tail -n 20 "$GUEST_WORK/registry.log" >&2
			return 1
		fi
		sleep 0.1
	done
}

lazy_registry_stop() {
	local pid _
	pid=$(cat "$GUEST_WORK/registry.pid" 2>/dev/null) || return 0
	[[ -n $pid ]] || return 0
	kill -TERM "$pid" 2>/dev/null || true
	for _ in {1..100}; do
		lazy_port_open "$LAZY_REG_PORT" || break
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
	for _ in {1..50}; do
		lazy_port_open "$LAZY_REG_PORT" || break
		sleep 0.1
	done
	: >"$GUEST_WORK/registry.pid"
	! lazy_port_open "$LAZY_REG_PORT"
}

# The expected checksums: LAZY_FILES regular files spread over the whole tree (every layer) plus the key
# ones, as `sha256sum -c` lines relative to the root; and the untouched file's checksum on stdout.
lazy_expected() { # rootfs untouched-path sums-file
	python3 - "$1" "$2" "$3" "$LAZY_FILES" <<'PY'
import hashlib
import os
import sys

root, untouched, out, count = sys.argv[1], sys.argv[2].lstrip("/"), sys.argv[3], int(sys.argv[4])


def sha(path):
    h = hashlib.sha256()
    with open(os.path.join(root, path), "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


fixed = ["usr/bin/python3.11", "app/start.py", "app/config.yaml", "app/templates/index.html",
         "app/data/items-00.json", "app/data/items-23.json", "usr/lib/os-release"]
pool = []
for d, dirs, files in os.walk(root):
    dirs.sort()
    for name in sorted(files):
        rel = os.path.relpath(os.path.join(d, name), root)
        full = os.path.join(root, rel)
        if (os.path.islink(full) or not os.path.isfile(full) or rel in fixed or rel.startswith("app/assets/")
                or not rel.isascii() or any(c.isspace() for c in rel)):
            continue
        pool.append(rel)
picked = [p for p in fixed if os.path.isfile(os.path.join(root, p))]
want = count - len(picked)
stride = len(pool) / want
picked += [pool[int(i * stride)] for i in range(want)]
with open(out, "w") as f:
    for rel in picked:
        f.write(f"{sha(rel)}  {rel}\n")
print(sha(untouched))
PY
}

guest_prepare() {
	local target agent dpuctl
	target=$(lazy_target_dir)
	agent=$target/release/dpu-agent
	dpuctl=$target/release/dpuctl
	if [[ ${DPU_GUEST_NO_BUILD:-0} != 1 ]]; then
		lazy_say "building host dpu-agent and dpuctl"
		(cd "$REPO_ROOT" && cargo build --locked --release --bin dpu-agent --bin dpuctl) >&2 || return 1
	fi
	local f
	for f in "$agent" "$dpuctl"; do
		[[ -x $f ]] || {
			lazy_say "FAIL: $(basename "$f") not found at $f (build it, or unset DPU_GUEST_NO_BUILD)"
			return 1
		}
	done

	LAZY_IMAGE_DIR=$("$REPO_ROOT/images/test-image.sh") || return 1
	local oci tag layers
	oci=$(lazy_image_var OCI_DIR)
	tag=$(lazy_image_var OCI_TAG)
	layers=$(lazy_image_var LAYERS)

	local admin
	read -r LAZY_API_PORT admin LAZY_REG_PORT LAZY_IO_PORT LAZY_CTL_PORT <<<"$(lazy_free_ports 5)"

	# The packaged config turns on htpasswd auth; this one serves anonymously from GUEST_WORK.
	mkdir -p "$GUEST_WORK/registry"
	cat >"$GUEST_WORK/registry.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $GUEST_WORK/registry
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$LAZY_REG_PORT
YML
	lazy_registry_start || return 1
	LAZY_REGISTRY_PID=$(cat "$GUEST_WORK/registry.pid")
	lazy_say "docker-registry on 127.0.0.1:$LAZY_REG_PORT; pushing oci:$oci:$tag as app:1"
	skopeo copy --quiet --dest-tls-verify=false "oci:$oci:$tag" "docker://127.0.0.1:$LAZY_REG_PORT/app:1" >&2 \
		|| return 1

	mkdir -p "$GUEST_WORK/data"
	cat >"$GUEST_WORK/agent.toml" <<TOML
data_dir = "$GUEST_WORK/data"

[api]
listen = "127.0.0.1:$LAZY_API_PORT"

[admin]
listen = "127.0.0.1:$admin"

[images]
fetch_deadline_ms = $LAZY_DEADLINE_MS
# Only the guest's reads fetch chunks: no stored trace replayed, none recorded, no background fill.
prefetch = false
trace_window_seconds = 0
fill_bytes_per_second = 0
TOML
	lazy_say "starting $agent (API :$LAZY_API_PORT, admin :$admin, NVMe/TCP will be :$LAZY_IO_PORT)"
	RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 "$agent" --config "$GUEST_WORK/agent.toml" \
		</dev/null >"$GUEST_WORK/agent.log" 2>&1 &
	LAZY_AGENT_PID=$!
	local deadline=$((SECONDS + ${DPU_LAZY_AGENT_TIMEOUT:-60}))
	until grep -q 'serving the control API' "$GUEST_WORK/agent.log"; do
		if ! lazy_agent_alive; then
			lazy_say "FAIL: dpu-agent exited before serving the control API"
			lazy_agent_tail
			return 1
		fi
		if ((SECONDS >= deadline)); then
			lazy_say "FAIL: dpu-agent did not log 'serving the control API' within ${DPU_LAZY_AGENT_TIMEOUT:-60}s"
			lazy_agent_tail
			return 1
		fi
		sleep 0.2
	done

	local src=127.0.0.1:$LAZY_REG_PORT/app:1 dst=127.0.0.1:$LAZY_REG_PORT/app:1-lazy t0=$SECONDS
	lazy_dpuctl --timeout 900 image convert "$src" "$dst" >&2 || return 1
	lazy_say "converted in $((SECONDS - t0)) s"
	lazy_dpuctl storage subsystem create img --nqn "$LAZY_NQN" --host "$LAZY_HOSTNQN" >&2 || return 1
	lazy_dpuctl storage listener create img tcp --address "127.0.0.1:$LAZY_IO_PORT" >&2 || return 1
	lazy_dpuctl image create app --ref "$dst" --wait 60 >&2 || return 1
	lazy_dpuctl image export app --subsystem img >&2 || return 1
	lazy_dpuctl --json image get app >"$GUEST_WORK/image.json" || return 1
	# Layer UUIDs, bottom layer first (dpuctl's JSON keys may be snake_case or camelCase).
	LAZY_UUIDS=$(python3 - "$GUEST_WORK/image.json" <<'PY'
import json, re, sys

def snake(v):
    if isinstance(v, dict):
        return {re.sub(r"(?<!^)([A-Z])", r"_\1", k).lower(): snake(x) for k, x in v.items()}
    return [snake(x) for x in v] if isinstance(v, list) else v

image = snake(json.load(open(sys.argv[1])))
print(" ".join(layer["uuid"].lower() for layer in image["image_status"]["layers"]))
PY
) || return 1
	local -a uuids
	read -ra uuids <<<"$LAZY_UUIDS"
	((${#uuids[@]} == layers)) || {
		lazy_say "FAIL: the image has ${#uuids[@]} layer UUIDs, the source image $layers layers"
		return 1
	}
	lazy_wait_namespaces "$layers" || return 1
	lazy_say "exported $layers layers into $LAZY_NQN; UUIDs bottom first: $LAZY_UUIDS"

	lazy_say "computing expected checksums from umoci unpack of the source image"
	umoci unpack --image "$oci:$tag" "$GUEST_WORK/bundle" >/dev/null || return 1
	LAZY_UNTOUCHED_SHA=$(lazy_expected "$GUEST_WORK/bundle/rootfs" "$(lazy_image_var UNTOUCHED_FILE)" \
		"$GUEST_WORK/sums") || return 1
	rm -rf "$GUEST_WORK/bundle"
	GUEST_FILES+=("$GUEST_WORK/sums:/guest/lazy/sums")
	lazy_say "target ready: $LAZY_NQN on 127.0.0.1:$LAZY_IO_PORT (guest: 10.0.2.2:$LAZY_IO_PORT)"
}

lazy_sq() { # single-quote a value for sh
	printf "'%s'" "${1//\'/\'\\\'\'}"
}

guest_script() {
	local limit=${DPU_LAZY_EIO_LIMIT:-$((2 * LAZY_DEADLINE_MS / 1000 + 4))}
	printf '# parameters (tests/guest/lazy-image.sh)\n'
	printf 'LAZY_ADDR=10.0.2.2\n'
	printf 'LAZY_IO_PORT=%s\n' "$LAZY_IO_PORT"
	printf 'LAZY_CTL_PORT=%s\n' "$LAZY_CTL_PORT"
	printf 'LAZY_NQN=%s\n' "$(lazy_sq "$LAZY_NQN")"
	printf 'NVME_SUBNQN=%s\n' "$(lazy_sq "$LAZY_NQN")"
	printf 'LAZY_HOSTNQN=%s\n' "$(lazy_sq "$LAZY_HOSTNQN")"
	printf 'LAZY_HOSTID=%s\n' "$(lazy_sq "$LAZY_HOSTID")"
	printf 'LAZY_UUIDS=%s\n' "$(lazy_sq "$LAZY_UUIDS")"
	printf 'LAZY_FILES=%s\n' "$LAZY_FILES"
	printf 'LAZY_START=%s\n' "$(lazy_sq "$(lazy_image_var START_CMD)")"
	printf 'LAZY_READY_RE=%s\n' "$(lazy_sq "$(lazy_image_var READY_RE)")"
	printf 'LAZY_CONFIG_VERSION=%s\n' "$(lazy_sq "$(lazy_image_var CONFIG_VERSION)")"
	printf 'LAZY_WHITEOUTS=%s\n' "$(lazy_sq "$(lazy_image_var WHITEOUTS)")"
	printf 'LAZY_UNTOUCHED=%s\n' "$(lazy_sq "$(lazy_image_var UNTOUCHED_FILE)")"
	printf 'LAZY_UNTOUCHED_SHA=%s\n' "$LAZY_UNTOUCHED_SHA"
	printf 'LAZY_UNTOUCHED_BYTES=%s\n' "$(lazy_image_var UNTOUCHED_BYTES)"
	printf 'LAZY_EIO_LIMIT=%s\n' "$limit"
	printf 'LAZY_CMD_TIMEOUT=%s\n' "${DPU_LAZY_CMD_TIMEOUT:-600}"
	cat "$REPO_ROOT/tests/guest/lib/nvme-sysfs.sh"
	cat <<'GUEST'

STEP=setup
say() { echo "lazy-image: $*"; }
now_cs() { awk '{ printf "%d\n", $1 * 100 }' /proc/uptime; }
secs() { printf '%d.%02d' $(($1 / 100)) $(($1 % 100)); }
step() { STEP=$1; echo "GUEST-STEP: $1"; }
kernel_log() { dmesg 2>/dev/null | grep -iE 'nvme|erofs|overlay|I/O error' | tail -n 30 | sed 's/^/kernel: /'; }
fail() {
	say "FAIL [$STEP]: $*"
	for _c in /sys/class/nvme/nvme*; do
		[ -e "$_c/state" ] && say "$(basename "$_c"): state=$(cat "$_c/state") subsysnqn=$(cat "$_c/subsysnqn")"
	done
	kernel_log
	guest_fail "[$STEP] $*"
}

# ctl REQUEST: ask the host (host_check's endpoint) and wait for its answer, which must start with "ok".
ctl() {
	_tries=0
	while ! _ans=$(timeout "$LAZY_CMD_TIMEOUT" wget -qO- "http://$LAZY_ADDR:$LAZY_CTL_PORT/$1" 2>/tmp/ctl.err); do
		_tries=$((_tries + 1))
		[ "$_tries" -lt 120 ] || fail "no answer to $1 from the host: $(cat /tmp/ctl.err)"
		sleep 0.5
	done
	say "host: $_ans"
	case "$_ans" in ok*) return 0 ;; esac
	fail "the host answered $1 with: $_ans"
}

# shellcheck disable=SC2086 # one word per layer
set -- $LAZY_UUIDS
N=$#

step connect
nvme connect -t tcp -a "$LAZY_ADDR" -s "$LAZY_IO_PORT" -n "$LAZY_NQN" --hostnqn "$LAZY_HOSTNQN" \
	--hostid "$LAZY_HOSTID" || fail "nvme connect failed"
CTRL=$(nvme_live_ctrl) || fail "no live controller for $LAZY_NQN after nvme connect"
_left=600
while [ "$(nvme_ns_devs | wc -l)" -lt "$N" ]; do
	_left=$((_left - 1))
	[ "$_left" -gt 0 ] || fail "$(nvme_ns_devs | wc -l) of $N namespaces appeared within 60 s"
	sleep 0.1
done
say "controller $CTRL: namespaces $(nvme_ns_devs | tr '\n' ' ')"

step mount
mkdir -p /mnt/rw /mnt/root
LOWER=""
i=0
for u in $LAZY_UUIDS; do
	i=$((i + 1))
	dev=""
	for d in $(nvme_ns_devs); do
		[ "$(nvme_ns_uuid "$d")" = "$u" ] && dev=$d
	done
	[ -n "$dev" ] || fail "no namespace has the UUID $u of layer $i (namespaces: $(for d in $(nvme_ns_devs); do printf '%s=%s ' "$d" "$(nvme_ns_uuid "$d")"; done))"
	mkdir -p "/mnt/l$i"
	mount -t erofs -o ro "/dev/$dev" "/mnt/l$i" || fail "mounting layer $i (/dev/$dev) as EROFS failed"
	say "layer $i: /dev/$dev (UUID $u, $(($(cat "/sys/block/$dev/size") / 2048)) MiB) on /mnt/l$i"
	LOWER="/mnt/l$i${LOWER:+:$LOWER}"
done
mount -t tmpfs -o size=256m tmpfs /mnt/rw || fail "tmpfs for the upper layer"
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay overlay -o "lowerdir=$LOWER,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work" /mnt/root \
	|| fail "overlayfs with lowerdir=$LOWER failed"
say "overlay: lowerdir=$LOWER"
for p in $LAZY_WHITEOUTS; do
	if [ -e "/mnt/root$p" ] || [ -L "/mnt/root$p" ]; then fail "$p is visible in the stack, but the top layer deletes it"; fi
	[ -c "/mnt/l$N$p" ] || fail "the top layer has no whiteout (0/0 character device) for $p"
	found=""
	j=1
	while [ "$j" -lt "$N" ]; do
		if [ -e "/mnt/l$j$p" ] && [ ! -c "/mnt/l$j$p" ]; then found=$j; fi
		j=$((j + 1))
	done
	[ -n "$found" ] || fail "$p is in no lower layer"
	say "ok: $p (in layer $found) is hidden by the whiteout in layer $N"
done
grep -qx "version: $LAZY_CONFIG_VERSION" /mnt/root/app/config.yaml \
	|| fail "/app/config.yaml is not the top layer's version $LAZY_CONFIG_VERSION: $(head -n 1 /mnt/root/app/config.yaml)"

step start
mkdir -p /mnt/root/proc /mnt/root/dev
mount -t proc proc /mnt/root/proc || fail "mounting proc in the rootfs"
mount -o bind /dev /mnt/root/dev || fail "binding /dev into the rootfs"
t=$(now_cs)
rc=0
# shellcheck disable=SC2086 # the command line
timeout "$LAZY_CMD_TIMEOUT" chroot /mnt/root /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root \
	LANG=C.UTF-8 $LAZY_START >/tmp/start.out 2>&1 || rc=$?
el=$(($(now_cs) - t))
sed 's/^/  | /' /tmp/start.out
[ "$rc" -eq 0 ] || fail "$LAZY_START exited with status $rc after $(secs "$el") s"
READY=$(grep -E "$LAZY_READY_RE" /tmp/start.out | head -n 1)
[ -n "$READY" ] || fail "$LAZY_START printed no ready line"
case " $READY " in *" config=$LAZY_CONFIG_VERSION "*) ;; *) fail "the workload read config version other than $LAZY_CONFIG_VERSION: $READY" ;; esac
say "ok: ready after $(secs "$el") s: $READY"
say "the workload wrote $(find /mnt/rw/upper -type f | wc -l) files to the upper layer"

step verify
(cd /mnt/root && sha256sum -c /guest/lazy/sums) >/tmp/sums.out 2>&1 || {
	grep -v ': OK$' /tmp/sums.out | head -n 20
	fail "checksums differ from umoci unpack of the source image"
}
ok=$(grep -c ': OK$' /tmp/sums.out)
[ "$ok" -eq "$LAZY_FILES" ] || fail "$ok of $LAZY_FILES checksums verified"
say "ok: $ok files match the source image"

# Look the untouched file up now: the outage read below is then a read of its data, not of metadata.
size=$(stat -c %s "/mnt/root$LAZY_UNTOUCHED") || fail "stat $LAZY_UNTOUCHED failed"
[ "$size" -eq "$LAZY_UNTOUCHED_BYTES" ] || fail "$LAZY_UNTOUCHED has $size bytes, expected $LAZY_UNTOUCHED_BYTES"

guest_ready
step outage
dmesg -c >/dev/null 2>&1
ctl registry-stop
t=$(now_cs)
rc=0
timeout $((LAZY_EIO_LIMIT * 3)) dd if="/mnt/root$LAZY_UNTOUCHED" of=/dev/null bs=1M >/tmp/dd.out 2>&1 || rc=$?
el=$(($(now_cs) - t))
sed 's/^/  | /' /tmp/dd.out
[ "$rc" -ne 0 ] || fail "reading $LAZY_UNTOUCHED succeeded with the registry down (was it cached?)"
case "$rc" in 124 | 143) fail "reading $LAZY_UNTOUCHED hung: no error within $((LAZY_EIO_LIMIT * 3)) s" ;; esac
grep -qiE 'I/O error|Input/output error' /tmp/dd.out || fail "the read failed, but not with EIO"
[ "$el" -le $((LAZY_EIO_LIMIT * 100)) ] || fail "EIO came after $(secs "$el") s; the limit is $LAZY_EIO_LIMIT s"
if dmesg | grep -iE 'nvme.*(timeout|reset|reconnect)' >/tmp/reset.out; then
	sed 's/^/kernel: /' /tmp/reset.out
	fail "the initiator timed out or reset the controller: the target did not answer the read in time"
fi
[ "$(nvme_live_ctrl)" = "$CTRL" ] || fail "controller $CTRL is not live after the failed read"
say "ok: EIO after $(secs "$el") s with the registry down (limit $LAZY_EIO_LIMIT s), $CTRL still live"

step recovery
ctl registry-start
t=$(now_cs)
sum=$(timeout "$LAZY_CMD_TIMEOUT" sha256sum "/mnt/root$LAZY_UNTOUCHED") || fail "reading $LAZY_UNTOUCHED failed after the registry came back"
el=$(($(now_cs) - t))
[ "${sum%% *}" = "$LAZY_UNTOUCHED_SHA" ] || fail "$LAZY_UNTOUCHED has SHA-256 ${sum%% *}, expected $LAZY_UNTOUCHED_SHA"
[ "$(nvme_live_ctrl)" = "$CTRL" ] || fail "controller $CTRL changed or is not live: the read should not need a reconnect"
dmesg | grep -iE 'nvme.*(timeout|reset|reconnect)' && fail "the controller was reset"
say "ok: $LAZY_UNTOUCHED read back in $(secs "$el") s with the right checksum, same controller $CTRL"

step teardown
for m in /mnt/root/dev /mnt/root/proc /mnt/root /mnt/rw; do
	umount "$m" || fail "umount $m"
done
i=$N
while [ "$i" -ge 1 ]; do
	umount "/mnt/l$i" || fail "umount /mnt/l$i"
	i=$((i - 1))
done
nvme disconnect -n "$LAZY_NQN" || fail "nvme disconnect failed"
_left=300
while nvme_live_ctrl >/dev/null || [ -n "$(nvme_ns_devs)" ]; do
	_left=$((_left - 1))
	[ "$_left" -gt 0 ] || fail "the controller is still there 30 s after nvme disconnect"
	sleep 0.1
done
ctl "done"
echo "LAZY-IMAGE: PASS"
GUEST
}


# The agent's view after the guest is done: still up, reads failed during the outage, not everything fetched.
lazy_final_check() {
	lazy_agent_alive || {
		echo "error dpu-agent is not running"
		return 1
	}
	lazy_dpuctl --json image get app >"$GUEST_WORK/image-after.json" 2>/dev/null || {
		echo "error dpuctl image get failed"
		return 1
	}
	python3 - "$GUEST_WORK/image-after.json" <<'PY'
import json, re, sys

def snake(v):
    if isinstance(v, dict):
        return {re.sub(r"(?<!^)([A-Z])", r"_\1", k).lower(): snake(x) for k, x in v.items()}
    return [snake(x) for x in v] if isinstance(v, list) else v

s = snake(json.load(open(sys.argv[1])))["image_status"]
total, fetched = int(s.get("bytes_total", 0)), int(s.get("bytes_fetched", 0))
failed, fetches = int(s.get("failed_reads", 0)), int(s.get("fetches", 0))
cached = int(s.get("bytes_cached", 0))
mib = lambda b: f"{b / 1048576:.1f} MiB"
view = (f"fetched {mib(fetched)} in {fetches} requests, {mib(cached)} of {mib(total)} cached, "
        f"{failed} failed reads, last error: {s.get('last_error') or '-'}")
problems = []
if failed < 1:
    problems.append("no failed read counted during the outage")
if fetched <= 0 or cached <= 0:
    problems.append("nothing fetched or cached")
if cached >= total:
    problems.append("the whole image is cached: nothing was lazy")
print(("error " + "; ".join(problems) + ": " if problems else "ok ") + view)
sys.exit(1 if problems else 0)
PY
}

host_check() {
	coproc LAZY_CTL { exec python3 "$REPO_ROOT/tests/guest/lib/ctl.py" "$LAZY_CTL_PORT"; }
	local from=${LAZY_CTL[0]} to=${LAZY_CTL[1]} req answer rc line
	printf '%s\n' "$LAZY_CTL_PID" >"$GUEST_WORK/ctl.pid"
	trap 'kill "$(cat "$GUEST_WORK/ctl.pid" 2>/dev/null)" 2>/dev/null || true' EXIT
	if ! read -r -t 10 line <&"$from" || [[ $line != listening ]]; then
		lazy_say "FAIL: the control endpoint did not start on 127.0.0.1:$LAZY_CTL_PORT"
		return 1
	fi
	lazy_say "guest phase 1 passed; control endpoint on 127.0.0.1:$LAZY_CTL_PORT (guest: 10.0.2.2:$LAZY_CTL_PORT)"
	while :; do
		rc=0
		read -r -t 1 req <&"$from" || rc=$?
		if ((rc > 128)); then
			if ! lazy_agent_alive; then
				lazy_say "FAIL: dpu-agent exited while the guest was running"
				lazy_agent_tail
				return 1
			fi
			continue
		fi
		((rc == 0)) || {
			lazy_say "FAIL: the control endpoint stopped"
			return 1
		}
		lazy_say "guest asks: $req"
		case "$req" in
		registry-stop)
			if lazy_registry_stop; then answer="ok registry stopped"; else answer="error the registry did not stop"; fi
			;;
		registry-start)
			if lazy_registry_start; then answer="ok registry serving again"; else answer="error the registry did not start"; fi
			;;
		done)
			rc=0
			answer=$(lazy_final_check) || rc=$?
			lazy_say "agent: $answer"
			printf '%s\n' "$answer" >&"$to"
			((rc == 0)) || lazy_agent_tail
			return "$rc"
			;;
		*) answer="error unknown request '$req'" ;;
		esac
		lazy_say "answer: $answer"
		printf '%s\n' "$answer" >&"$to"
	done
}

guest_cleanup() {
	local pid _
	pid=$(cat "$GUEST_WORK/ctl.pid" 2>/dev/null)
	[[ -z $pid ]] || kill "$pid" 2>/dev/null
	if [[ -n $LAZY_AGENT_PID ]]; then
		if kill -0 "$LAZY_AGENT_PID" 2>/dev/null; then
			kill -TERM "$LAZY_AGENT_PID" 2>/dev/null
			for _ in {1..100}; do
				lazy_agent_alive || break
				sleep 0.1
			done
			kill -KILL "$LAZY_AGENT_PID" 2>/dev/null
		fi
		wait "$LAZY_AGENT_PID" 2>/dev/null
		LAZY_AGENT_PID=""
	fi
	[[ -z $LAZY_REG_PORT ]] || lazy_registry_stop
	if [[ -n $LAZY_REGISTRY_PID ]]; then
		kill -KILL "$LAZY_REGISTRY_PID" 2>/dev/null
		wait "$LAZY_REGISTRY_PID" 2>/dev/null
		LAZY_REGISTRY_PID=""
	fi
	if [[ -f $GUEST_WORK/agent.log ]]; then
		cp "$GUEST_WORK/agent.log" "$(lazy_agent_log)" && lazy_say "agent log: $(lazy_agent_log)"
	fi
	return 0
}
