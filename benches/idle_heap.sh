#!/usr/bin/env bash
# Where an idle connection's memory goes: one node under heaptrack, CONNECTIONS idle devices
# (default 4,000), its heap at the peak broken down by category, bytes per connection.
#
#   bash benches/idle_heap.sh                       # this checkout's binary
#   BEFORE=/path/to/old/warbler bash benches/idle_heap.sh   # and a table against another build
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
CONNECTIONS="${CONNECTIONS:-4000}"
command -v heaptrack >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq heaptrack >/dev/null; }
cargo build --release --workspace --bin warbler --bin warbler-load >&2
BIN="$CARGO_TARGET_DIR/release"
work=$(mktemp -d)
trap 'kill -9 $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/secret"

# profile NAME BINARY: heaptrack's peak stacks of BINARY holding the connections.
profile() {
    local name=$1 binary=$2
    rm -rf "$work/data"
    # heaptrack sees what goes through the C library's malloc; the node's own allocator
    # (mimalloc) would hide it, so the node runs on the C library's here (src/alloc.rs).
    WARBLER_ALLOCATOR=system WARBLER_LOG=warn heaptrack -o "$work/$name" "$binary" serve --node-id h0 --data-dir "$work/data" \
        --jwt-secret-file "$work/secret" --client-addr 127.0.0.1:17900 --http-addr 127.0.0.1:17980 \
        > "$work/$name.out" 2>&1 &
    local server=$!
    for _ in $(seq 1200); do curl -sf http://127.0.0.1:17980/readyz >/dev/null 2>&1 && break; sleep 0.1; done
    "$BIN/warbler-load" idle --addr 127.0.0.1:17900 --jwt-secret-file "$work/secret" \
        --connections "$CONNECTIONS" --user-prefix heap --hold-secs 300 > "$work/load.out" 2>&1 &
    local load=$!
    for _ in $(seq 1200); do grep -q '^connected' "$work/load.out" 2>/dev/null && break; sleep 0.2; done
    echo "$name: $(grep '^connected' "$work/load.out")" >&2
    sleep 10 # past the 5 s after which a quiet mailbox sleeps
    kill -INT "$server"; wait "$server" 2>/dev/null || true
    kill "$load" 2>/dev/null || true; wait "$load" 2>/dev/null || true
    heaptrack_print -f "$work/$name.zst" --print-peaks 0 --print-allocators 0 --print-temporary 0 \
        --print-leaks 0 --flamegraph-cost-type peak -F "$work/$name.stacks" >/dev/null 2>&1
}
profile after "$BIN/warbler"
if [ -n "${BEFORE:-}" ]; then
    profile before "$BEFORE"
else
    cp "$work/after.stacks" "$work/before.stacks"
fi
python3 benches/heap_breakdown.py "$CONNECTIONS" "$work/before.stacks" "$work/after.stacks"
