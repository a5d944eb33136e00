#!/usr/bin/env bash
# Builds the dpu-agent Debian package with dpkg-deb (no debhelper); see cross/PACKAGING.md.
#
#   cross/deb.sh [arm64|amd64] [--out DIR]
#
#   arm64 (default)  the DPU package: static binaries from <target>/aarch64-unknown-linux-musl/dist/, built with
#                    `cross/build.sh musl` when missing
#   amd64            the host package: <target>/release/, built with `cargo build --locked --release` when missing
#
# <target> is ${CARGO_TARGET_DIR:-target}. Writes DIR/dpu-agent_<version>_<arch>.deb (DIR: <target>/deb) and
# prints its path. Environment:
#   DPU_DEB_NO_BUILD=1   never build: a missing binary is an error
#   DPU_DEB_BIN_DIR=DIR  take the binaries from DIR instead (never builds)
#   DPU_DEB_VERSION=V    Debian version, instead of the workspace version with revision -1
#   SOURCE_DATE_EPOCH    timestamp of every file and of the changelog entry; default: the last commit's
set -euo pipefail
umask 022

die() {
	echo "deb.sh: $*" >&2
	exit 1
}

arch=arm64
out=
while [ $# -gt 0 ]; do
	case "$1" in
	arm64 | amd64) arch=$1 ;;
	--out)
		[ $# -ge 2 ] || die "--out needs a directory"
		out=$2
		shift
		;;
	*)
		echo "usage: cross/deb.sh [arm64|amd64] [--out DIR]" >&2
		exit 2
		;;
	esac
	shift
done
# Paths given relative to the caller's directory.
[ -z "$out" ] || out=$(realpath -m -- "$out")
bin_dir=${DPU_DEB_BIN_DIR:+$(realpath -m -- "$DPU_DEB_BIN_DIR")}

cd "$(dirname "$0")/.."
src=cross/debian
target=${CARGO_TARGET_DIR:-target}
out=${out:-$target/deb}

# Version: the workspace's, which the agent inherits; a Cargo pre-release (1.2.0-rc.1) sorts before its
# release in Debian as 1.2.0~rc.1.
workspace_key() {
	awk -v key="$1" '/^\[workspace\.package\]/ { s = 1; next } /^\[/ { s = 0 }
		s && $1 == key && $2 == "=" { gsub(/"/, "", $3); print $3; exit }' Cargo.toml
}
grep -Eq '^version\.workspace *= *true' soc-agent/Cargo.toml ||
	die "soc-agent/Cargo.toml no longer takes the workspace version: update deb.sh"
upstream=$(workspace_key version)
[ -n "$upstream" ] || die "no version in [workspace.package] of Cargo.toml"
version=${DPU_DEB_VERSION:-${upstream//-/\~}-1}
[[ $version =~ ^[0-9][A-Za-z0-9.+~]*-[A-Za-z0-9.+~]+$ ]] || die "$version is not a Debian version (upstream-revision)"
homepage=$(workspace_key repository)
maintainer="DPU agent maintainers <dpu-agent@example.org>"

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
	SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null) || die "not a git checkout: set SOURCE_DATE_EPOCH"
fi
export SOURCE_DATE_EPOCH
revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

case "$arch" in
arm64)
	elf_machine="ARM aarch64"
	build=(cross/build.sh musl)
	bin_dir=${bin_dir:-$target/aarch64-unknown-linux-musl/dist}
	;;
amd64)
	elf_machine="x86-64"
	build=(cargo build --locked --release --bin dpu-agent --bin dpuctl)
	bin_dir=${bin_dir:-$target/release}
	;;
esac

missing=()
for b in dpu-agent dpuctl; do
	[ -f "$bin_dir/$b" ] || missing+=("$bin_dir/$b")
done
if [ ${#missing[@]} -gt 0 ]; then
	if [ -n "${DPU_DEB_BIN_DIR:-}" ] || [ "${DPU_DEB_NO_BUILD:-0}" = 1 ]; then
		die "missing ${missing[*]}"
	fi
	echo "deb.sh: building: ${build[*]}" >&2
	"${build[@]}"
	for b in "${missing[@]}"; do
		[ -f "$b" ] || die "the build did not produce $b"
	done
fi

# The binaries must be for the package's architecture. Static ones need no Depends (and get the lintian
# override); dynamic ones get theirs from dpkg-shlibdeps, which only knows the build host's libraries.
static=
for b in dpu-agent dpuctl; do
	desc=$(file -b "$bin_dir/$b")
	[[ $desc == *"$elf_machine"* ]] || die "$bin_dir/$b is not an $elf_machine executable: $desc"
	case "$desc" in
	*"statically linked"* | *"static-pie linked"*) static+=s ;;
	*) [ "$arch" = "$(dpkg --print-architecture)" ] || die "$bin_dir/$b is dynamically linked: build it static" ;;
	esac
	[[ $desc == *"not stripped"* ]] && echo "deb.sh: warning: $bin_dir/$b is not stripped" >&2
done
case "$static" in
ss | "") ;;
*) die "dpu-agent and dpuctl must both be static or both dynamic" ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/debian/dpu-agent
doc=$root/usr/share/doc/dpu-agent
install -d "$root/DEBIAN" "$root/etc/dpu-agent" "$root/usr/bin" "$root/usr/sbin" "$root/usr/lib/systemd/system" \
	"$doc" "$root/usr/share/man/man1" "$root/usr/share/man/man8"
install -m 0755 "$bin_dir/dpu-agent" "$root/usr/sbin/dpu-agent"
install -m 0755 "$bin_dir/dpuctl" "$root/usr/bin/dpuctl"
install -m 0644 "$src/config.toml" "$root/etc/dpu-agent/config.toml"
install -m 0644 "$src/dpu-agent.service" "$root/usr/lib/systemd/system/dpu-agent.service"
install -m 0644 "$src/copyright" "$doc/copyright"
gzip -9n <"$src/dpu-agent.8" >"$root/usr/share/man/man8/dpu-agent.8.gz"
gzip -9n <"$src/dpuctl.1" >"$root/usr/share/man/man1/dpuctl.1.gz"
printf '%s (%s) unstable; urgency=medium\n\n  * dpu-agent %s, built from revision %s.\n\n -- %s  %s\n' \
	dpu-agent "$version" "$upstream" "$revision" "$maintainer" "$(date -u -R -d "@$SOURCE_DATE_EPOCH")" |
	gzip -9n >"$doc/changelog.Debian.gz"
install -d "$root/usr/share/lintian/overrides"
cat "$src/lintian-overrides" ${static:+"$src/lintian-overrides.static"} >"$root/usr/share/lintian/overrides/dpu-agent"
# Shell completions, printed by the packaged dpuctl itself: run directly where it can (amd64, or arm64 on an
# arm64 builder or with binfmt), else under qemu-aarch64 (static, so it needs no sysroot).
dpuctl_here() {
	if "$bin_dir/dpuctl" --version >/dev/null 2>&1; then
		"$bin_dir/dpuctl" "$@"
	elif [ "$arch" = arm64 ] && command -v qemu-aarch64 >/dev/null; then
		qemu-aarch64 "$bin_dir/dpuctl" "$@"
	else
		die "cannot run $bin_dir/dpuctl here to print its shell completions (apt-get install qemu-user)"
	fi
}
install -d "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
	"$root/usr/share/fish/vendor_completions.d"
dpuctl_here completion bash >"$root/usr/share/bash-completion/completions/dpuctl"
dpuctl_here completion zsh >"$root/usr/share/zsh/vendor-completions/_dpuctl"
dpuctl_here completion fish >"$root/usr/share/fish/vendor_completions.d/dpuctl.fish"
for f in bash-completion/completions/dpuctl zsh/vendor-completions/_dpuctl fish/vendor_completions.d/dpuctl.fish; do
	[ -s "$root/usr/share/$f" ] || die "dpuctl printed no completions for usr/share/$f"
	chmod 0644 "$root/usr/share/$f"
done

depends=
if [ -z "$static" ]; then
	command -v dpkg-shlibdeps >/dev/null || die "dpkg-shlibdeps is needed for dynamic binaries (apt-get install dpkg-dev)"
	printf 'Source: dpu-agent\n\nPackage: dpu-agent\nArchitecture: any\n' >"$work/debian/control"
	depends=$(cd "$work" && dpkg-shlibdeps -O -edebian/dpu-agent/usr/sbin/dpu-agent -edebian/dpu-agent/usr/bin/dpuctl |
		sed -n 's/^shlibs:Depends=//p')
	[ -n "$depends" ] || die "dpkg-shlibdeps found no dependencies for dynamic binaries"
fi

for script in postinst prerm postrm; do
	install -m 0755 "$src/$script" "$root/DEBIAN/$script"
done
echo /etc/dpu-agent/config.toml >"$root/DEBIAN/conffiles"
# md5sums of everything but the conffiles, which dpkg tracks itself (as dh_md5sums does).
(cd "$root" && find . -type f ! -path './DEBIAN/*' ! -path './etc/*' -printf '%P\0' | LC_ALL=C sort -z |
	xargs -0 md5sum >DEBIAN/md5sums)
# Installed-Size as dpkg-gencontrol counts it: KiB per file, rounded up, and 1 per directory or link.
installed_size=$(find "$root" -path "$root/DEBIAN" -prune -o ! -path "$root" -printf '%y %s\n' |
	awk '$1 == "f" { n += int(($2 + 1023) / 1024); next } { n += 1 } END { print n }')
{
	echo "Package: dpu-agent"
	echo "Version: $version"
	echo "Architecture: $arch"
	echo "Maintainer: $maintainer"
	echo "Installed-Size: $installed_size"
	[ -z "$depends" ] || echo "Depends: $depends"
	echo "Recommends: erofs-utils"
	echo "Section: admin"
	echo "Priority: optional"
	[ -z "$homepage" ] || echo "Homepage: $homepage"
	cat <<'EOF'
Description: agent for the Arm cores of a DPU or SmartNIC
 dpu-agent runs on the Arm cores of a DPU such as NVIDIA BlueField. It serves
 a shared service-mesh proxy, an NVMe-oF target with lazily loaded container
 images, representor forwarding on the eSwitch and IPsec/TLS crypto offload,
 driven by intent set over a gRPC API with mTLS.
 .
 dpuctl is its command-line client.
EOF
} >"$root/DEBIAN/control"

find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
mkdir -p "$out"
deb=$out/dpu-agent_${version}_${arch}.deb
# xz explicitly: dpkg-deb on Ubuntu 21.10 and later defaults to zstd, which older dpkg (Ubuntu 20.04, Debian 11)
# cannot unpack.
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
