"""Tensor transforms: byte planes split by element width, XOR and wrapping integer difference."""

import numpy as np

from models.delta.errors import DeltaError
from models.delta.format import Transform


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


def forward(transform: Transform, width: int, new: bytes, old: bytes | None) -> bytes:
    """What the encoder compresses for `new` (and `old`, for XOR and SUB)."""
    if len(new) % width:
        raise ValueError(f"{len(new)} bytes is not a whole number of {width}-byte elements")
    if transform is Transform.RAW:
        return bytes(new)
    if transform is Transform.PLANES:
        return split_planes(new, width)
    if old is None or len(old) != len(new):
        raise ValueError(f"{transform.name} needs a base range of the same length")
    a, b = np.frombuffer(new, _uint(width)), np.frombuffer(old, _uint(width))
    diff = a ^ b if transform is Transform.XOR else a - b  # unsigned: wraps
    return split_planes(diff.tobytes(), width)


def inverse(transform: Transform, width: int, coded: bytes, old: bytes | None) -> bytes:
    """The tensor bytes back from what `forward` produced."""
    if len(coded) % width:
        raise DeltaError(f"delta corrupt: {len(coded)} bytes is not a whole number of {width}-byte elements")
    if transform is Transform.RAW:
        return coded
    joined = join_planes(coded, width)
    if transform is Transform.PLANES:
        return joined
    if old is None or len(old) != len(joined):
        raise DeltaError(f"delta corrupt: {transform.name} without a base range of the same length")
    d, b = np.frombuffer(joined, _uint(width)), np.frombuffer(old, _uint(width))
    out = d ^ b if transform is Transform.XOR else d + b
    return out.tobytes()
