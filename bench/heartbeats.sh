#!/usr/bin/env bash
# Heartbeats per second on the SQLite store with 10,000 distinct instances.
# Usage: bench/heartbeats.sh  (DURATION=10s to change)
source "$(dirname "$0")/lib.sh"
need wrk wrk
build
DURATION=${DURATION:-10s}
start_registry hb
register hb 3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f >/dev/null
OUT=$(TOKEN=$TOKEN wrk -t1 -c64 -d"$DURATION" -s "$(dirname "$0")/heartbeat.lua" "$URL")
RPS=$(echo "$OUT" | awk '/Requests\/sec/ {print $2}')
LAT=$(echo "$OUT" | awk '/Latency/ {print $2" avg, "$4" max"}')
ERRS=$(echo "$OUT" | awk '/Non-2xx/ {print $NF}')
sleep 1.2  # one flush interval: the instances are on disk
COUNT=$(curl -sf -H "Authorization: Bearer $TOKEN" "$URL/v1/status?service=hb" |
  python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d["environments"][0]["services"][0]["instances"]))')
ONDISK=$(python3 -c "import sqlite3; print(sqlite3.connect('file:$WORK/hb/lockstep.db?mode=ro', uri=True).execute('select count(*) from instances').fetchone()[0])")
echo "| figure | value |"
echo "| --- | --- |"
echo "| heartbeats/s (wrk -t1 -c64 -d$DURATION, 10,000 instances) | $RPS |"
echo "| latency | $LAT |"
echo "| non-2xx answers | ${ERRS:-0} |"
echo "| instances in /v1/status | $COUNT |"
echo "| instances flushed to SQLite | $ONDISK |"
echo "| serve RSS after | $(rss_mb "$REG_PID") MB |"
