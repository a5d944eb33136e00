#!/usr/bin/env bash
# Checks a package built by cross/deb.sh without a DPU: its contents (dpkg-deb -c), lintian, the unit
# (systemd-analyze verify, with the packaged binaries and manual pages), and dpkg install, conffile-keeping
# upgrade, remove and purge in a throwaway root, maintainer scripts included.
#
#   cross/check-deb.sh DEB
#
# Needs lintian and systemd (for systemd-analyze); the install runs as root or with --force-not-root.
set -euo pipefail
umask 022

die() {
	echo "check-deb: FAIL: $*" >&2
	exit 1
}

[ $# -eq 1 ] && [ -f "$1" ] || {
	echo "usage: cross/check-deb.sh DEB" >&2
	exit 2
}
deb=$(realpath -- "$1")
cd "$(dirname "$0")/.."
arch=$(dpkg-deb -f "$deb" Architecture)
version=$(dpkg-deb -f "$deb" Version)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== contents of $(basename "$deb")"
dpkg-deb -c "$deb" | awk '{ print $1, $2, $NF }' | sed 's#^#  #'
listing=$(dpkg-deb -c "$deb" | awk '{ print $1, $2, $NF }')
for want in \
	"-rwxr-xr-x root/root ./usr/sbin/dpu-agent" \
	"-rwxr-xr-x root/root ./usr/bin/dpuctl" \
	"-rw-r--r-- root/root ./usr/lib/systemd/system/dpu-agent.service" \
	"-rw-r--r-- root/root ./etc/dpu-agent/config.toml" \
	"-rw-r--r-- root/root ./usr/share/bash-completion/completions/dpuctl" \
	"-rw-r--r-- root/root ./usr/share/man/man8/dpu-agent.8.gz" \
	"-rw-r--r-- root/root ./usr/share/doc/dpu-agent/copyright"; do
	grep -qxF -- "$want" <<<"$listing" || die "the package lacks $want"
done
[ "$(dpkg-deb -f "$deb" Package)" = dpu-agent ] || die "package name"
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx /etc/dpu-agent/config.toml ||
	die "/etc/dpu-agent/config.toml is not a conffile"
echo "contents: PASS"

echo "== lintian"
lintian --fail-on error,warning --display-info "$deb"
echo "lintian: PASS (no errors or warnings)"

echo "== systemd-analyze verify"
x=$work/extracted
dpkg-deb -x "$deb" "$x"
# The unit as installed, pointing at the packaged binary (any architecture: verify only checks it is
# executable) and finding the packaged manual page for Documentation=.
mkdir -p "$work/unit"
sed "s#/usr/sbin/dpu-agent#$x/usr/sbin/dpu-agent#g" "$x/usr/lib/systemd/system/dpu-agent.service" \
	>"$work/unit/dpu-agent.service"
MANPATH=$x/usr/share/man systemd-analyze verify "$work/unit/dpu-agent.service"
echo "systemd-analyze verify: PASS"

echo "== dpkg: install, upgrade keeping a changed conffile, remove, purge (root $work/root)"
root=$work/root
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/usr/sbin" "$root/usr/bin"
: >"$root/var/lib/dpkg/status"
# Maintainer scripts run outside the root with DPKG_ROOT set, as in an image build (no systemd running). The
# root holds no other package, so a dynamic build's libc6 dependency is forced.
dpkg_in() { dpkg --root="$root" --force-script-chrootless --force-not-root --force-depends --log=/dev/null "$@"; }
[ "$arch" = "$(dpkg --print-architecture)" ] || dpkg_in --add-architecture "$arch"
dpkg_in --install "$deb" >/dev/null
status=$(dpkg-query --admindir="$root/var/lib/dpkg" -W -f '${Status} ${Version}' dpu-agent)
[ "$status" = "install ok installed $version" ] || die "after install: $status"
wants=$root/etc/systemd/system/multi-user.target.wants/dpu-agent.service
[ -L "$wants" ] || die "the unit was not enabled on first install"
cmp -s "$x/usr/sbin/dpu-agent" "$root/usr/sbin/dpu-agent" || die "installed agent differs from the package's"

# An operator's edit, then an upgrade to a package with another version and the same shipped conffile.
echo '# site setting' >>"$root/etc/dpu-agent/config.toml"
edited=$(md5sum <"$root/etc/dpu-agent/config.toml")
next=$work/next
mkdir -p "$next"
dpkg-deb -R "$deb" "$next/pkg"
sed -i "s/^Version: .*/Version: ${version}+check1/" "$next/pkg/DEBIAN/control"
dpkg-deb --root-owner-group -Zxz --build "$next/pkg" "$next/next.deb" >/dev/null
dpkg_in --force-confold --install "$next/next.deb" >/dev/null
status=$(dpkg-query --admindir="$root/var/lib/dpkg" -W -f '${Status} ${Version}' dpu-agent)
[ "$status" = "install ok installed ${version}+check1" ] || die "after upgrade: $status"
[ "$(md5sum <"$root/etc/dpu-agent/config.toml")" = "$edited" ] || die "the upgrade replaced an edited conffile"
[ -L "$wants" ] || die "the upgrade disabled the unit"

mkdir -p "$root/var/lib/dpu-agent"
dpkg_in --remove dpu-agent >/dev/null
[ ! -e "$root/usr/sbin/dpu-agent" ] || die "remove left the agent binary"
[ -e "$root/etc/dpu-agent/config.toml" ] || die "remove deleted the configuration (only purge does)"
dpkg_in --purge dpu-agent >/dev/null 2>"$work/purge.err"
[ ! -e "$root/etc/dpu-agent/config.toml" ] || die "purge left the configuration"
[ ! -e "$wants" ] || die "purge left the unit enabled"
[ -d "$root/var/lib/dpu-agent" ] || die "purge deleted the agent's data"
grep -q "/var/lib/dpu-agent is kept" "$work/purge.err" || die "purge did not say the data is kept"
echo "dpkg: PASS"
