"""`edgefleet device serve`: one model through the engine and the local API, with no fleet.

For a field engineer testing a model on the bench, and for benchmarks. Takes a model package
folder, or a bare .onnx file whose inputs and outputs are read from the file itself.
"""

import re
import secrets
from pathlib import Path

import onnxruntime as ort

from device.engine.engine import Engine, ServingModel
from device.engine.probe import probe
from device.errors import ConfigError
from models.fsutil import write_private
from models.manifest import Manifest
from models.package import hash_file, verify_package

ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}
# A bare file has no budget of its own; the golden test does not run without golden vectors anyway.
BARE_MODEL_BUDGET_MS = 60_000.0


def manifest_for_bare_onnx(path: Path) -> Manifest:
    """A manifest built from what the ONNX file declares: names, dtypes and shapes (-1 if dynamic)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def specs(args: list[ort.NodeArg]) -> list[dict[str, object]]:
        result = []
        for arg in args:
            if arg.type not in ORT_DTYPES:
                raise ConfigError(
                    f"{path.name}: tensor {arg.name!r} has type {arg.type}, which is not supported"
                )
            shape = [d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape]
            result.append({"name": arg.name, "dtype": ORT_DTYPES[arg.type], "shape": shape})
        return result

    name = re.sub(r"[^a-z0-9._-]", "-", path.stem.lower()).lstrip("._-") or "model"
    return Manifest.model_validate(
        {
            "name": name[:63],
            "version": 1,
            "format": "onnx",
            "model_file": path.name,
            "inputs": specs(session.get_inputs()),
            "outputs": specs(session.get_outputs()),
            "latency_budget_ms": BARE_MODEL_BUDGET_MS,
            "description": f"bare model file {path.name}",
            "files": {path.name: hash_file(path).model_dump()},
        }
    )


def load_for_serving(
    model: Path, backend: str | None, precision: str = "auto"
) -> tuple[Engine, ServingModel]:
    if model.is_dir():
        folder, manifest = model, verify_package(model)
    elif model.suffix == ".onnx":
        folder, manifest = model.parent, manifest_for_bare_onnx(model)
    else:
        raise ConfigError(
            f"{model}: give a package folder or an .onnx file (.tflite needs the LiteRT backend)"
        )
    engine = Engine(probe(), pinned=backend, precision=precision)
    serving = engine.prepare(folder, manifest)
    engine.serve(serving)
    return engine, serving


def api_token(token_file: Path | None) -> str:
    """The token from `token_file`, made there (0600) on first use; a one-off token without a file."""
    if token_file is None:
        return secrets.token_urlsafe(24)
    if not token_file.exists():
        write_private(token_file, secrets.token_urlsafe(24).encode())
    return token_file.read_text().strip()
