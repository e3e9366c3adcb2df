"""ONNX Runtime, with one backend entry per execution provider (CUDA before CPU)."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from device.engine.backends.base import Tensors
from device.engine.probe import HardwareProfile
from device.errors import EngineError
from models.manifest import Manifest, ModelFormat, Variant


def _direct_run(session: Any, provider: str) -> Callable[[list[str], Tensors, None], list[Any]] | None:
    """The compiled session's own `run`, for the CPU provider, where onnxruntime has one.

    `InferenceSession.run` checks in Python, on every call, that the feed names every input, that no
    OrtValue belongs to another device, and that no graph capture is on; the engine has already
    checked names, dtypes and shapes (`InputCheck`), feeds numpy arrays and captures no graphs, so
    on the CPU those checks only cost: 5-6 µs of a 0.34 ms call (bench/engine/RESULTS.md). With other
    providers the wrapper also falls back to the CPU when the provider fails a run: that is kept.
    """
    run = getattr(getattr(session, "_sess", None), "run", None)
    if provider != "CPUExecutionProvider" or not callable(run):
        return None
    direct: Callable[[list[str], Tensors, None], list[Any]] = run
    return direct


class OnnxRuntimeModel:
    def __init__(self, model_path: Path, provider: str, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # Intra-op threads that spin between runs burn a core the device's other work (the agent,
        # a second model, the OS) needs, and on a loaded box they made timings swing 0.7x-2.2x
        # (bench/engine/RESULTS_precision.md); idle threads sleep instead.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(model_path), options, providers=[provider])
        except Exception as e:  # ORT raises its own untyped errors for corrupt or unsupported files
            raise EngineError(f"onnxruntime could not load {model_path.name}: {e}") from e
        self._output_names = [o.name for o in self._session.get_outputs()]
        # One item per call leaves ONNX Runtime's threads waiting on each other for a small model;
        # two such calls at once on the CPU made 18-19% more items/s under 16 clients, with no
        # grouping (bench/engine/RESULTS.md). Grouped calls gain nothing from it, so only the
        # ungrouped default uses it (Engine._config_for).
        self.calls_in_flight = 2 if provider == "CPUExecutionProvider" and threads >= 2 else 1
        self._run = _direct_run(self._session, provider) or self._session.run

    def run(self, inputs: Tensors) -> Tensors:
        outputs = self._run(self._output_names, inputs, None)
        return dict(zip(self._output_names, outputs, strict=True))

    def close(self) -> None:
        del self._session


class OnnxRuntimeBackend:
    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.name = "onnxruntime-" + provider.removesuffix("ExecutionProvider").lower()

    def unavailable_reason(self, profile: HardwareProfile, manifest: Manifest) -> str | None:
        if manifest.format is not ModelFormat.ONNX:
            return f"runs ONNX models only, this one is {manifest.format.value}"
        if not profile.runtimes.get("onnxruntime"):
            return "onnxruntime is not installed"
        if self.provider not in profile.onnxruntime_providers:
            return f"{self.provider} is not in this onnxruntime build"
        return None

    def load(self, model_path: Path, manifest: Manifest, profile: HardwareProfile) -> OnnxRuntimeModel:
        return OnnxRuntimeModel(model_path, self.provider, threads=max(1, profile.cpu_count))

    def variant_problem(self, variant: Variant, profile: HardwareProfile) -> str | None:
        """None when this provider can run `variant` (an ONNX file of any precision: fp16, QDQ int8)."""
        if variant.format is not ModelFormat.ONNX:
            return f"runs ONNX models only, this variant is {variant.format.value}"
        return None
