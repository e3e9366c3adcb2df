"""BSDIFF records: bsdiff's control, diff and extra blocks, made by `bsdiff4` on the fleet, checked
and applied with numpy on devices (which need no `bsdiff4`).

bsdiff writes the target as a run of triples (x, y, z): x bytes of `diff + base` (bytewise, mod
256) from the base position `oldpos`, then y bytes of `extra` as they are, then `oldpos` moves by
x + z. Its approximate matches turn moved code and shifted pointers into runs of small diff
bytes, which zstd codes far better than `--patch-from`'s exact matches can.

The control block, as a BSDIFF record holds it: every x (u64), every y (u64), every z zigzagged
(u64), little-endian, byte planes split by 8: counts and offsets are small, so the high planes are
zeros. See docs/delta-format.md.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from models.delta.errors import DeltaError
from models.delta.transforms import join_planes, split_planes

# Bytes of control block per triple: x, y and z as u64.
TRIPLE_BYTES = 24
# The base and diff bytes are added this many at a time, into one scratch buffer.
_PIECE = 1 << 20
# Triples are turned into Python ints this many at a time.
_TRIPLES = 1 << 16


@dataclass(frozen=True)
class Blocks:
    """One bsdiff patch: triples as arrays, and the diff and extra blocks they read in order."""

    x: np.ndarray  # int64
    y: np.ndarray  # int64
    z: np.ndarray  # int64
    diff: bytes
    extra: bytes

    @property
    def count(self) -> int:
        return int(self.x.size)

    def control(self) -> bytes:
        """The control block as a BSDIFF record stores it (before zstd)."""
        zigzag = (self.z << np.int64(1)) ^ (self.z >> np.int64(63))
        columns = np.concatenate([self.x, self.y, zigzag]).astype("<u8")
        return split_planes(columns.tobytes(), 8)


def diff(old: bytes, new: bytes, max_bytes: int) -> Blocks | None:
    """bsdiff4's patch from `old` to `new`, or None where a BSDIFF record cannot carry it.

    None when either file is over `max_bytes` (apply holds both in memory, within the delta's
    declared segment limit), when the base is empty (nothing to match), when the control block
    would be over `max_bytes`, or when `bsdiff4` (fleet only) is not installed. bsdiff4 needs about
    17 times the files' size in memory while it sorts the base's suffixes.
    """
    if not old or len(old) > max_bytes or len(new) > max_bytes:
        return None
    try:
        import bsdiff4.core
    except ImportError:
        return None
    control, diff_block, extra = bsdiff4.core.diff(old, new)
    if isinstance(control, list):  # bsdiff4 before 1.2: a list of (x, y, z) tuples
        values = np.array(control, np.int64).reshape(-1, 3)
    else:  # 8 bytes a value, sign and magnitude: bit 63 the sign
        if len(control) % TRIPLE_BYTES:
            return None
        raw = np.frombuffer(control, "<u8").reshape(-1, 3)
        magnitude = (raw & np.uint64((1 << 63) - 1)).astype(np.int64)
        values = np.where(raw >> np.uint64(63) == 1, -magnitude, magnitude)
    if TRIPLE_BYTES * len(values) > max_bytes:
        return None
    blocks = Blocks(values[:, 0].copy(), values[:, 1].copy(), values[:, 2].copy(), diff_block, extra)
    try:  # the checks apply makes: a patch bsdiff4 made that apply would refuse is not offered
        check(blocks.x, blocks.y, blocks.z, len(old), len(new))
    except DeltaError:
        return None
    return blocks


def parse_control(coded: bytes, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, y and z (int64) from a decoded control block of `count` triples, unchecked."""
    if len(coded) != TRIPLE_BYTES * count:
        raise DeltaError(f"delta corrupt: a bsdiff control block of {len(coded)} bytes for {count} triples")
    columns = np.frombuffer(join_planes(coded, 8), "<u8").reshape(3, count)
    if int(columns[:2].max(initial=0)) >> 62:
        raise DeltaError("delta corrupt: a bsdiff length is out of range")
    x, y = columns[0].astype(np.int64), columns[1].astype(np.int64)
    zigzag = columns[2]
    z = (zigzag >> np.uint64(1)).astype(np.int64) ^ -(zigzag & np.uint64(1)).astype(np.int64)
    return x, y, z


def check(x: np.ndarray, y: np.ndarray, z: np.ndarray, base_size: int, length: int) -> np.ndarray:
    """The base position of every triple, after checking that the triples write exactly `length`
    bytes and read only inside the base; DeltaError otherwise.

    bsdiff's own encoder keeps every `oldpos` in 0..base_size with `oldpos + x <= base_size`, so
    this is no stricter than what it makes, and apply never has to clip a base range.
    """
    if x.size and (int(x.min()) < 0 or int(y.min()) < 0 or int(x.max()) > length or int(y.max()) > length):
        raise DeltaError("delta corrupt: a bsdiff triple writes more than the target holds")
    # Each |z| at most 2 * base_size: a step from one place in the base to another, after x.
    if x.size and (int(z.min()) < -2 * base_size or int(z.max()) > 2 * base_size):
        raise DeltaError("delta corrupt: a bsdiff triple moves outside the base")
    # Bounded values (< 2^29 for a 256 MiB segment) over < 2^24 triples: these sums fit int64.
    if int(x.sum()) + int(y.sum()) != length:
        raise DeltaError("delta corrupt: the bsdiff triples do not add up to the record's length")
    oldpos = np.concatenate([np.zeros(1, np.int64), np.cumsum(x + z)[:-1]]) if x.size else x
    if x.size and (int(oldpos.min()) < 0 or int((oldpos + x).max()) > base_size):
        raise DeltaError("delta corrupt: a bsdiff triple reads outside the base")
    return oldpos


def patch(
    base: bytes,
    x: np.ndarray,
    y: np.ndarray,
    oldpos: np.ndarray,
    diff_block: bytes | memoryview,
    extra: bytes,
) -> Iterator[memoryview]:
    """The target, front to back, in pieces of at most _PIECE bytes (valid until the next one).

    The caller has checked the triples (`check`) and that the blocks are exactly sum(x) and
    sum(y) bytes long, so no range here runs past its buffer.
    """
    old = np.frombuffer(base, np.uint8)
    dif = np.frombuffer(diff_block, np.uint8)
    ext = memoryview(extra)
    scratch = np.empty(min(_PIECE, max(len(diff_block), 1)), np.uint8)
    d = e = 0
    for first in range(0, x.size, _TRIPLES):  # as Python ints a slice at a time, not all at once
        last = first + _TRIPLES
        triples = zip(
            x[first:last].tolist(), y[first:last].tolist(), oldpos[first:last].tolist(), strict=True
        )
        for xi, yi, oi in triples:
            for start in range(0, xi, _PIECE):
                n = min(_PIECE, xi - start)
                np.add(dif[d : d + n], old[oi + start : oi + start + n], out=scratch[:n])  # uint8: wraps
                d += n
                yield scratch.data[:n]
            for start in range(0, yi, _PIECE):
                n = min(_PIECE, yi - start)
                yield ext[e : e + n]
                e += n
