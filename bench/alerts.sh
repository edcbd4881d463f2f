#!/usr/bin/env bash
# Drift-alert figures: time from an instance going stale to a webhook receiver holding the
# alert (thresholds 0), and what a fleet-wide drift sends per channel (rate-limit window 1m).
#   bench/alerts.sh [ROUNDS] [FLEET]     (defaults 20 and 1000)
# Prints a markdown table. LOCKSTEP_BENCH_BIN=… measures another build.
source "$(dirname "$0")/lib.sh"
ROUNDS=${1:-20}
FLEET=${2:-1000}
[ -n "${LOCKSTEP_BENCH_BIN:-}" ] || build
need python3 python3

echo "| figure | | | |"
echo "| --- | --- | --- | --- |"
start_registry latency --drift-low 0s --alert-rate-limit 0s
python3 "$ROOT/bench/alerts_driver.py" latency "$URL" "$TOKEN" "$ROUNDS"
start_registry fleet --drift-low 0s --alert-rate-limit 1m
python3 "$ROOT/bench/alerts_driver.py" fleet "$URL" "$TOKEN" "$FLEET"
