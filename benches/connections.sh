#!/usr/bin/env bash
# Connection scale of a 3-node cluster (RF 3):
#   1. DEVICES idle devices (default 50,000) spread over the three nodes by LOADERS load
#      processes (the open-file limit is per process), each device pinging every PING_MS
#      (default: the server's ping interval, 60 s); how many the cluster holds, its memory,
#      and the CPU of the whole cluster with them over IDLE_SECS; before them, the CPU of the
#      idle cluster alone over ALONE_SECS (default 30).
#   2. A reconnect storm: STORM devices (default 10,000) on each node; one node is killed
#      with kill -9; time until its devices are all back on the other two.
#
#   bash benches/connections.sh
#   DEVICES=6000 STORM=1000 IDLE_SECS=10 bash benches/connections.sh    # a quick try
#   BIN=<directory of another build> bash benches/connections.sh       # that build instead
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
DEVICES="${DEVICES:-50000}"
LOADERS="${LOADERS:-4}"
PING_MS="${PING_MS:-60000}"
IDLE_SECS="${IDLE_SECS:-60}"
ALONE_SECS="${ALONE_SECS:-30}"
STORM="${STORM:-10000}"
cargo build --release --workspace --bin warbler --bin warbler-load >&2
BIN="${BIN:-$CARGO_TARGET_DIR/release}"   # BIN=<dir of an older build> compares builds
work=$(mktemp -d)
trap 'kill -9 $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/secret"
ulimit -n 20000 2>/dev/null || true
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
metric() { # metric NODE NAME: the value of an unlabelled-or-summed metric on node NODE
    curl -sf "http://127.0.0.1:1778$1/metrics" | awk -v m="$2" '$1 ~ "^"m"({|$)" {s += $2} END {print s + 0}'
}

PIDS=()
start_cluster() {
    PIDS=()
    local i
    for i in 0 1 2; do
        rm -rf "$work/n$i"
        WARBLER_LOG=warn "$BIN/warbler" serve --node-id "n$i" --data-dir "$work/n$i" \
            --jwt-secret-file "$work/secret" --client-addr "127.0.0.1:1770$i" \
            --http-addr "127.0.0.1:1778$i" --cluster-addr "127.0.0.1:1771$i" \
            --seeds 127.0.0.1:17710 --bootstrap-expect 3 > "$work/n$i.out" 2>&1 &
        PIDS+=($!)
    done
    for i in 0 1 2; do
        for _ in $(seq 600); do
            curl -sf "http://127.0.0.1:1778$i/readyz" >/dev/null 2>&1 && break; sleep 0.1
        done
    done
    # Leaders are balanced after formation (a round every 3 s): wait until no leadership
    # moved for two rounds, so the measured window is the steady state, not the balancing.
    local last=-1 same=0 now
    for _ in $(seq 60); do
        now=$(leaderships)
        if [ "$now" = "$last" ]; then same=$((same + 1)); else same=0; last=$now; fi
        [ "$same" -ge 6 ] && break
        sleep 1
    done
}
leaderships() { local t=0 i; for i in 0 1 2; do t=$((t + $(metric "$i" warbler_leaderships_gained_total))); done; echo "$t"; }
stop_cluster() { kill -9 "${PIDS[@]}" 2>/dev/null || true; wait "${PIDS[@]}" 2>/dev/null || true; }
cluster_cpu() { local c=0 p; for p in "$@"; do c=$((c + $(cpu_ticks "$p"))); done; echo "$c"; }
# Wake-ups: voluntary context switches of every thread of the given processes.
wakeups() { local c=0 p t; for p in "$@"; do for t in /proc/"$p"/task/*; do c=$((c + $(awk '/^voluntary_ctxt_switches/ {print $2}' "$t/status"))); done; done; echo "$c"; }

echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(date -u +%F); cluster of 3, RF 3"

# --- 1. idle devices ---------------------------------------------------------------------
start_cluster
c0=$(cluster_cpu "${PIDS[@]}"); w0=$(wakeups "${PIDS[@]}"); t0=$(date +%s.%N)
sleep "$ALONE_SECS"
c1=$(cluster_cpu "${PIDS[@]}"); w1=$(wakeups "${PIDS[@]}"); t1=$(date +%s.%N)
echo "idle CPU of the cluster alone (64 partitions, no devices) over ${ALONE_SECS} s: $(echo "scale=2; 100 * ($c1 - $c0) / $(getconf CLK_TCK) / ($t1 - $t0)" | bc)% of one core, $(echo "scale=1; ($w1 - $w0) / ($t1 - $t0)" | bc) wake-ups/s"
ADDRS=127.0.0.1:17700,127.0.0.1:17701,127.0.0.1:17702
rss0=0; for p in "${PIDS[@]}"; do rss0=$((rss0 + $(rss_kib "$p"))); done
per=$((DEVICES / LOADERS))
hold=$((IDLE_SECS + 600))
started=$(date +%s.%N)
for l in $(seq 1 "$LOADERS"); do
    "$BIN/warbler-load" idle --addr "$ADDRS" --jwt-secret-file "$work/secret" \
        --connections "$per" --user-prefix "idle$l" --hold-secs "$hold" --ping-ms "$PING_MS" \
        > "$work/idle$l.out" 2> "$work/idle$l.err" &
done
for _ in $(seq 3000); do
    [ "$(cat "$work"/idle*.out 2>/dev/null | grep -c '^connected')" = "$LOADERS" ] && break
    if ! jobs -r | grep -q warbler-load; then break; fi
    sleep 0.2
done
up=$(cat "$work"/idle*.out | awk '/^connected/ {s += $2} END {print s + 0}')
echo "connected $up of $((per * LOADERS)) in $(echo "$(date +%s.%N) - $started" | bc | cut -c1-5) s"
sleep 5
g0=$(leaderships)
c0=$(cluster_cpu "${PIDS[@]}"); t0=$(date +%s.%N)
sleep "$IDLE_SECS"
c1=$(cluster_cpu "${PIDS[@]}"); t1=$(date +%s.%N)
echo "leaderships moved during the window: $(( $(leaderships) - g0 ))"
held=0; for i in 0 1 2; do n=$(metric "$i" warbler_connections); held=$((held + ${n%.*})); echo "n$i holds ${n%.*} connections, RSS $(( $(rss_kib "${PIDS[$i]}") / 1024 )) MiB"; done
rss1=0; for p in "${PIDS[@]}"; do rss1=$((rss1 + $(rss_kib "$p"))); done
echo "held: $held of $up devices after ${IDLE_SECS} s"
echo "memory: cluster RSS $((rss0 / 1024)) -> $((rss1 / 1024)) MiB, $(( (rss1 - rss0) * 1024 / (up > 0 ? up : 1) )) bytes per device (device sessions, stand-ins on the leaders, routing)"
echo "idle CPU with $held devices pinging every $((PING_MS / 1000)) s: $(echo "scale=2; 100 * ($c1 - $c0) / $(getconf CLK_TCK) / ($t1 - $t0)" | bc)% of one core (all three nodes together)"
kill $(jobs -p | grep -v "^$") 2>/dev/null || true
pkill -f "warbler-load idle" 2>/dev/null || true
stop_cluster
sleep 1

# --- 2. reconnect storm ------------------------------------------------------------------
start_cluster
# STORM devices on each of n0 and n1 (they stay), STORM on n2 (they move when it dies).
for i in 0 1; do
    "$BIN/warbler-load" idle --addr "127.0.0.1:1770$i" --jwt-secret-file "$work/secret" \
        --connections "$STORM" --user-prefix "stay$i" --hold-secs 900 --ping-ms "$PING_MS" \
        > "$work/stay$i.out" 2>&1 &
done
"$BIN/warbler-load" storm --addr 127.0.0.1:17702,127.0.0.1:17700,127.0.0.1:17701 \
    --jwt-secret-file "$work/secret" --connections "$STORM" > "$work/storm.out" 2>&1 &
storm_pid=$!
for _ in $(seq 3000); do
    [ "$(cat "$work"/stay*.out "$work/storm.out" 2>/dev/null | grep -c '^connected')" = 3 ] && break
    sleep 0.2
done
for i in 0 1 2; do echo "before: n$i holds $(metric "$i" warbler_connections) connections"; done
sleep 2
kill -9 "${PIDS[2]}"
wait "$storm_pid" || true
grep '^storm:' "$work/storm.out" || { echo "storm: failed"; cat "$work/storm.out"; }
