# The Debian package under a real systemd: an amd64 guest boots Debian 12 with systemd as PID 1
# (images/systemd-rootfs.sh), installs the package with dpkg and lets its maintainer scripts and unit run the
# agent; the host's dpuctl drives it over mTLS through a port forward.
#
# Guest, in order:
#   1. `dpkg -i` of the package: postinst enables the unit and starts it; with Type=notify, `active` means the
#      agent sent READY=1. The operator then edits /etc/dpu-agent/config.toml (mTLS on 0.0.0.0) and restarts.
#   2. The watchdog: systemd's watchdog timestamp moves (WATCHDOG=1 arrives) while the agent runs.
#   3. GUEST-READY: the host's dpuctl checks `info` (the guest's kernel) and creates volume hostvol.
#   4. Under load (dpuctl info in a loop, and `dpuctl watch` following the volumes): `dpkg -i` of the same
#      package with a higher version. postinst reloads the agent: the new process serves (MainPID moves to it),
#      the old one exits, the edited conffile is kept, hostvol is still there; then `systemctl reload` once
#      more, and `systemctl restart`, with the two listening sockets held in systemd's file-descriptor store
#      (NFileDescriptorStore, the same two after every step). No dpuctl call fails across the two hand-overs
#      and the restart, and the watch, started before the upgrade, reports the volume created after them.
#   5. `dpkg --purge`: the agent stops, the unit is disabled, the configuration goes, the data stays.
#
# Needs the host release build (`cargo build --locked --release --bin dpu-agent --bin dpuctl`, done unless
# DPU_GUEST_NO_BUILD=1); packages it with cross/deb.sh amd64 (twice: two versions).
# shellcheck shell=bash disable=SC2034 # variables are read by tests/guest.sh

GUEST_ARCH=amd64
GUEST_PORTS=(50051)
GUEST_TIMEOUT=900
# The root file system (~140 MiB) is unpacked into memory next to the image that carries it.
GUEST_MEMORY=2048
# Fresh certificates and packages every run.
GUEST_CACHE_IMAGE=0

# shellcheck source=tests/guest/lib/image-host.sh
source "$REPO_ROOT/tests/guest/lib/image-host.sh"
IH_NAME=deb-systemd

guest_prepare() {
	local target rootfs pki debs v1 deb1
	target=$(ih_target_dir)
	if [[ ${DPU_GUEST_NO_BUILD:-0} != 1 ]]; then
		printf 'deb-systemd: building host dpu-agent and dpuctl\n' >&2
		(cd "$REPO_ROOT" && cargo build --locked --release --bin dpu-agent --bin dpuctl) >&2 || return 1
	fi
	rootfs=$("$IMAGES_DIR/systemd-rootfs.sh") || return 1

	debs=$GUEST_WORK/debs
	deb1=$(cd "$REPO_ROOT" && CARGO_TARGET_DIR=$target DPU_DEB_NO_BUILD=1 cross/deb.sh amd64 --out "$debs") || return 1
	v1=$(dpkg-deb -f "$deb1" Version)
	(cd "$REPO_ROOT" && CARGO_TARGET_DIR=$target DPU_DEB_NO_BUILD=1 DPU_DEB_VERSION="$v1+upgrade1" \
		cross/deb.sh amd64 --out "$debs") >/dev/null || return 1
	mv "$deb1" "$debs/v1.deb"
	mv "$debs"/dpu-agent_*+upgrade1_amd64.deb "$debs/v2.deb"
	printf '%s\n' "$v1" >"$debs/v1.version"
	printf '%s\n' "$v1+upgrade1" >"$debs/v2.version"

	pki=$GUEST_WORK/pki
	"$target/release/dpu-agent" certs --out "$pki" --san 127.0.0.1 --san localhost >&2 || return 1
	# The configuration an operator would write: mTLS on every address, certificates outside the package's files.
	cat >"$GUEST_WORK/config.toml" <<'TOML'
data_dir = "/var/lib/dpu-agent"

[api]
listen = "0.0.0.0:50051"
drain_seconds = 10

[api.tls]
cert = "/guest/pki/server.pem"
key = "/guest/pki/server-key.pem"
client_ca = "/guest/pki/ca.pem"

[admin]
listen = "127.0.0.1:9100"

[log]
format = "json"
level = "info"
TOML
	GUEST_FILES+=(
		"$rootfs:/guest/rootfs.tar"
		"$debs:/guest/debs"
		"$pki:/guest/pki"
		"$GUEST_WORK/config.toml:/guest/config.toml"
	)
}

guest_script() {
	cat <<'GUEST'
set -eu
log() { echo "guest: $*"; }
# A failure shows what the agent and systemd said.
guest_fail() {
	echo "guest: FAIL: $*"
	systemctl status dpu-agent --no-pager 2>&1 | sed 's/^/guest: status: /'
	journalctl -u dpu-agent --no-pager -n 12 -o cat 2>&1 | cut -c1-400 | sed 's/^/guest: journal: /'
	sleep 1
	exit 1
}
ctl() {
	dpuctl --addr https://127.0.0.1:50051 --ca /guest/pki/ca.pem --cert /guest/pki/operator.pem \
		--key /guest/pki/operator-key.pem --timeout 60 "$@"
}
state() { systemctl is-active dpu-agent || true; }
main_pid() { systemctl show -p MainPID --value dpu-agent; }
# until SECONDS WHAT COMMAND...: retry COMMAND every 0.5 s.
until_ok() {
	_left=$(($1 * 2))
	_what=$2
	shift 2
	until "$@" >/dev/null 2>&1; do
		_left=$((_left - 1))
		[ "$_left" -gt 0 ] || guest_fail "$_what: not within the time allowed"
		sleep 0.5
	done
}
is_active() { [ "$(state)" = active ]; }
stored() { systemctl show -p NFileDescriptorStore --value dpu-agent; }
two_stored() { [ "$(stored)" = 2 ]; }
pid_moved() { [ "$(main_pid)" != "$1" ] && [ "$(main_pid)" != 0 ] && is_active; }
gone() { ! kill -0 "$1" 2>/dev/null; }
watchdog_moved() { [ "$(systemctl show -p WatchdogTimestampMonotonic --value dpu-agent)" != "$1" ]; }

log "systemd $(systemctl --version | head -n1 | cut -d' ' -f2) is PID 1: $(cat /proc/1/comm)"
[ "$(cat /proc/1/comm)" = systemd ] || guest_fail "PID 1 is not systemd"

# 1. Install: postinst enables and starts the unit; active = READY=1 received.
dpkg -i /guest/debs/v1.deb || guest_fail "the package install failed"
[ "$(systemctl is-enabled dpu-agent)" = enabled ] || guest_fail "the unit is not enabled after install"
[ "$(state)" = active ] || guest_fail "after install the agent is $(state), not active"
log "installed $(dpkg-query -W -f '${Version}' dpu-agent); the unit is enabled and active (pid $(main_pid))"
cp /guest/config.toml /etc/dpu-agent/config.toml
systemctl restart dpu-agent || guest_fail "systemctl restart failed"
is_active || guest_fail "after restart with the operator's configuration the agent is $(state)"
until_ok 60 "dpuctl info over mTLS" ctl info
log "dpuctl info answers over mTLS; status: $(systemctl show -p StatusText --value dpu-agent)"
until_ok 30 "the API and admin sockets in the file-descriptor store" two_stored
log "file-descriptor store: $(stored) sockets"

# 2. The watchdog's keep-alives arrive (every WatchdogSec/2 = 15 s).
wd=$(systemctl show -p WatchdogTimestampMonotonic --value dpu-agent)
until_ok 40 "a watchdog keep-alive" watchdog_moved "$wd"
log "watchdog keep-alives arrive (WatchdogUSec=$(systemctl show -p WatchdogUSec --value dpu-agent))"

# 3. The host drives the agent.
guest_ready
until_ok 300 "the host's volume hostvol" ctl get volume hostvol
log "the host created volume hostvol"

# 4. Upgrades under load.
ctl watch --kind volumes >/tmp/watch.log 2>&1 &
watcher=$!
: >/tmp/calls.ok
: >/tmp/calls.failed
(
	while [ ! -e /tmp/stop ]; do
		if ctl info >/dev/null 2>/tmp/call.err; then
			echo ok >>/tmp/calls.ok
		else
			echo "$(date -u +%T.%N): $(cat /tmp/call.err)" >>/tmp/calls.failed
		fi
	done
) &
load=$!
sleep 3

pid=$(main_pid)
log "upgrading the package under load (agent pid $pid)"
dpkg -i /guest/debs/v2.deb || guest_fail "the package upgrade failed"
until_ok 120 "a new agent process after the package upgrade" pid_moved "$pid"
until_ok 60 "the old agent process ($pid) to exit" gone "$pid"
new=$(main_pid)
[ "$(dpkg-query -W -f '${Version}' dpu-agent)" = "$(cat /guest/debs/v2.version)" ] || guest_fail "version after upgrade"
grep -q '0.0.0.0:50051' /etc/dpu-agent/config.toml || guest_fail "the upgrade replaced the edited configuration"
[ "$(readlink /proc/"$new"/exe)" = /usr/sbin/dpu-agent ] || guest_fail "the new process runs $(readlink /proc/"$new"/exe)"
ctl get volume hostvol >/dev/null || guest_fail "volume hostvol is gone after the upgrade"
two_stored || guest_fail "after the upgrade the store holds $(stored) sockets, not 2"
log "package upgrade: pid $pid -> $new, old process gone, conffile kept, intent kept"

systemctl reload dpu-agent || guest_fail "systemctl reload failed"
until_ok 120 "a new agent process after systemctl reload" pid_moved "$new"
until_ok 60 "the old agent process ($new) to exit" gone "$new"
log "systemctl reload: pid $new -> $(main_pid)"

pid=$(main_pid)
systemctl restart dpu-agent || guest_fail "systemctl restart failed"
is_active || guest_fail "after systemctl restart the agent is $(state)"
[ "$(main_pid)" != "$pid" ] || guest_fail "systemctl restart kept pid $pid"
two_stored || guest_fail "after the restart the store holds $(stored) sockets, not 2"
log "systemctl restart: pid $pid -> $(main_pid), $(stored) sockets kept in the store"

ctl create volume after --malloc --size 1MiB >/dev/null
sleep 2
touch /tmp/stop
wait "$load"
ok=$(wc -l </tmp/calls.ok)
if [ -s /tmp/calls.failed ]; then
	sed 's/^/guest: call failed at /' /tmp/calls.failed
	# What the agents said about connections, stops and hand-overs meanwhile.
	journalctl -u dpu-agent --no-pager -o short-precise |
		grep -iE 'handshake|"WARN"|"ERROR"|shutting down|serves:|took over|Started|Stopping|inherited' |
		cut -c1-300 | sed 's/^/guest: journal: /'
	guest_fail "dpuctl calls failed across the hand-overs and the restart"
fi
[ "$ok" -gt 0 ] || guest_fail "no dpuctl call completed under load"
log "$ok dpuctl info calls across two hand-overs and a restart, 0 failed"
until_ok 30 "the watch to report volumes/after" grep -q 'volumes/after' /tmp/watch.log
kill "$watcher" 2>/dev/null || true
log "dpuctl watch, started before the upgrade, reported volumes/after created after it"

ctl get volume hostvol >/dev/null || guest_fail "volume hostvol is gone after the restart"

# 5. Purge.
dpkg --purge dpu-agent || guest_fail "purge failed"
[ "$(state)" != active ] || guest_fail "the agent still runs after purge"
! systemctl is-enabled dpu-agent >/dev/null 2>&1 || guest_fail "the unit is still enabled after purge"
[ ! -e /etc/dpu-agent/config.toml ] || guest_fail "purge left /etc/dpu-agent/config.toml"
[ -d /var/lib/dpu-agent ] || guest_fail "purge removed the agent's data"
log "purged: agent stopped, unit disabled, configuration removed, /var/lib/dpu-agent kept"
GUEST
}

host_check() {
	local port target pki out deadline=$((SECONDS + 120))
	port=$(guest_host_port 50051)
	target=$(ih_target_dir)
	pki=$GUEST_WORK/pki
	local -a dpuctl=(
		"$target/release/dpuctl" --addr "https://127.0.0.1:$port"
		--ca "$pki/ca.pem" --cert "$pki/operator.pem" --key "$pki/operator-key.pem" --timeout 60
	)
	until out=$("${dpuctl[@]}" --json info 2>"$GUEST_WORK/dpuctl.err"); do
		if ((SECONDS >= deadline)); then
			printf 'deb-systemd: dpuctl info kept failing; last error:\n' >&2
			cat "$GUEST_WORK/dpuctl.err" >&2
			return 1
		fi
		sleep 2
	done
	python3 - "$GUEST_RELEASE" "$out" <<'PY' || return 1
import json
import sys

want, info = sys.argv[1], json.loads(sys.argv[2])
if info.get("kernel") != want or info.get("arch") != "x86_64":
    sys.exit(f"deb-systemd: the packaged agent reports {info.get('arch')} / {info.get('kernel')}, want x86_64 / {want}")
print(f"deb-systemd: the host's dpuctl reaches the packaged agent in the guest: {info['kernel']}", file=sys.stderr)
PY
	"${dpuctl[@]}" create volume hostvol --malloc --size 1MiB >&2 || return 1
	# The guest goes on by itself; its verdict ends the test.
	deadline=$((SECONDS + GUEST_TIMEOUT))
	until grep -aq 'GUEST-RESULT: ' "$GUEST_LOG"; do
		((SECONDS < deadline)) || return 1
		sleep 1
	done
	grep -a 'guest: ' "$GUEST_LOG" | tr -d '\r' | sed 's/^/deb-systemd: /' >&2
	grep -aq 'GUEST-RESULT: PASS' "$GUEST_LOG"
}
