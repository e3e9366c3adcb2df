"""uvicorn's httptools protocol, with v2 infer requests answered by the protocol itself.

For every request uvicorn builds an ASGI scope, an asyncio Event and Task, copies the body twice
(`bytearray +=`, then `bytes()`), and checks every response header against two regexes: ~0.09 ms of
CPU per request on the 2-core test machine, as much as the model's own share of a batch costs there
(bench/engine/RESULTS.md). This protocol takes infer requests (`POST /v2/models/{name}[/versions/{v}]
/infer`) before any of that: the credential and the declared size are checked when the headers are
in, the body is collected as it arrives, and once it is complete the request is parsed and queued
on the model's batcher from the parser's own callback. The batcher sets the request's future on the
event loop, and the answer is written from that future's callback. No task, no ASGI messages.

Everything else, and any request that comes in while an earlier one on the same connection is still
being answered (HTTP pipelining, which uvicorn queues), goes to uvicorn's own code unchanged, and so
to the ASGI app: the same InferFastPath (device/api/fastpath.py) whose `admit`, `start` and answers
this protocol uses, so both answer alike (tests/device/api/test_infer_protocol.py).

This leans on uvicorn's protocol internals (`self.cycle`, `self.url`, `self.headers`,
`on_response_complete`); `protocol_for` checks they are there, and `device/api/server.py` falls
back to plain uvicorn with a warning when they are not.
"""

import asyncio
import logging
import re
from typing import Any

from device.api.fastpath import (
    Answer,
    Headers,
    InferFastPath,
    PendingInfer,
    error_answer,
    ok_answer,
    read_headers,
)
from device.api.limits import BodyTooLarge
from device.engine.backends.base import Tensors

log = logging.getLogger(__name__)

# The raw request target, as the client sent it. A target with a query, percent-escapes or anything
# but plain path characters goes the ASGI way, where uvicorn decodes it.
_INFER_TARGET = re.compile(rb"/v2/models/([A-Za-z0-9._\-]+)(?:/versions/([A-Za-z0-9._\-]+))?/infer")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE = b"connection: close\r\n"
_INTERNAL_ERROR = (
    b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 21\r\nconnection: close\r\n\r\nInternal Server Error"
)

try:  # uvicorn[standard]: the device extra has it; without httptools the API runs on plain uvicorn
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
except ImportError:  # pragma: no cover - exercised only on an install without httptools
    HttpToolsProtocol = None  # type: ignore[assignment,misc]
    STATUS_LINE = {}


class _NoEvent:
    """uvicorn's protocol sets its cycle's message event on disconnect; nobody waits on ours."""

    def set(self) -> None:
        pass


_NO_EVENT = _NoEvent()


class InferExchange:
    """One infer request on a connection, in the place of uvicorn's RequestResponseCycle.

    Carries the attributes uvicorn's protocol reads and writes on its cycle (`response_complete`,
    `disconnected`, `keep_alive`, `message_event`) and what this protocol needs to answer it.
    """

    __slots__ = (
        "body",
        "disconnected",
        "found",
        "keep_alive",
        "message_event",
        "name",
        "response_complete",
        "size",
        "version",
    )

    def __init__(self, name: str, version: str | None, found: dict[bytes, bytes], keep_alive: bool) -> None:
        self.name, self.version, self.found = name, version, found
        self.keep_alive = keep_alive
        self.body: list[bytes] = []
        self.size = 0
        self.response_complete = False  # also true once an error was answered before the body ended
        self.disconnected = False
        self.message_event = _NO_EVENT


def protocol_for(fast: InferFastPath) -> "type[asyncio.Protocol] | None":
    """A uvicorn HTTP protocol class that answers `fast`'s infer requests itself; None when this uvicorn
    has no httptools protocol, or not the internals the class relies on."""
    if HttpToolsProtocol is None or not _has_expected_internals():
        return None
    return type("InferHttpProtocol", (InferHttpProtocol,), {"fast": fast})


def _has_expected_internals() -> bool:
    needed = ("on_headers_complete", "on_body", "on_message_complete", "on_response_complete", "shutdown")
    return all(callable(getattr(HttpToolsProtocol, n, None)) for n in needed) and bool(STATUS_LINE)


if HttpToolsProtocol is not None:

    class InferHttpProtocol(HttpToolsProtocol):
        """See the module's text. `fast` is set on the class that `protocol_for` makes."""

        fast: InferFastPath
        _drain_then: InferExchange | None = None

        # -- request: headers, body, end (httptools parser callbacks) --

        def on_headers_complete(self) -> None:
            exchange = self._take(self.parser.get_method())
            if exchange is None:
                super().on_headers_complete()
                return
            self.cycle = exchange  # type: ignore[assignment]  # duck-typed: see InferExchange
            client = self.client[0] if self.client else "unknown"
            try:
                self.fast.admit(client, exchange.found)
            except Exception as e:
                self._answer_error(exchange, e)
                return
            if self.expect_100_continue:
                self.transport.write(_CONTINUE)

        def _take(self, method: bytes) -> InferExchange | None:
            """An exchange for this request when it is one this protocol answers, else None."""
            if method != b"POST" or self.parser.should_upgrade():
                return None
            if self.cycle is not None and not self.cycle.response_complete:
                return None  # pipelined behind an unfinished request: uvicorn queues it
            match = _INFER_TARGET.fullmatch(self.url)
            if match is None:
                return None
            version = match[2].decode("ascii") if match[2] is not None else None
            http_version = self.parser.get_http_version()
            keep_alive = http_version != "1.0" and self.parser.should_keep_alive()
            # uvicorn lower-cases header names as they come, as ASGI has them
            return InferExchange(match[1].decode("ascii"), version, read_headers(self.headers), keep_alive)

        def on_body(self, body: bytes) -> None:
            exchange = self.cycle
            if not isinstance(exchange, InferExchange):
                super().on_body(body)
                return
            if exchange.response_complete:
                return  # answered already (an error before the body ended): the rest is dropped
            exchange.size += len(body)
            if exchange.size > self.fast.max_body_bytes:
                self._answer_error(exchange, BodyTooLarge())
                return
            exchange.body.append(body)

        def on_message_complete(self) -> None:
            exchange = self.cycle
            if not isinstance(exchange, InferExchange):
                super().on_message_complete()
                return
            if exchange.response_complete:
                return
            parts = exchange.body
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            exchange.body = []
            try:
                pending = self.fast.start(exchange.name, exchange.version, exchange.found, body)
            except Exception as e:
                self._answer_error(exchange, e)
                return
            pending.outputs.add_done_callback(lambda done: self._answer_outputs(exchange, pending, done))

        # -- answer --

        def _answer_outputs(
            self, exchange: InferExchange, pending: PendingInfer, done: "asyncio.Future[Tensors]"
        ) -> None:
            if exchange.disconnected:
                return  # the client left while its request ran; the rows were computed for nobody
            try:
                if done.cancelled():
                    raise asyncio.CancelledError("the request was cancelled before it ran")
                answer = ok_answer(*pending.encode(done.result()))
            except Exception as e:
                self._answer_error(exchange, e)
                return
            self._write(exchange, answer)

        def _answer_error(self, exchange: InferExchange, e: Exception) -> None:
            answer = error_answer(e)
            if answer is None:  # a bug: logged, and the plain 500 uvicorn gives for one
                log.error("infer request to %r failed", exchange.name, exc_info=e)
                exchange.response_complete = True
                self.transport.write(_INTERNAL_ERROR)
                self.transport.close()
                return
            # The rest of an oversized body is not read: the connection ends with the answer.
            self._write(exchange, answer, close=isinstance(e, BodyTooLarge))

        def _write(self, exchange: InferExchange, answer: Answer, close: bool = False) -> None:
            if exchange.disconnected or self.transport.is_closing():
                return
            status, body, headers = answer
            keep_alive = exchange.keep_alive and not close
            defaults = self.server_state.default_headers
            self.transport.write(_response(status, body, headers, defaults, keep_alive))
            if not keep_alive:
                exchange.response_complete = True
                self.transport.close()
                self.on_response_complete()  # counts the request; nothing more on a closing transport
                return
            if self.flow.write_paused:
                # The client is not reading its answers: take no next request until it does, as
                # uvicorn's own send waits for the drain.
                self._drain_then = exchange
                self.flow.pause_reading()
                return
            self._complete(exchange)

        def _complete(self, exchange: InferExchange) -> None:
            exchange.response_complete = True
            self.on_response_complete()  # uvicorn's: keep-alive timer, the next pipelined request

        def resume_writing(self) -> None:
            super().resume_writing()
            exchange, self._drain_then = self._drain_then, None
            if exchange is not None and not exchange.disconnected:
                self._complete(exchange)

        def connection_lost(self, exc: Exception | None) -> None:
            self._drain_then = None
            super().connection_lost(exc)


def _response(status: int, body: bytes, headers: Headers, defaults: Any, keep_alive: bool) -> bytes:
    """One HTTP/1.1 response: status line, uvicorn's default headers (date, server), ours, the body."""
    lines = [STATUS_LINE[status]]
    for name, value in defaults:
        lines += (name, b": ", value, b"\r\n")
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"content-length: %d\r\n" % len(body))
    if not keep_alive:
        lines.append(_CLOSE)
    lines += (b"\r\n", body)
    return b"".join(lines)
