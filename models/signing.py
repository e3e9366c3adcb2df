"""Ed25519 signatures over update metadata.

The fleet signs the canonical JSON of an update's metadata; a device verifies it with the fleet
public keys it was provisioned with, before it touches the payload. (Full TUF roles, thresholds
and key rotation through root replace this single-key scheme in a later step; see README.)
"""

import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from models.errors import SignatureError
from models.fsutil import write_private


def canonical_json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_private_key(path: Path) -> Ed25519PrivateKey:
    """Make a key and write it as PEM readable by its owner only (0600, created so, never widened)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(path, pem)
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as e:
        raise SignatureError(f"not a PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("the trusted key is not Ed25519")
    return key


def sign(metadata: dict[str, Any], key: Ed25519PrivateKey) -> tuple[str, str]:
    """Return (key_id, base64 signature) over the canonical JSON of `metadata`."""
    signature = key.sign(canonical_json(metadata))
    return key_id(key.public_key()), base64.b64encode(signature).decode()


def verify(
    metadata: dict[str, Any],
    signer_key_id: str,
    signature_b64: str,
    trusted: dict[str, Ed25519PublicKey],
    *,
    now: float | None = None,
) -> None:
    """Raise SignatureError unless a trusted key signed exactly `metadata` and it has not expired."""
    public = trusted.get(signer_key_id)
    if public is None:
        raise SignatureError(f"metadata is signed by unknown key {signer_key_id!r}; refused")
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        public.verify(signature, canonical_json(metadata))
    except (InvalidSignature, ValueError) as e:
        raise SignatureError("signature does not verify: the metadata was altered or mis-signed") from e
    expires = metadata.get("expires")
    if isinstance(expires, int | float) and expires < (now if now is not None else time.time()):
        raise SignatureError("signed metadata has expired; ask the fleet for a fresh offer")
