#!/usr/bin/env bash
# CPU time per proxied request: the proxy process's own CPU (user + system, from
# /proc/PID/stat) over a wrk run, divided by the requests wrk completed. Less sensitive to
# other load on the machine than requests per second. Compares the gateway (this build,
# access log off and on; optionally an older build) with nginx proxy_pass to the same worker.
# Usage: bench/gateway-cpu.sh  (DURATION=5s ROUNDS=3; SKIP_BUILD=1; LOCKSTEP_BENCH_BASE=/path/to/lockstep)
source "$(dirname "$0")/lib.sh"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx; }
[ -n "${SKIP_BUILD:-}" ] || (cd "$ROOT" && cargo build --release -q -p lockstep-cli -p axum-worker --bin lockstep --bin axum-worker)
DURATION=${DURATION:-5s}; ROUNDS=${ROUNDS:-3}
V1=3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f
start_registry gatewaycpu
register api "$V1" >/dev/null
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
RUST_LOG=error LOCKSTEP_REGISTRY="$URL" LOCKSTEP_TOKEN="$TOKEN" LOCKSTEP_SERVICE=api \
  LOCKSTEP_VERSION_ID="$V1" "$ROOT/target/release/axum-worker" --listen 127.0.0.1:0 \
  >"$WORK/w1.out" 2>"$WORK/w1.err" &
PIDS+=($!)
for _ in $(seq 100); do
  W1=$(head -n1 "$WORK/w1.out" 2>/dev/null | sed -n 's/^listening on //p' || true)
  [ -n "$W1" ] && break; sleep 0.05
done
cat >"$WORK/gateway.toml" <<CONF
registry = "$URL"
token = "$TOKEN"
[upstream]
health_interval = "1s"
[[routes]]
path = "/"
service = "api"
CONF
start_gateway() { # NAME BINARY RUST_LOG → sets GW and GW_PID
  local name=$1 bin=$2 log=$3 gw=""
  RUST_LOG=$log "$bin" gateway --config "$WORK/gateway.toml" --listen 127.0.0.1:0 \
    >"$WORK/$name.out" 2>"$WORK/$name.err" &
  GW_PID=$!; PIDS+=($GW_PID)
  for _ in $(seq 100); do
    gw=$(head -n1 "$WORK/$name.out" 2>/dev/null | sed -n 's/^listening on //p' || true)
    [ -n "$gw" ] && break; sleep 0.05
  done
  for _ in $(seq 100); do
    [ "$(curl -s "$gw/whoami" | python3 -c 'import sys,json; print(json.load(sys.stdin).get("version_id",""))' 2>/dev/null)" = "$V1" ] && break
    sleep 0.1
  done
  GW=$gw
}
NAMES=(); URLS=(); PROCS=()
start_gateway gw "$BIN" warn; NAMES+=("gateway, access log off"); URLS+=("$GW"); PROCS+=("$GW_PID")
start_gateway gwlog "$BIN" info; NAMES+=("gateway, access log on (to a file)"); URLS+=("$GW"); PROCS+=("$GW_PID")
if [ -n "${LOCKSTEP_BENCH_BASE:-}" ]; then
  start_gateway gwbase "$LOCKSTEP_BENCH_BASE" warn; NAMES+=("base build, access log off"); URLS+=("$GW"); PROCS+=("$GW_PID")
fi
NGINX_PORT=$(free_port)
cat >"$WORK/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  upstream w { server ${W1#http://}; keepalive 64; }
  server { listen 127.0.0.1:$NGINX_PORT;
    location / { proxy_pass http://w; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
nginx -c "$WORK/nginx.conf" & NGINX_MASTER=$!; PIDS+=($NGINX_MASTER)
sleep 0.3
NGINX_WORKER=$(pgrep -P "$NGINX_MASTER" | head -n1)
NAMES+=("nginx proxy_pass (1 worker process, access_log off)"); URLS+=("http://127.0.0.1:$NGINX_PORT"); PROCS+=("$NGINX_WORKER")
# One untimed second each first: the first column measured used to pay for warming up
# (connections, pools, allocator arenas) in round 1.
for u in "${URLS[@]}"; do wrk -t1 -c64 -d1s "$u/whoami" >/dev/null; done
TICK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
declare -A SUM_US SUM_RPS
echo "### CPU time of the proxy process per request, GET /whoami (wrk -t1 -c64 -d$DURATION, alternating; load average at start: $(cut -d' ' -f1-3 /proc/loadavg))"
echo
echo "| round | proxy | req/s | proxy CPU µs / request |"
echo "| --- | --- | --- | --- |"
for r in $(seq "$ROUNDS"); do
  for i in "${!NAMES[@]}"; do
    t0=$(cpu_ticks "${PROCS[$i]}")
    out=$(wrk -t1 -c64 -d"$DURATION" "${URLS[$i]}/whoami")
    t1=$(cpu_ticks "${PROCS[$i]}")
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    us=$(python3 -c "print(f'{($t1-$t0)/$TICK*1e6/$n:.1f}')")
    SUM_US[$i]=$(python3 -c "print(${SUM_US[$i]:-0}+$us)"); SUM_RPS[$i]=$(python3 -c "print(${SUM_RPS[$i]:-0}+$rps)")
    echo "| $r | ${NAMES[$i]} | $rps | $us |"
  done
done
for i in "${!NAMES[@]}"; do
  echo "| mean | ${NAMES[$i]} | $(python3 -c "print(f'{${SUM_RPS[$i]}/$ROUNDS:.0f}')") | $(python3 -c "print(f'{${SUM_US[$i]}/$ROUNDS:.1f}')") |"
done
echo
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
