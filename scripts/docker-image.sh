#!/usr/bin/env bash
# Builds the `warbler:latest` image without pulling anything: a minimal Debian base made with
# debootstrap (once, tagged debian:bookworm-slim) and the binary built on this host.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
BASE="${RUNTIME_IMAGE:-debian:bookworm-slim}"
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
    rootfs=$(mktemp -d)
    echo "making base image $BASE with debootstrap (a few minutes)" >&2
    debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import - "$BASE"
    rm -rf "$rootfs"
fi
cargo build --release --workspace --bin warbler
ctx=$(mktemp -d)
cp "$CARGO_TARGET_DIR/release/warbler" deploy/docker/runtime-setup.sh deploy/docker/Dockerfile.prebuilt "$ctx/"
docker build -q -f "$ctx/Dockerfile.prebuilt" --build-arg RUNTIME_IMAGE="$BASE" -t warbler:latest "$ctx"
rm -rf "$ctx"
echo "built warbler:latest" >&2
