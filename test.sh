#!/usr/bin/env bash
# Every test of the workspace, against the real services they need: SQLite files, and the
# PostgreSQL and Redis of this machine (started here when they are stopped). Tests that
# need PostgreSQL or Redis read LOCKSTEP_TEST_PG / LOCKSTEP_TEST_REDIS; each test uses its
# own schema or key prefix, so nothing here needs a clean database.
# Without arguments it then checks the HTTP API with third-party tools (.ci/api-check.sh:
# openapi-spec-validator and schemathesis against a live `lockstep serve`).
#   ./test.sh                 # everything
#   ./test.sh -p lockstep-store   # extra arguments go to `cargo test` (no API check)
set -euo pipefail
cd "$(dirname "$0")"

if command -v pg_isready >/dev/null && ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  echo "== starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
if command -v redis-cli >/dev/null && ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "== starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
fi
export LOCKSTEP_TEST_PG="${LOCKSTEP_TEST_PG:-postgres://postgres@127.0.0.1:5432/test}"
export LOCKSTEP_TEST_REDIS="${LOCKSTEP_TEST_REDIS:-redis://127.0.0.1:6379}"

# Every PostgreSQL test works in its own schema `lockstep_t_<random>`; drop them before
# and after the run (a test that fails or is killed does not drop its own).
drop_test_schemas() {
  command -v psql >/dev/null || return 0
  psql "$LOCKSTEP_TEST_PG" -qAtc "SELECT 'DROP SCHEMA IF EXISTS \"' || nspname || '\" CASCADE;' FROM pg_namespace WHERE nspname LIKE 'lockstep\_t\_%'" 2>/dev/null |
    psql "$LOCKSTEP_TEST_PG" -q >/dev/null 2>&1 || true
}
drop_test_schemas
trap drop_test_schemas EXIT

.ci/alerts-deps.sh   # the SMTP server of the alert email test
echo "== cargo test (PostgreSQL: $LOCKSTEP_TEST_PG, Redis: $LOCKSTEP_TEST_REDIS)"
cargo test --workspace "$@"

if [ "$#" -eq 0 ]; then
  echo "== API check (.ci/api-check.sh)"
  .ci/api-check.sh
  .ci/clients-check.sh && .ci/ts-check.sh
fi
