"""The container format of a delta: constants, the header, records and bounded readers.

Layout (all integers little-endian; see docs/delta-format.md)::

    magic b"EFDELTA\\0" | u16 version | u16 flags (0) | u32 header length | header (JSON, UTF-8)
    record * header.records
    b"EFDT" | sha256 of every byte before it

A record is a u8 op followed by unsigned LEB128 varints and, for some ops, a payload.
"""

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import BinaryIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.delta.errors import DeltaError

MAGIC = b"EFDELTA\0"
VERSION = 2  # 2 added the SPARSE transform; version 1 deltas (a subset) are still read
READABLE_VERSIONS = (1, 2)
TRAILER_MAGIC = b"EFDT"
TRAILER_LEN = len(TRAILER_MAGIC) + 32
PREFIX = struct.Struct("<8sHHI")
MAX_HEADER_BYTES = 64 * 1024
MAX_RECORDS = 1 << 24
MAX_DICT_RANGES = 1 << 20
MAX_VARINT = (1 << 63) - 1
# Tensors are coded in chunks of at most this many bytes, so apply holds a few chunks, never a tensor.
CHUNK_BYTES = 16 * 1024 * 1024
# The most bytes one record may declare; apply refuses more whatever the header says.
MAX_SEGMENT_BYTES = 256 * 1024 * 1024
WIDTHS = (1, 2, 4, 8)
SHA256_HEX = r"^[0-9a-f]{64}$"


class Op(IntEnum):
    DICT = 1  # the dictionary: ranges of the base file, concatenated
    GAPSTREAM = 2  # one zstd frame: every non-tensor byte of the target, coded with the dictionary
    GAP = 3  # the next n bytes of the gap stream
    COPY = 4  # n bytes of the base file from an offset
    TENSOR = 5  # n bytes coded by a transform, optionally against a base range of the same length
    # The whole target from the whole base by a bsdiff patch (files that are not ONNX). Added within
    # version 2: a decoder from before it refuses the delta as using an unknown record op.
    BSDIFF = 6


class Transform(IntEnum):
    RAW = 0  # the bytes as they are
    PLANES = 1  # the bytes with byte planes split by the element width
    XOR = 2  # (new ^ old), planes split
    SUB = 3  # (new - old) as unsigned integers of the element width, wrapping; planes split
    SPARSE = 4  # SUB's differences, only the non-zero ones, with the gaps between them (version 2)
    # Each element rotated left by one bit, then planes split: a float's sign leaves the top byte
    # for the bottom one (among random mantissa bits) and fp32/bf16's whole exponent fills the top
    # byte. Added within version 2: a decoder from before it refuses it as an unknown transform.
    FPLANES = 5


# How a BSDIFF record may code its diff block: as it is, or only its non-zero bytes (a diff block
# is mostly zeros; SPARSE with 1-byte elements against an all-zero base).
BSDIFF_DIFF_CODINGS = (Transform.RAW, Transform.SPARSE)
# The transforms that read a base range of the same length.
BASED = (Transform.XOR, Transform.SUB, Transform.SPARSE)
# The transforms whose frame holds `width` byte planes of length / width bytes each, one after the other.
PLANE_SPLIT = (Transform.PLANES, Transform.XOR, Transform.SUB, Transform.FPLANES)


class Kind:
    ONNX = "onnx"
    BINARY = "binary"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class FileRef(_Strict):
    sha256: str = Field(pattern=SHA256_HEX)
    size: int = Field(ge=0, le=MAX_VARINT)


class Limits(_Strict):
    max_segment_bytes: int = Field(ge=1, le=MAX_SEGMENT_BYTES)
    window_log: int = Field(ge=10, le=31)


class Header(_Strict):
    kind: str = Field(pattern=r"^(onnx|binary)$")
    base: FileRef
    target: FileRef
    records: int = Field(ge=0, le=MAX_RECORDS)
    dict_bytes: int = Field(ge=0, le=MAX_VARINT)
    gap_bytes: int = Field(ge=0, le=MAX_VARINT)
    limits: Limits
    level: int = Field(ge=-131072, le=22)

    def to_bytes(self) -> bytes:
        body = json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":")).encode()
        return PREFIX.pack(MAGIC, VERSION, 0, len(body)) + body


@dataclass(frozen=True)
class DeltaInfo:
    """What a delta holds: the files it links, its size, and where the target's bytes come from."""

    kind: str
    base_sha256: str
    base_size: int
    target_sha256: str
    target_size: int
    delta_size: int
    records: int
    dict_bytes: int
    gap_bytes: int
    level: int
    # target bytes per source: "gap", "copy", and one entry per tensor transform ("sub", "xor", ...)
    target_bytes_by: dict[str, int]

    @property
    def ratio(self) -> float:
        """Delta size as a fraction of the target's size."""
        return self.delta_size / max(self.target_size, 1)


def parse_header(f: BinaryIO) -> Header:
    """Read the prefix and header from the start of `f`; raise DeltaError on anything unexpected."""
    prefix = f.read(PREFIX.size)
    if len(prefix) < PREFIX.size:
        raise DeltaError("not a delta: truncated before the header")
    magic, version, flags, length = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise DeltaError("not a delta: wrong magic")
    if version not in READABLE_VERSIONS:
        raise DeltaError(f"delta format version {version} is not supported (this reads {READABLE_VERSIONS})")
    if flags != 0:
        raise DeltaError(f"delta flags {flags:#x} are not supported")
    if length > MAX_HEADER_BYTES:
        raise DeltaError(f"delta header of {length} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    body = f.read(length)
    if len(body) < length:
        raise DeltaError("delta truncated inside its header")
    try:
        return Header.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "header"
        raise DeltaError(f"delta header invalid at {where}: {first['msg']}") from None


def varint(n: int) -> bytes:
    if not 0 <= n <= MAX_VARINT:
        raise ValueError(f"varint out of range: {n}")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class Reader:
    """Reads a delta's body with a hard end (the trailer's start), raising DeltaError on truncation."""

    def __init__(self, f: BinaryIO, end: int) -> None:
        self.f = f
        self.end = end

    @property
    def pos(self) -> int:
        return self.f.tell()

    def exact(self, n: int) -> bytes:
        if n > self.end - self.pos:
            raise DeltaError("delta truncated: a record runs past the end of the delta")
        data = self.f.read(n)
        if len(data) != n:
            raise DeltaError("delta truncated while reading a record")
        return data

    def u8(self) -> int:
        return self.exact(1)[0]

    def varint(self) -> int:
        n = 0
        for shift in range(0, 63, 7):
            b = self.u8()
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                if n > MAX_VARINT:
                    break
                return n
        raise DeltaError("delta corrupt: an integer field is too long")

    def skip(self, n: int) -> None:
        if n > self.end - self.pos:
            raise DeltaError("delta truncated: a payload runs past the end of the delta")
        self.f.seek(n, 1)


class Bounded:
    """A read-only file view of `length` bytes from `offset`: what a zstd reader may consume."""

    def __init__(self, f: BinaryIO, offset: int, length: int) -> None:
        self.f = f
        self.offset = offset
        self.left = length

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            n = self.left
        if n == 0:
            return b""
        self.f.seek(self.offset)
        data = self.f.read(n)
        self.offset += len(data)
        self.left -= len(data)
        return data


@dataclass(frozen=True)
class Record:
    """One decoded record without its payload: where the payload lies, if any."""

    op: Op
    length: int  # output bytes, or dictionary ranges for DICT
    old_offset: int = 0
    transform: Transform = Transform.RAW
    width: int = 1
    payload_offset: int = 0
    payload_len: int = 0
    count: int = 0  # BSDIFF: control triples
    parts: tuple[tuple[int, int], ...] = ()  # BSDIFF: (offset, length) of its control, diff and extra frames


def read_record(r: Reader) -> Record:
    """Parse one record, leaving the reader after its payload (DICT ranges are left to the caller)."""
    code = r.u8()
    try:
        op = Op(code)
    except ValueError:
        raise DeltaError(
            f"delta uses unknown record op {code}: it was made by a newer encoder or is corrupt;"
            " update edgefleet on this device, or send the full package"
        ) from None
    if op is Op.DICT:
        count = r.varint()
        if count > MAX_DICT_RANGES:
            raise DeltaError(f"delta declares {count} dictionary ranges, over the limit {MAX_DICT_RANGES}")
        return Record(op, count, payload_offset=r.pos)
    if op is Op.GAPSTREAM:
        n = r.varint()
        rec = Record(op, 0, payload_offset=r.pos, payload_len=n)
        r.skip(n)
        return rec
    if op is Op.GAP:
        return Record(op, r.varint())
    if op is Op.COPY:
        return Record(op, r.varint(), old_offset=r.varint())
    if op is Op.BSDIFF:
        length, count, t_code = r.varint(), r.varint(), r.u8()
        if t_code not in BSDIFF_DIFF_CODINGS:
            raise DeltaError(
                f"delta corrupt: a bsdiff diff block coded as {t_code}, not 0 (RAW) or 4 (SPARSE)"
            )
        parts = []
        for _ in range(3):
            n = r.varint()
            parts.append((r.pos, n))
            r.skip(n)
        return Record(op, length, transform=Transform(t_code), count=count, parts=tuple(parts))
    t_code, width = r.u8(), r.u8()
    try:
        transform = Transform(t_code)
    except ValueError:
        raise DeltaError(
            f"delta uses unknown tensor transform {t_code}: it was made by a newer encoder or is corrupt;"
            " update edgefleet on this device, or send the full package"
        ) from None
    if width not in WIDTHS:
        raise DeltaError(f"delta corrupt: element width {width} is not one of {WIDTHS}")
    if transform is Transform.FPLANES and width == 1:
        raise DeltaError("delta corrupt: FPLANES needs elements of 2, 4 or 8 bytes, the record says 1")
    length = r.varint()
    old_offset = r.varint() if transform in BASED else 0
    n = r.varint()
    rec = Record(op, length, old_offset, transform, width, r.pos, n)
    r.skip(n)
    return rec


def tensor_record(transform: Transform, width: int, length: int, old_offset: int, payload: bytes) -> bytes:
    head = bytes([Op.TENSOR, transform, width]) + varint(length)
    if transform in BASED:
        head += varint(old_offset)
    return head + varint(len(payload)) + payload


def bsdiff_record(
    length: int, count: int, diff_coding: Transform, control: bytes, diff: bytes, extra: bytes
) -> bytes:
    """A BSDIFF record: the target's length, the triple count, how the diff block is coded (RAW
    or SPARSE), then three zstd frames: control, diff, extra."""
    head = bytes([Op.BSDIFF]) + varint(length) + varint(count) + bytes([diff_coding])
    return head + b"".join(varint(len(p)) + p for p in (control, diff, extra))
