"""TensorRT: build an engine from the ONNX model (fp32/fp16/int8), cache it, run it on device buffers.

Written against the TensorRT 10 Python API (named tensors: `set_input_shape`, `set_tensor_address`,
`execute_async_v3`), which TensorRT has had since 8.5, so JetPack 5.1+ and 6.x run it too. TensorRT 11
removed the fp16/int8 builder flags (networks are strongly typed): there the precision must already be
in the model, and the build says so when it is not. Device memory and the stream come from
cuda-python's runtime bindings; no PyCUDA, no torch.

An engine only runs on the GPU model and TensorRT version that built it, so the cache key holds
both, with the model's hash and everything that changes the build (precision, batch range).
"""

import contextlib
import functools
import hashlib
import json
import os
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from device.atomic import write_atomic, write_json_atomic
from device.engine.backends.base import Tensors
from device.engine.probe import HardwareProfile
from device.errors import EngineError
from models.manifest import Manifest, ModelFormat

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")
MIN_TENSORRT = (8, 5)  # the named-tensor API below
DEFAULT_MAX_BATCH = 8
DEFAULT_WORKSPACE_BYTES = 1 << 30
# Bump when the build recipe changes, so engines built the old way are not reused.
BUILD_RECIPE = "edgefleet-trt/1"


def _capability(cc: str) -> tuple[int, int]:
    major, _, minor = cc.partition(".")
    return int(major), int(minor or 0)


def has_fast_fp16(compute_capability: str) -> bool:
    """Full-rate fp16: Jetson Nano/TX1 (5.3), P100 (6.0), TX2 (6.2) and every GPU from Volta (7.0) on."""
    cc = _capability(compute_capability)
    return cc in ((5, 3), (6, 0), (6, 2)) or cc >= (7, 0)


def has_fast_int8(compute_capability: str) -> bool:
    """DP4A int8: consumer Pascal (6.1) and every GPU from Volta (7.0) on; not P100 or TX2."""
    cc = _capability(compute_capability)
    return cc == (6, 1) or cc >= (7, 0)


def select_precision(requested: str, compute_capability: str | None) -> Precision:
    """The precision to build with, or an EngineError that says what to set instead."""
    if requested not in PRECISIONS:
        raise EngineError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    precision: Precision = requested
    if compute_capability is None or precision == "fp32":
        return precision  # an unknown GPU is left to TensorRT's builder to accept or refuse
    if precision == "fp16" and not has_fast_fp16(compute_capability):
        raise EngineError(f"this GPU (sm_{compute_capability}) has no fast fp16; set the precision to fp32")
    if precision == "int8" and not has_fast_int8(compute_capability):
        raise EngineError(
            f"this GPU (sm_{compute_capability}) has no fast int8; set the precision to fp16 or fp32"
        )
    return precision


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numbers of a version: "10.3.0.30" -> (10, 3, 0, 30), "11.4.0rc1" -> (11, 4, 0)."""
    parts = []
    for piece in version.split("."):
        found = re.match(r"\d+", piece)
        if found is None:
            break
        parts.append(int(found.group()))
        if found.end() < len(piece):
            break
    return tuple(parts)


@dataclass(frozen=True)
class EngineCacheKey:
    model_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: Precision
    max_batch: int
    recipe: str = BUILD_RECIPE

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


class EngineCache:
    """Serialized engines in one folder: `<digest>.engine`, and `<digest>.json` naming the key and
    the engine's own sha256, so a file cut short or rotted on an SD card is rebuilt, never run."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path_for(self, key: EngineCacheKey) -> Path:
        return self.folder / f"{key.digest()}.engine"

    def load(self, key: EngineCacheKey) -> bytes | None:
        path = self.path_for(key)
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            blob = path.read_bytes()
        except (OSError, ValueError):
            return None
        if meta.get("key") != asdict(key) or meta.get("engine_sha256") != hashlib.sha256(blob).hexdigest():
            self.evict(key)
            return None
        return blob

    def store(self, key: EngineCacheKey, blob: bytes) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path_for(key)
        write_atomic(path, blob)
        # The sidecar goes last: an engine without one is never trusted.
        write_json_atomic(
            path.with_suffix(".json"),
            {"key": asdict(key), "engine_sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)},
        )
        return path

    def evict(self, key: EngineCacheKey) -> None:
        path = self.path_for(key)
        path.with_suffix(".json").unlink(missing_ok=True)
        path.unlink(missing_ok=True)


def default_cache_dir() -> Path:
    """$EDGEFLEET_CACHE_DIR/tensorrt, else the XDG cache folder."""
    base = os.environ.get("EDGEFLEET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgefleet"
    )
    return Path(base) / "tensorrt"


def batch_problem(manifest: Manifest) -> str | None:
    """Why TensorRT cannot take this model's input shapes (only the batch may be dynamic), or None."""
    for spec in manifest.inputs:
        if any(d < 0 for d in spec.shape[1:]):
            return (
                f"input {spec.name!r} has a dynamic dimension other than the batch ({spec.shape}); "
                "export the model with fixed sizes for TensorRT"
            )
    return None


def _gpu(profile: HardwareProfile) -> tuple[str | None, str | None]:
    for gpu in profile.gpus:
        return gpu.name, gpu.compute_capability
    return None, None


class TensorRTBackend:
    name = "tensorrt"

    def __init__(
        self,
        cache_dir: Path | None = None,
        precision: str = "fp32",
        max_batch: int = DEFAULT_MAX_BATCH,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    ) -> None:
        if max_batch < 1:
            raise EngineError(f"max_batch must be at least 1, not {max_batch}")
        self.cache = EngineCache(cache_dir or default_cache_dir())
        self.precision = precision
        self.max_batch = max_batch
        self.workspace_bytes = workspace_bytes

    def unavailable_reason(self, profile: HardwareProfile, manifest: Manifest) -> str | None:
        if manifest.format not in (ModelFormat.ONNX, ModelFormat.TENSORRT_ENGINE):
            return f"runs ONNX models and TensorRT engines only, this one is {manifest.format.value}"
        if not profile.nvidia_gpu:
            return "the probe found no NVIDIA GPU"
        if not profile.runtimes.get("tensorrt"):
            return (
                "the tensorrt Python package is not installed "
                "(JetPack: apt install python3-libnvinfer; elsewhere: pip install tensorrt)"
            )
        if profile.tensorrt and version_tuple(profile.tensorrt) < MIN_TENSORRT:
            return (
                f"TensorRT {profile.tensorrt} is too old; this backend needs "
                f"{'.'.join(map(str, MIN_TENSORRT))}+ (JetPack 5.1 or later)"
            )
        if not profile.runtimes.get("cuda-python"):
            return "cuda-python is not installed (pip install cuda-python); it provides the device buffers"
        problem = batch_problem(manifest)
        if problem is not None:
            return problem
        try:
            select_precision(self.precision, _gpu(profile)[1])
        except EngineError as e:
            return str(e)
        return None

    def load(self, model_path: Path, manifest: Manifest, profile: HardwareProfile) -> "TensorRTModel":
        try:
            return self._load(model_path, manifest)
        except EngineError:
            raise
        except Exception as e:  # TensorRT's bindings raise plain RuntimeError/TypeError
            raise EngineError(f"TensorRT failed on {model_path.name}: {e!r}") from e

    def _load(self, model_path: Path, manifest: Manifest) -> "TensorRTModel":
        cuda = CudaRuntime()
        gpu_name, capability = cuda.device_identity()
        precision = select_precision(self.precision, capability)
        try:
            data = model_path.read_bytes()
        except OSError as e:
            raise EngineError(f"cannot read {model_path}: {e}") from e
        if manifest.format is ModelFormat.TENSORRT_ENGINE:
            try:
                return TensorRTModel(cuda, data, model_path.name)
            except EngineError as e:
                raise EngineError(
                    f"{e} (a prebuilt engine runs only on the GPU model and TensorRT version that built it; "
                    "ship the ONNX model instead and let the device build its own)"
                ) from e
        import tensorrt as trt

        key = EngineCacheKey(
            hashlib.sha256(data).hexdigest(), trt.__version__, gpu_name, capability, precision, self.max_batch
        )
        blob = self.cache.load(key)
        if blob is not None:
            try:
                return TensorRTModel(cuda, blob, model_path.name)
            except EngineError:
                self.cache.evict(key)  # e.g. a driver update; build afresh below
        blob = build_engine(data, manifest, precision, self.max_batch, self.workspace_bytes)
        self.cache.store(key, blob)
        return TensorRTModel(cuda, blob, model_path.name)


# -- the GPU side: everything below needs TensorRT, cuda-python and a GPU ------------------------------
class CudaRuntime:
    """The few CUDA runtime calls the backend needs, each checked, through cuda-python."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python 12.6+
        except ImportError:
            try:
                from cuda import cudart  # older cuda-python
            except ImportError as e:
                raise EngineError("cuda-python is not installed (pip install cuda-python)") from e
        self.cudart: Any = cudart

    def call(self, name: str, *args: Any) -> Any:
        err, *values = getattr(self.cudart, name)(*args)
        if err != self.cudart.cudaError_t.cudaSuccess:
            _, text = self.cudart.cudaGetErrorString(err)
            raise EngineError(f"CUDA {name} failed: {text.decode() if isinstance(text, bytes) else text}")
        return values[0] if len(values) == 1 else tuple(values)

    def device_identity(self) -> tuple[str, str]:
        """(GPU name, compute capability) of the current device, as the cache key names them."""
        props = self.call("cudaGetDeviceProperties", self.call("cudaGetDevice"))
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"


@functools.cache
def _trt_logger() -> Any:
    """One logger for the process: TensorRT keeps the first one it is given as its global logger."""
    import tensorrt as trt

    class CollectingLogger(trt.ILogger):  # type: ignore[misc]  # tensorrt ships no type stubs
        """Keeps TensorRT's errors so the EngineError can quote them."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)

    return CollectingLogger()


def build_engine(
    onnx_bytes: bytes, manifest: Manifest, precision: Precision, max_batch: int, workspace_bytes: int
) -> bytes:
    """Parse the ONNX model and build a serialized engine for this GPU."""
    import tensorrt as trt

    logger = _trt_logger()
    logger.errors.clear()
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; 8.x must be asked for it.
    flags = (
        0
        if version_tuple(trt.__version__) >= (10,)
        else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    )
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT's ONNX parser refused {manifest.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    _set_precision(trt, network, config, precision, manifest.name)
    optimization = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if shape and shape[0] < 0:
            dynamic = True
            rest = shape[1:]
            optimization.set_shape(tensor.name, [1, *rest], [max_batch, *rest], [max_batch, *rest])
    if dynamic:
        config.add_optimization_profile(optimization)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(
            f"TensorRT could not build {manifest.name}: {'; '.join(logger.errors) or 'no detail'}"
        )
    return bytes(serialized)


def _set_precision(trt: Any, network: Any, config: Any, precision: Precision, model: str) -> None:
    """Ask for the precision: by builder flags up to TensorRT 10, by the graph itself from 11 on."""
    outputs = [
        network.get_layer(i).get_output(j)
        for i in range(network.num_layers)
        for j in range(network.get_layer(i).num_outputs)
    ]
    if precision == "int8" and not any(
        network.get_layer(i).type == trt.LayerType.QUANTIZE for i in range(network.num_layers)
    ):
        raise EngineError(
            f"int8 needs a model with QuantizeLinear/DequantizeLinear nodes and {model} has none; "
            "quantize it to QDQ ONNX first, or set the precision to fp16"
        )
    if version_tuple(trt.__version__) >= (11,):
        # TensorRT 11 removed the precision flags: every network is strongly typed, so fp16 must
        # already be in the graph (int8 is, through its Q/DQ nodes).
        if precision == "fp16" and not any(t.dtype == trt.DataType.HALF for t in outputs):
            raise EngineError(
                f"TensorRT {trt.__version__} takes fp16 from the model and {model} is fp32; convert it "
                "(python -m modelopt.onnx.autocast --onnx_path model.onnx) and ship that, or set fp32"
            )
        return
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # int8 engines keep fp16 for the layers left unquantized
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)


@dataclass
class _Binding:
    name: str
    is_input: bool
    dtype: np.dtype[Any]
    pointer: int
    nbytes: int


class TensorRTModel:
    """One engine, one execution context, device buffers sized for the largest batch."""

    calls_in_flight = 1  # one context: runs are serialised

    def __init__(self, cuda: CudaRuntime, blob: bytes, label: str) -> None:
        import tensorrt as trt

        self._trt = trt
        self._cuda = cuda
        self._lock = threading.Lock()
        self._bindings: list[_Binding] = []
        self._logger = _trt_logger()
        self._logger.errors.clear()
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(blob)
        if self._engine is None:
            raise EngineError(f"TensorRT could not load the engine {label}: {'; '.join(self._logger.errors)}")
        self._context = self._engine.create_execution_context()
        self._stream = cuda.call("cudaStreamCreate")
        try:
            self._allocate()
        except Exception:
            self.close()
            raise

    def _allocate(self) -> None:
        trt, engine, context = self._trt, self._engine, self._context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.max_batch = 1
        for name in inputs:  # size every buffer for the largest shape the engine accepts
            shape = tuple(engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                shape = tuple(engine.get_tensor_profile_shape(name, 0)[2])
            self._set_shape(name, shape)
            self.max_batch = max(self.max_batch, shape[0] if shape else 1)
        for name in names:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineError(
                    f"output {name!r} has a data-dependent shape, which this backend cannot run"
                )
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
            pointer = self._cuda.call("cudaMalloc", nbytes)
            self._bindings.append(_Binding(name, name in inputs, dtype, pointer, nbytes))
            context.set_tensor_address(name, pointer)

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self._context.set_input_shape(name, shape):
            raise EngineError(
                f"input {name!r} of shape {shape} is outside the shapes this engine was built for"
            )

    def run(self, inputs: Tensors) -> Tensors:
        batch = len(next(iter(inputs.values())))
        with self._lock:
            if batch <= self.max_batch:
                return self._run_chunk(inputs)
            # A batch over the engine's range runs in slices, so callers need not know the limit.
            chunks = [
                self._run_chunk({k: v[start : start + self.max_batch] for k, v in inputs.items()})
                for start in range(0, batch, self.max_batch)
            ]
        return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}

    def _run_chunk(self, inputs: Tensors) -> Tensors:
        cudart, context = self._cuda.cudart, self._context
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        keep_alive = []
        for b in self._bindings:
            if b.is_input:
                array = np.ascontiguousarray(inputs[b.name], dtype=b.dtype)
                keep_alive.append(array)
                self._set_shape(b.name, array.shape)
                self._cuda.call(
                    "cudaMemcpyAsync", b.pointer, array.ctypes.data, array.nbytes, to_device, self._stream
                )
        outputs = {
            b.name: np.empty(tuple(context.get_tensor_shape(b.name)), dtype=b.dtype)
            for b in self._bindings
            if not b.is_input
        }
        if not context.execute_async_v3(int(self._stream)):
            raise EngineError("TensorRT failed to enqueue the inference")
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for b in self._bindings:
            if not b.is_input:
                out = outputs[b.name]
                self._cuda.call(
                    "cudaMemcpyAsync", out.ctypes.data, b.pointer, out.nbytes, to_host, self._stream
                )
        self._cuda.call("cudaStreamSynchronize", self._stream)
        return outputs

    def close(self) -> None:
        """Free the device buffers and the stream; safe to call twice, and never raises."""
        with self._lock:
            for b in self._bindings:
                with contextlib.suppress(EngineError):  # a broken context cannot be cleaned any further
                    self._cuda.call("cudaFree", b.pointer)
            self._bindings.clear()
            if getattr(self, "_stream", None) is not None:
                with contextlib.suppress(EngineError):
                    self._cuda.call("cudaStreamDestroy", self._stream)
                self._stream = None
            # Context before engine before runtime: each holds on to the next.
            self._context = None
            self._engine = None
            self._runtime = None
