# shellcheck shell=bash
# Host-side helper of tests/guest/fabric.sh: Debian's arm64 iproute2 (ip, tc, devlink) with the shared
# libraries they need and the dynamic loader, as a directory tree for the arm64 guest image. The guest runs them
# as /opt/iproute2/{ip,tc,devlink} with LD_LIBRARY_PATH=/opt/iproute2/lib; busybox's own `ip` stays untouched.
#
# fabric_iproute2_tree: prints the tree's path. Built once per iproute2 version under
# ${DPU_CACHE:-$HOME/.cache/dpu-agent}/fabric/ (apt-get download + dpkg -x; the library closure is resolved
# with aarch64 readelf over the extracted packages).

fabric_iproute2_log() { printf 'fabric: %s\n' "$*" >&2; }

fabric_iproute2_tree() {
	local cache=${DPU_CACHE:-$HOME/.cache/dpu-agent}/fabric version out work deb
	version=$(apt-cache policy iproute2:arm64 | awk '/Candidate:/ { print $2 }')
	[[ -n $version && $version != "(none)" ]] || {
		fabric_iproute2_log "iproute2:arm64 is unknown to apt (dpkg --add-architecture arm64; apt-get update)"
		return 1
	}
	out=$cache/iproute2-arm64-$version
	if [[ -x $out/ip && -x $out/tc && -x $out/devlink && -e $out/lib/ld-linux-aarch64.so.1 ]]; then
		printf '%s\n' "$out"
		return 0
	fi
	command -v aarch64-linux-gnu-readelf >/dev/null || {
		fabric_iproute2_log "aarch64-linux-gnu-readelf is missing (binutils-aarch64-linux-gnu)"
		return 1
	}
	mkdir -p "$cache"
	work=$(mktemp -d "$cache/.iproute2.XXXXXX")
	fabric_iproute2_log "downloading iproute2:arm64 $version and its libraries"
	# iproute2's library dependencies and theirs (Debian 12).
	local -a packages=(iproute2 libbpf1 libbsd0 libc6 libcap2 libdb5.3 libelf1 libmnl0 libselinux1 libtirpc3
		libxtables12 zlib1g libmd0 libpcre2-8-0 libzstd1 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libcom-err2
		libkrb5support0 libkeyutils1)
	(cd "$work" && apt-get -q -o APT::Sandbox::User=root download "${packages[@]/%/:arm64}" >&2) || {
		rm -rf "$work"
		return 1
	}
	mkdir -p "$work/root" "$work/out/lib"
	for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/root"; done
	cp "$work/root/sbin/tc" "$work/out/tc"
	cp "$work/root/bin/ip" "$work/out/ip"
	cp "$work/root/sbin/devlink" "$work/out/devlink"
	# The closure of NEEDED libraries, looked up in the extracted multiarch directories.
	local -a queue=("$work/out/ip" "$work/out/tc" "$work/out/devlink")
	local -A seen=()
	local f lib path
	while ((${#queue[@]})); do
		f=${queue[0]}
		queue=("${queue[@]:1}")
		while read -r lib; do
			[[ -n $lib && -z ${seen[$lib]:-} ]] || continue
			seen[$lib]=1
			path=""
			for dir in lib/aarch64-linux-gnu usr/lib/aarch64-linux-gnu lib; do
				[[ -e $work/root/$dir/$lib ]] && path=$work/root/$dir/$lib && break
			done
			[[ -n $path ]] || {
				fabric_iproute2_log "library $lib (needed by $(basename "$f")) is in none of the downloaded packages"
				rm -rf "$work"
				return 1
			}
			cp -L "$path" "$work/out/lib/$lib"
			queue+=("$work/out/lib/$lib")
		done < <(aarch64-linux-gnu-readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
	done
	[[ -e $work/out/lib/ld-linux-aarch64.so.1 ]] \
		|| cp -L "$work/root/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1" "$work/out/lib/"
	rm -rf "$out"
	mv "$work/out" "$out"
	rm -rf "$work"
	printf '%s\n' "$out"
}
