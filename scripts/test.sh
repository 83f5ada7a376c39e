#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the storage crash test, and the integration
# tests that start real warbler processes. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
# The protocol interop test runs a Python client written from docs/protocol.md.
if ! python3 -c "import msgpack" >/dev/null 2>&1; then
    echo "installing the Python msgpack package for the protocol interop test" >&2
    command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-pip >/dev/null; }
    python3 -m pip install --quiet msgpack 2>/dev/null || { apt-get update -qq && apt-get install -y -qq python3-msgpack >/dev/null; }
fi
# The load driver's tests run it against real NATS JetStream and Mosquitto servers.
if ! command -v nats-server >/dev/null 2>&1 || ! { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }; then
    echo "installing nats-server and mosquitto (Debian's packages) for the load driver's tests" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server mosquitto >/dev/null
fi
# The browser tests drive the demo chat and the console in headless Chromium (Selenium).
if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && python3 -c "import selenium" >/dev/null 2>&1; }; then
    echo "installing Chromium, its driver and Selenium for the browser tests" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
        || echo "cannot install Chromium: the browser tests will say they were skipped" >&2
    python3 -m pip install --quiet selenium 2>/dev/null \
        || echo "cannot install selenium: the browser tests will say they were skipped" >&2
fi
# One profile (release) for tests, binaries and benchmarks: RocksDB is compiled once.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace "$@" 2>&1 | tee "$log" || status=$?
# cargo prints one result line per test binary, the last often a doc-test run with no
# tests; end with the total.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
# With no test-name filter: the deployment files (chart, manifests, alerts, dashboard,
# compose) offline, then the compose cluster for real where Docker runs.
if [ $# -eq 0 ]; then
    bash scripts/deploy-check.sh || status=1
    SKIP_BUILD=1 bash scripts/compose-test.sh || status=1
fi
exit "$status"
