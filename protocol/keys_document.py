"""The fleet's keys document: which key devices seal telemetry to, which keys sign field tokens,
which tokens are revoked. The fleet writes it (fleet/keyring.py) and publishes it as a TUF target;
a device parses it here only after TUF verified it, and still checks every field, since it
configures what the device trusts.

    {"format": "edgefleet-keys/1", "serial": 7,
     "telemetry": {"key_id": "...", "kem": "x25519", "public": "<base64 raw public key>"},
     "field_tokens": {"keys": {"ft-...": "<base64 raw Ed25519 public key>"},
                      "revoked": {"<jti>": <the token's exp>}}}
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from protocol.errors import ProtocolError
from protocol.field_token import FieldTrust
from protocol.sealed import (
    KEMS,
    SealError,
    TelemetryPublicKey,
    fleet_key_id,
    kem_of,
    public_from_raw,
    public_raw,
)

KEYS_FORMAT = "edgefleet-keys/1"
MAX_DOCUMENT = 256 * 1024
MAX_FIELD_KEYS = 16
MAX_REVOKED = 10_000


class KeysDocumentError(ProtocolError):
    """A keys document that is malformed or inconsistent; the message names the field."""


@dataclass(frozen=True)
class KeysDocument:
    serial: int
    telemetry_key_id: str
    telemetry_kem: str
    telemetry_public: TelemetryPublicKey
    field_trust: FieldTrust
    revoked_until: Mapping[str, int]


def canonical(document: Mapping[str, Any]) -> bytes:
    """The document's bytes as published and hashed: sorted keys, no spaces, UTF-8."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse(data: bytes | Mapping[str, Any]) -> KeysDocument:
    if isinstance(data, bytes | bytearray):
        if len(data) > MAX_DOCUMENT:
            raise KeysDocumentError(f"keys document of {len(data)} bytes exceeds {MAX_DOCUMENT}")
        try:
            loaded = json.loads(data)
        except (UnicodeDecodeError, ValueError) as e:
            raise KeysDocumentError(f"keys document is not JSON: {e}") from e
    else:
        loaded = data
    doc = _object(loaded, "document")
    if doc.get("format") != KEYS_FORMAT:
        raise KeysDocumentError(f"keys document format {doc.get('format')!r} is not {KEYS_FORMAT!r}")
    serial = doc.get("serial")
    if not isinstance(serial, int) or isinstance(serial, bool) or serial < 1:
        raise KeysDocumentError(f"serial must be a positive integer, got {serial!r}")
    telemetry = _object(doc.get("telemetry"), "telemetry")
    kem, key_id = telemetry.get("kem"), telemetry.get("key_id")
    if kem not in KEMS:
        raise KeysDocumentError(f"telemetry.kem {kem!r} is not one of {', '.join(KEMS)}")
    try:
        public = public_from_raw(kem, _b64(telemetry.get("public"), "telemetry.public"))
    except SealError as e:
        raise KeysDocumentError(f"telemetry.public: {e}") from e
    if key_id != fleet_key_id(public):
        raise KeysDocumentError(f"telemetry.key_id {key_id!r} is not the id of telemetry.public")
    field = _object(doc.get("field_tokens"), "field_tokens")
    keys = _object(field.get("keys"), "field_tokens.keys")
    if len(keys) > MAX_FIELD_KEYS:
        raise KeysDocumentError(f"field_tokens.keys lists {len(keys)} keys, over {MAX_FIELD_KEYS}")
    trusted: dict[str, Ed25519PublicKey] = {}
    for kid, raw in keys.items():
        decoded = _b64(raw, f"field_tokens.keys[{kid}]")
        if len(decoded) != 32:
            raise KeysDocumentError(f"field_tokens.keys[{kid}] is not a 32-byte Ed25519 key")
        trusted[str(kid)] = Ed25519PublicKey.from_public_bytes(decoded)
    revoked = _object(field.get("revoked"), "field_tokens.revoked")
    if len(revoked) > MAX_REVOKED:
        raise KeysDocumentError(f"field_tokens.revoked lists {len(revoked)} tokens, over {MAX_REVOKED}")
    until: dict[str, int] = {}
    for jti, exp in revoked.items():
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise KeysDocumentError(f"field_tokens.revoked[{jti}] must be the token's exp (an integer)")
        until[str(jti)] = exp
    return KeysDocument(
        serial=serial,
        telemetry_key_id=str(key_id),
        telemetry_kem=str(kem),
        telemetry_public=public,
        field_trust=FieldTrust(keys=trusted, revoked=frozenset(until)),
        revoked_until=until,
    )


def public_key_text(public: TelemetryPublicKey) -> str:
    """The telemetry public key as enrollment hands it out: PEM for X25519 (what devices enrolled
    before key rotation read), `<kem>:<base64 raw>` for the hybrid, which has no PEM form."""
    kem = kem_of(public)
    if kem == "x25519":
        assert isinstance(public, X25519PublicKey)
        spki = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return public.public_bytes(*spki).decode()
    return f"{kem}:{base64.b64encode(public_raw(public)).decode()}"


def public_key_from_text(text: str) -> TelemetryPublicKey:
    if text.lstrip().startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError as e:
            raise KeysDocumentError(f"the fleet telemetry key is not a valid PEM key: {e}") from e
        if not isinstance(key, X25519PublicKey):
            raise KeysDocumentError("the fleet telemetry key in PEM form must be an X25519 key")
        return key
    kem, _, raw = text.strip().partition(":")
    if kem not in KEMS:
        raise KeysDocumentError(f"the fleet telemetry key names KEM {kem!r}, not one of {', '.join(KEMS)}")
    try:
        return public_from_raw(kem, _b64(raw, "the fleet telemetry key"))
    except SealError as e:
        raise KeysDocumentError(f"the fleet telemetry key: {e}") from e


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise KeysDocumentError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > 8192:
        raise KeysDocumentError(f"{what} must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise KeysDocumentError(f"{what} is not valid base64: {e}") from e
