#!/usr/bin/env bash
# Memory per idle connection of one node: CONNECTIONS idle devices (default 17,000, each of
# a different user) over 2 load processes; the server's RSS growth divided by them, read 3 s
# after the last one came up and again WAIT s later (default 8: past the 5 s after which a
# quiet mailbox sleeps). `make bench` measures the same beside NATS.
#
#   bash benches/idle_memory.sh                 # TLS off, this checkout's binary
#   TLS=on bash benches/idle_memory.sh
#   BIN=/path/to/other/warbler bash benches/idle_memory.sh   # another build
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
CONNECTIONS="${CONNECTIONS:-17000}"
TLS="${TLS:-off}"
WAIT="${WAIT:-8}"
cargo build --release --workspace --bin warbler --bin warbler-load >&2
LOAD="$CARGO_TARGET_DIR/release/warbler-load"
BIN="${BIN:-$CARGO_TARGET_DIR/release/warbler}"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
ulimit -n 20000 2>/dev/null || true
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/secret"
tls_args=()
if [ "$TLS" = on ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=bench-ca -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
    printf "subjectAltName=DNS:localhost,IP:127.0.0.1\n" > "$work/ext"
    openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
        -days 2 -extfile "$work/ext" -out "$work/tls.pem" 2>/dev/null
    tls_args=(--tls-ca-file "$work/ca.pem")
    export WARBLER_TLS_CERT_FILE="$work/tls.pem" WARBLER_TLS_KEY_FILE="$work/tls.key"
fi
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
WARBLER_LOG=warn "$BIN" serve --node-id m0 --data-dir "$work/m0" --jwt-secret-file "$work/secret" \
    --client-addr 127.0.0.1:17800 --http-addr 127.0.0.1:17880 > "$work/m0.out" 2>&1 &
pid=$!
for _ in $(seq 600); do curl -sf http://127.0.0.1:17880/readyz >/dev/null 2>&1 && break; sleep 0.1; done
sleep 1
before=$(rss "$pid")
half=$((CONNECTIONS / 2))
for p in 1 2; do
    "$LOAD" idle --addr 127.0.0.1:17800 --jwt-secret-file "$work/secret" "${tls_args[@]}" \
        --connections "$half" --user-prefix "idle$p" --hold-secs 300 > "$work/idle$p.out" 2>&1 &
done
for _ in $(seq 1200); do
    [ "$(cat "$work"/idle[12].out 2>/dev/null | grep -c '^connected')" = 2 ] && break; sleep 0.2
done
up=$(cat "$work"/idle[12].out | awk '/^connected/ {s += $2} END {print s + 0}')
sleep 3
early=$(rss "$pid")
sleep "$WAIT"
after=$(rss "$pid")
echo "tls=$TLS connections=$up RSS ${before} -> ${early} (3 s) -> ${after} KiB ($((3 + WAIT)) s)"
echo "memory per idle connection: $(( (early - before) * 1024 / up )) bytes at 3 s, $(( (after - before) * 1024 / up )) bytes at $((3 + WAIT)) s"
curl -s http://127.0.0.1:17880/metrics | grep -E "^warbler_(mailboxes_alive|mailboxes_asleep|sessions_alive) " || true
