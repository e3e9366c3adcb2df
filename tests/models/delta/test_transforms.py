"""Transforms invert exactly, and any pair of ONNX-shaped files round-trips, whatever the edit."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.delta import DeltaError, apply, encode
from models.delta.format import BASED, Transform
from models.delta.transforms import combine, forward, inverse, join_into, split_planes

from .conftest import onnx_model


@settings(max_examples=300, deadline=None)
@given(
    width=st.sampled_from([1, 2, 4, 8]),
    transform=st.sampled_from(list(Transform)),
    data=st.data(),
)
def test_every_transform_inverts(width: int, transform: Transform, data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 64)) * width
    new = data.draw(st.binary(min_size=n, max_size=n))
    old = data.draw(st.binary(min_size=n, max_size=n))
    base = old if transform in BASED else None
    if transform is Transform.FPLANES and width == 1:  # a float has no 1-byte form: refused
        with pytest.raises(ValueError, match="2, 4 or 8"):
            forward(transform, width, new, base)
        return
    coded = forward(transform, width, new, base)
    if transform is not Transform.SPARSE:
        assert len(coded) == len(new)
    assert inverse(transform, width, coded, base, len(new)) == new


@settings(max_examples=200, deadline=None)
@given(width=st.sampled_from([1, 2, 4, 8]), data=st.data())
def test_sparse_holds_only_the_changes(width: int, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 3000))
    old = np.frombuffer(data.draw(st.binary(min_size=n * width, max_size=n * width)), f"<u{width}")
    new = old.copy()
    where = data.draw(st.lists(st.integers(0, n - 1), max_size=20))
    new[where] += np.array(data.draw(st.integers(1, 255)), dtype=new.dtype)
    coded = forward(Transform.SPARSE, width, new.tobytes(), old.tobytes())
    changed = int((new != old).sum())
    assert len(coded) == 4 + changed * (4 + width)  # count, gaps, values
    assert inverse(Transform.SPARSE, width, coded, old.tobytes(), new.nbytes) == new.tobytes()


def _sparse(gaps: list[int], values: bytes, count: int | None = None) -> bytes:
    """A SPARSE payload for width 1, by hand: u32 count, u32 gaps planes split, the values."""
    n = len(gaps) if count is None else count
    return np.array([n], "<u4").tobytes() + split_planes(np.array(gaps, "<u4").tobytes(), 4) + values


@pytest.mark.parametrize(
    ("coded", "match"),
    [
        (b"", "no count"),
        (b"\x01\x00", "no count"),
        (_sparse([0] * 11, bytes(11)), "does not fit"),  # more changes than the 10 elements
        (_sparse([0], b"\x01\x02"), "does not fit"),  # one gap, two values
        (_sparse([0, 0], b"\x01"), "does not fit"),  # two gaps, one value
        (_sparse([10], b"\x01"), "outside"),  # position 10 of 10
        (_sparse([3, 6], b"\x01\x02"), "outside"),  # 3, then 3 + 7 = 10
        (_sparse([2**32 - 1], b"\x01"), "outside"),
    ],
)
def test_bad_sparse_payloads_are_refused(coded: bytes, match: str) -> None:
    with pytest.raises(DeltaError, match=match):
        join_into(Transform.SPARSE, 1, coded, 10)
    assert bytes(join_into(Transform.SPARSE, 1, _sparse([9], b"\x07"), 10)) == bytes(9) + b"\x07"


def test_bad_coded_input_is_a_delta_error() -> None:
    with pytest.raises(DeltaError, match="whole number"):
        join_into(Transform.PLANES, 4, b"abc", 3)
    with pytest.raises(DeltaError, match="holds 4 bytes for 8"):
        join_into(Transform.PLANES, 4, b"abcd", 8)
    joined = join_into(Transform.SUB, 4, bytes(8), 8)
    with pytest.raises(DeltaError, match="same length"):
        combine(Transform.SUB, 4, joined, bytes(4))


_FLOATS = st.sampled_from(["float32", "float16", "int8", "int64"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_onnx_shaped_pairs_round_trip(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    """Tensors added, dropped, resized, retyped, renamed, nudged: apply rebuilds the target exactly."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    count = data.draw(st.integers(0, 5))
    tensors = []
    for i in range(count):
        dtype = data.draw(_FLOATS)
        size = data.draw(st.integers(1, 3000))
        tensors.append((f"t{i}", (rng.standard_normal(size) * 20).astype(dtype)))
    edited = []
    for name, array in tensors:
        action = data.draw(st.sampled_from(["keep", "nudge", "drop", "rename", "grow", "retype"]))
        if action == "keep":
            edited.append((name, array))
        elif action == "nudge":
            edited.append((name, (array + rng.standard_normal(array.size) * 0.01).astype(array.dtype)))
        elif action == "rename":
            edited.append((name + ".renamed", array))
        elif action == "grow":
            edited.append((name, np.concatenate([array, array[:7]])))
        elif action == "retype":
            edited.append((name, array.astype("float64")))
    if data.draw(st.booleans()):
        edited.append(("new", rng.standard_normal(data.draw(st.integers(1, 2000))).astype("float32")))
    external = data.draw(st.booleans())
    folder = tmp_path_factory.mktemp("pair")
    paths = []
    for tag, ts in (("a", tensors), ("b", edited)):
        (folder / tag).mkdir()
        model, blob = onnx_model(ts, "w.bin" if external else None)
        (folder / tag / "model.onnx").write_bytes(model)
        (folder / tag / "w.bin").write_bytes(blob)
        paths.append(folder / tag / ("w.bin" if external else "model.onnx"))
    old, new = paths
    encode(old, new, folder / "d.efd", level=1)
    apply(old, folder / "d.efd", folder / "out")
    assert (folder / "out").read_bytes() == new.read_bytes()


def test_apply_to_a_target_inside_a_missing_folder_is_a_delta_error(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a" * 1000)
    encode(tmp_path / "a", tmp_path / "a", tmp_path / "d.efd")
    with pytest.raises(DeltaError, match="cannot apply"):
        apply(tmp_path / "a", tmp_path / "d.efd", tmp_path / "missing" / "out")
