import json

from hypothesis import given, settings
from hypothesis import strategies as st

from models.errors import ManifestError
from models.manifest import parse_manifest

from .conftest import FIELDS


@settings(max_examples=300)
@given(payload=st.binary(max_size=512))
def test_arbitrary_bytes_give_a_manifest_error(payload: bytes) -> None:
    try:
        parse_manifest(payload)
    except ManifestError as e:
        assert "manifest" in str(e)


@settings(max_examples=300)
@given(
    key=st.sampled_from(sorted(FIELDS)),
    value=st.none() | st.integers() | st.text(max_size=8) | st.lists(st.integers(), max_size=3),
)
def test_any_field_replaced_by_junk_is_refused_or_valid(key: str, value: object) -> None:
    raw = json.dumps({**FIELDS, key: value, "files": {"model.onnx": {"size": 1, "sha256": "0" * 64}}})
    try:
        manifest = parse_manifest(raw)
    except ManifestError as e:
        assert key in str(e) or "lacks" in str(e)
    else:
        assert manifest.name
