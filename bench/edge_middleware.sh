#!/usr/bin/env bash
# Overhead of the TypeScript version check (clients/typescript) per request on a warm cache:
# Node, a Hono app with and without `versionCheck`, same run, alternating rounds; in process
# and over HTTP (wrk). Prints a table (docs/benchmarks.md, "Edge middleware").
#   bench/edge_middleware.sh            # ROUNDS=5 REQUESTS=200000 WRK_SECS=3 by default
source "$(dirname "$0")/lib.sh"
need node nodejs
need wrk wrk
# The registry is read once (warm-up): a debug build is enough and avoids a release build.
BIN="${LOCKSTEP_BENCH_BIN:-$ROOT/target/debug/lockstep}"
(cd "$ROOT" && cargo build -q -p lockstep-cli --bin lockstep)
(cd "$ROOT/clients/typescript" && { [ -d node_modules ] || npm ci --no-audit --no-fund --loglevel=error; } && npm run -s build)
start_registry edge
LOCKSTEP_URL="$URL" LOCKSTEP_TOKEN="$TOKEN" node "$ROOT/clients/typescript/bench/overhead.mjs"
