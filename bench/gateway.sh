#!/usr/bin/env bash
# The gateway (release build) in front of a real worker (examples/axum-worker), same run:
#  1. throughput of GET /whoami through `lockstep gateway` vs through nginx `proxy_pass` to
#     the same worker (wrk -t1 -c64, alternating rounds);
#  2. p99 added to a direct call at half the gateway's maximum rate (wrk with a per-request
#     delay paces the load; added = p99 via gateway − p99 direct, same rate);
#  3. registry change → the gateway stops routing to the now-stale instance: from the PUT's
#     answer to the first answer from the new release, over DEPLOYS switches between two
#     workers (and a check that no later answer comes from the old one).
# Usage: bench/gateway.sh  (DURATION=10s ROUNDS=3 DEPLOYS=100 to change; SKIP_BUILD=1 uses
# the binaries as built; WITH_ACCESS_LOG=0
# skips the column with the access log on; LOCKSTEP_BENCH_BASE=/path/to/lockstep adds an
# older build's gateway to the same rounds; LOCKSTEP_GATEWAY_WORKERS sets the gateway's threads;
# NGINX_WORKERS=auto gives nginx one worker process per core instead of 1)
source "$(dirname "$0")/lib.sh"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx; }
[ -n "${SKIP_BUILD:-}" ] || (cd "$ROOT" && cargo build --release -q -p lockstep-cli -p axum-worker --bin lockstep --bin axum-worker)
DURATION=${DURATION:-10s}; ROUNDS=${ROUNDS:-3}; DEPLOYS=${DEPLOYS:-100}
V1=3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f
V2=9d8c7b6a-1111-4222-8333-444455556666
start_registry gateway
register api "$V1" >/dev/null
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_worker() { # NAME VERSION → sets W_URL
  local name=$1 version=$2
  RUST_LOG=error LOCKSTEP_REGISTRY="$URL" LOCKSTEP_TOKEN="$TOKEN" LOCKSTEP_SERVICE=api \
    LOCKSTEP_VERSION_ID="$version" "$ROOT/target/release/axum-worker" --listen 127.0.0.1:0 \
    >"$WORK/$name.out" 2>"$WORK/$name.err" &
  PIDS+=($!)
  for _ in $(seq 100); do
    W_URL=$(head -n1 "$WORK/$name.out" 2>/dev/null | sed -n 's/^listening on //p' || true)
    [ -n "$W_URL" ] && return 0
    sleep 0.05
  done
  echo "worker did not start: $(cat "$WORK/$name.err")" >&2; exit 1
}
start_worker w1 "$V1"; W1=$W_URL
start_worker w2 "$V2"; W2=$W_URL

ADMIN_PORT=$(free_port)
cat >"$WORK/gateway.toml" <<CONF
registry = "$URL"
token = "$TOKEN"
admin_listen = "127.0.0.1:$ADMIN_PORT"
[upstream]
health_interval = "1s"
[[routes]]
path = "/"
service = "api"
CONF
start_gateway() { # NAME BINARY RUST_LOG → sets GW; the access log (info) goes to $WORK/NAME.err
  local name=$1 bin=$2 log=$3 gw=""
  local port; port=$(free_port)
  sed "s/^admin_listen = .*/admin_listen = \"127.0.0.1:$port\"/" "$WORK/gateway.toml" >"$WORK/$name.toml"
  RUST_LOG=$log "$bin" gateway --config "$WORK/$name.toml" --listen 127.0.0.1:0 \
    >"$WORK/$name.out" 2>"$WORK/$name.err" &
  PIDS+=($!)
  for _ in $(seq 100); do
    gw=$(head -n1 "$WORK/$name.out" 2>/dev/null | sed -n 's/^listening on //p' || true)
    [ -n "$gw" ] && break
    sleep 0.05
  done
  [ -n "$gw" ] || { echo "gateway $name did not start: $(cat "$WORK/$name.err")" >&2; exit 1; }
  for _ in $(seq 100); do
    [ "$(curl -s "$gw/whoami" | python3 -c 'import sys,json; print(json.load(sys.stdin).get("version_id",""))' 2>/dev/null)" = "$V1" ] && break
    sleep 0.1
  done
  GW=$gw
}
# The gateway as measured: access log off (RUST_LOG=warn), like nginx's `access_log off`.
start_gateway gw "$BIN" warn; GW_LOGGED=""; GW_BASE=""
MAIN_GW=$GW
# The same binary at its default log level (info: one access-log line per request, to a file).
if [ "${WITH_ACCESS_LOG:-1}" = 1 ]; then start_gateway gwlog "$BIN" info; GW_LOGGED=$GW; fi
# LOCKSTEP_BENCH_BASE=/path/to/an/older/lockstep: that build too, same run, access log off.
if [ -n "${LOCKSTEP_BENCH_BASE:-}" ]; then start_gateway gwbase "$LOCKSTEP_BENCH_BASE" warn; GW_BASE=$GW; fi
GW=$MAIN_GW

NGINX_PORT=$(free_port)
cat >"$WORK/nginx.conf" <<CONF
worker_processes ${NGINX_WORKERS:-1};
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  upstream w { server ${W1#http://}; keepalive 64; }
  server { listen 127.0.0.1:$NGINX_PORT;
    location / { proxy_pass http://w; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
nginx -c "$WORK/nginx.conf" & PIDS+=($!)
sleep 0.3
NG="http://127.0.0.1:$NGINX_PORT"
curl -sf "$NG/whoami" >/dev/null || { echo "nginx does not proxy: $(cat "$WORK/nginx.err")" >&2; exit 1; }

echo "### GET /whoami: lockstep gateway vs nginx proxy_pass, same worker (wrk -t1 -c64 -d$DURATION, alternating)"
echo
echo "Gateway: access log off (RUST_LOG=warn) unless said; nginx: worker_processes ${NGINX_WORKERS:-1}, upstream keepalive 64, access_log off."
echo
HDR="| round | gateway req/s | nginx req/s | ratio |"; SEP="| --- | --- | --- | --- |"
[ -n "$GW_LOGGED" ] && { HDR="$HDR gateway, access log on (default level) | ratio |"; SEP="$SEP --- | --- |"; }
[ -n "$GW_BASE" ] && { HDR="$HDR base build | ratio |"; SEP="$SEP --- | --- |"; }
echo "$HDR"; echo "$SEP"
G_SUM=0; N_SUM=0; L_SUM=0; B_SUM=0
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
for r in $(seq "$ROUNDS"); do
  G=$(wrk_rps -t1 -c64 -d"$DURATION" "$GW/whoami")
  N=$(wrk_rps -t1 -c64 -d"$DURATION" "$NG/whoami")
  LINE="| $r | $G | $N | $(ratio "$G" "$N") |"
  if [ -n "$GW_LOGGED" ]; then
    L=$(wrk_rps -t1 -c64 -d"$DURATION" "$GW_LOGGED/whoami"); L_SUM=$(python3 -c "print($L_SUM+$L)")
    LINE="$LINE $L | $(ratio "$L" "$N") |"
  fi
  if [ -n "$GW_BASE" ]; then
    B=$(wrk_rps -t1 -c64 -d"$DURATION" "$GW_BASE/whoami"); B_SUM=$(python3 -c "print($B_SUM+$B)")
    LINE="$LINE $B | $(ratio "$B" "$N") |"
  fi
  echo "$LINE"
  G_SUM=$(python3 -c "print($G_SUM+$G)"); N_SUM=$(python3 -c "print($N_SUM+$N)")
done
LINE="| mean | $(python3 -c "print(f'{$G_SUM/$ROUNDS:.0f}')") | $(python3 -c "print(f'{$N_SUM/$ROUNDS:.0f}')") | $(ratio "$G_SUM" "$N_SUM") |"
[ -n "$GW_LOGGED" ] && LINE="$LINE $(python3 -c "print(f'{$L_SUM/$ROUNDS:.0f}')") | $(ratio "$L_SUM" "$N_SUM") |"
[ -n "$GW_BASE" ] && LINE="$LINE $(python3 -c "print(f'{$B_SUM/$ROUNDS:.0f}')") | $(ratio "$B_SUM" "$N_SUM") |"
echo "$LINE"
echo

# Half the gateway's maximum, paced: each connection waits 1 ms between requests (wrk's
# delays are whole milliseconds), and the number of connections is calibrated on the
# gateway so that the rate comes out at half its maximum.
HALF=$(python3 -c "print(int($G_SUM/$ROUNDS/2))")
cat >"$WORK/pace.lua" <<'LUA'
local d = tonumber(os.getenv("PACE_MS"))
function delay() return d end
LUA
PACE_MS=1
p99_ms() { # wrk --latency output → p99 in ms
  awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000}; print v}'
}
rate_of() { awk '/Requests\/sec/ {printf "%.0f", $2}'; }
CONNS=$(python3 -c "import math; print(max(1, math.ceil($HALF*1.4/1000)))")
for _ in 1 2; do
  RATE=$(PACE_MS=$PACE_MS wrk -t1 -c"$CONNS" -d2s -s "$WORK/pace.lua" "$GW/whoami" | rate_of)
  CONNS=$(python3 -c "print(max(1, round($CONNS*$HALF/max(1,$RATE))))")
done
echo "### p99 at half the gateway's maximum (~$HALF req/s: $CONNS connections, ${PACE_MS} ms between requests each)"
echo
echo "| round | direct p99 | via gateway p99 | added p99 | rate direct / gateway |"
echo "| --- | --- | --- | --- | --- |"
for r in $(seq "$ROUNDS"); do
  D_OUT=$(PACE_MS=$PACE_MS wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s "$WORK/pace.lua" "$W1/whoami")
  G_OUT=$(PACE_MS=$PACE_MS wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s "$WORK/pace.lua" "$GW/whoami")
  D99=$(echo "$D_OUT" | p99_ms); G99=$(echo "$G_OUT" | p99_ms)
  echo "| $r | $D99 ms | $G99 ms | $(python3 -c "print(f'{$G99-$D99:.2f}')") ms | $(echo "$D_OUT" | rate_of) / $(echo "$G_OUT" | rate_of) |"
done
echo

echo "### PUT answered → first answer from the new release through the gateway ($DEPLOYS switches)"
echo
GW="$GW" URL="$URL" TOKEN="$TOKEN" V1="$V1" V2="$V2" DEPLOYS="$DEPLOYS" python3 - <<'PY'
import http.client, json, os, time, urllib.request, urllib.parse
gw = urllib.parse.urlparse(os.environ["GW"])
conn = http.client.HTTPConnection(gw.hostname, gw.port)
def who():
    conn.request("GET", "/whoami")
    r = conn.getresponse(); b = r.read()
    return json.loads(b).get("version_id") if r.status == 200 else None
versions = [os.environ["V1"], os.environ["V2"]]
lat, late_old = [], 0
for i in range(int(os.environ["DEPLOYS"])):
    new, old = versions[(i + 1) % 2], versions[i % 2]
    req = urllib.request.Request(
        os.environ["URL"] + "/v1/envs/production/services/api/release",
        data=json.dumps({"version_id": new, "force": True}).encode(), method="PUT",
        headers={"Authorization": "Bearer " + os.environ["TOKEN"], "content-type": "application/json"})
    urllib.request.urlopen(req).read()
    t0 = time.perf_counter()
    while who() != new:
        if time.perf_counter() - t0 > 5:
            raise SystemExit("the gateway never switched")
    lat.append((time.perf_counter() - t0) * 1000)
    for _ in range(20):
        if who() == old:
            late_old += 1
    time.sleep(0.05)
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
print("| p50 | p99 | max | answers from the old release after the switch |")
print("| --- | --- | --- | --- |")
print(f"| {q(0.5):.2f} ms | {q(0.99):.2f} ms | {lat[-1]:.2f} ms | {late_old} of {20*len(lat)} |")
PY
