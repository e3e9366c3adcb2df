"""Tiny real ONNX models for the engine's and the API's tests, written with the onnx package."""

from pathlib import Path

import numpy as np
import pytest

from device.engine.engine import Engine, ServingModel
from device.standalone import manifest_for_bare_onnx


def _save(
    path: Path, nodes: list[object], inputs: list[object], outputs: list[object], inits: list[object]
) -> Path:
    onnx = pytest.importorskip("onnx", reason="the onnx package writes the test models (pip install onnx)")
    helper = onnx.helper
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def doubler(folder: Path, shape: tuple[int | str, ...] = ("n", 4), name: str = "doubler") -> Path:
    """y = 2 * x, float32, with the given input shape (strings are dynamic dims)."""
    onnx = pytest.importorskip("onnx")
    helper, f32 = onnx.helper, onnx.TensorProto.FLOAT
    two = onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two")
    return _save(
        folder / f"{name}.onnx",
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        [helper.make_tensor_value_info("x", f32, list(shape))],
        [helper.make_tensor_value_info("y", f32, list(shape))],
        [two],
    )


def rows_of_three(folder: Path) -> Path:
    """Reshapes x [n, 4] to [3, -1]: runs for n a multiple of 3, and fails inside ORT otherwise."""
    onnx = pytest.importorskip("onnx")
    helper, f32 = onnx.helper, onnx.TensorProto.FLOAT
    target = onnx.numpy_helper.from_array(np.array([3, -1], np.int64), "target")
    return _save(
        folder / "rows-of-three.onnx",
        [helper.make_node("Reshape", ["x", "target"], ["y"])],
        [helper.make_tensor_value_info("x", f32, ["n", 4])],
        [helper.make_tensor_value_info("y", f32, ["m", "k"])],
        [target],
    )


def serve_bare(engine: Engine, path: Path) -> ServingModel:
    """Load a bare .onnx the way `edgefleet device serve` does, and serve it."""
    serving = engine.prepare(path.parent, manifest_for_bare_onnx(path))
    engine.serve(serving)
    return serving


def doubler_rows(n: int, start: float) -> np.ndarray:
    """`n` rows of `doubler`'s input (4 float32 each), counting up from `start`."""
    return (start + np.arange(n * 4, dtype=np.float32)).reshape(n, 4)
