#!/usr/bin/env bash
# Crypto benchmark (not a test). Prints two Markdown tables:
#
#   1. AES-256-XTS per core: dpu-crypto's engine (crypto/examples/xts-speed.rs, one data unit per call as an
#      encrypted volume does for a one-unit I/O, and 32 units per call) against `openssl speed -evp aes-256-xts`
#      in the same run, 4096- and 512-byte data units, both pinned to CPU 0.
#   2. 4K random read and write IOPS over NVMe/TCP of an encrypted volume (AES-256-XTS over a 1 GiB malloc
#      volume, 4096-byte units) against the plain malloc volume under it: the agent on CPU 0, dpu-nvme-perf on
#      CPU 1, QD32, SECONDS each (default 10); the encrypted volume's cost is the agent's CPU.
#
#   bench/crypto.sh [SECONDS]
#
# Builds the example, dpu-agent, dpuctl and dpu-nvme-perf in release unless DPU_BENCH_NO_BUILD=1.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
target=${CARGO_TARGET_DIR:-$repo/target}
[[ $target == /* ]] || target=$repo/$target
bin=$target/release
seconds=${1:-10}

say() { printf 'bench/crypto: %s\n' "$*" >&2; }
[[ $seconds =~ ^[1-9][0-9]*$ ]] || {
	say "SECONDS must be a positive number"
	exit 2
}
for tool in openssl taskset python3; do
	command -v "$tool" >/dev/null || {
		say "$tool is missing"
		exit 1
	}
done
((($(nproc) >= 2))) || {
	say "needs two CPUs (agent on CPU 0, load generator on CPU 1)"
	exit 1
}
if [[ ${DPU_BENCH_NO_BUILD:-0} != 1 ]]; then
	cargo build --locked --release -p dpu-crypto --example xts-speed >&2
	cargo build --locked --release --bin dpu-agent --bin dpuctl --bin dpu-nvme-perf >&2
fi

work=$(mktemp -d)
agent_pid=""
cleanup() {
	[[ -z $agent_pid ]] || kill -TERM "$agent_pid" 2>/dev/null || true
	[[ -z $agent_pid ]] || wait "$agent_pid" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

echo "bench/crypto.sh $seconds — $(date -u '+%Y-%m-%d %H:%M UTC') — revision $(git rev-parse --short HEAD)$(
	git diff --quiet HEAD 2>/dev/null || echo ' (modified)')"
echo
echo "CPU: $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo); $(openssl version)"
echo

# ---- 1. per-core AES-256-XTS ------------------------------------------------------------------------------
say "AES-256-XTS per core: dpu-crypto, then openssl speed"
taskset -c 0 "$target/release/examples/xts-speed" 3 >"$work/ours.md"
openssl_gbs() { # data unit bytes → GB/s of `openssl speed -evp aes-256-xts`
	taskset -c 0 openssl speed -evp aes-256-xts -seconds 3 -bytes "$1" 2>/dev/null \
		| awk '/^AES-256-XTS/ { v = $NF; sub(/k$/, "", v); printf "%.2f\n", v * 1000 / 1e9 }'
}
ssl4k=$(openssl_gbs 4096)
ssl512=$(openssl_gbs 512)
python3 - "$work/ours.md" "$ssl4k" "$ssl512" <<'PY'
import sys
rows, engine = {}, "?"
for line in open(sys.argv[1]):
    if line.startswith("engine:"):
        engine = line.split(":", 1)[1].strip()
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 4 and cells[0].isdigit():
        rows[(int(cells[0]), int(cells[1]))] = (float(cells[2]), float(cells[3]))
ssl = {4096: float(sys.argv[2]), 512: float(sys.argv[3])}
print(f"dpu-crypto engine: {engine}; openssl: one data unit per EVP call (`-bytes` = the unit).")
print()
print("| data unit | units per call | dpu-crypto encrypt GB/s | decrypt GB/s | openssl encrypt GB/s | encrypt / openssl |")
print("|---|---:|---:|---:|---:|---:|")
for (unit, per_call), (enc, dec) in sorted(rows.items(), key=lambda r: (-r[0][0], r[0][1])):
    print(f"| {unit} | {per_call} | {enc:.2f} | {dec:.2f} | {ssl[unit]:.2f} | {enc / ssl[unit]:.2f} |")
PY
echo

# ---- 2. IOPS through an encrypted volume ----------------------------------------------------------------------
# (the agent's encrypted volume over malloc against the malloc volume itself)
read -r api_port io_port <<<"$(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))')"
cat >"$work/agent.toml" <<TOML
data_dir = "$work/data"

[api]
listen = "127.0.0.1:$api_port"

[admin]
enabled = false
TOML
RUST_LOG=${RUST_LOG:-warn} NO_COLOR=1 taskset -c 0 "$bin/dpu-agent" --config "$work/agent.toml" </dev/null \
	>"$work/agent.log" 2>&1 &
agent_pid=$!
for _ in {1..100}; do
	(exec 3<>"/dev/tcp/127.0.0.1/$api_port") 2>/dev/null && break
	sleep 0.1
done
dpuctl() { "$bin/dpuctl" --addr "http://127.0.0.1:$api_port" "$@" >/dev/null; }
head -c 64 /dev/urandom >"$work/key.bin"
dpuctl crypto key create bench --algorithm aes-256-xts --material-file "$work/key.bin"
dpuctl storage volume create plain --malloc --size 1GiB --block-size 4096
dpuctl storage volume create enc --encrypted plain --encryption-key bench --data-unit 4096
for v in plain enc; do
	dpuctl storage subsystem create "$v" --nqn "nqn.2026-12.io.dpu-agent:bench-$v" --allow-any-host
	dpuctl storage namespace create "$v" n1 --volume "$v"
	dpuctl storage listener create "$v" tcp --address "127.0.0.1:$io_port"
done
sleep 1
perf() { # volume, perf arguments...
	local v=$1
	shift
	taskset -c 1 "$bin/dpu-nvme-perf" --addr "127.0.0.1:$io_port" --nqn "nqn.2026-12.io.dpu-agent:bench-$v" --json "$@"
}
say "filling the malloc volume through the encrypted one (every block allocated and holding ciphertext)"
perf enc --rw write --io-size 128k --queue-depth 16 --bytes 1GiB --time 600s >/dev/null
: >"$work/iops.jsonl"
for rw in randread randwrite; do
	for v in plain enc; do
		say "4K $rw QD32 on $v (${seconds}s)"
		perf "$v" --rw "$rw" --io-size 4k --queue-depth 32 --time "${seconds}s" \
			| python3 -c 'import json,sys; r=json.load(sys.stdin); r["rw"]=sys.argv[1]; r["v"]=sys.argv[2]; print(json.dumps(r))' \
				"$rw" "$v" >>"$work/iops.jsonl"
	done
done
python3 - "$work/iops.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("4K random I/O over NVMe/TCP, QD32, agent on CPU 0: AES-256-XTS volume (4096-byte units) over a 1 GiB malloc")
print("volume against the malloc volume itself.")
print()
print("| workload | malloc IOPS | encrypted IOPS | encrypted / malloc | malloc p99 µs | encrypted p99 µs |")
print("|---|---:|---:|---:|---:|---:|")
for rw in ("randread", "randwrite"):
    p = next(r for r in rows if r["rw"] == rw and r["v"] == "plain")
    e = next(r for r in rows if r["rw"] == rw and r["v"] == "enc")
    print(f"| 4K {rw} QD32 | {p['iops']:,.0f} | {e['iops']:,.0f} | {e['iops'] / p['iops']:.2f} "
          f"| {p['lat_us']['p99']:,.0f} | {e['lat_us']['p99']:,.0f} |")
PY
