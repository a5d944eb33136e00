# Smoke test: boot the x86_64 guest (the host side of a DPU) and load the
# NVMe/TCP initiator and target and kTLS, which storage tests rely on.
# shellcheck shell=bash disable=SC2034 # variables are read by tests/guest.sh

GUEST_ARCH=amd64
GUEST_MODULES=(nvme-tcp nvmet-tcp tls)
GUEST_TIMEOUT=180

guest_script() {
	cat <<'GUEST'
set -e
echo "guest: uname -r: $(uname -r)"
[ "$(uname -m)" = x86_64 ] || guest_fail "expected x86_64, got $(uname -m)"
for m in nvme_tcp nvme_fabrics nvmet_tcp nvmet tls virtio_net; do
	guest_module_loaded "$m" || guest_fail "module $m is not loaded"
done
[ -e /dev/nvme-fabrics ] || guest_fail "/dev/nvme-fabrics is missing"
grep -qw tls /proc/sys/net/ipv4/tcp_available_ulp \
	|| guest_fail "tls missing from tcp_available_ulp: $(cat /proc/sys/net/ipv4/tcp_available_ulp)"
# nvmet is configured through configfs
mount -t configfs none /sys/kernel/config
[ -d /sys/kernel/config/nvmet/ports ] || guest_fail "nvmet configfs tree is missing"
ip -4 addr show dev eth0 | grep -q 'inet 10.0.2.15/24' || guest_fail "eth0 is not 10.0.2.15/24"
ip route | grep -q '^default via 10.0.2.2' || guest_fail "no default route via 10.0.2.2"
echo "guest: tcp_available_ulp: $(cat /proc/sys/net/ipv4/tcp_available_ulp)"
echo "guest: all checks passed"
GUEST
}
