#!/usr/bin/env bash
# What an idle device's ping costs one node: N devices (default 12,000) pinging every
# PING_MS (default 4,000: 3,000 pings a second), the node's CPU and wake-ups over SECS.
# MODE=perf records `perf record -g` of the node into /tmp/ping.data instead of only
# timing it; MODE=futex records its futex calls with their call stacks (/tmp/futex.data).
#
#   bash benches/ping_cost.sh
#   BIN=<directory of another build> bash benches/ping_cost.sh     # that build instead
#   WARBLER_IO_THREADS=2 bash benches/ping_cost.sh                 # a setting, passed on
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
N="${N:-12000}"; PING_MS="${PING_MS:-4000}"; SECS="${SECS:-20}"; MODE="${MODE:-cpu}"
cargo build --release --workspace --bin warbler --bin warbler-load >&2
BIN="${BIN:-$CARGO_TARGET_DIR/release}"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
ulimit -n 20000 2>/dev/null || true
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/secret"
WARBLER_LOG=warn "$BIN/warbler" serve --node-id m0 --data-dir "$work/m0" --jwt-secret-file "$work/secret" \
    --client-addr 127.0.0.1:17800 --http-addr 127.0.0.1:17880 > "$work/m0.out" 2>&1 &
pid=$!
for _ in $(seq 600); do curl -sf http://127.0.0.1:17880/readyz >/dev/null 2>&1 && break; sleep 0.1; done
"$BIN/warbler-load" idle --addr 127.0.0.1:17800 --jwt-secret-file "$work/secret" \
    --connections "$N" --user-prefix idle --hold-secs 600 --ping-ms "$PING_MS" > "$work/idle.out" 2>&1 &
for _ in $(seq 1200); do grep -q '^connected' "$work/idle.out" 2>/dev/null && break; sleep 0.2; done
grep '^connected' "$work/idle.out"
# Past the first round of pings and the mailboxes' sleep.
sleep $(( PING_MS / 1000 + 8 ))
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
wakeups() { local c=0 t; for t in /proc/"$pid"/task/*; do c=$((c + $(awk '/^voluntary_ctxt_switches/ {print $2}' "$t/status"))); done; echo "$c"; }
c0=$(ticks); w0=$(wakeups); t0=$(date +%s.%N)
case "$MODE" in
    cpu) sleep "$SECS" ;;
    perf) perf record -F 1999 -g -p "$pid" -o /tmp/ping.data -- sleep "$SECS" >/dev/null 2>&1 ;;
    futex) perf record -e syscalls:sys_enter_futex --call-graph dwarf,16384 -p "$pid" \
        -o /tmp/futex.data -- sleep "$SECS" >/dev/null 2>&1 ;;
    *) echo "MODE must be cpu, perf or futex" >&2; exit 2 ;;
esac
c1=$(ticks); w1=$(wakeups); t1=$(date +%s.%N)
hz=$(getconf CLK_TCK)
pings=$(( N * 1000 / PING_MS ))
echo "node CPU $(echo "scale=2; 100 * ($c1 - $c0) / $hz / ($t1 - $t0)" | bc)% of one core at $pings pings/s; $(echo "scale=1; ($w1 - $w0) / ($t1 - $t0)" | bc) wake-ups/s; $(echo "scale=1; 1000000 * ($c1 - $c0) / $hz / ($t1 - $t0) / $pings" | bc) us per ping"
