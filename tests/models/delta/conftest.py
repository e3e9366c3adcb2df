import hashlib
import random
from pathlib import Path

import pytest

from models.delta.format import TRAILER_LEN, TRAILER_MAGIC


def reseal(body: bytes) -> bytes:
    """A delta body with a fresh, valid trailer: what an attacker who can hash would send."""
    return body + TRAILER_MAGIC + hashlib.sha256(body).digest()


def unseal(delta: bytes) -> bytes:
    return delta[:-TRAILER_LEN]


@pytest.fixture(scope="session")
def binary_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A non-ONNX pair: 256 KiB of structured bytes and an edited copy (insertions, overwrites)."""
    rng = random.Random(7)
    words = [bytes(rng.randrange(256) for _ in range(rng.randrange(4, 40))) for _ in range(300)]
    old = b"".join(rng.choice(words) for _ in range(14000))[: 256 * 1024]
    new = bytearray(old)
    for _ in range(40):
        at = rng.randrange(len(new))
        new[at:at] = rng.randbytes(rng.randrange(1, 64))
        at = rng.randrange(len(new) - 100)
        new[at : at + 50] = rng.randbytes(50)
    folder = tmp_path_factory.mktemp("binary")
    (folder / "old.tflite").write_bytes(old)
    (folder / "new.tflite").write_bytes(bytes(new))
    return folder / "old.tflite", folder / "new.tflite"
