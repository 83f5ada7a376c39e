#!/usr/bin/env bash
# The 3-node cluster figures (RF = 3, every publish fsynced on a majority before the ack):
# idle CPU of the whole cluster, durable publish→deliver throughput with devices and
# publishers spread over the three nodes, and latency at half that rate.
#
#   bash benches/cluster.sh               # defaults: 2,000 users, 20 s runs
#   USERS=500 DURATION=10 bash benches/cluster.sh
# Failover figures come from: cargo test --release --workspace --test cluster failover_figures -- --ignored --nocapture
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
USERS="${USERS:-2000}"
DURATION="${DURATION:-20}"
IDLE_SECS="${IDLE_SECS:-20}"
cargo build --release --workspace --bin warbler --bin warbler-load >&2
BIN="$CARGO_TARGET_DIR/release"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/secret"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

PIDS=()
for i in 0 1 2; do
    WARBLER_LOG=warn "$BIN/warbler" serve --node-id "n$i" --data-dir "$work/n$i" \
        --jwt-secret-file "$work/secret" --client-addr "127.0.0.1:1750$i" \
        --http-addr "127.0.0.1:1758$i" --cluster-addr "127.0.0.1:1751$i" \
        --seeds 127.0.0.1:17510 --bootstrap-expect 3 > "$work/n$i.out" &
    PIDS+=($!)
done
for i in 0 1 2; do
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:1758$i/readyz" >/dev/null 2>&1 && break; sleep 0.1
    done
done
echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(date -u +%F); cluster of 3, RF 3, heartbeat 250 ms"
sleep 5
echo "== idle CPU of the 3-node cluster over ${IDLE_SECS} s (64 partitions x 3 replicas, no traffic)"
c0=0; for p in "${PIDS[@]}"; do c0=$((c0 + $(cpu_ticks "$p"))); done; t0=$(date +%s.%N)
sleep "$IDLE_SECS"
c1=0; for p in "${PIDS[@]}"; do c1=$((c1 + $(cpu_ticks "$p"))); done; t1=$(date +%s.%N)
echo "idle CPU: $(echo "scale=1; 100 * ($c1 - $c0) / $(getconf CLK_TCK) / ($t1 - $t0)" | bc)% of one core (all three nodes together)"

ADDRS=127.0.0.1:17500,127.0.0.1:17501,127.0.0.1:17502
echo "== throughput: $USERS users x 1 device over 3 nodes, 256 B bodies, 3 publishers x 1024 in flight"
"$BIN/warbler-load" run --addr "$ADDRS" --jwt-secret-file "$work/secret" --users "$USERS" \
    --rate 0 --publishers 3 --window 1024 --duration-secs "$DURATION" | tee "$work/max.txt"
max=$(awk -F'deliver_rate=' '/deliver_rate/ {split($2,a,"/"); print int(a[1])}' "$work/max.txt")
half=$((max / 2))
echo "== latency at half of that: $half msg/s, open loop"
"$BIN/warbler-load" run --addr "$ADDRS" --jwt-secret-file "$work/secret" --users "$USERS" \
    --rate "$half" --publishers 3 --duration-secs "$DURATION" --user-prefix half
