#!/usr/bin/env bash
# A 3-node RF 3 cluster at a fixed offered rate, RUNS times, each on a fresh cluster: the
# load's publish->deliver percentiles, the cluster's CPU during the run, each node's own
# accepted -> durable p99 (warbler_publish_seconds), and where deliveries at least SLOW_MS
# late waited: "in" (due -> accepted by the user's mailbox: routing, mailbox start) or "out"
# (accepted -> received: replication, commit, delivery); and the peer requests the nodes
# served during the run, by kind, per message made durable. With CLOSED=1 a closed-loop run
# on other users comes first, as in benches/replication.sh before its half-load run.
#
#   bash benches/rf3_rate.sh                        # RATE=2300 DURATION=10 RUNS=2 SLOW_MS=100
#   BIN=/some/other/build bash benches/rf3_rate.sh  # the same against other binaries
#   RATE=0 bash benches/rf3_rate.sh                 # closed loop: the cluster's maximum
#   SLOW_SYNC_US=3000 bash benches/rf3_rate.sh      # every server fsync 3 ms slower (a slow disk)
#   ROUTE=publishes bash benches/rf3_rate.sh        # each publish goes to its user's leader
#   ROUTE=all bash benches/rf3_rate.sh              # ... and each device connects to it too
#   SETTLE=0 bash benches/rf3_rate.sh               # start the load at once, while leaders still move (default 8 s)
#
# Nothing else should run on the machine meanwhile: servers and load share the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
RATE="${RATE:-2300}"
DURATION="${DURATION:-10}"
RUNS="${RUNS:-2}"
SLOW_MS="${SLOW_MS:-100}"
CLOSED="${CLOSED:-}"
SLOW_SYNC_US="${SLOW_SYNC_US:-}"
ROUTE="${ROUTE:-}"
SETTLE="${SETTLE:-8}"
case "$ROUTE" in
    "") route=() ;;
    publishes) route=(--route-by-leader 127.0.0.1:17980) ;;
    all) route=(--route-by-leader 127.0.0.1:17980 --devices-to-leader) ;;
    *) echo "ROUTE must be empty, publishes or all, not '$ROUTE'" >&2; exit 2 ;;
esac
if [ -z "${BIN:-}" ]; then
    cargo build --release --workspace --bin warbler --bin warbler-load >&2
    BIN="$CARGO_TARGET_DIR/release"
fi
work=$(mktemp -d)
PIDS=()
trap 'kill -9 "${PIDS[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
PRELOAD=
if [ -n "$SLOW_SYNC_US" ]; then
    cc -shared -fPIC -O2 -o "$work/slow_sync.so" benches/slow_sync.c -ldl
    PRELOAD="$work/slow_sync.so"
    echo "every fsync and fdatasync of the servers is $SLOW_SYNC_US us slower (benches/slow_sync.c)"
fi
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/secret"
ADDRS=127.0.0.1:17900,127.0.0.1:17901,127.0.0.1:17902

load() { # load PREFIX RATE [extra env]: one warbler-load run; its stderr goes to $work/slow.txt
    "$BIN/warbler-load" run --system warbler --addr "$ADDRS" --jwt-secret-file "$work/secret" \
        --users 1000 --devices 2 --publishers 4 --procs 2 --body-bytes 256 \
        --duration-secs "$DURATION" --rate "$2" --window 1024 --user-prefix "$1" \
        "${route[@]}" \
        2> "$work/slow.txt" | grep -E 'published=|publish->deliver' | sed 's/^ */load: /'
    grep -h 'leader moves seen' "$work/slow.txt" | sed 's/^/load: /' || true
}
counters() { # every node's peer requests by kind, follower appends, log syncs and publishes, summed
    for i in 0 1 2; do curl -s "http://127.0.0.1:1798$i/metrics"; done \
        | grep -E '^warbler_(peer_requests_total|raft_appends_received_total|publishes_total|raft_syncs_total)' \
        | awk '{sum[$1] += $2} END {for (k in sum) print k, sum[k]}' | sort
}
cpu_ticks() { local c=0 p; for p in "${PIDS[@]}"; do c=$((c + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $c; }

for run in $(seq "$RUNS"); do
    PIDS=()
    for i in 0 1 2; do
        rm -rf "$work/n$i"
        LD_PRELOAD="$PRELOAD" SLOW_SYNC_US="$SLOW_SYNC_US" WARBLER_LOG=warn "$BIN/warbler" serve --node-id "n$i" --data-dir "$work/n$i" \
            --jwt-secret-file "$work/secret" --client-addr "127.0.0.1:1790$i" \
            --http-addr "127.0.0.1:1798$i" --cluster-addr "127.0.0.1:1791$i" \
            --seeds 127.0.0.1:17910 --bootstrap-expect 3 > "$work/n$i.out" 2>&1 &
        PIDS+=($!)
    done
    for i in 0 1 2; do
        for _ in $(seq 600); do
            curl -sf "http://127.0.0.1:1798$i/readyz" >/dev/null 2>&1 && break
            sleep 0.1
        done
    done
    # The leaders spread a few seconds after formation: measure after that.
    sleep "$SETTLE"
    if [ -n "$CLOSED" ]; then
        echo "== run $run: closed loop first"
        load "c$run" 0
    fi
    echo "== run $run: 3 nodes, RF 3, $RATE/s offered for $DURATION s"
    sync  # earlier writeback must not land in this run's fsyncs
    counters > "$work/before.txt"
    c0=$(cpu_ticks); t0=$(date +%s.%N)
    WARBLER_LOAD_SLOW_MS="$SLOW_MS" load "r$run" "$RATE"
    c1=$(cpu_ticks); t1=$(date +%s.%N)
    echo "cluster CPU from connect to the last delivery: $(echo "scale=0; 100 * ($c1 - $c0) / $(getconf CLK_TCK) / ($t1 - $t0)" | bc)% of one core"
    counters > "$work/after.txt"
    python3 - "$work/before.txt" "$work/after.txt" <<'PY'
import sys
read = lambda f: {k: float(v) for k, v in (l.split() for l in open(f))}
before, after = read(sys.argv[1]), read(sys.argv[2])
delta = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}
published = delta.pop("warbler_publishes_total", 0)
print(f"peer requests and log syncs during the run, all nodes, per message made durable ({published:.0f}):")
for k, v in sorted(delta.items(), key=lambda kv: -kv[1]):
    print(f"  {k:<70} {v:>9.0f}  {v / max(published, 1):6.2f}")
PY
    for i in 0 1 2; do
        curl -s "http://127.0.0.1:1798$i/metrics" \
            | grep -E '^warbler_(publish_seconds\{quantile="(0.99|1)"\}|raft_entry_ops_(sum|count)|raft_sync_seconds\{quantile="0.5"\}|raft_sync_seconds_(sum|count)|raft_sync_waiters_sum)' \
            | sed "s/^/node n$i: /"
    done
    kill -9 "${PIDS[@]}"; wait "${PIDS[@]}" 2>/dev/null || true; PIDS=()
    python3 - "$work/slow.txt" "$SLOW_MS" <<'PY'
import collections, re, sys
text = open(sys.argv[1]).read()
slow = [tuple(map(int, m)) for m in re.findall(r"slow delivery due_ms=(\d+) accepted_ms=(\d+) received_ms=(\d+)", text)]
print(f"deliveries >= {sys.argv[2]} ms late: {len(slow)}")
if not slow:
    sys.exit()
t0 = min(d for d, *_ in slow)
windows = collections.defaultdict(list)
for due, acc, recv in slow:
    windows[(due - t0) // 1000].append((acc - due, recv - acc))
for at in sorted(windows):
    d = windows[at]
    print(f"  second {at:>3}: {len(d):>5} late, in max {max(x for x, _ in d):>5} ms, out max {max(y for _, y in d):>5} ms")
PY
done
