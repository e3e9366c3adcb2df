"""The v2 infer route answered straight from ASGI, ahead of FastAPI, for every infer request.

FastAPI's router, dependency solver and Request/Response objects cost about as much CPU per request
as the rest of the server does for a small model (bench/engine/RESULTS.md); on 2 cores that CPU is
taken from the model. This route does only what an infer request needs, in one pass: pick the four
headers it reads from the raw ASGI list, check the credential (a cached check, ~1 µs), read the body
within the cap, run the call and write the answer with prebuilt header names. The FastAPI route of
the same path stays, with the same call behind it, for the OpenAPI description and for any
composition without this one; tests/device/api/test_binary.py checks both answer alike.

Under uvicorn the device goes one step further: `device/api/infer_protocol.py` answers these requests
from the HTTP protocol itself, with the same `admit`, `start` and answers as this class, and no ASGI
task; this ASGI route then serves whatever that protocol hands on (pipelined requests, other servers).
"""

import asyncio
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from device.api.auth import TECHNICIAN, Principal, Role
from device.api.errors import error_status
from device.api.limits import ASGIApp, BodyTooLarge, Receive, Scope, Send
from device.engine.backends.base import Tensors

INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
# client address, bearer credential or None, role needed -> who it is (or an HTTPException)
Authorize = Callable[[str, str | None, Role], Principal]
Headers = list[tuple[bytes, bytes]]
# status, body, headers (Content-Length is added by whoever writes it)
Answer = tuple[int, bytes, Headers]

_AUTHORIZATION = b"authorization"
_HEADER_LENGTH = b"inference-header-content-length"
_ENCODING = b"content-encoding"
_CONTENT_LENGTH = b"content-length"
_READ = frozenset({_AUTHORIZATION, _HEADER_LENGTH, _ENCODING, _CONTENT_LENGTH})
_JSON = (b"content-type", b"application/json")
_BINARY = (b"content-type", b"application/octet-stream")


@dataclass(frozen=True, slots=True)
class PendingInfer:
    """An infer request handed to the model: its outputs to come, and how they become the answer."""

    outputs: "asyncio.Future[Tensors]"
    # outputs -> response body, length of its JSON part when binary tensors follow (else None)
    encode: Callable[[Tensors], tuple[bytes, int | None]]


# model name, version or None, Inference-Header-Content-Length or None, Content-Encoding or None,
# raw body -> the request on its way (or an error to answer)
StartInfer = Callable[[str, str | None, str | None, str | None, bytes], PendingInfer]


def bearer_credentials(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer ...` header, read exactly as FastAPI's HTTPBearer reads it
    (scheme case-insensitive, the token stripped)."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.partition(" ")
    credentials = credentials.strip()
    if not (scheme and credentials) or scheme.lower() != "bearer":
        return None
    return credentials


def read_headers(headers: Iterable[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """The headers an infer request needs, from lower-case (name, value) pairs; the first of a repeat wins."""
    found: dict[bytes, bytes] = {}
    for key, value in headers:
        if key in _READ and key not in found:
            found[key] = value
    return found


def ok_answer(content: bytes, json_length: int | None) -> Answer:
    if json_length is None:
        return 200, content, [_JSON]
    return 200, content, [_BINARY, (_HEADER_LENGTH, b"%d" % json_length)]


def error_answer(e: Exception) -> Answer | None:
    """The answer for an error the API reports, or None for a bug (the server's plain 500)."""
    mapped = error_status(e)
    if mapped is None:
        return None
    status, message, extra = mapped
    headers = [_JSON, *((k.lower().encode(), v.encode()) for k, v in extra.items())]
    return status, json.dumps({"error": message}).encode(), headers


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


class InferFastPath:
    """Answers v2 infer requests (POST) itself; passes everything else to `app`."""

    def __init__(self, app: ASGIApp, authorize: Authorize, start: StartInfer, max_body_bytes: int) -> None:
        self.app = app
        self.authorize = authorize
        self.start_infer = start
        self.max_body_bytes = max_body_bytes

    def admit(self, client: str, found: dict[bytes, bytes]) -> None:
        """Refuse an oversized body (by its declared length) or a missing or wrong credential, before
        the body is read. Raises BodyTooLarge or the authenticator's HTTPException."""
        declared = found.get(_CONTENT_LENGTH)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise BodyTooLarge
        # Running a model is a technician's act, as on the FastAPI route.
        self.authorize(client, bearer_credentials(_text(found.get(_AUTHORIZATION))), TECHNICIAN)

    def start(self, name: str, version: str | None, found: dict[bytes, bytes], body: bytes) -> PendingInfer:
        """Parse the body and queue it on the model; raises what `error_answer` maps."""
        return self.start_infer(
            name, version, _text(found.get(_HEADER_LENGTH)), _text(found.get(_ENCODING)), body
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INFER_PATH.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        found = read_headers(scope["headers"])  # names are lower case in ASGI
        client = scope.get("client")
        try:
            self.admit(client[0] if client else "unknown", found)
            body = await _read_body(receive, self.max_body_bytes)
            if body is None:
                return  # the client went away before it finished sending; nobody to answer
            pending = self.start(match[1], match[2], found, body)
            answer = ok_answer(*pending.encode(await pending.outputs))
        except Exception as e:
            mapped = error_answer(e)
            if mapped is None:
                raise  # a bug: uvicorn logs it and answers 500
            answer = mapped
        await _respond(send, *answer)


async def _read_body(receive: Receive, max_bytes: int) -> bytes | None:
    """The whole body, or None when the client disconnected first; BodyTooLarge past `max_bytes`."""
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):  # the common case: one message, no copy
        if len(body) > max_bytes:
            raise BodyTooLarge
        return body
    chunks, seen = [body], len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > max_bytes:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes, headers: Headers) -> None:
    headers.append((_CONTENT_LENGTH, b"%d" % len(body)))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
