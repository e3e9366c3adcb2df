"""The decoder: `apply` and `info`. Runs on devices: no `onnx`, bounded memory, nothing half-written.

Before decoding, the delta's trailer hash, its header and the base file's sha256 are checked; while
decoding, every record is checked against the header's sizes and limits; a tensor's zstd frame
must declare its size and is decoded in one shot into a buffer of that size, the gap stream is
read through a capped reader, so a crafted delta can neither expand without bound nor write
outside the declared target size. The output is written to a temp file beside `out`, fsynced, and
renamed into place only if its sha256 is the header's.
"""

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, BinaryIO, cast

import zstandard

from models.delta import bsdiff
from models.delta.errors import DeltaError
from models.delta.format import (
    BASED,
    CHUNK_BYTES,
    TRAILER_LEN,
    TRAILER_MAGIC,
    Bounded,
    DeltaInfo,
    Header,
    Op,
    Reader,
    Record,
    Transform,
    parse_header,
    read_record,
)
from models.delta.transforms import combine, join_into
from models.fsutil import fsync_dir

DEFAULT_MAX_OUTPUT = 4 * 1024 * 1024 * 1024
_BLOCK = 1024 * 1024


def _compress_bound(n: int) -> int:
    return n + (n >> 7) + 1024


def _window_limit(header: Header) -> int:
    """The largest window log the header's own sizes justify."""
    need = max(CHUNK_BYTES, header.dict_bytes + header.gap_bytes, 1)
    return max(10, min(31, (need - 1).bit_length()))


def _verify_trailer(f: BinaryIO) -> int:
    """Check the trailer's sha256 over the whole delta; return where the trailer starts."""
    size = f.seek(0, os.SEEK_END)
    if size < TRAILER_LEN:
        raise DeltaError("delta truncated: shorter than its trailer")
    end = size - TRAILER_LEN
    f.seek(0)
    digest, left = hashlib.sha256(), end
    while left:
        block = f.read(min(_BLOCK, left))
        if not block:
            raise DeltaError("delta truncated while hashing")
        digest.update(block)
        left -= len(block)
    trailer = f.read(TRAILER_LEN)
    if trailer[: len(TRAILER_MAGIC)] != TRAILER_MAGIC:
        raise DeltaError("delta truncated or corrupt: no trailer at its end")
    if trailer[len(TRAILER_MAGIC) :] != digest.digest():
        raise DeltaError("delta corrupt: its sha256 does not match its trailer")
    f.seek(0)
    return end


def _open(f: BinaryIO, max_output: int) -> tuple[Header, Reader]:
    end = _verify_trailer(f)
    header = parse_header(f)
    if header.target.size > max_output:
        raise DeltaError(f"delta declares a {header.target.size}-byte output, over the limit of {max_output}")
    if header.dict_bytes > header.base.size or header.gap_bytes > header.target.size:
        raise DeltaError("delta corrupt: its dictionary or gap stream is larger than the files it links")
    if header.limits.window_log > _window_limit(header):
        raise DeltaError(f"delta declares a zstd window of 2^{header.limits.window_log}, more than it needs")
    return header, Reader(f, end)


def _records(r: Reader, header: Header, on_range: Callable[[int, int], None]) -> Iterator[Record]:
    """Every record, checked against the header: order, ranges, sizes; DICT ranges go to on_range."""
    out = gaps = dict_bytes = 0
    seen_stream = False
    for index in range(header.records):
        rec = read_record(r)
        if rec.op is Op.DICT:
            if index != 0:
                raise DeltaError("delta corrupt: the dictionary record is not the first")
            for _ in range(rec.length):
                offset, length = r.varint(), r.varint()
                dict_bytes += length
                if offset + length > header.base.size or dict_bytes > header.dict_bytes:
                    raise DeltaError("delta corrupt: a dictionary range lies outside the base")
                on_range(offset, length)
            if dict_bytes != header.dict_bytes:
                raise DeltaError("delta corrupt: the dictionary is not the size its header declares")
            yield rec
            continue
        if rec.op is Op.GAPSTREAM:
            if seen_stream or out:
                raise DeltaError("delta corrupt: the gap stream is not before the output records")
            if header.dict_bytes and dict_bytes != header.dict_bytes:
                raise DeltaError("delta corrupt: the dictionary record is missing")
            seen_stream = True
            yield rec
            continue
        if rec.length > header.limits.max_segment_bytes:
            raise DeltaError(f"delta corrupt: a {rec.length}-byte record exceeds its declared limit")
        if rec.op is Op.BSDIFF:
            _check_bsdiff(rec, header, index)
        out += rec.length
        if out > header.target.size:
            raise DeltaError("delta corrupt: its records produce more than the declared target size")
        if rec.op is Op.GAP:
            gaps += rec.length
            if not seen_stream or gaps > header.gap_bytes:
                raise DeltaError("delta corrupt: a gap record reads past the gap stream")
        elif (rec.op is Op.COPY or (rec.op is Op.TENSOR and rec.transform in BASED)) and (
            rec.old_offset + rec.length > header.base.size
        ):
            raise DeltaError("delta corrupt: a record reads past the end of the base")
        if rec.op is Op.TENSOR:
            if rec.length % rec.width:
                raise DeltaError("delta corrupt: a tensor is not a whole number of elements")
            if rec.payload_len > _compress_bound(rec.length):
                raise DeltaError("delta corrupt: a tensor payload is larger than its content could need")
        yield rec
    if r.pos != r.end:
        raise DeltaError("delta corrupt: bytes after its last record")
    if out != header.target.size or gaps != header.gap_bytes:
        raise DeltaError("delta truncated: its records do not add up to the declared sizes")


def _check_bsdiff(rec: Record, header: Header, index: int) -> None:
    """A BSDIFF record holds base, target and control in memory: refuse it before anything is read
    unless it is the delta's only record and each of them is within the declared segment limit."""
    limit = header.limits.max_segment_bytes
    if index != 0 or header.records != 1 or header.dict_bytes or header.gap_bytes:
        raise DeltaError("delta corrupt: a bsdiff record must be the delta's only record")
    if header.base.size > limit:
        raise DeltaError(
            f"delta corrupt: its bsdiff record needs the whole {header.base.size}-byte base in memory,"
            f" over its declared limit of {limit} bytes"
        )
    control = bsdiff.TRIPLE_BYTES * rec.count
    if control > limit:
        raise DeltaError(
            f"delta corrupt: a bsdiff control block of {rec.count} triples exceeds its declared limit"
        )
    bounds = (control, rec.length, rec.length)
    if any(n > _compress_bound(b) for (_, n), b in zip(rec.parts, bounds, strict=True)):
        raise DeltaError("delta corrupt: a bsdiff payload is larger than its content could need")


def info(delta: Path) -> DeltaInfo:
    """Check a delta's structure (not against a base) and say what it holds."""
    try:
        with delta.open("rb") as f:
            header, r = _open(f, max_output=1 << 63)
            by: dict[str, int] = {}
            for rec in _records(r, header, lambda _o, _n: None):
                if rec.op in (Op.GAP, Op.COPY):
                    key = rec.op.name.lower()
                elif rec.op is Op.TENSOR:
                    key = rec.transform.name.lower()
                elif rec.op is Op.BSDIFF:
                    key = "bsdiff"
                else:
                    continue
                by[key] = by.get(key, 0) + rec.length
            size = r.end + TRAILER_LEN
    except OSError as e:
        raise DeltaError(f"cannot read {delta}: {e.strerror}") from None
    return DeltaInfo(
        kind=header.kind,
        base_sha256=header.base.sha256,
        base_size=header.base.size,
        target_sha256=header.target.sha256,
        target_size=header.target.size,
        delta_size=size,
        records=header.records,
        dict_bytes=header.dict_bytes,
        gap_bytes=header.gap_bytes,
        level=header.level,
        target_bytes_by=by,
    )


def _read_exact(reader: IO[bytes] | zstandard.ZstdDecompressionReader, n: int, what: str) -> bytes:
    """Exactly n bytes (callers bound n by CHUNK_BYTES); one read when the source gives them at once."""
    first = reader.read(n)
    if len(first) == n:
        return first
    parts, left = [first], n - len(first)
    while left:
        block = reader.read(min(_BLOCK, left))
        if not block:
            raise DeltaError(f"delta corrupt: {what} ends early")
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


def _frame_size(frame: bytes) -> int:
    """The length of the zstd frame at the start of `frame` (walking its block headers), or -1."""
    pos = zstandard.frame_header_size(frame)
    while pos + 3 <= len(frame):
        head = int.from_bytes(frame[pos : pos + 3], "little")
        last, kind, size = head & 1, (head >> 1) & 3, head >> 3
        if kind == 3:  # reserved
            return -1
        pos += 3 + (1 if kind == 1 else size)
        if last:
            return pos + (4 if frame[4] & 0x04 else 0)  # the frame's optional checksum
    return -1


def _tensor_frame(
    dctx: zstandard.ZstdDecompressor, payload: bytes, length: int, exact: bool = True, what: str = "tensor"
) -> bytes:
    """Decode a TENSOR (or BSDIFF) payload: exactly one zstd frame that declares exactly `length`
    bytes (or at most `length`, when not `exact`).

    Decoded in one shot into a buffer of the declared size (no stream window beside it), so a
    chunk costs its payload and its output, and a frame cannot expand past what its record says.
    """
    try:
        declared = zstandard.get_frame_parameters(payload).content_size
    except zstandard.ZstdError:
        raise DeltaError(f"delta corrupt: a {what} payload is not a zstd frame") from None
    if declared == zstandard.CONTENTSIZE_UNKNOWN:
        raise DeltaError(f"delta corrupt: a {what} frame does not declare its decoded size")
    if declared > length or (exact and declared != length):
        raise DeltaError(f"delta corrupt: a {what} frame holds {declared} bytes, its record says {length}")
    if _frame_size(payload) != len(payload):
        raise DeltaError(f"delta corrupt: a {what} payload is not exactly one zstd frame")
    data = dctx.decompress(payload, max_output_size=length)
    if len(data) != declared:
        raise DeltaError(f"delta corrupt: a {what} frame decodes to less than it declares")
    return data


def _check_base(old: BinaryIO, header: Header) -> None:
    digest, size = hashlib.sha256(), 0
    while block := old.read(_BLOCK):
        digest.update(block)
        size += len(block)
    if size != header.base.size or digest.hexdigest() != header.base.sha256:
        raise DeltaError(
            f"delta was built from another base: it needs sha256 {header.base.sha256[:16]}... "
            f"({header.base.size} bytes), the base given has {digest.hexdigest()[:16]}... ({size} bytes)"
        )


def _frame_at(
    f: BinaryIO, dctx: zstandard.ZstdDecompressor, part: tuple[int, int], length: int, exact: bool = True
) -> bytes:
    f.seek(part[0])
    payload = _read_exact(f, part[1], "a bsdiff payload")
    return _tensor_frame(dctx, payload, length, exact, what="bsdiff")


def _bsdiff(
    old: BinaryIO, f: BinaryIO, dctx: zstandard.ZstdDecompressor, header: Header, rec: Record
) -> Iterator[memoryview]:
    """A BSDIFF record's output, front to back: the control block checked (lengths add up, every
    base range inside the base) before the base is read, then the diff and extra blocks, each a
    frame that must declare exactly the size the control block implies."""
    control = _frame_at(f, dctx, rec.parts[0], bsdiff.TRIPLE_BYTES * rec.count)
    x, y, z = bsdiff.parse_control(control, rec.count)
    del control
    oldpos = bsdiff.check(x, y, z, header.base.size, rec.length)
    del z
    diff_len = int(x.sum())
    coded = _frame_at(f, dctx, rec.parts[1], diff_len, exact=rec.transform is Transform.RAW)
    # SPARSE: only the non-zero bytes, scattered back among zeros
    diff_block = coded if rec.transform is Transform.RAW else join_into(Transform.SPARSE, 1, coded, diff_len)
    del coded
    extra = _frame_at(f, dctx, rec.parts[2], int(y.sum()))
    old.seek(0)
    base = _read_exact(old, header.base.size, "the base")
    yield from bsdiff.patch(base, x, y, oldpos, diff_block, extra)


def _decode(old: BinaryIO, f: BinaryIO, aux: BinaryIO, header: Header, r: Reader, sink: IO[bytes]) -> str:
    """Write the target into `sink`, returning its sha256."""
    window = 1 << header.limits.window_log
    plain = zstandard.ZstdDecompressor(max_window_size=window)
    dictionary = bytearray()

    def add_range(offset: int, length: int) -> None:
        old.seek(offset)
        dictionary.extend(_read_exact(old, length, "the base"))

    digest = hashlib.sha256()
    gap_reader: zstandard.ZstdDecompressionReader | None = None
    data: bytes | memoryview
    for rec in _records(r, header, add_range):
        if rec.op is Op.DICT:
            continue
        if rec.op is Op.GAPSTREAM:
            # A stream reader of its own: `plain` decodes tensor frames in between.
            dctx = zstandard.ZstdDecompressor(max_window_size=window)
            if dictionary:
                raw = zstandard.DICT_TYPE_RAWCONTENT
                zdict = zstandard.ZstdCompressionDict(bytes(dictionary), dict_type=raw)
                dctx = zstandard.ZstdDecompressor(dict_data=zdict, max_window_size=window)
            source = cast(IO[bytes], Bounded(aux, rec.payload_offset, rec.payload_len))
            gap_reader = dctx.stream_reader(source, read_across_frames=False)
            continue
        if rec.op is Op.BSDIFF:
            for piece in _bsdiff(old, f, plain, header, rec):
                digest.update(piece)
                sink.write(piece)
            offset, length = rec.parts[-1]
            f.seek(offset + length)  # the record's end, where _records reads on
            continue
        if rec.op is Op.GAP:
            assert gap_reader is not None  # _records checked the order
            data = _read_exact(gap_reader, rec.length, "the gap stream")
        elif rec.op is Op.COPY:
            old.seek(rec.old_offset)
            data = _read_exact(old, rec.length, "the base")
        else:
            f.seek(rec.payload_offset)
            payload = _read_exact(f, rec.payload_len, "a tensor payload")
            # SPARSE holds fewer bytes than it writes; every other transform exactly as many
            coded = _tensor_frame(plain, payload, rec.length, exact=rec.transform is not Transform.SPARSE)
            del payload
            f.seek(r.pos)
            data = join_into(rec.transform, rec.width, coded, rec.length)
            del coded  # at most two chunk-sized buffers at once: see join_into
            if rec.transform in BASED:
                old.seek(rec.old_offset)
                data = combine(rec.transform, rec.width, data, _read_exact(old, rec.length, "the base"))
        digest.update(data)
        sink.write(data)
        del data
    if gap_reader is not None and gap_reader.read(1):
        raise DeltaError("delta corrupt: the gap stream is longer than its header declares")
    return digest.hexdigest()


def apply(old: Path, delta: Path, out: Path, max_output: int = DEFAULT_MAX_OUTPUT) -> None:
    """Rebuild the target from `old` and `delta` at `out`; on any error nothing is left at `out`."""
    tmp: str | None = None
    try:
        with delta.open("rb") as f, delta.open("rb") as aux, old.open("rb") as base:
            header, r = _open(f, max_output)
            _check_base(base, header)
            fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as sink:
                sha = _decode(base, f, aux, header, r, sink)
                if sha != header.target.sha256:
                    raise DeltaError("delta output does not match the sha256 its header declares")
                sink.flush()
                os.fsync(sink.fileno())
        os.replace(tmp, out)
        tmp = None
        fsync_dir(out.parent)
    except zstandard.ZstdError as e:
        raise DeltaError(f"delta corrupt: zstd says {e}") from None
    except OSError as e:
        raise DeltaError(f"cannot apply the delta: {e.strerror}: {e.filename}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
