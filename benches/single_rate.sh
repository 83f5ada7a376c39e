#!/usr/bin/env bash
# One node at a fixed offered rate, RUNS times, each on a fresh node: the load's
# publish->deliver percentiles, where the machine's CPU went (each of the node's threads by
# name, the rest of the machine, idle), the node's own view of a message's time (accepted by
# the mailbox -> durable, and -> handed to the device's connection), its write batches, and
# for the deliveries at least SLOW_MS late, how long they took to reach the mailbox ("in")
# and from the mailbox to the device ("out"). With WINDOWS=1 also those slow deliveries by
# 50 ms window of due time (the worst "in" and "out" of each), beside the publishes the load
# generator itself sent late (benches/tail.sh runs it so).
#
#   bash benches/single_rate.sh                        # RATE=9000 DURATION=10 RUNS=2 SLOW_MS=50
#   BIN=/some/other/build bash benches/single_rate.sh  # the same against other binaries
#   ONE_MEMBER=1 bash benches/single_rate.sh           # the node as a cluster of itself
#
# Same workload as `make bench` (1,000 users x 2 devices, 4 publishers over 2 load
# processes, 256 B bodies). Nothing else should run meanwhile: server and load share the
# cores, and this shows how they share them.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
RATE="${RATE:-9000}"
DURATION="${DURATION:-10}"
RUNS="${RUNS:-2}"
SLOW_MS="${SLOW_MS:-50}"
WINDOWS="${WINDOWS:-0}"
if [ -z "${BIN:-}" ]; then
    cargo build --release --workspace --bin warbler --bin warbler-load >&2
    BIN="$CARGO_TARGET_DIR/release"
fi
work=$(mktemp -d)
PID=""
trap '[ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; [ -n "${SAMPLER:-}" ] && kill "$SAMPLER" 2>/dev/null; rm -rf "$work"' EXIT
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/secret"
HZ=$(getconf CLK_TCK)

threads() { # CPU ticks and context switches of the node's threads, summed by thread name
    for t in /proc/"$PID"/task/*; do
        echo "$(tr ' ' _ < "$t/comm") $(awk '{print $14 + $15}' "$t/stat")" \
            "$(awk '/ctxt_switches/{s += $2} END {print s}' "$t/status")"
    done | awk '{s[$1] += $2; c[$1] += $3} END {for (k in s) print k, s[k], c[k]}' | sort
}
machine() { awk '/^cpu /{print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $5 + $6}' /proc/stat; }  # all, idle (iowait too)

# ONE_MEMBER=1: the node is a cluster of itself (RF 1 through consensus), as `make bench`'s
# one-member run starts it.
as_cluster=()
if [ "${ONE_MEMBER:-0}" = 1 ]; then
    as_cluster=(--cluster-addr 127.0.0.1:17790 --seeds 127.0.0.1:17790 --bootstrap-expect 1)
fi

for run in $(seq "$RUNS"); do
    rm -rf "$work/d"
    WARBLER_LOG=warn "$BIN/warbler" serve --node-id s0 --data-dir "$work/d" \
        --jwt-secret-file "$work/secret" --client-addr 127.0.0.1:17700 \
        --http-addr 127.0.0.1:17780 "${as_cluster[@]}" > "$work/node.out" 2>&1 &
    PID=$!
    for _ in $(seq 300); do
        curl -sf http://127.0.0.1:17780/readyz >/dev/null 2>&1 && break
        sleep 0.1
    done
    echo "== run $run: one node${as_cluster:+ (a cluster of itself)}, $RATE/s offered for $DURATION s"
    sync  # earlier writeback must not land in this run's fsyncs
    threads > "$work/t0"; read -r all0 idle0 < <(machine); t0=$(date +%s.%N)
    # The machine's idle share every half second: the window above also holds the load's
    # connecting and draining, when the machine is nearly idle.
    (while sleep 0.5; do machine; done > "$work/ticks") &
    SAMPLER=$!
    WARBLER_LOAD_SLOW_MS="$SLOW_MS" "$BIN/warbler-load" run --system warbler \
        --addr 127.0.0.1:17700 --jwt-secret-file "$work/secret" --users 1000 --devices 2 \
        --publishers 4 --procs 2 --body-bytes 256 --duration-secs "$DURATION" \
        --rate "$RATE" --window 1024 --user-prefix "r$run" 2> "$work/slow.txt" \
        | grep -E 'published=|publish->deliver' | sed 's/^ */load: /'
    kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null || true
    threads > "$work/t1"; read -r all1 idle1 < <(machine); t1=$(date +%s.%N)
    curl -s http://127.0.0.1:17780/metrics > "$work/metrics"
    kill -9 "$PID"; wait "$PID" 2>/dev/null || true; PID=""
    python3 - "$work" "$HZ" "$t0" "$t1" "$all0" "$idle0" "$all1" "$idle1" "$SLOW_MS" "$WINDOWS" "$DURATION" <<'PY'
import collections, re, statistics, sys
work, hz, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
all0, idle0, all1, idle1, slow_ms, by_window = map(int, sys.argv[5:11])
secs = t1 - t0
read = lambda f: {k: (int(v), int(c)) for k, v, c in (l.split() for l in open(f))}
before, after = read(f"{work}/t0"), read(f"{work}/t1")
node = {k: (v - before.get(k, (0, 0))[0]) / hz / secs for k, (v, _) in after.items()}
# Each switch is a thread that stopped (to wait, or preempted): a hand-off between threads.
switches = {k: c - before.get(k, (0, 0))[1] for k, (_, c) in after.items()}
node_total = sum(node.values())
machine_busy = (all1 - all0 - (idle1 - idle0)) / hz / secs
print(f"CPU, in cores, over {secs:.1f} s: node {node_total:.2f}, rest of the machine (the load, interrupts) "
      f"{machine_busy - node_total:.2f}, idle {(idle1 - idle0) / hz / secs:.2f}")
# The busiest DURATION seconds of half-second samples: the publishing phase.
ticks = [tuple(map(int, l.split())) for l in open(f"{work}/ticks") if len(l.split()) == 2]
steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(ticks, ticks[1:])]
span = max(1, 2 * int(sys.argv[11]))
if len(steps) >= span:
    best = max((steps[i:i + span] for i in range(len(steps) - span + 1)),
               key=lambda w: sum(a - i for a, i in w))
    total, idle = sum(a for a, _ in best), sum(i for _, i in best)
    print(f"machine busy during the busiest {span / 2:.0f} s (the load's): {100 * (total - idle) / max(total, 1):.0f}%")
for k, v in sorted(node.items(), key=lambda kv: -kv[1]):
    if v >= 0.01:
        print(f"  {k:<20} {v:.2f}")
m = open(f"{work}/metrics").read()
def summary(name):
    s = re.search(rf"^{name}_sum (\S+)", m, re.M)
    c = re.search(rf"^{name}_count (\S+)", m, re.M)
    return (float(s.group(1)), float(c.group(1))) if s and c else (0.0, 0.0)
def quantile(name, q):
    x = re.search(rf'^{name}{{quantile="{q}"}} (\S+)', m, re.M)
    return float(x.group(1)) if x else float("nan")
published = summary("warbler_publish_seconds")[1]
if published:
    print(f"node CPU per message made durable: {node_total * secs / published * 1e6:.0f} us")
    busiest = sorted(switches.items(), key=lambda kv: -kv[1])[:4]
    print("context switches per message: " + ", ".join(f"{k} {c / published:.1f}" for k, c in busiest)
          + f"; all threads {sum(switches.values()) / published:.1f}")
for name, what in [("warbler_publish_seconds", "accepted by the mailbox -> durable"),
                   ("warbler_delivery_seconds", "accepted -> handed to the connection"),
                   ("warbler_delivery_written_seconds", "accepted -> written to the socket (oldest of each write)")]:
    s, c = summary(name)
    if c:
        print(f"node: {what}: mean {1000 * s / c:.1f} ms, p99 {1000 * quantile(name, '0.99'):.1f} ms, "
              f"max {1000 * quantile(name, '1'):.1f} ms")
s, c = summary("warbler_fsync_seconds")
r, _ = summary("warbler_fsync_batch_records")
if c:
    print(f"node: {c:.0f} write batches, {r / c:.0f} records each, write + fsync {1000 * s / c:.2f} ms "
          f"each (slowest {1000 * quantile('warbler_fsync_seconds', '1'):.1f} ms), the committer busy "
          f"{100 * s / secs:.0f}% of the time")
text = open(f"{work}/slow.txt").read()
slow = [tuple(map(int, x)) for x in re.findall(r"slow delivery due_ms=(\d+) accepted_ms=(\d+) received_ms=(\d+)", text)]
print(f"deliveries >= {slow_ms} ms late: {len(slow)}", end="")
if slow:
    print(f"; median in {statistics.median(a - d for d, a, _ in slow):.0f} ms, "
          f"out {statistics.median(r - a for _, a, r in slow):.0f} ms")
else:
    print()
late = [tuple(map(int, x)) for x in re.findall(r"late send due_ms=(\d+) late_ms=(\d+)", text)]
if by_window and slow:
    print(f"publishes the load sent >= {slow_ms // 2} ms late: {len(late)}")
    start = min(d for d, *_ in slow + late)
    windows = collections.defaultdict(lambda: [[], []])
    for due, acc, recv in slow:
        windows[(due - start) // 50 * 50][0].append((acc - due, recv - acc))
    for due, ms in late:
        windows[(due - start) // 50 * 50][1].append(ms)
    for at in sorted(windows):
        d, l = windows[at]
        if d:
            print(f"  due +{at:>6} ms: {len(d):>5} slow, in max {max(x for x, _ in d):>4} ms, "
                  f"out max {max(y for _, y in d):>4} ms; late sends {len(l)} (max {max(l, default=0)} ms)")
PY
done
