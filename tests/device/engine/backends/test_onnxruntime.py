"""The onnxruntime backend: the compiled session's run on the CPU, the checked wrapper elsewhere."""

from pathlib import Path

import numpy as np
import onnxruntime as ort

from device.engine.backends.onnxruntime_backend import OnnxRuntimeModel, _direct_run


def test_the_cpu_model_calls_the_compiled_session_and_answers_as_the_wrapper_does(zoo: Path) -> None:
    model = OnnxRuntimeModel(zoo / "v1" / "model.onnx", "CPUExecutionProvider", threads=1)
    session = model._session
    assert model._run == session._sess.run  # the wrapper's per-call checks are skipped
    image = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    expected = session.run(None, {"image": image})[0]
    np.testing.assert_array_equal(model.run({"image": image})["logits"], expected)


def test_other_providers_keep_the_wrapper_and_its_fallback(zoo: Path) -> None:
    session = ort.InferenceSession(str(zoo / "v1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert _direct_run(session, "CUDAExecutionProvider") is None
    assert _direct_run(session, "TensorrtExecutionProvider") is None
    assert _direct_run(session, "CPUExecutionProvider") is not None


def test_a_session_without_the_compiled_object_falls_back_to_its_run() -> None:
    class Wrapper:  # what a future onnxruntime with another layout would look like to the engine
        def run(self, *args: object) -> list[object]:
            return []

    assert _direct_run(Wrapper(), "CPUExecutionProvider") is None


def test_two_calls_in_flight_only_on_the_cpu_with_two_threads_or_more(zoo: Path) -> None:
    path = zoo / "v1" / "model.onnx"
    assert OnnxRuntimeModel(path, "CPUExecutionProvider", threads=2).calls_in_flight == 2
    assert OnnxRuntimeModel(path, "CPUExecutionProvider", threads=1).calls_in_flight == 1
