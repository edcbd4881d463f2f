# Shared helpers for the benchmark scripts: build, start a registry on a free port with a
# temporary data dir, clean up on exit. Source it; it sets ROOT, BIN, TOKEN and uses WORK.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/target/release/lockstep"
TOKEN="bench-admin-token"
WORK="$(mktemp -d /tmp/lockstep-bench.XXXXXX)"
chmod 755 "$WORK"  # nginx workers (www-data) read the static file from here
PIDS=()

cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

build() {
  (cd "$ROOT" && cargo build --release -q -p lockstep-cli -p lockstep-testkit --bin lockstep --bin lockstep-load)
}

need() {
  command -v "$1" >/dev/null || { echo "needs $1 (apt-get install $2)" >&2; exit 2; }
}

# start_registry NAME [serve args…] → sets URL and REG_PID
start_registry() {
  local name=$1; shift
  RUST_LOG=warn LOCKSTEP_ADMIN_TOKEN="$TOKEN" ${SERVE_ENV:-} "$BIN" serve --listen 127.0.0.1:0 \
    --data-dir "$WORK/$name" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  REG_PID=$!
  PIDS+=("$REG_PID")
  for _ in $(seq 100); do
    URL=$(head -n1 "$WORK/$name.out" 2>/dev/null | sed -n 's/^listening on //p')
    [ -n "$URL" ] && return 0
    sleep 0.05
  done
  echo "registry did not start: $(cat "$WORK/$name.err")" >&2
  exit 1
}

register() { # register SERVICE VERSION_ID → prints the answer
  curl -sf -X PUT -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
    "$URL/v1/envs/production/services/$1/release" -d "{\"version_id\":\"$2\"}"
}

rss_mb() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

# wrk_rps ARGS… → requests/s as a number
wrk_rps() { wrk "$@" | awk '/Requests\/sec/ {print $2}'; }
