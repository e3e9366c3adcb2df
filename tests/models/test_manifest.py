import json
from pathlib import Path

import pytest

from models.errors import ManifestError
from models.manifest import parse_manifest

from .conftest import FIELDS

SHA = "0" * 64


def manifest(**changes: object) -> bytes:
    return json.dumps({**FIELDS, "files": {"model.onnx": {"size": 1, "sha256": SHA}}, **changes}).encode()


def test_valid_manifest_parses() -> None:
    parsed = parse_manifest(manifest())
    assert parsed.name == "tiny" and parsed.inputs[0].shape == [-1, 4]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"version": 0}, "version"),
        ({"format": "pickle"}, "format"),
        ({"name": "Bad Name"}, "name"),
        ({"colour": "red"}, "colour"),
        ({"inputs": []}, "inputs"),
        ({"latency_budget_ms": -1}, "latency_budget_ms"),
        ({"files": {"../escape": {"size": 1, "sha256": SHA}}}, "files"),
    ],
)
def test_errors_name_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ManifestError, match=field):
        parse_manifest(manifest(**changes))


def test_model_file_must_be_listed() -> None:
    with pytest.raises(ManifestError, match=r"lacks 'model\.onnx'"):
        parse_manifest(manifest(files={}))


def test_not_json() -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_manifest(b"{")


def test_committed_json_schema_matches_the_model() -> None:
    from models.manifest import SCHEMA_FILE, json_schema

    assert SCHEMA_FILE.read_text() == json_schema(), "regenerate with `edgefleet models schema`"


def test_sample_manifests_validate_against_the_json_schema(zoo: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from models.manifest import SCHEMA_FILE

    schema = json.loads(SCHEMA_FILE.read_text())
    for version in ("v1", "v2"):
        jsonschema.validate(json.loads((zoo / version / "manifest.json").read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**json.loads((zoo / "v1" / "manifest.json").read_text()), "colour": 1}, schema)
