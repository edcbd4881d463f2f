#!/usr/bin/env bash
# Watch fan-out latency (PUT answered → last of 1,000 watchers has the event, 50 deploys)
# and serve's memory with 10,000 idle watchers.
# Usage: bench/watch_fanout.sh  (WATCHERS=1000 DEPLOYS=50 IDLE=10000 to change)
source "$(dirname "$0")/lib.sh"
build
ulimit -n 20000 2>/dev/null || true
WATCHERS=${WATCHERS:-1000}; DEPLOYS=${DEPLOYS:-50}; IDLE=${IDLE:-10000}
FAN="$ROOT/target/release/lockstep-load"
start_registry fan
FAN_OUT=$("$FAN" fanout "$URL" "$TOKEN" "$WATCHERS" "$DEPLOYS" | tail -n1)
kill "$REG_PID"; wait "$REG_PID" 2>/dev/null || true
start_registry idle
BEFORE=$(rss_mb "$REG_PID")
"$FAN" idle "$URL" "$TOKEN" "$IDLE" 8 >"$WORK/idle.out" & FPID=$!; PIDS+=("$FPID")
for _ in $(seq 600); do grep -q connected "$WORK/idle.out" 2>/dev/null && break; sleep 0.2; done
sleep 2
WITH=$(rss_mb "$REG_PID")
WATCHING=$(curl -sf "$URL/metrics" | awk '/^lockstep_watchers / {print $2}')
wait "$FPID" || true
echo "| figure | value |"
echo "| --- | --- |"
echo "| fan-out ($WATCHERS watchers, $DEPLOYS deploys) | $(echo "$FAN_OUT" | awk '{print "p50 "$6" ms, p99 "$8" ms, max "$10" ms"}') |"
echo "| serve RSS idle, no watchers | $BEFORE MB |"
echo "| serve RSS with $IDLE idle watchers ($WATCHING open) | $WITH MB |"
