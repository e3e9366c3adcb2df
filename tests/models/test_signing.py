import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from models.errors import SignatureError
from models.signing import (
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    public_key_pem,
    sign,
    verify,
)

META = {
    "update_id": "u1",
    "model_name": "m",
    "version": 2,
    "sha256": "ab" * 32,
    "size": 10,
    "created": 1.0,
    "expires": time.time() + 30 * 24 * 3600,
}


def trusted(key: Ed25519PrivateKey) -> dict[str, Ed25519PublicKey]:
    return {key_id(key.public_key()): key.public_key()}


def test_sign_and_verify(signing_key: Ed25519PrivateKey) -> None:
    kid, signature = sign(META, signing_key)
    verify(META, kid, signature, trusted(signing_key))


@pytest.mark.parametrize("field", ["version", "sha256", "size"])
def test_any_change_breaks_the_signature(signing_key: Ed25519PrivateKey, field: str) -> None:
    kid, signature = sign(META, signing_key)
    altered = {**META, field: "cd" * 32 if field == "sha256" else 99}
    with pytest.raises(SignatureError, match="does not verify"):
        verify(altered, kid, signature, trusted(signing_key))


def test_unknown_key_and_garbage_signature(signing_key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    kid, signature = sign(META, other)
    with pytest.raises(SignatureError, match="unknown key"):
        verify(META, kid, signature, trusted(signing_key))
    with pytest.raises(SignatureError, match="does not verify"):
        verify(META, key_id(signing_key.public_key()), "!!notbase64", trusted(signing_key))


def test_expired_metadata_is_refused(signing_key: Ed25519PrivateKey) -> None:
    stale = {**META, "expires": time.time() - 1}
    kid, signature = sign(stale, signing_key)
    with pytest.raises(SignatureError, match="expired"):
        verify(stale, kid, signature, trusted(signing_key))


def test_private_key_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    key = generate_private_key(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert key_id(load_private_key(path).public_key()) == key_id(key.public_key())
    assert key_id(load_public_key(public_key_pem(key))) == key_id(key.public_key())
