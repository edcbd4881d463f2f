#!/usr/bin/env bash
# GET …/release throughput vs nginx serving the same bytes as a static file, same run,
# alternating rounds. Usage: bench/release_get.sh  (DURATION=10s ROUNDS=3 to change)
source "$(dirname "$0")/lib.sh"
need wrk wrk; need nginx nginx
build
DURATION=${DURATION:-10s}; ROUNDS=${ROUNDS:-3}
start_registry get
PATH_=/v1/envs/production/services/bench/release
register bench 3f2a9c1e-5b7d-4c1a-9e2f-0a1b2c3d4e5f >/dev/null
mkdir -p "$WORK/www$(dirname $PATH_)"
curl -sf -H "Authorization: Bearer $TOKEN" "$URL$PATH_" >"$WORK/www$PATH_"
SIZE=$(wc -c <"$WORK/www$PATH_")
NGINX_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$WORK/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
events { worker_connections 1024; }
http { access_log off; default_type application/json; keepalive_requests 1000000;
  server { listen 127.0.0.1:$NGINX_PORT; root $WORK/www; } }
CONF
nginx -c "$WORK/nginx.conf" & PIDS+=($!)
sleep 0.3
curl -sf "http://127.0.0.1:$NGINX_PORT$PATH_" | cmp - "$WORK/www$PATH_"
echo "body: $SIZE bytes, same bytes from both; wrk -t1 -c64 -d$DURATION, $ROUNDS alternating rounds"
echo
echo "| round | lockstep req/s | nginx req/s | ratio |"
echo "| --- | --- | --- | --- |"
L_SUM=0; N_SUM=0
for r in $(seq "$ROUNDS"); do
  L=$(wrk_rps -t1 -c64 -d"$DURATION" -H "Authorization: Bearer $TOKEN" "$URL$PATH_")
  N=$(wrk_rps -t1 -c64 -d"$DURATION" "http://127.0.0.1:$NGINX_PORT$PATH_")
  echo "| $r | $L | $N | $(python3 -c "print(f'{$L/$N:.2f}')") |"
  L_SUM=$(python3 -c "print($L_SUM+$L)"); N_SUM=$(python3 -c "print($N_SUM+$N)")
done
echo "| mean | $(python3 -c "print(f'{$L_SUM/$ROUNDS:.0f}')") | $(python3 -c "print(f'{$N_SUM/$ROUNDS:.0f}')") | $(python3 -c "print(f'{$L_SUM/$N_SUM:.2f}')") |"
