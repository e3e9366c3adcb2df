"""What each step of the encoder's tensor coding is worth on a corpus pair: bytes of the changed
tensors' TENSOR payloads (gap stream and records' framing left out) when the encoder

  planes    chooses among RAW, PLANES, XOR, SUB, SPARSE with zstd's default parameters (before FPLANES)
  +fplanes  may also choose FPLANES for float tensors
  +blocks   then codes the winner a second way, planes in zstd blocks of their own, kept if smaller
  +literal  the same second way with matches of at least 7 bytes too: what the encoder does

    nice -n 15 .venv/bin/python bench/delta/ablation.py [--pairs unrelated-to-cnn,cnn] [--level 19]

Chunks over 1 MiB pick their transform by a level 3 trial as the encoder does, and chunks over
1 MiB coded against a base get no second way (the encoder's rule), so the last column equals
the encoder's payloads.
"""

import argparse
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from bench_delta import CORPUS, PAIRS  # noqa: E402

from models.delta.format import BASED, PLANE_SPLIT, Transform  # noqa: E402
from models.delta.transforms import forward, sparse_coded_size  # noqa: E402

# the module, not the function of that name that models.delta exports
enc = importlib.import_module("models.delta.encode")

STEPS = ("planes", "+fplanes", "+blocks", "+literal")


def chunk_sizes(new: bytes, old: bytes, chunk: object, level: int) -> dict[str, int]:
    """The payload size of one changed chunk after each step."""
    assert isinstance(chunk, enc._Chunk)
    data = new[chunk.offset : chunk.offset + chunk.length]
    base = old[chunk.old_offset : chunk.old_offset + chunk.length] if chunk.old_offset is not None else None
    plain = [Transform.RAW] + ([Transform.PLANES] if chunk.width > 1 else [])
    if base is not None:
        plain += [Transform.XOR, Transform.SUB]
        if sparse_coded_size(data, base, chunk.width) < chunk.length:
            plain.append(Transform.SPARSE)
    floats = [Transform.FPLANES] if chunk.width > 1 and chunk.fp else []
    coded = {t: forward(t, chunk.width, data, base) for t in plain + floats}
    trial = chunk.length > enc.SELECT_ABOVE and level > enc.SELECT_LEVEL

    def winner(options: list[Transform]) -> tuple[Transform, bytes]:
        if trial:
            best = min(options, key=lambda t: len(enc._compress(coded[t], enc.SELECT_LEVEL)))
            return best, enc._compress(coded[best], level)
        frames = {t: enc._compress(coded[t], level) for t in options}
        best = min(frames, key=lambda t: len(frames[t]))
        return best, frames[best]

    out = {"planes": len(winner(plain)[1])}
    best, frame = winner(plain + floats)
    out["+fplanes"] = len(frame)
    second = chunk.length <= enc.SELECT_ABOVE or best not in BASED
    planes = chunk.width if best in PLANE_SPLIT else 1
    blocks = len(enc._compress(coded[best], level, planes=planes)) if second else len(frame)
    literal = len(enc._compress(coded[best], level, planes=planes, literal=True)) if second else len(frame)
    out["+blocks"] = min(len(frame), blocks)
    out["+literal"] = min(len(frame), literal)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="bytes each tensor coding step saves, per corpus pair")
    parser.add_argument("--pairs", default="unrelated-to-cnn,cnn")
    parser.add_argument("--level", type=int, default=19)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    args = parser.parse_args()
    print("| pair | new file bytes | " + " | ".join(STEPS) + " |")
    print("|---|---:|" + "---:|" * len(STEPS))
    for pair in [p for p in PAIRS if p.key in args.pairs.split(",")]:
        old_path, new_path = args.corpus / pair.old, args.corpus / pair.new
        old, new = old_path.read_bytes(), new_path.read_bytes()
        new_spans, old_spans = enc._spans(new_path, new, None), enc._spans(old_path, old, None)
        pieces = enc._merge_copies(old, new, enc._plan(old, new, new_spans, old_spans))
        totals = dict.fromkeys(STEPS, 0)
        for piece in pieces:
            if isinstance(piece, enc._Chunk):
                for step, size in chunk_sizes(new, old, piece, args.level).items():
                    totals[step] += size
        cells = " | ".join(f"{totals[s]} ({100 * totals[s] / len(new):.2f} %)" for s in STEPS)
        print(f"| {pair.label} | {len(new)} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
