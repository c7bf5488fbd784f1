#!/usr/bin/env python3
"""Drives a running `kiln serve` with the official tritonclient HTTP client (V2 protocol).

Usage: tritonclient_v2.py HOST:PORT FIXTURES_DIR MODEL...

For every fixture model served under its fixture name: server and model metadata, model config,
readiness, then inference with JSON data and with the binary tensor extension (inputs and outputs),
an output subset, a request id, parameters; outputs compared with onnxruntime's reference
(expected.json, floats within 1e-5 absolute + 1e-4 relative). Exits non-zero on the first mismatch.
"""

import json
import os
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

NP = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}


def array(t):
    if t["datatype"] == "BYTES":
        return np.array([s.encode() for s in t["data"]], dtype=np.object_).reshape(t["shape"])
    return np.array(t["data"], dtype=NP[t["datatype"]]).reshape(t["shape"])


def check(name, got, want):
    if want.dtype == np.object_:
        got = np.array([x.decode() if isinstance(x, bytes) else x for x in got.reshape(-1)], dtype=object)
        want = np.array([x.decode() for x in want.reshape(-1)], dtype=object)
        assert list(got) == list(want), f"{name}: {got} != {want}"
        return
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    if want.dtype.kind == "f":
        assert np.allclose(got, want, rtol=1e-4, atol=1e-5), f"{name}: {got} != {want}"
    else:
        assert np.array_equal(got, want), f"{name}: {got} != {want}"


def main():
    url, fixtures, models = sys.argv[1], sys.argv[2], sys.argv[3:]
    client = httpclient.InferenceServerClient(url=url, connection_timeout=30, network_timeout=30)
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "kiln" and "binary_tensor_data" in meta["extensions"], meta
    checked = 0
    for model in models:
        d = os.path.join(fixtures, model)
        request = json.load(open(os.path.join(d, "input.json")))
        expected = json.load(open(os.path.join(d, "expected.json")))
        assert client.is_model_ready(model), model
        md = client.get_model_metadata(model)
        assert [i["name"] for i in md["inputs"]] == [i["name"] for i in request["inputs"]] or \
            sorted(i["name"] for i in md["inputs"]) == sorted(i["name"] for i in request["inputs"]), md
        config = client.get_model_config(model)
        assert config["name"] == model and "max_batch_size" in config, config
        for binary in (False, True):
            inputs = []
            for t in request["inputs"]:
                inp = httpclient.InferInput(t["name"], t["shape"], t["datatype"])
                inp.set_data_from_numpy(array(t), binary_data=binary)
                inputs.append(inp)
            outputs = [httpclient.InferRequestedOutput(o["name"], binary_data=binary) for o in expected["outputs"]]
            result = client.infer(model, inputs, outputs=outputs, request_id=f"{model}-{binary}",
                                  parameters={"note": "kiln test"})
            response = result.get_response()
            assert response["id"] == f"{model}-{binary}", response
            assert response["model_name"] == model, response
            for o in expected["outputs"]:
                check(f"{model} {o['name']} binary={binary}", result.as_numpy(o["name"]), array(o))
            checked += 1
        # Only the last output, as JSON.
        last = expected["outputs"][-1]
        result = client.infer(model, inputs, outputs=[httpclient.InferRequestedOutput(last["name"], binary_data=False)])
        names = [o["name"] for o in result.get_response()["outputs"]]
        assert names == [last["name"]], names
        check(f"{model} subset", result.as_numpy(last["name"]), array(last))
        stats = client.get_inference_statistics(model)
        s = stats["model_stats"][0]["inference_stats"]
        assert s["success"]["count"] >= 3, stats
        # Every stage is counted once per successful request (perf_analyzer refuses otherwise).
        counts = {k: s[k]["count"] for k in ("success", "queue", "compute_input", "compute_infer", "compute_output")}
        assert len(set(counts.values())) == 1, counts
    # Errors come back as exceptions carrying the server's message and status.
    try:
        client.infer("no-such-model", inputs)
        raise AssertionError("unknown model accepted")
    except InferenceServerException as e:
        assert "unknown model" in str(e) and str(e.status()) == "404", (str(e), e.status())
    index = client.get_model_repository_index()
    assert sorted(m["name"] for m in index) == sorted(models), index
    print(f"tritonclient: {checked} inference checks passed on {len(models)} models")


if __name__ == "__main__":
    main()
