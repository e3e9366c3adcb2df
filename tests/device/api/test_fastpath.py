"""The lean infer route (device/api/fastpath.py) on a real socket, and the pieces it leans on."""

import json
import socket

import httpx
import numpy as np
import pytest

from device.api.fastpath import bearer_credentials
from device.api.ratelimit import FailedLoginLimiter
from device.api.v2 import ParsedRequest, encode_infer_response
from device.engine.engine import Engine
from tests.device.api.conftest import TOKEN
from tests.device.api.test_binary import binary_body

URL = "/v2/models/surface-defect/infer"


def raw_exchange(api: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request written byte for byte (headers httpx would merge or refuse), one answer read."""
    host, port = api.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        stream = sock.makefile("rb")
        status = int(stream.readline().split()[1])
        headers = {}
        while (line := stream.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers, stream.read(int(headers["content-length"]))


def request_bytes(body: bytes, *headers: str) -> bytes:
    lines = [f"POST {URL} HTTP/1.1", "Host: device", f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode() + body


def test_the_declared_size_is_refused_before_the_credential_is_read(api: str) -> None:
    # As the size guard in front of every other route does: 413, not 401, and no body is read.
    request = f"POST {URL} HTTP/1.1\r\nHost: device\r\nContent-Length: {17 * 1024 * 1024}\r\n\r\n"
    status, _, body = raw_exchange(api, request.encode())
    assert status == 413 and "exceeds" in json.loads(body)["error"]


def test_the_first_of_repeated_headers_counts(api: str, served: Engine) -> None:
    array = np.random.default_rng(5).normal(size=(1, 3, 64, 64)).astype(np.float32)
    body, length = binary_body(array, {"parameters": {"binary_data_output": True}})
    status, headers, answer = raw_exchange(
        api,
        request_bytes(
            body,
            f"Authorization: Bearer {TOKEN}",
            "Authorization: Bearer wrong",
            f"Inference-Header-Content-Length: {length}",
            "Inference-Header-Content-Length: 1",
        ),
    )
    assert status == 200, answer
    cut = int(headers["inference-header-content-length"])
    assert headers["content-type"] == "application/octet-stream"
    logits = np.frombuffer(answer[cut:], np.float32).reshape(1, 4)
    np.testing.assert_allclose(logits, served.run("surface-defect", {"image": array})["logits"], rtol=1e-5)


@pytest.mark.parametrize(
    ("authorization", "status"),
    [(f"bearer {TOKEN}", 200), (f"BEARER   {TOKEN}", 200), (f"Basic {TOKEN}", 401), ("Bearer", 401)],
)
def test_the_scheme_is_read_as_fastapi_reads_it(api: str, authorization: str, status: int) -> None:
    body, length = binary_body(np.ones((1, 3, 64, 64), np.float32))
    headers = {"Authorization": authorization, "Inference-Header-Content-Length": str(length)}
    response = httpx.post(f"{api}{URL}", content=body, headers=headers)
    assert response.status_code == status, response.text
    if status == 401:
        assert response.json() == {"error": "missing or wrong bearer token"}
        assert response.headers["www-authenticate"] == "Bearer"


def test_versions_in_the_path_are_checked(api: str) -> None:
    body, length = binary_body(np.ones((1, 3, 64, 64), np.float32))
    headers = {"Authorization": f"Bearer {TOKEN}", "Inference-Header-Content-Length": str(length)}
    ok = httpx.post(f"{api}/v2/models/surface-defect/versions/1/infer", content=body, headers=headers)
    assert ok.status_code == 200
    assert ok.json()["model_version"] == "1"
    other = httpx.post(f"{api}/v2/models/surface-defect/versions/7/infer", content=body, headers=headers)
    assert other.status_code == 404 and "serves version 1" in other.json()["error"]


def test_other_methods_and_paths_go_to_the_full_app(api: str) -> None:
    answer = httpx.get(f"{api}{URL}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 405  # FastAPI's router answers: the route is POST only


class _Model:
    def __init__(self, name: str, version: int) -> None:
        self.name, self.version = name, version


class _Serving:
    def __init__(self, name: str) -> None:
        self.manifest = _Model(name, 4)


@pytest.mark.parametrize("name", ["surface-defect", 'odd "name"\\ü'])
def test_the_written_out_response_is_the_json_it_claims(name: str) -> None:
    outputs: dict[str, np.ndarray] = {
        'logits "x"\n': np.arange(8, dtype=np.float32).reshape(2, 4),
        "count": np.array([3, 1], np.int64),
        "scalar": np.array(2.5, np.float32),
    }
    request = ParsedRequest('id "7"', {}, [('logits "x"\n', True), ("count", False), ("scalar", True)], False)
    body, cut = encode_infer_response(_Serving(name), outputs, request)  # type: ignore[arg-type]
    assert cut is not None
    assert json.loads(body[:cut]) == {
        "model_name": name,
        "model_version": "4",
        "outputs": [
            {
                "name": 'logits "x"\n',
                "datatype": "FP32",
                "shape": [2, 4],
                "parameters": {"binary_data_size": 32},
            },
            {"name": "count", "datatype": "INT64", "shape": [2], "data": [3, 1]},
            {"name": "scalar", "datatype": "FP32", "shape": [], "parameters": {"binary_data_size": 4}},
        ],
        "id": 'id "7"',
    }
    assert body[cut:] == outputs['logits "x"\n'].tobytes() + outputs["scalar"].tobytes()


def test_bearer_credentials_cases() -> None:
    assert bearer_credentials(None) is None
    assert bearer_credentials("") is None
    assert bearer_credentials("Bearer ") is None
    assert bearer_credentials("Token abc") is None
    assert bearer_credentials("bearer  abc ") == "abc"


def test_the_limiter_keeps_nothing_for_clients_that_never_failed() -> None:
    limiter = FailedLoginLimiter(max_failures=2, window_s=60)
    for i in range(100):
        assert limiter.blocked_for(f"10.0.0.{i}", now=0) == 0
    assert not limiter._failures  # asked on every request: it must not grow with the callers
    limiter.failed("10.0.0.1", now=0)
    limiter.failed("10.0.0.1", now=1)
    assert limiter.blocked_for("10.0.0.1", now=2) == 58
