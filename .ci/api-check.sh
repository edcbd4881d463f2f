#!/usr/bin/env bash
# API conformance, with tools nobody on the project wrote: a live `lockstep serve` (SQLite in
# a temporary directory, 127.0.0.1 only) has its /openapi.json validated by
# openapi-spec-validator, then schemathesis (stateless, every check, negative data included)
# fires generated requests at it and fails on any 5xx, schema mismatch, undocumented status
# code, accepted invalid input or invalid spec.
#
# Both tools come from PyPI, pinned with all their dependencies in
# .ci/api-check-requirements.txt, into a virtualenv this script creates (or reuses) under
# $CARGO_TARGET_DIR/venv (target/venv by default).
#   .ci/api-check.sh                         # the CI run
#   API_CHECK_EXAMPLES=30 .ci/api-check.sh   # a quicker run while working on the API
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

examples="${API_CHECK_EXAMPLES:-300}"
# A fixed seed: the same requests on every run, so a failure here is a regression, not luck.
seed="${API_CHECK_SEED:-7}"
target="${CARGO_TARGET_DIR:-$root/target}"
venv="${API_CHECK_VENV:-$target/venv}"
requirements="$root/.ci/api-check-requirements.txt"
started=$SECONDS

echo "== API check: Python tools in $venv"
if ! cmp -s "$requirements" "$venv/.requirements" 2>/dev/null ||
  ! "$venv/bin/python" -c 'import schemathesis, openapi_spec_validator' 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/.requirements"
fi
"$venv/bin/schemathesis" --version
"$venv/bin/openapi-spec-validator" --version

echo "== API check: building lockstep"
cargo build --quiet -p lockstep-cli --bin lockstep
lockstep="$target/debug/lockstep"

source "$root/.ci/serve-lib.sh"

# The bootstrap admin token only starts the run: schemathesis gets an admin token of its own
# whose name it cannot guess, so revoking `admin` (which it may try, and which succeeds once
# it has created a second admin) never cuts the run short.
bootstrap="lst_$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
start_serve "$lockstep" "$bootstrap"
echo "== API check: lockstep serve on $base"

name="ci-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
token=$(curl -fsS -X POST "$base/v1/tokens" -H "Authorization: Bearer $bootstrap" \
  -H 'content-type: application/json' -d "{\"name\":\"$name\",\"role\":\"admin\"}" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')

echo "== API check: openapi-spec-validator"
curl -fsS "$base/openapi.json" -o "$work/openapi.json"
"$venv/bin/openapi-spec-validator" --validation-errors all "$work/openapi.json"

echo "== API check: schemathesis ($examples examples per operation, seed $seed)"
# Stateless (no `stateful` phase), every check, positive and negative data. The three
# Server-Sent Event streams answer 200 and then never end, which the CLI (it reads whole
# bodies) could only report as a timeout: they are left out here and driven by
# api-check-sse.py below with the same generated cases and checks.
set +e
# Run from the temporary directory: schemathesis keeps a cache of past failures in the
# working directory and replays them first, which would make one run depend on the last.
(cd "$work" && exec "$venv/bin/schemathesis" run "$work/openapi.json" \
  --url "$base" \
  --phases examples,coverage,fuzzing \
  --checks all \
  --mode all \
  --max-examples "$examples" \
  --seed "$seed" \
  --generation-database none \
  --request-timeout 10 \
  --suppress-health-check too_slow \
  --workers 1 \
  --exclude-path /v1/watch --exclude-path /v1/events/stream --exclude-path /v1/instances/watch \
  -H "Authorization: Bearer $token" \
  --no-color) \
  2>&1 | tee "$work/schemathesis.out"
st_status=${PIPESTATUS[0]}
set -e

echo "== API check: schemathesis on the event streams ($examples examples each)"
set +e
(cd "$work" && exec "$venv/bin/python" "$root/.ci/api-check-sse.py" "$work/openapi.json" \
  "$base" "$token" "$examples" "$seed") 2>&1 | tee "$work/sse.out"
sse_status=${PIPESTATUS[0]}
set -e

echo "== API check: a watch stream delivers releases as they are registered"
smoke_status=0
curl -fsS -X PUT "$base/v1/envs/ci/services/smoke/release" -H "Authorization: Bearer $token" \
  -H 'content-type: application/json' -d '{"version_id":"smoke-1"}' >/dev/null
# The stream never ends: curl gives up after 2 s (exit 28) with what arrived.
curl -sSN --max-time 2 -D "$work/watch.headers" -H "Authorization: Bearer $token" \
  "$base/v1/watch?env=ci&service=smoke" >"$work/watch.out" 2>/dev/null || true
if grep -qi '^content-type: text/event-stream' "$work/watch.headers" &&
  grep -q '^event: release' "$work/watch.out" && grep -q 'smoke-1' "$work/watch.out"; then
  echo "ok: 200 text/event-stream with the release"
else
  echo "the watch stream did not deliver the release:" >&2
  cat "$work/watch.headers" "$work/watch.out" >&2
  smoke_status=1
fi

echo "== API check: summary"
echo "openapi-spec-validator: no error"
echo "schemathesis CLI: operations $(grep -o 'Tested: [0-9]*' "$work/schemathesis.out" | head -n1 | tr -dc 0-9)" \
  "of $(grep -o 'Selected: [0-9]*/[0-9]*' "$work/schemathesis.out" | head -n1 | cut -d/ -f2);" \
  "test cases: $(grep -o '[0-9]* generated.*' "$work/schemathesis.out" | tail -n1) -> exit $st_status"
echo "schemathesis, event streams: $(grep '^SSE operations' "$work/sse.out" || echo 'no summary') -> exit $sse_status"
echo "watch smoke test: exit $smoke_status"
echo "server log: $(grep -c ' ERROR ' "$work/serve.log" || true) error line(s); took $((SECONDS - started)) s"
if grep -q 'panicked' "$work/serve.log"; then
  echo "the server panicked:" >&2
  grep -A5 'panicked' "$work/serve.log" >&2
  exit 1
fi
[ "$st_status" = 0 ] && [ "$sse_status" = 0 ] && [ "$smoke_status" = 0 ]
