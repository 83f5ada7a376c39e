#!/usr/bin/env bash
# Runs Warbler locally on its embedded defaults: device protocol on 127.0.0.1:7400, HTTP on
# 127.0.0.1:7480, data in ./data. Extra arguments go to `warbler dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
# --workspace, as scripts/test.sh builds: both resolve the same features, so neither
# rebuilds what the other built.
cargo build --release --workspace --bin warbler
exec "$CARGO_TARGET_DIR/release/warbler" dev "$@"
