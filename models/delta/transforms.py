"""Tensor transforms: byte planes split by element width, XOR, wrapping integer difference, the
integer difference of a sparse update kept as (gaps between changed elements, their differences),
and byte planes of the elements rotated left by one bit (floats: the exponent in one plane)."""

import numpy as np

from models.delta.errors import DeltaError
from models.delta.format import BASED, Transform

# SPARSE positions are decoded this many at a time (a few MiB of indices at most).
_SLICE = 1 << 18
# SPARSE gaps and counts are u32: chunks are far smaller (CHUNK_BYTES, MAX_SEGMENT_BYTES).
_MAX_SPARSE_ELEMENTS = (1 << 32) - 1
# FPLANES rotates this many elements at a time in apply, so its shift temporaries stay small.
_ROTATE_SLICE = 1 << 18


def split_planes(data: bytes, width: int) -> bytes:
    """Byte k of every element, for k = 0..width-1, one plane after the other."""
    if width == 1:
        return bytes(data)
    return np.frombuffer(data, np.uint8).reshape(-1, width).T.tobytes()


def join_planes(data: bytes, width: int) -> bytes:
    if width == 1:
        return bytes(data)
    return np.frombuffer(data, np.uint8).reshape(width, -1).T.tobytes()


def _uint(width: int) -> np.dtype[np.unsignedinteger]:
    return np.dtype(f"<u{width}")


def rotate_left(data: bytes, width: int) -> bytes:
    """Every `width`-byte little-endian element rotated left by one bit (FPLANES before splitting).

    For IEEE floats this moves the sign bit to bit 0, among random mantissa bits, and the exponent
    up by one: the top byte then holds exactly the exponent of fp32 and bf16 (fp16: the exponent
    and 3 mantissa bits; fp64: the exponent's top 8 bits), where order-0 coding sees it whole.
    """
    if width == 1:
        raise ValueError("FPLANES rotates elements of 2, 4 or 8 bytes, not 1")
    a = np.frombuffer(data, _uint(width))
    bits = a.dtype.type(8 * width - 1)
    rotated: np.ndarray = (a << a.dtype.type(1)) | (a >> bits)
    return rotated.tobytes()


def _rotate_right_in_place(values: np.ndarray) -> None:
    """The inverse of rotate_left, a slice at a time: a chunk gets no second buffer of its size."""
    one, bits = values.dtype.type(1), values.dtype.type(8 * values.dtype.itemsize - 1)
    for start in range(0, values.size, _ROTATE_SLICE):
        part = values[start : start + _ROTATE_SLICE]
        low = part & one
        np.right_shift(part, one, out=part)
        np.bitwise_or(part, low << bits, out=part)


def sparse_coded_size(new: bytes, old: bytes, width: int) -> int:
    """How many bytes SPARSE would hand to zstd (to skip it where it cannot be the smaller)."""
    changed = int(np.count_nonzero(np.frombuffer(new, _uint(width)) != np.frombuffer(old, _uint(width))))
    return 4 + changed * (4 + width)


def forward(transform: Transform, width: int, new: bytes, old: bytes | None) -> bytes:
    """What the encoder compresses for `new` (and `old`, for the transforms that use a base)."""
    if len(new) % width:
        raise ValueError(f"{len(new)} bytes is not a whole number of {width}-byte elements")
    if transform is Transform.RAW:
        return bytes(new)
    if transform is Transform.PLANES:
        return split_planes(new, width)
    if transform is Transform.FPLANES:
        return split_planes(rotate_left(new, width), width)
    if old is None or len(old) != len(new):
        raise ValueError(f"{transform.name} needs a base range of the same length")
    a, b = np.frombuffer(new, _uint(width)), np.frombuffer(old, _uint(width))
    diff = a ^ b if transform is Transform.XOR else a - b  # unsigned: wraps
    if transform is not Transform.SPARSE:
        return split_planes(diff.tobytes(), width)
    changed = np.flatnonzero(diff)
    if len(new) // width > _MAX_SPARSE_ELEMENTS:
        raise ValueError(f"SPARSE codes at most {_MAX_SPARSE_ELEMENTS} elements a chunk")
    gaps = (np.diff(changed, prepend=-1) - 1).astype("<u4")  # unchanged elements before each changed one
    count = np.array([changed.size], "<u4").tobytes()
    return count + split_planes(gaps.tobytes(), 4) + split_planes(diff[changed].tobytes(), width)


def inverse(
    transform: Transform, width: int, coded: bytes, old: bytes | None, length: int | None = None
) -> bytes:
    """The tensor bytes back from what `forward` produced (`length`: the output size, for SPARSE)."""
    joined = join_into(transform, width, coded, len(coded) if length is None else length)
    if transform in BASED:
        return bytes(combine(transform, width, joined, old))
    return bytes(joined)


def join_into(transform: Transform, width: int, coded: bytes, length: int) -> bytes | memoryview:
    """Step 1 of the inverse: `length` output bytes, planes joined, in a fresh writable array (RAW:
    `coded` itself); for SPARSE, the differences scattered into zeros.

    Apply drops `coded` after this and only then reads the base range for step 2, so a chunk never
    costs more than two buffers of its size at once.
    """
    if length % width:
        raise DeltaError(f"delta corrupt: {length} bytes is not a whole number of {width}-byte elements")
    if transform is Transform.SPARSE:
        return _scatter(coded, width, length)
    if len(coded) != length:
        raise DeltaError(f"delta corrupt: {transform.name} holds {len(coded)} bytes for {length}")
    if transform is Transform.RAW:
        return coded
    if transform is Transform.FPLANES and width == 1:
        raise DeltaError("delta corrupt: FPLANES needs elements of 2, 4 or 8 bytes, the record says 1")
    out = np.empty(length, np.uint8)
    if width == 1:
        out[...] = np.frombuffer(coded, np.uint8)
    else:
        out.reshape(-1, width)[...] = np.frombuffer(coded, np.uint8).reshape(width, -1).T
    if transform is Transform.FPLANES:
        _rotate_right_in_place(out.view(_uint(width)))
    return out.data


def _scatter(coded: bytes, width: int, length: int) -> memoryview:
    """SPARSE: u32 count | count u32 gaps, planes split | count differences, planes split -> the
    differences at their places among zeros. Read a slice at a time, so a crafted count costs no
    more memory than a slice's worth of positions."""
    elements = length // width
    if len(coded) < 4:
        raise DeltaError("delta corrupt: a sparse tensor has no count")
    count = int.from_bytes(coded[:4], "little")
    if count > elements or len(coded) != 4 + count * (4 + width):
        raise DeltaError("delta corrupt: a sparse tensor's count does not fit it")
    buf = np.frombuffer(coded, np.uint8)
    gap_planes = buf[4 : 4 + 4 * count].reshape(4, count)
    value_planes = buf[4 + 4 * count :].reshape(width, count)
    out = np.zeros(length, np.uint8)
    last = -1
    for start in range(0, count, _SLICE):
        stop = min(count, start + _SLICE)
        gaps = np.ascontiguousarray(gap_planes[:, start:stop].T).view("<u4").ravel()
        positions = last + np.cumsum(gaps.astype(np.int64) + 1)  # u32 gaps, < 2^18 of them: no overflow
        if int(positions[-1]) >= elements:
            raise DeltaError("delta corrupt: a sparse tensor's position lies outside it")
        for k in range(width):
            out[positions * width + k] = value_planes[k, start:stop]
        last = int(positions[-1])
    return out.data


def combine(transform: Transform, width: int, joined: bytes | memoryview, old: bytes | None) -> memoryview:
    """Step 2 of the inverse for the transforms with a base: the base folded into `joined`, in place."""
    if transform not in BASED or isinstance(joined, bytes):
        raise ValueError(f"{transform.name} has no base to combine, or `joined` is not from join_into")
    if old is None or len(old) != len(joined):
        raise DeltaError(f"delta corrupt: {transform.name} without a base range of the same length")
    values = np.frombuffer(joined, _uint(width))
    base = np.frombuffer(old, _uint(width))
    if transform is Transform.XOR:
        np.bitwise_xor(values, base, out=values)
    else:  # SUB and SPARSE
        np.add(values, base, out=values)
    return joined
