"""ONNX external data files coded tensor by tensor, and tensors found again after a re-export."""

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from models.delta import DeltaError, apply, encode
from models.delta.cli import app
from models.delta.onnx_scan import find_external, find_initializers, layout_for

from .conftest import fine_tuned, onnx_model

SHAPES = [(256, 384), (384,), (384, 384), (1536, 384), (64,), (512, 96)]


def _write(folder: Path, weights: list[np.ndarray], external: bool, first: str | None = None) -> Path:
    """The weights as layer0.weight, layer1.weight, ... (after a tensor called `first`, if given)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = [(f"layer{i}.weight", w) for i, w in enumerate(weights[1:] if first else weights)]
    if first:
        tensors.insert(0, (first, weights[0]))
    model, data = onnx_model(tensors, "weights.bin" if external else None)
    (folder / "model.onnx").write_bytes(model)
    if external:
        (folder / "weights.bin").write_bytes(data)
        return folder / "weights.bin"
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def versions() -> tuple[list[np.ndarray], list[np.ndarray]]:
    return fine_tuned(np.random.default_rng(3), SHAPES)


def test_scanner_reads_external_ranges(
    tmp_path: Path, versions: tuple[list[np.ndarray], list[np.ndarray]]
) -> None:
    data = _write(tmp_path / "v1", versions[0], external=True)
    model = (tmp_path / "v1" / "model.onnx").read_bytes()
    spans = find_external(model, "weights.bin", data.stat().st_size)
    blob = data.read_bytes()
    assert [s.name for s in spans] == [f"layer{i}.weight" for i in range(len(SHAPES))]
    for span, w in zip(spans, versions[0], strict=True):
        assert blob[span.offset : span.offset + span.length] == w.tobytes()
        assert span.width == 4
    assert find_initializers(model) == []  # no raw_data in the graph file
    assert find_external(model, "other.bin", data.stat().st_size) == []
    assert find_external(model, "weights.bin", 100) == []  # ranges past the file are dropped
    assert layout_for(data) == tmp_path / "v1" / "model.onnx"


def test_external_data_is_coded_per_tensor(
    tmp_path: Path, versions: tuple[list[np.ndarray], list[np.ndarray]]
) -> None:
    old = _write(tmp_path / "v1", versions[0], external=True)
    # v2 also gains a tensor in front, so every other tensor moves to another offset
    extra = np.random.default_rng(4).standard_normal(5000).astype(np.float32)
    new = _write(tmp_path / "v2", [extra, *versions[1]], external=True, first="embeddings.extra")
    auto = encode(old, new, tmp_path / "auto.efd", level=3)
    explicit = encode(
        old,
        new,
        tmp_path / "explicit.efd",
        level=3,
        old_layout=tmp_path / "v1" / "model.onnx",
        new_layout=tmp_path / "v2" / "model.onnx",
    )
    assert auto == explicit
    assert auto.kind == "onnx"
    assert auto.target_bytes_by.get("copy", 0) > 0  # the frozen tensors
    assert auto.target_bytes_by.get("sub", 0) + auto.target_bytes_by.get("xor", 0) > 0.5 * auto.target_size
    apply(old, tmp_path / "auto.efd", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == new.read_bytes()
    # The same pair as plain binary files (no layout beside them): offsets moved, so only zstd's
    # matching finds the frozen tensors, and nothing codes the changed ones against their base.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "a.bin").write_bytes(old.read_bytes())
    (bare / "b.bin").write_bytes(new.read_bytes())
    blind = encode(bare / "a.bin", bare / "b.bin", tmp_path / "blind.efd", level=3)
    assert blind.kind == "binary"
    assert auto.delta_size < 0.9 * blind.delta_size


def test_a_layout_that_does_not_name_the_file_is_refused(
    tmp_path: Path, versions: tuple[list[np.ndarray], list[np.ndarray]]
) -> None:
    old = _write(tmp_path / "v1", versions[0], external=True)
    new = _write(tmp_path / "v2", versions[1], external=True)
    embedded = _write(tmp_path / "emb", versions[0], external=False)
    with pytest.raises(DeltaError, match="keeps no initializers in"):
        encode(old, new, tmp_path / "d.efd", old_layout=embedded)
    assert not (tmp_path / "d.efd").exists()
    with pytest.raises(DeltaError, match="cannot read the layout"):
        encode(old, new, tmp_path / "d.efd", new_layout=tmp_path / "missing.onnx")


def test_cli_layout_options(tmp_path: Path, versions: tuple[list[np.ndarray], list[np.ndarray]]) -> None:
    old = _write(tmp_path / "v1", versions[0], external=True)
    new = _write(tmp_path / "v2", versions[1], external=True)
    delta = tmp_path / "d.efd"
    args = ["encode", str(old), str(new), "-o", str(delta), "--level", "3"]
    layouts = [
        "--old-layout",
        str(tmp_path / "v1" / "model.onnx"),
        "--new-layout",
        str(tmp_path / "v2" / "model.onnx"),
    ]
    result = CliRunner().invoke(app, args + layouts)
    assert result.exit_code == 0, result.output
    assert "onnx delta" in result.output
    result = CliRunner().invoke(app, ["apply", str(old), str(delta), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out").read_bytes() == new.read_bytes()


def test_renamed_and_reordered_tensors_are_copied(
    tmp_path: Path, versions: tuple[list[np.ndarray], list[np.ndarray]]
) -> None:
    """A re-export: same weights, new names, another order, another graph. Nothing is re-coded."""
    v1 = versions[0]
    old_model, _ = onnx_model([(f"layer{i}.weight", w) for i, w in enumerate(v1)])
    order = [3, 0, 5, 1, 4, 2]
    new_model, _ = onnx_model([(f"onnx::MatMul_{100 + i}", v1[i]) for i in order])
    (tmp_path / "a.onnx").write_bytes(old_model)
    (tmp_path / "b.onnx").write_bytes(new_model)
    made = encode(tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "d.efd")
    assert made.target_bytes_by["copy"] == sum(w.nbytes for w in v1)
    assert made.delta_size < 1000
    apply(tmp_path / "a.onnx", tmp_path / "d.efd", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == new_model


def test_renamed_and_retrained_tensors_still_pair(
    tmp_path: Path, versions: tuple[list[np.ndarray], list[np.ndarray]]
) -> None:
    """New names and new values: tensors of the same size pair in file order, so SUB/XOR still apply."""
    v1, v2 = versions
    old_model, _ = onnx_model([(f"layer{i}.weight", w) for i, w in enumerate(v1)])
    new_model, _ = onnx_model([(f"renamed_{i}", w) for i, w in enumerate(v2)])
    (tmp_path / "a.onnx").write_bytes(old_model)
    (tmp_path / "b.onnx").write_bytes(new_model)
    made = encode(tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "d.efd", level=3)
    coded_against_base = sum(made.target_bytes_by.get(k, 0) for k in ("copy", "sub", "xor"))
    assert coded_against_base > 0.9 * made.target_size
    apply(tmp_path / "a.onnx", tmp_path / "d.efd", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == new_model


def test_scanner_agrees_with_onnx_on_external_data(
    tmp_path: Path, versions: tuple[list[np.ndarray], list[np.ndarray]]
) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(versions[0])]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [x], initializer=inits)
    graph.output[0].name = "y"
    path = tmp_path / "m.onnx"
    onnx.save(
        helper.make_model(graph),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    data = (tmp_path / "m.onnx.data").read_bytes()
    spans = find_external(path.read_bytes(), "m.onnx.data", len(data))
    assert {s.name: data[s.offset : s.offset + s.length] for s in spans} == {
        f"w{i}": w.tobytes() for i, w in enumerate(versions[0])
    }
    assert layout_for(tmp_path / "m.onnx.data") == path
