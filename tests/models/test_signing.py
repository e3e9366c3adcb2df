import os
from pathlib import Path

from models.signing import (
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    public_key_pem,
)


def test_private_key_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    key = generate_private_key(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert key_id(load_private_key(path).public_key()) == key_id(key.public_key())
    assert key_id(load_public_key(public_key_pem(key))) == key_id(key.public_key())
