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


# JSON parts up to this size are remembered with what they decode to (`_plan`): a client sends the
# same JSON header with every request of a stream (only the binary tensors change), and pydantic plus
# the checks below cost ~15 µs of the event loop's CPU per request, a few percent of a small model's.
PLAN_CACHE_MAX_JSON = 4096
PLAN_CACHE_SIZE = 128


@dataclass(frozen=True, slots=True)
class BinaryInput:
    """Where one binary input lies in the body, relative to the end of the JSON part."""

    name: str
    dtype: np.dtype[Any]
    count: int
    offset: int
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """What a JSON part says, checked: how to read the binary inputs that follow it, and what to answer."""

    id: str | None
    binary: tuple[BinaryInput, ...]
    json_inputs: tuple[tuple[str, np.ndarray], ...]  # inputs whose data was in the JSON itself
    outputs: list[tuple[str, bool]] | None
    binary_default: bool


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
    binary_bytes = len(body) - json_end
    json_part = body[:json_end]  # copies the JSON part only
    if json_end <= PLAN_CACHE_MAX_JSON:
        plan = _cached_plan(json_part, binary_bytes, header_length is None)
    else:
        plan = _plan(json_part, binary_bytes, header_length is None)
    tensors: dict[str, np.ndarray] = dict(plan.json_inputs)
    for b in plan.binary:
        # Read in place. Tensors start wherever the JSON ended, so most are unaligned; the batcher
        # aligns a request that runs alone and stacks the others into a new (aligned) array anyway,
        # so no copy is made here, on the event loop's thread.
        tensors[b.name] = np.frombuffer(body, b.dtype, b.count, json_end + b.offset).reshape(b.shape)
    return ParsedRequest(plan.id, tensors, plan.outputs, plan.binary_default)


def _plan(json_part: bytes, binary_bytes: int, no_header_length: bool) -> RequestPlan:
    """Validate a JSON part against the protocol and the `binary_bytes` that follow it."""
    try:
        request = InferRequest.model_validate_json(json_part)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()[:5]
        )
        if no_header_length and any(err["type"] == "json_invalid" for err in e.errors()):
            problems += f" (binary tensors after the JSON need the {HEADER_LENGTH} header)"
        raise RequestSchemaError(f"not a v2 inference request: {problems}") from e
    binary, json_inputs = _decode_inputs(request, binary_bytes)
    outputs = None
    if request.outputs is not None:
        outputs = [(o.name, _wants_binary(o)) for o in request.outputs]
    binary_default = bool((request.parameters or {}).get("binary_data_output", False))
    return RequestPlan(request.id, binary, json_inputs, outputs, binary_default)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _cached_plan(json_part: bytes, binary_bytes: int, no_header_length: bool) -> RequestPlan:
    """`_plan`, remembered. Errors are not (lru_cache keeps results only). JSON data arrays in a
    remembered plan are shared by the requests that repeat it: the engine never writes to inputs."""
    plan = _plan(json_part, binary_bytes, no_header_length)
    for _, array in plan.json_inputs:
        array.flags.writeable = False
    return plan


def _wants_binary(output: RequestedOutput) -> bool:
    parameters = output.parameters or {}
    unknown = set(parameters) - OUTPUT_PARAMETERS
    if unknown:
        raise InferenceInputError(
            f"output {output.name!r}: parameters {sorted(unknown)} are not supported here "
            f"(supported: {sorted(OUTPUT_PARAMETERS)}; no shared memory, no classification)"
        )
    return bool(parameters.get("binary_data", False))


def _decode_inputs(
    request: InferRequest, binary_bytes: int
) -> tuple[tuple[BinaryInput, ...], tuple[tuple[str, np.ndarray], ...]]:
    binary: list[BinaryInput] = []
    json_inputs: list[tuple[str, np.ndarray]] = []
    names: set[str] = set()
    offset = 0
    for tensor in request.inputs:
        where = f"input {tensor.name!r}"
        dtype = NUMPY_OF.get(tensor.datatype)
        if dtype is None:
            raise InferenceInputError(
                f"{where}: unknown datatype {tensor.datatype!r}; use one of {sorted(NUMPY_OF)}"
            )
        if tensor.shape and min(tensor.shape) < 0:
            raise InferenceInputError(f"{where}: shape {tensor.shape} has a negative dimension")
        if tensor.name in names:
            raise InferenceInputError(f"{where} is given twice")
        names.add(tensor.name)
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
            _check_binary(where, binary_bytes, offset, size, count, dtype)
            binary.append(BinaryInput(tensor.name, dtype, count, offset, tuple(tensor.shape)))
            offset += count * dtype.itemsize
        elif tensor.data is not None:
            array = _json_tensor(where, tensor.data, count, dtype, tensor.datatype)
            json_inputs.append((tensor.name, array.reshape(tensor.shape)))
        else:
            raise InferenceInputError(f"{where} has neither data nor parameters.binary_data_size")
    if offset != binary_bytes:
        raise InferenceInputError(
            f"the body has {binary_bytes} bytes after the JSON, but the binary inputs declare {offset}"
        )
    return tuple(binary), tuple(json_inputs)


def _check_binary(
    where: str, binary_bytes: int, offset: int, size: Any, count: int, dtype: np.dtype[Any]
) -> None:
    if binary_bytes == 0 and size:
        raise InferenceInputError(f"{where} has binary data but the request has no {HEADER_LENGTH} header")
    if type(size) is not int or size < 0:
        raise InferenceInputError(f"{where}: binary_data_size must be a byte count, got {size!r}")
    if size != count * dtype.itemsize:
        raise InferenceInputError(
            f"{where}: binary_data_size is {size} bytes, but its shape and datatype take "
            f"{count * dtype.itemsize}"
        )
    if offset + size > binary_bytes:
        raise InferenceInputError(
            f"{where}: binary data runs past the end of the body "
            f"({binary_bytes - offset} bytes left, {size} needed)"
        )


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
            described.append(_binary_output(name, datatype, array.shape, blob.nbytes))
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
        _answer_head(manifest.name, manifest.version)
        + ",".join(described)
        + (f'],"id":{json.dumps(request.id)}}}' if request.id is not None else "]}")
    ).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


# Written out rather than through json.dumps, and remembered: the same outputs, shapes and model come
# back with every request of a stream. Names are JSON-quoted by json itself.
@functools.lru_cache(maxsize=256)
def _binary_output(name: str, datatype: str, shape: tuple[int, ...], nbytes: int) -> str:
    return (
        f'{{"name":{json.dumps(name)},"datatype":"{datatype}","shape":[{",".join(map(str, shape))}],'
        f'"parameters":{{"binary_data_size":{nbytes}}}}}'
    )


@functools.lru_cache(maxsize=64)
def _answer_head(model: str, version: int) -> str:
    return f'{{"model_name":{json.dumps(model)},"model_version":"{version}","outputs":['
