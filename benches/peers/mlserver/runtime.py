"""An onnxruntime inference runtime for MLServer 1.7.1, the MLServer peer in Kiln's benches.

MLServer ships runtimes for sklearn, xgboost, lightgbm, mlflow, huggingface... but none for ONNX,
so this is the custom runtime a user would write, following MLServer's documented pattern:
subclass mlserver.MLModel, build the model in load(), decode inputs with MLServer's codecs in
predict(), encode outputs with NumpyCodec.

model-settings.json points at it with  "implementation": "runtime.OnnxRuntimeModel"  and gives the
.onnx path as parameters.uri (benches/peers/mlserver/run.sh writes both).
"""

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor
from mlserver.utils import get_model_uri

# onnxruntime's type strings -> V2 datatypes, for the model metadata.
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


def _metadata(t) -> MetadataTensor:
    shape = [d if isinstance(d, int) else -1 for d in t.shape]
    return MetadataTensor(name=t.name, datatype=ORT_TO_V2[t.type], shape=shape)


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        path = await get_model_uri(self._settings)
        opts = ort.SessionOptions()
        # One onnxruntime thread, as in every peer: the other core is busy with MLServer's HTTP
        # front end (and with parallel_workers > 0 each worker process has its own session, so
        # more threads would oversubscribe the two cores).
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self._output_names = [o.name for o in self._session.get_outputs()]
        # Publish the tensors in GET /v2/models/NAME (MLServer leaves them empty unless
        # model-settings.json lists them): V2 clients read them to shape their requests.
        self.inputs = [_metadata(t) for t in self._session.get_inputs()]
        self.outputs = [_metadata(t) for t in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        # self.decode honours a content_type on the input or in model-settings, else NumpyCodec:
        # FP32/INT64/BOOL -> numeric arrays, BYTES given as JSON strings -> a numpy str array,
        # which onnxruntime takes for tensor(string).
        feeds = {inp.name: self.decode(inp, default_codec=NumpyCodec) for inp in payload.inputs}

        names = [o.name for o in payload.outputs] if payload.outputs else self._output_names
        results = self._session.run(names, feeds)

        outputs = []
        for name, arr in zip(names, results):
            out = NumpyCodec.encode_output(name, arr)
            # NumpyCodec turns a 1-D shape [N] into [N, 1] (its "batch dimension" convention);
            # report the tensor's real shape so clients see what the model produced.
            out.shape = list(arr.shape)
            outputs.append(out)

        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=outputs,
        )
