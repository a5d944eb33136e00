#!/usr/bin/env bash
# Lazy image data path, fully cached, against a file volume on the same disk: 4K random reads at QD1 and QD32
# through the NVMe/TCP target. Builds (with umoci) a one-layer image holding a 64 MiB file of incompressible
# data, pushes it to Debian's docker-registry (skopeo), converts it with the agent, exports the layer, reads it
# once end to end (filling the DPU's chunk cache), creates a file volume of the same size in the same data
# directory, and drives both with dpu-nvme-perf. The agent runs on CPU 0, the load generator on CPU 1.
# Prints a Markdown table with the ratio of the lazy layer's IOPS to the file volume's.
#
#   bench/lazy-iops.sh [SECONDS]     seconds per workload (default 10)
#
# Environment: DPU_BENCH_NO_BUILD=1 uses the binaries already in ${CARGO_TARGET_DIR:-target}/release;
# DPU_BENCH_KEEP=1 keeps the work directory; RUST_LOG for the agent (default warn).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
target=${CARGO_TARGET_DIR:-$repo/target}
[[ $target == /* ]] || target=$repo/$target
bin=$target/release
seconds=${1:-10}
# The working set (2,048 chunks of 32 KiB) fits the chunk cache's open-file budget (an eighth of RLIMIT_NOFILE:
# 2,500 handles at 20,000), so every random read of a cached chunk takes the io_uring path.
layer_mib=64

say() { printf 'bench/lazy-iops: %s\n' "$*" >&2; }

for tool in docker-registry skopeo umoci mkfs.erofs taskset; do
	command -v "$tool" >/dev/null || {
		say "$tool is missing (apt-get install docker-registry skopeo umoci erofs-utils util-linux)"
		exit 1
	}
done
if [[ ${DPU_BENCH_NO_BUILD:-0} != 1 ]]; then
	cargo build --locked --release --bin dpu-agent --bin dpuctl --bin dpu-nvme-perf >&2
fi
((($(nproc) >= 2))) || {
	say "needs two CPUs (agent on CPU 0, load generator on CPU 1)"
	exit 1
}

work=$(mktemp -d)
pids=()
cleanup() {
	for pid in "${pids[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	if [[ ${DPU_BENCH_KEEP:-0} == 1 ]]; then say "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

read -r api_port reg_port io_port <<<"$(
	python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)"
wait_port() { # port, what
	local deadline=$((SECONDS + 60))
	until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
		((SECONDS < deadline)) || {
			say "$2 did not listen on :$1 within 60 s"
			exit 1
		}
		sleep 0.1
	done
}

cat >"$work/registry.yml" <<YML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: 127.0.0.1:$reg_port
YML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
pids+=($!)
wait_port "$reg_port" docker-registry

say "building a one-layer image with a ${layer_mib} MiB file (umoci) and pushing it (skopeo)"
umoci init --layout "$work/layout" >/dev/null
umoci new --image "$work/layout:v1" >/dev/null
umoci unpack --image "$work/layout:v1" "$work/bundle" >/dev/null
head -c $((layer_mib << 20)) /dev/urandom >"$work/bundle/rootfs/data.bin"
umoci repack --image "$work/layout:v1" "$work/bundle" >/dev/null
rm -rf "$work/bundle"
skopeo copy --quiet --dest-tls-verify=false "oci:$work/layout:v1" "docker://127.0.0.1:$reg_port/bench:v1"

mkdir -p "$work/data"
cat >"$work/agent.toml" <<TOML
data_dir = "$work/data"

[api]
listen = "127.0.0.1:$api_port"

[admin]
enabled = false

[images]
trace_window_seconds = 0
TOML
RUST_LOG=${RUST_LOG:-warn} NO_COLOR=1 taskset -c 0 "$bin/dpu-agent" --config "$work/agent.toml" \
	</dev/null >"$work/agent.log" 2>&1 &
agent_pid=$!
pids+=("$agent_pid")
wait_port "$api_port" dpu-agent

dpuctl() { "$bin/dpuctl" --addr "http://127.0.0.1:$api_port" "$@"; }
say "converting (the agent runs mkfs.erofs) and exporting the layer"
dpuctl image convert "127.0.0.1:$reg_port/bench:v1" "127.0.0.1:$reg_port/bench:v1-lazy" >/dev/null
dpuctl image create bench --ref "127.0.0.1:$reg_port/bench:v1-lazy" --wait 60 >/dev/null
dpuctl storage subsystem create lazy --nqn nqn.2026-11.io.dpu-agent:bench-lazy --allow-any-host >/dev/null
dpuctl storage listener create lazy tcp --address "127.0.0.1:$io_port" >/dev/null
dpuctl image export bench --subsystem lazy >/dev/null
size=$(dpuctl --json image get bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["image_status"]["bytes_total"])')
dpuctl storage volume create file --file "$work/data/file.img" --size "$size" >/dev/null
dpuctl storage subsystem create file --nqn nqn.2026-11.io.dpu-agent:bench-file --allow-any-host >/dev/null
dpuctl storage namespace create file n1 --volume file >/dev/null
dpuctl storage listener create file tcp --address "127.0.0.1:$io_port" >/dev/null
wait_port "$io_port" "the NVMe/TCP listener"
sleep 1

perf() { # nqn, perf arguments...
	local nqn=$1
	shift
	taskset -c 1 "$bin/dpu-nvme-perf" --addr "127.0.0.1:$io_port" --nqn "$nqn" --json "$@"
}
say "filling: one sequential pass over the layer (fetch, verify, cache) and over the file volume (write)"
# 4K I/Os: the filesystem image is a whole number of 4 KiB blocks, not of larger I/Os.
perf nqn.2026-11.io.dpu-agent:bench-lazy --rw read --io-size 4k --queue-depth 32 --bytes "$size" --time 600s >/dev/null
perf nqn.2026-11.io.dpu-agent:bench-file --rw write --io-size 4k --queue-depth 32 --bytes "$size" --time 600s >/dev/null
cached=$(dpuctl --json image get bench | python3 -c 'import json,sys; s=json.load(sys.stdin)["image_status"]; print(s["bytes_cached"] == s["bytes_total"])')
[[ $cached == True ]] || {
	say "the layer is not fully cached after the fill pass"
	exit 1
}
# The page cache is warm for both after their pass; drop it so both read from the same disk.
sync
echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || say "could not drop the page cache (not root?): both read warm"

: >"$work/results.jsonl"
for w in "4K randread QD1|--queue-depth 1" "4K randread QD32|--queue-depth 32"; do
	for kind in file lazy; do
		say "${w%%|*} on the $kind volume (${seconds}s)"
		# shellcheck disable=SC2086 # the workload's arguments
		perf "nqn.2026-11.io.dpu-agent:bench-$kind" --rw randread --io-size 4k --time "${seconds}s" ${w#*|} \
			| python3 -c 'import json,sys; r=json.load(sys.stdin); r["label"]=sys.argv[1]; r["kind"]=sys.argv[2]; print(json.dumps(r))' \
				"${w%%|*}" "$kind" >>"$work/results.jsonl"
	done
done

echo "bench/lazy-iops.sh $seconds — $(date -u +%Y-%m-%d) — revision $(git -C "$repo" rev-parse --short HEAD) — layer ${size} bytes"
python3 - "$work/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| workload | file IOPS | lazy (cached) IOPS | lazy / file | file p99 µs | lazy p99 µs |")
print("|---|---:|---:|---:|---:|---:|")
for label in dict.fromkeys(r["label"] for r in rows):
    f = next(r for r in rows if r["label"] == label and r["kind"] == "file")
    z = next(r for r in rows if r["label"] == label and r["kind"] == "lazy")
    print(f"| {label} | {f['iops']:,.0f} | {z['iops']:,.0f} | {z['iops'] / f['iops']:.2f} "
          f"| {f['lat_us']['p99']:,.0f} | {z['lat_us']['p99']:,.0f} |")
PY
