#!/usr/bin/env bash
# Install what the QEMU guest harness needs, idempotently, on a Debian host.
#
# Usage: images/deps.sh [--package PKG]... [GUEST_ARCH...]
#
#   Always ensures the host packages below are installed (apt-get runs only when
#   one is missing). For each GUEST_ARCH (arm64|amd64) that is not the host's
#   own dpkg architecture, also enables it as a foreign architecture and
#   refreshes the apt lists, but only when apt cannot already see that
#   architecture's packages; this is what lets fetch-kernel.sh and
#   build-initramfs.sh `apt-get download` arm64 kernels and busybox on an amd64
#   host.
#
#   --package PKG   also ensure Debian package PKG on the host, e.g. one whose
#                   programs a test copies into an amd64 guest
#                   (GUEST_HOST_PACKAGES and GUEST_BINARIES in tests/guest.sh);
#                   repeatable, or several names separated by spaces/commas.
#                   Like the base packages, installed only when missing.
set -euo pipefail
# depmod, dpkg and friends live in sbin directories a user PATH may lack.
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

readonly HOST_PACKAGES=(
	qemu-system-arm  # qemu-system-aarch64
	qemu-system-x86  # qemu-system-x86_64
	busybox-static   # the amd64 guest userland
	cpio             # initramfs archives
	kmod             # depmod for the extracted guest kernels
	python3          # free port selection, JSON checks in host-side test code
)

log() { printf 'deps: %s\n' "$*" >&2; }
die() { printf 'deps: error: %s\n' "$*" >&2; exit 1; }

as_root() {
	if [[ $(id -u) -eq 0 ]]; then
		"$@"
	elif command -v sudo >/dev/null 2>&1; then
		sudo -n "$@"
	else
		die "need root (or passwordless sudo) to run: $*"
	fi
}

apt_get() {
	as_root env DEBIAN_FRONTEND=noninteractive \
		apt-get -o DPkg::Lock::Timeout=300 "$@"
}

is_installed() {
	[[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

ensure_host_packages() { # [extra package...]
	local pkg missing=()
	for pkg in "${HOST_PACKAGES[@]}" "$@"; do
		is_installed "$pkg" || missing+=("$pkg")
	done
	((${#missing[@]} == 0)) && return 0
	log "installing: ${missing[*]}"
	apt_get update -qq || log "warning: apt-get update reported errors; trying the install anyway"
	apt_get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
		|| die "apt-get install failed for: ${missing[*]}"
}

# Have the apt lists been downloaded for ARCH? (A cheap file check; apt-cache
# itself takes a second or more once two architectures are enabled.)
apt_has_lists() {
	local lists
	lists=$(apt-config shell L Dir::State::lists/d | sed -n "s/^L='\(.*\)'$/\1/p")
	[[ -n $lists ]] || lists=/var/lib/apt/lists/
	compgen -G "${lists%/}/*_binary-${1}_Packages*" >/dev/null
}

ensure_guest_arch() {
	local arch=$1 native
	case "$arch" in
	arm64 | amd64) ;;
	*) die "unsupported guest architecture '$arch' (expected arm64 or amd64)" ;;
	esac
	native=$(dpkg --print-architecture)
	if [[ $arch != "$native" ]] && ! dpkg --print-foreign-architectures | grep -qxF "$arch"; then
		log "enabling dpkg foreign architecture $arch"
		as_root dpkg --add-architecture "$arch"
	fi
	apt_has_lists "$arch" && return 0
	log "refreshing apt lists for $arch"
	apt_get update -qq || log "warning: apt-get update reported errors"
	apt_has_lists "$arch" \
		|| die "apt has no package lists for $arch after apt-get update; check /etc/apt/sources.list*"
}

main() {
	local -a extra=() archs=() names
	local name
	while (($#)); do
		case "$1" in
		--package)
			(($# >= 2)) || die "--package needs a Debian package name"
			read -ra names <<<"${2//,/ }"
			for name in "${names[@]}"; do
				[[ $name =~ ^[a-z0-9][a-z0-9+.-]+(:[a-z0-9]+)?$ ]] || die "invalid package name '$name'"
				extra+=("$name")
			done
			shift 2
			;;
		-h | --help)
			sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
			exit 2
			;;
		-*) die "unknown option '$1'" ;;
		*)
			archs+=("$1")
			shift
			;;
		esac
	done
	command -v dpkg-query >/dev/null 2>&1 || die "this harness needs a Debian-based host (dpkg/apt)"
	ensure_host_packages "${extra[@]}"
	local arch
	for arch in "${archs[@]}"; do
		ensure_guest_arch "$arch"
	done
}

main "$@"
