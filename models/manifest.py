"""The model manifest: what a package holds and how to feed, test and time it.

Written as `manifest.json` at the top of every package. Unknown fields are refused so that a
typo never silently turns a setting off.
"""

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.errors import ManifestError

SCHEMA_ID = "edgefleet.model/1"
MAX_MANIFEST_BYTES = 1024 * 1024
FileName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelFormat(StrEnum):
    ONNX = "onnx"
    TFLITE = "tflite"
    TENSORRT_ENGINE = "tensorrt-engine"
    TVM_LIB = "tvm-lib"


class TensorSpec(_Strict):
    name: str = Field(min_length=1, max_length=256, description="tensor name in the model graph")
    dtype: Literal["float32", "float16", "int8", "uint8", "int32", "int64"]
    shape: list[int] = Field(description="dimensions; -1 for a dynamic one (the batch, usually)")


class Preprocessing(_Strict):
    """How an image becomes the model's input tensor."""

    resize: tuple[int, int] = Field(description="(height, width) in pixels")
    color: Literal["RGB", "BGR", "L"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    scale: float = Field(default=1 / 255, description="multiplied into the uint8 pixels first")
    mean: list[float] = Field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = Field(default_factory=lambda: [1.0, 1.0, 1.0])


class GoldenVectors(_Strict):
    """Inputs with the outputs the model must give for them, checked before a model is used."""

    file: FileName = Field(description="an .npz in the package: arrays `input.<name>` and `output.<name>`")
    atol: float = Field(default=1e-3, ge=0)
    rtol: float = Field(default=1e-3, ge=0)


class FileEntry(_Strict):
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(_Strict):
    schema_id: Literal["edgefleet.model/1"] = Field(default="edgefleet.model/1", alias="schema")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    version: int = Field(ge=1, description="monotonic; a device never installs a lower one")
    format: ModelFormat
    model_file: FileName
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    preprocessing: Preprocessing | None = None
    labels: list[str] = []
    golden: GoldenVectors | None = None
    latency_budget_ms: float = Field(gt=0, description="p95 a device must meet on its golden inputs")
    description: str = ""
    files: dict[FileName, FileEntry] = Field(description="every file of the package but the manifest")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2, exclude_none=True) + "\n"


SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")


def json_schema() -> str:
    """The manifest's JSON Schema, generated from the model above (committed as manifest.schema.json)."""
    schema = Manifest.model_json_schema(by_alias=True)
    schema["$id"] = "https://edgefleet.invalid/schemas/edgefleet.model-1.json"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def parse_manifest(raw: bytes | str) -> Manifest:
    """Validate manifest bytes; the error names the first fields that are wrong."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ManifestError(f"manifest is not valid JSON: {e!r}") from e
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc']) or '<root>'}': {err['msg']}"
            for err in e.errors()[:5]
        )
        raise ManifestError(f"manifest is invalid: {problems}") from e
    for name in (manifest.model_file, *([manifest.golden.file] if manifest.golden else [])):
        if name not in manifest.files:
            raise ManifestError(f"manifest field 'files' lacks {name!r}, which the manifest refers to")
    return manifest


def load_manifest(folder: Path) -> Manifest:
    path = folder / "manifest.json"
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise ManifestError(f"{path} not found: a model package needs a manifest.json") from e
    return parse_manifest(raw)
