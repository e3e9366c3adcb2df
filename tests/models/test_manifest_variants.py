"""Manifest fields for precision: calibration set, variants, precision policy, probation limits."""

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from models.errors import ManifestError, PackageError
from models.manifest import MAX_CALIBRATION_BYTES, MAX_VERSION, load_manifest, parse_manifest
from models.package import pack, unpack, verify_package, write_manifest

from .conftest import FIELDS

SHA = "0" * 64
FILES = {
    "model.onnx": {"size": 10, "sha256": SHA},
    "model.int8.onnx": {"size": 5, "sha256": SHA},
    "calibration.npz": {"size": 100, "sha256": SHA},
}
INT8 = {"file": "model.int8.onnx", "format": "onnx", "precision": "int8", "target": "cpu"}
FULL = {
    **FIELDS,
    "calibration": {"file": "calibration.npz", "samples": 64},
    "variants": [INT8],
    "precision": {"prefer": "int8", "min_agreement": 0.97, "max_abs_diff": 2.5},
    "probation": {"max_error_rate": 0.01, "max_latency_p95_ms": 20},
    "files": FILES,
}


def raw(**changes: Any) -> bytes:
    return json.dumps({**FULL, **changes}).encode()


def test_every_precision_field_parses() -> None:
    manifest = parse_manifest(raw())
    assert manifest.calibration is not None and manifest.calibration.samples == 64
    (variant,) = manifest.variants
    assert (variant.file, variant.precision, variant.target, variant.source_sha256) == (
        "model.int8.onnx",
        "int8",
        "cpu",
        None,
    )
    assert manifest.precision is not None
    assert (manifest.precision.prefer, manifest.precision.min_agreement) == ("int8", 0.97)
    assert manifest.precision.min_speedup == 1.05, "the default margin over timing noise"
    assert manifest.probation is not None and manifest.probation.max_latency_p95_ms == 20
    assert parse_manifest(manifest.to_json()) == manifest


def test_a_manifest_without_them_keeps_its_bytes_and_safe_defaults() -> None:
    old = json.dumps({**FIELDS, "files": {"model.onnx": {"size": 1, "sha256": SHA}}})
    manifest = parse_manifest(old)
    assert manifest.variants == [] and manifest.calibration is None and manifest.precision is None
    assert manifest.probation is None
    text = manifest.to_json()
    assert "variants" not in text and "precision" not in text, (
        "an older package's manifest reads back as it was"
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"version": MAX_VERSION + 1}, "version"),
        ({"variants": [{**INT8, "precision": "int4"}]}, "variants.0.precision"),
        ({"variants": [{**INT8, "format": "pickle"}]}, "variants.0.format"),
        ({"variants": [{**INT8, "target": "tpu"}]}, "variants.0.target"),
        ({"variants": [{**INT8, "source_sha256": "abc"}]}, "variants.0.source_sha256"),
        ({"variants": [{**INT8, "colour": 1}]}, "variants.0.colour"),
        ({"variants": [{**INT8, "file": "../up.onnx"}]}, "variants.0.file"),
        ({"variants": [{**INT8, "file": "model.onnx"}]}, "variants.0.file"),
        ({"variants": [INT8, INT8]}, "variants.1.file"),
        ({"calibration": {"file": "calibration.npz", "samples": 0}}, "calibration.samples"),
        ({"calibration": {"file": "calibration.npz", "samples": 100_000}}, "calibration.samples"),
        ({"precision": {"prefer": "bf16"}}, "precision.prefer"),
        ({"precision": {"min_agreement": 1.5}}, "precision.min_agreement"),
        ({"precision": {"max_abs_diff": -1}}, "precision.max_abs_diff"),
        ({"precision": {"min_speedup": 0.5}}, "precision.min_speedup"),
        ({"probation": {"max_error_rate": 2}}, "probation.max_error_rate"),
        ({"probation": {"max_latency_p95_ms": 0}}, "probation.max_latency_p95_ms"),
    ],
)
def test_refusals_name_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ManifestError, match=field.replace(".", r"\.")):
        parse_manifest(raw(**changes))


def test_the_largest_sqlite_integer_is_a_valid_version() -> None:
    assert parse_manifest(raw(version=MAX_VERSION)).version == MAX_VERSION
    with pytest.raises(ManifestError, match=r"field 'version': .*9223372036854775807"):
        parse_manifest(raw(version=2**64))


@pytest.mark.parametrize("name", ["model.int8.onnx", "calibration.npz"])
def test_files_the_manifest_names_must_be_listed(name: str) -> None:
    files = {k: v for k, v in FILES.items() if k != name}
    with pytest.raises(ManifestError, match=rf"'files' lacks '{name}'"):
        parse_manifest(raw(files=files))


def test_an_oversized_calibration_set_is_refused() -> None:
    files = {**FILES, "calibration.npz": {"size": MAX_CALIBRATION_BYTES + 1, "sha256": SHA}}
    with pytest.raises(ManifestError, match=r"field 'calibration': calibration\.npz is .* over the"):
        parse_manifest(raw(files=files))


def test_write_manifest_hashes_every_file_the_fields_name(tmp_path: Path) -> None:
    for name, data in (("model.onnx", b"m" * 10), ("model.int8.onnx", b"q" * 5), ("calibration.npz", b"c")):
        (tmp_path / name).write_bytes(data)
    fields = {k: v for k, v in FULL.items() if k != "files"}
    manifest = write_manifest(tmp_path, fields, [])
    assert sorted(manifest.files) == ["calibration.npz", "model.int8.onnx", "model.onnx"]
    assert manifest.files["model.int8.onnx"].size == 5
    assert load_manifest(tmp_path) == manifest


# -- the sample packages --------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_sample_packages_ship_a_verified_int8_variant(zoo: Path, version: str) -> None:
    manifest = verify_package(zoo / version)
    (variant,) = manifest.variants
    assert (variant.file, variant.precision, variant.format.value) == ("model.int8.onnx", "int8", "onnx")
    assert variant.source_sha256 == manifest.files["model.onnx"].sha256, "made from this very model file"
    assert manifest.calibration is not None and manifest.calibration.file in manifest.files
    assert manifest.precision is not None and manifest.precision.prefer == "int8"
    assert manifest.files[variant.file].size < manifest.files["model.onnx"].size / 3


@pytest.mark.parametrize("name", ["model.int8.onnx", "calibration.npz"])
def test_a_corrupted_variant_or_calibration_set_refuses_the_package(
    tmp_path: Path, zoo: Path, name: str
) -> None:
    folder = Path(shutil.copytree(zoo / "v1", tmp_path / "pkg"))
    archive = tmp_path / "v1.tar"
    pack(folder, archive)
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(PackageError, match=rf"{name}: sha256 .* does not match"):
        verify_package(folder)
    (folder / name).write_bytes(bytes(data[:-1]))
    with pytest.raises(PackageError, match=rf"{name}: .* bytes on disk"):
        verify_package(folder)
    # The same bytes inside an archive: refused while unpacking.
    tampered = tmp_path / "tampered.tar"
    blob = archive.read_bytes()
    original = (zoo / "v1" / name).read_bytes()
    start = blob.index(original[:4096])
    middle = start + len(original) // 2
    tampered.write_bytes(blob[:middle] + bytes([blob[middle] ^ 0xFF]) + blob[middle + 1 :])
    with pytest.raises(PackageError, match=name.replace(".", r"\.")):
        unpack(tampered, tmp_path / "out")
