"""Open Inference Protocol v2 (KServe / Triton) REST: JSON tensors in, JSON tensors out."""

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from device.engine.engine import ServingModel
from device.errors import InferenceInputError
from models.manifest import TensorSpec

DATATYPES = {
    "float32": "FP32",
    "float16": "FP16",
    "int8": "INT8",
    "uint8": "UINT8",
    "int32": "INT32",
    "int64": "INT64",
    "bool": "BOOL",
}
NUMPY_OF = {v: k for k, v in DATATYPES.items()}


class RequestTensor(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    shape: list[int] = Field(max_length=8)
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    inputs: list[RequestTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": DATATYPES[spec.dtype], "shape": spec.shape}


def model_metadata(serving: ServingModel) -> dict[str, Any]:
    m = serving.manifest
    return {
        "name": m.name,
        "versions": [str(m.version)],
        "platform": f"edgefleet_{serving.backend}",
        "inputs": [tensor_metadata(s) for s in m.inputs],
        "outputs": [tensor_metadata(s) for s in m.outputs],
    }


def decode_inputs(request: InferRequest) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for tensor in request.inputs:
        dtype = NUMPY_OF.get(tensor.datatype)
        if dtype is None:
            raise InferenceInputError(f"input {tensor.name!r}: unknown datatype {tensor.datatype!r}")
        if any(d < 0 for d in tensor.shape):
            raise InferenceInputError(f"input {tensor.name!r}: shape {tensor.shape} has a negative dimension")
        try:
            array = np.asarray(tensor.data, dtype=dtype)
        except (ValueError, TypeError) as e:
            raise InferenceInputError(f"input {tensor.name!r}: data is not {tensor.datatype}: {e}") from e
        if array.size != int(np.prod(tensor.shape)):
            raise InferenceInputError(
                f"input {tensor.name!r}: {array.size} values do not fill shape {tensor.shape}"
            )
        tensors[tensor.name] = array.reshape(tensor.shape)
    return tensors


def encode_outputs(
    serving: ServingModel, outputs: dict[str, np.ndarray], request: InferRequest
) -> dict[str, Any]:
    wanted = [o.name for o in request.outputs] if request.outputs else list(outputs)
    missing = [name for name in wanted if name not in outputs]
    if missing:
        raise InferenceInputError(
            f"requested outputs {missing} do not exist; the model has {sorted(outputs)}"
        )
    response: dict[str, Any] = {
        "model_name": serving.manifest.name,
        "model_version": str(serving.manifest.version),
        "outputs": [
            {
                "name": name,
                "datatype": DATATYPES.get(str(outputs[name].dtype), "BYTES"),
                "shape": list(outputs[name].shape),
                "data": outputs[name].ravel().tolist(),
            }
            for name in wanted
        ],
    }
    if request.id is not None:
        response["id"] = request.id
    return response
