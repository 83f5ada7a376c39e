#!/usr/bin/env bash
# Backup and restore speed: a 3-node cluster (RF 3) is filled by warbler-load, backed up
# with `warbler backup` while a second load runs against it, and restored with
# `warbler restore` into a new 3-node cluster. Prints the sizes, the times and MB/s, and
# checks that the restored cluster holds as many messages as the backup's manifest.
#
#   bash benches/backup.sh                 # builds, then runs (about 2 minutes)
#   USERS=2000 FILL=30 (the defaults: users of the fill load, its seconds)
#
# Nothing else should run on the machine meanwhile: servers and load share the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
USERS="${USERS:-2000}"
FILL="${FILL:-30}"
if [ -z "${BIN:-}" ]; then
    cargo build --release --workspace --bin warbler --bin warbler-load >&2
    BIN="$CARGO_TARGET_DIR/release"
fi
work=$(mktemp -d)
PIDS=()
trap 'kill -9 "${PIDS[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/secret"

# start NAME PORT_DIGIT: three nodes NAME-0..2 on 127.0.0.1:17<d>0x (client),
# 17<d>8x (HTTP), 17<d>1x (cluster); waits until all are ready.
start() {
    local name=$1 d=$2 i
    for i in 0 1 2; do
        WARBLER_LOG=warn "$BIN/warbler" serve --node-id "$name-$i" --data-dir "$work/$name-$i" \
            --jwt-secret-file "$work/secret" --client-addr "127.0.0.1:17${d}0$i" \
            --http-addr "127.0.0.1:17${d}8$i" --cluster-addr "127.0.0.1:17${d}1$i" \
            --seeds "127.0.0.1:17${d}10" --bootstrap-expect 3 > "$work/$name-$i.out" 2>&1 &
        PIDS+=($!)
    done
    for i in 0 1 2; do
        for _ in $(seq 600); do
            curl -sf "http://127.0.0.1:17${d}8$i/readyz" >/dev/null 2>&1 && break
            sleep 0.1
        done
    done
}

load() { # load ADDRS SECONDS PREFIX
    "$BIN/warbler-load" run --system warbler --addr "$1" --jwt-secret-file "$work/secret" \
        --users "$USERS" --devices 1 --publishers 4 --procs 2 --body-bytes 256 \
        --duration-secs "$2" --rate 0 --window 1024 --user-prefix "$3" | grep -E 'published='
}

echo "== $(nproc) cores, $(date -u '+%F %H:%M UTC'), fill ${FILL} s x $USERS users, 256 B bodies, $("$BIN/warbler" --version 2>/dev/null || echo warbler)"
start src 5
src="127.0.0.1:17500,127.0.0.1:17501,127.0.0.1:17502"
load "$src" "$FILL" fill | sed 's/^/fill: /'
# A second load runs during the backup: it is online.
load "$src" 20 during > "$work/during" &
LOAD=$!
sleep 3
t0=$(date +%s.%N)
"$BIN/warbler" backup --out "$work/backup" --http 127.0.0.1:17580 --jwt-secret-file "$work/secret"
t1=$(date +%s.%N)
wait "$LOAD" || true
sed 's/^/during the backup: /' "$work/during"
du -sb "$work/backup" | awk '{printf "backup directory: %.1f MB\n", $1 / 1e6}'
start dst 6
"$BIN/warbler" restore --from "$work/backup" --http 127.0.0.1:17680 --jwt-secret-file "$work/secret"
python3 - "$work/backup/manifest.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"manifest: {len(m['partitions'])} partitions, {sum(p['users'] for p in m['partitions'])} users, "
      f"{sum(p['messages'] for p in m['partitions'])} messages, "
      f"{sum(p['bytes'] for p in m['partitions']) / 1e6:.1f} MB")
EOF
echo "backup wall time (with a load running): $(echo "$t1 - $t0" | bc) s"
kill -9 "${PIDS[@]}" 2>/dev/null || true
wait "${PIDS[@]}" 2>/dev/null || true
PIDS=()
