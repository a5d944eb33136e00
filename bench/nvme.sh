#!/usr/bin/env bash
# NVMe/TCP target benchmark. Starts a release dpu-agent pinned to CPU 0 serving a 1 GiB malloc volume over
# loopback, prefills it with one sequential write pass, then drives it with dpu-nvme-perf pinned to CPU 1:
# 4K randread QD1, 4K randread QD32, 4K randwrite QD32, 128K sequential read QD16, each once with a client
# that sleeps between completions and once with a busy-polling client. Prints a Markdown table
# (bench/nvme_table.py) with the agent's CPU time per I/O from /proc/<pid>/stat.
#
#   bench/nvme.sh [SECONDS]                 seconds per workload (default 10)
#   bench/nvme.sh --engine spdk [SECONDS]   the native and the SPDK engine side by side, with SPDK's
#                                           spdk_nvme_perf as the client where installed (bench/nvme-engines.sh)
#
# Environment: DPU_BENCH_NO_BUILD=1 uses the binaries already in ${CARGO_TARGET_DIR:-target}/release;
# DPU_BENCH_KEEP=1 keeps the work directory (agent log, per-run JSON); RUST_LOG for the agent (default warn).
set -euo pipefail
if [[ ${1:-} == --engine ]]; then
	case ${2:-} in
	spdk) exec "$(dirname "$0")/nvme-engines.sh" "${@:3}" ;;
	native) shift 2 ;;
	*)
		echo "bench/nvme.sh: --engine takes native or spdk" >&2
		exit 2
		;;
	esac
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
# shellcheck source=lib.sh
source "$repo/bench/lib.sh"
target=${CARGO_TARGET_DIR:-$repo/target}
[[ $target == /* ]] || target=$repo/$target
bin=$target/release
seconds=${1:-10}
nqn=nqn.2026-11.io.dpu-agent:bench

say() { printf 'bench/nvme: %s\n' "$*" >&2; }

if [[ ${DPU_BENCH_NO_BUILD:-0} != 1 ]]; then
	cargo build --locked --release --bin dpu-agent --bin dpuctl --bin dpu-nvme-perf >&2
fi
for b in dpu-agent dpuctl dpu-nvme-perf; do
	[[ -x $bin/$b ]] || {
		say "$bin/$b is missing (build it, or unset DPU_BENCH_NO_BUILD)"
		exit 1
	}
done
if (($(nproc) < 2)); then
	say "needs two CPUs (agent on CPU 0, load generator on CPU 1)"
	exit 1
fi

work=$(mktemp -d)
agent_pid=""
cleanup() {
	if [[ -n $agent_pid ]] && kill -0 "$agent_pid" 2>/dev/null; then
		kill -TERM "$agent_pid" 2>/dev/null || true
		wait "$agent_pid" 2>/dev/null || true
	fi
	if [[ ${DPU_BENCH_KEEP:-0} == 1 ]]; then say "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

read -r api_port admin_port io_port <<<"$(free_ports 3)"
mkdir -p "$work/data"
cat >"$work/agent.toml" <<TOML
data_dir = "$work/data"

[api]
listen = "127.0.0.1:$api_port"

[admin]
listen = "127.0.0.1:$admin_port"

[storage]
TOML

say "starting dpu-agent on CPU 0 (API :$api_port, NVMe/TCP :$io_port)"
RUST_LOG=${RUST_LOG:-warn} NO_COLOR=1 taskset -c 0 "$bin/dpu-agent" --config "$work/agent.toml" \
	</dev/null >"$work/agent.log" 2>&1 &
agent_pid=$!
deadline=$((SECONDS + 60))
until "$bin/dpuctl" --addr "http://127.0.0.1:$api_port" storage volume list >/dev/null 2>&1; do
	kill -0 "$agent_pid" 2>/dev/null || {
		say "dpu-agent exited; its log:"
		cat "$work/agent.log" >&2
		exit 1
	}
	((SECONDS < deadline)) || {
		say "dpu-agent did not serve its API within 60 s"
		exit 1
	}
	sleep 0.1
done

dpuctl() { "$bin/dpuctl" --addr "http://127.0.0.1:$api_port" "$@" >/dev/null; }
dpuctl storage volume create v --malloc --size 1GiB
dpuctl storage subsystem create s --nqn "$nqn" --allow-any-host
dpuctl storage namespace create s n1 --volume v
dpuctl storage listener create s tcp --address "127.0.0.1:$io_port"
deadline=$((SECONDS + 30))
until (exec 3<>"/dev/tcp/127.0.0.1/$io_port") 2>/dev/null; do
	((SECONDS < deadline)) || {
		say "the NVMe/TCP listener did not open within 30 s"
		exit 1
	}
	sleep 0.1
done

perf() { taskset -c 1 "$bin/dpu-nvme-perf" --addr "127.0.0.1:$io_port" --nqn "$nqn" --json "$@"; }

agent_ticks() { proc_ticks "$agent_pid"; }

say "prefilling the volume: one sequential 128K write pass"
perf --rw write --io-size 128k --queue-depth 16 --bytes 1GiB --time 300s >"$work/prefill.json"

: >"$work/results.jsonl"
run() { # label, perf arguments...
	local label=$1 before after
	shift
	say "$label (${seconds}s)"
	before=$(agent_ticks)
	perf --time "${seconds}s" "$@" >"$work/run.json"
	after=$(agent_ticks)
	python3 - "$label" "$before" "$after" "$(getconf CLK_TCK)" "$work/run.json" >>"$work/results.jsonl" <<'PY'
import json, sys
label, before, after, hz, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
run = json.load(open(path))
run["label"] = label
run["agent_cpu_seconds"] = (after - before) / hz
print(json.dumps(run))
PY
}

workloads=(
	"4K randread QD1|--rw randread --io-size 4k --queue-depth 1"
	"4K randread QD32|--rw randread --io-size 4k --queue-depth 32"
	"4K randwrite QD32|--rw randwrite --io-size 4k --queue-depth 32"
	"128K read QD16|--rw read --io-size 128k --queue-depth 16"
)
# First with a client that sleeps in epoll between completions (as the kernel initiator does), then with one
# that busy-polls its socket (as polling-mode clients do): the difference is the cost of a sleep and wakeup.
for poll in 0 1000; do
	for w in "${workloads[@]}"; do
		label=${w%%|*}
		((poll == 0)) || label="$label, polling client"
		# shellcheck disable=SC2086 # the workload's arguments
		run "$label" ${w#*|} --poll-us "$poll"
	done
done

python3 "$repo/bench/nvme_table.py" "$work/results.jsonl"
