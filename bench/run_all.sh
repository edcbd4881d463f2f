#!/usr/bin/env bash
# Every registry figure of docs/benchmarks.md, one table each.
set -euo pipefail
cd "$(dirname "$0")"
echo "## GET …/release vs nginx"; ./release_get.sh; echo
echo "## Heartbeats"; ./heartbeats.sh; echo
echo "## Watch fan-out and idle memory"; ./watch_fanout.sh; echo
echo "## Client library in a worker"; ./worker.sh
echo
echo "## Gateway"; ./gateway.sh
echo
# The PostgreSQL figures need a database (LOCKSTEP_BENCH_PG, default the local `test` one).
PG=${LOCKSTEP_BENCH_PG:-postgres://postgres@127.0.0.1:5432/test}
if psql -X -qtA "$PG" -c 'select 1' >/dev/null 2>&1; then
  echo "## Replicas: cross-replica propagation and failover"; ./replicas.sh; echo
  echo "## Heartbeats and registrations, PostgreSQL next to SQLite"; ./pg_throughput.sh
else
  echo "(replicas.sh and pg_throughput.sh skipped: no PostgreSQL at $PG)"
fi
