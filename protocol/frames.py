"""The binary chunk frame that carries update payloads on `<id>/cmd/chunk`.

Layout: magic `EFC1`, a big-endian u32 header length, a JSON header, then the chunk bytes.
The header carries the chunk's sha256 so each chunk is checked as it arrives; the whole artifact
is still checked against the signed metadata before anything uses it.

When the fleet cannot read a chunk it asked for (its artifact store lost the object, or cannot be
reached), it answers with the same frame carrying no bytes and a header of `update_id`, `offset`,
`unavailable` (why) and `retry_after_s` (null: it will not come; ask no more). A device that does
not know this answer drops it as malformed and times out, as before it existed.
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


MAX_REASON = 500


@dataclass(frozen=True)
class Chunk:
    update_id: str
    offset: int
    total: int
    data: bytes


@dataclass(frozen=True)
class ChunkUnavailable:
    """The fleet's answer for a chunk it cannot read."""

    update_id: str
    offset: int
    reason: str
    retry_after_s: float | None  # None: it will not come, the update cannot finish as offered


def encode_chunk_unavailable(answer: ChunkUnavailable) -> bytes:
    header = json.dumps(
        {
            "update_id": answer.update_id,
            "offset": answer.offset,
            "unavailable": answer.reason[:MAX_REASON],
            "retry_after_s": answer.retry_after_s,
        },
        separators=(",", ":"),
    ).encode()
    return _PREFIX.pack(MAGIC, len(header)) + header


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
    """Parse and check one frame; raise ProtocolError on anything short, oversized or corrupt, and on
    an unavailable answer (see `decode_chunk_answer` for where one is expected)."""
    answer = decode_chunk_answer(frame)
    if isinstance(answer, ChunkUnavailable):
        raise ProtocolError(f"chunk at offset {answer.offset} is unavailable: {answer.reason}")
    return answer


def decode_chunk_answer(frame: bytes) -> Chunk | ChunkUnavailable:
    """A chunk, or the fleet's word that it cannot read it; ProtocolError on anything malformed."""
    if len(frame) < _PREFIX.size:
        raise ProtocolError(f"chunk frame of {len(frame)} bytes is shorter than its prefix")
    magic, header_len = _PREFIX.unpack_from(frame)
    if magic != MAGIC:
        raise ProtocolError(f"chunk frame has magic {magic!r}, expected {MAGIC!r}")
    if header_len > MAX_HEADER or _PREFIX.size + header_len > len(frame):
        raise ProtocolError(f"chunk header length {header_len} is out of bounds")
    try:
        header = json.loads(frame[_PREFIX.size : _PREFIX.size + header_len])
        update_id, offset = str(header["update_id"]), int(header["offset"])
        if "unavailable" in header:
            return _unavailable(header, update_id, offset, len(frame) - _PREFIX.size - header_len)
        total, length, digest = int(header["total"]), int(header["length"]), str(header["sha256"])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ProtocolError(f"chunk header is not valid ({e!r})") from e
    data = frame[_PREFIX.size + header_len :]
    if length != len(data) or length > MAX_CHUNK:
        raise ProtocolError(f"chunk declares {length} bytes but carries {len(data)}")
    if offset < 0 or total < 0 or offset + length > total:
        raise ProtocolError(f"chunk range {offset}+{length} lies outside the artifact size {total}")
    if hashlib.sha256(data).hexdigest() != digest:
        raise ProtocolError(f"chunk at offset {offset} is corrupt: sha256 does not match its header")
    return Chunk(update_id=update_id, offset=offset, total=total, data=data)


def _unavailable(header: dict[str, object], update_id: str, offset: int, trailing: int) -> ChunkUnavailable:
    reason, retry = header["unavailable"], header.get("retry_after_s")
    if not isinstance(reason, str) or trailing:
        raise ProtocolError("an unavailable-chunk answer carries a reason string and no bytes")
    if retry is not None and (
        isinstance(retry, bool) or not isinstance(retry, int | float) or not 0 <= retry <= 3600
    ):
        raise ProtocolError(f"retry_after_s {retry!r} is not a number of seconds within 0..3600")
    return ChunkUnavailable(
        update_id, offset, reason[:MAX_REASON], float(retry) if retry is not None else None
    )
