"""The keys document a device adopts: every field checked, bad input refused with its reason."""

import base64
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.keyring import FleetKeyring
from protocol.keys_document import (
    MAX_DOCUMENT,
    KeysDocumentError,
    canonical,
    parse,
    public_key_from_text,
    public_key_text,
)
from protocol.sealed import fleet_key_id


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return FleetKeyring(tmp_path_factory.mktemp("keys")).document()


def test_round_trip(document: dict[str, Any]) -> None:
    parsed = parse(canonical(document))
    assert parsed.serial == document["serial"]
    assert fleet_key_id(parsed.telemetry_public) == parsed.telemetry_key_id


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format="edgefleet-keys/9"), "format"),
        (lambda d: d.update(serial=0), "serial"),
        (lambda d: d["telemetry"].update(kem="rsa"), "kem"),
        (lambda d: d["telemetry"].update(key_id="other"), "not the id"),
        (lambda d: d["telemetry"].update(public="!!"), "base64"),
        (lambda d: d["telemetry"].update(public=base64.b64encode(b"x" * 31).decode()), "telemetry.public"),
        (lambda d: d["field_tokens"]["keys"].update(k=base64.b64encode(b"x").decode()), "32-byte"),
        (lambda d: d["field_tokens"]["revoked"].update(j="soon"), "exp"),
        (lambda d: d.update(field_tokens=[]), "JSON object"),
    ],
)
def test_each_bad_field_is_named(document: dict[str, Any], change: Any, message: str) -> None:
    bad = json.loads(json.dumps(document))
    change(bad)
    with pytest.raises(KeysDocumentError, match=message):
        parse(canonical(bad))


def test_size_is_capped_before_parsing() -> None:
    with pytest.raises(KeysDocumentError, match="exceeds"):
        parse(b" " * (MAX_DOCUMENT + 1))


@given(st.binary(max_size=2048))
def test_arbitrary_bytes_only_raise_keys_document_errors(data: bytes) -> None:
    with contextlib.suppress(KeysDocumentError):
        parse(data)


def test_enrollment_key_text_round_trips(tmp_path: Path) -> None:
    ring = FleetKeyring(tmp_path / "keys")
    public = ring.current_telemetry_key()[1].public_key()
    text = public_key_text(public)
    assert text.startswith("-----BEGIN PUBLIC KEY-----"), "X25519 stays PEM for older devices"
    assert fleet_key_id(public_key_from_text(text)) == fleet_key_id(public)
    with pytest.raises(KeysDocumentError, match="KEM"):
        public_key_from_text("rsa:AAAA")
