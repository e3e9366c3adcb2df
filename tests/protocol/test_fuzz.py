"""Property tests: whatever bytes arrive, the decoders answer with a value or a ProtocolError."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import ChunkRequest, DeviceState, Health, ProtocolError, UpdateOffer, UpdateStatus, decode
from protocol.frames import Chunk, decode_chunk, encode_chunk

MESSAGES = [ChunkRequest, DeviceState, Health, UpdateOffer, UpdateStatus]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300)
@given(payload=st.binary(max_size=512), index=st.integers(0, len(MESSAGES) - 1))
def test_arbitrary_bytes_never_crash_decode(payload: bytes, index: int) -> None:
    try:
        decode(MESSAGES[index], payload)
    except ProtocolError as e:
        assert e.reason


@settings(max_examples=300)
@given(value=json_values, index=st.integers(0, len(MESSAGES) - 1))
def test_arbitrary_json_never_crashes_decode(value: object, index: int) -> None:
    try:
        decode(MESSAGES[index], json.dumps(value).encode())
    except ProtocolError as e:
        assert e.reason


@settings(max_examples=300)
@given(frame=st.binary(max_size=256))
def test_arbitrary_frames_never_crash_decode_chunk(frame: bytes) -> None:
    try:
        decode_chunk(b"EFC1" + frame)
    except ProtocolError as e:
        assert e.reason


@settings(max_examples=200)
@given(data=st.binary(max_size=1024), flip=st.integers(min_value=0))
def test_any_flipped_bit_in_chunk_data_is_caught(data: bytes, flip: int) -> None:
    frame = bytearray(encode_chunk(Chunk(update_id="u", offset=0, total=len(data), data=data)))
    if not data:
        return
    position = len(frame) - len(data) + flip % len(data)
    frame[position] ^= 1
    try:
        decode_chunk(bytes(frame))
    except ProtocolError:
        return
    raise AssertionError("a corrupted chunk was accepted")
