#!/usr/bin/env bash
# Two `serve` replicas on one PostgreSQL database:
#  1. propagation: WATCHERS raw-socket SSE watchers; every deploy is a PUT through replica A;
#     time from A's answer until the last watcher has the event, DEPLOYS deploys 100 ms
#     apart. Watchers on B (cross-replica: NOTIFY + catch-up read) and on A (same replica),
#     alternating, ROUNDS of each, same run;
#  2. failover: kill -9 the leader (as /v1/status names it), then the time until the
#     survivor logs "this replica is now the leader" and "leader: first TTL scan done" (the
#     JSON log lines' own timestamps) and until the survivor's /v1/status names itself
#     leader (polled: a curl every ~25 ms); REPEATS times per --leader-lease in LEASES, each on a
#     fresh schema. The lease is renewed every lease/5 (clamped to 0.2–1 s) and the survivor
#     tries as often, so expect lease ± one renewal interval.
# Usage: bench/replicas.sh  (WATCHERS=1000 DEPLOYS=50 ROUNDS=2 REPEATS=3 LEASES="5s 2s"
# PARTS="propagation failover" to change; LOCKSTEP_BENCH_PG for another database)
source "$(dirname "$0")/lib.sh"
trap 'echo "replicas.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
need psql postgresql-client
build
ulimit -n 20000 2>/dev/null || true
WATCHERS=${WATCHERS:-1000}; DEPLOYS=${DEPLOYS:-50}; ROUNDS=${ROUNDS:-2}
REPEATS=${REPEATS:-3}; LEASES=${LEASES:-5s 2s}; PARTS=${PARTS:-propagation failover}
FAN="$ROOT/target/release/lockstep-load"

stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# --- 1. propagation ---
if [[ " $PARTS " == *" propagation "* ]]; then
new_schema prop
start_registry_pg prop-a "$SCHEMA" A; A_URL=$URL; A_PID=$REG_PID
start_registry_pg prop-b "$SCHEMA" B; B_URL=$URL; B_PID=$REG_PID
echo "### PUT through A answered → last of $WATCHERS watchers has the event ($DEPLOYS deploys, 100 ms apart)"
echo
echo "| watchers on | round | p50 | p99 | max | p50 / p99 from the PUT sent |"
echo "| --- | --- | --- | --- | --- | --- |"
for r in $(seq "$ROUNDS"); do
  for where in B A; do
    [ "$where" = B ] && W=$B_URL || W=$A_URL
    OUT=$("$FAN" fanout2 "$A_URL" "$W" "$TOKEN" "$WATCHERS" "$DEPLOYS" | tail -n1)
    [ "$where" = B ] && label="B (other replica)" || label="A (same replica)"
    echo "$OUT" | awk -v l="$label" -v r="$r" '{print "| "l" | "r" | "$6" ms | "$8" ms | "$10" ms | "$12" / "$14" ms |"}'
  done
done
stop "$A_PID"; stop "$B_PID"
pg_sql "DROP SCHEMA $SCHEMA CASCADE" >/dev/null
fi
[[ " $PARTS " == *" failover "* ]] || exit 0

# --- 2. failover ---
# wait_for SECS CMD… → runs CMD every 10 ms until it succeeds; fails after SECS
wait_for() {
  local until=$(( ${EPOCHREALTIME/./} + $1 * 1000000 )); shift
  until "$@"; do
    (( ${EPOCHREALTIME/./} < until )) || return 1
    sleep 0.01
  done
}
leads() { [ "$(leader_of "$1")" = "$2" ]; }
# log_at FILE MESSAGE → epoch seconds of the last JSON log line with that message
log_at() {
  python3 - "$1" "$2" <<'PY'
import json, sys, datetime
t = None
for line in open(sys.argv[1]):
    try:
        j = json.loads(line)
    except ValueError:
        continue
    if j.get("fields", {}).get("message") == sys.argv[2]:
        t = datetime.datetime.fromisoformat(j["timestamp"].replace("Z", "+00:00")).timestamp()
print("" if t is None else f"{t:.6f}")
PY
}
since() { python3 -c "print(f'{($1 - $2):.2f}')"; }  # since T T0 → seconds

echo
echo "### Failover: kill -9 the leader → the survivor leads (two replicas, $REPEATS runs per lease)"
echo
echo "| --leader-lease | run | killed | → \"now the leader\" (log) | → \"first TTL scan done\" (log) | → /v1/status leader (polled) |"
echo "| --- | --- | --- | --- | --- | --- |"
for lease in $LEASES; do
  SUM_LOG=0; SUM_SCAN=0; SUM_POLL=0
  for i in $(seq "$REPEATS"); do
    new_schema "fo_${lease}_$i"
    REG_LOG=info start_registry_pg "fo-$lease-$i-a" "$SCHEMA" A --leader-lease "$lease" --log-format json
    A_URL=$URL; A_PID=$REG_PID
    wait_for 20 leads "$A_URL" A || { echo "A never led" >&2; exit 1; }
    # B at a random offset too: the phase between A's renewals and B's attempts is part of
    # the takeover time, and real replicas do not start in step.
    sleep "0.$(printf %03d $((RANDOM % 1000)))"
    REG_LOG=info start_registry_pg "fo-$lease-$i-b" "$SCHEMA" B --leader-lease "$lease" --log-format json
    B_URL=$URL; B_PID=$REG_PID
    wait_for 20 leads "$B_URL" A || { echo "B never saw A lead" >&2; exit 1; }
    # Both replicas settled; then kill at a random moment within a second, i.e. at a random
    # phase of the leader's renewals and of the survivor's attempts (a fixed delay after B's
    # first attempt would always kill just before one of B's attempts: a biased figure).
    sleep "1.$(printf %03d $((RANDOM % 1000)))"
    if [ "$(leader_of "$A_URL")" = A ]; then
      VICTIM=$A_PID; SURV=B; S_URL=$B_URL; S_LOG="$WORK/fo-$lease-$i-b.err"; S_PID=$B_PID
    else
      VICTIM=$B_PID; SURV=A; S_URL=$A_URL; S_LOG="$WORK/fo-$lease-$i-a.err"; S_PID=$A_PID
    fi
    disown "$VICTIM"  # no "Killed" job notice on stderr; bash still reaps it
    T0=$EPOCHREALTIME
    kill -9 "$VICTIM"
    wait_for 60 leads "$S_URL" "$SURV" || { echo "$SURV never took over" >&2; exit 1; }
    T_POLL=$EPOCHREALTIME
    wait_for 10 grep -q "leader: first TTL scan done" "$S_LOG" || { echo "no first TTL scan on $SURV" >&2; exit 1; }
    T_LEAD=$(log_at "$S_LOG" "this replica is now the leader")
    T_SCAN=$(log_at "$S_LOG" "leader: first TTL scan done")
    D_LOG=$(since "$T_LEAD" "$T0"); D_SCAN=$(since "$T_SCAN" "$T0"); D_POLL=$(since "$T_POLL" "$T0")
    [ "$VICTIM" = "$A_PID" ] && KILLED=A || KILLED=B
    echo "| $lease | $i | $KILLED | $D_LOG s | $D_SCAN s | $D_POLL s |"
    SUM_LOG=$(python3 -c "print($SUM_LOG+$D_LOG)"); SUM_SCAN=$(python3 -c "print($SUM_SCAN+$D_SCAN)")
    SUM_POLL=$(python3 -c "print($SUM_POLL+$D_POLL)")
    stop "$S_PID"
    pg_sql "DROP SCHEMA $SCHEMA CASCADE" >/dev/null  # (and again, harmlessly, on exit)
  done
  mean() { python3 -c "print(f'{$1/$REPEATS:.2f}')"; }
  echo "| $lease | mean | | $(mean "$SUM_LOG") s | **$(mean "$SUM_SCAN") s** | $(mean "$SUM_POLL") s |"
done
