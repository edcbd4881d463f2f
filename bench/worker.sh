#!/usr/bin/env bash
# The client library in a real worker (examples/axum-worker, release build):
#  1. throughput of GET / with VersionCheckLayer vs without it, same run, alternating;
#  2. time from a PUT's answer to the worker's first 503, over DEPLOYS deploys.
# Usage: bench/worker.sh  (DURATION=10s ROUNDS=3 DEPLOYS=100 to change)
source "$(dirname "$0")/lib.sh"
need wrk wrk
build
(cd "$ROOT" && cargo build --release -q -p axum-worker)
DURATION=${DURATION:-10s}; ROUNDS=${ROUNDS:-3}; DEPLOYS=${DEPLOYS:-100}
V1=3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f
start_registry worker
register api "$V1" >/dev/null

start_worker() { # NAME [args…] → sets W_URL
  local name=$1; shift
  RUST_LOG=error LOCKSTEP_REGISTRY="$URL" LOCKSTEP_TOKEN="$TOKEN" LOCKSTEP_SERVICE=api \
    LOCKSTEP_VERSION_ID="$V1" "$ROOT/target/release/axum-worker" --listen 127.0.0.1:0 "$@" \
    >"$WORK/$name.out" 2>"$WORK/$name.err" &
  PIDS+=($!)
  for _ in $(seq 100); do
    W_URL=$(head -n1 "$WORK/$name.out" 2>/dev/null | sed -n 's/^listening on //p')
    [ -n "$W_URL" ] && return 0
    sleep 0.05
  done
  echo "worker did not start: $(cat "$WORK/$name.err")" >&2; exit 1
}
start_worker layered; LAYERED=$W_URL
start_worker plain --no-version-check; PLAIN=$W_URL
sleep 0.5
[ "$(curl -s -o /dev/null -w '%{http_code}' "$LAYERED/")" = 200 ] || { echo "layered worker not serving" >&2; exit 1; }

echo "### GET / with and without VersionCheckLayer (wrk -t1 -c64 -d$DURATION, alternating)"
echo
echo "| round | with layer req/s | without req/s | ratio |"
echo "| --- | --- | --- | --- |"
L_SUM=0; P_SUM=0
for r in $(seq "$ROUNDS"); do
  L=$(wrk_rps -t1 -c64 -d"$DURATION" "$LAYERED/")
  P=$(wrk_rps -t1 -c64 -d"$DURATION" "$PLAIN/")
  echo "| $r | $L | $P | $(python3 -c "print(f'{$L/$P:.3f}')") |"
  L_SUM=$(python3 -c "print($L_SUM+$L)"); P_SUM=$(python3 -c "print($P_SUM+$P)")
done
echo "| mean | $(python3 -c "print(f'{$L_SUM/$ROUNDS:.0f}')") | $(python3 -c "print(f'{$P_SUM/$ROUNDS:.0f}')") | $(python3 -c "print(f'{$L_SUM/$P_SUM:.3f}')") |"
echo
echo "### PUT answered → first 503 from the worker ($DEPLOYS deploys)"
echo
OUT=$("$ROOT/target/release/lockstep-load" first503 "$URL" "$TOKEN" "$LAYERED/" api "$V1" "$DEPLOYS")
echo "| p50 | p99 | max |"
echo "| --- | --- | --- |"
echo "$OUT" | awk '{print "| "$4" ms | "$6" ms | "$8" ms |"}'
