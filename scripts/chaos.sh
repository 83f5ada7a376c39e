#!/usr/bin/env bash
# The full chaos matrix: every scenario in chaos/scenarios (but the CI one) RUNS times with
# consecutive seeds, plus four deliberately broken builds; writes the results section of
# docs/chaos.md and its plots. About 2 hours with the defaults on 2 cores (15 scenarios of
# 35-150 s of load each, plus start, heal and the final read); RUNS=1 took 24 min 32 s on
# 2026-12-03, the broken builds included.
#
#   RUNS=5 SEED=<first seed> DURATION=<override seconds> OUT=/tmp/warbler-chaos-matrix
#   NET=auto|netns|loopback|docker (docker: containers of warbler:latest, built here first)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
RUNS="${RUNS:-5}"
SEED="${SEED:-$(( $(date +%s) % 100000 ))}"
OUT="${OUT:-/tmp/warbler-chaos-matrix}"
python3 -c "import matplotlib" 2>/dev/null || python3 -m pip install --quiet matplotlib
cargo build --release --workspace --bin warbler --bin warbler-chaos
chaos="$CARGO_TARGET_DIR/release/warbler-chaos"
NET="${NET:-auto}"
if [ "$NET" = docker ]; then bash scripts/docker-image.sh; fi
rm -rf "$OUT" && mkdir -p "$OUT"
start=$(date +%s)
extra=(--net "$NET")
if [ -n "${DURATION:-}" ]; then extra+=(--duration "$DURATION"); fi
echo "chaos matrix: $RUNS runs per scenario from seed $SEED; results in $OUT" >&2
scenarios=()
for s in chaos/scenarios/*.toml; do
    [ "$(basename "$s")" = ci-short.toml ] || scenarios+=("$s")
done
# An invalid run exits 1; the report shows it, so go on.
"$chaos" run "${scenarios[@]}" --runs "$RUNS" --seed "$SEED" --out "$OUT/matrix" "${extra[@]}" || true
# Deliberately broken builds: each must be caught.
"$chaos" run chaos/scenarios/kill-hot-leader.toml --bug ack-before-commit --seed "$SEED" --out "$OUT/bugs" "${extra[@]}" || true
"$chaos" run chaos/scenarios/ci-short.toml --bug skip-seq --seed "$SEED" --out "$OUT/bugs" --net "$NET" || true
"$chaos" run chaos/scenarios/sts-backup-restore.toml --bug backup-without-cursors --seed "$SEED" --out "$OUT/bugs" "${extra[@]}" || true
"$chaos" run chaos/scenarios/overload.toml --bug unchained-publishes --seed "$SEED" --out "$OUT/bugs" --duration 20 --net "$NET" || true
took=$(( $(date +%s) - start ))
cmd="make chaos"
if [ "$NET" != auto ]; then cmd="NET=$NET $cmd"; fi
if [ "$RUNS" != 5 ]; then cmd="RUNS=$RUNS $cmd"; fi
printf '{"command": "%s", "date": "%s", "took": "%d min %d s"}\n' \
    "$cmd" "$(date -u +%Y-%m-%d)" $((took / 60)) $((took % 60)) > "$OUT/info.json"
python3 chaos/report.py "$OUT" docs/chaos.md docs/img
