#!/usr/bin/env bash
# Build a busybox (static) cpio initramfs for a guest architecture.
#
# Usage: images/build-initramfs.sh --arch <arm64|amd64> [options]
#
#   --arch ARCH       guest architecture (required)
#   --kernel DIR      kernel cache dir from fetch-kernel.sh (default: run it)
#   --module NAME     kernel module to load at boot, with its dependencies;
#                     repeatable, or several names separated by spaces/commas.
#                     '-' and '_' are interchangeable; built-in ones are skipped
#   --file SRC:DST    copy host file or directory SRC to absolute path DST in
#                     the image (DST ending in '/' keeps SRC's name); repeatable
#   --binary PROG     copy host program PROG (a name looked up with `command -v`
#                     on PATH plus the sbin directories, or an absolute path)
#                     into the image at the same path, with every shared
#                     library `ldd` lists for it and the dynamic loader, also
#                     at their host paths; repeatable, or several names
#                     separated by spaces/commas. Only when ARCH is the host's
#                     own architecture. Data files a program reads (e.g.
#                     /etc/mke2fs.conf) are not added: pass them with --file
#   --script FILE     guest script, installed as /guest/run.sh (busybox sh)
#   --out FILE        write the image here instead of the shared cache
#
# Prints the path of the (uncompressed, newc) cpio archive on stdout. Without
# --out the image lives in ${DPU_CACHE:-$HOME/.cache/dpu-agent}/initramfs/,
# keyed by a hash of everything that goes into it, so an unchanged image is
# reused without rebuilding. That cache keeps the DPU_INITRAMFS_KEEP (24) most
# recently used images, at most DPU_INITRAMFS_KEEP_MIB (2048) MiB in all.
#
# The image holds: busybox (applet links are installed by /init at boot, which
# works for foreign-architecture images too), the requested modules and their
# dependencies under /lib/modules/<release> with a matching modules.dep (so
# busybox modprobe works in the guest), the virtio modules the harness needs
# (virtio-net for eth0, virtio-rng for entropy), the host programs with their
# libraries, the extra files (copied last, so they win), and /init. The cache
# key covers the content of every program and library copied.
#
# /init mounts proc, sys, dev (devtmpfs, devpts, shm), tmp and run; loads the
# modules; configures eth0 as 10.0.2.15/24 with a default route via 10.0.2.2
# (QEMU user networking); if the image has /guest/rootfs.tar (a root file
# system with systemd, images/systemd-rootfs.sh), unpacks it into a tmpfs and
# switches to its /sbin/init, which runs the test as a unit and reports the
# same markers; otherwise runs /guest/run.sh in a subshell that has
# /guest/lib.sh sourced, and prints exactly one of
#     GUEST-RESULT: PASS
#     GUEST-RESULT: FAIL rc=N
# on the console before `poweroff -f`. A failure before the script runs
# (module or network setup) is reported as FAIL with rc >= 200.
#
# amd64 images use the host's busybox-static when the host is amd64; other
# architectures use Debian's busybox-static:<arch> package, downloaded once
# with `apt-get download` and cached under ${DPU_CACHE}/busybox/<arch>/.
set -euo pipefail
# depmod, dpkg and friends live in sbin directories a user PATH may lack.
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
readonly CACHE_ROOT=${DPU_CACHE:-$HOME/.cache/dpu-agent}
# Modules every image gets: the NIC and an entropy source. Names that are
# built into the kernel are skipped.
readonly BASE_MODULES=(virtio_pci virtio_net virtio_rng)
readonly KEEP_IMAGES=${DPU_INITRAMFS_KEEP:-24}
# Images with host programs are large (~90 MB for nvme-cli + fio): also cap
# the cache's total size, dropping the least recently used images first.
readonly KEEP_MIB=${DPU_INITRAMFS_KEEP_MIB:-2048}

log() { printf 'build-initramfs: %s\n' "$*" >&2; }
die() { printf 'build-initramfs: error: %s\n' "$*" >&2; exit 1; }

usage() {
	sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
	exit 2
}

WORK_DIRS=()
cleanup() { ((${#WORK_DIRS[@]} == 0)) || rm -rf "${WORK_DIRS[@]}"; }
trap cleanup EXIT

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# Content hash of a file or directory tree (names, modes, contents, links).
tree_hash() {
	local src=$1
	if [[ -d $src ]]; then
		(
			cd "$src"
			find . -mindepth 1 -printf '%y %m %p %l\n' | LC_ALL=C sort
			find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum
		) | sha256sum | cut -d' ' -f1
	else
		printf '%s %s\n' "$(stat -c %a "$src")" "$(sha_of "$src")" | sha256sum | cut -d' ' -f1
	fi
}

# Path to a static busybox binary for ARCH.
busybox_for() {
	local arch=$1 dir lock_fd work deb
	if [[ $arch == "$(dpkg --print-architecture)" ]] \
		&& [[ $(dpkg-query -W -f='${db:Status-Status}' busybox-static 2>/dev/null) == installed ]] \
		&& [[ -x /bin/busybox ]]; then
		printf '%s\n' /bin/busybox
		return 0
	fi
	dir=$CACHE_ROOT/busybox/$arch
	if [[ -x $dir/busybox ]]; then
		printf '%s\n' "$dir/busybox"
		return 0
	fi
	mkdir -p "$dir"
	exec {lock_fd}>"$dir/.lock"
	flock "$lock_fd"
	if [[ ! -x $dir/busybox ]]; then
		"$SCRIPT_DIR/deps.sh" "$arch"
		work=$(mktemp -d "$dir/.tmp.XXXXXX")
		WORK_DIRS+=("$work")
		log "downloading busybox-static:$arch"
		(cd "$work" && apt-get -q -o APT::Sandbox::User=root download "busybox-static:$arch" >&2) \
			|| die "cannot download busybox-static:$arch"
		deb=$(find "$work" -maxdepth 1 -name '*.deb' -print -quit)
		[[ -n $deb ]] || die "apt-get download produced no busybox-static .deb"
		dpkg -x "$deb" "$work/root"
		[[ -f $work/root/bin/busybox ]] || die "busybox-static:$arch has no bin/busybox"
		dpkg-deb -f "$deb" Version >"$dir/version"
		install -m 0755 "$work/root/bin/busybox" "$dir/busybox.tmp"
		mv -f "$dir/busybox.tmp" "$dir/busybox"
		rm -rf "$work"
	fi
	exec {lock_fd}>&-
	printf '%s\n' "$dir/busybox"
}

# Resolve module names against modules.dep. Prints, in load order, one line
# per module file ("<relpath>"), plus "BUILTIN <name>" / "MISSING <name>".
resolve_modules() {
	local moddir=$1
	shift
	awk -v want="$*" '
		function norm(p, b) {
			b = p; sub(/.*\//, "", b); sub(/\.ko(\.(xz|zst|gz))?$/, "", b)
			gsub(/-/, "_", b); return b
		}
		function emit(p) { if (!(p in seen)) { seen[p] = 1; print p } }
		FNR == NR { builtin[norm($0)] = 1; next }
		{
			key = $1; sub(/:$/, "", key); n = norm(key)
			path[n] = key; deps[n] = ""
			for (i = 2; i <= NF; i++) deps[n] = deps[n] " " $i
		}
		END {
			nw = split(want, w, " ")
			for (i = 1; i <= nw; i++) {
				m = w[i]; gsub(/-/, "_", m)
				if (m in path) {
					nd = split(deps[m], d, " ")
					for (j = nd; j >= 1; j--) emit(d[j])
					emit(path[m])
				} else if (m in builtin) {
					print "BUILTIN " w[i]
				} else {
					print "MISSING " w[i]
				}
			}
		}' "$moddir/modules.builtin" "$moddir/modules.dep"
}

# Copy one module into the image, decompressing if needed; prints its new
# path relative to the modules directory.
copy_module() {
	local src_dir=$1 dst_dir=$2 rel=$3 out
	out=${rel%.xz}
	out=${out%.zst}
	out=${out%.gz}
	mkdir -p "$dst_dir/$(dirname "$out")"
	case "$rel" in
	*.ko) cp "$src_dir/$rel" "$dst_dir/$out" ;;
	*.ko.xz) xz -dc "$src_dir/$rel" >"$dst_dir/$out" || die "cannot decompress $rel (install xz-utils)" ;;
	*.ko.zst) zstd -qdc "$src_dir/$rel" >"$dst_dir/$out" || die "cannot decompress $rel (install zstd)" ;;
	*.ko.gz) gzip -dc "$src_dir/$rel" >"$dst_dir/$out" ;;
	*) die "unexpected module file name: $rel" ;;
	esac
	printf '%s\n' "$out"
}

host_arch() { dpkg --print-architecture; }

is_elf() { [[ $(head -c 4 -- "$1" 2>/dev/null) == $'\x7fELF' ]]; }

# Resolve --binary arguments into BINARY_FILES: absolute host paths of each
# program and of every shared object `ldd` reports for it (the dynamic loader
# included), each once. Runs in the calling shell, so errors end the build.
BINARY_FILES=()
binary_closure() {
	local name path out lib
	local -A seen=()
	local -a libs
	for name in "$@"; do
		if [[ $name == /* ]]; then
			path=$name
		else
			path=$(command -v -- "$name" 2>/dev/null) \
				|| die "--binary $name: no such program on the host (install its package: GUEST_HOST_PACKAGES, images/deps.sh --package)"
			[[ $path == /* ]] || die "--binary $name: '$path' is a shell builtin or function, not a program"
		fi
		[[ -f $path && -x $path ]] || die "--binary $name: $path is not an executable file"
		is_elf "$path" || die "--binary $name: $path is not an ELF binary (copy scripts and their interpreter with --file)"
		libs=()
		# ldd exits 1 for static binaries ("not a dynamic executable").
		out=$(LC_ALL=C ldd -- "$path" 2>&1) || true
		if [[ $out != *"not a dynamic executable"* && $out != *"statically linked"* ]]; then
			mapfile -t libs < <(awk '
				$2 == "=>" && $3 == "not" { print "MISSING " $1; next }
				$2 == "=>" && $3 ~ /^\// { print $3; next }
				$1 ~ /^\// { print $1 }
			' <<<"$out")
		fi
		for lib in "$path" "${libs[@]}"; do
			[[ $lib != "MISSING "* ]] || die "--binary $name: ldd cannot find ${lib#MISSING } for $path"
			[[ -f $lib ]] || die "--binary $name: ldd names $lib, which is not a file"
			[[ -z ${seen[$lib]:-} ]] || continue
			seen[$lib]=1
			BINARY_FILES+=("$lib")
		done
	done
}

write_init() {
	cat >"$1" <<'EOF'
#!/bin/busybox sh
# /init of a dpu-agent guest image (generated by images/build-initramfs.sh).
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /root /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
hostname guest

result() {
	if [ "$1" -eq 0 ]; then
		echo "GUEST-RESULT: PASS"
	else
		echo "GUEST-RESULT: FAIL rc=$1"
	fi
	sync
	poweroff -f
	sleep 60
	exit "$1"
}

setup_failed() {
	echo "guest-init: setup failed: $2"
	result "$1"
}

release=$(uname -r)
echo "guest-init: kernel $release on $(uname -m)"
[ "$release" = "$(cat /etc/guest/release)" ] \
	|| setup_failed 200 "image built for kernel $(cat /etc/guest/release), booted $release"

while read -r mod; do
	[ -n "$mod" ] || continue
	name=$(basename "$mod" .ko | tr - _)
	[ -d "/sys/module/$name" ] && continue
	insmod "/lib/modules/$release/$mod" || setup_failed 201 "cannot load module $mod"
done </etc/guest/modules

i=0
while [ ! -e /sys/class/net/eth0 ]; do
	i=$((i + 1))
	[ "$i" -le 100 ] || setup_failed 202 "no eth0 (is the NIC a virtio-net-pci device?)"
	sleep 0.1
done
ip link set lo up
ip link set eth0 up &&
	ip addr add 10.0.2.15/24 dev eth0 &&
	ip route add default via 10.0.2.2 ||
	setup_failed 203 "cannot configure eth0"

# A test that needs a full init (systemd) carries its root file system as /guest/rootfs.tar
# (images/systemd-rootfs.sh): unpack it into a tmpfs, bring /guest along, and hand PID 1 over to its init. The
# modules loaded and eth0 stay as set up above.
if [ -f /guest/rootfs.tar ]; then
	echo "guest-init: unpacking /guest/rootfs.tar, then switching to its init"
	mkdir -p /sysroot
	mount -t tmpfs -o mode=0755 tmpfs /sysroot || setup_failed 204 "cannot mount the root tmpfs"
	tar -xf /guest/rootfs.tar -C /sysroot || setup_failed 204 "cannot unpack /guest/rootfs.tar"
	rm /guest/rootfs.tar
	cp -a /guest /sysroot/guest
	umount /tmp /dev/shm /dev/pts 2>/dev/null
	umount /run
	for m in dev proc sys; do
		mount --move "/$m" "/sysroot/$m" || setup_failed 204 "cannot move /$m"
	done
	exec switch_root /sysroot /sbin/init
fi

echo "guest-init: running /guest/run.sh"
(
	cd /
	. /guest/lib.sh
	. /guest/run.sh
)
result $?
EOF
	chmod 0755 "$1"
}

write_lib() {
	cat >"$1" <<'EOF'
# Helpers available to every guest script (sourced before /guest/run.sh).

# Tell the host the guest is ready for host-side checks.
guest_ready() { echo "GUEST-READY"; }

# Fail the test with a message.
guest_fail() {
	echo "guest: FAIL: $*"
	exit 1
}

# guest_wait_listen PORT [TIMEOUT_S]: wait until a TCP socket listens on PORT.
guest_wait_listen() {
	_port=$(printf '%04X' "$1")
	_left=$((${2:-60} * 10))
	while [ "$_left" -gt 0 ]; do
		if cat /proc/net/tcp /proc/net/tcp6 2>/dev/null |
			awk -v p=":$_port" '$4 == "0A" && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }'; then
			return 0
		fi
		_left=$((_left - 1))
		sleep 0.1
	done
	return 1
}

# guest_module_loaded NAME: is module NAME (or built-in NAME) present?
guest_module_loaded() {
	[ -d "/sys/module/$(echo "$1" | tr - _)" ]
}
EOF
}

prune_cache() { # dir [image to keep]
	local dir=$1 keep=${2:-}
	find "$dir" -maxdepth 1 -name '*.cpio' -printf '%T@ %p\n' | sort -rn \
		| tail -n "+$((KEEP_IMAGES + 1))" | cut -d' ' -f2- | xargs -r rm -f
	# Newest first; once the running total passes the cap, drop the rest.
	find "$dir" -maxdepth 1 -name '*.cpio' -printf '%T@ %s %p\n' | sort -rn \
		| awk -v cap=$((KEEP_MIB * 1048576)) -v keep="$keep" '
			{ p = $0; sub(/^[^ ]+ [^ ]+ /, "", p); total += $2 }
			total > cap && p != keep { print p }' \
		| xargs -r -d '\n' rm -f
	find "$dir" -maxdepth 1 -name '.tmp.*' -mmin +60 -exec rm -rf {} + 2>/dev/null || true
}

main() {
	local arch="" kernel_dir="" script="" out=""
	local -a modules=() files=() binaries=()
	while (($#)); do
		case "$1" in
		--arch) arch=${2:?--arch needs a value}; shift 2 ;;
		--kernel) kernel_dir=${2:?--kernel needs a value}; shift 2 ;;
		--module)
			local -a names
			read -ra names <<<"${2//,/ }"
			modules+=("${names[@]}")
			shift 2
			;;
		--file) files+=("${2:?--file needs SRC:DST}"); shift 2 ;;
		--binary)
			local -a progs
			read -ra progs <<<"${2:?--binary needs a program}"
			read -ra progs <<<"${progs[*]//,/ }"
			binaries+=("${progs[@]}")
			shift 2
			;;
		--script) script=${2:?--script needs a value}; shift 2 ;;
		--out) out=${2:?--out needs a value}; shift 2 ;;
		-h | --help) usage ;;
		*) die "unknown argument '$1' (see --help)" ;;
		esac
	done
	case "$arch" in
	arm64 | amd64) ;;
	"") die "--arch is required (arm64 or amd64)" ;;
	*) die "unsupported architecture '$arch' (expected arm64 or amd64)" ;;
	esac
	[[ -z $script || -f $script ]] || die "guest script not found: $script"

	if [[ -z $kernel_dir ]]; then
		kernel_dir=$("$SCRIPT_DIR/fetch-kernel.sh" "$arch")
	fi
	[[ -f $kernel_dir/env ]] || die "no env file in kernel dir '$kernel_dir' (run images/fetch-kernel.sh $arch)"
	local ARCH="" RELEASE="" VERSION="" MODULES=""
	# shellcheck source=/dev/null
	source "$kernel_dir/env"
	[[ $ARCH == "$arch" ]] || die "kernel in $kernel_dir is for $ARCH, not $arch"
	[[ -f $MODULES/modules.dep ]] || die "missing $MODULES/modules.dep"

	# Resolve modules first: cheap, and part of the cache key.
	local -a mod_paths=()
	local line
	while IFS= read -r line; do
		case "$line" in
		"BUILTIN "*) ;;
		"MISSING "*) die "kernel $RELEASE has no module '${line#MISSING }' (neither loadable nor built in)" ;;
		*) mod_paths+=("$line") ;;
		esac
	done < <(resolve_modules "$MODULES" "${BASE_MODULES[@]}" "${modules[@]}")

	# Validate extra files.
	local spec src dst
	local -a file_src=() file_dst=()
	for spec in "${files[@]}"; do
		[[ $spec == *:* ]] || die "--file '$spec' is not SRC:DST"
		src=${spec%:*}
		dst=${spec##*:}
		[[ -e $src ]] || die "--file source not found: $src"
		[[ $dst == /* ]] || die "--file destination must be absolute: $dst"
		[[ /$dst/ != */../* ]] || die "--file destination must not contain '..': $dst"
		[[ $dst == */ ]] && dst=$dst$(basename "$src")
		file_src+=("$src")
		file_dst+=("$dst")
	done

	# Host programs and their libraries (same architecture only).
	if ((${#binaries[@]})); then
		local host
		host=$(host_arch)
		[[ $arch == "$host" ]] \
			|| die "--binary ${binaries[*]}: host programs can only go into a guest of the host's architecture ($host); this image is $arch"
		binary_closure "${binaries[@]}"
	fi

	local busybox
	busybox=$(busybox_for "$arch")

	# Cache key: everything that ends up in the image.
	local key i
	key=$(
		printf 'builder %s\n' "$(sha_of "${BASH_SOURCE[0]}")"
		printf 'kernel %s %s %s\n' "$ARCH" "$RELEASE" "$VERSION"
		printf 'busybox %s\n' "$(sha_of "$busybox")"
		printf 'module %s\n' "${mod_paths[@]}"
		for i in "${!file_src[@]}"; do
			printf 'file %s %s\n' "${file_dst[$i]}" "$(tree_hash "${file_src[$i]}")"
		done
		for i in "${BINARY_FILES[@]}"; do
			printf 'binary %s %s\n' "$i" "$(sha_of "$i")"
		done
		if [[ -n $script ]]; then printf 'script %s\n' "$(sha_of "$script")"; fi
	)
	key=$(printf '%s' "$key" | sha256sum | cut -c1-16)

	local cache_dir=$CACHE_ROOT/initramfs
	if [[ -z $out ]]; then
		out=$cache_dir/$arch-$RELEASE-$key.cpio
		if [[ -s $out ]]; then
			touch "$out"
			printf '%s\n' "$out"
			return 0
		fi
		mkdir -p "$cache_dir"
	fi
	mkdir -p "$(dirname "$out")"

	local work stage
	work=$(mktemp -d "$(dirname "$out")/.tmp.XXXXXX")
	WORK_DIRS+=("$work")
	stage=$work/root
	mkdir -p "$stage"/{bin,dev,etc/guest,guest,lib/modules,proc,root,run,sbin,sys,tmp,usr/bin,usr/sbin,usr/lib}
	chmod 1777 "$stage/tmp"
	install -m 0755 "$busybox" "$stage/bin/busybox"
	ln -s busybox "$stage/bin/sh"
	if [[ $(id -u) -eq 0 ]]; then
		mknod -m 0600 "$stage/dev/console" c 5 1
	fi

	# Modules, with a modules.dep for just these.
	local moddst=$stage/lib/modules/$RELEASE
	mkdir -p "$moddst"
	local -a load_order=()
	for line in "${mod_paths[@]}"; do
		load_order+=("$(copy_module "$MODULES" "$moddst" "$line")")
	done
	cp "$MODULES/modules.builtin" "$moddst/"
	if [[ -f $MODULES/modules.builtin.modinfo ]]; then
		cp "$MODULES/modules.builtin.modinfo" "$moddst/"
	fi
	if ((${#load_order[@]})); then printf '%s\n' "${load_order[@]}"; fi >"$moddst/modules.order"
	ln -s ../../lib/modules "$stage/usr/lib/modules"
	depmod -b "$stage" "$RELEASE"
	printf '%s\n' "${load_order[@]}" >"$stage/etc/guest/modules"
	printf '%s\n' "$RELEASE" >"$stage/etc/guest/release"

	# Minimal /etc for programs that look up users, hosts or DNS.
	printf 'root:x:0:0:root:/root:/bin/sh\n' >"$stage/etc/passwd"
	printf 'root:x:0:\n' >"$stage/etc/group"
	printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n10.0.2.15\tguest\n' >"$stage/etc/hosts"
	printf 'nameserver 10.0.2.3\n' >"$stage/etc/resolv.conf"

	write_init "$stage/init"
	write_lib "$stage/guest/lib.sh"
	if [[ -n $script ]]; then
		install -m 0755 "$script" "$stage/guest/run.sh"
	else
		printf '# no guest script given\n' >"$stage/guest/run.sh"
	fi

	# Programs and libraries at their host paths; /init's `busybox --install -s`
	# leaves existing files alone, so these win over same-named applets.
	for i in "${BINARY_FILES[@]}"; do
		dst=$stage$i
		[[ ! -L $(dirname "$dst") ]] || die "cannot install $i: $(dirname "$i") is a symlink in the image"
		mkdir -p "$(dirname "$dst")"
		cp -L --preserve=mode "$i" "$dst"
	done

	for i in "${!file_src[@]}"; do
		dst=$stage${file_dst[$i]}
		mkdir -p "$(dirname "$dst")"
		if [[ -d ${file_src[$i]} ]]; then
			mkdir -p "$dst"
			cp -a "${file_src[$i]}/." "$dst/"
		else
			cp -L --preserve=mode "${file_src[$i]}" "$dst"
		fi
	done

	(cd "$stage" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
		| cpio --null -o -H newc -R 0:0 --quiet) >"$work/image.cpio" \
		|| die "cpio failed"
	mv -f "$work/image.cpio" "$out"
	rm -rf "$work"
	log "built $(basename "$out") ($(du -h "$out" | cut -f1), ${#load_order[@]} modules${BINARY_FILES[0]:+, ${#BINARY_FILES[@]} host programs and libraries})"
	if [[ $out == "$cache_dir"/* ]]; then
		prune_cache "$cache_dir" "$out"
	fi
	printf '%s\n' "$out"
}

main "$@"
