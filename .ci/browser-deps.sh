#!/usr/bin/env bash
# The browser the dashboard test drives: Debian's chromium and chromium-driver, installed
# with apt-get when either is missing (a fresh CI machine). Idempotent and quiet when both
# are present. The test itself (crates/lockstep-server/tests/dashboard_browser.rs) skips
# without them unless CI or LOCKSTEP_TEST_BROWSER=1 is set.
#   .ci/browser-deps.sh
set -euo pipefail

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
echo "== installing chromium and chromium-driver (apt-get)"
sudo=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
command -v chromium >/dev/null && command -v chromedriver >/dev/null
