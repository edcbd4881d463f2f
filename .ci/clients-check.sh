#!/usr/bin/env bash
# Generated API clients work: a live `lockstep serve` (SQLite in a temporary directory, port
# 0, 127.0.0.1 only) has a TypeScript client (openapi-typescript 7 + openapi-fetch, typescript 5:
# TypeScript 7 crashes openapi-typescript) and a Python client (openapi-python-client, formatted
# by ruff) generated from its /openapi.json; each runs a short script of ordinary calls
# (register, heartbeat, status, history, rollback with and without a body, events) — the
# TypeScript one after compiling under `tsc --strict`.
#
# npm packages come from .ci/clients/typescript/package-lock.json (`npm ci`); the Python tools,
# pinned in .ci/clients-check-requirements.txt, go into the virtualenv api-check.sh uses
# ($CARGO_TARGET_DIR/venv, target/venv by default).
#   .ci/clients-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target="${CARGO_TARGET_DIR:-$root/target}"
venv="${API_CHECK_VENV:-$target/venv}"
requirements="$root/.ci/clients-check-requirements.txt"
ts="$root/.ci/clients/typescript"
started=$SECONDS

need() { command -v "$1" >/dev/null || { echo "clients-check: $1 is missing ($2)" >&2; exit 1; }; }
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "== clients check: installing Node.js and npm (Debian)"
  apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
fi
need node "apt-get install nodejs"
need npm "apt-get install npm"
need curl "apt-get install curl"

echo "== clients check: Python tools in $venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if ! cmp -s "$requirements" "$venv/.clients-requirements" 2>/dev/null ||
  ! "$venv/bin/openapi-python-client" --version >/dev/null 2>&1 || ! "$venv/bin/ruff" --version >/dev/null 2>&1; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/.clients-requirements"
fi

echo "== clients check: npm ci (TypeScript generator, openapi-fetch, typescript 5)"
(cd "$ts" && npm ci --no-audit --no-fund --loglevel=error)

echo "== clients check: building lockstep"
cargo build --quiet -p lockstep-cli --bin lockstep
lockstep="$target/debug/lockstep"

work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work" "$ts/gen" "$ts/dist"
}
trap cleanup EXIT

token="lst_$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
LOCKSTEP_ADMIN_TOKEN="$token" LOCKSTEP_LOG_FORMAT=text \
  "$lockstep" serve --listen 127.0.0.1:0 --data-dir "$work/data" \
  >"$work/serve.out" 2>"$work/serve.log" &
server_pid=$!
addr=
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
curl -fsS "$base/openapi.json" -o "$work/openapi.json"
echo "== clients check: lockstep serve on $base"

echo "== clients check: TypeScript (openapi-typescript + openapi-fetch, tsc --strict)"
(cd "$ts" && rm -rf gen dist &&
  OPENAPI_JSON="$work/openapi.json" npm run -s generate &&
  npx --no-install tsc -p tsconfig.json &&
  LOCKSTEP_URL="$base" LOCKSTEP_TOKEN="$token" node dist/check.js)

echo "== clients check: Python (openapi-python-client)"
mkdir -p "$work/py"
PATH="$venv/bin:$PATH" "$venv/bin/openapi-python-client" generate --path "$work/openapi.json" \
  --output-path "$work/py/lockstep_registry_client" --meta none
PYTHONPATH="$work/py" LOCKSTEP_URL="$base" LOCKSTEP_TOKEN="$token" \
  "$venv/bin/python" "$root/.ci/clients/python/check.py"

if grep -q 'panicked' "$work/serve.log"; then
  echo "the server panicked:" >&2
  grep -A5 'panicked' "$work/serve.log" >&2
  exit 1
fi
echo "== clients check: both generated clients compile and run ($((SECONDS - started)) s)"
