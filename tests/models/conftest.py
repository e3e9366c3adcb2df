from pathlib import Path

import pytest

from models.package import write_manifest

FIELDS = {
    "name": "tiny",
    "version": 1,
    "format": "onnx",
    "model_file": "model.onnx",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}],
    "latency_budget_ms": 10,
}


@pytest.fixture
def tiny_package(tmp_path: Path) -> Path:
    """A package whose bytes are arbitrary: enough to test packing, not inference."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"not really onnx" * 100)
    write_manifest(folder, FIELDS, ["model.onnx"])
    return folder
