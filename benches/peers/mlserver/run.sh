#!/usr/bin/env bash
# Serves one ONNX model with MLServer 1.7.1 and the onnxruntime custom runtime beside this script.
#
#   benches/peers/mlserver/run.sh MODEL_PATH NAME PORT
#
# Needs the venv from scripts/setup-bench (.venv-mlserver). Writes a throwaway model repository
# (settings.json + NAME/model-settings.json) under a temp dir, runs `mlserver start` on it in the
# foreground, and removes the dir when MLServer exits or this script is stopped (TERM/INT).
#
# Knobs (environment):
#   MLSERVER_PARALLEL_WORKERS  inference worker processes (default 0, see below)
#   MLSERVER_GRPC_PORT         gRPC port (default: any free one; MLServer cannot turn gRPC off)
#   MLSERVER_HOST              listen address (default 127.0.0.1)
#
# Why parallel_workers=0 on this 2-core machine, although MLServer's default is 1: MLServer's
# HTTP front end (uvicorn, JSON parsing, pydantic validation, codecs) is one process whatever the
# setting; parallel_workers=N>0 adds N processes and ships every decoded request to one of them
# through a multiprocessing queue and back. For models as small as Kiln's fixtures that round trip
# costs more than the inference, so 0 (inference inline in the front end's event loop) is the
# fastest MLServer can be here. Measured on this machine (wrk -t1 -c8 -d5s, JSON, idle box):
#                     parallel_workers=0   =1          =2
#   mlp   req/s       1428                 484         509
#   cnn   req/s       414                  270         243
#   slow  req/s       691                  365         386
# We configure the competitor at its best. Try others with MLSERVER_PARALLEL_WORKERS=N.
set -euo pipefail

if [ $# -ne 3 ]; then
  echo "usage: $0 MODEL_PATH NAME PORT" >&2
  exit 2
fi
model=$(realpath "$1")
name=$2
port=$3
[ -f "$model" ] || { echo "no such model: $1" >&2; exit 2; }

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
venv="$root/.venv-mlserver"
[ -x "$venv/bin/mlserver" ] || { echo "no $venv: run scripts/setup-bench first" >&2; exit 1; }

workers=${MLSERVER_PARALLEL_WORKERS:-0}
host=${MLSERVER_HOST:-127.0.0.1}
# gRPC always starts with MLServer; put it on a free port so it never collides with anything.
grpc_port=${MLSERVER_GRPC_PORT:-$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

repo=$(mktemp -d "${TMPDIR:-/tmp}/kiln-mlserver.XXXXXX")
mkdir -p "$repo/$name"
child=""
cleanup() {
  if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
    kill -TERM "$child" 2>/dev/null || true
    # MLServer drains and stops its workers on TERM; give it a few seconds, then insist.
    for _ in $(seq 50); do kill -0 "$child" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$child" 2>/dev/null || true
  fi
  rm -rf "$repo"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# Server settings (settings.json):
#   debug false            no per-request debug logging;
#   metrics_endpoint null  no Prometheus metrics server (MLServer's only way to switch it off);
#   gzip_enabled false     no response compression: no other server in the comparison compresses;
#   parallel_workers       see above.
# Model settings (NAME/model-settings.json): the custom runtime (runtime.py, importable through
# PYTHONPATH below, which parallel workers inherit too) and the model file as parameters.uri.
# No adaptive batching (max_batch_size 0): the other peers don't batch either.
# Written with json.dumps so any path or name is quoted correctly.
"$venv/bin/python" - "$repo" "$name" "$model" "$host" "$port" "$grpc_port" "$workers" <<'PY'
import json, os, sys
repo, name, model, host, port, grpc_port, workers = sys.argv[1:]
settings = {
    "debug": False,
    "host": host,
    "http_port": int(port),
    "grpc_port": int(grpc_port),
    "metrics_endpoint": None,
    "gzip_enabled": False,
    "parallel_workers": int(workers),
    "load_models_at_startup": True,
}
model_settings = {
    "name": name,
    "implementation": "runtime.OnnxRuntimeModel",
    "max_batch_size": 0,
    "parameters": {"uri": model, "version": "1"},
}
with open(os.path.join(repo, "settings.json"), "w") as f:
    json.dump(settings, f, indent=2)
with open(os.path.join(repo, name, "model-settings.json"), "w") as f:
    json.dump(model_settings, f, indent=2)
PY

# MLServer keeps per-run state (.envs, .metrics) in its working directory: use the temp dir.
cd "$repo"
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/mlserver" start "$repo" &
child=$!
wait "$child"
