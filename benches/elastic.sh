#!/usr/bin/env bash
# Scaling figures on a 3-node cluster (RF 3):
#  1. saturating load for STEADY seconds: the steady rate;
#  2. the same load while a fourth node joins: the rate during the scale-out as a share of
#     the steady rate, and how long until every partition sits where the ring places it;
#  3. leaders and replicas per node after the scale-out;
#  4. one partition filled with FILL seconds of saturating publishes (about 100,000
#     messages here), then the new node decommissioned: the time that partition's move took
#     (its leader's log) and the time to drain the node.
#
#   bash benches/elastic.sh                 # builds, then runs (about 5 minutes)
#   USERS=1000 STEADY=20 FILL=120 (the defaults)
#
# Nothing else should run on the machine meanwhile: servers and load share the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
USERS="${USERS:-1000}"
STEADY="${STEADY:-20}"
FILL="${FILL:-120}"
if [ -z "${BIN:-}" ]; then
    cargo build --release --workspace --bin warbler --bin warbler-load >&2
    BIN="$CARGO_TARGET_DIR/release"
fi
work=$(mktemp -d)
PIDS=()
trap 'kill -9 "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null; rm -rf "$work"' EXIT
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/secret"

node() { # node I: starts n<I>, joining through n0
    WARBLER_LOG="warn,warbler_cluster=info" "$BIN/warbler" serve --node-id "n$1" \
        --data-dir "$work/n$1" --jwt-secret-file "$work/secret" \
        --client-addr "127.0.0.1:1740$1" --http-addr "127.0.0.1:1748$1" \
        --cluster-addr "127.0.0.1:1741$1" --seeds 127.0.0.1:17410 --bootstrap-expect 3 \
        > "$work/n$1.out" 2>&1 &
    PIDS+=($!)
}
ready() { # ready I
    for _ in $(seq 1200); do
        curl -sf "http://127.0.0.1:1748$1/readyz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "n$1 not ready after 120 s" >&2
    exit 1
}
status() { curl -sf -H "authorization: Bearer $(cat "$work/ops")" "http://127.0.0.1:17480/v1/cluster"; }
settled() { # every partition's replicas are its placement
    status | python3 -c '
import json, sys
v = json.load(sys.stdin)
sys.exit(0 if v["partitions"] and all(sorted(p["replicas"]) == sorted(p["placement"]) for p in v["partitions"]) else 1)'
}
load() { # load SECONDS PREFIX [extra args]: saturating load over every node up now
    local secs=$1 prefix=$2
    shift 2
    "$BIN/warbler-load" run --system warbler --addr "127.0.0.1:17400,127.0.0.1:17401,127.0.0.1:17402" \
        --jwt-secret-file "$work/secret" --users "$USERS" --devices 1 --publishers 4 --procs 2 \
        --body-bytes 256 --duration-secs "$secs" --rate 0 --window 1024 --user-prefix "$prefix" \
        --json-out "$work/$prefix.json" "$@" | grep -E 'published='
}
rate() { python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["publish_rate"])' "$1"; }

echo "== $(nproc) cores, $(date -u '+%F %H:%M UTC'), $USERS users, 256 B bodies, $("$BIN/warbler" --version 2>/dev/null || echo warbler)"
for i in 0 1 2; do node "$i"; done
for i in 0 1 2; do ready "$i"; done
"$BIN/warbler" token --jwt-secret-file "$work/secret" --user ops --scope ops > "$work/ops"
load "$STEADY" steady | sed 's/^/steady, 3 nodes: /'

# The same load while n3 joins and partitions move to it.
t0=$(date +%s.%N)
node 3
load "$STEADY" during | sed 's/^/during the scale-out: /'
ready 3
until settled; do sleep 0.2; done
t1=$(date +%s.%N)
python3 -c 'import sys; s, d = float(sys.argv[1]), float(sys.argv[2]); print(f"throughput during the scale-out: {d:.0f}/s = {d / s:.2f} x steady ({s:.0f}/s)")' \
    "$(rate "$work/steady.json")" "$(rate "$work/during.json")"
echo "scale-out 3 -> 4: every partition placed after $(echo "$t1 - $t0" | bc) s"
sleep 10 # leader balancing rounds run every 3 s
for i in 0 1 2 3; do
    led=$(curl -sf "http://127.0.0.1:1748$i/metrics" | awk '$1 == "warbler_partitions_led" {print $2}')
    held=$(curl -sf -H "authorization: Bearer $(cat "$work/ops")" "http://127.0.0.1:1748$i/v1/cluster" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["replicas_held"])')
    echo "after the scale-out: n$i leads $led, holds $held replicas (even: 16 and 48)"
done

# Fill the lowest partition n3 holds (it moves first when n3 leaves), then drain n3.
p=$(status | python3 -c '
import json, sys
v = json.load(sys.stdin)
print(min(p["partition"] for p in v["partitions"] if "n3" in p["replicas"]))')
load "$FILL" fill --partition "$p" | sed "s/^/fill partition $p: /"
t0=$(date +%s.%N)
"$BIN/warbler" cluster decommission n3 --http 127.0.0.1:17480 --jwt-secret-file "$work/secret" > /dev/null
t1=$(date +%s.%N)
echo "drain n3 (every replica moved off; the filled partition among them): $(echo "$t1 - $t0" | bc) s"
grep -h "partition moved" "$work"/n*.out | grep -E "partition=$p[^0-9]" | tail -1 \
    | grep -oE 'ms=[0-9]+' | sed "s/^/move of partition $p (leader's log): /"
