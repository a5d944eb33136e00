#!/usr/bin/env bash
# NVMe/TCP target engines side by side: the agent's native target and SPDK's NVMe-oF target inside the agent
# (a subsystem with engine spdk), in one run, each serving a 1 GiB RAM namespace (a malloc volume; SPDK's malloc
# bdev) from CPU 0, driven from CPU 1 by the same client: SPDK's spdk_nvme_perf where it is installed (SPDK_DIR/bin
# or PATH), dpu-nvme-perf otherwise. Workloads: 4K randread QD1, 4K randread QD32, 4K randwrite QD32, 128K
# sequential read QD16. Rounds alternate the engines; the table gives each engine's median over the rounds, the
# native/SPDK ratio and the target's CPU time per I/O (/proc/<pid>/stat: SPDK's reactor polls its core all the
# time, so its CPU per I/O is the core divided by the IOPS).
#
#   bench/nvme-engines.sh [SECONDS]     seconds per workload and engine (default 10)
#
# Needs an installed SPDK (ffi/README.md). Environment: DPU_BENCH_ROUNDS (default 2), DPU_BENCH_POLL (the native
# agent's poll mode, default always: its core is given to it, as SPDK's reactor core is), DPU_BENCH_NO_BUILD=1 uses
# ${CARGO_TARGET_DIR:-target}/release and .../spdk/release (the agent built with the `spdk` feature in a target
# directory of its own, so the ordinary release build is left as it is), DPU_BENCH_KEEP=1 keeps the work directory.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
# shellcheck source=lib.sh
source "$repo/bench/lib.sh"
target=${CARGO_TARGET_DIR:-$repo/target}
[[ $target == /* ]] || target=$repo/$target
seconds=${1:-10}
rounds=${DPU_BENCH_ROUNDS:-2}
poll=${DPU_BENCH_POLL:-always}
nqn=nqn.2026-12.io.dpu-agent:engines

say() { printf 'bench/nvme-engines: %s\n' "$*" >&2; }

if [[ ${DPU_BENCH_NO_BUILD:-0} != 1 ]]; then
	cargo build --locked --release --bin dpu-agent --bin dpuctl --bin dpu-nvme-perf >&2
	cargo build --locked --release --features dpu-agent/spdk --bin dpu-agent --target-dir "$target/spdk" >&2
fi
native_agent=$target/release/dpu-agent
spdk_agent=$target/spdk/release/dpu-agent
for b in "$native_agent" "$spdk_agent" "$target/release/dpuctl" "$target/release/dpu-nvme-perf"; do
	[[ -x $b ]] || {
		say "$b is missing (build it, or unset DPU_BENCH_NO_BUILD)"
		exit 1
	}
done
if (($(nproc) < 2)); then
	say "needs two CPUs (target on CPU 0, client on CPU 1)"
	exit 1
fi
spdk_perf=""
for p in ${SPDK_DIR:+$SPDK_DIR/bin/spdk_nvme_perf} "$(command -v spdk_nvme_perf || true)"; do
	[[ -n $p && -x $p ]] && spdk_perf=$p && break
done
client=${spdk_perf:+spdk_nvme_perf}
client=${client:-dpu-nvme-perf}
say "client: $client"

work=$(mktemp -d)
agent_pid=""
stop_agent() {
	if [[ -n $agent_pid ]] && kill -0 "$agent_pid" 2>/dev/null; then
		kill -TERM "$agent_pid" 2>/dev/null || true
		wait "$agent_pid" 2>/dev/null || true
	fi
	agent_pid=""
}
cleanup() {
	stop_agent
	if [[ ${DPU_BENCH_KEEP:-0} == 1 ]]; then say "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# start_agent ENGINE: an agent on CPU 0 serving $nqn on 127.0.0.1:$io_port.
start_agent() {
	local engine=$1 bin=$native_agent
	read -r api_port admin_port io_port <<<"$(free_ports 3)"
	rm -rf "$work/data" && mkdir -p "$work/data"
	cat >"$work/agent.toml" <<TOML
data_dir = "$work/data"

[api]
listen = "127.0.0.1:$api_port"

[admin]
listen = "127.0.0.1:$admin_port"

[storage]
TOML
	if [[ $engine == spdk ]]; then
		bin=$spdk_agent
		# A 1 GiB malloc bdev plus SPDK's buffer pools.
		printf '\n[storage.spdk]\ncores = "0x1"\nmem_size_mib = 2048\n' >>"$work/agent.toml"
	else
		# The core is given to the agent, as SPDK's reactor is given its core: the workers poll.
		printf '\n[mesh]\npoll = "%s"\n' "$poll" >>"$work/agent.toml"
	fi
	RUST_LOG=${RUST_LOG:-warn} NO_COLOR=1 taskset -c 0 "$bin" --config "$work/agent.toml" \
		</dev/null >"$work/agent-$engine.log" 2>&1 &
	agent_pid=$!
	local deadline=$((SECONDS + 60))
	until dpuctl storage volume list; do
		kill -0 "$agent_pid" 2>/dev/null || {
			say "dpu-agent ($engine) exited; its log:"
			cat "$work/agent-$engine.log" >&2
			exit 1
		}
		((SECONDS < deadline)) || {
			say "dpu-agent ($engine) did not serve its API within 60 s"
			exit 1
		}
		sleep 0.1
	done
	if [[ $engine == spdk ]]; then
		dpuctl storage volume create v --spdk-bdev Malloc0 --spdk-create malloc --size 1GiB
	else
		dpuctl storage volume create v --malloc --size 1GiB
	fi
	dpuctl storage subsystem create s --nqn "$nqn" --allow-any-host --engine "$engine"
	dpuctl storage namespace create s n1 --volume v
	dpuctl storage listener create s tcp --address "127.0.0.1:$io_port"
	deadline=$((SECONDS + 30))
	until (exec 3<>"/dev/tcp/127.0.0.1/$io_port") 2>/dev/null; do
		((SECONDS < deadline)) || {
			say "the $engine engine's listener did not open within 30 s"
			exit 1
		}
		sleep 0.1
	done
}

dpuctl() { "$target/release/dpuctl" --addr "http://127.0.0.1:$api_port" "$@" >/dev/null 2>&1; }

agent_ticks() { proc_ticks "$agent_pid"; }

# measure ENGINE LABEL RW SIZE QD: one workload; appends a JSON line to results.jsonl.
measure() {
	local engine=$1 label=$2 rw=$3 size=$4 qd=$5 before after out=$work/run.out
	say "$engine: $label (${seconds}s, $client)"
	before=$(agent_ticks)
	if [[ -n $spdk_perf ]]; then
		taskset -c 1 "$spdk_perf" --no-huge -s 512 -c 0x2 -q "$qd" -o "$size" -w "$rw" -t "$seconds" \
			-r "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$io_port subnqn:$nqn" >"$out" 2>&1 || {
			cat "$out" >&2
			exit 1
		}
	else
		taskset -c 1 "$target/release/dpu-nvme-perf" --addr "127.0.0.1:$io_port" --nqn "$nqn" --json \
			--rw "$rw" --io-size "$size" --queue-depth "$qd" --time "${seconds}s" >"$out"
	fi
	after=$(agent_ticks)
	python3 - "$engine" "$label" "$before" "$after" "$(getconf CLK_TCK)" "$seconds" "$client" "$out" \
		>>"$work/results.jsonl" <<'PY'
import json, re, sys
engine, label, before, after, hz, seconds, client, path = sys.argv[1:]
text = open(path).read()
if client == "spdk_nvme_perf":
    m = re.search(r"^Total\s*:\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", text, re.M)
    if not m:
        sys.exit(f"no Total line in spdk_nvme_perf's output:\n{text}")
    iops, mib_s, avg = float(m[1]), float(m[2]), float(m[3])
else:
    run = json.loads(text)
    iops, mib_s, avg = run["iops"], run["mib_s"], run["lat_us"]["avg"]
cpu = (int(after) - int(before)) / int(hz)
print(json.dumps({"engine": engine, "label": label, "iops": iops, "mib_s": mib_s, "avg_us": avg,
                  "cpu_us_per_io": cpu * 1e6 / (iops * float(seconds)) if iops else None}))
PY
}

workloads=(
	"4K randread QD1|randread|4096|1"
	"4K randread QD32|randread|4096|32"
	"4K randwrite QD32|randwrite|4096|32"
	"128K read QD16|read|131072|16"
)
: >"$work/results.jsonl"
for ((round = 1; round <= rounds; round++)); do
	# Alternate which engine goes first, so neither always runs on a warmer machine.
	engines=(native spdk)
	((round % 2 == 1)) || engines=(spdk native)
	for engine in "${engines[@]}"; do
		start_agent "$engine"
		say "$engine: prefilling the namespace (one sequential 128K write pass)"
		taskset -c 1 "$target/release/dpu-nvme-perf" --addr "127.0.0.1:$io_port" --nqn "$nqn" --json \
			--rw write --io-size 128k --queue-depth 16 --bytes 1GiB --time 300s >/dev/null
		for w in "${workloads[@]}"; do
			IFS='|' read -r label rw size qd <<<"$w"
			measure "$engine" "$label" "$rw" "$size" "$qd"
		done
		stop_agent
	done
done

python3 - "$work/results.jsonl" "$client" "$rounds" "$seconds" "$poll" <<'PY'
import json, statistics, sys
path, client, rounds, seconds, poll = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if l.strip()]
labels = list(dict.fromkeys(r["label"] for r in rows))
def med(engine, label, key):
    vals = [r[key] for r in rows if r["engine"] == engine and r["label"] == label and r[key] is not None]
    return statistics.median(vals) if vals else None
def cell(v, d=0):
    return "—" if v is None else f"{v:,.{d}f}"
print(f"client: {client}; {rounds} round(s) of {seconds} s per workload and engine, medians; target on CPU 0, "
      f"client on CPU 1; native poll mode: {poll}")
print()
print("| workload | native IOPS | SPDK IOPS | native ÷ SPDK | native avg µs | SPDK avg µs | native MiB/s "
      "| SPDK MiB/s | native CPU µs/I/O | SPDK CPU µs/I/O |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for label in labels:
    n, s = med("native", label, "iops"), med("spdk", label, "iops")
    ratio = n / s if n and s else None
    print(f"| {label} | {cell(n)} | {cell(s)} | {cell(ratio, 2)}× | {cell(med('native', label, 'avg_us'), 1)} "
          f"| {cell(med('spdk', label, 'avg_us'), 1)} | {cell(med('native', label, 'mib_s'), 1)} "
          f"| {cell(med('spdk', label, 'mib_s'), 1)} | {cell(med('native', label, 'cpu_us_per_io'), 2)} "
          f"| {cell(med('spdk', label, 'cpu_us_per_io'), 2)} |")
print()
print("each run: " + "; ".join(f"{r['engine']} {r['label']} {r['iops']:,.0f}" for r in rows))
PY
