"""The encoder: runs on the fleet, may hold both files in memory, and needs no `onnx` package."""

import hashlib
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from models.delta import bsdiff
from models.delta.apply import info
from models.delta.errors import DeltaError
from models.delta.format import (
    BASED,
    CHUNK_BYTES,
    PLANE_SPLIT,
    TRAILER_MAGIC,
    DeltaInfo,
    FileRef,
    Header,
    Kind,
    Limits,
    Op,
    Transform,
    bsdiff_record,
    tensor_record,
    varint,
)
from models.delta.onnx_scan import TensorSpan, find_external, find_initializers, layout_for
from models.delta.transforms import forward, sparse_coded_size

DEFAULT_LEVEL = 19
# Initializers smaller than this stay in the gap stream: a record of their own costs more.
MIN_TENSOR_BYTES = 256
# Chunks larger than this pick their transform at SELECT_LEVEL, then are coded once at the real level.
SELECT_ABOVE = 1024 * 1024
SELECT_LEVEL = 3
# zstd's largest minimum match. In a plane of exponents (~2.5 bits a byte), the optimal parser of
# levels 16+ takes 3-6 byte matches that cost more than Huffman-coded literals would: 39878 bytes
# for the sample CNN's largest exponent plane, 37390 with this (bench/delta/RESULTS.md). Tried
# beside the default, by size.
LITERAL_MIN_MATCH = 7


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
    fp: bool = False  # IEEE floats or unknown: FPLANES is worth a try


@dataclass(frozen=True)
class _Copy:
    """A run of the target equal to a run of the base: unchanged tensors and the bytes between them."""

    offset: int
    length: int
    old_offset: int


_Piece = _Gap | _Chunk | _Copy


def _window_log(size: int) -> int:
    return max(10, min(31, (max(size, 1) - 1).bit_length()))


def _compress(
    data: bytes, level: int, dictionary: bytes | None = None, *, planes: int = 1, literal: bool = False
) -> bytes:
    """One zstd frame of `data` that declares its size.

    `planes` > 1: `data` is that many byte planes of one size; each ends a zstd block, so no block
    (and its Huffman table) mixes the exponent plane with a mantissa plane. `literal`: matches of
    at least LITERAL_MIN_MATCH bytes only. Neither changes what a decoder needs.
    """
    if not dictionary:
        extra = {"min_match": LITERAL_MIN_MATCH} if literal else {}
        params = zstandard.ZstdCompressionParameters.from_level(
            level, source_size=len(data), write_checksum=0, write_content_size=1, **extra
        )
        cctx = zstandard.ZstdCompressor(compression_params=params)
        if planes <= 1 or len(data) % planes:
            return cctx.compress(data)
        step = len(data) // planes
        cobj = cctx.compressobj(size=len(data))
        parts = []
        for start in range(0, len(data), step):
            parts.append(cobj.compress(data[start : start + step]))
            parts.append(cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        parts.append(cobj.flush())
        return b"".join(parts)
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


def _digest(data: bytes, span: TensorSpan) -> tuple[int, int, bytes]:
    view = memoryview(data)[span.offset : span.offset + span.length]
    return span.length, span.width, hashlib.blake2b(view, digest_size=16).digest()


def _match(
    old: bytes, new: bytes, new_spans: list[TensorSpan], old_spans: list[TensorSpan]
) -> dict[TensorSpan, TensorSpan]:
    """For each target tensor, the base tensor to code it against, if any.

    First an identical tensor under any name (a re-export renames freely), then the same name with
    the same size and width, then, for what is left, same-size tensors paired in file order (a
    renamed and retrained tensor). A wrong pairing only costs size: the chunk coder falls back to
    coding the target alone when the base does not help.
    """
    by_content = {_digest(old, s): s for s in old_spans}
    by_name = {s.name: s for s in old_spans}
    pairs: dict[TensorSpan, TensorSpan] = {}
    for span in new_spans:
        same = by_content.get(_digest(new, span))
        named = by_name.get(span.name)
        if same is not None:
            pairs[span] = same
        elif named is not None and named.length == span.length and named.width == span.width:
            pairs[span] = named
    used = set(pairs.values())
    left_old: dict[tuple[int, int], list[TensorSpan]] = {}
    for s in old_spans:
        if s not in used:
            left_old.setdefault((s.length, s.width), []).append(s)
    for span in new_spans:
        queue = left_old.get((span.length, span.width))
        if span not in pairs and queue:
            pairs[span] = queue.pop(0)
    return pairs


def _plan(old: bytes, new: bytes, new_spans: list[TensorSpan], old_spans: list[TensorSpan]) -> list[_Piece]:
    """The target as gaps and tensor chunks, in file order."""
    pairs = _match(old, new, new_spans, old_spans)
    pieces: list[_Piece] = []
    pos = 0
    for span in new_spans:
        if span.offset > pos:
            pieces.append(_Gap(pos, span.offset - pos))
        base = pairs.get(span)
        step = CHUNK_BYTES - CHUNK_BYTES % span.width
        for start in range(0, span.length, step):
            n = min(step, span.length - start)
            old_offset = base.offset + start if base is not None else None
            pieces.append(_Chunk(span.offset + start, n, span.width, old_offset, span.fp))
        pos = span.offset + span.length
    if pos < len(new):
        pieces.append(_Gap(pos, len(new) - pos))
    return pieces


def _merge_copies(old: bytes, new: bytes, pieces: list[_Piece]) -> list[_Piece]:
    """Unchanged chunks, and the gaps between them that equal the base's bytes there, as one run.

    A re-export or a partial fine-tune keeps most tensors and their protobuf framing: one COPY
    then costs a few bytes where a COPY per chunk plus a GAP per framing would cost a few hundred.
    """
    out: list[_Piece] = []
    run: _Copy | None = None
    for p in pieces:
        if isinstance(p, _Chunk):
            same = p.old_offset is not None and (
                new[p.offset : p.offset + p.length] == old[p.old_offset : p.old_offset + p.length]
            )
            if same and run is not None and p.old_offset == run.old_offset + run.length:
                run = _Copy(run.offset, run.length + p.length, run.old_offset)
                continue
            if same and p.old_offset is not None:
                if run is not None:
                    out.append(run)
                run = _Copy(p.offset, p.length, p.old_offset)
                continue
        elif isinstance(p, _Gap) and run is not None:
            at = run.old_offset + run.length
            if new[p.offset : p.offset + p.length] == old[at : at + p.length]:
                run = _Copy(run.offset, run.length + p.length, run.old_offset)
                continue
        if run is not None:
            out.append(run)
            run = None
        out.append(p)
    if run is not None:
        out.append(run)
    return out


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
        if chunk.fp:
            options.append(Transform.FPLANES)
    if base is not None:
        options += [Transform.XOR, Transform.SUB]
        # Apply lets SPARSE hold at most the chunk's length (see transforms.join_into).
        if sparse_coded_size(data, base, chunk.width) < chunk.length:
            options.append(Transform.SPARSE)
    coded = {t: forward(t, chunk.width, data, base) for t in options}
    if len(options) > 1 and chunk.length > SELECT_ABOVE and level > SELECT_LEVEL:
        best = min(options, key=lambda t: len(_compress(coded[t], SELECT_LEVEL)))
        payloads = {best: _compress(coded[best], level)}
    else:
        payloads = {t: _compress(coded[t], level) for t in options}
    best = min(payloads, key=lambda t: len(payloads[t]))
    payload = payloads[best]
    # The winner once more with its planes in blocks of their own and long matches only, kept if
    # smaller. Large chunks coded against a base seldom gain (0.07 % on the MiniLM fine-tune) for
    # a second pass at the full level; chunks coded alone gain 0.4-1.5 % (bench/delta/RESULTS.md).
    if chunk.length <= SELECT_ABOVE or best not in BASED:
        planes = chunk.width if best in PLANE_SPLIT else 1
        payload = min(payload, _compress(coded[best], level, planes=planes, literal=True), key=len)
    return tensor_record(best, chunk.width, chunk.length, chunk.old_offset or 0, payload)


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
    pieces = _merge_copies(old, new, _plan(old, new, new_spans, old_spans))
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
        if isinstance(p, _Gap):
            records.extend(_split(Op.GAP, p.length))
        elif isinstance(p, _Copy):
            records.extend(_split(Op.COPY, p.length, p.old_offset))
        else:
            records.append(coded[p])
    return _Body(records, dict_bytes, len(gap_stream), window)


def _whole_file_planes(old: bytes, new: bytes, width: int, level: int, threads: int) -> _Body:
    """The target alone, cut into chunks, byte planes split: for a base that does not help."""
    del old  # the same signature as _aligned, which does use it
    span = TensorSpan("", 0, len(new) - len(new) % width, width, fp=True)  # type unknown: size decides
    return _body(b"", new, [span] if span.length else [], [], level, threads)


def _same_layout(old: bytes, new: bytes) -> bool:
    """Files of (nearly) one size: likely the same structure with values changed in place."""
    return bool(old) and abs(len(old) - len(new)) <= len(new) // 100


def _aligned(old: bytes, new: bytes, width: int, level: int, threads: int) -> _Body:
    """The target's bytes coded against the base's at the same offsets (an unparsed model retrained
    in place: a .tflite, an int8 blob), chunk by chunk, like a tensor; the tail is a gap."""
    n = min(len(old), len(new))
    n -= n % width
    spans = [TensorSpan("", 0, n, width, fp=True)] if n else []  # type unknown: size decides
    return _body(old, new, spans, spans, level, threads)


def _patch_from(old: bytes, new: bytes, width: int, level: int, threads: int) -> _Body:
    """The target as one gap stream with the whole base as dictionary: zstd --patch-from."""
    del width  # the same signature as the others
    return _body(old, new, [], [], level, threads)


def _bsdiff(blocks: bsdiff.Blocks, length: int, level: int) -> _Body:
    """The target as one BSDIFF record: bsdiff's three blocks, each one zstd frame; the diff block
    as it is or, where smaller, only its non-zero bytes (SPARSE: 18 % smaller on a numpy release's
    library, where a few bytes of every moved call change; larger where changes cluster)."""
    diff_frames = {Transform.RAW: _compress(blocks.diff, level)}
    nonzero = int(np.count_nonzero(np.frombuffer(blocks.diff, np.uint8)))
    if 4 + 5 * nonzero < len(blocks.diff):  # apply lets SPARSE hold at most the block's length
        sparse = forward(Transform.SPARSE, 1, blocks.diff, bytes(len(blocks.diff)))
        diff_frames[Transform.SPARSE] = _compress(sparse, level)
    coding = min(diff_frames, key=lambda t: len(diff_frames[t]))
    control, extra = _compress(blocks.control(), level), _compress(blocks.extra, level)
    record = bsdiff_record(length, blocks.count, coding, control, diff_frames[coding], extra)
    return _Body([record], 0, 0, _window_log(CHUNK_BYTES))


def _binary(old: bytes, new: bytes, level: int, threads: int) -> _Body:
    """The smallest of the ways to code a file that is not ONNX (see docs/delta-format.md).

    Large files try every way at SELECT_LEVEL and code only the winner at `level`.
    """
    ways: list[Callable[[int], _Body]] = [
        lambda lv: _patch_from(old, new, 1, lv, threads),
        lambda lv: _whole_file_planes(old, new, 4, lv, threads),
        lambda lv: _whole_file_planes(old, new, 2, lv, threads),
    ]
    if _same_layout(old, new):
        ways += [lambda lv: _aligned(old, new, 4, lv, threads), lambda lv: _aligned(old, new, 1, lv, threads)]
    # Apply holds base and target whole for a BSDIFF record: only files within one segment get one.
    blocks = bsdiff.diff(old, new, CHUNK_BYTES)
    if blocks is not None:
        ways.append(lambda lv: _bsdiff(blocks, len(new), lv))
    trial = SELECT_LEVEL if level > SELECT_LEVEL and len(new) > SELECT_ABOVE else level
    bodies = [make(trial) for make in ways]
    best = min(range(len(bodies)), key=lambda i: bodies[i].size)
    if trial == level:
        return bodies[best]
    return ways[best](level)


def _spans(path: Path, data: bytes, layout: Path | None) -> list[TensorSpan]:
    """Where the tensors lie in `data`: its own initializers, or those an ONNX layout file keeps in it."""
    if layout is None:
        spans = find_initializers(data, MIN_TENSOR_BYTES)
        if spans:
            return spans
        layout = layout_for(path)
        if layout is None:
            return []
        explicit = False
    else:
        explicit = True
    try:
        graph = layout.read_bytes()
    except OSError as e:
        raise DeltaError(f"cannot read the layout {layout}: {e.strerror}") from None
    location = os.path.relpath(path.resolve(), layout.resolve().parent).replace(os.sep, "/")
    spans = find_external(graph, location, len(data), MIN_TENSOR_BYTES)
    if explicit and not spans:
        raise DeltaError(
            f"{layout} keeps no initializers in {location}: pass the ONNX file whose external data "
            f"{path.name} is, or no layout"
        )
    return spans


def encode(
    old: Path,
    new: Path,
    out: Path,
    level: int = DEFAULT_LEVEL,
    *,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    old_layout: Path | None = None,
    new_layout: Path | None = None,
) -> DeltaInfo:
    """Write a delta that turns `old` into `new`, atomically, at `out`; return what it holds.

    ONNX files are coded tensor by tensor. So are ONNX external data files: their layout is the
    ONNX file that names them (`old_layout`/`new_layout`, or the one `.onnx` beside them that does).
    """
    if not -131072 <= level <= 22:
        raise DeltaError(f"zstd level {level} is outside -131072..22")
    try:
        old_bytes, new_bytes = old.read_bytes(), new.read_bytes()
    except OSError as e:
        raise DeltaError(f"cannot read {e.filename}: {e.strerror}") from None
    workers = threads or min(8, os.cpu_count() or 1)
    say = progress or (lambda _: None)
    new_spans = _spans(new, new_bytes, new_layout)
    old_spans = _spans(old, old_bytes, old_layout)
    kind = Kind.ONNX if new_spans else Kind.BINARY
    if old_bytes == new_bytes:
        body = _Body(_split(Op.COPY, len(new_bytes), 0), 0, 0, _window_log(CHUNK_BYTES))
    else:
        say(f"{kind}: {len(new_spans)} tensors in the target, {len(old_spans)} in the base")
        if kind == Kind.ONNX:
            body = _body(old_bytes, new_bytes, new_spans, old_spans, level, workers)
        else:
            body = _binary(old_bytes, new_bytes, level, workers)
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
