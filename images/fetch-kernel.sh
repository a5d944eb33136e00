#!/usr/bin/env bash
# Fetch Debian's current guest kernel for ARCH and cache it, ready to boot.
#
# Usage: images/fetch-kernel.sh <arm64|amd64>
#
# Resolves the kernel the `linux-image-<arch>` metapackage currently points at
# (never a hard-coded version: old point releases leave the archive), downloads
# it with `apt-get download`, unpacks it with `dpkg -x`, runs `depmod -b`, and
# prints the cache directory on stdout:
#
#   ${DPU_CACHE:-$HOME/.cache/dpu-agent}/kernels/<arch>/<debian-version>/
#       vmlinuz             the kernel image (for qemu -kernel)
#       config              the kernel's build config
#       lib/modules/<rel>/  modules with a fresh modules.dep
#       env                 sourceable: ARCH= PACKAGE= VERSION= RELEASE= KERNEL= MODULES= CONFIG=
#
# The resolved version is remembered for DPU_KERNEL_TTL seconds (default one
# day); within that window a call touches neither apt nor the network. After it,
# the metapackage is re-resolved with apt-cache only, and a download happens
# only when Debian has moved to a new kernel. If apt cannot resolve (no lists,
# no network) a previously cached kernel is used with a warning.
set -euo pipefail
# depmod, dpkg and friends live in sbin directories a user PATH may lack.
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
readonly CACHE_ROOT=${DPU_CACHE:-$HOME/.cache/dpu-agent}
readonly TTL=${DPU_KERNEL_TTL:-86400}

WORK_DIRS=()
cleanup() { ((${#WORK_DIRS[@]} == 0)) || rm -rf "${WORK_DIRS[@]}"; }
trap cleanup EXIT

log() { printf 'fetch-kernel: %s\n' "$*" >&2; }
die() { printf 'fetch-kernel: error: %s\n' "$*" >&2; exit 1; }

usage() {
	sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
	exit 2
}

# Prints "PACKAGE VERSION" for the kernel the metapackage depends on.
resolve() {
	local arch=$1 dep pkg ver
	dep=$(apt-cache depends "linux-image-$arch:$arch" 2>/dev/null \
		| awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }') || true
	[[ -n $dep ]] || return 1
	pkg=${dep%%:*}
	ver=$(apt-cache show --no-all-versions "$pkg:$arch" 2>/dev/null \
		| awk '$1 == "Version:" { print $2; exit }') || true
	[[ -n $ver ]] || return 1
	printf '%s %s\n' "$pkg" "$ver"
}

stamp_version() { # version recorded in the resolve stamp, if any
	[[ -f $1 ]] && sed -n 's/^VERSION=//p' "$1"
	return 0
}

stamp_fresh() {
	local stamp=$1 now mtime
	[[ -f $stamp ]] || return 1
	now=$(date +%s)
	mtime=$(stat -c %Y "$stamp")
	((now - mtime < TTL))
}

write_stamp() { # stamp version
	local tmp
	tmp=$(mktemp "$1.XXXXXX")
	printf 'VERSION=%s\n' "$2" >"$tmp"
	mv -f "$tmp" "$1"
}

# Downloads and unpacks PACKAGE=VERSION for ARCH into DEST (must not exist).
install_kernel() {
	local arch=$1 pkg=$2 ver=$3 dest=$4 work root deb vmlinuz rel
	local -a moddirs
	work=$(mktemp -d "$(dirname "$dest")/.tmp.XXXXXX")
	WORK_DIRS+=("$work")
	log "downloading $pkg:$arch=$ver"
	if ! (cd "$work" && apt-get -q -o APT::Sandbox::User=root download "$pkg:$arch=$ver" >&2); then
		return 1
	fi
	deb=$(find "$work" -maxdepth 1 -name '*.deb' -print -quit)
	[[ -n $deb ]] || die "apt-get download produced no .deb for $pkg"
	root=$work/root
	log "unpacking $(basename "$deb")"
	dpkg -x "$deb" "$root"
	rm -f "$deb"

	mapfile -t moddirs < <(find "$root/lib/modules" "$root/usr/lib/modules" \
		-mindepth 1 -maxdepth 1 -type d 2>/dev/null)
	((${#moddirs[@]} == 1)) || die "expected one modules directory in $pkg, found ${#moddirs[@]}"
	rel=$(basename "${moddirs[0]}")
	vmlinuz=$root/boot/vmlinuz-$rel
	[[ -f $vmlinuz ]] || die "$pkg has no boot/vmlinuz-$rel"

	local out=$work/out
	mkdir -p "$out/lib/modules" "$out/usr/lib"
	mv "$vmlinuz" "$out/vmlinuz"
	if [[ -f $root/boot/config-$rel ]]; then
		mv "$root/boot/config-$rel" "$out/config"
	fi
	mv "${moddirs[0]}" "$out/lib/modules/$rel"
	# depmod's module directory is /lib/modules or /usr/lib/modules depending on
	# the kmod build; make both resolve inside the base directory.
	ln -s ../../lib/modules "$out/usr/lib/modules"
	log "running depmod for $rel"
	depmod -b "$out" "$rel"
	[[ -s $out/lib/modules/$rel/modules.dep ]] || die "depmod produced no modules.dep for $rel"

	{
		printf 'ARCH=%q\n' "$arch"
		printf 'PACKAGE=%q\n' "$pkg"
		printf 'VERSION=%q\n' "$ver"
		printf 'RELEASE=%q\n' "$rel"
		printf 'KERNEL=%q\n' "$dest/vmlinuz"
		printf 'MODULES=%q\n' "$dest/lib/modules/$rel"
		printf 'CONFIG=%q\n' "$dest/config"
	} >"$out/env"
	rm -rf "$dest"
	mv "$out" "$dest"
	rm -rf "$work"
}

# Keep the current kernel and the most recent previous one.
prune() {
	local base=$1 keep=$2 dir
	local -a dirs
	mapfile -t dirs < <(find "$base" -mindepth 1 -maxdepth 1 -type d ! -name '.*' -printf '%T@ %p\n' \
		| sort -rn | cut -d' ' -f2-)
	local kept=0
	for dir in "${dirs[@]}"; do
		if [[ $dir == "$base/$keep" ]]; then continue; fi
		if ((kept < 1)); then
			kept=1
			continue
		fi
		log "removing old kernel $(basename "$dir")"
		rm -rf "$dir"
	done
	# leftovers of interrupted runs
	find "$base" -mindepth 1 -maxdepth 1 -name '.tmp.*' -mmin +60 -exec rm -rf {} + 2>/dev/null || true
}

main() {
	(($# == 1)) || usage
	local arch=$1
	case "$arch" in
	arm64 | amd64) ;;
	-h | --help) usage ;;
	*) die "unsupported architecture '$arch' (expected arm64 or amd64)" ;;
	esac

	local base=$CACHE_ROOT/kernels/$arch
	local stamp=$base/resolved ver
	ver=$(stamp_version "$stamp")
	if stamp_fresh "$stamp" && [[ -n $ver && -f $base/$ver/env ]]; then
		printf '%s\n' "$base/$ver"
		return 0
	fi

	mkdir -p "$base"
	local lock_fd
	exec {lock_fd}>"$base/.lock"
	flock "$lock_fd"
	# Another run may have refreshed the cache while we waited.
	ver=$(stamp_version "$stamp")
	if stamp_fresh "$stamp" && [[ -n $ver && -f $base/$ver/env ]]; then
		printf '%s\n' "$base/$ver"
		return 0
	fi

	"$SCRIPT_DIR/deps.sh" "$arch"

	local resolved pkg attempt
	for attempt in 1 2; do
		if ! resolved=$(resolve "$arch"); then
			if [[ -n $ver && -f $base/$ver/env ]]; then
				log "warning: cannot resolve linux-image-$arch via apt; using cached $ver"
				printf '%s\n' "$base/$ver"
				return 0
			fi
			die "cannot resolve linux-image-$arch:$arch with apt-cache (run images/deps.sh $arch; check apt sources)"
		fi
		read -r pkg ver <<<"$resolved"
		if [[ -f $base/$ver/env ]]; then
			break
		fi
		if install_kernel "$arch" "$pkg" "$ver" "$base/$ver"; then
			break
		fi
		((attempt == 1)) || die "cannot download $pkg:$arch=$ver"
		# Stale lists name a point release that already left the archive.
		log "download failed; refreshing apt lists and resolving again"
		apt-get -o DPkg::Lock::Timeout=300 update -qq >&2 || log "warning: apt-get update reported errors"
	done

	write_stamp "$stamp" "$ver"
	prune "$base" "$ver"
	printf '%s\n' "$base/$ver"
}

main "$@"
