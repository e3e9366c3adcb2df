"""Open Inference Protocol v2 (KServe / Triton) REST bodies, with Triton's binary tensor data extension.

A request body is one JSON object, optionally followed by raw tensor bytes; then the
`Inference-Header-Content-Length` header gives the JSON's length, and each binary input names its
byte count in `parameters.binary_data_size`, in input order. Outputs asked for with
`parameters.binary_data` (or all of them, with the request's `binary_data_output`) come back the same
way. Triton's own client sends and asks for binary by default; large tensors drown in JSON otherwise.

Binary tensors are little-endian, row-major, unpadded: numpy's native layout on every board we run on,
so they are read with np.frombuffer over the body itself (no copy), once their declared sizes are
checked against shapes and dtypes.
"""

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from device.engine.engine import ServingModel
from device.errors import EngineError, InferenceInputError
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
NUMPY_OF = {v: np.dtype(k) for k, v in DATATYPES.items()}
# Outputs may carry more dtypes than the manifest lets inputs have; keyed by dtype (str(dtype) is slow).
DATATYPE_OF = {
    np.dtype(k): v
    for k, v in {
        **DATATYPES,
        "float64": "FP64",
        "int16": "INT16",
        "uint16": "UINT16",
        "uint32": "UINT32",
    }.items()
}
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DIMS = 8
INPUT_PARAMETERS = {"binary_data_size"}
OUTPUT_PARAMETERS = {"binary_data"}


class RequestSchemaError(InferenceInputError):
    """The body is not a well-formed v2 request at all (HTTP 422), as opposed to wrong for the model."""


class RequestTensor(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    shape: list[int] = Field(max_length=MAX_DIMS)
    datatype: str
    data: list[Any] | None = Field(default=None, description="row-major values; omit for binary data")
    parameters: dict[str, Any] | None = Field(default=None, description='{"binary_data_size": bytes}')


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    parameters: dict[str, Any] | None = Field(default=None, description='{"binary_data": true}')


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    inputs: list[RequestTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = Field(default=None, description='{"binary_data_output": true}')


@dataclass(frozen=True)
class ParsedRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]] | None  # requested (name, as binary); None = all outputs
    binary_default: bool  # binary_data_output: how outputs not named in `outputs` come back


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


def parse_infer_request(body: bytes, header_length: str | None) -> ParsedRequest:
    """Split and decode a v2 request body; every size is checked before anything is read."""
    json_end = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise RequestSchemaError(
                f"{HEADER_LENGTH} is {header_length!r}, but the body is {len(body)} bytes; "
                "it must give the length of the JSON part"
            )
        json_end = int(header_length)
    try:
        request = InferRequest.model_validate_json(body[:json_end])  # copies the JSON part only
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()[:5]
        )
        if header_length is None and any(err["type"] == "json_invalid" for err in e.errors()):
            problems += f" (binary tensors after the JSON need the {HEADER_LENGTH} header)"
        raise RequestSchemaError(f"not a v2 inference request: {problems}") from e
    tensors = _decode_inputs(request, body, json_end)
    outputs = None
    if request.outputs is not None:
        outputs = [(o.name, _wants_binary(o)) for o in request.outputs]
    binary_default = bool((request.parameters or {}).get("binary_data_output", False))
    return ParsedRequest(request.id, tensors, outputs, binary_default)


def _wants_binary(output: RequestedOutput) -> bool:
    parameters = output.parameters or {}
    unknown = set(parameters) - OUTPUT_PARAMETERS
    if unknown:
        raise InferenceInputError(
            f"output {output.name!r}: parameters {sorted(unknown)} are not supported here "
            f"(supported: {sorted(OUTPUT_PARAMETERS)}; no shared memory, no classification)"
        )
    return bool(parameters.get("binary_data", False))


def _decode_inputs(request: InferRequest, body: bytes, json_end: int) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    offset = json_end
    for tensor in request.inputs:
        where = f"input {tensor.name!r}"
        dtype = NUMPY_OF.get(tensor.datatype)
        if dtype is None:
            raise InferenceInputError(
                f"{where}: unknown datatype {tensor.datatype!r}; use one of {sorted(NUMPY_OF)}"
            )
        if tensor.shape and min(tensor.shape) < 0:
            raise InferenceInputError(f"{where}: shape {tensor.shape} has a negative dimension")
        if tensor.name in tensors:
            raise InferenceInputError(f"{where} is given twice")
        parameters = tensor.parameters or {}
        if not INPUT_PARAMETERS.issuperset(parameters):
            unknown = set(parameters) - INPUT_PARAMETERS
            raise InferenceInputError(
                f"{where}: parameters {sorted(unknown)} are not supported here "
                f"(supported: {sorted(INPUT_PARAMETERS)}; no shared memory)"
            )
        count = math.prod(tensor.shape)  # Python ints: a huge shape cannot overflow into a small size
        size = parameters.get("binary_data_size")
        if size is not None:
            if tensor.data is not None:
                raise InferenceInputError(f"{where} has both JSON data and binary_data_size; send one")
            array = _binary_tensor(where, body, offset, size, count, dtype, json_end)
            offset += count * dtype.itemsize
        elif tensor.data is not None:
            array = _json_tensor(where, tensor.data, count, dtype, tensor.datatype)
        else:
            raise InferenceInputError(f"{where} has neither data nor parameters.binary_data_size")
        tensors[tensor.name] = array.reshape(tensor.shape)
    if offset != len(body):
        raise InferenceInputError(
            f"the body has {len(body) - json_end} bytes after the JSON, but the binary inputs declare "
            f"{offset - json_end}"
        )
    return tensors


def _binary_tensor(
    where: str, body: bytes, offset: int, size: Any, count: int, dtype: np.dtype[Any], json_end: int
) -> np.ndarray:
    if json_end == len(body) and size:
        raise InferenceInputError(f"{where} has binary data but the request has no {HEADER_LENGTH} header")
    if type(size) is not int or size < 0:
        raise InferenceInputError(f"{where}: binary_data_size must be a byte count, got {size!r}")
    if size != count * dtype.itemsize:
        raise InferenceInputError(
            f"{where}: binary_data_size is {size} bytes, but its shape and datatype take "
            f"{count * dtype.itemsize}"
        )
    if offset + size > len(body):
        raise InferenceInputError(
            f"{where}: binary data runs past the end of the body "
            f"({len(body) - offset} bytes left, {size} needed)"
        )
    # Read in place. Tensors start wherever the JSON ended, so most are unaligned; the batcher aligns
    # a request that runs alone and stacks the others into a new (aligned) array anyway, so no copy
    # is made here, on the event loop's thread.
    return np.frombuffer(body, dtype=dtype, count=count, offset=offset)


def _json_tensor(where: str, data: list[Any], count: int, dtype: np.dtype[Any], datatype: str) -> np.ndarray:
    # Flat data (what clients send) is counted before numpy allocates anything for it.
    if data and not isinstance(data[0], list) and len(data) != count:
        raise InferenceInputError(f"{where}: {len(data)} values do not fill shape of {count} values")
    try:
        array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise InferenceInputError(f"{where}: data is not {datatype}: {e}") from e
    if array.size != count:
        raise InferenceInputError(f"{where}: {array.size} values do not fill shape of {count} values")
    return array.ravel()


def encode_infer_response(
    serving: ServingModel, outputs: dict[str, np.ndarray], request: ParsedRequest
) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON part when binary tensors follow it (else None)."""
    if request.outputs is None:
        wanted = [(name, request.binary_default) for name in outputs]
    else:
        wanted = request.outputs
        missing = [name for name, _ in wanted if name not in outputs]
        if missing:
            raise InferenceInputError(
                f"requested outputs {missing} do not exist; the model has {sorted(outputs)}"
            )
    described: list[str] = []
    blobs: list[memoryview] = []
    for name, binary in wanted:
        array = outputs[name]
        datatype = DATATYPE_OF.get(array.dtype)
        if datatype is None:
            raise EngineError(f"output {name!r} is {array.dtype}, which the v2 protocol cannot carry")
        if binary:
            blob = np.ascontiguousarray(array).data.cast("B")
            blobs.append(blob)
            # Written out rather than through json.dumps: the same bytes for a third of the CPU, and
            # this runs once per output of every request. Names are JSON-quoted by json itself.
            shape = ",".join(map(str, array.shape))
            described.append(
                f'{{"name":{_quoted(name)},"datatype":"{datatype}","shape":[{shape}],'
                f'"parameters":{{"binary_data_size":{blob.nbytes}}}}}'
            )
        else:
            entry = {
                "name": name,
                "datatype": datatype,
                "shape": list(array.shape),
                "data": array.ravel().tolist(),
            }
            described.append(json.dumps(entry, separators=(",", ":")))
    manifest = serving.manifest
    header = (
        f'{{"model_name":{_quoted(manifest.name)},"model_version":"{manifest.version}",'
        f'"outputs":[{",".join(described)}]'
        + (f',"id":{json.dumps(request.id)}}}' if request.id is not None else "}")
    ).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


@functools.lru_cache(maxsize=256)
def _quoted(text: str) -> str:
    """`text` as a JSON string; model and output names repeat on every request, so they are cached."""
    return json.dumps(text)
