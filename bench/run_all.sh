#!/usr/bin/env bash
# Every registry figure of docs/benchmarks.md, one table each.
set -euo pipefail
cd "$(dirname "$0")"
echo "## GET …/release vs nginx"; ./release_get.sh; echo
echo "## Heartbeats"; ./heartbeats.sh; echo
echo "## Watch fan-out and idle memory"; ./watch_fanout.sh; echo
echo "## Client library in a worker"; ./worker.sh
