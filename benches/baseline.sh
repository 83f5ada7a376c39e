#!/usr/bin/env bash
# The single-node baseline: durable publish→deliver throughput, latency at half of it, and
# server memory per idle connection. Prints the figures that docs/benchmarks.md quotes.
#
#   bash benches/baseline.sh            # defaults: 10,000 users, 16,000 idle connections
#   USERS=2000 IDLE=4000 bash benches/baseline.sh   # a quicker run
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
USERS="${USERS:-10000}"
IDLE="${IDLE:-16000}"
DURATION="${DURATION:-20}"
cargo build --release --bin warbler >&2
cargo build --release -p warbler-benches --bin warbler-load >&2
BIN="$CARGO_TARGET_DIR/release"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
openssl rand -hex 32 > "$work/secret" 2>/dev/null || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/secret"

start_node() {
    rm -rf "$work/data"
    WARBLER_LOG=warn "$BIN/warbler" serve --data-dir "$work/data" --jwt-secret-file "$work/secret" \
        --client-addr 127.0.0.1:17400 --http-addr 127.0.0.1:17480 > "$work/node.out" &
    NODE_PID=$!
    for _ in $(seq 100); do grep -q "warbler ready" "$work/node.out" 2>/dev/null && return; sleep 0.1; done
    echo "node did not start" >&2; exit 1
}
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # utime + stime, in clock ticks

echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(date -u +%F)"
start_node
echo "== throughput: $USERS users x 1 device, 256 B bodies, as fast as 4 publishers x 1024 in flight allow"
node_cpu0=$(cpu_ticks "$NODE_PID"); t0=$(date +%s.%N)
"$BIN/warbler-load" run --addr 127.0.0.1:17400 --jwt-secret-file "$work/secret" --users "$USERS" \
    --rate 0 --publishers 4 --window 1024 --duration-secs "$DURATION" | tee "$work/max.txt"
node_cpu=$(( $(cpu_ticks "$NODE_PID") - node_cpu0 )); t1=$(date +%s.%N)
echo "server CPU during the run: $(echo "scale=2; $node_cpu / $(getconf CLK_TCK) / ($t1 - $t0)" | bc) cores of $(nproc) (the load generator had the rest)"
max=$(awk -F'deliver_rate=' '/deliver_rate/ {split($2,a,"/"); print int(a[1])}' "$work/max.txt")
half=$((max / 2))
echo "== latency at half of that: $half msg/s, open loop"
"$BIN/warbler-load" run --addr 127.0.0.1:17400 --jwt-secret-file "$work/secret" --users "$USERS" \
    --rate "$half" --publishers 4 --duration-secs "$DURATION" --user-prefix half
batches=$(curl -s http://127.0.0.1:17480/metrics | awk '/^warbler_fsync_batches_total/ {print $2}')
records=$(curl -s http://127.0.0.1:17480/metrics | awk '/^warbler_fsync_batch_records_sum/ {print $2}')
echo "fsync batches=$batches records=$records"
kill "$NODE_PID"; wait "$NODE_PID" 2>/dev/null || true

echo "== memory per idle connection: $IDLE device connections over 2 client processes"
start_node
sleep 1
before=$(rss_kb "$NODE_PID")
half_idle=$((IDLE / 2))
for p in 1 2; do
    "$BIN/warbler-load" idle --addr 127.0.0.1:17400 --jwt-secret-file "$work/secret" \
        --connections "$half_idle" --user-prefix "idle$p" --hold-secs 30 > "$work/idle$p.out" &
done
for _ in $(seq 300); do
    [ "$(cat "$work"/idle*.out 2>/dev/null | grep -c connected)" = 2 ] && break; sleep 0.2
done
sleep 3
after=$(rss_kb "$NODE_PID")
conns=$(curl -s http://127.0.0.1:17480/metrics | awk '/^warbler_connections\{/ {s+=$2} END {print s}')
echo "server RSS before=${before} KiB after=${after} KiB connections=${conns}"
echo "memory per idle connection: $(( (after - before) * 1024 / IDLE )) bytes"
