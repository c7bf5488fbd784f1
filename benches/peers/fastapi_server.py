#!/usr/bin/env python3
"""FastAPI + onnxruntime: the "what a competent Python engineer would write" peer for Kiln's benches.

Serves ONE ONNX model over the KServe V2 HTTP protocol:

  POST /v2/models/NAME/infer      JSON tensors, and the binary tensor data extension
                                  (Inference-Header-Content-Length), which tritonclient and
                                  perf_analyzer use for inputs whatever you ask
  GET  /v2/models/NAME            model metadata (perf_analyzer reads it to shape its inputs)
  GET  /v2/models/NAME/config     a minimal Triton-style config (perf_analyzer requires one)
  GET  /v2/models/NAME/ready, /v2/health/ready, /v2/health/live, /v2

Usage (from the venv scripts/setup-bench makes):
  .venv-fastapi/bin/python benches/peers/fastapi_server.py --model M.onnx --name NAME --port 8001

Choices that make it a fair, reasonably optimised baseline rather than a strawman:
  * one InferenceSession per worker process, created once at start-up, with
    intra_op_num_threads=1 so W workers use W cores without oversubscribing the machine;
  * uvicorn with uvloop + httptools, access log off, W worker processes (default 2 = the cores);
  * the request body is parsed with orjson (not pydantic models) and the response is written
    with orjson's native numpy serialisation; no per-request validation layer beyond what the
    protocol needs;
  * the route is `async def` and calls session.run() inline: the model is CPU-bound and each
    worker owns one core, so handing it to a thread pool would only add a hop per request.
"""

import argparse
import os
import struct
import sys

import numpy as np
import onnxruntime as ort
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

# V2 datatype -> numpy dtype. BYTES become object arrays of str, which is what onnxruntime wants
# for tensor(string).
V2_TO_NUMPY = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
NUMPY_TO_V2 = {v: k for k, v in V2_TO_NUMPY.items()}

# onnxruntime's type strings -> V2 datatype, for metadata.
ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

JSON = "application/json"


class BadRequest(Exception):
    pass


def v2_datatype(arr: np.ndarray) -> str:
    if arr.dtype.kind in ("O", "U", "S"):
        return "BYTES"
    return NUMPY_TO_V2[arr.dtype]


def decode_bytes_tensor(buf: memoryview) -> list:
    """The binary extension's BYTES layout: each element is a 4-byte little-endian length + bytes."""
    out, pos, end = [], 0, len(buf)
    while pos < end:
        (n,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        out.append(bytes(buf[pos : pos + n]).decode("utf-8"))
        pos += n
    return out


def encode_bytes_tensor(arr: np.ndarray) -> bytes:
    parts = []
    for s in arr.ravel().tolist():
        b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def decode_input(inp: dict, binary: memoryview | None, offset: int) -> tuple[np.ndarray, int]:
    """One V2 request input -> numpy array. Returns the array and the new offset into `binary`."""
    try:
        datatype, shape = inp["datatype"], inp["shape"]
    except KeyError as e:
        raise BadRequest(f"input is missing {e}") from None
    dtype = V2_TO_NUMPY.get(datatype)
    if dtype is None:
        raise BadRequest(f"unsupported datatype {datatype}")
    params = inp.get("parameters") or {}
    size = params.get("binary_data_size")
    if size is not None:
        if binary is None or offset + size > len(binary):
            raise BadRequest(f"input {inp.get('name')}: binary data out of range")
        chunk = binary[offset : offset + size]
        offset += size
        if datatype == "BYTES":
            arr = np.array(decode_bytes_tensor(chunk), dtype=object)
        else:
            arr = np.frombuffer(chunk, dtype=dtype)
    else:
        data = inp.get("data")
        if data is None:
            raise BadRequest(f"input {inp.get('name')}: no data")
        arr = np.array(data, dtype=dtype)
    try:
        return arr.reshape(shape), offset
    except ValueError:
        raise BadRequest(f"input {inp.get('name')}: {arr.size} elements do not fit shape {shape}") from None


def create_app() -> FastAPI:
    """App factory: uvicorn calls it once in every worker process, so each gets its own session."""
    model_path = os.environ["PEER_MODEL"]
    model_name = os.environ["PEER_NAME"]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]

    def tensor_meta(t) -> dict:
        shape = [d if isinstance(d, int) else -1 for d in t.shape]
        return {"name": t.name, "datatype": ORT_TO_V2.get(t.type, t.type), "shape": shape}

    metadata = orjson.dumps(
        {
            "name": model_name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [tensor_meta(t) for t in session.get_inputs()],
            "outputs": [tensor_meta(t) for t in session.get_outputs()],
        }
    )
    # perf_analyzer insists on a model config; it only reads the tensor names and max_batch_size
    # (0 = the model takes the full shape, batch dimension included, as the metadata says).
    config = orjson.dumps(
        {
            "name": model_name,
            "platform": "onnxruntime_onnx",
            "max_batch_size": 0,
            "input": [{"name": t.name} for t in session.get_inputs()],
            "output": [{"name": t.name} for t in session.get_outputs()],
        }
    )

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    def error(status: int, msg: str) -> Response:
        return Response(orjson.dumps({"error": msg}), status_code=status, media_type=JSON)

    @app.get("/v2/health/ready")
    @app.get("/v2/health/live")
    async def health():
        return Response(status_code=200)

    @app.get("/v2")
    async def server_metadata():
        body = {"name": "fastapi-onnxruntime", "version": ort.__version__, "extensions": ["binary_tensor_data"]}
        return Response(orjson.dumps(body), media_type=JSON)

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str):
        if name != model_name:
            return error(404, f"unknown model {name}")
        return Response(metadata, media_type=JSON)

    @app.get("/v2/models/{name}/config")
    async def model_config(name: str):
        if name != model_name:
            return error(404, f"unknown model {name}")
        return Response(config, media_type=JSON)

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str):
        return Response(status_code=200 if name == model_name else 404)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request):
        if name != model_name:
            return error(404, f"unknown model {name}")
        body = await request.body()
        header_len = request.headers.get("inference-header-content-length")
        try:
            if header_len is not None:
                n = int(header_len)
                req = orjson.loads(body[:n])
                binary = memoryview(body)[n:]
            else:
                req = orjson.loads(body)
                binary = None
            feeds, offset = {}, 0
            for inp in req["inputs"]:
                feeds[inp["name"]], offset = decode_input(inp, binary, offset)
        except (BadRequest, ValueError, KeyError, TypeError) as e:
            # orjson.JSONDecodeError is a ValueError.
            return error(400, f"bad request: {e}")

        # Requested outputs (optional) and whether each comes back as binary data.
        all_binary = bool((req.get("parameters") or {}).get("binary_data_output", False))
        requested = req.get("outputs")
        if requested:
            names = [o["name"] for o in requested]
            binary_out = {
                o["name"]: bool((o.get("parameters") or {}).get("binary_data", all_binary)) for o in requested
            }
        else:
            names = output_names
            binary_out = dict.fromkeys(names, all_binary)

        try:
            results = session.run(names, feeds)
        except Exception as e:  # onnxruntime raises its own exception types for bad feeds
            return error(400, f"inference failed: {e}")

        outputs, chunks = [], []
        for out_name, arr in zip(names, results):
            out = {"name": out_name, "datatype": v2_datatype(arr), "shape": list(arr.shape)}
            if binary_out[out_name]:
                raw = encode_bytes_tensor(arr) if out["datatype"] == "BYTES" else np.ascontiguousarray(arr).tobytes()
                out["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            elif arr.dtype.kind == "O":
                out["data"] = arr.ravel().tolist()
            else:
                # orjson writes C-contiguous numpy arrays natively, far faster than .tolist().
                out["data"] = np.ascontiguousarray(arr).ravel()
            outputs.append(out)
        resp = orjson.dumps({"model_name": model_name, "model_version": "1", "outputs": outputs}, option=orjson.OPT_SERIALIZE_NUMPY)
        if not chunks:
            return Response(resp, media_type=JSON)
        return Response(
            resp + b"".join(chunks),
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(len(resp))},
        )

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="path to the .onnx file")
    p.add_argument("--name", required=True, help="model name in the URL")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2: one per core here)")
    args = p.parse_args()

    if not os.path.isfile(args.model):
        sys.exit(f"no such model: {args.model}")
    # Workers are separate processes that import this module afresh, so hand them the model by
    # environment rather than by argument.
    os.environ["PEER_MODEL"] = os.path.abspath(args.model)
    os.environ["PEER_NAME"] = args.name
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

    import uvicorn

    uvicorn.run(
        "fastapi_server:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
