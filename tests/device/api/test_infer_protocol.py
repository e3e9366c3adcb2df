"""Infer requests answered by the HTTP protocol (device/api/infer_protocol.py), on real sockets.

The `api` fixture serves the app as the agent does (device/api/server.py); `plain_api` serves the same
app through plain uvicorn and ASGI, so both can be asked the same thing.
"""

import json
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from device.api import create_app, infer_protocol
from device.api.fastpath import InferFastPath
from device.api.limits import Receive, Scope, Send
from device.api.server import api_server_config
from device.engine.engine import Engine
from fleet.ca import FleetCA
from tests.asgi_server import serving
from tests.device.api.conftest import TOKEN
from tests.device.api.test_binary import binary_body

URL = "/v2/models/surface-defect/infer"
IMAGE = np.random.default_rng(11).normal(size=(1, 3, 64, 64)).astype(np.float32)


@pytest.fixture
def plain_api(served: Engine) -> Iterator[str]:
    app = create_app(served, lambda: {"device_id": "dev-a"}, TOKEN, lambda: {"update_state": "idle"})
    with serving(app, http="httptools") as url:
        yield url


def connect(api: str) -> socket.socket:
    host, port = api.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def infer_request(
    body: bytes, length: int | None, *extra: str, token: str = TOKEN, target: str = URL, version: str = "1.1"
) -> bytes:
    lines = [f"POST {target} HTTP/{version}", "Host: device", f"Content-Length: {len(body)}"]
    lines.append(f"Authorization: Bearer {token}")
    if length is not None:
        lines.append(f"Inference-Header-Content-Length: {length}")
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode() + body


class Answers:
    """Reads HTTP/1.1 answers off one connection, one after another."""

    def __init__(self, sock: socket.socket) -> None:
        self.stream = sock.makefile("rb")

    def next(self) -> tuple[int, dict[str, str], bytes]:
        status_line = self.stream.readline()
        assert status_line, "the server closed the connection"
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := self.stream.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if status == 100:
            return status, headers, b""
        return status, headers, self.stream.read(int(headers["content-length"]))

    def closed(self) -> bool:
        return self.stream.read(1) == b""


def logits(headers: dict[str, str], answer: bytes) -> np.ndarray:
    cut = int(headers["inference-header-content-length"])
    return np.frombuffer(answer[cut:], np.float32).reshape(1, 4)


def test_the_device_server_answers_infer_from_the_protocol(served: Engine) -> None:
    app = create_app(served, dict, TOKEN)
    config = api_server_config(app, "127.0.0.1", 0)
    config.load()
    assert issubclass(config.http_protocol_class, infer_protocol.InferHttpProtocol)
    assert config.proxy_headers is False  # the failed-login limiter counts the real peer


def test_without_the_internals_it_relies_on_the_server_falls_back_to_asgi(
    served: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(infer_protocol, "STATUS_LINE", {})
    app = create_app(served, dict, TOKEN)
    with caplog.at_level(logging.WARNING):
        config = api_server_config(app, "127.0.0.1", 0)
    config.load()
    assert not issubclass(config.http_protocol_class, infer_protocol.InferHttpProtocol)
    assert "ASGI path" in caplog.text


def test_many_requests_on_one_keep_alive_connection(api: str, served: Engine) -> None:
    body, length = binary_body(IMAGE, {"parameters": {"binary_data_output": True}})
    expected = served.run("surface-defect", {"image": IMAGE})["logits"]
    with connect(api) as sock:
        answers = Answers(sock)
        for _ in range(5):
            sock.sendall(infer_request(body, length))
            status, headers, answer = answers.next()
            assert status == 200, answer
            assert headers["content-type"] == "application/octet-stream"
            assert "date" in headers and "server" in headers  # uvicorn's default headers, as elsewhere
            np.testing.assert_allclose(logits(headers, answer), expected, rtol=1e-5)


def test_pipelined_requests_are_answered_in_order(api: str) -> None:
    # An infer request, a GET and another infer request in one write: the second and third wait
    # behind the first (uvicorn's queue), and the answers come back in the order asked.
    body, length = binary_body(IMAGE, {"parameters": {"binary_data_output": True}})
    infer = infer_request(body, length)
    get = f"GET /v2/models/surface-defect HTTP/1.1\r\nHost: d\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    with connect(api) as sock:
        sock.sendall(infer + get.encode() + infer)
        answers = Answers(sock)
        first, second, third = answers.next(), answers.next(), answers.next()
    assert [first[0], second[0], third[0]] == [200, 200, 200]
    assert "inference-header-content-length" in first[1] and "inference-header-content-length" in third[1]
    assert json.loads(second[2])["name"] == "surface-defect"
    np.testing.assert_array_equal(logits(first[1], first[2]), logits(third[1], third[2]))


def test_expect_100_continue_is_answered_only_for_an_allowed_request(api: str) -> None:
    body, length = binary_body(IMAGE)
    head = infer_request(b"", length, "Expect: 100-continue").replace(
        b"Content-Length: 0", f"Content-Length: {len(body)}".encode()
    )
    with connect(api) as sock:
        sock.sendall(head)
        answers = Answers(sock)
        assert answers.next()[0] == 100  # go on: the credential and size were checked
        sock.sendall(body)
        status, _, answer = answers.next()
        assert status == 200, answer
    with connect(api) as sock:
        sock.sendall(head.replace(TOKEN.encode(), b"wrong-token"))
        status, headers, answer = Answers(sock).next()
        assert status == 401 and headers["www-authenticate"] == "Bearer"  # no body was sent


def test_an_oversized_body_is_refused_and_the_connection_closed(api: str) -> None:
    # No Content-Length to refuse it by: chunked, counted as it arrives.
    chunk = b"x" * (1024 * 1024)
    head = (
        f"POST {URL} HTTP/1.1\r\nHost: d\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    with connect(api) as sock:
        sock.sendall(head)
        answers = Answers(sock)
        try:
            for _ in range(17):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading once it had answered
        status, headers, answer = answers.next()
        assert status == 413 and "exceeds" in json.loads(answer)["error"]
        assert headers["connection"] == "close"


def test_a_chunked_body_within_the_limit_is_read_whole(api: str, served: Engine) -> None:
    body, length = binary_body(IMAGE, {"parameters": {"binary_data_output": True}})
    head = (
        f"POST {URL} HTTP/1.1\r\nHost: d\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Inference-Header-Content-Length: {length}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    pieces = [body[i : i + 7000] for i in range(0, len(body), 7000)]
    chunked = b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
    with connect(api) as sock:
        sock.sendall(head + chunked)
        status, headers, answer = Answers(sock).next()
    assert status == 200, answer
    expected = served.run("surface-defect", {"image": IMAGE})["logits"]
    np.testing.assert_allclose(logits(headers, answer), expected, rtol=1e-5)


def test_http_1_0_gets_its_answer_and_a_closed_connection(api: str) -> None:
    body, length = binary_body(IMAGE)
    with connect(api) as sock:
        sock.sendall(infer_request(body, length, version="1.0"))
        answers = Answers(sock)
        status, headers, _ = answers.next()
        assert status == 200 and headers["connection"] == "close"
        assert answers.closed()


def test_a_client_that_leaves_mid_request_costs_nobody_else(api: str) -> None:
    body, length = binary_body(IMAGE)
    for _ in range(20):  # gone while its request is queued, running, or being answered
        with connect(api) as sock:
            sock.sendall(infer_request(body, length))
    with connect(api) as sock:
        sock.sendall(infer_request(body, length))
        assert Answers(sock).next()[0] == 200


def test_a_bug_is_logged_and_answered_500(
    api: str, served: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("a bug in the engine")

    monkeypatch.setattr(served, "submit_async", broken)
    body, length = binary_body(IMAGE)
    with caplog.at_level(logging.ERROR, logger="device.api.infer_protocol"), connect(api) as sock:
        sock.sendall(infer_request(body, length))
        answers = Answers(sock)
        status, headers, answer = answers.next()
        assert status == 500 and answer == b"Internal Server Error" and headers["connection"] == "close"
        assert answers.closed()
    assert "a bug in the engine" in caplog.text
    assert TOKEN not in caplog.text


@pytest.mark.parametrize(
    ("name", "build"),
    [
        ("ok", lambda: infer_request(*binary_body(IMAGE))),
        (
            "binary out",
            lambda: infer_request(*binary_body(IMAGE, {"parameters": {"binary_data_output": True}})),
        ),
        ("json tensors", lambda: infer_request(json.dumps(_json_request()).encode(), None)),
        ("wrong token", lambda: infer_request(*binary_body(IMAGE), token="nope")),
        ("wrong shape", lambda: infer_request(*binary_body(np.ones((1, 3, 32, 32), np.float32)))),
        ("not json", lambda: infer_request(b"{not json", None)),
        ("header length past the body", lambda: infer_request(b"{}", 99)),
        ("unknown model", lambda: infer_request(*binary_body(IMAGE), target="/v2/models/nope/infer")),
        (
            "wrong version",
            lambda: infer_request(*binary_body(IMAGE), target=URL.replace("/infer", "/versions/9/infer")),
        ),
        (
            "right version",
            lambda: infer_request(*binary_body(IMAGE), target=URL.replace("/infer", "/versions/1/infer")),
        ),
        ("query string (ASGI way)", lambda: infer_request(*binary_body(IMAGE), target=URL + "?x=1")),
        (
            "escaped name (ASGI way)",
            lambda: infer_request(*binary_body(IMAGE), target=URL.replace("-", "%2D")),
        ),
        ("gzip that is not", lambda: infer_request(*binary_body(IMAGE), "Content-Encoding: gzip")),
    ],
)
def test_both_servers_answer_alike(api: str, plain_api: str, name: str, build: object) -> None:
    request = build()  # type: ignore[operator]
    answers = []
    for url in (api, plain_api):
        with connect(url) as sock:
            sock.sendall(request)
            status, headers, body = Answers(sock).next()
        kept = {
            k: v
            for k, v in headers.items()
            if k in ("content-type", "inference-header-content-length", "www-authenticate", "retry-after")
        }
        answers.append((status, kept, body))
    assert answers[0] == answers[1], name


def _json_request() -> dict[str, object]:
    tensor = {"name": "image", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": IMAGE.ravel().tolist()}
    return {"inputs": [tensor], "id": "req-7"}


def test_an_overloaded_model_answers_503_with_retry_after(api: str, served: Engine) -> None:
    from device.engine.batcher import BatchConfig

    served.configure_batching("surface-defect", BatchConfig(max_batch=1, max_queue=1))
    body, length = binary_body(IMAGE)
    socks = [connect(api) for _ in range(12)]
    try:
        for sock in socks:
            sock.sendall(infer_request(body, length))
        statuses = []
        for sock in socks:
            status, headers, answer = Answers(sock).next()
            statuses.append(status)
            if status == 503:
                assert headers["retry-after"] == "1" and "overloaded" in json.loads(answer)["error"]
    finally:
        for sock in socks:
            sock.close()
    assert 200 in statuses and 503 in statuses


def test_httpx_and_keep_alive_pool(api: str) -> None:
    body, length = binary_body(IMAGE)
    headers = {"Authorization": f"Bearer {TOKEN}", "Inference-Header-Content-Length": str(length)}
    with httpx.Client(base_url=api) as client:
        for _ in range(3):
            assert client.post(URL, content=body, headers=headers).status_code == 200
        assert client.get("/v2/health/live").json() == {"live": True}


def test_uvicorn_has_what_the_protocol_leans_on() -> None:
    # A uvicorn upgrade that drops these makes protocol_for return None (plain ASGI, slower, correct);
    # this test says so loudly instead.
    assert infer_protocol.protocol_for.__module__ == "device.api.infer_protocol"
    assert infer_protocol._has_expected_internals(), f"uvicorn {uvicorn.__version__} changed its protocol"


@pytest.fixture
def reached_asgi(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """ "METHOD path" of each request that the ASGI app (InferFastPath) was asked to answer."""
    seen: list[str] = []
    original = InferFastPath.__call__

    async def spy(self: InferFastPath, scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(f"{scope['method']} {scope['path']}")
        await original(self, scope, receive, send)

    monkeypatch.setattr(InferFastPath, "__call__", spy)
    return seen


def test_infer_requests_never_reach_asgi_but_the_rest_does(api: str, reached_asgi: list[str]) -> None:
    body, length = binary_body(IMAGE)
    with connect(api) as sock:
        answers = Answers(sock)
        sock.sendall(infer_request(body, length))
        assert answers.next()[0] == 200
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: d\r\n\r\n")
        assert answers.next()[0] == 200
        sock.sendall(infer_request(body, length, target=URL + "?via=asgi"))
        assert answers.next()[0] == 200
    assert reached_asgi == ["GET /v2/health/live", f"POST {URL}"]


@pytest.fixture
def https_api(served: Engine, tmp_path: Path) -> Iterator[tuple[str, ssl.SSLContext]]:
    """The API over HTTPS, as a device with a certificate serves it (`api_tls`), and a client
    context that trusts it."""
    ca = FleetCA(tmp_path / "ca")
    cert, key = ca.api_tls()
    app = create_app(served, lambda: {"device_id": "dev-a"}, TOKEN, lambda: {"update_state": "idle"})
    with serving(app, https=(str(cert), str(key))) as url:
        yield url, ssl.create_default_context(cafile=str(ca.cert_path))


def test_over_https_infer_is_answered_by_the_protocol_too(
    https_api: tuple[str, ssl.SSLContext], served: Engine, reached_asgi: list[str]
) -> None:
    url, context = https_api
    assert url.startswith("https://")
    body, length = binary_body(IMAGE, {"parameters": {"binary_data_output": True}})
    headers = {"Authorization": f"Bearer {TOKEN}", "Inference-Header-Content-Length": str(length)}
    expected = served.run("surface-defect", {"image": IMAGE})["logits"]
    with httpx.Client(base_url=url, verify=context) as client:
        for _ in range(3):  # one TLS connection, kept alive
            answer = client.post(URL, content=body, headers=headers)
            assert answer.status_code == 200, answer.text
            np.testing.assert_allclose(logits(answer.headers, answer.content), expected, rtol=1e-5)
        pieces = iter([body[:1000], body[1000:20000], body[20000:]])  # a chunked body
        chunked = client.post(URL, content=pieces, headers=headers)
        assert chunked.status_code == 200 and "content-length" not in chunked.request.headers
        np.testing.assert_allclose(logits(chunked.headers, chunked.content), expected, rtol=1e-5)
        refused = client.post(URL, content=body, headers={**headers, "Authorization": "Bearer wrong"})
        assert refused.status_code == 401
        assert client.get("/v2/health/live").json() == {"live": True}
    assert reached_asgi == ["GET /v2/health/live"]  # every infer request was the protocol's
