#!/usr/bin/env bash
# Where one node's slowest publishes wait: benches/single_rate.sh at 7,871/s with every
# delivery at least SLOW_MS late split into "in" (due -> accepted by the user's mailbox) and
# "out" (accepted -> received), by 50 ms window of due time, beside the publishes the load
# generator itself sent late (docs/benchmarks.md, "Where a node's slowest publishes wait").
#
#   bash benches/tail.sh                        # RATE=7871 DURATION=10 RUNS=3 SLOW_MS=30
#   BIN=/some/other/build bash benches/tail.sh  # the same against other binaries
#
# Nothing else should run on the machine meanwhile: servers and load share the cores.
set -euo pipefail
RATE="${RATE:-7871}" RUNS="${RUNS:-3}" SLOW_MS="${SLOW_MS:-30}" WINDOWS=1 \
    exec bash "$(dirname "$0")/single_rate.sh"
