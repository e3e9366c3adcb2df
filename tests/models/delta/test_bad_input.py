"""Deltas that are truncated, corrupt, from another base, over their limits, or built to explode."""

import hashlib
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.delta import DeltaError, apply, encode
from models.delta.format import CHUNK_BYTES, FileRef, Header, Limits, Op, Transform, tensor_record, varint

from .conftest import mutated, refused_or_exact, reseal

BASE = bytes(range(256)) * 64  # 16 KiB
TARGET = BASE[:8000] + b"new bytes" * 100 + BASE[9000:]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    (folder / "base").write_bytes(BASE)
    (folder / "target").write_bytes(TARGET)
    encode(folder / "base", folder / "target", folder / "good.efd", level=3)
    return {"dir": folder, "base": folder / "base", "good": folder / "good.efd"}


def refused(
    files: dict[str, Path], delta: bytes, tmp_path: Path, match: str | None = None, **kw: int
) -> None:
    path, out = tmp_path / "crafted.efd", tmp_path / "out"
    path.write_bytes(delta)
    with pytest.raises(DeltaError, match=match):
        apply(files["base"], path, out, **kw)
    assert list(tmp_path.iterdir()) == [path]  # nothing at the destination, no temp file


def crafted(recs: list[bytes], out: bytes = b"x", **fields: object) -> bytes:
    values: dict[str, object] = {
        "kind": "binary",
        "base": FileRef(sha256=hashlib.sha256(BASE).hexdigest(), size=len(BASE)),
        "target": FileRef(sha256=hashlib.sha256(out).hexdigest(), size=len(out)),
        "records": len(recs),
        "dict_bytes": 0,
        "gap_bytes": 0,
        "limits": Limits(max_segment_bytes=CHUNK_BYTES, window_log=24),
        "level": 3,
    }
    values.update(fields)
    return reseal(Header.model_validate(values).to_bytes() + b"".join(recs))


def test_the_good_delta_applies(files: dict[str, Path], tmp_path: Path) -> None:
    apply(files["base"], files["good"], tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == TARGET


def test_another_base(files: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(BASE[:-1] + b"!")
    with pytest.raises(DeltaError, match="built from another base"):
        apply(other, files["good"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_truncation_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    good = files["good"].read_bytes()
    for cut in sorted({0, 1, 8, 15, 16, 40, *range(0, len(good), max(1, len(good) // 60)), len(good) - 1}):
        refused(files, good[:cut], tmp_path)


def test_a_flipped_byte_is_refused_before_decoding(files: dict[str, Path], tmp_path: Path) -> None:
    good = bytearray(files["good"].read_bytes())
    good[len(good) // 2] ^= 0x40
    refused(files, bytes(good), tmp_path, "does not match its trailer")


def test_output_over_the_limit(files: dict[str, Path], tmp_path: Path) -> None:
    refused(files, files["good"].read_bytes(), tmp_path, "over the limit", max_output=len(TARGET) - 1)


def test_huge_header(files: dict[str, Path], tmp_path: Path) -> None:
    refused(files, reseal(b"EFDELTA\0\x01\x00\x00\x00\xff\xff\xff\x7f"), tmp_path, "exceeds the limit")


def test_not_a_delta(files: dict[str, Path], tmp_path: Path) -> None:
    refused(files, reseal(b"PK\x03\x04" + bytes(100)), tmp_path, "wrong magic")


def test_a_zstd_bomb_in_a_tensor_is_cut_off(files: dict[str, Path], tmp_path: Path) -> None:
    bomb = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(256 * 1024 * 1024))
    rec = tensor_record(Transform.RAW, 1, 1, 0, bomb)
    refused(files, crafted([rec], b"\0"), tmp_path, "larger than its content could need")
    # The payload within bounds, the frame still larger than its record:
    sized = zstandard.ZstdCompressor(level=1).compress(bytes(4096))
    rec = tensor_record(Transform.RAW, 1, 1024, 0, sized)
    refused(files, crafted([rec], bytes(1024)), tmp_path, "holds 4096 bytes, its record says 1024")
    unsized = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(4096))
    rec = tensor_record(Transform.RAW, 1, 1024, 0, unsized)
    refused(files, crafted([rec], bytes(1024)), tmp_path, "does not declare its decoded size")


def test_a_sparse_frame_may_hold_less_but_never_more(files: dict[str, Path], tmp_path: Path) -> None:
    coded = (1).to_bytes(4, "little") + bytes([3, 0, 0, 0]) + b"\x05"  # element 3 of 16 grows by 5
    frame = zstandard.ZstdCompressor(level=1).compress(coded)
    rec = tensor_record(Transform.SPARSE, 1, 16, 0, frame)
    want = bytearray(BASE[:16])
    want[3] = (want[3] + 5) % 256
    path = tmp_path / "ok.efd"
    path.write_bytes(crafted([rec], bytes(want)))
    apply(files["base"], path, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == bytes(want)
    (tmp_path / "out").unlink()
    path.unlink()
    big = zstandard.ZstdCompressor(level=1).compress(coded + bytes(14))
    rec = tensor_record(Transform.SPARSE, 1, 16, 0, big)
    refused(files, crafted([rec], bytes(want)), tmp_path, "holds 23 bytes, its record says 16")


def test_a_tensor_payload_is_exactly_one_frame(files: dict[str, Path], tmp_path: Path) -> None:
    frame = zstandard.ZstdCompressor(level=1).compress(bytes(1024))
    for payload in (frame + b"junk", frame + frame, frame[:-1], b"\x28\xb5\x2f\xfd" + bytes(20)):
        rec = tensor_record(Transform.RAW, 1, 1024, 0, payload)
        refused(files, crafted([rec], bytes(1024)), tmp_path, "tensor payload is not|tensor frame")
    rec = tensor_record(Transform.RAW, 1, 1024, 0, frame)
    path = tmp_path / "ok.efd"
    path.write_bytes(crafted([rec], bytes(1024)))
    apply(files["base"], path, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == bytes(1024)


def test_a_gap_stream_longer_than_declared(files: dict[str, Path], tmp_path: Path) -> None:
    frame = zstandard.ZstdCompressor(level=1).compress(bytes(1 << 20))
    records = [bytes([Op.GAPSTREAM]) + varint(len(frame)) + frame, bytes([Op.GAP]) + varint(10)]
    refused(files, crafted(records, bytes(10), gap_bytes=10), tmp_path, "longer than its header declares")


@pytest.mark.parametrize(
    ("records", "fields", "match"),
    [
        ([bytes([Op.COPY]) + varint(1) + varint(len(BASE))], {}, "past the end of the base"),
        ([bytes([Op.COPY]) + varint(5) + varint(0)], {}, "more than the declared target"),
        ([bytes([Op.GAP]) + varint(1)], {"gap_bytes": 1}, "reads past the gap stream"),
        ([bytes([Op.COPY]) + varint(1) + varint(0)], {"records": 2}, "truncated"),
        ([bytes([99])], {}, "unknown record op"),
        ([bytes([Op.TENSOR, 7, 1]) + varint(1) + varint(0)], {}, "unknown tensor transform"),
        ([bytes([Op.TENSOR, 0, 3]) + varint(3) + varint(0)], {}, "width 3"),
        ([bytes([Op.COPY]) + b"\xff" * 11], {}, "too long"),
        ([bytes([Op.DICT]) + varint(1) + varint(0) + varint(len(BASE) + 1)], {}, "outside the base"),
        ([bytes([Op.COPY]) + varint(1) + varint(0)], {"dict_bytes": len(BASE) + 1}, "larger than the files"),
        (
            [bytes([Op.COPY]) + varint(1) + varint(0)],
            {"limits": Limits(max_segment_bytes=CHUNK_BYTES, window_log=31)},
            "zstd window",
        ),
        (
            [bytes([Op.COPY]) + varint(1) + varint(0)],
            {"target": FileRef(sha256="0" * 64, size=1)},
            "does not match the sha256",
        ),
        ([bytes([Op.COPY]) + varint(1) + varint(0)] * 2, {"records": 1}, "bytes after its last record"),
    ],
)
def test_crafted_records(
    files: dict[str, Path], tmp_path: Path, records: list[bytes], fields: dict[str, object], match: str
) -> None:
    refused(files, crafted(records, BASE[:1], **fields), tmp_path, match)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_deltas_never_decode_to_anything_else(
    files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    delta = mutated(data, files["good"].read_bytes())
    refused_or_exact(files["base"], delta, tmp_path_factory.mktemp("fuzz"), TARGET)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=600))
def test_random_bytes_are_refused(
    files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, blob: bytes
) -> None:
    folder = tmp_path_factory.mktemp("rand")
    for candidate in (blob, reseal(blob), reseal(b"EFDELTA\0\x01\x00\x00\x00" + blob)):
        (folder / "r.efd").write_bytes(candidate)
        with pytest.raises(DeltaError):
            apply(files["base"], folder / "r.efd", folder / "out")
        assert not (folder / "out").exists()
