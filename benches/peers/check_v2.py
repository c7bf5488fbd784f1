#!/usr/bin/env python3
"""Checks one running KServe V2 server against one Kiln fixture; benches/peers/smoke.sh runs it.

  check_v2.py --url http://127.0.0.1:PORT --name NAME --fixture tests/fixtures/generated/iris
              [--pid PID] [--ready-timeout 60] [--binary]

1. Waits (at most --ready-timeout seconds) for GET /v2/models/NAME/ready to answer 200, failing at
   once if process PID (the server) has exited.
2. Default: POSTs the fixture's input.json as it is (V2 JSON) to /v2/models/NAME/infer.
   --binary: sends the same tensors with tritonclient's HTTP client using the binary tensor data
   extension for inputs and outputs, the way perf_analyzer and tritonclient talk by default
   (needs tritonclient, which the project's .venv from scripts/setup has).
3. Compares every output of expected.json (onnxruntime's reference) by name: datatype and shape
   exactly, numbers within the project's tolerance (atol 1e-5 + rtol 1e-4, as tests/common),
   integers, booleans and strings exactly.

Uses only the standard library and numpy for the JSON path. Exit 0 when everything matches.
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

import numpy as np

ATOL, RTOL = 1e-5, 1e-4
NUMPY = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def wait_ready(url: str, name: str, pid: int | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if pid is not None and not alive(pid):
            sys.exit(f"FAIL: server process {pid} exited before it was ready ({last})")
        try:
            with urllib.request.urlopen(f"{url}/v2/models/{name}/ready", timeout=2) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.2)
    sys.exit(f"FAIL: not ready within {timeout:.0f}s ({last})")


def infer_json(url: str, name: str, body: bytes) -> list[dict]:
    req = urllib.request.Request(
        f"{url}/v2/models/{name}/infer", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            resp = json.loads(r.read())
    except urllib.error.HTTPError as e:
        sys.exit(f"FAIL: HTTP {e.code}: {e.read()[:500]!r}")
    return [
        {"name": o["name"], "datatype": o["datatype"], "shape": o["shape"], "data": np.array(o["data"]).ravel()}
        for o in resp["outputs"]
    ]


def infer_binary(url: str, name: str, request: dict, expected: list[dict]) -> list[dict]:
    import tritonclient.http as http

    client = http.InferenceServerClient(url.removeprefix("http://"), network_timeout=30.0)
    inputs = []
    for inp in request["inputs"]:
        arr = np.array(inp["data"], dtype=NUMPY[inp["datatype"]]).reshape(inp["shape"])
        i = http.InferInput(inp["name"], inp["shape"], inp["datatype"])
        i.set_data_from_numpy(arr, binary_data=True)
        inputs.append(i)
    outputs = [http.InferRequestedOutput(o["name"], binary_data=True) for o in expected]
    result = client.infer(name, inputs, outputs=outputs)
    got = []
    for o in expected:
        meta = result.get_output(o["name"])
        if meta is None:
            sys.exit(f"FAIL: no output {o['name']} in the response")
        if "parameters" not in meta or "binary_data_size" not in meta["parameters"]:
            sys.exit(f"FAIL: output {o['name']} came back as JSON although binary_data was requested")
        arr = result.as_numpy(o["name"])
        if meta["datatype"] == "BYTES":
            arr = np.array([b.decode("utf-8") for b in arr.ravel()], dtype=object)
        got.append({"name": o["name"], "datatype": meta["datatype"], "shape": meta["shape"], "data": arr.ravel()})
    return got


def compare(got: list[dict], expected: list[dict]) -> list[str]:
    by_name = {o["name"]: o for o in got}
    problems = []
    for want in expected:
        name = want["name"]
        o = by_name.get(name)
        if o is None:
            problems.append(f"{name}: missing")
            continue
        if o["datatype"] != want["datatype"]:
            problems.append(f"{name}: datatype {o['datatype']} != {want['datatype']}")
        if list(o["shape"]) != list(want["shape"]):
            problems.append(f"{name}: shape {o['shape']} != {want['shape']}")
        w = np.array(want["data"]).ravel()
        g = o["data"]
        if g.size != w.size:
            problems.append(f"{name}: {g.size} elements != {w.size}")
        elif want["datatype"].startswith("FP"):
            g, w = g.astype(np.float64), w.astype(np.float64)
            if not np.allclose(g, w, rtol=RTOL, atol=ATOL, equal_nan=True):
                worst = int(np.argmax(np.abs(g - w)))
                problems.append(f"{name}: element {worst} is {g[worst]!r}, expected {w[worst]!r}")
        elif g.tolist() != w.tolist():
            problems.append(f"{name}: {g.tolist()[:8]} != {w.tolist()[:8]}")
    return problems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--fixture", required=True, help="dir with input.json and expected.json")
    p.add_argument("--pid", type=int, help="server process to watch while waiting")
    p.add_argument("--ready-timeout", type=float, default=60.0)
    p.add_argument("--binary", action="store_true", help="use the binary tensor data extension")
    args = p.parse_args()

    with open(os.path.join(args.fixture, "input.json"), "rb") as f:
        body = f.read()
    with open(os.path.join(args.fixture, "expected.json")) as f:
        expected = json.load(f)["outputs"]

    t0 = time.monotonic()
    wait_ready(args.url, args.name, args.pid, args.ready_timeout)
    ready_s = time.monotonic() - t0
    if args.binary:
        got = infer_binary(args.url, args.name, json.loads(body), expected)
    else:
        got = infer_json(args.url, args.name, body)
    problems = compare(got, expected)
    if problems:
        print("FAIL: " + "; ".join(problems))
        sys.exit(1)
    names = ", ".join(f"{o['name']} {o['datatype']}{list(o['shape'])}" for o in expected)
    print(f"ok (ready after {ready_s:.1f}s; {names})")


if __name__ == "__main__":
    main()
