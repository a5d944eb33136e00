# Smoke test: boot the arm64 guest (the DPU's architecture) and load the
# kernel modules later tests rely on: kTLS, AF_ALG and the flower classifier.
# shellcheck shell=bash disable=SC2034 # variables are read by tests/guest.sh

GUEST_ARCH=arm64
GUEST_MODULES=(tls af_alg algif_hash algif_skcipher cls_flower sch_ingress)
GUEST_TIMEOUT=180

guest_script() {
	cat <<'GUEST'
set -e
echo "guest: uname -r: $(uname -r)"
[ "$(uname -m)" = aarch64 ] || guest_fail "expected aarch64, got $(uname -m)"
for m in tls af_alg algif_hash algif_skcipher cls_flower sch_ingress virtio_net; do
	guest_module_loaded "$m" || guest_fail "module $m is not loaded"
done
grep -qw tls /proc/sys/net/ipv4/tcp_available_ulp \
	|| guest_fail "tls missing from tcp_available_ulp: $(cat /proc/sys/net/ipv4/tcp_available_ulp)"
ip -4 addr show dev eth0 | grep -q 'inet 10.0.2.15/24' || guest_fail "eth0 is not 10.0.2.15/24"
ip route | grep -q '^default via 10.0.2.2' || guest_fail "no default route via 10.0.2.2"
echo "guest: tcp_available_ulp: $(cat /proc/sys/net/ipv4/tcp_available_ulp)"
echo "guest: all checks passed"
GUEST
}
