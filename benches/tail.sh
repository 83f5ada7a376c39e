#!/usr/bin/env bash
# Where one node's slowest publishes wait: a single node at a fixed offered rate, RUNS
# times, each on a fresh node. Per run: the load's publish->deliver percentiles, the node's
# own view (warbler_publish_seconds: accepted -> durable; warbler_delivery_seconds:
# accepted -> handed to the device's connection), and every delivery at least SLOW_MS late
# split into "in" (due -> accepted by the user's mailbox) and "out" (accepted -> received),
# by 50 ms window of due time, beside the publishes the load generator itself sent late.
#
#   bash benches/tail.sh                        # RATE=7871 DURATION=10 RUNS=3 SLOW_MS=30
#   BIN=/some/other/build bash benches/tail.sh  # the same against other binaries
#
# Nothing else should run on the machine meanwhile: servers and load share the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
RATE="${RATE:-7871}"
DURATION="${DURATION:-10}"
RUNS="${RUNS:-3}"
SLOW_MS="${SLOW_MS:-30}"
if [ -z "${BIN:-}" ]; then
    cargo build --release --workspace --bin warbler --bin warbler-load >&2
    BIN="$CARGO_TARGET_DIR/release"
fi
work=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; rm -rf "$work"' EXIT
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/secret"

for run in $(seq "$RUNS"); do
    rm -rf "$work/n0"
    WARBLER_LOG=warn "$BIN/warbler" serve --node-id n0 --data-dir "$work/n0" \
        --jwt-secret-file "$work/secret" --client-addr 127.0.0.1:17900 \
        --http-addr 127.0.0.1:17980 > "$work/n0.out" 2>&1 &
    PID=$!
    for _ in $(seq 600); do
        curl -sf http://127.0.0.1:17980/readyz >/dev/null 2>&1 && break
        sleep 0.1
    done
    echo "== run $run: one node, $RATE/s offered for $DURATION s"
    WARBLER_LOAD_SLOW_MS="$SLOW_MS" "$BIN/warbler-load" run --system warbler \
        --addr 127.0.0.1:17900 --jwt-secret-file "$work/secret" --users 1000 --devices 2 \
        --publishers 4 --procs 2 --body-bytes 256 --duration-secs "$DURATION" \
        --rate "$RATE" --window 1024 --user-prefix "t$run" 2> "$work/slow.txt" \
        | grep -E 'publish->deliver' | sed 's/^ */load: /'
    curl -s http://127.0.0.1:17980/metrics \
        | grep -E '^warbler_(publish|delivery|fsync)_seconds\{quantile="(0.99|1)"\}' \
        | sed 's/^/node: /'
    kill -9 "$PID"; wait "$PID" 2>/dev/null || true; PID=
    python3 - "$work/slow.txt" "$SLOW_MS" <<'PY'
import collections, re, sys
text = open(sys.argv[1]).read()
slow = [tuple(map(int, m)) for m in re.findall(r"slow delivery due_ms=(\d+) accepted_ms=(\d+) received_ms=(\d+)", text)]
late = [tuple(map(int, m)) for m in re.findall(r"late send due_ms=(\d+) late_ms=(\d+)", text)]
print(f"deliveries >= {sys.argv[2]} ms: {len(slow)}; publishes sent >= {int(sys.argv[2]) // 2} ms late: {len(late)}")
if not slow:
    sys.exit()
t0 = min(d for d, *_ in slow + late)
windows = collections.defaultdict(lambda: [[], []])
for due, acc, recv in slow:
    windows[(due - t0) // 50 * 50][0].append((acc - due, recv - acc))
for due, ms in late:
    windows[(due - t0) // 50 * 50][1].append(ms)
for at in sorted(windows):
    d, l = windows[at]
    if not d:
        continue
    print(f"  due +{at:>6} ms: {len(d):>5} slow, in max {max(x for x, _ in d):>4} ms, out max {max(y for _, y in d):>4} ms; late sends {len(l)} (max {max(l, default=0)} ms)")
PY
done
