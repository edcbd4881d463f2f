#!/usr/bin/env bash
# The update agent and packages (release build), same run:
#  1. `lockstep package create` of a 100 MB, 10,000-file tree next to `tar czf`;
#  2. an apply of that package (verify + unpack + switch, synced) next to `tar xzf`
#     (and `tar xzf` + `sync -f`, which is what the agent does to be crash-safe);
#  3. the agent's peak RSS (VmHWM) after uploading and applying it;
#  4. time from the apply request to the new worker answering its health check, for a
#     trivial worker (`python3 -m http.server`).
# Usage: bench/agent.sh  (ROUNDS=3 APPLIES=5 to change)
source "$(dirname "$0")/lib.sh"
need python3 python3
(cd "$ROOT" && cargo build --release -q -p lockstep-cli --bin lockstep)
ROUNDS=${ROUNDS:-3}; APPLIES=${APPLIES:-5}
AGENT_TOKEN=bench-agent-token

# 100 directories × 100 files × 10 KiB: half random bytes, half text (compresses ~2:1).
python3 - "$WORK/tree" <<'PY'
import os, sys
root = sys.argv[1]
for d in range(100):
    os.makedirs(f"{root}/d{d:03}", exist_ok=True)
    for f in range(100):
        with open(f"{root}/d{d:03}/f{f:03}.dat", "wb") as fh:
            fh.write(os.urandom(5120) + (b"line %d of file %d\n" % (f, d)) * 256)[:10240]
PY
BYTES=$(du -sb "$WORK/tree" | cut -f1)
FILES=$(find "$WORK/tree" -type f | wc -l)

ms() { # ms CMD… → wall milliseconds
  local s e; s=$(date +%s%N); "$@" >/dev/null 2>&1; e=$(date +%s%N); echo $(((e - s) / 1000000))
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

"$BIN" package keygen --out "$WORK/key" >/dev/null 2>&1

echo "### package create vs tar czf ($FILES files, $((BYTES / 1048576)) MiB; $ROUNDS rounds, median)"
echo
C_ALL=(); T_ALL=()
for r in $(seq "$ROUNDS"); do
  rm -f "$WORK/p.tar.gz" "$WORK/t.tar.gz"
  C_ALL+=("$(ms "$BIN" package create --service bench --version v1 --out "$WORK/p.tar.gz" "$WORK/tree")")
  T_ALL+=("$(ms tar czf "$WORK/t.tar.gz" -C "$WORK/tree" .)")
done
C=$(printf '%s\n' "${C_ALL[@]}" | median); T=$(printf '%s\n' "${T_ALL[@]}" | median)
echo "| | ms | size MiB |"
echo "| --- | --- | --- |"
echo "| lockstep package create | $C | $(($(stat -c %s "$WORK/p.tar.gz") / 1048576)) |"
echo "| tar czf | $T | $(($(stat -c %s "$WORK/t.tar.gz") / 1048576)) |"
echo "| ratio | $(awk -v a="$C" -v b="$T" 'BEGIN {printf "%.2f×", a/b}') | |"
echo

# Packages with distinct version ids for the applies.
for r in $(seq "$ROUNDS"); do
  "$BIN" package create --service bench --version "v$r" --version-id "id-$r" \
    --out "$WORK/v$r.tar.gz" "$WORK/tree" >/dev/null 2>&1
  "$BIN" package sign --key "$WORK/key" "$WORK/v$r.tar.gz" >/dev/null
done

start_agent() { # NAME [args…] → sets A_URL, A_PID
  local name=$1; shift
  RUST_LOG=warn "$BIN" agent --root "$WORK/$name" --listen 127.0.0.1:0 --token "$AGENT_TOKEN" \
    "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  A_PID=$!
  PIDS+=("$A_PID")
  for _ in $(seq 200); do
    A_URL=$(head -n1 "$WORK/$name.out" 2>/dev/null | sed -n 's/^listening on //p')
    [ -n "$A_URL" ] && return 0
    sleep 0.05
  done
  echo "agent did not start: $(cat "$WORK/$name.err")" >&2; exit 1
}
upload() { # upload VERSION FILE
  curl -sf -H "Authorization: Bearer $AGENT_TOKEN" -H "X-Update-Version: $1" \
    -F "update_package=@$2" -F "signature=@$2.sig" "$A_URL/api/v1/update/upload" >/dev/null
}
apply() { curl -sf -X POST -H "Authorization: Bearer $AGENT_TOKEN" -H "X-Update-Version: $1" "$A_URL/api/v1/update/apply"; }

start_agent big --trusted-key "$WORK/key.pub"
A_ALL=(); X_ALL=(); XS_ALL=()
for r in $(seq "$ROUNDS"); do
  upload "id-$r" "$WORK/v$r.tar.gz"
  A_ALL+=("$(ms apply "id-$r")")
  [ "$(readlink "$WORK/big/current")" = "releases/id-$r" ] || { echo "apply $r failed: $(cat "$WORK/big.err")" >&2; exit 1; }
  rm -rf "$WORK/x"; mkdir "$WORK/x"
  X_ALL+=("$(ms tar xzf "$WORK/v$r.tar.gz" -C "$WORK/x")")
  rm -rf "$WORK/x"; mkdir "$WORK/x"
  XS_ALL+=("$(ms sh -c "tar xzf '$WORK/v$r.tar.gz' -C '$WORK/x' && sync -f '$WORK/x'")")
done
HWM=$(awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$A_PID/status")
A=$(printf '%s\n' "${A_ALL[@]}" | median); X=$(printf '%s\n' "${X_ALL[@]}" | median)
XS=$(printf '%s\n' "${XS_ALL[@]}" | median)
echo "### apply (verify + unpack + switch) vs tar xzf, same package ($ROUNDS rounds, median)"
echo
echo "| | ms | vs tar xzf |"
echo "| --- | --- | --- |"
echo "| agent apply (signature, every sha256, sync, switch) | $A | $(awk -v a="$A" -v b="$X" 'BEGIN {printf "%.2f×", a/b}') |"
echo "| tar xzf | $X | 1.00× |"
echo "| tar xzf + sync -f | $XS | $(awk -v a="$XS" -v b="$X" 'BEGIN {printf "%.2f×", a/b}') |"
echo
echo "Agent peak RSS (VmHWM) after uploading and applying $ROUNDS × $(($(stat -c %s "$WORK/v1.tar.gz") / 1048576)) MiB packages: **$HWM MiB**"
echo
kill "$A_PID" 2>/dev/null || true

# A trivial worker: python3 -m http.server in the release directory.
mkdir -p "$WORK/small"
echo ok > "$WORK/small/index.html"
for v in a b; do
  echo "$v" > "$WORK/small/VERSION"
  "$BIN" package create --service bench --version "$v" --out "$WORK/$v.tar.gz" "$WORK/small" >/dev/null 2>&1
  "$BIN" package sign --key "$WORK/key" "$WORK/$v.tar.gz" >/dev/null
done
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
start_agent small --trusted-key "$WORK/key.pub" --health-url "http://127.0.0.1:$PORT/VERSION" \
  --grace 2s --run -- python3 -m http.server "$PORT" --bind 127.0.0.1
H_ALL=()
for i in $(seq "$APPLIES"); do
  v=$([ $((i % 2)) = 1 ] && echo a || echo b)
  upload "$v" "$WORK/$v.tar.gz"
  H_ALL+=("$(ms apply "$v")")
  [ "$(curl -s "http://127.0.0.1:$PORT/VERSION")" = "$v" ] || { echo "worker not on $v" >&2; exit 1; }
done
H=$(printf '%s\n' "${H_ALL[@]}" | median)
echo "### apply → new worker healthy (python3 -m http.server, $APPLIES applies, median)"
echo
echo "| | ms | all |"
echo "| --- | --- | --- |"
echo "| apply request → answered after the new worker's health check passed | $H | ${H_ALL[*]} |"
