# Sourced by the CI scripts that need a live `lockstep serve` on loopback: a scratch
# directory `work`, removed on exit with whatever else is in `cleanup_paths`, and
# `start_serve BIN ADMIN_TOKEN`, which starts the registry on a free port, waits for its
# `listening on` line and sets `base` (http://127.0.0.1:PORT) and `server_pid`. Only the
# loopback registry is ever contacted: proxies are switched off.
work=$(mktemp -d)
server_pid=
cleanup_paths=("$work")
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "${cleanup_paths[@]}"
}
trap cleanup EXIT

start_serve() {
  local bin=$1 token=$2 addr=
  LOCKSTEP_ADMIN_TOKEN="$token" LOCKSTEP_LOG_FORMAT=text \
    "$bin" serve --listen 127.0.0.1:0 --data-dir "$work/data" \
    >"$work/serve.out" 2>"$work/serve.log" &
  server_pid=$!
  for _ in $(seq 1 100); do
    addr=$(sed -n 's|^listening on http://\([0-9.:]*\).*|\1|p' "$work/serve.out" | head -n1)
    [ -n "$addr" ] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$addr" ]; then
    echo "lockstep serve did not start:" >&2
    cat "$work/serve.out" "$work/serve.log" >&2
    exit 1
  fi
  case "$addr" in
    127.0.0.1:*) ;;
    *) echo "refusing to test $addr: not on 127.0.0.1" >&2; exit 1 ;;
  esac
  base="http://$addr"
  export NO_PROXY=127.0.0.1 no_proxy=127.0.0.1
  unset HTTP_PROXY HTTPS_PROXY ALL_PROXY http_proxy https_proxy all_proxy
}
