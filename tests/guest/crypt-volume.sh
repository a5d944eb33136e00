# Encrypted volumes against dm-crypt: the agent's AES-256-XTS volumes and the Linux kernel's dm-crypt (set up by
# cryptsetup, Debian's) read each other's bytes, with 512- and 4096-byte data units.
#
# Host side (guest_prepare): the release dpu-agent (plaintext API on loopback; its key-encryption key beside
# its data directory), a random 64-byte key imported with `dpuctl crypto key create --material-file`, and per
# data unit a file volume (the base, ciphertext) with an encrypted volume over it. One subsystem exports
# nsid 1 = encrypted (512-byte blocks and units), 2 = its base, 3 = encrypted (4096-byte blocks and units),
# 4 = its base. Before the guest boots the host checks the API's refusals: an encrypted volume that requires
# hardware (FAILED_PRECONDITION naming the missing engine), a key of the wrong size, a key whose halves are
# equal, deleting a key or a base in use; and that no answer carries the key.
#
# Guest (amd64, nvme-cli, cryptsetup, e2fsprogs; modules nvme-tcp, dm-crypt, xts, ext4), per data unit:
#   agent → dm-crypt   mkfs.ext4 and files (random data, checksummed) through the agent's encrypted namespace;
#                      the base namespace does not contain the plaintext; `cryptsetup open --type plain
#                      --cipher aes-xts-plain64 --key-size 512 --key-file KEY` (4096: plus `--sector-size 4096
#                      --iv-large-sectors`) on the base namespace mounts the same filesystem with the same files
#   dm-crypt → agent   a file written through dm-crypt reads back right through the agent's encrypted namespace
# Page caches are dropped between views. The guest prints `CRYPT-VOLUME: PASS`; host_check then greps the
# agent's data directory, its log and its API answers for the key's bytes (raw and hex) and finds none, and
# reads dpu_crypto_volume_bytes (by engine, both directions) for each encrypted volume from /metrics.
#
# Builds `cargo build --locked --release --bin dpu-agent --bin dpuctl` unless DPU_GUEST_NO_BUILD=1.
# Environment: RUST_LOG (agent, default info), DPU_GUEST_TIMEOUT (600).
# shellcheck shell=bash disable=SC2034 # variables are read by tests/guest.sh

GUEST_ARCH=amd64
# xts(aes) is built from ecb(aes); neither is built in, and the guest has no module loader for requests.
GUEST_MODULES=(nvme-tcp crc32c_generic ext4 dm-crypt xts ecb)
GUEST_BINARIES=(nvme mkfs.ext4 cryptsetup)
GUEST_HOST_PACKAGES=(nvme-cli e2fsprogs cryptsetup-bin)
GUEST_FILES=()
[[ ! -f /etc/mke2fs.conf ]] || GUEST_FILES+=(/etc/mke2fs.conf:/etc/mke2fs.conf)
GUEST_MEMORY=1024
GUEST_TIMEOUT=600
# The guest script carries this run's port numbers.
GUEST_CACHE_IMAGE=0

# shellcheck source=tests/guest/lib/image-host.sh
source "$REPO_ROOT/tests/guest/lib/image-host.sh"
IH_NAME=crypt-volume

CRYPT_NQN=nqn.2026-12.io.dpu-agent:crypt
CRYPT_API_PORT=""
CRYPT_ADMIN_PORT=""
CRYPT_IO_PORT=""

# dpuctl that is expected to fail with CODE and a message matching TEXT.
crypt_refused() { # code text args...
	local code=$1 text=$2 out
	shift 2
	local -a opts
	mapfile -t opts <"$GUEST_WORK/dpuctl.args"
	if out=$(timeout 60 "$(ih_target_dir)/release/dpuctl" "${opts[@]}" "$@" 2>&1); then
		ih_say "FAIL: dpuctl $* succeeded; it must be refused with $code"
		return 1
	fi
	if [[ $out != *"$code"* || $out != *"$text"* ]]; then
		ih_say "FAIL: dpuctl $* answered: $out (expected $code and \"$text\")"
		return 1
	fi
	ih_say "refused as expected: dpuctl $* → $out"
}

guest_prepare() {
	if [[ ${DPU_GUEST_NO_BUILD:-0} != 1 ]]; then
		ih_say "building dpu-agent and dpuctl (release)"
		(cd "$REPO_ROOT" && cargo build --locked --release --bin dpu-agent --bin dpuctl) >&2 || return 1
	fi
	read -r CRYPT_API_PORT CRYPT_ADMIN_PORT CRYPT_IO_PORT <<<"$(ih_free_ports 3)"
	mkdir -p "$GUEST_WORK/data"
	cat >"$GUEST_WORK/agent.toml" <<TOML
data_dir = "$GUEST_WORK/data"

[api]
listen = "127.0.0.1:$CRYPT_API_PORT"

[admin]
listen = "127.0.0.1:$CRYPT_ADMIN_PORT"
TOML
	printf '%s\n' --addr "http://127.0.0.1:$CRYPT_API_PORT" >"$GUEST_WORK/dpuctl.args"
	ih_agent_start "$GUEST_WORK" || return 1

	# A random key whose halves differ, as a cryptsetup key file; a bad one of each kind.
	head -c 64 /dev/urandom >"$GUEST_WORK/key.bin"
	head -c 32 /dev/urandom >"$GUEST_WORK/short.bin"
	head -c 32 /dev/urandom >"$GUEST_WORK/half.bin"
	cat "$GUEST_WORK/half.bin" "$GUEST_WORK/half.bin" >"$GUEST_WORK/equal.bin"
	ih_dpuctl "$GUEST_WORK" crypto key create disk --algorithm aes-256-xts --material-file "$GUEST_WORK/key.bin" >&2 \
		|| return 1
	[[ $(stat -c %a "$GUEST_WORK/data.kek") == 600 ]] || {
		ih_say "FAIL: the key-encryption key $GUEST_WORK/data.kek is not there with mode 0600"
		return 1
	}
	crypt_refused InvalidArgument "64 bytes" crypto key create short --algorithm aes-256-xts \
		--material-file "$GUEST_WORK/short.bin" || return 1
	crypt_refused InvalidArgument "halves" crypto key create equal --algorithm aes-256-xts \
		--material-file "$GUEST_WORK/equal.bin" || return 1
	ih_dpuctl "$GUEST_WORK" crypto key create gcm --algorithm aes-256-gcm --generate >&2 || return 1

	local unit
	for unit in 512 4096; do
		truncate -s 64M "$GUEST_WORK/base$unit.img"
		ih_dpuctl "$GUEST_WORK" storage volume create "base$unit" --file "$GUEST_WORK/base$unit.img" --size 64MiB \
			--block-size "$unit" >&2 || return 1
		ih_dpuctl "$GUEST_WORK" storage volume create "enc$unit" --encrypted "base$unit" --encryption-key disk \
			--data-unit "$unit" >&2 || return 1
	done
	crypt_refused FailedPrecondition "offload" storage volume create hw --encrypted base512 --encryption-key disk \
		--policy require-hardware || return 1
	crypt_refused FailedPrecondition "aes-256-xts" storage volume create wrong --encrypted base512 --encryption-key gcm \
		|| return 1
	crypt_refused FailedPrecondition "enc512" crypto key delete disk || return 1
	crypt_refused FailedPrecondition "enc512" storage volume delete base512 || return 1
	# The reconciler builds the volume right after the write; its status then reports where it encrypts.
	local tries
	for tries in {1..50}; do
		ih_dpuctl "$GUEST_WORK" --json storage volume get enc512 >"$GUEST_WORK/enc512.json" 2>/dev/null || return 1
		python3 - "$GUEST_WORK/enc512.json" <<'PY' && break
import json, sys
v = json.load(open(sys.argv[1]))
c = v.get("crypto") or {}
ok = v["status"]["state"] == "ready" and c.get("hardware") is False and c.get("engine") and "unavailable" in c.get("reason", "")
print(f"crypt-volume: enc512 status {v['status']}, crypto {c}", file=sys.stderr)
sys.exit(0 if ok else 1)
PY
		((tries < 50)) || {
			ih_say "FAIL: enc512 is not ready with a software placement that says why"
			return 1
		}
		sleep 0.2
	done

	ih_dpuctl "$GUEST_WORK" storage subsystem create crypt --nqn "$CRYPT_NQN" --allow-any-host >&2 || return 1
	local nsid=0 volume
	for volume in enc512 base512 enc4096 base4096; do
		nsid=$((nsid + 1))
		ih_dpuctl "$GUEST_WORK" storage namespace create crypt "n$nsid" --volume "$volume" --nsid "$nsid" >&2 \
			|| return 1
	done
	ih_dpuctl "$GUEST_WORK" storage listener create crypt tcp --address "127.0.0.1:$CRYPT_IO_PORT" >&2 || return 1
	GUEST_FILES+=("$GUEST_WORK/key.bin:/etc/crypt/key.bin")
}

guest_script() {
	printf 'IO_PORT=%s\nNVME_SUBNQN=%s\n' "$CRYPT_IO_PORT" "$CRYPT_NQN"
	cat "$REPO_ROOT/tests/guest/lib/nvme-sysfs.sh"
	cat <<'GUEST'
STEP=setup
say() { echo "crypt-volume: $*"; }
fail() {
	say "FAIL [$STEP]: $*"
	dmesg | grep -iE 'nvme|crypt|ext4|I/O error' | tail -n 15 | sed 's/^/kernel: /'
	guest_fail "[$STEP] $*"
}
step() { STEP=$1; echo "GUEST-STEP: $1"; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

mkdir -p /run/cryptsetup /mnt/a /mnt/c
guest_ready
step connect
nvme connect -t tcp -a 10.0.2.2 -s "$IO_PORT" -n "$NVME_SUBNQN" >/dev/null || fail "nvme connect"
_left=300
while [ "$(nvme_ns_devs | wc -l)" -lt 4 ]; do
	_left=$((_left - 1))
	[ "$_left" -gt 0 ] || fail "4 namespaces did not appear"
	sleep 0.1
done

check_unit() { # unit, nsid of the encrypted namespace, nsid of its base, extra cryptsetup options
	unit=$1
	enc=$(nvme_ns_dev "$2") || fail "no namespace $2"
	base=$(nvme_ns_dev "$3") || fail "no namespace $3"
	[ "$(cat "/sys/block/${enc#/dev/}/queue/logical_block_size")" = "$unit" ] || fail "$enc does not have $unit-byte blocks"
	step "agent-to-dm-crypt-$unit"
	mkfs.ext4 -q -F -b 4096 "$enc" || fail "mkfs.ext4 on $enc"
	mount "$enc" /mnt/a || fail "mount $enc"
	dd if=/dev/urandom of=/mnt/a/data.bin bs=1M count=8 2>/dev/null || fail "writing data.bin"
	echo "PLAINTEXT-MARKER-$unit-never-on-the-base" >/mnt/a/marker.txt
	(cd /mnt/a && sha256sum data.bin marker.txt >/tmp/sums) || fail "sha256sum"
	umount /mnt/a || fail "umount"
	drop
	if grep -aq "PLAINTEXT-MARKER-$unit" "$base"; then fail "the base namespace holds plaintext"; fi
	# shellcheck disable=SC2086 # extra options
	cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 --key-file /etc/crypt/key.bin $4 \
		"$base" "c$unit" || fail "cryptsetup open of $base"
	mount "/dev/mapper/c$unit" /mnt/c || fail "dm-crypt's view of $base does not mount: not the agent's layout"
	(cd /mnt/c && sha256sum -c /tmp/sums) || fail "dm-crypt reads other files than the agent wrote"
	say "ok: dm-crypt (${4:-512-byte sectors}) reads the files written through the agent's $unit-byte-unit volume"
	step "dm-crypt-to-agent-$unit"
	dd if=/dev/urandom of=/mnt/c/back.bin bs=1M count=4 2>/dev/null || fail "writing back.bin through dm-crypt"
	(cd /mnt/c && sha256sum back.bin >>/tmp/sums) || fail "sha256sum"
	umount /mnt/c || fail "umount dm-crypt"
	cryptsetup close "c$unit" || fail "cryptsetup close"
	drop
	mount "$enc" /mnt/a || fail "mount $enc after dm-crypt wrote"
	(cd /mnt/a && sha256sum -c /tmp/sums) || fail "the agent reads other files than dm-crypt wrote"
	umount /mnt/a || fail "umount"
	say "ok: the agent's $unit-byte-unit volume reads what dm-crypt wrote"
}

check_unit 512 1 2 ""
check_unit 4096 3 4 "--sector-size 4096 --iv-large-sectors"
nvme disconnect -n "$NVME_SUBNQN" >/dev/null || fail "nvme disconnect"
echo "CRYPT-VOLUME: PASS"
# host_check ends the test when it has checked the agent's side; stay up until then.
sleep 3600
GUEST
}

# The key's bytes, raw or as hex (either case), anywhere in the data directory, the agent's log, or the API's
# answers.
crypt_key_leaks() {
	local hex upper where
	hex=$(od -An -tx1 -v "$GUEST_WORK/key.bin" | tr -d ' \n')
	upper=${hex^^}
	ih_dpuctl "$GUEST_WORK" --json crypto key list >"$GUEST_WORK/answers.json" || return 0
	ih_dpuctl "$GUEST_WORK" --json crypto key get disk >>"$GUEST_WORK/answers.json" || return 0
	ih_dpuctl "$GUEST_WORK" --json storage volume list >>"$GUEST_WORK/answers.json" || return 0
	for where in "$GUEST_WORK/data" "$GUEST_WORK/agent.log" "$GUEST_WORK/answers.json"; do
		# Any 16-byte window of the key, as hex text.
		local i
		for ((i = 0; i + 32 <= ${#hex}; i += 32)); do
			if grep -rqaF -e "${hex:i:32}" -e "${upper:i:32}" "$where"; then
				ih_say "FAIL: $where holds key bytes as hex"
				return 0
			fi
		done
		if python3 - "$GUEST_WORK/key.bin" "$where" <<'PY'; then
import os, sys
key = open(sys.argv[1], "rb").read()
windows = [key[i:i + 16] for i in range(0, len(key), 16)]
paths = [sys.argv[2]] if os.path.isfile(sys.argv[2]) else [os.path.join(d, f) for d, _, fs in os.walk(sys.argv[2]) for f in fs]
sys.exit(0 if any(w in open(p, "rb").read() for p in paths for w in windows) else 1)
PY
			ih_say "FAIL: $where holds raw key bytes"
			return 0
		fi
	done
	return 1
}

host_check() {
	local done_lines=0 lines line
	while :; do
		if ! ih_agent_alive "$GUEST_WORK"; then
			ih_say "FAIL: dpu-agent exited while the guest was running"
			ih_agent_tail "$GUEST_WORK"
			return 1
		fi
		lines=$(wc -l <"$GUEST_LOG")
		if ((lines > done_lines)); then
			while IFS= read -r line; do
				line=${line%$'\r'}
				case "$line" in
				"GUEST-STEP: "*) ih_say "guest step: ${line#GUEST-STEP: }" ;;
				"crypt-volume: ok"*) ih_say "guest: ${line#crypt-volume: }" ;;
				"crypt-volume: FAIL"* | "GUEST-RESULT: "*)
					ih_say "guest: $line"
					ih_agent_tail "$GUEST_WORK"
					return 1
					;;
				"CRYPT-VOLUME: PASS")
					if crypt_key_leaks; then
						return 1
					fi
					ih_say "no key bytes in the data directory, the agent's log or its answers"
					# What the engine did, per volume and direction, in the metrics.
					curl -fsS "http://127.0.0.1:$CRYPT_ADMIN_PORT/metrics" >"$GUEST_WORK/metrics.txt" || return 1
					local volume direction
					for volume in enc512 enc4096; do
						for direction in encrypt decrypt; do
							grep -qE "^dpu_crypto_volume_bytes\{.*volume=\"$volume\".*direction=\"$direction\".*\} [1-9]" \
								"$GUEST_WORK/metrics.txt" || {
								ih_say "FAIL: no $direction bytes for $volume in the metrics:"
								grep dpu_crypto "$GUEST_WORK/metrics.txt" >&2
								return 1
							}
						done
					done
					ih_say "metrics: $(grep -c '^dpu_crypto_volume_bytes' "$GUEST_WORK/metrics.txt") dpu_crypto_volume_bytes series, each volume both ways"
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
	if [[ -f $GUEST_WORK/agent.log ]]; then
		cp "$GUEST_WORK/agent.log" "${GUEST_LOG%.log}.agent.log" && ih_say "agent log: ${GUEST_LOG%.log}.agent.log"
	fi
	return 0
}
