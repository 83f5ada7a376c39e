#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the storage crash test, and the integration
# tests that start real warbler processes. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
# One profile (release) for tests, binaries and benchmarks: RocksDB is compiled once.
cargo test --release --workspace "$@"
