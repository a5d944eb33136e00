# containerd runs containers from images the DPU serves: Debian's containerd 1.6 with runc and dpu-snapshotter
# as its snapshotter, in an amd64 guest (the host's role), pulls the test image lazily with
# `ctr-remote images rpull` and runs it with `ctr run`, while the dpu-agent on the machine (the DPU's role)
# converts the image, exports its layers as NVMe/TCP namespaces and fetches blocks from the registry on first
# read.
#
# Host side (guest_prepare):
#   - the test image (images/test-image.sh: Debian 12 with Python, 4 layers), pushed with skopeo as app:1 to
#     Debian's docker-registry on a free loopback port;
#   - the release dpu-agent with an mTLS API (a test CA; the agent's certificate names 10.0.2.2, the host as
#     the guest sees it), trace recording and replay off; a subsystem `img` allowing the guest's host NQN,
#     with a TCP listener;
#   - the expected SHA-256 of /app/config.yaml and /app/assets/weights.bin (24 MiB the workload never reads),
#     and the layer digests, from the OCI layout.
#
# Guest (busybox + the host's containerd, containerd-shim-runc-v2, runc, ctr, ctr-remote, nvme-cli and
# dpu-snapshotter; modules nvme-tcp, erofs, overlay), steps printed as `GUEST-STEP: <name>`:
#   start      cgroup2 and a tmpfs for /var/lib; dpu-snapshotter with a [dpu] table (the agent's API over mTLS,
#              subsystem img, the registry 10.0.2.2:<port> reached by the DPU as 127.0.0.1:<port>), then
#              containerd with the snapshotter as proxy plugin `dpu`
#   rpull      `ctr-remote images rpull --snapshotter dpu`: the snapshotter asks the agent to convert and
#              export the image, connects the initiator, mounts each layer (EROFS); containerd's content store
#              holds no layer blob; four committed snapshots, four EROFS mounts
#   run        `ctr run --rm --snapshotter dpu` of `sha256sum /app/config.yaml` + the Python workload: right
#              checksum, READY; the host checks the agent fetched a small part of the image
#   restart    the snapshotter stops, its layer mounts are taken away (as by a reboot); started again, it
#              mounts them again; the host restarts the agent and the kernel's initiator reconnects by itself
#   second     `ctr run` of a second container reading weights.bin (fetched now, after both restarts): right
#              checksum; still four committed snapshots and four mounts (the layers are shared)
#   remove     `ctr images rm --sync`: no snapshot, no EROFS mount and no namespace is left; the snapshotter
#              counted four layers served and no fallback; the host checks that the agent has no image and
#              the subsystem no namespace
#
# Coordination with host_check as in tests/guest/lazy-image.sh: the guest asks 10.0.2.2:<port>/<request>
# (tests/guest/lib/ctl.py) and the host answers `ok …` or `error …` once done: `fetched` (bytes check),
# `agent-restart`, `done` (final checks, which decide the run).
#
# Builds `cargo build --locked --release --bin dpu-agent --bin dpuctl --bin dpu-snapshotter` unless
# DPU_GUEST_NO_BUILD=1. Needs root. Environment: DPU_CTRD_CMD_TIMEOUT (s per guest command, 600), RUST_LOG
# (agent and snapshotter, default info), DPU_GUEST_TIMEOUT (900).
# shellcheck shell=bash disable=SC2034 # variables are read by tests/guest.sh

GUEST_ARCH=amd64
GUEST_MODULES=(crc32c_generic nvme-tcp erofs overlay)
GUEST_BINARIES=(nvme containerd containerd-shim-runc-v2 runc ctr ctr-remote)
GUEST_HOST_PACKAGES=(nvme-cli mmdebstrap umoci skopeo erofs-utils docker-registry containerd runc
	stargz-snapshotter openssl)
GUEST_MEMORY=2560
GUEST_SMP=2
GUEST_TIMEOUT=900
GUEST_CACHE_IMAGE=0

# shellcheck source=tests/guest/lib/image-host.sh
source "$REPO_ROOT/tests/guest/lib/image-host.sh"
IH_NAME=containerd

CTRD_NQN=nqn.2026-12.io.dpu-agent:containerd
CTRD_HOSTID=7a1e4c2b-9d3f-4e5a-8b6c-0d1e2f3a4b5c
CTRD_HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:$CTRD_HOSTID
CTRD_API_PORT=""
CTRD_REG_PORT=""
CTRD_IO_PORT=""
CTRD_CTL_PORT=""
CTRD_LAYER_DIGESTS=""
CTRD_CONFIG_SHA=""
CTRD_WEIGHTS_SHA=""
CTRD_TOTAL_BYTES=""

# Layer digests (bottom first) and the SHA-256 of two files of the image's final rootfs, read from the OCI
# layout: "DIGESTS|CONFIG_SHA|WEIGHTS_SHA".
ctrd_image_facts() { # oci-dir tag
	python3 - "$1" "$2" <<'PY'
import gzip, hashlib, json, os, sys, tarfile

oci, tag = sys.argv[1], sys.argv[2]
blob = lambda d: os.path.join(oci, "blobs", *d.split(":"))
index = json.load(open(os.path.join(oci, "index.json")))
desc = next(m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
layers = [l["digest"] for l in json.load(open(blob(desc["digest"])))["layers"]]
want = {"app/config.yaml": None, "app/assets/weights.bin": None}
for digest in reversed(layers):  # the top layer's version wins
    with tarfile.open(fileobj=gzip.open(blob(digest))) as tar:
        for member in tar:
            name = member.name.lstrip("./")
            if name in want and want[name] is None and member.isfile():
                want[name] = hashlib.sha256(tar.extractfile(member).read()).hexdigest()
    if all(want.values()):
        break
print(" ".join(layers) + "|" + want["app/config.yaml"] + "|" + want["app/assets/weights.bin"])
PY
}

guest_prepare() {
	local target
	target=$(ih_target_dir)
	if [[ ${DPU_GUEST_NO_BUILD:-0} != 1 ]]; then
		ih_say "building dpu-agent, dpuctl and dpu-snapshotter (release)"
		(cd "$REPO_ROOT" && cargo build --locked --release --bin dpu-agent --bin dpuctl --bin dpu-snapshotter) >&2 \
			|| return 1
	fi
	local f
	for f in dpu-agent dpuctl dpu-snapshotter; do
		[[ -x $target/release/$f ]] || {
			ih_say "FAIL: $f not found in $target/release (build it, or unset DPU_GUEST_NO_BUILD)"
			return 1
		}
	done
	GUEST_BINARIES+=("$target/release/dpu-snapshotter")

	local image_dir oci tag facts admin
	image_dir=$("$REPO_ROOT/images/test-image.sh") || return 1
	# shellcheck disable=SC2016 # expanded by the inner shell
	oci=$(env -i bash -c 'source "$1" && printf "%s\n" "$OCI_DIR"' _ "$image_dir/env")
	# shellcheck disable=SC2016
	tag=$(env -i bash -c 'source "$1" && printf "%s\n" "$OCI_TAG"' _ "$image_dir/env")
	# shellcheck disable=SC2016
	CTRD_TOTAL_BYTES=$(env -i bash -c 'source "$1" && printf "%s\n" "$UNPACKED_BYTES"' _ "$image_dir/env")
	facts=$(ctrd_image_facts "$oci" "$tag") || return 1
	IFS='|' read -r CTRD_LAYER_DIGESTS CTRD_CONFIG_SHA CTRD_WEIGHTS_SHA <<<"$facts"
	ih_say "image layers: $CTRD_LAYER_DIGESTS"

	read -r CTRD_API_PORT admin CTRD_REG_PORT CTRD_IO_PORT CTRD_CTL_PORT <<<"$(ih_free_ports 5)"
	ih_registry_config "$GUEST_WORK" "$CTRD_REG_PORT"
	ih_registry_start "$GUEST_WORK" "$CTRD_REG_PORT" || return 1
	ih_say "docker-registry on 127.0.0.1:$CTRD_REG_PORT; pushing oci:$oci:$tag as app:1"
	skopeo copy --quiet --dest-tls-verify=false "oci:$oci:$tag" "docker://127.0.0.1:$CTRD_REG_PORT/app:1" >&2 \
		|| return 1

	local pki=$GUEST_WORK/pki
	ih_api_certs "$pki"
	mkdir -p "$GUEST_WORK/data"
	cat >"$GUEST_WORK/agent.toml" <<TOML
data_dir = "$GUEST_WORK/data"

[api]
listen = "127.0.0.1:$CTRD_API_PORT"

[api.tls]
cert = "$pki/agent.pem"
key = "$pki/agent-key.pem"
client_ca = "$pki/ca.pem"

[admin]
listen = "127.0.0.1:$admin"

[images]
prefetch = false
trace_window_seconds = 0
fill_bytes_per_second = 0
TOML
	printf '%s\n' --addr "https://127.0.0.1:$CTRD_API_PORT" --ca "$pki/ca.pem" --cert "$pki/host.pem" \
		--key "$pki/host-key.pem" >"$GUEST_WORK/dpuctl.args"
	ih_say "starting dpu-agent (API :$CTRD_API_PORT with mTLS, NVMe/TCP :$CTRD_IO_PORT)"
	ih_agent_start "$GUEST_WORK" || return 1
	ih_dpuctl "$GUEST_WORK" storage subsystem create img --nqn "$CTRD_NQN" --host "$CTRD_HOSTNQN" >&2 || return 1
	ih_dpuctl "$GUEST_WORK" storage listener create img tcp --address "127.0.0.1:$CTRD_IO_PORT" >&2 || return 1

	GUEST_FILES+=("$pki/ca.pem:/etc/dpu-snapshotter/ca.pem" "$pki/host.pem:/etc/dpu-snapshotter/host.pem"
		"$pki/host-key.pem:/etc/dpu-snapshotter/host-key.pem")
}

ctrd_sq() { # single-quote a value for sh
	printf "'%s'" "${1//\'/\'\\\'\'}"
}

guest_script() {
	printf '# parameters (tests/guest/containerd.sh)\n'
	printf 'API_PORT=%s\nREG_PORT=%s\nIO_PORT=%s\nCTL_PORT=%s\n' "$CTRD_API_PORT" "$CTRD_REG_PORT" \
		"$CTRD_IO_PORT" "$CTRD_CTL_PORT"
	printf 'NVME_SUBNQN=%s\n' "$(ctrd_sq "$CTRD_NQN")"
	printf 'HOSTNQN=%s\nHOSTID=%s\n' "$(ctrd_sq "$CTRD_HOSTNQN")" "$(ctrd_sq "$CTRD_HOSTID")"
	printf 'LAYERS=%s\n' "$(ctrd_sq "$CTRD_LAYER_DIGESTS")"
	printf 'CONFIG_SHA=%s\nWEIGHTS_SHA=%s\n' "$CTRD_CONFIG_SHA" "$CTRD_WEIGHTS_SHA"
	printf 'CMD_TIMEOUT=%s\n' "${DPU_CTRD_CMD_TIMEOUT:-600}"
	printf 'LOG_LEVEL=%s\n' "$(ctrd_sq "${RUST_LOG:-info}")"
	printf 'SNAPSHOTTER=%s\n' "$(ctrd_sq "$(ih_target_dir)/release/dpu-snapshotter")"
	cat "$REPO_ROOT/tests/guest/lib/nvme-sysfs.sh"
	cat <<'GUEST'

STEP=setup
IMAGE=10.0.2.2:$REG_PORT/app:1
SNAP_ROOT=/var/lib/dpu-snapshotter
say() { echo "containerd: $*"; }
step() { STEP=$1; echo "GUEST-STEP: $1"; }
logs() {
	for f in /tmp/snapshotter.log /tmp/containerd.log; do
		[ -f "$f" ] || continue
		echo "---- last 25 lines of $f ----"
		tail -n 25 "$f"
	done
	dmesg 2>/dev/null | grep -iE 'nvme|erofs|overlay|I/O error' | tail -n 15 | sed 's/^/kernel: /'
}
fail() {
	say "FAIL [$STEP]: $*"
	logs
	guest_fail "[$STEP] $*"
}
ctl() {
	_tries=0
	while ! _ans=$(timeout "$CMD_TIMEOUT" wget -qO- "http://10.0.2.2:$CTL_PORT/$1" 2>/tmp/ctl.err); do
		_tries=$((_tries + 1))
		[ "$_tries" -lt 120 ] || fail "no answer to $1 from the host: $(cat /tmp/ctl.err)"
		sleep 0.5
	done
	say "host: $_ans"
	case "$_ans" in ok*) return 0 ;; esac
	fail "the host answered $1 with: $_ans"
}
# Runs a command with the per-command timeout, its output indented.
run() {
	say "\$ $*"
	timeout "$CMD_TIMEOUT" "$@" >/tmp/run.out 2>&1
	_rc=$?
	sed 's/^/  | /' /tmp/run.out
	return $_rc
}
erofs_mounts() { grep -c " $SNAP_ROOT/remote/[0-9a-f]* erofs " /proc/mounts; }
committed() { ctr snapshots --snapshotter dpu ls 2>/dev/null | grep -c 'Committed'; }
mounts_are() { [ "$(erofs_mounts)" -eq "$1" ]; }
ctrl_live() { [ "$(cat "/sys/class/nvme/$CTRL/state" 2>/dev/null)" = live ]; }
no_snapshots() { [ -z "$(ctr snapshots --snapshotter dpu ls | tail -n +2)" ]; }
no_namespaces() { [ -z "$(nvme_ns_devs)" ]; }
# stat_is NAME VALUE: the snapshotter's count NAME (since it started) is VALUE.
stat_is() { grep -qE "\"$1\": $2,?\$" "$SNAP_ROOT/dpu-stats.json"; }
wait_for() { # seconds description command...
	_left=$(($1 * 10))
	_what=$2
	shift 2
	until "$@" >/dev/null 2>&1; do
		_left=$((_left - 1))
		if [ "$_left" -le 0 ]; then
			ctr snapshots --snapshotter dpu ls 2>&1 | sed 's/^/  snapshots | /'
			grep erofs /proc/mounts | sed 's/^/  mounts | /'
			fail "$_what"
		fi
		sleep 0.1
	done
}
start_snapshotter() {
	RUST_LOG=$LOG_LEVEL "$SNAPSHOTTER" --config /etc/dpu-snapshotter/config.toml >>/tmp/snapshotter.log 2>&1 &
	SNAP_PID=$!
	wait_for 30 "dpu-snapshotter did not create its socket" test -S /run/dpu-snapshotter/snapshotter.sock
}
stop_snapshotter() {
	kill -TERM "$SNAP_PID"
	wait "$SNAP_PID"
	_rc=$?
	[ "$_rc" -eq 0 ] || fail "dpu-snapshotter exited with status $_rc on SIGTERM"
}
# shellcheck disable=SC2086 # one word per layer
set -- $LAYERS
N=$#

step start
mount -t cgroup2 none /sys/fs/cgroup || fail "mounting cgroup2"
mkdir -p /var/lib /etc/containerd /etc/dpu-snapshotter /etc/nvme
# Overlay upper layers need a filesystem with xattrs: tmpfs, not the initramfs.
mount -t tmpfs -o size=1g tmpfs /var/lib || fail "tmpfs on /var/lib"
echo "$HOSTNQN" >/etc/nvme/hostnqn
echo "$HOSTID" >/etc/nvme/hostid
cat >/etc/dpu-snapshotter/config.toml <<EOF
root = "$SNAP_ROOT"

[dpu]
api = "https://10.0.2.2:$API_PORT"
ca = "/etc/dpu-snapshotter/ca.pem"
cert = "/etc/dpu-snapshotter/host.pem"
key = "/etc/dpu-snapshotter/host-key.pem"
subsystem = "img"
target_port = $IO_PORT

[dpu.registries]
"10.0.2.2:$REG_PORT" = "127.0.0.1:$REG_PORT"
EOF
cat >/etc/containerd/config.toml <<EOF
version = 2
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[proxy_plugins.dpu]
  type = "snapshot"
  address = "/run/dpu-snapshotter/snapshotter.sock"
EOF
start_snapshotter
containerd --config /etc/containerd/config.toml >/tmp/containerd.log 2>&1 &
wait_for 60 "containerd did not serve" ctr version
say "containerd $(ctr version | awk '/Version:/ { print $2; exit }') with dpu-snapshotter"
guest_ready

step rpull
t0=$(awk '{ print int($1) }' /proc/uptime)
run ctr-remote images rpull --plain-http --snapshotter dpu "$IMAGE" || fail "ctr-remote images rpull failed"
say "rpull took $(($(awk '{ print int($1) }' /proc/uptime) - t0)) s"
[ "$(committed)" -eq "$N" ] || fail "$(committed) committed snapshots, expected $N: $(ctr snapshots --snapshotter dpu ls)"
[ "$(erofs_mounts)" -eq "$N" ] || fail "$(erofs_mounts) layer mounts, expected $N: $(grep erofs /proc/mounts)"
ctr content ls -q >/tmp/content.txt || fail "ctr content ls"
for d in $LAYERS; do
	grep -qx "$d" /tmp/content.txt && fail "containerd downloaded layer $d: the snapshotter did not serve it"
done
stat_is layers_served "$N" && stat_is fallbacks 0 || fail "the snapshotter's counts: $(cat "$SNAP_ROOT/dpu-stats.json")"
say "ok: $N layers served by the DPU, none downloaded; content store: $(wc -l </tmp/content.txt) blobs"
for d in $(nvme_ns_devs); do
	say "namespace /dev/$d: UUID $(nvme_ns_uuid "$d"), read_ahead_kb $(cat "/sys/block/$d/queue/read_ahead_kb")"
done

step run
# --no-pivot: this guest's root is an initramfs, where pivot_root(2) is impossible; runc enters the container's
# rootfs with chroot instead. The container's rootfs is the snapshotter's overlay either way.
run ctr run --rm --no-pivot --snapshotter dpu "$IMAGE" c1 /bin/sh -c 'sha256sum /app/config.yaml && cd /app && /usr/bin/python3 /app/start.py' \
	|| fail "ctr run of the workload failed"
grep -q "^$CONFIG_SHA " /tmp/run.out || fail "/app/config.yaml in the container is not the image's (expected $CONFIG_SHA)"
grep -qE '^READY [0-9]+ ' /tmp/run.out || fail "the workload printed no READY line"
say "ok: the container ran the workload from the DPU's layers"
ctl fetched

step restart
stop_snapshotter
for m in $(awk -v r="$SNAP_ROOT/remote/" 'index($2, r) == 1 { print $2 }' /proc/mounts); do
	umount "$m" || fail "umount $m"
done
[ "$(erofs_mounts)" -eq 0 ] || fail "layer mounts remain after unmounting them"
start_snapshotter
wait_for 60 "the restarted snapshotter did not mount the $N layers again" mounts_are "$N"
say "ok: the restarted snapshotter mounted its $N layers again"
CTRL=$(nvme_live_ctrl) || fail "no live controller before the agent restart"
ctl agent-restart
wait_for 60 "controller $CTRL did not come back live after the agent restart" ctrl_live
say "ok: $CTRL live again after the agent restart"

step second
run ctr run --rm --no-pivot --snapshotter dpu "$IMAGE" c2 sha256sum /app/assets/weights.bin \
	|| fail "ctr run of the second container failed"
grep -q "^$WEIGHTS_SHA " /tmp/run.out || fail "/app/assets/weights.bin is not the image's (expected $WEIGHTS_SHA)"
[ "$(committed)" -eq "$N" ] || fail "$(committed) committed snapshots after the second container, expected $N"
[ "$(erofs_mounts)" -eq "$N" ] || fail "$(erofs_mounts) layer mounts after the second container, expected $N"
say "ok: the second container shares the $N layers; 24 MiB fetched after both restarts read back right"

step remove
run ctr images rm --sync "$IMAGE" || fail "ctr images rm failed"
wait_for 60 "snapshots remain 60 s after removing the image" no_snapshots
[ "$(erofs_mounts)" -eq 0 ] || fail "layer mounts remain: $(grep erofs /proc/mounts)"
wait_for 60 "namespaces remain on this host 60 s after removing the image" no_namespaces
sed 's/^/  | /' "$SNAP_ROOT/dpu-stats.json"
# Counts of the restarted snapshotter: the layers it mounted again at start, then released.
stat_is layers_restored "$N" || fail "the restarted snapshotter did not count $N layers mounted again"
stat_is layers_released "$N" || fail "the snapshotter did not count $N layers released"
stat_is fallbacks 0 || fail "the snapshotter fell back to pulling"
say "ok: no snapshot, mount or namespace left"
ctl "done"
kill -TERM "$(pidof containerd)"
stop_snapshotter
nvme disconnect -n "$NVME_SUBNQN" >/dev/null || fail "nvme disconnect"
echo "CONTAINERD: PASS"
GUEST
}

# The agent's image (the snapshotter made it: images/ctrd-…): bytes fetched against the image's size.
ctrd_fetched_check() {
	ih_dpuctl "$GUEST_WORK" --json image list >"$GUEST_WORK/images.json" 2>/dev/null || {
		echo "error dpuctl image list failed"
		return 1
	}
	python3 - "$GUEST_WORK/images.json" "$CTRD_TOTAL_BYTES" <<'PY'
import json, re, sys

def snake(v):
    if isinstance(v, dict):
        return {re.sub(r"(?<!^)([A-Z])", r"_\1", k).lower(): snake(x) for k, x in v.items()}
    return [snake(x) for x in v] if isinstance(v, list) else v

images = snake(json.load(open(sys.argv[1]))).get("images", [])
ours = [i for i in images if i["name"].startswith("images/ctrd-")]
if len(ours) != 1:
    print(f"error expected one image made by the snapshotter, found {[i['name'] for i in images]}")
    sys.exit(1)
s, unpacked = ours[0].get("image_status", {}), int(sys.argv[2])
fetched = int(s.get("bytes_fetched", 0))
share = fetched / unpacked
view = f"{ours[0]['name']} ({ours[0]['reference']}): fetched {fetched / 1048576:.1f} MiB, {share:.1%} of the {unpacked / 1048576:.1f} MiB unpacked image"
ok = 0 < fetched and share <= 0.25
print(("ok " if ok else "error too much or nothing fetched: ") + view)
sys.exit(0 if ok else 1)
PY
}

# Nothing left on the agent: no image, no namespace in the subsystem.
ctrd_final_check() {
	ih_agent_alive "$GUEST_WORK" || {
		echo "error dpu-agent is not running"
		return 1
	}
	ih_dpuctl "$GUEST_WORK" --json image list >"$GUEST_WORK/images.json" 2>/dev/null \
		&& ih_dpuctl "$GUEST_WORK" --json storage namespace list img >"$GUEST_WORK/ns.json" 2>/dev/null || {
		echo "error dpuctl failed"
		return 1
	}
	python3 - "$GUEST_WORK/images.json" "$GUEST_WORK/ns.json" <<'PY'
import json, sys

images = json.load(open(sys.argv[1])).get("images", [])
namespaces = json.load(open(sys.argv[2])).get("namespaces", [])
left = [i["name"] for i in images] + [n["name"] for n in namespaces]
print(("error left on the agent: " + ", ".join(left)) if left else "ok the agent holds no image and no namespace")
sys.exit(1 if left else 0)
PY
}

host_check() {
	coproc CTRD_CTL { exec python3 "$REPO_ROOT/tests/guest/lib/ctl.py" "$CTRD_CTL_PORT"; }
	local from=${CTRD_CTL[0]} to=${CTRD_CTL[1]} req answer rc line
	printf '%s\n' "$CTRD_CTL_PID" >"$GUEST_WORK/ctl.pid"
	if ! read -r -t 10 line <&"$from" || [[ $line != listening ]]; then
		ih_say "FAIL: the control endpoint did not start on 127.0.0.1:$CTRD_CTL_PORT"
		return 1
	fi
	while :; do
		rc=0
		read -r -t 1 req <&"$from" || rc=$?
		if ((rc > 128)); then
			if ! ih_agent_alive "$GUEST_WORK" && [[ -s $GUEST_WORK/agent.pid ]]; then
				ih_say "FAIL: dpu-agent exited while the guest was running"
				ih_agent_tail "$GUEST_WORK"
				return 1
			fi
			continue
		fi
		((rc == 0)) || {
			ih_say "FAIL: the control endpoint stopped"
			return 1
		}
		ih_say "guest asks: $req"
		rc=0
		case "$req" in
		fetched) answer=$(ctrd_fetched_check) || rc=$? ;;
		agent-restart)
			ih_agent_stop "$GUEST_WORK"
			if ih_agent_start "$GUEST_WORK"; then answer="ok agent restarted"; else answer="error the agent did not restart"; fi
			;;
		done)
			answer=$(ctrd_final_check) || rc=$?
			ih_say "agent: $answer"
			printf '%s\n' "$answer" >&"$to"
			((rc == 0)) || ih_agent_tail "$GUEST_WORK"
			return "$rc"
			;;
		*) answer="error unknown request '$req'" ;;
		esac
		ih_say "answer: $answer"
		printf '%s\n' "$answer" >&"$to"
	done
}

guest_cleanup() {
	local pid
	pid=$(cat "$GUEST_WORK/ctl.pid" 2>/dev/null)
	[[ -z $pid ]] || kill "$pid" 2>/dev/null
	ih_agent_stop "$GUEST_WORK"
	[[ -z $CTRD_REG_PORT ]] || ih_registry_stop "$GUEST_WORK" "$CTRD_REG_PORT"
	if [[ -f $GUEST_WORK/agent.log ]]; then
		cp "$GUEST_WORK/agent.log" "${GUEST_LOG%.log}.agent.log" && ih_say "agent log: ${GUEST_LOG%.log}.agent.log"
	fi
	return 0
}
