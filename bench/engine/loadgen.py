"""A lean HTTP/1.1 load generator: N keep-alive connections, each sending one request after another.

It writes prepared request bytes and reads the response by Content-Length, so its own cost per
request is a few tens of microseconds of Python: what it measures is mostly the server. (A general
client such as tritonclient costs more per request; bench_engine.py reports it separately.)
"""

import asyncio
import time
from dataclasses import dataclass, field


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


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def _connection(port: int, request: bytes, until: float, warmup_until: float, load: Load) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while (start := time.perf_counter()) < until:
            writer.write(request)
            status, _ = await _read_response(reader)
            if start >= warmup_until:
                load.latencies_s.append(time.perf_counter() - start)
                load.statuses[status] = load.statuses.get(status, 0) + 1
            if status != 200:
                await asyncio.sleep(0.001)  # a refused request: back off a little, as a client would
    finally:
        writer.close()


async def _run(port: int, request: bytes, clients: int, seconds: float, warmup_s: float) -> Load:
    load = Load()
    begin = time.perf_counter()
    warmup_until, until = begin + warmup_s, begin + warmup_s + seconds
    await asyncio.gather(*(_connection(port, request, until, warmup_until, load) for _ in range(clients)))
    load.elapsed_s = time.perf_counter() - warmup_until
    return load


def run_load(port: int, request: bytes, clients: int, seconds: float, warmup_s: float = 1.0) -> Load:
    """`clients` connections for `warmup_s` + `seconds`; only requests started after the warm-up count."""
    return asyncio.run(_run(port, request, clients, seconds, warmup_s))
