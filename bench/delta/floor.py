"""Estimates of how small a delta between two model files can be, to put the codec's sizes beside.

Tensors are paired as the encoder pairs them; an unchanged one costs nothing. For each changed
tensor, every transform the codec can choose (the new bytes alone, as they are or rotated one bit
for floats (FPLANES), XOR, the integer difference) is measured by:

- order 0: the sum over its byte planes of each plane's order-0 entropy. A zstd frame of the
  planes can reach about this (Huffman literals), not below: it is the floor for what the codec
  does, and the figure the issue asks for.
- context: the same planes, each plane's entropy given the base element's exponent byte (for
  floats; its top byte otherwise). A coder that grouped elements by that context before zstd, or
  modelled it, could approach this; it shows what is left on the table for a next transform.

The non-tensor bytes (graph, names, framing) count as zstd codes them with the base's non-tensor
bytes as dictionary, as the encoder does.
"""

from pathlib import Path

import numpy as np

from models.delta.encode import DEFAULT_LEVEL, MIN_TENSOR_BYTES, _compress, _dict_ranges, _match, _spans
from models.delta.format import Transform
from models.delta.onnx_scan import TensorSpan
from models.delta.transforms import forward


def _h(symbols: np.ndarray) -> float:
    """Order-0 entropy in bits of an array of small non-negative integers, times its length."""
    if symbols.size == 0:
        return 0.0
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / symbols.size
    return float(-(counts * np.log2(p)).sum())


def _h_given(symbols: np.ndarray, context: np.ndarray) -> float:
    """sum over contexts of H(symbols | context = c), in bits."""
    order = np.argsort(context, kind="stable")
    s, c = symbols[order], context[order]
    edges = np.flatnonzero(np.diff(c)) + 1
    return sum(_h(part) for part in np.split(s, edges))


def _planes_bits(coded: bytes, width: int) -> float:
    plane = len(coded) // width
    arr = np.frombuffer(coded, np.uint8)
    return sum(_h(arr[k * plane : (k + 1) * plane]) for k in range(width))


def _context_bits(new: bytes, old: bytes | None, transform: Transform, width: int) -> float:
    """sum over the byte planes of the transform's output of H(plane | exponent byte of the base)."""
    coded = forward(transform, width, new, old)
    if old is None or transform in (Transform.PLANES, Transform.FPLANES):
        return _planes_bits(coded, width)
    base = np.frombuffer(old, np.dtype(f"<u{width}"))
    # the exponent's top byte for float32/float16 (sign dropped), the value's top byte otherwise
    ctx = ((base >> (8 * width - 9)) & 0xFF).astype(np.uint8) if width > 1 else base
    planes = np.frombuffer(coded, np.uint8).reshape(width, -1)
    return sum(_h_given(plane, ctx) for plane in planes)


def entropy_floor(old: Path, new: Path, level: int = DEFAULT_LEVEL) -> dict[str, float | int]:
    a, b = old.read_bytes(), new.read_bytes()
    old_spans, new_spans = _spans(old, a, None), _spans(new, b, None)
    if not new_spans:  # not a model: say so by the whole file at order 0
        new_spans = [TensorSpan("", 0, len(b) - len(b) % 4, 4)] if len(b) >= MIN_TENSOR_BYTES else []
        old_spans = []
    pairs = _match(a, b, new_spans, old_spans)
    order0 = context = 0.0
    for span in new_spans:
        data = b[span.offset : span.offset + span.length]
        base_span = pairs.get(span)
        base = a[base_span.offset : base_span.offset + base_span.length] if base_span else None
        if base == data:
            continue
        options = [Transform.PLANES]
        if span.fp and span.width > 1:
            options.append(Transform.FPLANES)
        if base is not None:
            options += [Transform.XOR, Transform.SUB]
        order0 += min(_planes_bits(forward(t, span.width, data, base), span.width) for t in options) / 8
        context += min(_context_bits(data, base, t, span.width) for t in options) / 8
    gaps, pos = [], 0
    for span in new_spans:
        gaps.append(b[pos : span.offset])
        pos = span.offset + span.length
    gaps.append(b[pos:])
    gap_stream = b"".join(gaps)
    dictionary = b"".join(a[o : o + n] for o, n in _dict_ranges(a, old_spans))
    gap_coded = len(_compress(gap_stream, level, dictionary)) if gap_stream else 0
    total0, totalc = int(order0) + gap_coded, int(context) + gap_coded
    return {
        "order0_bytes": total0,
        "order0_pct": 100 * total0 / max(len(b), 1),
        "context_bytes": totalc,
        "context_pct": 100 * totalc / max(len(b), 1),
        "gap_coded_bytes": gap_coded,
    }
