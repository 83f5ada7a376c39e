#!/usr/bin/env bash
# End to end through Docker: builds the image (scripts/docker-image.sh), starts the compose
# cluster of deploy/compose as docs/deploy.md says, publishes and receives through it with
# the README's `send` and `listen`, `docker kill`s one node, keeps publishing and receiving,
# checks that every message arrived once, in order, without a gap, then starts the killed
# node again (it must become ready) and tears everything down.
# Skipped, with the reason, where Docker cannot run.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then
    echo "skipped: the compose test (no Docker daemon reachable here)" >&2
    exit 0
fi
if ! command -v docker-compose >/dev/null; then
    echo "skipped: the compose test (docker-compose is not installed)" >&2
    exit 0
fi
source scripts/prereqs.sh
SKIP_BUILD="${SKIP_BUILD:-0}" bash scripts/docker-image.sh
B="$CARGO_TARGET_DIR/release/warbler"
work=$(mktemp -d)
project="warbler-ci-$$"
export WARBLER_PORT_PREFIX="${WARBLER_PORT_PREFIX:-64}"
P=$WARBLER_PORT_PREFIX
cp -r deploy "$work/"
cd "$work/deploy/compose"
compose() { docker-compose -p "$project" "$@"; }
cleanup() {
    status=$?
    if [ "$status" != 0 ]; then
        echo "compose test failed; the nodes' last logs:" >&2
        compose logs --tail 30 >&2 || true
    fi
    compose down -v --remove-orphans >/dev/null 2>&1 || true
    kill "${listener:-0}" 2>/dev/null || true
    cd / && rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT

# docs/deploy.md's one-liner, then `docker-compose up -d`.
(umask 027 && mkdir -p secrets && head -c 32 /dev/urandom | base64 > secrets/jwt-secret \
  && head -c 32 /dev/urandom | base64 > secrets/cluster-key) && echo "SECRETS_GID=$(id -g)" > .env
t0=$(date +%s)
compose up -d >/dev/null 2>&1
ready() { "$B" health --http "127.0.0.1:${P}8$1" --ready --timeout-secs 2 >/dev/null 2>&1; }
for i in 0 1 2; do
    until ready "$i"; do
        [ $(($(date +%s) - t0)) -lt 120 ] || { echo "warbler-$i not ready after 120 s" >&2; exit 1; }
        sleep 1
    done
done
echo "compose: 3 nodes ready $(($(date +%s) - t0)) s after docker-compose up"

export WARBLER_JWT_SECRET_FILE="$PWD/secrets/jwt-secret"
user="compose-$$"
"$B" listen --addr "127.0.0.1:${P}01" --user "$user" --device phone > received.txt 2> listen.err &
listener=$!
send() { # id node: retried with the same id (idempotent) while a partition elects
    local n
    for n in $(seq 1 30); do
        "$B" send --addr "127.0.0.1:${P}0$2" --to "$user" --id "$1" "body of $1" >/dev/null 2>send.err && return 0
        sleep 1
    done
    cat send.err >&2
    return 1
}
N=60
for k in $(seq 1 $N); do send "m$k" $((k % 3)); done
victim=warbler-2
docker kill "$(compose ps -q $victim)" >/dev/null
echo "compose: killed $victim after $N messages"
for k in $(seq $((N + 1)) $((2 * N))); do send "m$k" $((k % 2)); done
total=$((2 * N))
deadline=$(($(date +%s) + 60))
until [ "$(wc -l < received.txt)" -ge "$total" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "received $(wc -l < received.txt) of $total" >&2; cat listen.err >&2; exit 1; }
    sleep 0.5
done
expected=$(for k in $(seq 1 $total); do echo "seq=$k id=m$k"; done)
got=$(awk '{ print $1, $2 }' received.txt | head -n "$total")
if [ "$expected" != "$got" ]; then
    echo "the stream is not m1..m$total at seq 1..$total:" >&2
    diff <(echo "$expected") <(echo "$got") | head -20 >&2
    exit 1
fi
echo "compose: $total messages received once, in order, across the kill of $victim"
compose start "$victim" >/dev/null 2>&1
t1=$(date +%s)
until ready 2; do
    [ $(($(date +%s) - t1)) -lt 120 ] || { echo "$victim not ready 120 s after its restart" >&2; exit 1; }
    sleep 1
done
echo "compose: $victim ready again $(($(date +%s) - t1)) s after its restart"
