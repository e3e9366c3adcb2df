"""Backends in order of preference for the machine; the first that can run a model here wins.

Each backend that was passed over keeps its reason, so the status API can say why. Backend modules
are imported only when the registry builds them, so a runtime that is missing or broken on this
machine costs one pass-over reason, never the registry.

A backend may also know that it could run a model but should not be preferred for it here: TVM
whose records were measured slower than ONNX Runtime on this CPU. It says so through an optional
`preference_reason(model_path, manifest, profile)`, which the registry asks in its own order (pin
or not: a measurement is not a setting); an explicit backend list from the caller (tests,
benchmarks) is taken as the caller's choice and not asked.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from device.engine.backends.base import Backend, LoadedModel
from device.engine.probe import HardwareProfile
from device.errors import EngineError, NoBackendAvailable
from models.manifest import Manifest

NVIDIA_BACKENDS = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda")
CPU_BACKENDS = ("tvm", "litert", "onnxruntime-cpu")
ALL_BACKENDS = (*NVIDIA_BACKENDS, *CPU_BACKENDS)

# name -> (module, class, constructor arguments)
FACTORIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "tensorrt": ("device.engine.backends.tensorrt_backend", "TensorRTBackend", ()),
    "onnxruntime-tensorrt": (
        "device.engine.backends.onnxruntime_backend",
        "OnnxRuntimeBackend",
        ("TensorrtExecutionProvider",),
    ),
    "onnxruntime-cuda": (
        "device.engine.backends.onnxruntime_backend",
        "OnnxRuntimeBackend",
        ("CUDAExecutionProvider",),
    ),
    "tvm": ("device.engine.backends.tvm_backend", "TvmBackend", ()),
    "litert": ("device.engine.backends.litert_backend", "LiteRTBackend", ()),
    "onnxruntime-cpu": (
        "device.engine.backends.onnxruntime_backend",
        "OnnxRuntimeBackend",
        ("CPUExecutionProvider",),
    ),
}
ORT_PROVIDERS = {
    "onnxruntime-tensorrt": "TensorrtExecutionProvider",
    "onnxruntime-cuda": "CUDAExecutionProvider",
}


def backend_order(profile: HardwareProfile) -> list[str]:
    """The backends worth trying on this machine, best first.

    - NVIDIA GPU (a Jetson or a discrete card): TensorRT's own builder first (fastest, and the
      engine is cached), then ONNX Runtime's TensorRT and CUDA providers (which take graphs the
      TensorRT parser refuses), then the CPU ladder below as the fallback.
    - Any other machine, ARM or x86: TVM first, because it only takes a model that ships schedules
      tuned for this exact CPU (its own check) and then beats generic kernels; LiteRT next, the only
      backend for .tflite models (XNNPACK has ARM and x86 kernels); ONNX Runtime CPU last
      everywhere, since it runs any ONNX model anywhere. LiteRT and ONNX Runtime take disjoint
      formats, so their relative order never takes a model from one to the other.
    NVIDIA backends are left out without a GPU: ONNX Runtime's CUDA provider would fall back to
    the CPU on its own and report the wrong backend. Pinning one in the configuration tries it anyway.
    """
    return [*NVIDIA_BACKENDS, *CPU_BACKENDS] if profile.nvidia_gpu else list(CPU_BACKENDS)


def left_out(profile: HardwareProfile) -> dict[str, str]:
    """Why each backend that `backend_order` leaves out is not tried on this machine."""
    order = backend_order(profile)
    reasons = {}
    for name in ALL_BACKENDS:
        if name in order:
            continue
        reason = "not tried: the probe found no NVIDIA GPU"
        provider = ORT_PROVIDERS.get(name)
        if provider is not None and provider not in profile.onnxruntime_providers:
            reason += f", and {provider} is not in this onnxruntime build"
        reasons[name] = reason
    return reasons


@dataclass
class UnavailableBackend:
    """Stands in for a backend whose module failed to import, so the reason reaches the status API."""

    name: str
    reason: str

    def unavailable_reason(self, profile: HardwareProfile, manifest: Manifest) -> str | None:
        return self.reason

    def load(self, model_path: Path, manifest: Manifest, profile: HardwareProfile) -> LoadedModel:
        raise EngineError(f"{self.name} cannot load models here: {self.reason}")


def preference_reason(
    backend: Backend, model_path: Path, manifest: Manifest, profile: HardwareProfile
) -> str | None:
    """The backend's reason to step aside for the next one, if it has that check (TVM has)."""
    check = getattr(backend, "preference_reason", None)
    return check(model_path, manifest, profile) if callable(check) else None


def build_backend(name: str, factories: dict[str, tuple[str, str, tuple[str, ...]]] | None = None) -> Backend:
    """Import and construct one backend by name; an import failure becomes an `UnavailableBackend`."""
    table = FACTORIES if factories is None else factories
    if name not in table:
        raise EngineError(f"no backend is named {name!r}; known backends: {', '.join(table)}")
    module_name, class_name, args = table[name]
    try:
        factory: Callable[..., Backend] = getattr(importlib.import_module(module_name), class_name)
    except Exception as e:  # a broken runtime raises anything from its import, not only ImportError
        return UnavailableBackend(name, f"backend module {module_name} failed to import: {e!r}")
    return factory(*args)


def default_backends(profile: HardwareProfile) -> list[Backend]:
    """The backends of `backend_order(profile)`, built in that order."""
    return [build_backend(name) for name in backend_order(profile)]


@dataclass
class Selection:
    backend: str
    model: LoadedModel
    passed_over: dict[str, str] = field(default_factory=dict)
    loader: Backend | None = None  # the backend object, to load the package's other variants on it


def select_and_load(
    model_path: Path,
    manifest: Manifest,
    profile: HardwareProfile,
    backends: list[Backend] | None = None,
    pinned: str | None = None,
) -> Selection:
    """Load the model on the first backend that can; a load failure falls through to the next.

    With `backends` None the order is `backend_order(profile)`, and the backends it leaves out are
    listed first among the passed over. A pin to a left-out backend still tries it (the operator
    may know of a GPU the probe cannot see, e.g. in a container).
    """
    label = f"{manifest.name} v{manifest.version}"
    passed_over: dict[str, str] = {}
    candidates: list[str] | list[Backend]
    if backends is None:
        if pinned is not None and pinned not in FACTORIES:
            known = ", ".join(FACTORIES)
            raise NoBackendAvailable(
                label, {pinned: f"the configuration pins no known backend; use one of {known}"}
            )
        passed_over = {name: why for name, why in left_out(profile).items() if name != pinned}
        candidates = backend_order(profile)
        if pinned is not None and pinned not in candidates:
            candidates.insert(0, pinned)
    else:
        candidates = backends
    for candidate in candidates:
        name = candidate if isinstance(candidate, str) else candidate.name
        if pinned is not None and name != pinned:
            passed_over[name] = f"configuration pins {pinned}"
            continue
        backend = build_backend(candidate) if isinstance(candidate, str) else candidate
        reason = backend.unavailable_reason(profile, manifest)
        if reason is None and backends is None:
            reason = preference_reason(backend, model_path, manifest, profile)
        if reason is not None:
            passed_over[name] = reason
            continue
        try:
            return Selection(name, backend.load(model_path, manifest, profile), passed_over, backend)
        except EngineError as e:
            passed_over[name] = f"load failed: {e}"
    raise NoBackendAvailable(label, passed_over)
