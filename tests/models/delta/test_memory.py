"""Apply's memory is bounded by a few chunks, not by the model: measured in a process of its own."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.delta import encode
from models.delta.format import CHUNK_BYTES

from .conftest import fine_tuned, onnx_model

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)"
)

ROOT = Path(__file__).resolve().parents[3]
# Prints the process's peak RSS (KiB) after the given statement ran.
PEAK = (
    "import sys; sys.path.insert(0, {root!r}); from pathlib import Path as P;"
    " from models.delta import apply; {stmt};"
    " print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
)


def _peak_kib(stmt: str) -> int:
    code = PEAK.format(root=str(ROOT), stmt=stmt)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.slow
def test_apply_peak_memory_does_not_grow_with_the_model(tmp_path: Path) -> None:
    # 80 MB of float32 in five tensors, the largest 32 MiB (two chunks): a fine-tune of each.
    shapes = [(2 * CHUNK_BYTES // 4,), (CHUNK_BYTES // 4,), (CHUNK_BYTES // 4 + 1000,), (3_000_000,), (1000,)]
    v1, v2 = fine_tuned(np.random.default_rng(5), shapes)
    old_model, _ = onnx_model([(f"t{i}", w) for i, w in enumerate(v1)])
    new_model, _ = onnx_model([(f"t{i}", w) for i, w in enumerate(v2)])
    old, new, delta, out = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "d.efd", tmp_path / "out"
    old.write_bytes(old_model)
    new.write_bytes(new_model)
    made = encode(old, new, delta, level=1)
    assert made.target_bytes_by.get("sub", 0) + made.target_bytes_by.get("xor", 0) > 0.5 * made.target_size
    baseline = _peak_kib("None")
    peak = _peak_kib(f"apply(P({str(old)!r}), P({str(delta)!r}), P({str(out)!r}))")
    assert out.read_bytes() == new_model
    grew_mib = (peak - baseline) / 1024
    # A chunk's payload and two chunk-sized buffers at a time (see transforms.join_into); the
    # allocator may keep one freed chunk in its heap.
    assert grew_mib < 3 * CHUNK_BYTES / 2**20, f"apply grew by {grew_mib:.0f} MiB for an 80 MB model"
    assert 0.65 * len(new_model) > 3 * CHUNK_BYTES  # so the bound above is well below the model's size


@pytest.mark.slow
def test_apply_peak_memory_with_fplanes(tmp_path: Path) -> None:
    """The same bound where chunks are FPLANES (rotated back in place): a model against an unrelated base."""
    rng = np.random.default_rng(6)
    shapes = [(2 * CHUNK_BYTES // 4,), (CHUNK_BYTES // 4 + 1000,), (3_000_000,)]
    new_model, _ = onnx_model(
        [(f"t{i}", (rng.standard_normal(s) * 0.05).astype(np.float32)) for i, s in enumerate(shapes)]
    )
    old_model, _ = onnx_model([("other", rng.integers(0, 255, 5000).astype(np.uint8))])
    old, new, delta, out = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "d.efd", tmp_path / "out"
    old.write_bytes(old_model)
    new.write_bytes(new_model)
    made = encode(old, new, delta, level=1)
    assert made.target_bytes_by.get("fplanes", 0) > 0.9 * made.target_size
    baseline = _peak_kib("None")
    peak = _peak_kib(f"apply(P({str(old)!r}), P({str(delta)!r}), P({str(out)!r}))")
    assert out.read_bytes() == new_model
    grew_mib = (peak - baseline) / 1024
    assert grew_mib < 3 * CHUNK_BYTES / 2**20, (
        f"apply grew by {grew_mib:.0f} MiB for a {len(new_model) >> 20} MiB model"
    )
    assert len(new_model) > 3 * CHUNK_BYTES


@pytest.mark.slow
def test_apply_peak_memory_with_bsdiff(tmp_path: Path) -> None:
    """BSDIFF holds the base and the diff and extra blocks (together the target's size), never the
    target itself or a second copy: about base + target, both within the declared segment limit."""
    pytest.importorskip("bsdiff4", reason="the encoder's BSDIFF records need bsdiff4 (the fleet extra)")
    from models.delta.format import Reader, parse_header, read_record

    rng = np.random.default_rng(8)
    size = CHUNK_BYTES - (2 << 20)  # 14 MiB: random bytes, 0.5 % nudged, 4 KiB inserted
    old_bytes = rng.integers(0, 256, size, dtype=np.uint8)
    new_bytes = old_bytes.copy()
    at = rng.random(size) < 0.005
    new_bytes[at] += np.uint8(1)
    cut = size // 3
    old, new, delta, out = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "d.efd", tmp_path / "out"
    old.write_bytes(old_bytes.tobytes())
    new.write_bytes(new_bytes[:cut].tobytes() + rng.bytes(4096) + new_bytes[cut:].tobytes())
    made = encode(old, new, delta, level=1)
    assert made.target_bytes_by == {"bsdiff": made.target_size}
    with delta.open("rb") as f:
        parse_header(f)
        assert read_record(Reader(f, made.delta_size)).op.name == "BSDIFF"
    baseline = _peak_kib("None")
    peak = _peak_kib(f"apply(P({str(old)!r}), P({str(delta)!r}), P({str(out)!r}))")
    assert out.read_bytes() == new.read_bytes()
    grew_mib = (peak - baseline) / 1024
    both_mib = (made.base_size + made.target_size) / 2**20
    # the base, the diff block (with its SPARSE coding until it is scattered), the extra block,
    # the control block and a 1 MiB scratch buffer
    assert grew_mib < both_mib + 6, (
        f"apply grew by {grew_mib:.0f} MiB for base + target of {both_mib:.0f} MiB"
    )
    assert both_mib + 6 < 3 * CHUNK_BYTES / 2**20  # within the bound the other records keep
