#!/bin/sh
# Shared by both Dockerfiles: an unprivileged user and the data directory.
set -eu
useradd --system --uid 10001 --home-dir /var/lib/warbler warbler 2>/dev/null || adduser -S -u 10001 warbler
mkdir -p /var/lib/warbler
chown warbler /var/lib/warbler
