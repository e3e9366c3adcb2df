"""An ASGI guard that refuses request bodies over a size limit before they are buffered."""

import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(Exception):
    pass


class UnsupportedEncoding(ValueError):
    """A request body in a Content-Encoding we do not read, or not valid in the one it names."""


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except BodyTooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = f'{{"error":"request body exceeds {self.max_bytes} bytes"}}'.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def decompress_body(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """Undo a request's Content-Encoding (gzip or deflate, as Triton's client sends them) within the cap.

    The limit applies to the decompressed size too, so a small compressed bomb is refused as early
    as the plain oversized body it expands to.
    """
    if encoding is None or encoding == "identity":
        return body
    if encoding == "gzip":
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        inflater = zlib.decompressobj()
    else:
        raise UnsupportedEncoding(
            f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none"
        )
    try:
        plain = inflater.decompress(body, max_bytes + 1)
    except zlib.error as e:
        raise UnsupportedEncoding(f"the body is not valid {encoding} data: {e}") from e
    if len(plain) > max_bytes:
        raise BodyTooLarge
    return plain
