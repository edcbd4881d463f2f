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

source "$root/.ci/serve-lib.sh"
cleanup_paths+=("$ts/gen" "$ts/dist")
token="lst_$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
start_serve "$lockstep" "$token"
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
