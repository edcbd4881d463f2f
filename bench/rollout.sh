#!/usr/bin/env bash
# Fleet rollouts (release build), same run:
#  1. 50 agents on loopback, a 10 MB package: `lockstep rollout` (no canary) at concurrency
#     1, 5 and 25, next to the same uploads + applies + version checks done with curl from
#     a shell loop (xargs -P) at the same concurrency;
#  2. `rollback --now` during a rollout over the 50 agents: time until every agent reports
#     the previous release.
# The agents run no worker (`--restart-command true`, no health URL): the figures are the
# coordinator's and the agents' own cost, not a worker's start-up.
# Usage: bench/rollout.sh  (AGENTS=50 to change)
source "$(dirname "$0")/lib.sh"
need curl curl
(cd "$ROOT" && cargo build --release -q -p lockstep-cli --bin lockstep)
AGENTS=${AGENTS:-50}
AGENT_TOKEN=bench-agent-token

"$BIN" package keygen --out "$WORK/key" >/dev/null 2>&1
mkdir -p "$WORK/tree"
head -c 10485760 /dev/urandom >"$WORK/tree/blob.bin"
pkg() { # pkg N → $WORK/vN.tar.gz (+ .sig), version id id-N
  echo "$1" >"$WORK/tree/VERSION"
  "$BIN" package create --service bench --version "v$1" --version-id "id-$1" \
    --out "$WORK/v$1.tar.gz" "$WORK/tree" >/dev/null 2>&1
  "$BIN" package sign --key "$WORK/key" "$WORK/v$1.tar.gz" >/dev/null
}
for n in 1 2 3 4 5 6 7 8 9; do pkg "$n"; done

start_registry reg --agent-token "$AGENT_TOKEN"
export LOCKSTEP_REGISTRY="$URL" LOCKSTEP_TOKEN="$TOKEN"
register bench id-1 >/dev/null

URLS=()
for i in $(seq "$AGENTS"); do
  RUST_LOG=warn "$BIN" agent --root "$WORK/a$i" --listen 127.0.0.1:0 --token "$AGENT_TOKEN" \
    --trusted-key "$WORK/key.pub" --restart-command true \
    >"$WORK/a$i.out" 2>"$WORK/a$i.err" &
  PIDS+=("$!")
done
for i in $(seq "$AGENTS"); do
  u=""
  for _ in $(seq 200); do
    u=$(head -n1 "$WORK/a$i.out" 2>/dev/null | sed -n 's/^listening on //p' || true)
    [ -n "$u" ] && break
    sleep 0.05
  done
  [ -n "$u" ] || { echo "agent $i did not start: $(cat "$WORK/a$i.err")" >&2; exit 1; }
  URLS+=("$u")
done
printf '%s\n' "${URLS[@]}" >"$WORK/agents.txt"
AGENT_LIST=$(IFS=,; echo "${URLS[*]}")

curl_one() { # curl_one N URL: upload, apply, check the version (what the coordinator does)
  local n=$1 u=$2
  curl -sf -H "Authorization: Bearer $AGENT_TOKEN" -H "X-Update-Version: id-$n" \
    -F "update_package=@$WORK/v$n.tar.gz" -F "signature=@$WORK/v$n.tar.gz.sig" \
    "$u/api/v1/update/upload" >/dev/null
  curl -sf -X POST -H "Authorization: Bearer $AGENT_TOKEN" -H "X-Update-Version: id-$n" \
    "$u/api/v1/update/apply" >/dev/null
  curl -sf -H "Authorization: Bearer $AGENT_TOKEN" "$u/api/v1/version" | grep -q "\"id-$n\""
}
export -f curl_one
export WORK AGENT_TOKEN

ms_now() { echo $(($(date +%s%N) / 1000000)); }

# Every agent on id-1 first (by curl, all at once).
xargs -P 25 -I{} bash -c 'curl_one 1 {}' <"$WORK/agents.txt"

echo "### Rollout of a 10 MB package over $AGENTS agents vs curl in a shell loop (same run)"
echo
echo "| concurrency | lockstep rollout (s, start → last node healthy) | rollout incl. upload to serve + watch (s) | curl loop (s) | coordinator overhead |"
echo "| --- | --- | --- | --- | --- |"
n=1
for c in 1 5 25; do
  n=$((n + 1))
  s=$(ms_now)
  id=$("$BIN" rollout start --service bench --package "$WORK/v$n.tar.gz" \
    --signature "$WORK/v$n.tar.gz.sig" --agents "$AGENT_LIST" --canary 0 \
    --concurrency "$c" --poll 100ms --timeout 5m 2>/dev/null | tail -n1)
  "$BIN" rollout watch "$id" -o json >"$WORK/r$n.json" || { echo "rollout $id failed" >&2; cat "$WORK/r$n.json" >&2; exit 1; }
  e=$(ms_now)
  R=$(sed -n 's/.*"elapsed_secs": *\([0-9.]*\).*/\1/p' "$WORK/r$n.json" | head -n1)
  W=$(awk -v a="$s" -v b="$e" 'BEGIN {printf "%.2f", (b-a)/1000}')
  n=$((n + 1))
  s=$(ms_now)
  xargs -P "$c" -I{} bash -c "curl_one $n {}" <"$WORK/agents.txt"
  e=$(ms_now)
  C=$(awk -v a="$s" -v b="$e" 'BEGIN {printf "%.2f", (b-a)/1000}')
  echo "| $c | $(printf '%.2f' "$R") | $W | $C | $(awk -v r="$R" -v c="$C" 'BEGIN {printf "%+.1f %%", (r-c)*100/c}') |"
done
echo

# rollback --now during a rollout: the previous release is what the agents ran before it.
# The registry expects the last rollout's release, id-$((n - 1)); curl moved the agents past
# it, so put them back on it first: it is the release `rollback --now` returns to.
prev="id-$((n - 1))"
xargs -P 25 -I{} bash -c "curl_one $((n - 1)) {}" <"$WORK/agents.txt"
n=$((n + 1))
id=$("$BIN" rollout start --service bench --package "$WORK/v$n.tar.gz" \
  --signature "$WORK/v$n.tar.gz.sig" --agents "$AGENT_LIST" --canary 0 \
  --concurrency 5 --poll 100ms 2>/dev/null | tail -n1)
# Wait until about half the fleet runs the new release.
for _ in $(seq 600); do
  up=0
  while read -r u; do
    curl -sf -H "Authorization: Bearer $AGENT_TOKEN" "$u/api/v1/version" | grep -q "\"id-$n\"" && up=$((up + 1))
  done <"$WORK/agents.txt"
  [ "$up" -ge $((AGENTS / 2)) ] && break
  sleep 0.1
done
s=$(ms_now)
"$BIN" rollback --now --service bench >/dev/null
for _ in $(seq 3000); do
  back=0
  while read -r u; do
    curl -sf -H "Authorization: Bearer $AGENT_TOKEN" "$u/api/v1/version" | grep -q "\"$prev\"" && back=$((back + 1))
  done <"$WORK/agents.txt"
  [ "$back" -eq "$AGENTS" ] && break
  sleep 0.02
done
e=$(ms_now)
[ "$back" -eq "$AGENTS" ] || { echo "only $back of $AGENTS agents back on $prev" >&2; exit 1; }
echo "### rollback --now during a rollout over $AGENTS agents ($up on the new release when it was called)"
echo
echo "| | s |"
echo "| --- | --- |"
echo "| rollback --now → every agent reports the previous release | $(awk -v a="$s" -v b="$e" 'BEGIN {printf "%.2f", (b-a)/1000}') |"
