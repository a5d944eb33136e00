# shellcheck shell=bash
# Guest side of bench/fabric.sh, used by tests/guest/fabric.sh when DPU_FABRIC_BENCH=1: two veth pairs and
# dpu-fabric-bench, which installs DPU_FABRIC_BENCH_RULES flower rules through the agent's netlink backend on
# one and with iproute2's `tc -batch` on the other, then re-runs the unchanged pass. Lines starting with
# "bench: " are the result table.

fabric_bench_prepare() { # TARGET_DIR: adds the benchmark binary to the image
	local target=$1
	if [[ ${DPU_GUEST_NO_BUILD:-0} != 1 ]]; then
		printf 'fabric: building dpu-fabric-bench for aarch64 (static)\n' >&2
		(cd "$REPO_ROOT" && cargo build --locked --release --target aarch64-unknown-linux-musl -p dpu-fabric \
			--bin dpu-fabric-bench) >&2 || return 1
	fi
	[[ -f $target/dpu-fabric-bench ]] || {
		printf 'fabric: dpu-fabric-bench not found at %s\n' "$target/dpu-fabric-bench" >&2
		return 1
	}
	GUEST_FILES+=("$target/dpu-fabric-bench:/usr/bin/dpu-fabric-bench")
}

fabric_bench_script() {
	local rules=${DPU_FABRIC_BENCH_RULES:-10000}
	[[ $rules =~ ^[1-9][0-9]*$ ]] || {
		printf 'fabric: DPU_FABRIC_BENCH_RULES must be a positive number\n' >&2
		return 1
	}
	printf 'RULES=%s\n' "$rules"
	cat <<'GUEST'
ipr() { LD_LIBRARY_PATH=/opt/iproute2/lib /opt/iproute2/ip "$@"; }
chmod 0755 /usr/bin/dpu-fabric-bench
for pair in b0 b1; do
	ipr link add $pair type veth peer name ${pair}p
	ipr link set $pair up
	ipr link set ${pair}p up
done
echo "fabric: benchmark with $RULES rules (TCG guest: relative figures only)"
LD_LIBRARY_PATH=/opt/iproute2/lib dpu-fabric-bench --rules "$RULES" --dev b0 --peer b0p --tc-dev b1 --tc-peer b1p \
	--tc /opt/iproute2/tc || guest_fail "dpu-fabric-bench failed"
GUEST
}
