#!/usr/bin/env bash
# Build the lazy-image test image: a realistic multi-layer OCI image of a small
# Python service on Debian 12, built offline from the Debian archive, and cache it.
#
# Usage: images/test-image.sh [--force]
#
#   --force   rebuild even when the cached image matches the recipe
#
# Prints the cache directory on stdout (and a summary of the image on stderr):
#
#   ${DPU_CACHE:-$HOME/.cache/dpu-agent}/images/test-image/
#       oci/           OCI image layout holding one image, tag app:1
#                      (skopeo: oci:<dir>/oci:app:1)
#       env            sourceable: OCI_DIR= OCI_TAG= LAYERS= COMPRESSED_BYTES=
#                      UNPACKED_BYTES= LAYER_SIZES= START_CMD= READY_RE=
#                      CONFIG_VERSION= WHITEOUTS= UNTOUCHED_FILE= UNTOUCHED_BYTES=
#       recipe.sha256  hash of the recipe the image was built from
#
# The image (linux/amd64, bookworm, from the archive apt is configured with):
#
#   layer 1  base     mmdebstrap --variant=minbase
#   layer 2  python   + python3, python3-yaml, -requests, -jinja2, -pygments
#   layer 3  app      + python3-numpy, -cryptography, -lxml, -dateutil, and
#                     /app: start.py (the start-up workload), config.yaml,
#                     templates/, data/*.json, data/stale.txt and
#                     assets/weights.bin (24 MiB of seeded random bytes that the
#                     workload never reads)
#   layer 4  cleanup  deletes /etc/motd and /usr/share/doc/apt (layer 1) and
#                     /app/data/stale.txt (layer 3): whiteouts; replaces
#                     /app/config.yaml (version 2)
#
# `/usr/bin/python3 /app/start.py` imports ~60 stdlib and third-party modules,
# reads the configuration and the data files, renders a template, and prints
#     READY <modules in sys.modules> config=2 files=24 ...
#
# Each layer is built the way an image build does it: umoci unpacks the image
# so far into a bundle, the rootfs is brought to the next state (the stage's
# mmdebstrap tarball, or edits), and `umoci repack` stores the difference as a
# new layer. The package stages run mmdebstrap with cumulative package lists;
# downloaded .debs are shared between them. SOURCE_DATE_EPOCH fixes times, so
# rebuilds differ only where the archive has moved on.
#
# The build runs only when the cache is missing, --force is given, or the
# recipe (package lists, app files, build steps) changed: its hash is compared
# with recipe.sha256. A cold build takes 2-4 minutes on 2 shared cores; the
# result is ~145 MiB compressed, ~350 MiB unpacked.
#
# Needs root (mmdebstrap --mode=root, umoci without --rootless). Installs
# mmdebstrap, umoci, skopeo, erofs-utils and docker-registry when missing
# (images/deps.sh). Environment: DPU_CACHE; DPU_DEBIAN_MIRROR to use another
# mirror than mmdebstrap's default (deb.debian.org and its security archive).
set -euo pipefail
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
CACHE_ROOT=$(realpath -m "${DPU_CACHE:-$HOME/.cache/dpu-agent}")
readonly CACHE_ROOT
readonly BASE=$CACHE_ROOT/images/test-image

# ---- the recipe (everything here is hashed into recipe.sha256) -------------
readonly RECIPE_VERSION=1
readonly SUITE=bookworm
readonly EPOCH=1735689600 # 2025-01-01T00:00:00Z
readonly TAG=app:1
readonly MIRROR=${DPU_DEBIAN_MIRROR:-}
readonly PY_PACKAGES=python3,python3-yaml,python3-requests,python3-jinja2,python3-pygments
readonly APP_PACKAGES=python3-numpy,python3-cryptography,python3-lxml,python3-dateutil
readonly WHITEOUTS="/etc/motd /usr/share/doc/apt /app/data/stale.txt"
readonly UNTOUCHED_FILE=/app/assets/weights.bin
readonly UNTOUCHED_BYTES=$((24 << 20))
readonly DATA_FILES=24
readonly CONFIG_VERSION=2
readonly START_CMD="/usr/bin/python3 /app/start.py"
readonly READY_RE='^READY [0-9]+ '

WORK_DIRS=()
cleanup() { ((${#WORK_DIRS[@]} == 0)) || rm -rf "${WORK_DIRS[@]}"; }
trap cleanup EXIT

log() { printf 'test-image: %s\n' "$*" >&2; }
die() { printf 'test-image: error: %s\n' "$*" >&2; exit 1; }

usage() {
	sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
	exit 2
}

iso_epoch() { date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ; }

# The start-up workload and its files, as of layer 3.
write_app() { # rootfs
	local root=$1
	mkdir -p "$root/app/data" "$root/app/templates" "$root/app/assets"
	cat >"$root/app/start.py" <<'PY'
#!/usr/bin/python3
"""Start-up workload: import what a small service imports, read its configuration and data files, render a
template, do a little arithmetic, then print one line:

    READY <modules in sys.modules> config=<version> files=<data files read> items=<n> mean=<x> t=<seconds>s
"""
import importlib
import json
import os
import sys
import time

T0 = time.monotonic()
MODULES = [
    # standard library
    "argparse", "asyncio", "base64", "collections", "concurrent.futures", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "email.message", "email.parser", "functools", "gzip", "hashlib",
    "hmac", "html.parser", "http.client", "http.server", "inspect", "ipaddress", "logging.handlers",
    "multiprocessing", "pathlib", "pickle", "platform", "queue", "random", "secrets", "shutil", "socket",
    "sqlite3", "ssl", "statistics", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile",
    # third party (Debian packages)
    "yaml", "requests", "jinja2", "pygments", "pygments.lexers", "pygments.formatters", "numpy",
    "cryptography.fernet", "cryptography.hazmat.primitives.hashes", "lxml.etree", "dateutil.parser",
]


def main():
    for name in MODULES:
        importlib.import_module(name)
    import hashlib

    import dateutil.parser
    import jinja2
    import numpy
    import yaml

    with open("/app/config.yaml") as f:
        config = yaml.safe_load(f)
    items, files = [], 0
    for name in sorted(os.listdir(config["data_dir"])):
        if name.endswith(".json"):
            with open(os.path.join(config["data_dir"], name)) as f:
                items.extend(json.load(f)["items"])
            files += 1
    with open("/app/templates/index.html") as f:
        page = jinja2.Template(f.read()).render(service=config["service"], items=items[:20])
    values = numpy.array([item["value"] for item in items], dtype=float)
    newest = max(dateutil.parser.isoparse(item["updated"]) for item in items)
    digest = hashlib.sha256(page.encode()).hexdigest()[:12]
    print(f"READY {len(sys.modules)} config={config['version']} files={files} items={len(items)} "
          f"mean={values.mean():.3f} newest={newest.date()} page={digest} t={time.monotonic() - T0:.2f}s",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
PY
	chmod 0755 "$root/app/start.py"
	cat >"$root/app/config.yaml" <<'YAML'
version: 1
service: catalog
data_dir: /app/data
listen: 0.0.0.0:8080
YAML
	cat >"$root/app/templates/index.html" <<'HTML'
<!doctype html>
<title>{{ service }}</title>
<ul>
{% for item in items %}  <li>{{ item.name }}: {{ "%.2f"|format(item.value) }} ({{ item.updated }})</li>
{% endfor %}</ul>
HTML
	printf 'left over from an earlier build; removed by the top layer\n' >"$root/app/data/stale.txt"
	python3 - "$root/app" "$DATA_FILES" "$UNTOUCHED_BYTES" <<'PY'
import json, random, sys
app, files, big = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(20250101)
for i in range(files):
    items = [{"name": f"item-{i:02d}-{j:03d}", "value": rng.uniform(0, 100),
              "updated": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T12:00:00Z",
              "tags": [rng.choice("abcdefgh") * rng.randint(1, 8) for _ in range(4)]} for j in range(150)]
    with open(f"{app}/data/items-{i:02d}.json", "w") as f:
        json.dump({"items": items}, f, indent=1)
with open(f"{app}/assets/weights.bin", "wb") as f:
    f.write(random.Random(7).randbytes(big))
PY
}

# Layer 4's edits: delete files of lower layers, replace the configuration.
edit_cleanup() { # rootfs
	local root=$1 path
	for path in $WHITEOUTS; do
		[[ -e $root$path ]] || die "layer 4 should delete $path, which the lower layers do not have"
		rm -rf "${root:?}$path"
		touch -d "@$EPOCH" "$(dirname "$root$path")"
	done
	sed -i "s/^version: .*/version: $CONFIG_VERSION/" "$root/app/config.yaml"
	printf 'log_level: info\n' >>"$root/app/config.yaml"
}

# One package stage: a fresh mmdebstrap tarball with the cumulative package
# list replaces the rootfs.
mmdebstrap_stage() { # rootfs debs-dir work-dir include
	local root=$1 debs=$2 work=$3 include=$4
	# shellcheck disable=SC2016 # "$1" in the setup hook is mmdebstrap's to expand
	local -a cmd=(
		mmdebstrap --variant=minbase --mode=root --format=tar
		# As the host's apt is configured: mirrors may serve snapshots whose Release files have expired.
		--aptopt='Acquire::Check-Valid-Until "false"'
		--skip=output/dev --skip=essential/unlink
		--setup-hook='mkdir -p "$1"/var/cache/apt/archives/'
		--setup-hook="sync-in $debs /var/cache/apt/archives/"
		--customize-hook="sync-out /var/cache/apt/archives $debs"
	)
	[[ -z $include ]] || cmd+=(--include="$include")
	cmd+=("$SUITE" "$work/stage.tar")
	[[ -z $MIRROR ]] || cmd+=("$MIRROR")
	SOURCE_DATE_EPOCH=$EPOCH "${cmd[@]}" >&2 || die "mmdebstrap failed (include: ${include:-none})"
	find "$root" -mindepth 1 -delete
	tar --numeric-owner --xattrs --xattrs-include='*' -xpf "$work/stage.tar" -C "$root"
	rm -f "$work/stage.tar"
	# --skip=output/dev leaves out /dev itself too; an image has the empty mount point.
	# shellcheck disable=SC2174 # the root exists: -m applies to dev
	mkdir -p -m 0755 "$root/dev"
	touch -d "@$EPOCH" "$root/dev"
}

repack() { # oci bundle created-by
	umoci repack --refresh-bundle --image "$1:$TAG" \
		--history.created "$(iso_epoch)" --history.author dpu-agent \
		--history.created_by "$3" "$2"
}

build_image() { # out-dir work-dir
	local out=$1 work=$2 oci=$1/oci bundle=$2/bundle debs=$2/debs t0
	mkdir -p "$debs"
	umoci init --layout "$oci"
	umoci new --image "$oci:$TAG"
	umoci unpack --image "$oci:$TAG" "$bundle" >/dev/null

	t0=$SECONDS
	log "layer 1/4: mmdebstrap --variant=minbase $SUITE"
	mmdebstrap_stage "$bundle/rootfs" "$debs" "$work" ""
	repack "$oci" "$bundle" "mmdebstrap --variant=minbase $SUITE"
	log "layer 1/4 done ($((SECONDS - t0)) s)"

	t0=$SECONDS
	log "layer 2/4: + ${PY_PACKAGES//,/ }"
	mmdebstrap_stage "$bundle/rootfs" "$debs" "$work" "$PY_PACKAGES"
	repack "$oci" "$bundle" "apt-get install ${PY_PACKAGES//,/ }"
	log "layer 2/4 done ($((SECONDS - t0)) s)"

	t0=$SECONDS
	log "layer 3/4: + ${APP_PACKAGES//,/ } and /app"
	mmdebstrap_stage "$bundle/rootfs" "$debs" "$work" "$PY_PACKAGES,$APP_PACKAGES"
	write_app "$bundle/rootfs"
	find "$bundle/rootfs/app" -exec touch -h -d "@$EPOCH" {} +
	repack "$oci" "$bundle" "apt-get install ${APP_PACKAGES//,/ }; COPY app /app"
	log "layer 3/4 done ($((SECONDS - t0)) s)"

	log "layer 4/4: rm $WHITEOUTS; new /app/config.yaml"
	edit_cleanup "$bundle/rootfs"
	touch -d "@$EPOCH" "$bundle/rootfs/app/config.yaml" "$bundle/rootfs/app"
	repack "$oci" "$bundle" "rm -rf $WHITEOUTS; COPY config.yaml /app/"

	umoci config --image "$oci:$TAG" --no-history --created "$(iso_epoch)" --author dpu-agent \
		--os linux --architecture amd64 \
		--config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		--config.workingdir /app --config.cmd /usr/bin/python3 --config.cmd /app/start.py
	umoci gc --layout "$oci"
}

recipe_hash() {
	{
		printf '%s\n' "$RECIPE_VERSION" "$SUITE" "$EPOCH" "$TAG" "$MIRROR" "$PY_PACKAGES" "$APP_PACKAGES" \
			"$WHITEOUTS" "$UNTOUCHED_FILE" "$UNTOUCHED_BYTES" "$DATA_FILES" "$CONFIG_VERSION"
		declare -f write_app edit_cleanup mmdebstrap_stage repack build_image
	} | sha256sum | cut -d' ' -f1
}

# Writes the env file: sizes per layer (compressed, and as an uncompressed tar).
write_env() { # out-dir
	local out=$1 sizes
	sizes=$(python3 - "$out/oci" "$TAG" <<'PY'
import gzip, json, os, sys
oci, tag = sys.argv[1], sys.argv[2]
def blob(d):
    return os.path.join(oci, "blobs", *d.split(":", 1))
index = json.load(open(os.path.join(oci, "index.json")))
desc = next(m for m in index["manifests"]
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
manifest = json.load(open(blob(desc["digest"])))
parts = []
for layer in manifest["layers"]:
    n = 0
    with gzip.open(blob(layer["digest"])) as f:
        while chunk := f.read(1 << 20):
            n += len(chunk)
    parts.append(f"{layer['size']}/{n}")
print(" ".join(parts))
PY
)
	local -a layers
	read -ra layers <<<"$sizes"
	local l comp=0 unpacked=0
	for l in "${layers[@]}"; do
		comp=$((comp + ${l%/*}))
		unpacked=$((unpacked + ${l#*/}))
	done
	{
		printf 'OCI_DIR=%q\n' "$BASE/oci"
		printf 'OCI_TAG=%q\n' "$TAG"
		printf 'LAYERS=%q\n' "${#layers[@]}"
		printf 'COMPRESSED_BYTES=%q\n' "$comp"
		printf 'UNPACKED_BYTES=%q\n' "$unpacked"
		printf 'LAYER_SIZES=%q\n' "$sizes"
		printf 'START_CMD=%q\n' "$START_CMD"
		printf 'READY_RE=%q\n' "$READY_RE"
		printf 'CONFIG_VERSION=%q\n' "$CONFIG_VERSION"
		printf 'WHITEOUTS=%q\n' "$WHITEOUTS"
		printf 'UNTOUCHED_FILE=%q\n' "$UNTOUCHED_FILE"
		printf 'UNTOUCHED_BYTES=%q\n' "$UNTOUCHED_BYTES"
	} >"$out/env"
}

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

env_get() { # name: a value from the env file (read in a clean shell: the recipe's names are read-only here)
	# shellcheck disable=SC2016 # expanded by the inner shell
	env -i bash -c 'source "$1" && printf "%s\n" "${!2}"' _ "$BASE/env" "$1"
}

summary() {
	local l i=0
	log "oci:$(env_get OCI_DIR):$(env_get OCI_TAG): $(env_get LAYERS) layers, $(mib "$(env_get COMPRESSED_BYTES)")" \
		"compressed, $(mib "$(env_get UNPACKED_BYTES)") as tar"
	for l in $(env_get LAYER_SIZES); do
		i=$((i + 1))
		log "  layer $i: $(mib "${l%/*}") compressed, $(mib "${l#*/}") as tar"
	done
}

main() {
	local force=0
	while (($#)); do
		case "$1" in
		--force) force=1 ;;
		-h | --help) usage ;;
		*) usage ;;
		esac
		shift
	done

	local want
	want=$(recipe_hash)
	if ((!force)) && [[ -f $BASE/env && $(cat "$BASE/recipe.sha256" 2>/dev/null) == "$want" ]]; then
		summary
		printf '%s\n' "$BASE"
		return 0
	fi

	[[ $(id -u) -eq 0 ]] || die "building the image needs root (mmdebstrap --mode=root, umoci)"
	"$SCRIPT_DIR/deps.sh" --package mmdebstrap,umoci,skopeo,erofs-utils,docker-registry

	mkdir -p "$(dirname "$BASE")"
	local lock_fd
	exec {lock_fd}>"$BASE.lock"
	flock "$lock_fd"
	# Another run may have built it while we waited.
	if ((!force)) && [[ -f $BASE/env && $(cat "$BASE/recipe.sha256" 2>/dev/null) == "$want" ]]; then
		summary
		printf '%s\n' "$BASE"
		return 0
	fi

	# Leftovers of interrupted builds.
	find "$(dirname "$BASE")" -maxdepth 1 -name "$(basename "$BASE").tmp.*" -mmin +60 -exec rm -rf {} + 2>/dev/null || true
	local tmp t0=$SECONDS
	tmp=$(mktemp -d "$BASE.tmp.XXXXXX")
	WORK_DIRS+=("$tmp")
	log "building the test image in $tmp (recipe $want)"
	mkdir -p "$tmp/out" "$tmp/work"
	build_image "$tmp/out" "$tmp/work"
	write_env "$tmp/out"
	printf '%s\n' "$want" >"$tmp/out/recipe.sha256"
	rm -rf "$BASE"
	mv "$tmp/out" "$BASE"
	log "built in $((SECONDS - t0)) s"
	summary
	printf '%s\n' "$BASE"
}

main "$@"
