import json
import struct

import pytest

from protocol.errors import ProtocolError
from protocol.frames import (
    MAGIC,
    MAX_REASON,
    Chunk,
    ChunkUnavailable,
    decode_chunk,
    decode_chunk_answer,
    encode_chunk,
    encode_chunk_unavailable,
)


def test_round_trip() -> None:
    chunk = Chunk(update_id="u1", offset=10, total=100, data=b"x" * 50)
    assert decode_chunk(encode_chunk(chunk)) == chunk


def test_truncated_frame_is_refused() -> None:
    frame = encode_chunk(Chunk(update_id="u1", offset=0, total=10, data=b"0123456789"))
    with pytest.raises(ProtocolError, match="declares"):
        decode_chunk(frame[:-3])
    with pytest.raises(ProtocolError, match="shorter"):
        decode_chunk(frame[:3])


def test_corrupt_data_is_refused() -> None:
    frame = bytearray(encode_chunk(Chunk(update_id="u1", offset=0, total=10, data=b"0123456789")))
    frame[-1] ^= 0xFF
    with pytest.raises(ProtocolError, match="corrupt"):
        decode_chunk(bytes(frame))


def test_bad_magic_and_range() -> None:
    with pytest.raises(ProtocolError, match="magic"):
        decode_chunk(b"XXXX\x00\x00\x00\x00")
    with pytest.raises(ProtocolError, match="outside"):
        decode_chunk(encode_chunk(Chunk(update_id="u", offset=8, total=10, data=b"abcd")))


def test_an_unavailable_answer_round_trips_and_is_no_chunk() -> None:
    gone = ChunkUnavailable("u1", 4096, "the store lost it", None)
    later = ChunkUnavailable("u1", 0, "the store is down", 10.0)
    assert decode_chunk_answer(encode_chunk_unavailable(gone)) == gone
    assert decode_chunk_answer(encode_chunk_unavailable(later)) == later
    assert decode_chunk_answer(encode_chunk(Chunk("u1", 0, 3, b"abc"))) == Chunk("u1", 0, 3, b"abc")
    with pytest.raises(ProtocolError, match="unavailable: the store lost it"):
        decode_chunk(encode_chunk_unavailable(gone))  # where a chunk must come (metadata files)


@pytest.mark.parametrize(
    ("header", "trailing", "match"),
    [
        ({"update_id": "u1", "offset": 0, "unavailable": 5}, b"", "reason string"),
        ({"update_id": "u1", "offset": 0, "unavailable": "x"}, b"data", "no bytes"),
        ({"update_id": "u1", "offset": 0, "unavailable": "x", "retry_after_s": -1}, b"", "retry_after_s"),
        ({"update_id": "u1", "offset": 0, "unavailable": "x", "retry_after_s": 1e9}, b"", "retry_after_s"),
        ({"update_id": "u1", "offset": 0, "unavailable": "x", "retry_after_s": "5"}, b"", "retry_after_s"),
        ({"update_id": "u1", "offset": 0, "unavailable": "x", "retry_after_s": True}, b"", "retry_after_s"),
        ({"update_id": "u1", "unavailable": "x"}, b"", "not valid"),
    ],
)
def test_a_malformed_unavailable_answer_is_refused(
    header: dict[str, object], trailing: bytes, match: str
) -> None:
    raw = json.dumps(header).encode()
    frame = MAGIC + struct.pack(">I", len(raw)) + raw + trailing
    with pytest.raises(ProtocolError, match=match):
        decode_chunk_answer(frame)


def test_a_long_reason_is_cut() -> None:
    answer = decode_chunk_answer(encode_chunk_unavailable(ChunkUnavailable("u1", 0, "x" * 5000, None)))
    assert isinstance(answer, ChunkUnavailable) and len(answer.reason) == MAX_REASON
