#!/usr/bin/env bash
# What a scrape and a one-service status cost at fleet scale: INSTANCES (default 300,000)
# heartbeating instances over 100 services (3,000 each) plus a small service of 20, then
# the median of REPEAT (default 20) sequential requests of each kind.
# Usage: bench/fleet_scale.sh   (INSTANCES=300000 REPEAT=20)
source "$(dirname "$0")/lib.sh"
need wrk wrk
build
INSTANCES=${INSTANCES:-300000}; REPEAT=${REPEAT:-20}
start_registry fleet --instance-ttl 10m
register hb-7 3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f >/dev/null
register small 3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f >/dev/null
for i in $(seq 20); do
  curl -sf -o /dev/null -X POST -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
    "$URL/v1/instances" -d "{\"instance_id\":\"small-$i\",\"service\":\"small\",\"version_id\":\"v$((i % 3))\"}"
done
# Enough requests to send every instance at least once.
TOKEN=$TOKEN INSTANCES=$INSTANCES wrk -t1 -c64 -d60s -s "$(dirname "$0")/heartbeat_fleet.lua" "$URL" >"$WORK/wrk.out" &
WRK=$!
for _ in $(seq 600); do
  N=$(curl -sf "$URL/metrics" | awk '/^lockstep_instances_total/ {s+=$2} END {print s+0}')
  [ "${N:-0}" -ge $((INSTANCES + 20)) ] && break
  sleep 0.2
done
kill $WRK 2>/dev/null || true; wait $WRK 2>/dev/null || true
sleep 1
# median_ms URL [curl args…] → the median time_total of REPEAT requests, in ms
median_ms() {
  local url=$1; shift
  for _ in $(seq "$REPEAT"); do
    curl -sf -o /dev/null -w '%{time_total}\n' "$@" "$url"
  done | sort -n | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)]*1000}'
}
size_kb() { curl -sf "$@" | wc -c | awk '{printf "%.0f", $1/1024}'; }
AUTH=(-H "Authorization: Bearer $TOKEN")
echo "instances known: $N (wrk -t1 -c64 heartbeats until every one was seen; RSS $(rss_mb "$REG_PID") MB)"
echo
echo "| request | median of $REPEAT | body |"
echo "| --- | --- | --- |"
echo "| GET /metrics | $(median_ms "$URL/metrics") ms | $(size_kb "$URL/metrics") KiB |"
echo "| GET /v1/status?service=small (20 instances) | $(median_ms "$URL/v1/status?service=small" "${AUTH[@]}") ms | $(size_kb "${AUTH[@]}" "$URL/v1/status?service=small") KiB |"
echo "| GET /v1/status?service=hb-7 (3,000 instances) | $(median_ms "$URL/v1/status?service=hb-7" "${AUTH[@]}") ms | $(size_kb "${AUTH[@]}" "$URL/v1/status?service=hb-7") KiB |"
REPEAT=3
echo "| GET /v1/status (every instance; median of 3) | $(median_ms "$URL/v1/status" "${AUTH[@]}") ms | $(size_kb "${AUTH[@]}" "$URL/v1/status") KiB |"
