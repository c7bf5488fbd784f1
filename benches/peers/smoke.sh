#!/usr/bin/env bash
# Smoke test for the peer servers Kiln is benchmarked against, on the real fixtures.
#
#   benches/peers/smoke.sh [FIXTURE...]     (default: every fixture in tests/fixtures/generated)
#
# For each fixture and each peer (fastapi = benches/peers/fastapi_server.py, mlserver =
# benches/peers/mlserver/run.sh): start the peer on a free loopback port serving that fixture's
# model, wait for it to be ready, POST the fixture's input.json to /v2/models/NAME/infer, compare
# with expected.json (check_v2.py), stop it. The FastAPI peer is also checked over the binary
# tensor extension (tritonclient), the way perf_analyzer talks to it. Then two short, bounded load
# runs prove the load generators work: perf_analyzer against the FastAPI peer, wrk against MLServer
# (perf_analyzer cannot drive MLServer: no binary tensor extension over HTTP, no model-config
# endpoint on HTTP or gRPC).
#
# Installs what it needs first (scripts/setup test: fixtures and .venv; scripts/setup-bench: the
# peers). Every wait is bounded; every server is started in its own process group and that group
# is stopped when its case ends and, whatever happens, when this script exits.
# Ends with "N passed, M failed"; exits non-zero if anything failed.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

READY_TIMEOUT=${READY_TIMEOUT:-90}   # seconds for a server to load its model (MLServer: ~5s idle)

scripts/setup test
scripts/setup-bench

fixtures_dir="$root/tests/fixtures/generated"
if [ $# -gt 0 ]; then
  fixtures=("$@")
else
  mapfile -t fixtures < <(python3 -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1]))["fixtures"]))' "$fixtures_dir/index.json")
fi

check=("$root/.venv/bin/python" "$root/benches/peers/check_v2.py")
logs=$(mktemp -d "${TMPDIR:-/tmp}/kiln-peer-smoke.XXXXXX")
servers=()   # process-group ids of servers still running

# Stops one server's whole process group (uvicorn workers, MLServer's inference workers):
# TERM, up to 10s to exit, then KILL.
stop_group() {
  local pgid=$1
  kill -TERM -- "-$pgid" 2>/dev/null || return 0
  for _ in $(seq 100); do
    kill -0 -- "-$pgid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL -- "-$pgid" 2>/dev/null || true
}
cleanup() {
  for pgid in "${servers[@]}"; do stop_group "$pgid"; done
  rm -rf "$logs"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_peer PEER MODEL NAME PORT LOG: starts it in a new session (setsid), so its pid is its
# process-group id; sets $server_pid.
start_peer() {
  local peer=$1 model=$2 name=$3 port=$4 log=$5
  case "$peer" in
    fastapi) setsid "$root/.venv-fastapi/bin/python" benches/peers/fastapi_server.py \
               --model "$model" --name "$name" --port "$port" >"$log" 2>&1 & ;;
    mlserver) setsid benches/peers/mlserver/run.sh "$model" "$name" "$port" >"$log" 2>&1 & ;;
  esac
  server_pid=$!
  servers+=("$server_pid")
}
stop_peer() {
  stop_group "$1"
  local keep=()
  for pgid in "${servers[@]}"; do [ "$pgid" = "$1" ] || keep+=("$pgid"); done
  servers=("${keep[@]+"${keep[@]}"}")
}

passed=0
failed=0
report() {  # report LABEL OUTPUT STATUS LOG
  if [ "$3" -eq 0 ]; then
    passed=$((passed + 1))
    printf '  %-34s %s\n' "$1" "$2"
  else
    failed=$((failed + 1))
    printf '  %-34s %s\n' "$1" "${2:-FAIL}"
    if [ -n "$4" ] && [ -f "$4" ]; then sed 's/^/      | /' "$4" | tail -25; fi
  fi
}

say "checking peers against fixtures: ${fixtures[*]}"
for fx in "${fixtures[@]}"; do
  model="$fixtures_dir/$fx/model.onnx"
  [ -f "$model" ] || { report "$fx" "no such fixture ($model)" 1 ""; continue; }
  for peer in fastapi mlserver; do
    port=$(free_port)
    log="$logs/$peer-$fx.log"
    start_peer "$peer" "$model" "$fx" "$port" "$log"
    url="http://127.0.0.1:$port"
    set +e
    out=$(timeout $((READY_TIMEOUT + 40)) "${check[@]}" --url "$url" --name "$fx" --fixture "$fixtures_dir/$fx" \
            --pid "$server_pid" --ready-timeout "$READY_TIMEOUT" 2>&1)
    status=$?
    set -e
    report "$peer $fx (JSON)" "$out" "$status" "$log"
    if [ "$peer" = fastapi ] && [ "$status" -eq 0 ]; then
      set +e
      out=$(timeout 60 "${check[@]}" --url "$url" --name "$fx" --fixture "$fixtures_dir/$fx" --binary 2>&1)
      status=$?
      set -e
      report "$peer $fx (binary)" "$out" "$status" "$log"
    fi
    stop_peer "$server_pid"
  done
done

# Load generators, briefly (a few seconds each, loopback only, bounded by timeout).
say "load generators"
if [ -f "$fixtures_dir/mlp/model.onnx" ]; then
  port=$(free_port)
  log="$logs/fastapi-perf_analyzer.log"
  start_peer fastapi "$fixtures_dir/mlp/model.onnx" mlp "$port" "$log"
  set +e
  out=$(timeout $((READY_TIMEOUT + 10)) "${check[@]}" --url "http://127.0.0.1:$port" --name mlp \
          --fixture "$fixtures_dir/mlp" --pid "$server_pid" --ready-timeout "$READY_TIMEOUT" 2>&1) &&
  # count_windows of 200 requests, at most 3 of them, any spread accepted: this proves the tool
  # and the protocol work, it is not a measurement.
  out=$(timeout 60 .bench-tools/bin/perf_analyzer -m mlp -u "127.0.0.1:$port" -i http --shape input:1,64 \
          --concurrency-range 2 --measurement-mode count_windows --measurement-request-count 200 \
          --max-trials 3 --stability-percentage 999 2>&1)
  status=$?
  set -e
  if [ "$status" -eq 0 ] && grep -q "Throughput:" <<<"$out"; then
    report "perf_analyzer -> fastapi mlp" "ok ($(grep -m1 -o 'Throughput: .*' <<<"$out"))" 0 ""
  else
    printf '%s\n' "$out" >>"$log"
    report "perf_analyzer -> fastapi mlp" "FAIL (exit $status)" 1 "$log"
  fi
  stop_peer "$server_pid"

  port=$(free_port)
  log="$logs/mlserver-wrk.log"
  start_peer mlserver "$fixtures_dir/mlp/model.onnx" mlp "$port" "$log"
  set +e
  out=$(timeout $((READY_TIMEOUT + 10)) "${check[@]}" --url "http://127.0.0.1:$port" --name mlp \
          --fixture "$fixtures_dir/mlp" --pid "$server_pid" --ready-timeout "$READY_TIMEOUT" 2>&1) &&
  # The same wrk script Kiln's own serve benches use (benches/serve/post.lua: POSTs $KILN_BODY).
  out=$(KILN_BODY="$fixtures_dir/mlp/input.json" timeout 30 wrk -t1 -c2 -d3s -s benches/serve/post.lua \
          "http://127.0.0.1:$port/v2/models/mlp/infer" 2>&1)
  status=$?
  set -e
  # wrk counts non-2xx answers separately; a working run has requests and none of those.
  if [ "$status" -eq 0 ] && grep -q "requests in" <<<"$out" && ! grep -q "Non-2xx" <<<"$out"; then
    report "wrk -> mlserver mlp" "ok ($(grep -m1 -o 'Requests/sec: .*' <<<"$out" | tr -s ' ') over 3s)" 0 ""
  else
    printf '%s\n' "$out" >>"$log"
    report "wrk -> mlserver mlp" "FAIL (exit $status)" 1 "$log"
  fi
  stop_peer "$server_pid"
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
