# Shared helpers for the benchmark scripts: build, start a registry on a free port with a
# temporary data dir, clean up on exit. Source it; it sets ROOT, BIN, TOKEN and uses WORK.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# LOCKSTEP_BENCH_BIN=/path/to/an/older/lockstep measures another build with the same
# scripts (same-run comparisons with an earlier commit).
BIN="${LOCKSTEP_BENCH_BIN:-$ROOT/target/release/lockstep}"
TOKEN="bench-admin-token"
WORK="$(mktemp -d /tmp/lockstep-bench.XXXXXX)"
chmod 755 "$WORK"  # nginx workers (www-data) read the static file from here
PIDS=()
PG_SCHEMAS=()  # fresh PostgreSQL schemas made by new_schema, dropped on exit

cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for s in "${PG_SCHEMAS[@]:-}"; do
    [ -n "$s" ] && pg_sql "DROP SCHEMA IF EXISTS $s CASCADE" >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

build() {
  (cd "$ROOT" && cargo build --release -q -p lockstep-cli -p lockstep-testkit --bin lockstep --bin lockstep-load)
}

need() {
  command -v "$1" >/dev/null || { echo "needs $1 (apt-get install $2)" >&2; exit 2; }
}

# start_registry NAME [serve args…] → sets URL and REG_PID
start_registry() {
  local name=$1; shift
  RUST_LOG=warn LOCKSTEP_ADMIN_TOKEN="$TOKEN" ${SERVE_ENV:-} "$BIN" serve --listen 127.0.0.1:0 \
    --data-dir "$WORK/$name" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  REG_PID=$!
  PIDS+=("$REG_PID")
  for _ in $(seq 100); do
    URL=$(head -n1 "$WORK/$name.out" 2>/dev/null | sed -n 's/^listening on //p' || true)
    [ -n "$URL" ] && return 0
    sleep 0.05
  done
  echo "registry did not start: $(cat "$WORK/$name.err")" >&2
  exit 1
}

register() { # register SERVICE VERSION_ID → prints the answer
  curl -sf -X PUT -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
    "$URL/v1/envs/production/services/$1/release" -d "{\"version_id\":\"$2\"}"
}

rss_mb() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

# wrk_rps ARGS… → requests/s as a number
wrk_rps() { wrk "$@" | awk '/Requests\/sec/ {print $2}'; }

# --- PostgreSQL (several replicas on one database) ---
# The database: LOCKSTEP_BENCH_PG (default postgres://postgres@127.0.0.1:5432/test, trust
# auth), for serve and psql alike.
PG_URL=${LOCKSTEP_BENCH_PG:-postgres://postgres@127.0.0.1:5432/test}

# pg_sql SQL → rows, unaligned
pg_sql() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -t -A -v ON_ERROR_STOP=1 "$PG_URL" -c "$1"; }

# new_schema NAME → sets SCHEMA to a fresh, empty schema lockstep_bench_<pid>_NAME, dropped
# on exit
new_schema() {
  SCHEMA="lockstep_bench_$$_$1"
  pg_sql "DROP SCHEMA IF EXISTS $SCHEMA CASCADE; CREATE SCHEMA $SCHEMA" >/dev/null
  PG_SCHEMAS+=("$SCHEMA")
}

# start_registry_pg NAME SCHEMA REPLICA [serve args…] → sets URL and REG_PID; a replica on
# the store PG_URL in SCHEMA. Logs go to $WORK/NAME.err at REG_LOG (default warn).
start_registry_pg() {
  local name=$1 schema=$2 replica=$3; shift 3
  local sep='?'; [[ "$PG_URL" == *\?* ]] && sep='&'
  # The files exist before the child opens them: reading a missing one in the loop below
  # would end the script (set -e, pipefail) without a word.
  : >"$WORK/$name.out"; : >"$WORK/$name.err"
  RUST_LOG=${REG_LOG:-warn} LOCKSTEP_ADMIN_TOKEN="$TOKEN" "$BIN" serve --listen 127.0.0.1:0 \
    --store "$PG_URL${sep}options=-c%20search_path%3D$schema" --replica-id "$replica" "$@" \
    >"$WORK/$name.out" 2>"$WORK/$name.err" &
  REG_PID=$!
  PIDS+=("$REG_PID")
  for _ in $(seq 200); do
    URL=$(sed -n '1s/^listening on //p' "$WORK/$name.out" 2>/dev/null || true)
    [ -n "$URL" ] && return 0
    kill -0 "$REG_PID" 2>/dev/null || break
    sleep 0.05
  done
  echo "replica $replica did not start: $(cat "$WORK/$name.err")" >&2
  exit 1
}

# leader_of URL → the leader that replica sees in /v1/status (empty if none); no python
# here: it is polled, and a python start costs 100+ ms on a busy 2-core machine
leader_of() {
  local j; j=$(curl -sf -m 2 -H "Authorization: Bearer $TOKEN" "$1/v1/status" || true)
  [[ "$j" =~ \"registry\":\{[^}]*\"leader\":\"([^\"]*)\" ]] && echo "${BASH_REMATCH[1]}" || echo ""
}
