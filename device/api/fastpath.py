"""The v2 infer route answered straight from ASGI, ahead of FastAPI, for every infer request.

FastAPI's router, dependency solver and Request/Response objects cost about as much CPU per request
as the rest of the server does for a small model (bench/engine/RESULTS.md); on 2 cores that CPU is
taken from the model. This route does only what an infer request needs, in one pass: pick the four
headers it reads from the raw ASGI list, check the credential (a cached check, ~1 µs), read the body
within the cap, run the call and write the answer with prebuilt header names. The FastAPI route of
the same path stays, with the same call behind it, for the OpenAPI description and for any
composition without this one; tests/device/api/test_binary.py checks both answer alike.
"""

import json
import re
from collections.abc import Awaitable, Callable

from device.api.auth import TECHNICIAN, Principal, Role
from device.api.errors import error_status
from device.api.limits import ASGIApp, BodyTooLarge, Receive, Scope, Send

INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
# model name, version or None, Inference-Header-Content-Length or None, Content-Encoding or None,
# raw body -> response body, length of its JSON part when binary tensors follow (else None)
InferCall = Callable[[str, str | None, str | None, str | None, bytes], Awaitable[tuple[bytes, int | None]]]
# client address, bearer credential or None, role needed -> who it is (or an HTTPException)
Authorize = Callable[[str, str | None, Role], Principal]

_AUTHORIZATION = b"authorization"
_HEADER_LENGTH = b"inference-header-content-length"
_ENCODING = b"content-encoding"
_CONTENT_LENGTH = b"content-length"
_READ = frozenset({_AUTHORIZATION, _HEADER_LENGTH, _ENCODING, _CONTENT_LENGTH})
_JSON = (b"content-type", b"application/json")
_BINARY = (b"content-type", b"application/octet-stream")


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


class InferFastPath:
    """Answers v2 infer requests (POST) itself; passes everything else to `app`."""

    def __init__(self, app: ASGIApp, authorize: Authorize, infer: InferCall, max_body_bytes: int) -> None:
        self.app = app
        self.authorize = authorize
        self.infer = infer
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INFER_PATH.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        found: dict[bytes, bytes] = {}
        for key, value in scope["headers"]:  # names are lower case in ASGI; the first of a repeat wins
            if key in _READ and key not in found:
                found[key] = value
        client = scope.get("client")
        try:
            declared = found.get(_CONTENT_LENGTH)
            # Refused before anything else, as the size guard in front of the other routes does.
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                raise BodyTooLarge
            authorization = found.get(_AUTHORIZATION)
            self.authorize(
                client[0] if client else "unknown",
                bearer_credentials(authorization.decode("latin-1") if authorization is not None else None),
                TECHNICIAN,  # running a model is a technician's act, as on the FastAPI route
            )
            body = await _read_body(receive, self.max_body_bytes)
            if body is None:
                return  # the client went away before it finished sending; nobody to answer
            header_length, encoding = found.get(_HEADER_LENGTH), found.get(_ENCODING)
            content, json_length = await self.infer(
                match[1],
                match[2],
                header_length.decode("latin-1") if header_length is not None else None,
                encoding.decode("latin-1") if encoding is not None else None,
                body,
            )
        except Exception as e:
            mapped = error_status(e)
            if mapped is None:
                raise  # a bug: uvicorn logs it and answers 500
            status, message, extra = mapped
            headers = [_JSON, *((k.lower().encode(), v.encode()) for k, v in extra.items())]
            await _respond(send, status, json.dumps({"error": message}).encode(), headers)
            return
        if json_length is None:
            await _respond(send, 200, content, [_JSON])
        else:
            await _respond(send, 200, content, [_BINARY, (_HEADER_LENGTH, b"%d" % json_length)])


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


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers.append((_CONTENT_LENGTH, b"%d" % len(body)))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
