#!/usr/bin/env bash
# Warbler side by side with NATS JetStream and Mosquitto, on one machine, one workload, in
# one run; Warbler's one-member cluster and one fan-out request (one node, RF 3) against its
# single node; then memory per idle connection (TLS off and on), the connection scale of a
# 3-node cluster with a reconnect storm (benches/connections.sh), and the micro benchmarks.
# Writes the "Side by side" section of docs/benchmarks.md and the PNG plots in docs/img/.
# `make bench` runs this.
#
#   bash benches/compare.sh                 # the documented size (15 min 38 s here)
#   USERS=200 DURATION=5 IDLE=2000 CLUSTER_DEVICES=3000 STORM=1000 MICRO=0 bash benches/compare.sh   # a quick try
#   IDLE_ONLY=1 bash benches/compare.sh     # only memory per idle connection beside NATS (4 min)
#
# Knobs: USERS (1000), DEVICES per user (2), PUBLISHERS (4), PROCS load processes (2),
# DURATION s per run (10), BODY bytes (256), IDLE connections (17000; a node accepts 18,000 by default),
# CLUSTER_DEVICES idle devices on a 3-node cluster (50000), STORM devices per node (10000),
# FANOUT recipients of the one-request fan-out on one node and on RF 3 (10000),
# MICRO=0 skips the criterion benchmarks, PROFILE=0 skips perf, OUT (a results directory).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
source scripts/prereqs.sh
source benches/leaders_spread.sh
USERS="${USERS:-1000}"
DEVICES="${DEVICES:-2}"
PUBLISHERS="${PUBLISHERS:-4}"
PROCS="${PROCS:-2}"
DURATION="${DURATION:-10}"
BODY="${BODY:-256}"
IDLE="${IDLE:-17000}"
CLUSTER_DEVICES="${CLUSTER_DEVICES:-50000}"
STORM="${STORM:-10000}"
FANOUT="${FANOUT:-10000}"
MICRO="${MICRO:-1}"
IDLE_ONLY="${IDLE_ONLY:-0}"   # 1: only the memory per idle connection, printed; no docs written
PROFILE="${PROFILE:-1}"
started=$(date +%s)

# --- peers and tools ------------------------------------------------------------------
need_apt=()
command -v nats-server >/dev/null || need_apt+=(nats-server)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v openssl >/dev/null || need_apt+=(openssl)
[ "$PROFILE" = 0 ] || command -v perf >/dev/null || need_apt+=(linux-perf)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "installing ${need_apt[*]} from Debian's packages" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
python3 -c "import matplotlib" 2>/dev/null || python3 -m pip install --quiet matplotlib
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
cargo build --release --workspace --bin warbler --bin warbler-load >&2
BIN="$CARGO_TARGET_DIR/release"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
RUNS="$OUT/runs.jsonl"
: > "$RUNS"
# The servers' CPU over each run, beside runs.jsonl: their processes' user + system ticks.
CPU="$OUT/cpu.jsonl"
: > "$CPU"
HZ=$(getconf CLK_TCK)
work=$(mktemp -d)
cleanup() { kill -9 $(jobs -p) 2>/dev/null || true; pkill -9 -f "$work" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/secret"
echo "results in $OUT" >&2

{
    echo "date=$(date -u '+%F %H:%M UTC')"
    echo "cpu=$(nproc) x $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "memory_gib=$(free -g | awk '/Mem:/ {print $2}')"
    echo "kernel=$(uname -r)"
    echo "warbler=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "nats=$(nats-server --version)"
    echo "mosquitto=$("$MOSQUITTO" -h 2>/dev/null | head -1)"
    echo "workload=users $USERS x $DEVICES devices, $PUBLISHERS publishers over $PROCS load processes, $BODY B bodies, $DURATION s per point"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

# A CA and a server certificate for localhost (TLS runs).
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=bench-ca -keyout "$work/ca.key" \
    -out "$work/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > "$work/ext"
openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
    -days 2 -extfile "$work/ext" -out "$work/tls.pem" 2>/dev/null

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
wait_port() { for _ in $(seq 300); do (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0; sleep 0.1; done; echo "nothing listens on $1" >&2; return 1; }
json_val() { python3 -c "import json,sys; print(json.loads(sys.stdin.readlines()[-1])[sys.argv[1]])" "$1" < "$RUNS"; }

# --- servers ----------------------------------------------------------------------------
WARBLER_PIDS=()
start_warbler() { # $1 = nodes (1 or 3), $2 = "one-member": one node as a cluster of itself; extra env passes through
    WARBLER_PIDS=()
    local n=$1 mode=${2:-} i
    for i in $(seq 0 $((n - 1))); do
        local cluster_args=()
        if [ "$n" -gt 1 ] || [ "$mode" = one-member ]; then
            cluster_args=(--cluster-addr "127.0.0.1:1761$i" --seeds 127.0.0.1:17610 --bootstrap-expect "$n")
        fi
        rm -rf "$work/w$i"
        WARBLER_LOG=warn "$BIN/warbler" serve --node-id "w$i" --data-dir "$work/w$i" \
            --jwt-secret-file "$work/secret" --client-addr "127.0.0.1:1760$i" \
            --http-addr "127.0.0.1:1768$i" "${cluster_args[@]}" > "$work/w$i.out" 2>&1 &
        WARBLER_PIDS+=($!)
    done
    for i in $(seq 0 $((n - 1))); do
        for _ in $(seq 600); do curl -sf "http://127.0.0.1:1768$i/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
    done
    WARBLER_ADDRS=$(seq 0 $((n - 1)) | sed 's/^/127.0.0.1:1760/' | paste -sd,)
    [ "$n" -eq 1 ] || leaders_spread 127.0.0.1:17680 "$("$BIN/warbler" token --jwt-secret-file "$work/secret" --user bench --scope publish)"
}
# fanout LABEL: one POST /v1/messages to FANOUT users through node 0 of the running Warbler,
# timed from the request to the answer (every recipient's message stored and replicated).
fanout() {
    local token t0 t1
    token=$("$BIN/warbler" token --jwt-secret-file "$work/secret" --user backend --scope publish)
    python3 -c "import json,sys; print(json.dumps({'id': 'fan-' + sys.argv[1], 'body': 'hello', 'to': ['f%d' % i for i in range(int(sys.argv[2]))]}))" \
        "$1" "$FANOUT" > "$work/fanout.json"
    echo "== $1 fan-out to $FANOUT users in one request" >&2
    sync
    t0=$(date +%s.%N)
    curl -s -o "$work/fanout.out" -H "authorization: Bearer $token" \
        -H 'content-type: application/json' --data-binary "@$work/fanout.json" \
        http://127.0.0.1:17680/v1/messages || true
    t1=$(date +%s.%N)
    python3 - "$work/fanout.out" "$t0" "$t1" "$1" "$FANOUT" >> "$OUT/fanout.jsonl" <<'PY'
import json, sys
path, t0, t1, label, asked = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
try:
    results = json.load(open(path))["results"]
except (OSError, ValueError, KeyError):
    results = []
stored = sum(1 for x in results if "seq" in x)
print(json.dumps({"label": label, "recipients": asked, "stored": stored, "secs": t1 - t0}))
PY
    tail -1 "$OUT/fanout.jsonl" | sed 's/^/   /' >&2
}
stop_warbler() { kill -9 "${WARBLER_PIDS[@]}" 2>/dev/null || true; wait "${WARBLER_PIDS[@]}" 2>/dev/null || true; WARBLER_PIDS=(); }

NATS_PIDS=()
start_nats() { # a 3-node JetStream cluster on loopback; $1 = "tls" for TLS on the client port
    NATS_PIDS=()
    local i
    for i in 1 2 3; do
        rm -rf "$work/nats$i"; mkdir -p "$work/nats$i"
        {
            echo "server_name: nats-$i"
            echo "listen: 127.0.0.1:1742$i"
            echo "http: 127.0.0.1:1782$i"
            echo "server_tags: [\"n$i\"]"
            echo "max_connections: 64000"
            echo "jetstream { store_dir: \"$work/nats$i\", max_file_store: 20G, max_memory_store: 1G }"
            echo "cluster { name: bench, listen: 127.0.0.1:1762$i, routes: [nats-route://127.0.0.1:17621, nats-route://127.0.0.1:17622, nats-route://127.0.0.1:17623] }"
            # The handshake timeout of Warbler's client port (10 s): with NATS's shorter default,
            # the idle run's 17,000 TLS connections failed once ("broken pipe" at connect).
            if [ "${1:-}" = tls ]; then echo "tls { cert_file: \"$work/tls.pem\", key_file: \"$work/tls.key\", timeout: 10 }"; fi
        } > "$work/nats$i.conf"
        nats-server -c "$work/nats$i.conf" > "$work/nats$i.out" 2>&1 &
        NATS_PIDS+=($!)
    done
    for i in 1 2 3; do
        for _ in $(seq 300); do curl -sf "http://127.0.0.1:1782$i/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
    done
    sleep 2 # JetStream's meta group elects its leader
}
stop_nats() { kill "${NATS_PIDS[@]}" 2>/dev/null || true; wait "${NATS_PIDS[@]}" 2>/dev/null || true; NATS_PIDS=(); }

start_mosquitto() {
    rm -rf "$work/mosq"; mkdir -p "$work/mosq"
    cat > "$work/mosq.conf" <<EOF
listener 17883 127.0.0.1
allow_anonymous true
user root
persistence true
persistence_location $work/mosq/
max_queued_messages 1000000
EOF
    "$MOSQUITTO" -c "$work/mosq.conf" > "$work/mosq.out" 2>&1 &
    MOSQ_PID=$!
    wait_port 127.0.0.1:17883
}
stop_mosquitto() { kill "$MOSQ_PID" 2>/dev/null || true; wait "$MOSQ_PID" 2>/dev/null || true; MOSQ_PID=""; }

# --- load -------------------------------------------------------------------------------
# run LABEL RATE SYSTEM ADDRS [extra warbler-load args]
run() {
    local label=$1 rate=$2 system=$3 addrs=$4; shift 4
    echo "== $label at $([ "$rate" = 0 ] && echo 'max (closed loop)' || echo "$rate/s")" >&2
    # Dirty pages of the build and of earlier runs go to disk first: a filesystem journal
    # commits them with the next fsync, which would charge their writeback to this run.
    sync
    local ticks0; ticks0=$(server_ticks)
    "$BIN/warbler-load" run --system "$system" --addr "$addrs" --jwt-secret-file "$work/secret" \
        --users "$USERS" --devices "$DEVICES" --publishers "$PUBLISHERS" --procs "$PROCS" \
        --body-bytes "$BODY" --duration-secs "$DURATION" --rate "$rate" --window 1024 \
        --label "$label" --json-out "$RUNS" --user-prefix "${label//\~/-}" "$@" | sed 's/^/   /' >&2
    printf '{"label": "%s", "system": "%s", "offered_rate": %s, "server_ticks": %s, "hz": %s}\n' \
        "$label" "$system" "$rate" $(( $(server_ticks) - ticks0 )) "$HZ" >> "$CPU"
}
# The user + system CPU ticks of the running servers' processes, summed: every node of a
# cluster (Warbler's or NATS's) counts, so a replicated setup pays for its replicas.
server_ticks() {
    local p sum=0
    for p in "${WARBLER_PIDS[@]}" "${NATS_PIDS[@]}" ${MOSQ_PID:-}; do
        if [ -r "/proc/$p/stat" ]; then
            sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat")))
        fi
    done
    echo "$sum"
}
# profile LABEL NODES: a separate closed-loop run (not one of the measured ones) with
# `perf record` on node w0, reported after the run.
profile() {
    [ "$PROFILE" = 0 ] && return 0
    start_warbler "$2"
    ( sleep 4; perf record -F 499 -g -o "$work/$1.perf" -p "${WARBLER_PIDS[0]}" -- sleep $((DURATION - 4)) >/dev/null 2>&1 ) &
    local perf_job=$!
    run "profile-$1" 0 warbler "$WARBLER_ADDRS"
    wait "$perf_job" || true
    stop_warbler
    perf report -i "$work/$1.perf" --no-children --sort dso,symbol --stdio 2>/dev/null |
        grep -E '^ +[0-9.]+%' | head -25 > "$OUT/profile-$1.txt" || true
}
# Each system: a closed-loop run for its maximum, then open-loop points at 33/66/100% of it.
# system_runs LABEL SYSTEM ADDRS [extra]; the maximum lands in MAX_<label>.
system_runs() {
    local label=$1 system=$2 addrs=$3; shift 3
    run "$label" 0 "$system" "$addrs" "$@"
    local max; max=$(json_val publish_rate | cut -d. -f1)
    eval "MAX_${label//-/_}=$max"
    for f in 33 66 100; do
        run "$label" $((max * f / 100)) "$system" "$addrs" "$@"
    done
}
max_of() { local v="MAX_${1//-/_}"; echo "${!v}"; }
NATS1=(nats 127.0.0.1:17421 --nats-replicas 1 --nats-tag n1)
NATS3=(nats 127.0.0.1:17421,127.0.0.1:17422,127.0.0.1:17423 --nats-replicas 3)

if [ "$IDLE_ONLY" = 0 ]; then
# Group 1: one node. Warbler single node, NATS JetStream R1 (the stream on one server of the
# 3-node cluster, clients on that server), Mosquitto.
start_warbler 1; system_runs warbler-1 warbler "$WARBLER_ADDRS"; stop_warbler
# The same node started as a cluster of itself (RF 1 through Raft, as a one-replica
# StatefulSet runs): its closed-loop maximum against the plain node's.
start_warbler 1 one-member; run warbler-1m 0 warbler "$WARBLER_ADDRS"; stop_warbler
start_nats; system_runs nats-r1 "${NATS1[@]}"; stop_nats
start_mosquitto; system_runs mosquitto mqtt 127.0.0.1:17883; stop_mosquitto
# Group 2: three replicas. Warbler RF 3 vs NATS JetStream R3, clients over all three nodes.
start_warbler 3; system_runs warbler-3 warbler "$WARBLER_ADDRS"; stop_warbler
# The same cluster with clients that route by leader (GET /v1/routes): each publish goes to
# its user's leader, each device connects to it.
ROUTED=(--route-by-leader 127.0.0.1:17680 --devices-to-leader)
start_warbler 3; system_runs warbler-3r warbler "$WARBLER_ADDRS" "${ROUTED[@]}"; stop_warbler
start_nats; system_runs nats-r3 "${NATS3[@]}"; stop_nats
# One request to FANOUT users, each on a fresh server: one node, then RF 3.
: > "$OUT/fanout.jsonl"
start_warbler 1; fanout warbler-1; stop_warbler
start_warbler 3; fanout warbler-3; stop_warbler

# Equal offered load, pair by pair: both at half the lower of the two maxima.
# pair OURS PEER: labelled OURS~PEER, one run of each.
pair() {
    local ours=$1 peer=$2 rate
    rate=$(( $(python3 -c "print(min($(max_of "$ours"), $(max_of "$peer")))") / 2 ))
    local extra=()
    [ "$ours" = warbler-3r ] && extra=("${ROUTED[@]}")
    if [ "$ours" = warbler-1 ]; then start_warbler 1; else start_warbler 3; fi
    run "$ours~$peer" "$rate" warbler "$WARBLER_ADDRS" "${extra[@]}"; stop_warbler
    case $peer in
        nats-r1) start_nats; run "$ours~$peer" "$rate" "${NATS1[@]}"; stop_nats ;;
        nats-r3) start_nats; run "$ours~$peer" "$rate" "${NATS3[@]}"; stop_nats ;;
        mosquitto) start_mosquitto; run "$ours~$peer" "$rate" mqtt 127.0.0.1:17883; stop_mosquitto ;;
    esac
}
pair warbler-1 nats-r1
pair warbler-1 mosquitto
pair warbler-3 nats-r3
pair warbler-3r nats-r3
profile warbler-1 1
profile warbler-3 3
fi

# --- memory per idle connection ----------------------------------------------------------
# idle SYSTEM TLS(on|off) ADDR PID: IDLE connections over 2 client processes, RSS growth of PID
idle() {
    local system=$1 tls=$2 addr=$3 pid=$4 half=$((IDLE / 2)) p holders=()
    local tls_args=()
    [ "$tls" = on ] && tls_args=(--tls-ca-file "$work/ca.pem")
    sleep 1
    local before; before=$(rss_kb "$pid")
    for p in 1 2; do
        "$BIN/warbler-load" idle --system "$system" --addr "$addr" --jwt-secret-file "$work/secret" \
            "${tls_args[@]}" --connections "$half" --user-prefix "idle$p" --hold-secs 300 > "$work/idle$p.out" &
        holders+=($!)
    done
    for _ in $(seq 600); do
        [ "$(cat "$work"/idle[12].out 2>/dev/null | grep -c connected)" = 2 ] && break; sleep 0.2
    done
    local up; up=$(cat "$work"/idle[12].out | awk '/connected/ {s += $2} END {print s + 0}')
    # Past the 5 s after which a quiet mailbox sleeps: the steady idle state.
    sleep 8
    local after; after=$(rss_kb "$pid")
    echo "== idle $system tls=$tls: $up connections, RSS ${before} -> ${after} KiB" >&2
    echo "{\"kind\":\"idle\",\"system\":\"$system\",\"tls\":\"$tls\",\"connections\":$up,\"requested\":$((half * 2)),\"rss_before_kib\":$before,\"rss_after_kib\":$after}" >> "$OUT/idle.jsonl"
    kill "${holders[@]}" 2>/dev/null || true
    wait "${holders[@]}" 2>/dev/null || true
    rm -f "$work"/idle[12].out
}
: > "$OUT/idle.jsonl"
for tls in off on; do
    if [ $tls = on ]; then export WARBLER_TLS_CERT_FILE="$work/tls.pem" WARBLER_TLS_KEY_FILE="$work/tls.key"; fi
    start_warbler 1; idle warbler $tls 127.0.0.1:17600 "${WARBLER_PIDS[0]}"; stop_warbler
    unset WARBLER_TLS_CERT_FILE WARBLER_TLS_KEY_FILE
    start_nats "$([ $tls = on ] && echo tls || echo plain)"; idle nats $tls 127.0.0.1:17421 "${NATS_PIDS[0]}"; stop_nats
done

if [ "$IDLE_ONLY" != 0 ]; then
    python3 -c "
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    n = max(r['connections'], 1)
    print(f\"{r['system']} tls={r['tls']}: {r['connections']} of {r['requested']}, {(r['rss_after_kib'] - r['rss_before_kib']) * 1024 // n} bytes per connection\")
" "$OUT/idle.jsonl"
    exit 0
fi

# --- connection scale of a 3-node cluster, and a reconnect storm ----------------------------
DEVICES="$CLUSTER_DEVICES" STORM="$STORM" bash benches/connections.sh | tee "$OUT/connections.txt" >&2

# --- micro benchmarks --------------------------------------------------------------------
if [ "$MICRO" != 0 ]; then
    echo "== micro benchmarks (criterion)" >&2
    cargo bench --workspace --bench frame --bench storage --bench placement --bench mailbox \
        -- --warm-up-time 1 --measurement-time 2 2>/dev/null | tee "$OUT/micro.txt" | grep -E 'time:' >&2 || true
fi

wait 2>/dev/null || true
echo "elapsed_secs=$(( $(date +%s) - started ))" >> "$OUT/machine.txt"
python3 benches/report.py "$OUT" "$ROOT/docs/benchmarks.md" "$ROOT/docs/img"
echo "wrote docs/benchmarks.md (section 'Side by side') and docs/img/*.png from $OUT" >&2
