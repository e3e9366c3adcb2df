"""Byte-for-byte round trips on the real sample models, unrelated files and non-ONNX files."""

import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from models.delta import DeltaError, DeltaInfo, apply, encode, info
from models.delta.cli import app
from models.delta.onnx_scan import find_initializers


def roundtrip(old: Path, new: Path, tmp_path: Path, level: int = 19) -> DeltaInfo:
    delta, out = tmp_path / "d.efd", tmp_path / "out.bin"
    made = encode(old, new, delta, level=level)
    apply(old, delta, out)
    assert out.read_bytes() == new.read_bytes()
    assert info(delta) == made
    assert made.delta_size == delta.stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    return made


@pytest.fixture(scope="module")
def v1(zoo: Path) -> Path:
    return zoo / "v1" / "model.onnx"


@pytest.fixture(scope="module")
def v2(zoo: Path) -> Path:
    return zoo / "v2" / "model.onnx"


def test_v1_to_v2_is_smaller_than_the_file_compressed(v1: Path, v2: Path, tmp_path: Path) -> None:
    import zstandard

    made = roundtrip(v1, v2, tmp_path)
    assert made.kind == "onnx"
    whole = len(zstandard.ZstdCompressor(level=19).compress(v2.read_bytes()))
    assert made.delta_size < 0.93 * whole
    assert made.target_bytes_by.get("sub", 0) + made.target_bytes_by.get("xor", 0) > 0.95 * made.target_size


def test_v2_to_v1(v1: Path, v2: Path, tmp_path: Path) -> None:
    roundtrip(v2, v1, tmp_path)


def test_same_file_is_tiny(v1: Path, tmp_path: Path) -> None:
    made = roundtrip(v1, v1, tmp_path)
    assert made.delta_size < 600
    assert made.target_bytes_by == {"copy": made.target_size}


def test_unrelated_base(v1: Path, tmp_path: Path) -> None:
    noise = tmp_path / "noise.bin"
    noise.write_bytes(random.Random(1).randbytes(300_000))
    made = roundtrip(noise, v1, tmp_path)
    assert made.dict_bytes == 0  # the base did not help, so apply does not even load it
    assert made.delta_size < v1.stat().st_size
    roundtrip(v1, noise, tmp_path)


def test_empty_files(v1: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    roundtrip(empty, v1, tmp_path)
    roundtrip(v1, empty, tmp_path)
    roundtrip(empty, empty, tmp_path)


def test_binary_pair(binary_pair: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = binary_pair
    made = roundtrip(old, new, tmp_path)
    assert made.kind == "binary"
    assert made.delta_size < 0.1 * new.stat().st_size
    roundtrip(new, old, tmp_path)


def test_a_blob_changed_in_place_codes_against_the_same_offsets(tmp_path: Path) -> None:
    """An unparsed model (say int8 weights in a .tflite) retrained: values move, offsets do not."""
    import numpy as np
    import zstandard

    rng = np.random.default_rng(11)
    old = np.clip(rng.normal(0, 30, 400_000), -127, 127).astype(np.int8)
    new = old.copy()
    moved = rng.random(old.size) < 0.05
    new[moved] = np.clip(old[moved].astype(np.int16) + rng.choice([-1, 1], int(moved.sum())), -127, 127)
    (tmp_path / "a.tflite").write_bytes(b"TFL3" + old.tobytes())
    (tmp_path / "b.tflite").write_bytes(b"TFL3" + new.tobytes())
    made = roundtrip(tmp_path / "a.tflite", tmp_path / "b.tflite", tmp_path)
    assert made.kind == "binary"
    against_base = sum(made.target_bytes_by.get(t, 0) for t in ("xor", "sub", "sparse"))
    assert against_base > 0.9 * made.target_size
    prefix = zstandard.ZstdCompressionDict(b"TFL3" + old.tobytes(), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    patch_from = zstandard.ZstdCompressor(level=19, dict_data=prefix).compress(b"TFL3" + new.tobytes())
    assert made.delta_size < 0.8 * len(patch_from)


def test_a_sparse_int8_update_holds_only_the_changes(tmp_path: Path) -> None:
    """int8 weights re-quantised after a fine-tune: about 1 % of them move by one step."""
    import numpy as np

    from .conftest import onnx_model

    rng = np.random.default_rng(12)
    v1 = [np.clip(rng.normal(0, 40, n), -127, 127).astype(np.int8) for n in (300_000, 150_000, 90_000)]
    v2 = []
    for w in v1:
        moved = rng.random(w.size) < 0.01
        w2 = w.copy()
        w2[moved] = np.clip(w[moved].astype(np.int16) + rng.choice([-1, 1], int(moved.sum())), -127, 127)
        v2.append(w2)
    for name, ws in (("a.onnx", v1), ("b.onnx", v2)):
        (tmp_path / name).write_bytes(onnx_model([(f"w{i}", w) for i, w in enumerate(ws)])[0])
    made = roundtrip(tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path)
    assert made.target_bytes_by.get("sparse", 0) > 0.9 * made.target_size
    changed = sum(int((a != b).sum()) for a, b in zip(v1, v2, strict=True))
    # About 1.2 bytes a change (its gap and its sign) plus the header: bench/delta compares the
    # real thing (MiniLM re-quantised) with bsdiff4.
    assert made.delta_size < 1.5 * changed


def test_low_level_still_roundtrips(v1: Path, v2: Path, tmp_path: Path) -> None:
    roundtrip(v1, v2, tmp_path, level=1)


def test_changed_graph_and_tensor_shapes(v1: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import numpy_helper

    model = onnx.load(str(v1))
    inits = model.graph.initializer
    grown = numpy_helper.to_array(inits[4]).astype(np.float32)
    inits[4].CopyFrom(numpy_helper.from_array(np.concatenate([grown, grown[:1]]), inits[4].name))
    inits.append(numpy_helper.from_array(np.arange(1000, dtype=np.float16), "extra.half"))
    inits[2].CopyFrom(
        numpy_helper.from_array(numpy_helper.to_array(inits[2]).astype(np.float64), inits[2].name)
    )
    model.graph.name = "edited"
    edited = tmp_path / "edited.onnx"
    onnx.save(model, str(edited))
    roundtrip(v1, edited, tmp_path)
    roundtrip(edited, v1, tmp_path)


def test_scanner_agrees_with_onnx(v1: Path) -> None:
    onnx = pytest.importorskip("onnx")
    data = v1.read_bytes()
    spans = find_initializers(data)
    model = onnx.load_from_string(data)
    assert {s.name for s in spans} == {t.name for t in model.graph.initializer}
    by_name = {t.name: t.raw_data for t in model.graph.initializer}
    for s in spans:
        assert data[s.offset : s.offset + s.length] == by_name[s.name]
        assert s.width == 4
    assert find_initializers(b"\xff" * 100) == []


def test_cli(v1: Path, v2: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    delta, out = tmp_path / "d.efd", tmp_path / "out.onnx"
    result = runner.invoke(app, ["encode", str(v1), str(v2), "-o", str(delta), "--level", "3"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["apply", str(v1), str(delta), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == v2.read_bytes()
    result = runner.invoke(app, ["info", str(delta), "--json"])
    assert result.exit_code == 0 and '"kind": "onnx"' in result.output
    result = runner.invoke(app, ["apply", str(v2), str(delta), "-o", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "error: delta was built from another base" in result.output
    result = runner.invoke(app, ["info", str(v1)])
    assert result.exit_code == 1 and "error:" in result.output


def test_missing_input_is_a_delta_error(v1: Path, tmp_path: Path) -> None:
    with pytest.raises(DeltaError, match="cannot read"):
        encode(v1, tmp_path / "missing", tmp_path / "d")
