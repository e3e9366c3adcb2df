"""InputCheck (a model's precompiled input check) gives check_inputs' verdicts, case for case."""

import numpy as np
import pytest

from device.engine.engine import InputCheck, check_inputs
from device.errors import InferenceInputError
from models.manifest import TensorSpec

SPECS = [
    TensorSpec(name="image", dtype="float32", shape=[-1, 3, 8, 8]),
    TensorSpec(name="scale", dtype="int64", shape=[-1, 1]),
]
FIXED = [TensorSpec(name="x", dtype="float32", shape=[1, 4])]
RAGGED = [TensorSpec(name="tokens", dtype="int64", shape=[-1, -1])]
SCALAR = [TensorSpec(name="t", dtype="float32", shape=[])]


def image(rows: int = 2, dtype: str = "float32", size: int = 8) -> np.ndarray:
    return np.zeros((rows, 3, size, size), dtype)


CASES = [
    (SPECS, {"image": image(), "scale": np.ones((2, 1), np.int64)}),
    (SPECS, {"scale": np.ones((5, 1), np.int64), "image": image(5)}),  # any order
    (SPECS, {"image": image()}),  # one missing
    (SPECS, {"image": image(), "scale": np.ones((2, 1), np.int64), "extra": image()}),
    (SPECS, {"img": image(), "scale": np.ones((2, 1), np.int64)}),  # misnamed
    (SPECS, {"image": image(dtype="float64"), "scale": np.ones((2, 1), np.int64)}),
    (SPECS, {"image": image(size=9), "scale": np.ones((2, 1), np.int64)}),
    (SPECS, {"image": np.zeros((3, 8, 8), np.float32), "scale": np.ones((2, 1), np.int64)}),  # rank
    (SPECS, {"image": image(), "scale": np.ones((2, 1, 1), np.int64)}),
    (FIXED, {"x": np.zeros((1, 4), np.float32)}),
    (FIXED, {"x": np.zeros((2, 4), np.float32)}),  # a fixed first dim is checked too
    (RAGGED, {"tokens": np.zeros((2, 7), np.int64)}),  # a dynamic later dim: check_inputs decides
    (RAGGED, {"tokens": np.zeros((2, 7, 1), np.int64)}),
    (SCALAR, {"t": np.ones((), np.float32)}),
    (SCALAR, {"t": np.ones((1,), np.float32)}),
]


def verdict(check: object, inputs: dict[str, np.ndarray]) -> object:
    try:
        checked = check(inputs)  # type: ignore[operator]
    except InferenceInputError as e:
        return ("refused", str(e))
    return ("passed", {name: (a.shape, a.dtype, a.flags.c_contiguous) for name, a in checked.items()})


@pytest.mark.parametrize(("specs", "inputs"), CASES)
def test_the_same_verdict_and_message_as_check_inputs(
    specs: list[TensorSpec], inputs: dict[str, np.ndarray]
) -> None:
    assert verdict(InputCheck(specs), inputs) == verdict(lambda i: check_inputs(specs, i), inputs)


def test_a_strided_input_is_passed_on_contiguous_with_the_same_values() -> None:
    wide = np.arange(2 * 3 * 8 * 16, dtype=np.float32).reshape(2, 3, 8, 16)
    strided = wide[:, :, :, ::2]
    checked = InputCheck(SPECS)({"image": strided, "scale": np.ones((2, 1), np.int64)})
    assert checked["image"].flags.c_contiguous
    np.testing.assert_array_equal(checked["image"], strided)


def test_a_contiguous_input_is_passed_on_as_it_is() -> None:
    array = image()
    assert InputCheck(SPECS)({"image": array, "scale": np.ones((2, 1), np.int64)})["image"] is array
