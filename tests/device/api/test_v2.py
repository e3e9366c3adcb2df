"""v2 request decoding (device/api/v2.py): what is remembered of a JSON part, and what is not."""

import json

import numpy as np
import pytest

from device.api import v2
from device.errors import InferenceInputError
from tests.device.api.test_binary import binary_body


def test_a_repeated_json_part_reads_each_requests_own_tensors() -> None:
    first, second = np.zeros((1, 3, 4, 4), np.float32), np.ones((1, 3, 4, 4), np.float32)
    body_a, length = binary_body(first)
    body_b, length_b = binary_body(second)
    assert body_a[:length] == body_b[:length_b]  # the same JSON part, the plan is reused
    v2._cached_plan.cache_clear()
    a = v2.parse_infer_request(body_a, str(length))
    b = v2.parse_infer_request(body_b, str(length_b))
    assert v2._cached_plan.cache_info().hits == 1
    np.testing.assert_array_equal(a.inputs["image"], first)
    np.testing.assert_array_equal(b.inputs["image"], second)


def test_a_bad_json_part_is_refused_every_time() -> None:
    body, length = binary_body(np.zeros((1, 3, 4, 4), np.float32), parameters={"binary_data_size": 7})
    for _ in range(2):  # errors are not remembered: each request is told why
        with pytest.raises(InferenceInputError, match="binary_data_size is 7 bytes"):
            v2.parse_infer_request(body, str(length))


def test_the_same_json_part_with_a_different_body_length_is_checked_again() -> None:
    body, length = binary_body(np.zeros((1, 3, 4, 4), np.float32))
    v2.parse_infer_request(body, str(length))
    with pytest.raises(InferenceInputError, match="runs past the end of the body"):
        v2.parse_infer_request(body[:-4], str(length))
    with pytest.raises(InferenceInputError, match="bytes after the JSON"):
        v2.parse_infer_request(body + b"\0\0\0\0", str(length))


def test_json_data_from_a_remembered_plan_is_shared_read_only() -> None:
    request = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "INT32", "data": [1, 2]}]}
    body = json.dumps(request).encode()
    a = v2.parse_infer_request(body, None)
    b = v2.parse_infer_request(body, None)
    np.testing.assert_array_equal(a.inputs["x"], [[1, 2]])
    assert not a.inputs["x"].flags.writeable and a.inputs["x"] is b.inputs["x"]


def test_a_json_part_over_the_cache_limit_is_still_read() -> None:
    padding = "p" * (v2.PLAN_CACHE_MAX_JSON + 1)
    body, length = binary_body(np.ones((1, 3, 4, 4), np.float32), {"id": padding})
    parsed = v2.parse_infer_request(body, str(length))
    assert parsed.id == padding and parsed.inputs["image"].shape == (1, 3, 4, 4)
