#!/usr/bin/env bash
# Build (once) a Debian 12 root file system that boots with systemd as PID 1 and runs a guest test as a unit,
# for guests that need a real service manager (tests/guest/deb-systemd.sh).
#
# Usage: images/systemd-rootfs.sh
#
# Prints the path of the tarball: ${DPU_CACHE:-$HOME/.cache/dpu-agent}/rootfs/systemd-<hash>.tar, where the
# hash covers this script, so a changed recipe builds anew and an unchanged one is reused. The guest's busybox
# /init unpacks it into a tmpfs when the image carries it as /guest/rootfs.tar and switches to it
# (images/build-initramfs.sh); eth0 and the modules are set up before, so the root file system needs neither
# udev nor a network manager.
#
# In it: minbase with systemd, systemd-sysv and init-system-helpers (deb-systemd-helper, deb-systemd-invoke, as
# a DPU image has them); `guest-test.service`, enabled, runs /guest/lib.sh and /guest/run.sh after boot, prints
# `GUEST-RESULT: PASS` or `GUEST-RESULT: FAIL rc=N` on the console and powers off; the console gettys are masked.
#
# Needs root (mmdebstrap --mode=root). Environment: DPU_CACHE; DPU_DEBIAN_MIRROR to use another mirror than
# mmdebstrap's default.
set -euo pipefail
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

CACHE_ROOT=$(realpath -m "${DPU_CACHE:-$HOME/.cache/dpu-agent}")
readonly DIR=$CACHE_ROOT/rootfs
readonly PACKAGES=systemd,systemd-sysv,init-system-helpers,procps

log() { printf 'systemd-rootfs: %s\n' "$*" >&2; }
die() {
	printf 'systemd-rootfs: error: %s\n' "$*" >&2
	exit 1
}

hash=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)
out=$DIR/systemd-$hash.tar
if [[ -s $out ]]; then
	printf '%s\n' "$out"
	exit 0
fi
command -v mmdebstrap >/dev/null || {
	log "installing mmdebstrap"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null ||
		die "cannot install mmdebstrap"
}
mkdir -p "$DIR"
work=$(mktemp -d "$DIR/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

files=$work/files
mkdir -p "$files/etc/systemd/system" "$files/usr/local/sbin"
cat >"$files/usr/local/sbin/guest-test" <<'EOF'
#!/bin/sh
# Runs the guest test the image carries, reports it on the console and powers off.
cd /
rc=0
(
	. /guest/lib.sh
	. /guest/run.sh
) || rc=$?
if [ "$rc" -eq 0 ]; then
	echo "GUEST-RESULT: PASS" >/dev/console
else
	echo "GUEST-RESULT: FAIL rc=$rc" >/dev/console
fi
sync
systemctl poweroff --force --force
EOF
chmod 0755 "$files/usr/local/sbin/guest-test"
cat >"$files/etc/systemd/system/guest-test.service" <<'EOF'
[Unit]
Description=guest test
After=basic.target

[Service]
Type=exec
ExecStart=/usr/local/sbin/guest-test
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
EOF

log "building a Debian 12 root file system with systemd (mmdebstrap, a few minutes)"
# shellcheck disable=SC2016 # "$1" in the hooks is mmdebstrap's to expand
cmd=(
	mmdebstrap --variant=minbase --mode=root --format=tar --include="$PACKAGES"
	--aptopt='Acquire::Check-Valid-Until "false"'
	# Documentation and translations: a third of the size, and nothing in a test guest reads them.
	--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*'
	--dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*'
	--customize-hook="sync-in $files /"
	--customize-hook='chroot "$1" systemctl enable guest-test.service'
	--customize-hook='chroot "$1" systemctl mask serial-getty@ttyS0.service serial-getty@ttyAMA0.service getty@tty1.service'
	# Apt's lists and caches are not needed in a test guest.
	--customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*'
	bookworm "$work/rootfs.tar"
)
[[ -z ${DPU_DEBIAN_MIRROR:-} ]] || cmd+=("$DPU_DEBIAN_MIRROR")
"${cmd[@]}" >&2 || die "mmdebstrap failed"
mv "$work/rootfs.tar" "$out"
# Older recipes' tarballs.
find "$DIR" -maxdepth 1 -name 'systemd-*.tar' ! -path "$out" -delete
log "$(du -h "$out" | cut -f1) at $out"
printf '%s\n' "$out"
