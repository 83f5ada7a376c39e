#!/usr/bin/env bash
# Runs Warbler locally on its embedded defaults: device protocol on 127.0.0.1:7400, HTTP on
# 127.0.0.1:7480, data in ./data. Extra arguments go to `warbler dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
exec cargo run --release --bin warbler -- dev "$@"
