#!/usr/bin/env bash
# The TypeScript package (clients/typescript): `npm ci` from its committed lockfile, build
# (tsc to plain ESM), type-check the tests against Hono's own types, then vitest runs the
# tests on Node and inside workerd (miniflare) against real `lockstep serve` processes started
# by the tests from the binary built here (target/debug/lockstep, or $LOCKSTEP_BIN).
#   .ci/ts-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target="${CARGO_TARGET_DIR:-$root/target}"
pkg="$root/clients/typescript"

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "== ts check: installing Node.js and npm (Debian)"
  apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
  echo "ts check: Node.js >= 20 is needed (found $(node --version))" >&2
  exit 1
fi

echo "== ts check: building lockstep"
cargo build --quiet -p lockstep-cli --bin lockstep
export LOCKSTEP_BIN="${LOCKSTEP_BIN:-$target/debug/lockstep}"
# The tests talk to loopback registries only.
export NO_PROXY=127.0.0.1 no_proxy=127.0.0.1
unset HTTP_PROXY HTTPS_PROXY ALL_PROXY http_proxy https_proxy all_proxy

cd "$pkg"
echo "== ts check: npm ci"
npm ci --no-audit --no-fund --loglevel=error
echo "== ts check: build and type-check"
npm run -s build
npm run -s typecheck
echo "== ts check: vitest (Node and workerd)"
npx --no-install vitest run
