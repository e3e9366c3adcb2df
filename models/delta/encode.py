"""The encoder: runs on the fleet, may hold both files in memory, and needs no `onnx` package."""

import hashlib
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zstandard

from models.delta.apply import info
from models.delta.errors import DeltaError
from models.delta.format import (
    CHUNK_BYTES,
    TRAILER_MAGIC,
    DeltaInfo,
    FileRef,
    Header,
    Kind,
    Limits,
    Op,
    Transform,
    tensor_record,
    varint,
)
from models.delta.onnx_scan import TensorSpan, find_initializers
from models.delta.transforms import forward

DEFAULT_LEVEL = 19
# Initializers smaller than this stay in the gap stream: a record of their own costs more.
MIN_TENSOR_BYTES = 256
# Chunks larger than this pick their transform at SELECT_LEVEL, then are coded once at the real level.
SELECT_ABOVE = 1024 * 1024
SELECT_LEVEL = 3


@dataclass(frozen=True)
class _Gap:
    offset: int
    length: int


@dataclass(frozen=True)
class _Chunk:
    """A piece of a target tensor, with the base range of the same tensor if there is one."""

    offset: int
    length: int
    width: int
    old_offset: int | None


_Piece = _Gap | _Chunk


def _window_log(size: int) -> int:
    return max(10, min(31, (max(size, 1) - 1).bit_length()))


def _compress(data: bytes, level: int, dictionary: bytes | None = None) -> bytes:
    if not dictionary:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, source_size=len(data), write_checksum=0, write_content_size=1
        )
        return zstandard.ZstdCompressor(compression_params=params).compress(data)
    wlog = _window_log(len(dictionary) + len(data))
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=len(data),
        dict_size=len(dictionary),
        window_log=wlog,
        enable_ldm=int(wlog > 27),
        write_checksum=0,
        write_content_size=1,
        write_dict_id=0,
    )
    zdict = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(dict_data=zdict, compression_params=params).compress(data)


def _plan(new: bytes, new_spans: list[TensorSpan], old_spans: list[TensorSpan]) -> list[_Piece]:
    """The target as gaps and tensor chunks, in file order."""
    old_by_name = {s.name: s for s in old_spans}
    pieces: list[_Piece] = []
    pos = 0
    for span in new_spans:
        if span.offset > pos:
            pieces.append(_Gap(pos, span.offset - pos))
        old = old_by_name.get(span.name)
        matched = old is not None and old.length == span.length and old.width == span.width
        step = CHUNK_BYTES - CHUNK_BYTES % span.width
        for start in range(0, span.length, step):
            n = min(step, span.length - start)
            old_offset = old.offset + start if matched and old is not None else None
            pieces.append(_Chunk(span.offset + start, n, span.width, old_offset))
        pos = span.offset + span.length
    if pos < len(new):
        pieces.append(_Gap(pos, len(new) - pos))
    return pieces


def _dict_ranges(old: bytes, old_spans: list[TensorSpan]) -> list[tuple[int, int]]:
    """Ranges (offset, length) of the base that are not tensor data: the gap stream's dictionary."""
    ranges, pos = [], 0
    for span in old_spans:
        if span.offset > pos:
            ranges.append((pos, span.offset - pos))
        pos = span.offset + span.length
    if pos < len(old):
        ranges.append((pos, len(old) - pos))
    return ranges


def _code_chunk(new: bytes, old: bytes, chunk: _Chunk, level: int) -> bytes:
    """The cheapest TENSOR record (or COPY) for one chunk."""
    data = new[chunk.offset : chunk.offset + chunk.length]
    base = None
    if chunk.old_offset is not None:
        base = old[chunk.old_offset : chunk.old_offset + chunk.length]
        if base == data:
            return bytes([Op.COPY]) + varint(chunk.length) + varint(chunk.old_offset)
    options = [Transform.RAW]
    if chunk.width > 1:
        options.append(Transform.PLANES)
    if base is not None:
        options += [Transform.XOR, Transform.SUB]
    coded = {t: forward(t, chunk.width, data, base) for t in options}
    if len(options) > 1 and chunk.length > SELECT_ABOVE and level > SELECT_LEVEL:
        best = min(options, key=lambda t: len(_compress(coded[t], SELECT_LEVEL)))
        payloads = {best: _compress(coded[best], level)}
    else:
        payloads = {t: _compress(coded[t], level) for t in options}
    best = min(payloads, key=lambda t: len(payloads[t]))
    return tensor_record(best, chunk.width, chunk.length, chunk.old_offset or 0, payloads[best])


def _split(op: Op, length: int, offset: int | None = None) -> list[bytes]:
    """GAP or COPY records of at most CHUNK_BYTES each, so no record asks apply for more."""
    out = []
    for start in range(0, length, CHUNK_BYTES):
        n = min(CHUNK_BYTES, length - start)
        out.append(bytes([op]) + varint(n) + (b"" if offset is None else varint(offset + start)))
    return out


@dataclass
class _Body:
    records: list[bytes]
    dict_bytes: int
    gap_bytes: int
    window_log: int

    @property
    def size(self) -> int:
        return sum(len(r) for r in self.records)


def _body(
    old: bytes, new: bytes, new_spans: list[TensorSpan], old_spans: list[TensorSpan], level: int, threads: int
) -> _Body:
    pieces = _plan(new, new_spans, old_spans)
    gaps = [p for p in pieces if isinstance(p, _Gap)]
    gap_stream = b"".join(new[g.offset : g.offset + g.length] for g in gaps)
    ranges = _dict_ranges(old, old_spans)
    dictionary = b"".join(old[o : o + n] for o, n in ranges)
    head: list[bytes] = []
    window = _window_log(CHUNK_BYTES)
    dict_bytes = 0
    if gap_stream:
        plain = _compress(gap_stream, level)
        patched = _compress(gap_stream, level, dictionary) if dictionary else plain
        # The dictionary costs apply memory and reads of the base: take it only where it pays.
        if len(patched) + 64 < 0.99 * len(plain):
            table = b"".join(varint(o) + varint(n) for o, n in ranges)
            head.append(bytes([Op.DICT]) + varint(len(ranges)) + table)
            dict_bytes = len(dictionary)
            window = max(window, _window_log(len(dictionary) + len(gap_stream)))
            plain = patched
        head.append(bytes([Op.GAPSTREAM]) + varint(len(plain)) + plain)
    chunks = [p for p in pieces if isinstance(p, _Chunk)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        coded = dict(zip(chunks, pool.map(lambda c: _code_chunk(new, old, c, level), chunks), strict=True))
    records = head
    for p in pieces:
        records.extend(_split(Op.GAP, p.length) if isinstance(p, _Gap) else [coded[p]])
    return _Body(records, dict_bytes, len(gap_stream), window)


def _whole_file_planes(new: bytes, width: int, level: int, threads: int) -> _Body:
    """The target alone, cut into chunks, byte planes split: for a base that does not help."""
    span = TensorSpan("", 0, len(new) - len(new) % width, width)
    return _body(b"", new, [span] if span.length else [], [], level, threads)


def encode(
    old: Path,
    new: Path,
    out: Path,
    level: int = DEFAULT_LEVEL,
    *,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> DeltaInfo:
    """Write a delta that turns `old` into `new`, atomically, at `out`; return what it holds."""
    if not -131072 <= level <= 22:
        raise DeltaError(f"zstd level {level} is outside -131072..22")
    try:
        old_bytes, new_bytes = old.read_bytes(), new.read_bytes()
    except OSError as e:
        raise DeltaError(f"cannot read {e.filename}: {e.strerror}") from None
    workers = threads or min(8, os.cpu_count() or 1)
    say = progress or (lambda _: None)
    new_spans = find_initializers(new_bytes, MIN_TENSOR_BYTES)
    old_spans = find_initializers(old_bytes, MIN_TENSOR_BYTES)
    kind = Kind.ONNX if new_spans else Kind.BINARY
    if old_bytes == new_bytes:
        body = _Body(_split(Op.COPY, len(new_bytes), 0), 0, 0, _window_log(CHUNK_BYTES))
    else:
        say(f"{kind}: {len(new_spans)} tensors in the target, {len(old_spans)} in the base")
        body = _body(old_bytes, new_bytes, new_spans, old_spans, level, workers)
        if kind == Kind.BINARY:
            for width in (4, 2):
                alt = _whole_file_planes(new_bytes, width, level, workers)
                body = alt if alt.size < body.size else body
    header = Header(
        kind=kind,
        base=FileRef(sha256=hashlib.sha256(old_bytes).hexdigest(), size=len(old_bytes)),
        target=FileRef(sha256=hashlib.sha256(new_bytes).hexdigest(), size=len(new_bytes)),
        records=len(body.records),
        dict_bytes=body.dict_bytes,
        gap_bytes=body.gap_bytes,
        limits=Limits(max_segment_bytes=CHUNK_BYTES, window_log=body.window_log),
        level=level,
    )
    _write_atomic(out, [header.to_bytes(), *body.records])
    return info(out)


def _write_atomic(out: Path, parts: list[bytes]) -> None:
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                digest.update(part)
                f.write(part)
            f.write(TRAILER_MAGIC + digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
