"""Backends in order of preference; the first that can run a model here wins.

Each earlier backend that was passed over keeps its reason, so the status API can say why.
"""

from dataclasses import dataclass, field
from pathlib import Path

from device.engine.backends.base import Backend, LoadedModel
from device.engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from device.engine.probe import HardwareProfile
from device.errors import EngineError, NoBackendAvailable
from models.manifest import Manifest


def default_backends() -> list[Backend]:
    return [
        OnnxRuntimeBackend("TensorrtExecutionProvider"),
        OnnxRuntimeBackend("CUDAExecutionProvider"),
        OnnxRuntimeBackend("CPUExecutionProvider"),
    ]


@dataclass
class Selection:
    backend: str
    model: LoadedModel
    passed_over: dict[str, str] = field(default_factory=dict)


def select_and_load(
    model_path: Path,
    manifest: Manifest,
    profile: HardwareProfile,
    backends: list[Backend] | None = None,
    pinned: str | None = None,
) -> Selection:
    """Load the model on the first backend that can; a load failure falls through to the next."""
    passed_over: dict[str, str] = {}
    for backend in backends if backends is not None else default_backends():
        if pinned is not None and backend.name != pinned:
            passed_over[backend.name] = f"configuration pins {pinned}"
            continue
        reason = backend.unavailable_reason(profile, manifest)
        if reason is not None:
            passed_over[backend.name] = reason
            continue
        try:
            return Selection(backend.name, backend.load(model_path, manifest, profile), passed_over)
        except EngineError as e:
            passed_over[backend.name] = f"load failed: {e}"
    raise NoBackendAvailable(f"{manifest.name} v{manifest.version}", passed_over)
