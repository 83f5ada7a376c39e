#!/usr/bin/env bash
# An idle 3-node cluster (RF 3, 64 partitions, no devices): its CPU and wake-ups (voluntary
# context switches) over SECS, in total and by thread name. The window starts once no
# leadership moved for 6 s, then SKIP seconds later (the steady state: a node spreads its
# metadata every 3 s for 30 s after the members last changed, then every 30 s).
#
#   bash benches/idle_cluster.sh                       # SECS=60 SKIP=25
#   BIN=/some/other/build bash benches/idle_cluster.sh # the same against another build
#
# Nothing else should run meanwhile: a build or a test on the same cores shows here.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
SECS="${SECS:-60}"
SKIP="${SKIP:-25}"
if [ -z "${BIN:-}" ]; then
    cargo build --release --workspace --bin warbler >&2
    BIN="$CARGO_TARGET_DIR/release"
fi
work=$(mktemp -d)
trap 'kill -9 $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/secret"
PIDS=()
for i in 0 1 2; do
    WARBLER_LOG=warn "$BIN/warbler" serve --node-id "n$i" --data-dir "$work/n$i" \
        --jwt-secret-file "$work/secret" --client-addr "127.0.0.1:1770$i" \
        --http-addr "127.0.0.1:1778$i" --cluster-addr "127.0.0.1:1771$i" \
        --seeds 127.0.0.1:17710 --bootstrap-expect 3 > "$work/n$i.out" 2>&1 &
    PIDS+=($!)
done
metric() { # metric NODE NAME: the sum of a metric's series on node NODE
    curl -sf "http://127.0.0.1:1778$1/metrics" | awk -v m="$2" '$1 ~ "^"m"({|$)" {s += $2} END {print s + 0}'
}
for i in 0 1 2; do
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:1778$i/readyz" >/dev/null 2>&1 && break; sleep 0.1
    done
done
last=-1 same=0
for _ in $(seq 60); do
    now=0
    for i in 0 1 2; do now=$((now + $(metric "$i" warbler_leaderships_gained_total))); done
    if [ "$now" = "$last" ]; then same=$((same + 1)); else same=0; last=$now; fi
    [ "$same" -ge 6 ] && break
    sleep 1
done
sleep "$SKIP"
# One line per thread: "pid/tid name voluntary-switches cpu-ticks".
threads() {
    local p t
    for p in "${PIDS[@]}"; do
        for t in /proc/"$p"/task/*; do
            echo "$p/${t##*/} $(tr ' ' _ < "$t/comm") $(awk '/^voluntary_ctxt_switches/ {print $2}' "$t/status") $(awk '{print $14 + $15}' "$t/stat")"
        done
    done | sort
}
threads > "$work/before"; t0=$(date +%s.%N)
sleep "$SECS"
threads > "$work/after"; t1=$(date +%s.%N)
echo "== idle 3-node cluster, 64 partitions, over $SECS s ($(nproc) cores)"
join "$work/before" "$work/after" | awk -v dt="$(echo "$t1 - $t0" | bc)" -v hz="$(getconf CLK_TCK)" '
    { n = $2; sub(/[-_:]?[0-9]+$/, "", n); w[n] += $6 - $3; c[n] += $7 - $4; tw += $6 - $3; tc += $7 - $4 }
    END {
        printf "total: %.2f%% of one core, %.1f wake-ups/s\n", 100 * tc / hz / dt, tw / dt
        for (k in w) if (w[k] + c[k] > 0) printf "  %-20s %6.1f wake-ups/s %7.3f%%\n", k, w[k] / dt, 100 * c[k] / hz / dt
    }'
