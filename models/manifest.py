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
# The fleet keeps versions in SQLite INTEGER columns: signed 64-bit.
MAX_VERSION = 2**63 - 1
# A calibration set is read whole into memory on the device: keep it a sample, not a data set.
MAX_CALIBRATION_BYTES = 32 * 1024 * 1024
MAX_CALIBRATION_SAMPLES = 1024
# TVM records are schedules, not weights: ~85 KB for the sample CNN, a few hundred KB for a large
# model. The bounds keep a package from carrying a database the device would inflate and parse.
MAX_TVM_RECORDS = 16
MAX_TVM_RECORDS_BYTES = 8 * 1024 * 1024  # one entry's three files
MAX_TVM_RECORDS_TOTAL_BYTES = 32 * 1024 * 1024
MAX_TVM_TUNING_BYTES = 256 * 1024  # tuning.json is read whole
FileName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Precision = Literal["fp32", "fp16", "int8"]


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


class CalibrationSet(_Strict):
    """Representative inputs: what int8 ranges were calibrated on, and what a device compares on."""

    file: FileName = Field(description="an .npz in the package: one array `input.<name>` per model input")
    samples: int = Field(
        ge=1, le=MAX_CALIBRATION_SAMPLES, description="rows along the first axis of every input array"
    )


class Variant(_Strict):
    """Another file of the same model: a lower precision, or a build for one kind of target."""

    file: FileName = Field(description="the variant's model file, listed in `files` like every file")
    format: ModelFormat
    precision: Precision
    target: Literal["cpu", "cuda", "x86_64", "aarch64", "armv7l"] | None = Field(
        default=None,
        description="where it may run: a CPU backend, an NVIDIA one, or one CPU architecture; none: anywhere",
    )
    source_sha256: Sha256 | None = Field(
        default=None,
        description="sha256 of the model_file it was made from; a device skips it beside any other model",
    )


class TvmRecords(_Strict):
    """MetaSchedule records shipped in the package: one ONNX model file tuned for one CPU target.

    Three plain files beside the model (packages are flat), listed in `files` like every file, so
    the manifest's hashes (and TUF over the manifest) cover them. `python -m models.tvm_tuning
    package-records` adds them; a device whose target key matches compiles with them.
    """

    model: FileName = Field(description="the ONNX file they were tuned for: model_file or an ONNX variant")
    target: str = Field(
        pattern=r"^[a-z][a-z0-9_]{0,15}-[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="the CPU they were tuned for, as models.tvm_tuning.target_key: <arch>-<mcpu>",
    )
    tuning: FileName = Field(description="tuning.json: model sha256, target, TVM version, batch sizes")
    workloads: FileName = Field(description="MetaSchedule's database_workload.json, gzipped")
    records: FileName = Field(description="MetaSchedule's database_tuning_record.json, gzipped")

    @property
    def file_names(self) -> tuple[str, str, str]:
        return (self.tuning, self.workloads, self.records)


class PrecisionPolicy(_Strict):
    """Which precision a device may serve, and what a lower one must prove against fp32 first."""

    prefer: Precision = Field(
        default="fp32", description="the lowest precision to try; fp32 serves the model_file only"
    )
    min_agreement: float = Field(
        default=0.98, ge=0, le=1, description="least top-1 agreement with fp32 on golden + calibration inputs"
    )
    max_abs_diff: float | None = Field(
        default=None, ge=0, description="largest allowed output difference from fp32; none: not checked"
    )
    min_speedup: float = Field(
        default=1.05,
        ge=1,
        description="fp32 latency / lower-precision latency it must reach on the device (1.05: beyond noise)",
    )


class ProbationLimits(_Strict):
    """What a device tolerates from this model while it is on probation after an update."""

    max_error_rate: float | None = Field(default=None, ge=0, le=1, description="failed items / items")
    max_latency_p95_ms: float | None = Field(default=None, gt=0, description="p95 of live calls")


class FileEntry(_Strict):
    size: int = Field(ge=0)
    sha256: Sha256


class Manifest(_Strict):
    schema_id: Literal["edgefleet.model/1"] = Field(default="edgefleet.model/1", alias="schema")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    version: int = Field(
        ge=1,
        le=MAX_VERSION,
        description="monotonic; a device never installs a lower one; at most 2**63-1 (SQLite INTEGER)",
    )
    format: ModelFormat
    model_file: FileName
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    preprocessing: Preprocessing | None = None
    labels: list[str] = []
    golden: GoldenVectors | None = None
    latency_budget_ms: float = Field(gt=0, description="p95 a device must meet on its golden inputs")
    calibration: CalibrationSet | None = None
    variants: list[Variant] = Field(default_factory=list, max_length=16)
    precision: PrecisionPolicy | None = Field(default=None, description="none: serve fp32 only")
    probation: ProbationLimits | None = None
    tvm_records: list[TvmRecords] = Field(
        default_factory=list,
        max_length=MAX_TVM_RECORDS,
        description="tuned TVM schedules per model file and CPU target; none: TVM uses records roots only",
    )
    description: str = ""
    files: dict[FileName, FileEntry] = Field(description="every file of the package but the manifest")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def to_json(self) -> str:
        # Fields added after the first packages are left out while empty, so an older package's
        # manifest reads back byte for byte (its sha256 names it in deltas and TUF targets).
        exclude = {name for name in ("variants", "tvm_records") if not getattr(self, name)}
        return self.model_dump_json(by_alias=True, indent=2, exclude_none=True, exclude=exclude) + "\n"


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
    for name in referenced_files(manifest):
        if name not in manifest.files:
            raise ManifestError(f"manifest field 'files' lacks {name!r}, which the manifest refers to")
    _check_variants(manifest)
    _check_calibration(manifest)
    _check_tvm_records(manifest)
    return manifest


def referenced_files(manifest: Manifest) -> list[str]:
    """Every file the manifest's fields name (each must also be listed in `files`)."""
    names = [manifest.model_file]
    if manifest.golden is not None:
        names.append(manifest.golden.file)
    if manifest.calibration is not None:
        names.append(manifest.calibration.file)
    names.extend(v.file for v in manifest.variants)
    for entry in manifest.tvm_records:
        names.extend(entry.file_names)
    return list(dict.fromkeys(names))


def _check_variants(manifest: Manifest) -> None:
    seen: set[str] = set()
    for i, variant in enumerate(manifest.variants):
        if variant.file == manifest.model_file:
            raise ManifestError(
                f"manifest field 'variants.{i}.file': {variant.file!r} is the model_file itself; "
                "a variant must be another file"
            )
        if variant.file in seen:
            raise ManifestError(f"manifest field 'variants.{i}.file': {variant.file!r} is listed twice")
        seen.add(variant.file)


def _check_calibration(manifest: Manifest) -> None:
    if manifest.calibration is None:
        return
    size = manifest.files[manifest.calibration.file].size
    if size > MAX_CALIBRATION_BYTES:
        raise ManifestError(
            f"manifest field 'calibration': {manifest.calibration.file} is {size} bytes, over the "
            f"{MAX_CALIBRATION_BYTES} limit; ship fewer samples (a few dozen is enough)"
        )


def _check_tvm_records(manifest: Manifest) -> None:
    onnx_files = {v.file for v in manifest.variants if v.format is ModelFormat.ONNX}
    if manifest.format is ModelFormat.ONNX:
        onnx_files.add(manifest.model_file)
    # Every file of every entry is its own: a records file shared with another field or entry
    # would let one edit change what two things mean.
    owners: dict[str, str] = {manifest.model_file: "model_file"}
    if manifest.golden is not None:
        owners.setdefault(manifest.golden.file, "golden")
    if manifest.calibration is not None:
        owners.setdefault(manifest.calibration.file, "calibration")
    for i, variant in enumerate(manifest.variants):
        owners.setdefault(variant.file, f"variants.{i}")
    pairs: set[tuple[str, str]] = set()
    total = 0
    for i, entry in enumerate(manifest.tvm_records):
        field = f"manifest field 'tvm_records.{i}'"
        if entry.model not in onnx_files:
            raise ManifestError(
                f"{field}: model {entry.model!r} is not an ONNX model of this package (the model_file "
                "or an ONNX variant); TVM records are tuned for one of those"
            )
        if (entry.model, entry.target) in pairs:
            raise ManifestError(f"{field}: records for {entry.model} on {entry.target} are listed twice")
        pairs.add((entry.model, entry.target))
        for name in entry.file_names:
            if name in owners:
                raise ManifestError(
                    f"{field}: {name!r} is already used by {owners[name]}; give it its own file"
                )
            owners[name] = f"tvm_records.{i}"
        size = sum(manifest.files[name].size for name in entry.file_names)
        if size > MAX_TVM_RECORDS_BYTES:
            raise ManifestError(
                f"{field}: its files are {size} bytes, over the {MAX_TVM_RECORDS_BYTES} limit; ship the "
                "pruned database (best record per kernel) that models.tvm_tuning tune writes"
            )
        if manifest.files[entry.tuning].size > MAX_TVM_TUNING_BYTES:
            raise ManifestError(f"{field}: {entry.tuning} is over the {MAX_TVM_TUNING_BYTES} byte limit")
        total += size
    if total > MAX_TVM_RECORDS_TOTAL_BYTES:
        raise ManifestError(
            f"manifest field 'tvm_records': {total} bytes in all, over the {MAX_TVM_RECORDS_TOTAL_BYTES} "
            "limit; ship records only for the targets the fleet has"
        )


def load_manifest(folder: Path) -> Manifest:
    path = folder / "manifest.json"
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise ManifestError(f"{path} not found: a model package needs a manifest.json") from e
    return parse_manifest(raw)
