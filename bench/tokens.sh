#!/usr/bin/env bash
# GET …/release with 1 token and with 10,000 tokens, same run: two registries, one with
# only the admin token, one with TOKENS (default 10,000) tokens, measured in alternating
# wrk rounds; each presents a valid token. Usage: bench/tokens.sh (DURATION=10s ROUNDS=3)
source "$(dirname "$0")/lib.sh"
need wrk wrk
build
DURATION=${DURATION:-10s}; ROUNDS=${ROUNDS:-3}; TOKENS=${TOKENS:-10000}
PATH_=/v1/envs/production/services/bench/release
start_registry one
ONE=$URL
register bench 3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f >/dev/null
start_registry many
MANY=$URL
register bench 3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f >/dev/null
# The tokens, through the API (8 connections with keep-alive); the last one is presented.
LAST=$(python3 - "$MANY" "$TOKEN" "$TOKENS" <<'PY'
import http.client, json, sys, threading, urllib.parse
url, admin, n = sys.argv[1], sys.argv[2], int(sys.argv[3]) - 1
u = urllib.parse.urlparse(url)
out = {}
def work(k):
    c = http.client.HTTPConnection(u.hostname, u.port)
    for i in range(k, n, 8):
        c.request("POST", "/v1/tokens", json.dumps({"name": f"node-{i}", "role": "worker"}),
                  {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"})
        r = c.getresponse(); body = r.read()
        assert r.status == 201, (r.status, body)
        out[i] = json.loads(body)["token"]
ts = [threading.Thread(target=work, args=(k,)) for k in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
print(out[n - 1])
PY
)
COUNT=$(curl -sf "$MANY/metrics" | awk '/^lockstep_tokens / {print $2}')
echo "tokens: 1 on the first registry, $COUNT on the second; wrk -t1 -c64 -d$DURATION, $ROUNDS alternating rounds"
echo
echo "| round | 1 token req/s | $COUNT tokens req/s | ratio |"
echo "| --- | --- | --- | --- |"
A_SUM=0; B_SUM=0
for r in $(seq "$ROUNDS"); do
  A=$(wrk_rps -t1 -c64 -d"$DURATION" -H "Authorization: Bearer $TOKEN" "$ONE$PATH_")
  B=$(wrk_rps -t1 -c64 -d"$DURATION" -H "Authorization: Bearer $LAST" "$MANY$PATH_")
  echo "| $r | $A | $B | $(python3 -c "print(f'{$B/$A:.2f}')") |"
  A_SUM=$(python3 -c "print($A_SUM+$A)"); B_SUM=$(python3 -c "print($B_SUM+$B)")
done
echo "| mean | $(python3 -c "print(f'{$A_SUM/$ROUNDS:.0f}')") | $(python3 -c "print(f'{$B_SUM/$ROUNDS:.0f}')") | $(python3 -c "print(f'{$B_SUM/$A_SUM:.2f}')") |"
