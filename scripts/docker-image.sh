#!/usr/bin/env bash
# Builds the `warbler:latest` image without pulling anything.
#
# 1. A Debian base (`warbler-base:<codename>`, made once): debootstrap --variant=minbase of
#    this host's release, from the Debian mirror this machine's apt already uses (read from
#    /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list; override with DEBIAN_MIRROR).
# 2. The release binary built on this host, its debug symbols split off into
#    $CARGO_TARGET_DIR/release/warbler.debug (kept for profiling, not shipped).
# 3. deploy/docker/Dockerfile.prebuilt: an image FROM scratch holding the stripped binary, the
#    shared libraries it links (taken from the base, so they match the binary's glibc), and a
#    non-root user; its size is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh

# The first Debian mirror apt is configured with (deb822 or one-line format).
apt_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/ && $i !~ /security/) { print $i; exit } }' "$f")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
}

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
BASE="${RUNTIME_IMAGE:-warbler-base:$codename}"
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    mirror="${DEBIAN_MIRROR:-$(apt_mirror)}"
    [ -n "$mirror" ] || { echo "no Debian mirror found in this machine's apt configuration; set DEBIAN_MIRROR=<url of a Debian mirror>" >&2; exit 1; }
    command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
    rootfs=$(mktemp -d)
    echo "making base image $BASE with debootstrap from apt's mirror (a few minutes)" >&2
    debootstrap --variant=minbase "$codename" "$rootfs" "$mirror" >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
    rm -rf "$rootfs"
fi

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release --workspace --bin warbler
fi
bin="$CARGO_TARGET_DIR/release/warbler"
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
# Ship the code, keep the symbols: `gdb`/`perf` find warbler.debug through the debug link.
objcopy --only-keep-debug "$bin" "$CARGO_TARGET_DIR/release/warbler.debug"
objcopy --strip-debug --strip-unneeded --add-gnu-debuglink="$CARGO_TARGET_DIR/release/warbler.debug" "$bin" "$ctx/warbler"
cp deploy/docker/runtime-setup.sh deploy/docker/Dockerfile.prebuilt "$ctx/"
docker build -q -f "$ctx/Dockerfile.prebuilt" --build-arg RUNTIME_IMAGE="$BASE" -t warbler:latest "$ctx" >/dev/null
# The build stage's image is of no further use.
docker image prune -f --filter label=warbler.stage=rootfs >/dev/null
size=$(docker image inspect warbler:latest --format '{{.Size}}')
echo "built warbler:latest: $((size / 1000000)) MB (binary $(($(stat -c %s "$ctx/warbler") / 1000000)) MB; symbols in $CARGO_TARGET_DIR/release/warbler.debug)" >&2
