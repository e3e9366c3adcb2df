"""LiteRT (the TensorFlow Lite runtime): runs `.tflite` packages on the CPU, XNNPACK-accelerated.

It uses `ai_edge_litert` (the current wheel) or, on devices whose image ships the older
`tflite_runtime` instead, that one; both have the same Interpreter API.
"""

import importlib
import threading
from pathlib import Path
from typing import Any

from device.engine.backends.base import Tensors
from device.engine.probe import HardwareProfile
from device.errors import EngineError
from models.manifest import Manifest, ModelFormat

# Module that provides the Interpreter, and the keys a probe may record it under.
_RUNTIMES = (
    ("ai_edge_litert.interpreter", ("litert", "ai_edge_litert", "ai-edge-litert")),
    ("tflite_runtime.interpreter", ("tflite_runtime", "tflite-runtime")),
)


def _interpreter_class() -> Any:
    for module, _ in _RUNTIMES:
        try:
            return importlib.import_module(module).Interpreter
        except ImportError:
            continue
    raise EngineError("no LiteRT runtime: pip install ai-edge-litert (or tflite-runtime) on this device")


class LiteRTModel:
    """One interpreter. TFLite interpreters are not thread-safe, so runs are serialised by a lock."""

    calls_in_flight = 1

    def __init__(self, model_path: Path, manifest: Manifest, threads: int) -> None:
        try:
            self._interpreter = _interpreter_class()(model_path=str(model_path), num_threads=threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:  # the interpreter's errors for unreadable flatbuffers
            raise EngineError(
                f"LiteRT could not load {model_path.name}: {e}. The file is damaged or not a "
                ".tflite model: reinstall the package, or check that its manifest's format is right"
            ) from e
        self._lock = threading.Lock()
        self._input_names = [spec.name for spec in manifest.inputs]
        self._output_names = [spec.name for spec in manifest.outputs]
        # Tensor index per manifest name, from the model's signature when it has one (the names
        # litert-torch and the TF converter give), else from the graph's own tensor names.
        self._inputs, self._outputs = self._bind(model_path.name)
        # Input shapes the interpreter is planned for; empty, so the first run plans for its batch.
        self._shapes: dict[str, tuple[int, ...]] = {}

    def _bind(self, file_name: str) -> tuple[dict[str, int], dict[str, int]]:
        signatures: dict[str, dict[str, list[str]]] = self._interpreter.get_signature_list()
        wanted_in, wanted_out = set(self._input_names), set(self._output_names)
        for key, io in signatures.items():
            if set(io["inputs"]) == wanted_in and wanted_out <= set(io["outputs"]):
                runner = self._interpreter.get_signature_runner(key)
                ins = {name: d["index"] for name, d in runner.get_input_details().items()}
                outs = {name: d["index"] for name, d in runner.get_output_details().items()}
                if self._is_primary(ins, outs):
                    return ins, {n: outs[n] for n in self._output_names}
        ins = {d["name"]: d["index"] for d in self._interpreter.get_input_details()}
        outs = {d["name"]: d["index"] for d in self._interpreter.get_output_details()}
        if wanted_in <= set(ins) and wanted_out <= set(outs):
            return {n: ins[n] for n in self._input_names}, {n: outs[n] for n in self._output_names}
        raise EngineError(
            f"{file_name} has inputs {sorted(ins)} / outputs {sorted(outs)} and signatures "
            f"{signatures}; the manifest names inputs {self._input_names} and outputs "
            f"{self._output_names}. Fix the manifest's tensor names to match the model"
        )

    def _is_primary(self, ins: dict[str, int], outs: dict[str, int]) -> bool:
        """Whether a signature's tensors are those of the main graph, which `set_tensor` addresses."""
        main_in = {d["index"] for d in self._interpreter.get_input_details()}
        main_out = {d["index"] for d in self._interpreter.get_output_details()}
        return set(ins.values()) == main_in and set(outs.values()) <= main_out

    def run(self, inputs: Tensors) -> Tensors:
        with self._lock:
            if any(self._shapes.get(name) != inputs[name].shape for name in self._inputs):
                # A new batch size: plan the graph for it once; runs of the same size reuse the plan.
                self._shapes.clear()  # stays empty if planning fails, so the next run plans again
                for name, index in self._inputs.items():
                    self._interpreter.resize_tensor_input(index, list(inputs[name].shape))
                self._interpreter.allocate_tensors()
                self._shapes = {name: inputs[name].shape for name in self._inputs}
            for name, index in self._inputs.items():
                self._interpreter.set_tensor(index, inputs[name])
            self._interpreter.invoke()
            # get_tensor copies, so a result survives the next run reusing the buffers.
            return {name: self._interpreter.get_tensor(index) for name, index in self._outputs.items()}

    def close(self) -> None:
        with self._lock:
            del self._interpreter


class LiteRTBackend:
    name = "litert"

    def unavailable_reason(self, profile: HardwareProfile, manifest: Manifest) -> str | None:
        if manifest.format is not ModelFormat.TFLITE:
            return f"runs .tflite models only, this one is {manifest.format.value}"
        if not any(profile.runtimes.get(key) for _, keys in _RUNTIMES for key in keys):
            return "no LiteRT runtime is installed (pip install ai-edge-litert, or tflite-runtime)"
        return None

    def load(self, model_path: Path, manifest: Manifest, profile: HardwareProfile) -> LiteRTModel:
        return LiteRTModel(model_path, manifest, threads=max(1, profile.cpu_count))
