import pytest

from protocol.errors import ProtocolError
from protocol.frames import Chunk, decode_chunk, encode_chunk


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
