#!/bin/sh
# Shared by both Dockerfiles. Runs in the Debian build stage and assembles /rootfs, the whole
# final image but the binary: the shared libraries /usr/local/bin/warbler links (so they match
# its glibc), an unprivileged user (uid 10001), the data directory it owns, and /tmp.
set -eu
bin=/usr/local/bin/warbler
mkdir -p /rootfs/etc /rootfs/tmp /rootfs/var/lib/warbler /rootfs/usr/local/bin
chmod 1777 /rootfs/tmp
# Every library the dynamic loader resolves for the binary, and the loader itself.
ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u |
while read -r lib; do
    cp -L --parents "$lib" /rootfs/
done
printf 'root:x:0:0:root:/root:/sbin/nologin\nwarbler:x:10001:10001:warbler:/var/lib/warbler:/sbin/nologin\n' > /rootfs/etc/passwd
printf 'root:x:0:\nwarbler:x:10001:\n' > /rootfs/etc/group
printf 'hosts: files dns\n' > /rootfs/etc/nsswitch.conf
chown 10001:10001 /rootfs/var/lib/warbler
chmod 0700 /rootfs/var/lib/warbler
