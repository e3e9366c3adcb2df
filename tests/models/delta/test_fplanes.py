"""FPLANES (elements rotated left one bit, planes split): bit-exact on every float, chosen by size,
refused where its record cannot be right, and never decoded to anything but the target."""

from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.delta import DeltaError, apply, encode, info, onnx_scan
from models.delta.format import Transform, tensor_record
from models.delta.transforms import forward, inverse, join_into, rotate_left, split_planes

from .conftest import onnx_model, reseal, unseal
from .test_bad_input import BASE, crafted, refused


def _specials(dtype: str) -> np.ndarray:
    """Every awkward value of a float type: zeros of both signs, infinities, NaNs with payloads and
    signs, the smallest and largest denormals and normals, and ordinary values either side of 1."""
    info_ = np.finfo(dtype)
    bits = np.dtype(dtype).itemsize * 8
    u = np.dtype(f"<u{bits // 8}")
    values = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0, 1.5, -0.3, info_.max, -info_.max],
        dtype,
    ).view(u)
    mantissa = info_.nmant
    raw = [
        1,  # smallest positive denormal
        (1 << mantissa) - 1,  # largest denormal
        1 << mantissa,  # smallest normal
        (1 << (bits - 1)) | 1,  # smallest negative denormal
        ((1 << (bits - 1)) - 1),  # NaN with every payload bit set
        (((1 << (bits - 1)) - 1) ^ (1 << (mantissa - 1))) | 1,  # a signalling NaN
        (1 << bits) - 1,  # negative NaN, every bit set
    ]
    return np.concatenate([values, np.array(raw, u)])


def _bf16(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (numpy has no bf16): the top halves of float32s, plus the specials'."""
    top = (values.astype(np.float32).view("<u4") >> 16).astype("<u2")
    return np.concatenate([top, np.array([0x0001, 0x007F, 0x8001, 0x7FC1, 0xFF81, 0x7F80, 0xFFFF], "<u2")])


def _cases() -> list[tuple[str, bytes, int]]:
    rng = np.random.default_rng(3)
    normal = rng.standard_normal(999) * 0.05
    out = []
    for dtype in ("float16", "float32", "float64"):
        width = np.dtype(dtype).itemsize
        u = np.dtype(f"<u{width}")
        data = np.concatenate([_specials(dtype), normal.astype(dtype).view(u)])
        out.append((dtype, data.tobytes(), width))
    out.append(
        ("bfloat16", _bf16(np.concatenate([normal, [0.0, -0.0, np.inf, -np.inf, np.nan]])).tobytes(), 2)
    )
    return out


@pytest.mark.parametrize(("dtype", "data", "width"), _cases(), ids=[c[0] for c in _cases()])
def test_every_float_round_trips_bit_exactly(dtype: str, data: bytes, width: int) -> None:
    coded = forward(Transform.FPLANES, width, data, None)
    assert len(coded) == len(data)
    assert inverse(Transform.FPLANES, width, coded, None) == data
    # the reason for it: the sign is out of the top plane, which holds the exponent's top 8 bits
    top = np.frombuffer(coded, np.uint8)[-(len(data) // width) :]
    values = np.frombuffer(data, f"<u{width}")
    assert np.array_equal(top, ((values >> (8 * width - 9)) & 0xFF).astype(np.uint8))


def test_rotation_is_by_one_bit_on_known_values() -> None:
    one, minus_one = np.array([1.0, -1.0], "<f4").view("<u4")  # 0x3f800000, 0xbf800000
    rotated = np.frombuffer(rotate_left(np.array([one, minus_one], "<u4").tobytes(), 4), "<u4")
    assert [hex(v) for v in rotated] == ["0x7f000000", "0x7f000001"]
    assert split_planes(rotated.tobytes(), 4)[-2:] == b"\x7f\x7f"  # both exponents, signs gone


def test_odd_lengths_and_one_byte_elements_are_refused() -> None:
    with pytest.raises(ValueError, match="whole number of 4-byte elements"):
        forward(Transform.FPLANES, 4, bytes(7), None)
    with pytest.raises(ValueError, match="2, 4 or 8"):
        forward(Transform.FPLANES, 1, bytes(8), None)
    with pytest.raises(DeltaError, match="whole number"):
        join_into(Transform.FPLANES, 4, bytes(6), 6)
    with pytest.raises(DeltaError, match="2, 4 or 8"):
        join_into(Transform.FPLANES, 1, bytes(6), 6)
    with pytest.raises(DeltaError, match="holds 8 bytes for 12"):
        join_into(Transform.FPLANES, 4, bytes(8), 12)


def test_a_record_with_one_byte_elements_is_refused(tmp_path: Path) -> None:
    frame = zstandard.ZstdCompressor(level=1).compress(bytes(4))
    files = {"base": tmp_path / "base"}
    files["base"].write_bytes(BASE)
    (tmp_path / "t").mkdir()
    rec = tensor_record(Transform.FPLANES, 1, 4, 0, frame)
    refused(files, crafted([rec], bytes(4)), tmp_path / "t", "FPLANES needs elements of 2, 4 or 8")


@pytest.fixture(scope="module")
def unrelated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A float model coded against a base that shares nothing with it: FPLANES's use."""
    rng = np.random.default_rng(11)
    folder = tmp_path_factory.mktemp("fplanes")
    tensors = [
        ("w32", (rng.standard_normal(20000) * 0.04).astype(np.float32)),
        ("w16", (rng.standard_normal(12000) * 0.02).astype(np.float16)),
        ("odd", np.concatenate([_specials("float32").view("<f4"), rng.standard_normal(501).astype("<f4")])),
    ]
    base = [("other", rng.integers(0, 255, 30000).astype(np.uint8))]
    for name, ts in (("old.onnx", base), ("new.onnx", tensors)):
        (folder / name).write_bytes(onnx_model(ts)[0])
    encode(folder / "old.onnx", folder / "new.onnx", folder / "d.efd", level=19)
    return {"dir": folder, "base": folder / "old.onnx", "new": folder / "new.onnx", "good": folder / "d.efd"}


def test_the_encoder_picks_it_for_floats_without_a_useful_base(
    unrelated: dict[str, Path], tmp_path: Path
) -> None:
    made = info(unrelated["good"])
    assert made.target_bytes_by.get("fplanes", 0) >= 20000 * 4
    apply(unrelated["base"], unrelated["good"], tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == unrelated["new"].read_bytes()


def test_integers_get_no_fplanes(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    ints = [("i", rng.integers(-1000, 1000, 30000).astype(np.int64))]
    (tmp_path / "a.onnx").write_bytes(onnx_model([("x", np.zeros(10, np.uint8))])[0])
    (tmp_path / "b.onnx").write_bytes(onnx_model(ints)[0])
    made = encode(tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "d.efd", level=3)
    assert "fplanes" not in made.target_bytes_by
    apply(tmp_path / "a.onnx", tmp_path / "d.efd", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_offering_it_never_makes_a_delta_larger(
    unrelated: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The encoder takes FPLANES only where its frame is the smaller: without it (no tensor read as
    float), the same pair codes to at least as many bytes."""
    with_it = info(unrelated["good"]).delta_size
    monkeypatch.setattr(onnx_scan, "_FLOATS", frozenset())
    without = encode(unrelated["base"], unrelated["new"], tmp_path / "d.efd", level=19)
    assert "fplanes" not in without.target_bytes_by
    assert with_it < without.delta_size


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_fplanes_deltas_never_decode_to_anything_else(
    unrelated: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    """Resealed so the trailer passes; the mutations land in the FPLANES records half the time."""
    body = bytearray(unseal(unrelated["good"].read_bytes()))
    want = unrelated["new"].read_bytes()
    for _ in range(data.draw(st.integers(1, 4))):
        low = data.draw(st.sampled_from([0, len(body) // 2]))
        at = data.draw(st.integers(low, len(body) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "transform"]))
        if action == "flip":
            body[at] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del body[at : at + data.draw(st.integers(1, 64))]
        elif action == "insert":
            body[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        else:  # retag a TENSOR record's transform or width (op 5 is followed by those two bytes)
            ops = [
                i
                for i in range(len(body) - 2)
                if body[i] == 5 and body[i + 1] <= 5 and body[i + 2] in (1, 2, 4, 8)
            ]
            if ops:
                i = data.draw(st.sampled_from(ops))
                body[i + data.draw(st.integers(1, 2))] = data.draw(st.integers(0, 9))
    folder = tmp_path_factory.mktemp("fuzz")
    path, out = folder / "m.efd", folder / "out"
    path.write_bytes(reseal(bytes(body)))
    try:
        apply(unrelated["base"], path, out, max_output=1 << 20)
    except DeltaError:
        assert not out.exists()
    else:
        assert out.read_bytes() == want
    assert sorted(p.name for p in folder.iterdir()) == sorted(["m.efd", *(["out"] if out.exists() else [])])


@settings(max_examples=200, deadline=None)
@given(width=st.sampled_from([2, 4, 8]), data=st.data())
def test_any_frame_decodes_to_its_declared_size_or_is_refused(width: int, data: st.DataObject) -> None:
    """join_into on whatever a frame might hold: exactly `length` bytes whose forward is the input."""
    length = data.draw(st.integers(0, 64)) * width
    coded = data.draw(st.binary(min_size=0, max_size=length + width))
    try:
        joined = bytes(join_into(Transform.FPLANES, width, coded, length))
    except DeltaError:
        assert len(coded) != length
    else:
        assert len(joined) == length
        assert forward(Transform.FPLANES, width, joined, None) == coded
