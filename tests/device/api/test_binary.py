"""Triton's binary tensor data extension byte by byte: good bodies work, malformed ones get a reason."""

import gzip
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from device.engine.engine import Engine
from tests.device.api.conftest import TOKEN

URL = "/v2/models/surface-defect/infer"


def headers(json_length: int | None = None, **extra: str) -> dict[str, str]:
    out = {"Authorization": f"Bearer {TOKEN}", **extra}
    if json_length is not None:
        out["Inference-Header-Content-Length"] = str(json_length)
    return out


def binary_body(array: np.ndarray, request: dict[str, Any] | None = None, **tensor: Any) -> tuple[bytes, int]:
    """A v2 request with `array` as the binary input `image`; `tensor` overrides its JSON fields."""
    raw = array.tobytes()
    spec = {
        "name": "image",
        "shape": list(array.shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": len(raw)},
        **tensor,
    }
    header = json.dumps({"inputs": [spec], **(request or {})}).encode()
    return header + raw, len(header)


def split(response: httpx.Response) -> tuple[dict[str, Any], bytes]:
    length = int(response.headers["Inference-Header-Content-Length"])
    return json.loads(response.content[:length]), response.content[length:]


def post(api: str, body: bytes, json_length: int | None, **extra: str) -> httpx.Response:
    return httpx.post(f"{api}{URL}", content=body, headers=headers(json_length, **extra))


def test_binary_in_binary_out_matches_the_engine(api: str, served: Engine) -> None:
    array = np.random.default_rng(3).normal(size=(2, 3, 64, 64)).astype(np.float32)
    body, length = binary_body(array, {"parameters": {"binary_data_output": True}})
    response = post(api, body, length)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    meta, blob = split(response)
    assert meta["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 32}}
    ]
    got = np.frombuffer(blob, np.float32).reshape(2, 4)
    np.testing.assert_allclose(got, served.run("surface-defect", {"image": array})["logits"], rtol=1e-5)


def test_json_input_with_a_binary_output_asked_for_by_name(api: str) -> None:
    request = {
        "inputs": [{"name": "image", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [0.0] * 12288}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }
    response = httpx.post(f"{api}{URL}", json=request, headers=headers())
    assert response.status_code == 200, response.text
    meta, blob = split(response)
    assert meta["outputs"][0]["parameters"] == {"binary_data_size": 16} and len(blob) == 16


def test_an_unaligned_tensor_is_read_correctly(api: str, served: Engine) -> None:
    array = np.arange(12288, dtype=np.float32).reshape(1, 3, 64, 64) / 12288
    for pad in range(4):  # the JSON's length decides where the tensor starts
        body, length = binary_body(array, {"id": "x" * pad, "parameters": {"binary_data_output": True}})
        response = post(api, body, length)
        assert response.status_code == 200, response.text
        got = np.frombuffer(split(response)[1], np.float32)
        np.testing.assert_allclose(
            got, served.run("surface-defect", {"image": array})["logits"][0], rtol=1e-5
        )


def bad_requests() -> Iterator[Any]:
    ones = np.ones((1, 3, 64, 64), np.float32)
    body, length = binary_body(ones)
    yield pytest.param(body, length + 10**6, 422, "body is", id="header-length-past-the-end")
    yield pytest.param(body, "12x", 422, "Inference-Header-Content-Length", id="header-length-not-a-number")
    yield pytest.param(body, None, 422, "need the Inference-Header", id="binary-without-header-length")
    yield pytest.param(body + b"junk", length, 400, "after the JSON", id="trailing-bytes")
    yield pytest.param(body[:-4], length, 400, "runs past the end", id="short-tensor")
    yield pytest.param(
        *binary_body(ones, parameters={"binary_data_size": 100}), 400, "take 49152", id="size-lie"
    )
    yield pytest.param(
        *binary_body(ones, parameters={"binary_data_size": -1}), 400, "byte count", id="negative"
    )
    yield pytest.param(
        *binary_body(ones, shape=[2**40, 2**40, 3, 64]), 400, "binary_data_size is 49152", id="huge-shape"
    )
    yield pytest.param(*binary_body(ones, datatype="FP64"), 400, "unknown datatype", id="unknown-dtype")
    yield pytest.param(*binary_body(ones, datatype="INT32"), 400, "must be float32", id="wrong-dtype")
    yield pytest.param(*binary_body(ones, data=[1.0]), 400, "both JSON data", id="data-and-binary")
    yield pytest.param(
        *binary_body(ones, parameters={"binary_data_size": 49152, "shared_memory_region": "r0"}),
        400,
        "not supported",
        id="shared-memory",
    )
    yield pytest.param(
        *binary_body(ones, {"outputs": [{"name": "logits", "parameters": {"classification": 2}}]}),
        400,
        "not supported",
        id="classification",
    )
    yield pytest.param(
        *binary_body(ones, {"outputs": [{"name": "boxes"}]}), 400, "do not exist", id="unknown-output"
    )
    yield pytest.param(b'{"inputs": [{"name": "image"}]}', None, 422, "inputs.0.shape", id="no-shape")


@pytest.mark.parametrize(("body", "json_length", "status", "message"), list(bad_requests()))
def test_malformed_binary_requests_get_a_reason(
    api: str, body: bytes, json_length: Any, status: int, message: str
) -> None:
    response = httpx.post(f"{api}{URL}", content=body, headers=headers(json_length))
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_a_compressed_bomb_is_refused_at_the_body_cap(api: str) -> None:
    bomb = gzip.compress(b"\0" * (17 * 1024 * 1024))
    assert len(bomb) < 100_000
    response = post(api, bomb, None, **{"Content-Encoding": "gzip"})
    assert response.status_code == 413 and "exceeds" in response.json()["error"]


def test_an_unknown_content_encoding_is_415(api: str) -> None:
    body, length = binary_body(np.ones((1, 3, 64, 64), np.float32))
    response = post(api, body, length, **{"Content-Encoding": "br"})
    assert response.status_code == 415 and "gzip" in response.json()["error"]


def test_a_streamed_body_over_the_cap_is_413(api: str) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap must hold while reading
        for _ in range(17):
            yield b"\0" * (1024 * 1024)

    response = httpx.post(f"{api}{URL}", content=chunks(), headers=headers(16))
    assert response.status_code == 413 and "exceeds" in response.json()["error"]


def test_the_fastapi_route_behind_the_fast_path_answers_the_same(served: Engine) -> None:
    import asyncio

    from device.api import create_app

    inner = create_app(served, dict, TOKEN).app.app  # InferFastPath -> BodySizeLimit -> FastAPI
    body, length = binary_body(
        np.ones((1, 3, 64, 64), np.float32), {"parameters": {"binary_data_output": True}}
    )

    async def post_both() -> list[httpx.Response]:
        out = []
        for app in (inner, create_app(served, dict, TOKEN)):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://device") as client:
                out.append(await client.post(URL, content=body, headers=headers(length)))
                out.append(await client.post(URL, content=body, headers={}))
        return out

    route_ok, route_401, fast_ok, fast_401 = asyncio.run(post_both())
    assert route_ok.status_code == fast_ok.status_code == 200
    assert route_ok.content == fast_ok.content
    assert (
        route_ok.headers["inference-header-content-length"]
        == fast_ok.headers["inference-header-content-length"]
    )
    assert route_401.status_code == fast_401.status_code == 401
    assert route_401.json() == fast_401.json()
