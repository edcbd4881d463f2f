#!/usr/bin/env bash
# The dashboard's figures (docs/benchmarks.md, "Dashboard"): GET /v1/dashboard's first
# page and the first full render in headless Chromium, with 1,000 and 300,000 instances.
# Needs Debian's chromium and chromium-driver (.ci/browser-deps.sh installs them).
#   bench/dashboard.sh                 # 1,000 and 300,000 instances
#   bench/dashboard.sh 1000 50000      # other fleet sizes
set -euo pipefail
cd "$(dirname "$0")/.."
command -v chromedriver >/dev/null || { echo "needs chromedriver: .ci/browser-deps.sh" >&2; exit 2; }
cargo build --release -q -p lockstep-server --example dashboard_bench
target="${CARGO_TARGET_DIR:-target}"
"$target/release/examples/dashboard_bench" "$@"
