"""A lean HTTP/1.1 load generator: N keep-alive connections, each sending one request after another.

Each connection is an asyncio Protocol that writes prepared request bytes and cuts responses out of
what it receives by Content-Length, with no stream reader and no line-by-line parsing: about 20 µs
of Python per request, so that on a 2-core machine the clients take as little as they can from the
server they measure. (A general client such as tritonclient costs far more per request;
bench_engine.py reports it separately.)
"""

import asyncio
import ssl
import time
from dataclasses import dataclass, field
from typing import cast


@dataclass
class Load:
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)


def http_request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: bench", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise ValueError(f"a response without Content-Length: {head[:200]!r}")


class _Client(asyncio.Protocol):
    """One keep-alive connection: the next request goes out as soon as the last answer is in."""

    def __init__(self, request: bytes, until: float, warmup_until: float, load: Load) -> None:
        self.request, self.until, self.warmup_until, self.load = request, until, warmup_until, load
        self.buffer = b""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.started = time.perf_counter()
        if self.started >= self.until:
            self.transport.close()
            return
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        total = end + 4 + _content_length(self.buffer[:end])
        if len(self.buffer) < total:
            return
        status = int(self.buffer[9:12])  # "HTTP/1.1 200 OK"
        self.buffer = self.buffer[total:]
        if self.started >= self.warmup_until:
            self.load.latencies_s.append(time.perf_counter() - self.started)
            self.load.statuses[status] = self.load.statuses.get(status, 0) + 1
        if status != 200:  # a refused request: back off a little, as a client would
            asyncio.get_running_loop().call_later(0.001, self._send)
        else:
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _run(
    port: int, request: bytes, clients: int, seconds: float, warmup_s: float, tls: ssl.SSLContext | None
) -> Load:
    load = Load()
    loop = asyncio.get_running_loop()
    begin = time.perf_counter()
    warmup_until, until = begin + warmup_s, begin + warmup_s + seconds
    protocols = []
    for _ in range(clients):
        _, protocol = await loop.create_connection(
            lambda: _Client(request, until, warmup_until, load), "127.0.0.1", port, ssl=tls
        )
        protocols.append(protocol)
    await asyncio.gather(*(p.done for p in protocols))
    load.elapsed_s = time.perf_counter() - warmup_until
    return load


def run_load(
    port: int,
    request: bytes,
    clients: int,
    seconds: float,
    warmup_s: float = 1.0,
    tls: ssl.SSLContext | None = None,
) -> Load:
    """`clients` connections for `warmup_s` + `seconds`; only requests started after the warm-up count.
    `tls`: connect over TLS with this context (a server with a certificate).

    On uvloop when it is installed (the device extra has it): 10-15 % less client CPU per request.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_run(port, request, clients, seconds, warmup_s, tls))
    return uvloop.run(_run(port, request, clients, seconds, warmup_s, tls))
