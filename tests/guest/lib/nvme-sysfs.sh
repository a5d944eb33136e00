# shellcheck shell=sh
# Guest-side lookups of NVMe/TCP controllers and namespaces in sysfs (busybox sh), shared by the NVMe checks
# (tests/guest/lib/nvme-checks.sh), the lazy-image guest test and bench/lazy-image.sh. Every function works on
# the subsystem NVME_SUBNQN. With native multipath (Debian's default) a namespace's disk hangs off the
# subsystem (nvme<subsys>n<nsid>), otherwise off the controller; both places are searched.

# Controllers (nvmeN) connected to NVME_SUBNQN, any state.
nvme_ctrls() {
	for _c in /sys/class/nvme/nvme*; do
		[ -e "$_c/subsysnqn" ] || continue
		[ "$(cat "$_c/subsysnqn")" = "$NVME_SUBNQN" ] && basename "$_c"
	done
	return 0
}

nvme_live_ctrl() { # the first live controller of NVME_SUBNQN
	for _n in $(nvme_ctrls); do
		if [ "$(cat "/sys/class/nvme/$_n/state" 2>/dev/null)" = live ]; then
			echo "$_n"
			return 0
		fi
	done
	return 1
}

nvme_ns_devs() { # names (nvmeXnY) of every namespace of NVME_SUBNQN that has a block device
	for _s in /sys/class/nvme-subsystem/nvme-subsys*; do
		[ "$(cat "$_s/subsysnqn" 2>/dev/null)" = "$NVME_SUBNQN" ] || continue
		for _d in "$_s"/nvme*n*; do
			[ -e "$_d/nsid" ] && [ -b "/dev/$(basename "$_d")" ] && basename "$_d"
		done
	done
	for _n in $(nvme_ctrls); do
		for _d in /sys/class/nvme/"$_n"/nvme*n*; do
			case "$(basename "$_d")" in *c*n*) continue ;; esac
			[ -e "$_d/nsid" ] && [ -b "/dev/$(basename "$_d")" ] && basename "$_d"
		done
	done
	return 0
}

nvme_ns_dev() { # NSID: the namespace's block device (/dev/...)
	for _d in $(nvme_ns_devs); do
		[ "$(cat "/sys/block/$_d/nsid" 2>/dev/null)" = "$1" ] && echo "/dev/$_d" && return 0
	done
	return 1
}

nvme_ns_uuid() { # NAME: the namespace's UUID as the kernel shows it, lowercase (its NGUID if it has no UUID)
	for _a in uuid nguid; do
		_u=$(cat "/sys/block/$1/$_a" 2>/dev/null) || continue
		[ -n "$_u" ] && echo "$_u" | tr 'A-F' 'a-f' && return 0
	done
	return 1
}
