#!/usr/bin/env bash
# Replication against one node, on one workload: the closed-loop maximum of a single node,
# of a one-member cluster (RF 1 through Raft) and of 3 nodes with RF 3; RF 3 latency at half
# its maximum; CPU of an idle 3-node cluster; one fan-out request to 10,000 users on one
# node and on RF 3. Every figure is printed with the run that produced it.
#
#   bash benches/replication.sh                   # builds, then runs (about 4 minutes)
#   BIN=/some/other/build bash benches/replication.sh   # the same against other binaries
#   USERS=1000 DEVICES=2 PUBLISHERS=4 DURATION=10 IDLE=60 FANOUT=10000 (the defaults)
#
# Nothing else should run on the machine meanwhile: servers and load share the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
USERS="${USERS:-1000}"
DEVICES="${DEVICES:-2}"
PUBLISHERS="${PUBLISHERS:-4}"
DURATION="${DURATION:-10}"
IDLE="${IDLE:-60}"
FANOUT="${FANOUT:-10000}"
if [ -z "${BIN:-}" ]; then
    cargo build --release --workspace --bin warbler --bin warbler-load >&2
    BIN="$CARGO_TARGET_DIR/release"
fi
work=$(mktemp -d)
PIDS=()
trap 'kill -9 "${PIDS[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/secret"

# start N [one-member]: N nodes; "one-member" starts one node as a cluster of itself.
start() {
    local n=$1 mode=${2:-} i
    PIDS=()
    for i in $(seq 0 $((n - 1))); do
        local args=()
        if [ "$n" -gt 1 ] || [ "$mode" = one-member ]; then
            args=(--cluster-addr "127.0.0.1:1791$i" --seeds 127.0.0.1:17910 --bootstrap-expect "$n")
        fi
        rm -rf "$work/n$i"
        WARBLER_LOG=warn "$BIN/warbler" serve --node-id "n$i" --data-dir "$work/n$i" \
            --jwt-secret-file "$work/secret" --client-addr "127.0.0.1:1790$i" \
            --http-addr "127.0.0.1:1798$i" "${args[@]}" > "$work/n$i.out" 2>&1 &
        PIDS+=($!)
    done
    for i in $(seq 0 $((n - 1))); do
        for _ in $(seq 600); do
            curl -sf "http://127.0.0.1:1798$i/readyz" >/dev/null 2>&1 && break
            sleep 0.1
        done
    done
    ADDRS=$(seq 0 $((n - 1)) | sed 's/^/127.0.0.1:1790/' | paste -sd,)
}
stop() { kill -9 "${PIDS[@]}" 2>/dev/null || true; wait "${PIDS[@]}" 2>/dev/null || true; PIDS=(); }

# load LABEL RATE: one warbler-load run against $ADDRS; prints its summary line.
load() {
    sync  # earlier writeback must not land in this run's fsyncs (docs/benchmarks.md)
    "$BIN/warbler-load" run --system warbler --addr "$ADDRS" --jwt-secret-file "$work/secret" \
        --users "$USERS" --devices "$DEVICES" --publishers "$PUBLISHERS" --procs 2 \
        --body-bytes 256 --duration-secs "$DURATION" --rate "$2" --window 1024 \
        --user-prefix "$1" | grep -E 'published=|publish->deliver' | sed "s/^/$1 rate=$2: /"
}
rate_of() { sed -n 's/.*publish_rate=\([0-9]*\).*/\1/p' | tail -1; }

fanout() { # fanout LABEL: one POST /v1/messages to $FANOUT users through node 0
    local token
    token=$("$BIN/warbler" token --jwt-secret-file "$work/secret" --user backend --scope publish)
    python3 -c "import json,sys; print(json.dumps({'id': 'fan-' + sys.argv[1], 'body': 'hello', 'to': ['f%d' % i for i in range(int(sys.argv[2]))]}))" \
        "$1" "$FANOUT" > "$work/fanout.json"
    local t0 t1
    t0=$(date +%s.%N)
    curl -sf -o "$work/fanout.out" -H "authorization: Bearer $token" \
        -H 'content-type: application/json' --data-binary "@$work/fanout.json" \
        http://127.0.0.1:17980/v1/messages
    t1=$(date +%s.%N)
    python3 - "$work/fanout.out" "$t0" "$t1" "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
ok = sum(1 for x in r if "seq" in x)
secs = float(sys.argv[3]) - float(sys.argv[2])
print(f"{sys.argv[4]} fan-out: {len(r)} recipients, {ok} stored, {secs:.2f} s, {ok / secs:,.0f} recipients/s")
EOF
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

echo "== $(nproc) cores, $(date -u '+%F %H:%M UTC'), $USERS users x $DEVICES devices, $PUBLISHERS publishers, ${DURATION} s runs, $("$BIN/warbler" --version 2>/dev/null || echo warbler)"
start 1; load single 0 | tee "$work/single"; fanout single; stop
start 1 one-member; load one-member 0 | tee "$work/one"; stop
start 3
sleep 5
c0=0; for p in "${PIDS[@]}"; do c0=$((c0 + $(cpu_ticks "$p"))); done; t0=$(date +%s.%N)
sleep "$IDLE"
c1=0; for p in "${PIDS[@]}"; do c1=$((c1 + $(cpu_ticks "$p"))); done; t1=$(date +%s.%N)
echo "idle 3-node cluster over ${IDLE} s: $(echo "scale=2; 100 * ($c1 - $c0) / $(getconf CLK_TCK) / ($t1 - $t0)" | bc)% of one core (all three nodes)"
load rf3 0 | tee "$work/rf3"
max=$(rate_of < "$work/rf3")
load rf3-half $((max / 2))
fanout rf3
stop
single=$(rate_of < "$work/single")
one=$(rate_of < "$work/one")
python3 -c "print(f'RF 3 / single: {$max / $single:.2f}; one-member / single: {$one / $single:.2f}')"
