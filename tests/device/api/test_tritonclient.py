"""Triton's own Python client (`tritonclient[http]`), unchanged, against the device's v2 endpoints."""

import threading
from pathlib import Path

import numpy as np
import pytest

from device.engine.batcher import BatchConfig
from device.engine.engine import Engine
from tests.device.api.conftest import TOKEN
from tests.device.engine.onnx_models import rows_of_three, serve_bare

httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the dev extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402


def auth() -> dict[str, str]:
    # A fresh dict per call: tritonclient writes its Inference-Header-Content-Length into the dict it is
    # given, and a stale one would cut the next request's JSON short.
    return {"Authorization": f"Bearer {TOKEN}"}


MODEL = "surface-defect"


def client(api: str, concurrency: int = 1) -> "httpclient.InferenceServerClient":
    return httpclient.InferenceServerClient(api.removeprefix("http://"), concurrency=concurrency)


def image_input(array: np.ndarray, binary: bool = True, name: str = "image") -> "httpclient.InferInput":
    tensor = httpclient.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 64, 64)).astype(np.float32)


def test_health_readiness_and_metadata(api: str) -> None:
    triton = client(api)
    assert triton.is_server_live()
    assert not triton.is_server_ready()  # readiness is behind auth
    assert triton.is_server_ready(headers=auth())
    assert triton.is_model_ready(MODEL, headers=auth())
    assert triton.is_model_ready(MODEL, "1", headers=auth())
    assert not triton.is_model_ready(MODEL, "2", headers=auth())
    assert "binary_tensor_data" in triton.get_server_metadata(headers=auth())["extensions"]
    meta = triton.get_model_metadata(MODEL, headers=auth())
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 64, 64]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 4]}]


def test_binary_infer_by_default_matches_the_engine(api: str, served: Engine) -> None:
    array = images(3)
    result = client(api).infer(MODEL, [image_input(array)], headers=auth(), request_id="req-7")
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_version"] == "1"
    assert response["outputs"][0]["parameters"] == {"binary_data_size": 3 * 4 * 4}  # came back binary
    expected = served.run(MODEL, {"image": array})["logits"]
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)


def test_json_tensors_both_ways(api: str, served: Engine) -> None:
    array = images(2, seed=1)
    wanted = [httpclient.InferRequestedOutput("logits", binary_data=False)]
    result = client(api).infer(MODEL, [image_input(array, binary=False)], outputs=wanted, headers=auth())
    output = result.get_response()["outputs"][0]
    assert "parameters" not in output and len(output["data"]) == 8
    expected = served.run(MODEL, {"image": array})["logits"]
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_compressed_requests(api: str, compression: str) -> None:
    result = client(api).infer(
        MODEL, [image_input(images(1))], headers=auth(), request_compression_algorithm=compression
    )
    assert result.as_numpy("logits").shape == (1, 4)


def test_versioned_infer(api: str) -> None:
    triton = client(api)
    assert triton.infer(MODEL, [image_input(images(1))], "1", headers=auth()).as_numpy("logits").shape == (
        1,
        4,
    )
    with pytest.raises(InferenceServerException, match="serves version 1, not 9") as caught:
        triton.infer(MODEL, [image_input(images(1))], "9", headers=auth())
    assert caught.value.status() == "404"


@pytest.mark.parametrize(
    ("shape", "name", "message"),
    [((1, 3, 32, 32), "image", "must have shape"), ((1, 3, 64, 64), "img", "inputs must be exactly")],
)
@pytest.mark.parametrize("binary", [True, False])
def test_wrong_inputs_reach_the_client_as_400_with_the_reason(
    api: str, shape: tuple[int, ...], name: str, message: str, binary: bool
) -> None:
    tensor = image_input(np.zeros(shape, np.float32), binary=binary, name=name)
    with pytest.raises(InferenceServerException, match=message) as caught:
        client(api).infer(MODEL, [tensor], headers=auth())
    assert caught.value.status() == "400"


def test_wrong_dtype_unknown_model_and_missing_token(api: str) -> None:
    triton = client(api)
    as_fp64 = httpclient.InferInput("image", [1, 3, 64, 64], "FP64")
    as_fp64.set_data_from_numpy(np.zeros((1, 3, 64, 64), np.float64))
    with pytest.raises(InferenceServerException, match="unknown datatype 'FP64'") as caught:
        triton.infer(MODEL, [as_fp64], headers=auth())
    assert caught.value.status() == "400"
    with pytest.raises(InferenceServerException, match="no model named 'nope'") as caught:
        triton.infer("nope", [image_input(images(1))], headers=auth())
    assert caught.value.status() == "404"
    with pytest.raises(InferenceServerException, match="bearer token") as caught:
        triton.infer(MODEL, [image_input(images(1))])
    assert caught.value.status() == "401"


def test_concurrent_clients_each_get_their_own_rows(api: str, served: Engine) -> None:
    served.configure_batching(MODEL, BatchConfig(max_batch=16, max_wait_ms=50))
    arrays = [images(1 + i % 2, seed=i) for i in range(12)]
    got: dict[int, np.ndarray] = {}
    start = threading.Barrier(len(arrays))

    def call(i: int) -> None:
        triton = client(api)
        start.wait()
        got[i] = triton.infer(MODEL, [image_input(arrays[i])], headers=auth()).as_numpy("logits")

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(arrays))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, array in enumerate(arrays):
        np.testing.assert_allclose(
            got[i], served.run(MODEL, {"image": array})["logits"], rtol=1e-4, atol=1e-5
        )
    assert served.batcher_stats(MODEL)["batches"] < len(arrays)  # some requests shared a call


def test_overload_is_a_503_with_a_reason(api: str, served: Engine) -> None:
    served.configure_batching(MODEL, BatchConfig(max_batch=1, max_queue=1))
    triton = client(api, concurrency=12)
    pending = [triton.async_infer(MODEL, [image_input(images(128))], headers=auth()) for _ in range(12)]
    outcomes = []
    for request in pending:
        try:
            outcomes.append(request.get_result().as_numpy("logits").shape)
        except InferenceServerException as e:
            outcomes.append((e.status(), e.message()))
    refused = [o for o in outcomes if o[0] == "503"]
    assert refused and "overloaded" in str(refused[0][1])
    assert all(o == (128, 4) for o in outcomes if o[0] != "503")
    assert served.batcher_stats(MODEL)["refused"] == len(refused)


def test_a_crashing_model_fails_alone(api: str, served: Engine, tmp_path: Path) -> None:
    crashy = serve_bare(served, rows_of_three(tmp_path))
    triton = client(api)
    tensor = httpclient.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    with pytest.raises(InferenceServerException, match="rows-of-three failed on onnxruntime-cpu") as caught:
        triton.infer("rows-of-three", [tensor], headers=auth())
    assert caught.value.status() == "500"
    assert crashy.stats.errors == 1
    assert triton.infer(MODEL, [image_input(images(1))], headers=auth()).as_numpy("logits").shape == (1, 4)
    fine = httpclient.InferInput("x", [3, 4], "FP32")
    fine.set_data_from_numpy(np.ones((3, 4), np.float32))
    assert triton.infer("rows-of-three", [fine], headers=auth()).as_numpy("y").shape == (3, 4)
