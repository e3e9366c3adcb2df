import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import strategies as st

from models.delta import DeltaError, apply
from models.delta.format import TRAILER_LEN, TRAILER_MAGIC, varint


def reseal(body: bytes) -> bytes:
    """A delta body with a fresh, valid trailer: what an attacker who can hash would send."""
    return body + TRAILER_MAGIC + hashlib.sha256(body).digest()


def unseal(delta: bytes) -> bytes:
    return delta[:-TRAILER_LEN]


def mutated(data: st.DataObject, delta: bytes) -> bytes:
    """`delta` with one to four bytes changed, runs cut or bytes inserted, then resealed: the
    trailer passes, so only the decoder itself stands between the damage and the output."""
    body = bytearray(unseal(delta))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(body) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            body[at] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del body[at : at + data.draw(st.integers(1, 64))]
        else:
            body[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    return reseal(bytes(body))


def refused_or_exact(base: Path, delta: bytes, folder: Path, target: bytes) -> None:
    """Apply `delta` (written into `folder`) to `base`: either it is refused and nothing is
    written, or it rebuilds exactly `target`; no temp file is left either way."""
    before = [p.name for p in folder.iterdir()]
    path, out = folder / "m.efd", folder / "out"
    path.write_bytes(delta)
    try:
        apply(base, path, out, max_output=1 << 20)
    except DeltaError:
        assert not out.exists()
    else:
        assert out.read_bytes() == target
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*before, "m.efd", *(["out"] if out.exists() else [])]
    )


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


def _key(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def _field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + varint(len(payload)) + payload


_DTYPES = {"float32": 1, "uint8": 2, "int8": 3, "float16": 10, "int64": 7, "float64": 11}


def onnx_model(tensors: list[tuple[str, np.ndarray]], data_file: str | None = None) -> tuple[bytes, bytes]:
    """A minimal ONNX ModelProto written by hand (no `onnx` needed): a graph of initializers only.

    With `data_file`, the tensors' bytes go to the returned data blob (64-byte aligned, like onnx's
    own writer) and the model names them as external data; else they are raw_data in the model.
    """
    inits, data = b"", bytearray()
    for name, array in tensors:
        raw = np.ascontiguousarray(array).tobytes()
        t = b"".join(_key(1, 0) + varint(d) for d in array.shape)
        t += _key(2, 0) + varint(_DTYPES[array.dtype.name]) + _field(8, name.encode())
        if data_file is None:
            t += _field(9, raw)
        else:
            data.extend(bytes(-len(data) % 64))
            entries = {"location": data_file, "offset": str(len(data)), "length": str(len(raw))}
            for k, v in entries.items():
                t += _field(13, _field(1, k.encode()) + _field(2, v.encode()))
            t += _key(14, 0) + varint(1)
            data.extend(raw)
        inits += _field(5, t)
    graph = _field(1, b"") + _field(2, b"graph") + inits
    model = _key(1, 0) + varint(8) + _field(2, b"edgefleet-test") + _field(7, graph)
    return model, bytes(data)


def fine_tuned(
    rng: np.random.Generator, shapes: list[tuple[int, ...]]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Weights and the same weights nudged as a few optimizer steps would (relative 1e-3), some frozen."""
    v1 = [(rng.standard_normal(s) * 0.05).astype(np.float32) for s in shapes]
    v2 = [
        w if i % 3 == 2 else (w + rng.standard_normal(w.shape) * 5e-5).astype(np.float32)
        for i, w in enumerate(v1)
    ]
    return v1, v2
