"""Find the byte range of every initializer's raw_data in a serialized ONNX model.

This reads the protobuf wire format directly (ModelProto.graph = 7, GraphProto.initializer = 5,
TensorProto.data_type = 2, name = 8, raw_data = 9), so neither side needs the `onnx` package and
the offsets are exact. The ranges are only hints to the encoder: a delta describes the target's
bytes, so a file that merely looks like ONNX still round-trips byte for byte.
"""

from collections.abc import Iterator
from dataclasses import dataclass

# TensorProto.DataType -> element width in bytes (complex types split into their float parts).
_WIDTHS = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 4, 15: 8, 16: 2}


@dataclass(frozen=True)
class TensorSpan:
    name: str
    offset: int
    length: int
    width: int


class _NotProtobuf(Exception):
    pass


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    n = 0
    for shift in range(0, 64, 7):
        if pos >= end:
            raise _NotProtobuf
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos
    raise _NotProtobuf


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end or varint value) for a message's fields."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _NotProtobuf
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, wire, pos, value
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise _NotProtobuf
            yield field, wire, pos, pos + size
            pos += size
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _NotProtobuf
            yield field, wire, pos, pos + length
            pos += length
        else:
            raise _NotProtobuf


def find_initializers(buf: bytes, min_bytes: int = 0) -> list[TensorSpan]:
    """Raw-data ranges of the top-level graph's initializers, sorted by offset; [] if not ONNX."""
    spans: list[TensorSpan] = []
    try:
        for field, wire, start, end in _fields(buf, 0, len(buf)):
            if field != 7 or wire != 2:
                continue
            for g_field, g_wire, g_start, g_end in _fields(buf, start, end):
                if g_field == 5 and g_wire == 2:
                    span = _tensor(buf, g_start, g_end)
                    if span is not None and span.length >= max(min_bytes, 1):
                        spans.append(span)
    except _NotProtobuf:
        return []
    spans.sort(key=lambda s: s.offset)
    return spans


def _tensor(buf: bytes, start: int, end: int) -> TensorSpan | None:
    name, dtype, raw = "", 0, None
    for field, wire, v_start, v_end in _fields(buf, start, end):
        if field == 2 and wire == 0:
            dtype = v_end
        elif field == 8 and wire == 2:
            name = bytes(buf[v_start:v_end]).decode("utf-8", "replace")
        elif field == 9 and wire == 2:
            raw = (v_start, v_end - v_start)
    if raw is None:
        return None
    width = _WIDTHS.get(dtype, 1)
    if raw[1] % width:
        width = 1
    return TensorSpan(name, raw[0], raw[1], width)
