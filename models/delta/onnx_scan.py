"""Find the byte range of every initializer's tensor data, in an ONNX model or its external data file.

This reads the protobuf wire format directly (ModelProto.graph = 7, GraphProto.initializer = 5,
TensorProto.dims = 1, data_type = 2, name = 8, raw_data = 9, external_data = 13), so neither side
needs the `onnx` package and the offsets are exact. The ranges are only hints to the encoder: a
delta describes the target's bytes, so a file that merely looks like ONNX still round-trips byte
for byte.
"""

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# TensorProto.DataType -> element width in bytes (complex types split into their float parts).
_WIDTHS = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 4, 15: 8, 16: 2}
# float, float16, double, complex64, complex128, bfloat16: IEEE sign, exponent, mantissa elements.
_FLOATS = frozenset({1, 10, 11, 14, 15, 16})


@dataclass(frozen=True)
class TensorSpan:
    name: str
    offset: int
    length: int
    width: int
    # IEEE floats, or of unknown type: the encoder then also tries FPLANES (exponent in one plane)
    fp: bool = False


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


def _initializers(buf: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of every TensorProto in ModelProto.graph.initializer."""
    for field, wire, start, end in _fields(buf, 0, len(buf)):
        if field != 7 or wire != 2:
            continue
        for g_field, g_wire, g_start, g_end in _fields(buf, start, end):
            if g_field == 5 and g_wire == 2:
                yield g_start, g_end


def find_initializers(buf: bytes, min_bytes: int = 0) -> list[TensorSpan]:
    """Raw-data ranges of the top-level graph's initializers, sorted by offset; [] if not ONNX."""
    spans: list[TensorSpan] = []
    try:
        for start, end in _initializers(buf):
            t = _tensor(buf, start, end)
            if t.raw is not None and t.raw[1] >= max(min_bytes, 1):
                spans.append(TensorSpan(t.name, t.raw[0], t.raw[1], t.width(t.raw[1]), t.fp))
    except _NotProtobuf:
        return []
    spans.sort(key=lambda s: s.offset)
    return spans


def find_external(buf: bytes, location: str, data_size: int, min_bytes: int = 0) -> list[TensorSpan]:
    """Ranges, in the external data file `location`, of the initializers an ONNX model keeps there.

    `buf` is the model (graph) file; `data_size` the data file's size: ranges past it, overlapping
    ones and anything unparsable are dropped (they are hints). [] if `buf` is not ONNX.
    """
    spans: list[TensorSpan] = []
    try:
        for start, end in _initializers(buf):
            t = _tensor(buf, start, end)
            if t.external.get("location") != location:
                continue
            try:
                offset = int(t.external.get("offset", "0"))
                length = int(t.external["length"]) if "length" in t.external else t.element_bytes()
            except ValueError:
                continue
            if offset >= 0 and length >= max(min_bytes, 1) and offset + length <= data_size:
                spans.append(TensorSpan(t.name, offset, length, t.width(length), t.fp))
    except _NotProtobuf:
        return []
    spans.sort(key=lambda s: s.offset)
    kept: list[TensorSpan] = []
    for span in spans:
        if not kept or span.offset >= kept[-1].offset + kept[-1].length:
            kept.append(span)
    return kept


def layout_for(data: Path) -> Path | None:
    """The ONNX file beside `data` that keeps its initializers in it, if there is exactly one."""
    found = []
    for candidate in sorted(data.parent.glob("*.onnx")):
        if candidate == data:
            continue
        try:
            buf = candidate.read_bytes()
        except OSError:
            continue
        if find_external(buf, data.name, data.stat().st_size):
            found.append(candidate)
    return found[0] if len(found) == 1 else None


@dataclass
class _Tensor:
    name: str = ""
    dtype: int = 0
    dims: tuple[int, ...] = ()
    raw: tuple[int, int] | None = None
    external: dict[str, str] = dataclasses.field(default_factory=dict)

    def width(self, length: int) -> int:
        width = _WIDTHS.get(self.dtype, 1)
        return width if length % width == 0 else 1

    @property
    def fp(self) -> bool:
        return self.dtype in _FLOATS

    def element_bytes(self) -> int:
        if self.dtype not in _WIDTHS:
            raise ValueError("unknown data type")
        return math.prod(self.dims) * _WIDTHS[self.dtype]


def _packed_varints(buf: bytes, start: int, end: int) -> list[int]:
    out, pos = [], start
    while pos < end:
        n, pos = _varint(buf, pos, end)
        out.append(n)
    return out


def _entry(buf: bytes, start: int, end: int) -> tuple[str, str]:
    key = value = ""
    for field, wire, v_start, v_end in _fields(buf, start, end):
        if wire == 2 and field in (1, 2):
            text = bytes(buf[v_start:v_end]).decode("utf-8", "replace")
            key, value = (text, value) if field == 1 else (key, text)
    return key, value


def _tensor(buf: bytes, start: int, end: int) -> _Tensor:
    t = _Tensor()
    dims: list[int] = []
    for field, wire, v_start, v_end in _fields(buf, start, end):
        if field == 1 and wire == 0:
            dims.append(v_end)
        elif field == 1 and wire == 2:
            dims.extend(_packed_varints(buf, v_start, v_end))
        elif field == 2 and wire == 0:
            t.dtype = v_end
        elif field == 8 and wire == 2:
            t.name = bytes(buf[v_start:v_end]).decode("utf-8", "replace")
        elif field == 9 and wire == 2:
            t.raw = (v_start, v_end - v_start)
        elif field == 13 and wire == 2:
            key, value = _entry(buf, v_start, v_end)
            t.external[key] = value
    t.dims = tuple(dims)
    return t
