#!/usr/bin/env bash
# One POST /v1/messages to FANOUT users (a fan-out), RUNS times, each on a fresh node or a
# fresh NODES-node cluster (RF 3), timed from the request to its answer (every recipient's
# message stored; on RF 3 replicated to a majority). A cluster is measured once each node
# leads 16 to 27 of the 64 partitions and the routes held for half a second, as `make bench`
# does. With AGAIN=1, a second fan-out to other users follows on the same cluster a second
# later (its partitions' leaderships long settled).
#
#   bash benches/fanout.sh                         # NODES=3 RUNS=4 FANOUT=10000
#   NODES=1 bash benches/fanout.sh                 # one node
#   BIN=/some/other/build AGAIN=1 bash benches/fanout.sh
#
# Nothing else should run on the machine meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
source benches/leaders_spread.sh
NODES="${NODES:-3}"
RUNS="${RUNS:-4}"
FANOUT="${FANOUT:-10000}"
AGAIN="${AGAIN:-}"
case "$NODES" in
    1 | 3) ;;
    *) echo "NODES must be 1 or 3, not '$NODES'" >&2; exit 2 ;;
esac
if [ -z "${BIN:-}" ]; then
    cargo build --release --workspace --bin warbler >&2
    BIN="$CARGO_TARGET_DIR/release"
fi
work=$(mktemp -d)
pids=()
cleanup() { kill -9 "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/secret"
token=$("$BIN/warbler" token --jwt-secret-file "$work/secret" --user backend --scope publish)
request() { # $1 = user name prefix; writes the request body
    python3 -c "import json,sys; print(json.dumps({'id': 'fan', 'body': 'hello', 'to': ['%s%d' % (sys.argv[1], i) for i in range(int(sys.argv[2]))]}))" \
        "$1" "$FANOUT" > "$work/$1.json"
}
# fan PREFIX: one fan-out through node 0; prints seconds and recipients stored
fan() {
    local t0 t1
    t0=$(date +%s.%N)
    curl -s -o "$work/out" -H "authorization: Bearer $token" -H 'content-type: application/json' \
        --data-binary "@$work/$1.json" http://127.0.0.1:17780/v1/messages || true
    t1=$(date +%s.%N)
    python3 - "$work/out" "$t0" "$t1" <<'PY'
import json, sys
try:
    stored = sum(1 for r in json.load(open(sys.argv[1]))["results"] if "seq" in r)
except (OSError, ValueError, KeyError):
    stored = 0
print(f"{float(sys.argv[3]) - float(sys.argv[2]):.3f} s, {stored} stored")
PY
}
request f
request g
for r in $(seq "$RUNS"); do
    pids=()
    for i in $(seq 0 $((NODES - 1))); do
        cluster_args=()
        if [ "$NODES" -gt 1 ]; then
            cluster_args=(--cluster-addr "127.0.0.1:1781$i" --seeds 127.0.0.1:17810 --bootstrap-expect "$NODES")
        fi
        rm -rf "$work/w$i"
        WARBLER_LOG=warn "$BIN/warbler" serve --node-id "w$i" --data-dir "$work/w$i" \
            --jwt-secret-file "$work/secret" --client-addr "127.0.0.1:1770$i" \
            --http-addr "127.0.0.1:1778$i" "${cluster_args[@]}" > "$work/w$i.out" 2>&1 &
        pids+=($!)
    done
    for i in $(seq 0 $((NODES - 1))); do
        for _ in $(seq 600); do curl -sf "http://127.0.0.1:1778$i/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
    done
    [ "$NODES" -eq 1 ] || leaders_spread 127.0.0.1:17780 "$token"
    sync
    echo "run $r, $NODES node(s): fan-out to $FANOUT users: $(fan f)"
    if [ -n "$AGAIN" ]; then
        sleep 1
        echo "run $r, $NODES node(s): again, to $FANOUT other users: $(fan g)"
    fi
    kill -9 "${pids[@]}"
    wait "${pids[@]}" 2>/dev/null || true
done
