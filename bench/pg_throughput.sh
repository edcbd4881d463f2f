#!/usr/bin/env bash
# Heartbeats/s and registrations/s on PostgreSQL next to SQLite, same run: one SQLite
# serve and one PostgreSQL serve (a fresh schema), the same wrk load against each in turn,
# ROUNDS rounds alternating.
#  - heartbeats: wrk -t1 -c64 + bench/heartbeat.lua (10,000 distinct instances), then after
#    one flush interval count the instances on disk / in the schema;
#  - registrations: wrk -t1 -c16 PUTting …/services/svc-N/release (100 services, a new
#    version id per request), then count the rows in `releases`.
# BASE_BIN=/path/to/an/older/lockstep (BASE_NAME=its name in the table) adds a column: that
# binary on SQLite, same loads, same rounds (to tell a slower machine from a slower registry).
# Usage: bench/pg_throughput.sh  (DURATION=10s ROUNDS=2 to change; LOCKSTEP_BENCH_PG for
# another database)
source "$(dirname "$0")/lib.sh"
trap 'echo "pg_throughput.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
need wrk wrk; need psql postgresql-client
build
DURATION=${DURATION:-10s}; ROUNDS=${ROUNDS:-2}; BASE_BIN=${BASE_BIN:-}; BASE_NAME=${BASE_NAME:-BASE_BIN}
V=3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f

declare -A U TITLE
BACKENDS=(sqlite pg)
: >"$WORK/sqlite.out"  # (start_registry reads it at once: it must exist before serve opens it)
start_registry sqlite; U[sqlite]=$URL; TITLE[sqlite]="SQLite"
new_schema tp
start_registry_pg pg "$SCHEMA" tp; U[pg]=$URL; TITLE[pg]="PostgreSQL"
if [ -n "$BASE_BIN" ]; then
  : >"$WORK/base.out"
  BIN=$BASE_BIN start_registry base; U[base]=$URL; TITLE[base]="SQLite, $BASE_NAME"
  BACKENDS+=(base)
fi
for b in "${BACKENDS[@]}"; do URL=${U[$b]} register hb "$V" >/dev/null; done

cat >"$WORK/register.lua" <<'LUA'
-- PUT …/services/svc-N/release, 100 services, a new version id per request (wrk -t1).
local counter = 0
local token = os.getenv("TOKEN") or "bench-admin-token"
local prefix = os.getenv("PREFIX") or "r"
request = function()
  counter = counter + 1
  local path = "/v1/envs/production/services/svc-" .. (counter % 100) .. "/release"
  local body = '{"version_id":"' .. prefix .. "-" .. counter .. '"}'
  return wrk.format("PUT", path,
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token}, body)
end
LUA

# wrk_fig OUTPUT → "rps|avg lat, max lat|non-2xx|requests"
wrk_fig() {
  echo "$1" | awk '
    /Requests\/sec/ {rps=$2}
    /^ +Latency/ {lat=$2" avg, "$4" max"}
    /Non-2xx/ {err=$NF}
    / requests in / {n=$1}
    END {if (err=="") err=0; print rps "|" lat "|" err "|" n}'
}

# store_count BACKEND SQL → one number from that backend's store
store_count() {
  case $1 in
    pg) pg_sql "SET search_path TO $SCHEMA; $2" | tail -n1 ;;
    *) python3 -c "import sqlite3; print(sqlite3.connect('file:$WORK/$1/lockstep.db?mode=ro', uri=True).execute(\"$2\").fetchone()[0])" ;;
  esac
}

declare -A HB RG FLUSHED RELEASES
for r in $(seq "$ROUNDS"); do
  for b in "${BACKENDS[@]}"; do
    HB[$b,$r]=$(wrk_fig "$(TOKEN=$TOKEN wrk -t1 -c64 -d"$DURATION" -s "$ROOT/bench/heartbeat.lua" "${U[$b]}")")
  done
done
sleep 1.2  # one flush interval (500 ms) and then some: the instances are in the store
for b in "${BACKENDS[@]}"; do FLUSHED[$b]=$(store_count "$b" "select count(*) from instances"); done
for r in $(seq "$ROUNDS"); do
  for b in "${BACKENDS[@]}"; do
    RG[$b,$r]=$(wrk_fig "$(TOKEN=$TOKEN PREFIX="r$r" wrk -t1 -c16 -d"$DURATION" -s "$WORK/register.lua" "${U[$b]}")")
  done
done
for b in "${BACKENDS[@]}"; do
  RELEASES[$b]=$(store_count "$b" "select count(*) from releases where service like 'svc-%'")
done

field() { echo "$1" | cut -d'|' -f"$2"; }
# row LABEL ARRAY ROUND FIELD → one table row, a column per backend
row() {
  local -n a=$2; local line="| $1 |"
  for b in "${BACKENDS[@]}"; do line+=" $(field "${a[$b,$3]}" "$4") |"; done
  echo "$line"
}
# sum_row LABEL ARRAY FIELD [SUFFIX_ARRAY] → sum over rounds per backend (" / SUFFIX" after)
sum_row() {
  local -n a=$2; local line="| $1 |"
  for b in "${BACKENDS[@]}"; do
    local s=0
    for r in $(seq "$ROUNDS"); do s=$((s + $(field "${a[$b,$r]}" "$3"))); done
    if [ -n "${4:-}" ]; then local -n x=$4; line+=" $s / ${x[$b]} |"; else line+=" $s |"; fi
  done
  echo "$line"
}
echo "wrk -t1 -d$DURATION per backend and round, backends in turn (fresh schema $SCHEMA)"
echo
head="| figure |"; sep="| --- |"
for b in "${BACKENDS[@]}"; do head+=" ${TITLE[$b]} |"; sep+=" --- |"; done
echo "$head"; echo "$sep"
for r in $(seq "$ROUNDS"); do
  row "heartbeats/s (-c64, 10,000 instances), round $r" HB "$r" 1
  row "heartbeat latency, round $r" HB "$r" 2
done
sum_row "heartbeat non-2xx answers" HB 3
line="| instances in the store 1.2 s after the load |"
for b in "${BACKENDS[@]}"; do line+=" ${FLUSHED[$b]} |"; done; echo "$line"
for r in $(seq "$ROUNDS"); do
  row "registrations/s (-c16, 100 services), round $r" RG "$r" 1
  row "registration latency, round $r" RG "$r" 2
done
sum_row "registration non-2xx answers" RG 3
sum_row "registrations answered / rows in \`releases\`" RG 4 RELEASES
