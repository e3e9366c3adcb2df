"""The binary chunk frame that carries update payloads on `<id>/cmd/chunk`.

Layout: magic `EFC1`, a big-endian u32 header length, a JSON header, then the chunk bytes.
The header carries the chunk's sha256 so each chunk is checked as it arrives; the whole artifact
is still checked against the signed metadata before anything uses it.
"""

import hashlib
import json
import struct
from dataclasses import dataclass

from protocol.errors import ProtocolError

MAGIC = b"EFC1"
MAX_HEADER = 4096
MAX_CHUNK = 4 * 1024 * 1024
_PREFIX = struct.Struct(">4sI")


@dataclass(frozen=True)
class Chunk:
    update_id: str
    offset: int
    total: int
    data: bytes


def encode_chunk(chunk: Chunk) -> bytes:
    header = json.dumps(
        {
            "update_id": chunk.update_id,
            "offset": chunk.offset,
            "total": chunk.total,
            "length": len(chunk.data),
            "sha256": hashlib.sha256(chunk.data).hexdigest(),
        },
        separators=(",", ":"),
    ).encode()
    return _PREFIX.pack(MAGIC, len(header)) + header + chunk.data


def decode_chunk(frame: bytes) -> Chunk:
    """Parse and check one frame; raise ProtocolError on anything short, oversized or corrupt."""
    if len(frame) < _PREFIX.size:
        raise ProtocolError(f"chunk frame of {len(frame)} bytes is shorter than its prefix")
    magic, header_len = _PREFIX.unpack_from(frame)
    if magic != MAGIC:
        raise ProtocolError(f"chunk frame has magic {magic!r}, expected {MAGIC!r}")
    if header_len > MAX_HEADER or _PREFIX.size + header_len > len(frame):
        raise ProtocolError(f"chunk header length {header_len} is out of bounds")
    try:
        header = json.loads(frame[_PREFIX.size : _PREFIX.size + header_len])
        update_id, offset, total = str(header["update_id"]), int(header["offset"]), int(header["total"])
        length, digest = int(header["length"]), str(header["sha256"])
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise ProtocolError(f"chunk header is not valid ({e!r})") from e
    data = frame[_PREFIX.size + header_len :]
    if length != len(data) or length > MAX_CHUNK:
        raise ProtocolError(f"chunk declares {length} bytes but carries {len(data)}")
    if offset < 0 or total < 0 or offset + length > total:
        raise ProtocolError(f"chunk range {offset}+{length} lies outside the artifact size {total}")
    if hashlib.sha256(data).hexdigest() != digest:
        raise ProtocolError(f"chunk at offset {offset} is corrupt: sha256 does not match its header")
    return Chunk(update_id=update_id, offset=offset, total=total, data=data)
